//! The world-readable files of `/sys/kernel/mm/ksm`, read for the metrics as an unprivileged
//! reader: each one bounded, a missing or garbled one simply absent (kernels differ in which
//! they have; the metrics say which were missing, a scrape never fails for it).

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Every file of the KSM sysfs folder the metrics export, as of Linux 6.18.
pub const FILES: [&str; 24] = [
    "advisor_max_cpu",
    "advisor_max_pages_to_scan",
    "advisor_min_pages_to_scan",
    "advisor_mode",
    "advisor_target_scan_time",
    "full_scans",
    "general_profit",
    "ksm_zero_pages",
    "max_page_sharing",
    "merge_across_nodes",
    "pages_scanned",
    "pages_shared",
    "pages_sharing",
    "pages_skipped",
    "pages_to_scan",
    "pages_unshared",
    "pages_volatile",
    "run",
    "sleep_millisecs",
    "smart_scan",
    "stable_node_chains",
    "stable_node_chains_prune_millisecs",
    "stable_node_dups",
    "use_zero_pages",
];

/// The longest a file of this folder reads (a number, or `[none] scan-time`), with room.
const LIMIT: u64 = 256;

/// What was read: file name to its text, trimmed. Absent: missing, unreadable or too long.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KsmFiles(pub BTreeMap<&'static str, String>);

impl KsmFiles {
    /// Reads every one of [`FILES`] under `root`.
    pub fn read(root: &Path) -> KsmFiles {
        KsmFiles(FILES.iter().filter_map(|&name| read_small(&root.join(name)).map(|text| (name, text))).collect())
    }

    pub fn text(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// A file that holds a number (`general_profit` may be negative).
    pub fn number(&self, name: &str) -> Option<i64> {
        self.text(name).and_then(|t| t.parse().ok())
    }
}

/// `advisor_mode` lists the modes with the one in force in brackets: `[none] scan-time`.
/// Returns every mode and which one is in force.
pub fn parse_choice(text: &str) -> Option<(Vec<String>, String)> {
    let mut chosen = None;
    let mut all = vec![];
    for word in text.split_whitespace() {
        let name = match word.strip_prefix('[').and_then(|w| w.strip_suffix(']')) {
            Some(inner) => {
                chosen = Some(inner.to_owned());
                inner
            }
            None => word,
        };
        all.push(name.to_owned());
    }
    chosen.map(|c| (all, c))
}

fn read_small(path: &Path) -> Option<String> {
    // O_NONBLOCK: sysfs ignores it, and a FIFO put in a test's place opens at once.
    let file = OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path).ok()?;
    let mut text = String::new();
    let n = file.take(LIMIT + 1).read_to_string(&mut text).ok()?;
    (n as u64 <= LIMIT).then(|| text.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_long_and_garbled_files_are_absent_not_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("pages_sharing"), "42\n").expect("write");
        std::fs::write(dir.path().join("general_profit"), "-8192\n").expect("write");
        std::fs::write(dir.path().join("full_scans"), "x".repeat(1000)).expect("write");
        std::fs::write(dir.path().join("run"), "garbage\n").expect("write");
        let files = KsmFiles::read(dir.path());
        assert_eq!(files.number("pages_sharing"), Some(42));
        assert_eq!(files.number("general_profit"), Some(-8192));
        assert_eq!(files.text("full_scans"), None, "too long");
        assert_eq!(files.text("run"), Some("garbage"));
        assert_eq!(files.number("run"), None);
        assert_eq!(files.text("pages_scanned"), None);
    }

    #[test]
    fn the_mode_in_force_is_the_bracketed_one() {
        assert_eq!(parse_choice("[none] scan-time"), Some((vec!["none".into(), "scan-time".into()], "none".into())));
        assert_eq!(parse_choice("none [scan-time]").map(|c| c.1), Some("scan-time".into()));
        assert_eq!(parse_choice("none scan-time"), None);
        assert_eq!(parse_choice(""), None);
    }
}
