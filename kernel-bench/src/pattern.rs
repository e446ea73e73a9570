//! What the workload writes. Page `i` holds the same bytes in every process, except a spread of
//! pages that are each process's own: unique pages (fixed) and dirtied pages (rewritten each
//! round, like a running guest's working set). No two pages of one process are alike, so every
//! merge KSM finds is across processes and the best it can do is known in advance.

/// Page layout of one workload process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub pages: u64,
    /// Pages the process keeps as its own, unchanged.
    pub unique_pages: u64,
    /// Pages the process owns and rewrites every round (never mergeable across processes).
    pub dirty_pages: u64,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LayoutError {
    #[error("--size-mib must be at least 1")]
    Empty,
    #[error("--unique-fraction must be between 0 and 1, not {0}")]
    Fraction(f64),
    #[error("--dirty-fraction must be between 0 and 1, not {0}")]
    DirtyFraction(f64),
    #[error("--unique-fraction {unique} plus --dirty-fraction {dirty} is more than 1 (dirtied pages are not shared)")]
    OwnFraction { unique: f64, dirty: f64 },
    #[error("{0} MiB does not fit in this machine's address space")]
    TooBig(u64),
}

/// What one page of one process holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    /// The same in every process.
    Shared,
    /// The process's own, never rewritten.
    Unique { owner: u32 },
    /// The process's own, different in every dirtying `round` (0: as first filled).
    Dirty { owner: u32, round: u64 },
}

const MIB: u64 = 1024 * 1024;

impl Layout {
    pub fn new(size_mib: u64, unique_fraction: f64, page_size: u64) -> Result<Layout, LayoutError> {
        Layout::with_dirty(size_mib, unique_fraction, 0.0, page_size)
    }

    /// As [`Layout::new`], with `dirty_fraction` of the pages dirtied as well. Dirtied pages are
    /// taken from the shared ones: a page rewritten every round cannot stay merged, so it must
    /// not count as a twin.
    pub fn with_dirty(
        size_mib: u64,
        unique_fraction: f64,
        dirty_fraction: f64,
        page_size: u64,
    ) -> Result<Layout, LayoutError> {
        if size_mib == 0 {
            return Err(LayoutError::Empty);
        }
        if !(0.0..=1.0).contains(&unique_fraction) {
            return Err(LayoutError::Fraction(unique_fraction));
        }
        if !(0.0..=1.0).contains(&dirty_fraction) {
            return Err(LayoutError::DirtyFraction(dirty_fraction));
        }
        // A little slack for decimal fractions that add up to 1 but not quite in binary.
        if unique_fraction + dirty_fraction > 1.0 + 1e-9 {
            return Err(LayoutError::OwnFraction { unique: unique_fraction, dirty: dirty_fraction });
        }
        let bytes = size_mib.checked_mul(MIB).filter(|&b| usize::try_from(b).is_ok());
        let pages = bytes.ok_or(LayoutError::TooBig(size_mib))? / page_size;
        let unique_pages = (pages as f64 * unique_fraction).round() as u64;
        // Each count is rounded on its own; together they never exceed the mapping.
        let dirty_pages = ((pages as f64 * dirty_fraction).round() as u64).min(pages - unique_pages);
        Ok(Layout { pages, unique_pages, dirty_pages })
    }

    /// Pages that are identical in every process.
    pub fn shared_pages(&self) -> u64 {
        self.pages - self.unique_pages - self.dirty_pages
    }

    /// `pages_sharing` once `procs` processes are fully merged: each shared page is kept once
    /// (counted in `pages_shared`) and the other `procs - 1` copies point to it.
    pub fn max_pages_sharing(&self, procs: u64) -> u64 {
        procs.saturating_sub(1) * self.shared_pages()
    }

    /// A process's own pages (unique or dirtied) are spread evenly, so KSM meets them all along
    /// its scan, not in one block. Returns the page's rank among them.
    fn own_rank(&self, page: u64) -> Option<u64> {
        let own = u128::from(self.unique_pages + self.dirty_pages);
        let (p, page) = (u128::from(self.pages), u128::from(page));
        // Own pages in 0..page, floor(page * own / p), go up by one exactly at each own page.
        let before = page * own / p;
        ((page + 1) * own / p > before).then_some(before as u64)
    }

    /// Dirtied pages are spread evenly among the own ones, hence over the whole mapping.
    fn rank_is_dirty(&self, rank: u64) -> bool {
        let own = u128::from(self.unique_pages + self.dirty_pages);
        let (d, rank) = (u128::from(self.dirty_pages), u128::from(rank));
        (rank + 1) * d / own > rank * d / own
    }

    /// The page is the process's own and never rewritten.
    pub fn is_unique(&self, page: u64) -> bool {
        self.own_rank(page).is_some_and(|r| !self.rank_is_dirty(r))
    }

