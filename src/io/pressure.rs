//! Memory pressure from `/proc/pressure/memory` (PSI, Linux 4.20+): the share of the last 10 s
//! in which some (or all) tasks waited for memory. A kernel without PSI (the file missing, or
//! `psi=0`, which makes reads fail with EOPNOTSUPP) is "no PSI", not an error; a file that is
//! there but does not read as PSI is a specific error.

use std::io;
use std::path::{Path, PathBuf};

use crate::io::small_file;

/// The avg10 figures, in percent (0 to 100).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Psi {
    pub some_avg10: f64,
    pub full_avg10: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum PressureError {
    #[error("reading {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{} is not PSI (want `some avg10=… ` and `full avg10=…` lines): {text:?}", path.display())]
    Garbled { path: PathBuf, text: String },
}

/// The memory PSI file under a proc root.
pub fn path_under(proc_root: &Path) -> PathBuf {
    proc_root.join("pressure").join("memory")
}

/// The avg10 figures read now; `Ok(None)` on a kernel without PSI.
pub fn read(path: &Path) -> Result<Option<Psi>, PressureError> {
    let text = match small_file::read(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(None),
        Err(source) => return Err(PressureError::Read { path: path.to_owned(), source }),
    };
    parse(&text)
        .map(Some)
        .ok_or_else(|| PressureError::Garbled { path: path.to_owned(), text: text.chars().take(120).collect() })
}

/// Parses the text of a PSI file. `full` is missing from the CPU file on older kernels, never
/// from the memory file, so both lines are required.
pub fn parse(text: &str) -> Option<Psi> {
    let avg10 = |kind: &str| -> Option<f64> {
        let line = text.lines().find_map(|l| l.strip_prefix(kind)?.strip_prefix(' '))?;
        let value = line.split_whitespace().find_map(|w| w.strip_prefix("avg10="))?;
        let v: f64 = value.parse().ok()?;
        (v.is_finite() && (0.0..=100.0).contains(&v)).then_some(v)
    };
    Some(Psi { some_avg10: avg10("some")?, full_avg10: avg10("full")? })
}

#[cfg(test)]
mod tests {
    use super::*;

    const REAL: &str =
        "some avg10=1.50 avg60=0.00 avg300=0.00 total=0\nfull avg10=0.25 avg60=0.00 avg300=0.00 total=0\n";

    #[test]
    fn parses_some_and_full() {
        assert_eq!(parse(REAL), Some(Psi { some_avg10: 1.5, full_avg10: 0.25 }));
        assert_eq!(parse("some avg10=1.50 avg60=0.00\n"), None, "full is required");
        assert_eq!(parse("some avg10=abc\nfull avg10=0.00\n"), None);
        assert_eq!(parse("some avg10=250.0\nfull avg10=0.00\n"), None, "a percentage");
        assert_eq!(parse("somex avg10=1\nfull avg10=0\n"), None);
        assert_eq!(parse(""), None);
    }

    #[test]
    fn missing_is_no_psi_and_garbled_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = path_under(dir.path());
        assert!(read(&path).expect("missing is fine").is_none());
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(&path, REAL).expect("write");
        assert_eq!(read(&path).expect("read"), Some(Psi { some_avg10: 1.5, full_avg10: 0.25 }));
        std::fs::write(&path, "garbage\n").expect("write");
        let e = read(&path).unwrap_err();
        assert!(matches!(e, PressureError::Garbled { .. }), "{e}");
        assert!(e.to_string().contains("garbage"), "{e}");
    }

    #[test]
    fn reads_the_real_file_where_there_is_one() {
        // Either PSI or none: never an error on a real kernel.
        read(&path_under(Path::new("/proc"))).expect("the real PSI file reads");
    }
}
