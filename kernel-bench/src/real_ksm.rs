//! The machine's own KSM, held for the whole benchmark: taken under the project's real-KSM lock,
//! recorded first, and put back exactly as found at the end, even on error, panic or signal.

use std::fs::File;
use std::time::{Duration, Instant};

use kata_ksm_throttler::core::knobs::{Knobs, Target};
use kata_ksm_throttler::io::sysfs::{Ksm, SysfsError};
use kata_ksm_throttler_test_support::eventually::until_some_blocking;

pub use kata_ksm_throttler_test_support::real_ksm::{REAL_KSM, REAL_KSM_LOCK};

#[derive(Debug, thiserror::Error)]
pub enum RealKsmError {
    #[error("the real KSM needs root (it writes {REAL_KSM})")]
    NotRoot,
    #[error("no KSM in this kernel: {0}")]
    NoKsm(SysfsError),
    #[error("the real-KSM lock {REAL_KSM_LOCK}: {0}")]
    Lock(std::io::Error),
    #[error(transparent)]
    Sysfs(#[from] SysfsError),
    #[error("KSM did not unmerge within {limit:?}: pages_shared {shared}, pages_sharing {sharing}")]
    Unmerge { limit: Duration, shared: i64, sharing: i64 },
    #[error("priming the advisor: {0}")]
    Prime(std::io::Error),
    #[error("KSM reads {now:?}, not {want:?}")]
    NotAsWanted { want: Knobs, now: Knobs },
}

/// `smart_scan` (kernel 6.7+): ksmd visits a page that has not merged for a while only every
/// few full scans (up to every 9th). Two processes' copies of a page merge only when both are
/// visited in the same scan, so when the first process has aged alone, whether the second ever
/// merges with it depends on the scans' phase: seen in CI, 0 % merged after 1,496 flat-out full
/// scans of 2 x 16 MiB. The smoke turns it off so its check is not a lottery.
pub struct RealKsm {
    ksm: Ksm,
    found: Knobs,
    /// What each run starts from: as found, except `smart_scan` if the smoke turned it off.
    run_with: Knobs,
    restored: bool,
    _lock: File,
}

impl RealKsm {
    /// Waits for the lock (saying so if someone else holds it), then records the knobs.
    pub fn take() -> Result<RealKsm, RealKsmError> {
        if !rustix::process::geteuid().is_root() {
            return Err(RealKsmError::NotRoot);
        }
        let ksm = Ksm::open(REAL_KSM).map_err(RealKsmError::NoKsm)?;
        let lock = kata_ksm_throttler_test_support::real_ksm::lock().map_err(RealKsmError::Lock)?;
        let found = ksm.read()?;
        Ok(RealKsm { ksm, run_with: found.clone(), found, restored: false, _lock: lock })
    }

    /// Turns `smart_scan` off until [`RealKsm::restore`]; a no-op where the kernel has none.
    pub fn smart_scan_off(&mut self) -> Result<(), RealKsmError> {
        self.run_with.smart_scan = self.found.smart_scan.map(|_| 0);
        self.put(&self.run_with)
    }

    pub fn ksm(&self) -> &Ksm {
        &self.ksm
    }

    pub fn found(&self) -> &Knobs {
        &self.found
    }

    /// A clean start: everything unmerged (`run` = 2, until pages_shared and pages_sharing read
    /// 0), then the knobs as found. Returns how long unmerging took.
    pub fn clean(&self, limit: Duration) -> Result<Duration, RealKsmError> {
        let start = Instant::now();
        self.ksm.apply(&Target { run: Some(2), ..Target::default() })?;
        let mut left = (0, 0);
        let unmerged = until_some_blocking(limit, "KSM to unmerge", || {
            let counter = |name| self.ksm.read_counter(name).map(|n| n.unwrap_or(0));
            match (counter("pages_shared"), counter("pages_sharing")) {
                (Ok(0), Ok(0)) => Some(Ok(())),
                (Ok(shared), Ok(sharing)) => {
                    left = (shared, sharing);
                    None
                }
                (Err(e), _) | (_, Err(e)) => Some(Err(e)),
            }
        });
        match unmerged {
            Ok(read) => read?,
            Err(_) => return Err(RealKsmError::Unmerge { limit, shared: left.0, sharing: left.1 }),
        }
        let took = start.elapsed();
        self.put(&self.run_with)?;
        Ok(took)
    }