    /// The page is the process's own and rewritten every dirtying round.
    pub fn is_dirty(&self, page: u64) -> bool {
        self.own_rank(page).is_some_and(|r| self.rank_is_dirty(r))
    }

    /// What process `owner` holds in `page` after `round` dirtying rounds.
    pub fn content(&self, page: u64, owner: u32, round: u64) -> Content {
        match self.own_rank(page) {
            None => Content::Shared,
            Some(r) if self.rank_is_dirty(r) => Content::Dirty { owner, round },
            Some(_) => Content::Unique { owner },
        }
    }
}

/// Fills one page (as 64-bit words): the same for every process unless the page is unique, then
/// keyed by the process's `owner` index as well.
pub fn fill_page(words: &mut [u64], page: u64, unique_owner: Option<u32>) {
    let content = unique_owner.map_or(Content::Shared, |owner| Content::Unique { owner });
    fill(words, page, content);
}

/// Fills one page (as 64-bit words) with `content`; the page index is mixed in, so no two pages
/// of one process are alike.
pub fn fill(words: &mut [u64], page: u64, content: Content) {
    let key = match content {
        Content::Shared => 0x6b73_6d5f_7368_6172, // "ksm_shar"
        Content::Unique { owner } => 0x756e_6971_0000_0000 | u64::from(owner),
        // Hashed, so (owner, round) pairs spread over all 64 bits; tagged "dirt".
        Content::Dirty { owner, round } => splitmix64(0x6469_7274_0000_0000 ^ splitmix64(round) ^ u64::from(owner)),
    };
    let base = splitmix64(key ^ page.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    for (w, word) in words.iter_mut().enumerate() {
        *word = splitmix64(base.wrapping_add(w as u64));
    }
}

/// A cheap, well-mixed 64-bit hash: pages look random to KSM's checksum and compare.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    const PAGE_WORDS: usize = 512;

    fn page(index: u64, owner: Option<u32>) -> Vec<u64> {
        let mut p = vec![0; PAGE_WORDS];
        fill_page(&mut p, index, owner);
        p
    }

    #[test]
    fn layout_counts_pages_and_the_best_merge() {
        let l = Layout::new(256, 0.0, 4096).expect("layout");
        assert_eq!((l.pages, l.unique_pages, l.shared_pages()), (65_536, 0, 65_536));
        // 8 x 256 MiB, page i identical: 7 x 256 MiB saved (the 1,792 MiB).
        assert_eq!(l.max_pages_sharing(8) * 4096 / MIB, 1_792);
        assert_eq!(l.max_pages_sharing(1), 0, "a process alone merges nothing");
        let l = Layout::new(16, 0.25, 4096).expect("layout");
        assert_eq!((l.pages, l.unique_pages, l.shared_pages()), (4_096, 1_024, 3_072));
    }

    #[test]
    fn layout_rejects_bad_input() {
        assert_eq!(Layout::new(0, 0.0, 4096), Err(LayoutError::Empty));
        assert_eq!(Layout::new(1, 1.5, 4096), Err(LayoutError::Fraction(1.5)));
        assert!(matches!(Layout::new(1, f64::NAN, 4096), Err(LayoutError::Fraction(_))));
        assert_eq!(Layout::new(u64::MAX, 0.0, 4096), Err(LayoutError::TooBig(u64::MAX)));
    }

    #[test]
    fn unique_pages_are_exactly_counted_and_spread() {
        for (pages, unique) in [(4096, 0), (4096, 1), (4096, 1024), (4096, 4096), (1000, 333)] {
            let l = Layout { pages, unique_pages: unique, dirty_pages: 0 };
            let marked: Vec<u64> = (0..pages).filter(|&p| l.is_unique(p)).collect();
            assert_eq!(marked.len() as u64, unique, "{l:?}");
            if unique >= 4 {
                // Every quarter of the mapping holds about a quarter of them.
                let first_quarter = marked.iter().filter(|&&p| p < pages / 4).count() as u64;
                assert!(first_quarter.abs_diff(unique / 4) <= 1, "{l:?}: {first_quarter}");
            }
        }
    }

    #[test]
    fn dirtied_pages_are_taken_from_the_shared_ones() {
        let l = Layout::with_dirty(16, 0.25, 0.25, 4096).expect("layout");
        assert_eq!((l.pages, l.unique_pages, l.dirty_pages, l.shared_pages()), (4_096, 1_024, 1_024, 2_048));
        assert_eq!(l.max_pages_sharing(3), 2 * 2_048, "dirtied pages are never twins");
        let l = Layout::with_dirty(16, 0.7, 0.3, 4096).expect("0.7 + 0.3 is 1, even in binary");
        assert_eq!(l.shared_pages(), 0);
        assert_eq!(Layout::with_dirty(16, 0.25, 0.0, 4096), Layout::new(16, 0.25, 4096), "no dirt: as before");
    }

    #[test]
    fn dirt_is_refused_past_what_the_shared_pages_allow() {
        assert_eq!(Layout::with_dirty(1, 0.0, 1.5, 4096), Err(LayoutError::DirtyFraction(1.5)));
        assert_eq!(Layout::with_dirty(1, 0.0, -0.1, 4096), Err(LayoutError::DirtyFraction(-0.1)));
        assert!(matches!(Layout::with_dirty(1, 0.0, f64::NAN, 4096), Err(LayoutError::DirtyFraction(_))));
        assert_eq!(Layout::with_dirty(1, 0.75, 0.5, 4096), Err(LayoutError::OwnFraction { unique: 0.75, dirty: 0.5 }));
        let msg = LayoutError::OwnFraction { unique: 0.75, dirty: 0.5 }.to_string();
        assert!(msg.contains("--unique-fraction 0.75 plus --dirty-fraction 0.5 is more than 1"), "{msg}");
    }

    #[test]
    fn unique_and_dirtied_pages_are_disjoint_exactly_counted_and_spread() {
        for (pages, unique, dirty) in
            [(4096, 0, 1), (4096, 1024, 1024), (4096, 0, 4096), (1000, 333, 333), (999, 1, 997)]
        {
            let l = Layout { pages, unique_pages: unique, dirty_pages: dirty };
            let unique_marked: Vec<u64> = (0..pages).filter(|&p| l.is_unique(p)).collect();
            let dirty_marked: Vec<u64> = (0..pages).filter(|&p| l.is_dirty(p)).collect();
            assert_eq!(unique_marked.len() as u64, unique, "{l:?}");
            assert_eq!(dirty_marked.len() as u64, dirty, "{l:?}");
            assert!(!dirty_marked.iter().any(|&p| l.is_unique(p)), "{l:?}: disjoint");
            if dirty >= 4 {
                let first_quarter = dirty_marked.iter().filter(|&&p| p < pages / 4).count() as u64;
                assert!(first_quarter.abs_diff(dirty / 4) <= 2, "{l:?}: {first_quarter}");
            }
            for p in 0..pages {
                let expected = match (l.is_unique(p), l.is_dirty(p)) {
                    (false, false) => Content::Shared,
                    (true, false) => Content::Unique { owner: 3 },
                    (false, true) => Content::Dirty { owner: 3, round: 9 },
                    (true, true) => panic!("{l:?}: page {p} both unique and dirtied"),
                };
                assert_eq!(l.content(p, 3, 9), expected, "{l:?}: page {p}");
            }
        }
    }

    #[test]
    fn dirt_leaves_the_unique_pages_where_they_were_without_it() {
        let plain = Layout { pages: 4096, unique_pages: 1000, dirty_pages: 0 };
        let expected: Vec<u64> = (0..4096).filter(|&p| (p + 1) * 1000 / 4096 > p * 1000 / 4096).collect();
        assert_eq!((0..4096).filter(|&p| plain.is_unique(p)).collect::<Vec<_>>(), expected);
        assert!(!(0..4096).any(|p| plain.is_dirty(p)));
    }

    #[test]
    fn dirtied_pages_change_every_round_and_are_each_processs_own() {
        let fill_as = |index, content| {
            let mut p = vec![0; PAGE_WORDS];
            fill(&mut p, index, content);
            p
        };
        let rounds: HashSet<Vec<u64>> = (0..100).map(|round| fill_as(5, Content::Dirty { owner: 0, round })).collect();
        assert_eq!(rounds.len(), 100, "every round new");
        let d = fill_as(5, Content::Dirty { owner: 0, round: 1 });
        assert_eq!(d, fill_as(5, Content::Dirty { owner: 0, round: 1 }), "deterministic");
        assert_ne!(d, fill_as(5, Content::Dirty { owner: 1, round: 1 }), "another process's");
        assert_ne!(d, page(5, None));
        assert_ne!(d, page(5, Some(0)));
        assert!(d.iter().any(|&w| w != 0));
        assert_eq!(page(5, Some(2)), fill_as(5, Content::Unique { owner: 2 }), "fill_page is fill");
    }

    #[test]
    fn shared_pages_match_across_processes_and_differ_within_one() {
        assert_eq!(page(7, None), page(7, None));
        let distinct: HashSet<Vec<u64>> = (0..2_000).map(|i| page(i, None)).collect();
        assert_eq!(distinct.len(), 2_000, "no two pages of a process alike");
    }

    #[test]
    fn unique_pages_differ_between_processes_and_from_shared_ones() {
        let (a, b) = (page(5, Some(0)), page(5, Some(1)));
        assert_ne!(a, b);
        assert_ne!(a, page(5, None));
        assert_eq!(a, page(5, Some(0)), "deterministic");
    }

    #[test]
    fn pages_are_not_zero_pages() {
        // The kernel may treat zero pages specially (use_zero_pages): the workload has none.
        for i in 0..1_000 {
            assert!(page(i, None).iter().any(|&w| w != 0));
        }
    }
}
