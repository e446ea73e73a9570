//! What the workload writes. Page `i` holds the same bytes in every process, except a spread of
//! unique pages per process; no two pages of one process are alike, so every merge KSM finds is
//! across processes and the best it can do is known in advance.

/// Page layout of one workload process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub pages: u64,
    pub unique_pages: u64,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LayoutError {
    #[error("--size-mib must be at least 1")]
    Empty,
    #[error("--unique-fraction must be between 0 and 1, not {0}")]
    Fraction(f64),
    #[error("{0} MiB does not fit in this machine's address space")]
    TooBig(u64),
}

const MIB: u64 = 1024 * 1024;

impl Layout {
    pub fn new(size_mib: u64, unique_fraction: f64, page_size: u64) -> Result<Layout, LayoutError> {
        if size_mib == 0 {
            return Err(LayoutError::Empty);
        }
        if !(0.0..=1.0).contains(&unique_fraction) {
            return Err(LayoutError::Fraction(unique_fraction));
        }
        let bytes = size_mib.checked_mul(MIB).filter(|&b| usize::try_from(b).is_ok());
        let pages = bytes.ok_or(LayoutError::TooBig(size_mib))? / page_size;
        let unique_pages = (pages as f64 * unique_fraction).round() as u64;
        Ok(Layout { pages, unique_pages })
    }

    /// Pages that are identical in every process.
    pub fn shared_pages(&self) -> u64 {
        self.pages - self.unique_pages
    }

    /// `pages_sharing` once `procs` processes are fully merged: each shared page is kept once
    /// (counted in `pages_shared`) and the other `procs - 1` copies point to it.
    pub fn max_pages_sharing(&self, procs: u64) -> u64 {
        procs.saturating_sub(1) * self.shared_pages()
    }

    /// Unique pages are spread evenly, so KSM meets them all along its scan, not in one block.
    pub fn is_unique(&self, page: u64) -> bool {
        let (u, p) = (u128::from(self.unique_pages), u128::from(self.pages));
        let page = u128::from(page);
        (page + 1) * u / p > page * u / p
    }
}

/// Fills one page (as 64-bit words): the same for every process unless the page is unique, then
/// keyed by the process's `owner` index as well.
pub fn fill_page(words: &mut [u64], page: u64, unique_owner: Option<u32>) {
    let key = match unique_owner {
        None => 0x6b73_6d5f_7368_6172, // "ksm_shar"
        Some(owner) => 0x756e_6971_0000_0000 | u64::from(owner),
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
            let l = Layout { pages, unique_pages: unique };
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
