//! The KSM counters adaptive mode decides on.

/// The KSM counters adaptive mode decides on (`/sys/kernel/mm/ksm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    pub full_scans: u64,
    pub pages_sharing: u64,
    /// Pages ksmd keeps track of: `pages_shared + pages_sharing + pages_unshared +
    /// pages_volatile` (its rmap items). It grows while mergeable memory is still arriving, as
    /// it does for a guest that is booting.
    pub scanned: u64,
    /// `general_profit` (bytes saved net of KSM's metadata; Linux 6.7+), `None` where absent.
    pub general_profit: Option<i64>,
    /// `pages_scanned`: ksmd's page visits since boot (Linux 6.7+), `None` where absent.
    pub pages_scanned: Option<u64>,
    /// AnonPages (`/proc/meminfo`), in pages, `None` where unread. Unlike the pages ksmd tracks,
    /// it shows memory arriving whatever ksmd's pace.
    pub anon_pages: Option<u64>,
}

impl Counters {
    /// The counters from the four page counts the kernel shows.
    pub fn new(full_scans: u64, shared: u64, sharing: u64, unshared: u64, volatile: u64) -> Counters {
        let scanned = shared.saturating_add(sharing).saturating_add(unshared).saturating_add(volatile);
        Counters {
            full_scans,
            pages_sharing: sharing,
            scanned,
            general_profit: None,
            pages_scanned: None,
            anon_pages: None,
        }
    }

    pub fn with_profit(self, general_profit: Option<i64>) -> Counters {
        Counters { general_profit, ..self }
    }

    pub fn with_visits(self, pages_scanned: Option<u64>) -> Counters {
        Counters { pages_scanned, ..self }
    }

    pub fn with_anon(self, anon_pages: Option<u64>) -> Counters {
        Counters { anon_pages, ..self }
    }
}
