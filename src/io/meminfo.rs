//! `AnonPages` from `/proc/meminfo`: the amount of memory ksmd may have to scan.

use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum MeminfoError {
    #[error("reading {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{} has no valid AnonPages line", path.display())]
    NoAnonPages { path: PathBuf },
}

/// The `AnonPages:` value in kB, from the text of a meminfo file.
pub fn parse_anon_kb(text: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix("AnonPages:")?;
        let mut words = rest.split_whitespace();
        let kb = words.next()?.parse().ok()?;
        matches!(words.next(), Some("kB") | None).then_some(kb)
    })
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
    }
}