    /// Brings the kernel's scan-time advisor (just turned on) to its steady state before guests
    /// arrive, as on a host that has run it for a while. Turned on, its first full scan takes
    /// ksmd's CPU time since boot for that scan's (the kernel keeps no earlier reading), and on a
    /// ksmd that has worked before it then sizes pages_to_scan at its floor of 10: the run's
    /// first full scan over the guests would take many minutes. So a page set of our own
    /// (unique pages: nothing merges) is scanned until pages_to_scan holds over a full scan, or
    /// `limit` passes. Returns the pages_to_scan the advisor ended at and the full scans it took.
    pub fn prime_advisor(&self, limit: Duration) -> Result<(u64, u64), RealKsmError> {
        use rustix::mm::{madvise, mmap_anonymous, munmap, Advice, MapFlags, ProtFlags};
        const PAGES: usize = 64;
        let page = rustix::param::page_size();
        let len = PAGES * page;
        // SAFETY: a fresh private anonymous mapping, written below as bytes and unmapped before
        // this returns; nothing else sees it.
        let ptr =
            unsafe { mmap_anonymous(std::ptr::null_mut(), len, ProtFlags::READ | ProtFlags::WRITE, MapFlags::PRIVATE) }
                .map_err(|e| RealKsmError::Prime(e.into()))?;
        // SAFETY: the mapping is `len` bytes and ours alone.
        let bytes = unsafe { std::slice::from_raw_parts_mut(ptr.cast::<u8>(), len) };
        for (i, p) in bytes.chunks_mut(page).enumerate() {
            p.fill(0x5a);
            p[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
        }
        // SAFETY: advice on our own mapping; it does not change its contents.
        let result = unsafe { madvise(ptr, len, Advice::LinuxMergeable) }
            .map_err(|e| RealKsmError::Prime(e.into()))
            .and_then(|()| self.settle_advisor(limit));
        // SAFETY: the mapping made above, no longer used (`bytes` ends here).
        let unmapped = unsafe { munmap(ptr, len) }.map_err(|e| RealKsmError::Prime(e.into()));
        let settled = result?;
        unmapped?;
        Ok(settled)
    }

    fn settle_advisor(&self, limit: Duration) -> Result<(u64, u64), RealKsmError> {
        let scans = || self.ksm.read_counter("full_scans").map(|n| n.unwrap_or(0).max(0) as u64);
        let first = scans()?;
        let (mut seen, mut pages) = (first, self.ksm.read()?.pages_to_scan);
        let settled = until_some_blocking(limit, "the advisor to settle", || {
            let mut step = || -> Result<Option<(u64, u64)>, RealKsmError> {
                let now = scans()?;
                if now == seen {
                    return Ok(None);
                }
                let p = self.ksm.read()?.pages_to_scan;
                // The first scan's sizing is the one off the reading since boot: judge from the 2nd.
                if now >= first + 2 && p == pages {
                    return Ok(Some((p, now - first)));
                }
                (seen, pages) = (now, p);
                Ok(None)
            };
            step().transpose()
        });
        match settled {
            Ok(found) => found,
            // Not settled within `limit`: where it stands.
            Err(_) => Ok((pages, seen - first)),
        }
    }

    /// Writes `want` and checks that the kernel reads it back.
    fn put(&self, want: &Knobs) -> Result<(), RealKsmError> {
        self.ksm.apply(&Target::from(want))?;
        let now = self.ksm.read()?;
        if now != *want {
            return Err(RealKsmError::NotAsWanted { want: want.clone(), now });
        }
        Ok(())
    }

    /// Unmerges what the benchmark left merged and puts the knobs back exactly as found.
    pub fn restore(&mut self) -> Result<(), RealKsmError> {
        let cleaned = self.clean(Duration::from_secs(120));
        // Even if unmerging failed, the knobs go back.
        let put = self.put(&self.found);
        cleaned?;
        put?;
        self.restored = true;
        Ok(())
    }
}

impl Drop for RealKsm {
    fn drop(&mut self) {
        if !self.restored {
            match self.restore() {
                Ok(()) => eprintln!("real KSM restored as found: {:?}", self.found),
                Err(e) => eprintln!("COULD NOT RESTORE the real KSM to {:?}: {e}", self.found),
            }
        }
    }
}
