//! From `/proc/meminfo`: `AnonPages`, the amount of memory ksmd may have to scan, and
//! `MemAvailable`/`MemTotal`, how short of memory the host is (the need gate's figure).

use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum MeminfoError {
    #[error("reading {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{} has no valid AnonPages line", path.display())]
    NoAnonPages { path: PathBuf },
    #[error("{} has no valid {key} line", path.display())]
    Missing { path: PathBuf, key: &'static str },
}

/// The value in kB of the meminfo line `key` (`"MemAvailable"`), from the text of the file.
pub fn parse_kb(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(key)?.strip_prefix(':')?;
        let mut words = rest.split_whitespace();
        let kb = words.next()?.parse().ok()?;
        matches!(words.next(), Some("kB") | None).then_some(kb)
    })
}

/// `MemAvailable` and `MemTotal`, in kB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemAvailable {
    pub available_kb: u64,
    pub total_kb: u64,
}

impl MemAvailable {
    /// The share of RAM available, 0.0 to 1.0 (0 for a MemTotal of 0).
    pub fn ratio(self) -> f64 {
        if self.total_kb == 0 {
            return 0.0;
        }
        (self.available_kb as f64 / self.total_kb as f64).min(1.0)
    }
}

/// `MemAvailable` and `MemTotal`, read now; a file without either (or garbled) is an error
/// naming the line.
pub fn mem_available(path: &Path) -> Result<MemAvailable, MeminfoError> {
    let text =
        crate::io::small_file::read(path).map_err(|source| MeminfoError::Read { path: path.to_owned(), source })?;
    let get =
        |key: &'static str| parse_kb(&text, key).ok_or_else(|| MeminfoError::Missing { path: path.to_owned(), key });
    let total_kb = get("MemTotal")?;
    if total_kb == 0 {
        return Err(MeminfoError::Missing { path: path.to_owned(), key: "MemTotal" });
    }
    Ok(MemAvailable { available_kb: get("MemAvailable")?, total_kb })
}

/// The `AnonPages:` value in kB, from the text of a meminfo file.
pub fn parse_anon_kb(text: &str) -> Option<u64> {
    parse_kb(text, "AnonPages")
}

/// Anonymous pages of `page_size` bytes, read now (settings are computed when applied).
pub fn anon_pages(path: &Path, page_size: u64) -> Result<u64, MeminfoError> {
    let text =
        crate::io::small_file::read(path).map_err(|source| MeminfoError::Read { path: path.to_owned(), source })?;
    let kb = parse_anon_kb(&text).ok_or_else(|| MeminfoError::NoAnonPages { path: path.to_owned() })?;
    Ok(kb.saturating_mul(1024) / page_size.max(1))
}

pub fn page_size() -> u64 {
    rustix::param::page_size() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_anon_pages_among_other_lines() {
        let text = "MemTotal:       24000000 kB\nAnonPages:     1048576 kB\nMapped: 5 kB\n";
        assert_eq!(parse_anon_kb(text), Some(1_048_576));
        assert_eq!(parse_anon_kb("AnonPagesX: 5 kB\n"), None);
        assert_eq!(parse_anon_kb("AnonPages: many kB\n"), None);
        assert_eq!(parse_anon_kb("AnonPages: 5 MB\n"), None);
        assert_eq!(parse_anon_kb(""), None);
    }

    #[test]
    fn converts_kb_to_pages() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("meminfo");
        std::fs::write(&path, "AnonPages:     1048576 kB\n").expect("write");
        assert_eq!(anon_pages(&path, 4096).expect("read"), 262_144);
        std::fs::write(&path, "MemFree: 1 kB\n").expect("write");
        assert!(matches!(anon_pages(&path, 4096), Err(MeminfoError::NoAnonPages { .. })));
    }

    #[test]
    fn reads_the_real_meminfo() {
        assert!(anon_pages(Path::new("/proc/meminfo"), page_size()).is_ok());
        let m = mem_available(Path::new("/proc/meminfo")).expect("a 3.14+ kernel has MemAvailable");
        assert!(m.ratio() > 0.0 && m.ratio() <= 1.0, "{m:?}");
    }

    #[test]
    fn mem_available_and_total_or_a_named_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("meminfo");
        std::fs::write(&path, "MemTotal: 1000 kB\nMemFree: 10 kB\nMemAvailable: 120 kB\n").expect("write");
        let m = mem_available(&path).expect("read");
        assert_eq!(m, MemAvailable { available_kb: 120, total_kb: 1000 });
        assert!((m.ratio() - 0.12).abs() < 1e-9);
        std::fs::write(&path, "MemTotal: 1000 kB\nMemAvailable: lots kB\n").expect("write");
        let e = mem_available(&path).unwrap_err();
        assert!(matches!(e, MeminfoError::Missing { key: "MemAvailable", .. }), "{e}");
        assert!(e.to_string().contains("MemAvailable"), "{e}");
        std::fs::write(&path, "MemTotal: 0 kB\nMemAvailable: 1 kB\n").expect("write");
        assert!(matches!(mem_available(&path), Err(MeminfoError::Missing { key: "MemTotal", .. })));
        // A prefix is not the key.
        assert_eq!(parse_kb("MemAvailableX: 5 kB\n", "MemAvailable"), None);
    }
}
