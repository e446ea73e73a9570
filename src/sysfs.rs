//! The KSM knobs in sysfs (`/sys/kernel/mm/ksm` or a scratch directory in tests): read them, and
//! write a new set in an order that never lets ksmd run with half of it.

use std::fmt;
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const RUN: &str = "run";
pub const PAGES_TO_SCAN: &str = "pages_to_scan";
pub const SLEEP_MILLISECS: &str = "sleep_millisecs";
pub const ADVISOR_MODE: &str = "advisor_mode";
pub const SMART_SCAN: &str = "smart_scan";

/// The advisor value that leaves pages_to_scan to us (Linux 6.8+; absent before).
pub const ADVISOR_NONE: &str = "none";

/// Every knob the throttler may change, as the kernel reports them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Knobs {
    pub run: u8,
    pub pages_to_scan: u64,
    pub sleep_millisecs: u64,
    /// `None` on kernels without the advisor.
    pub advisor_mode: Option<String>,
    /// `None` on kernels without it (before 6.7), and in records written before it was managed.
    #[serde(default)]
    pub smart_scan: Option<u8>,
}

impl Knobs {
    /// Whether these values could have come from the kernel: what a state file must pass before
    /// anything in it is written back.
    pub fn validate(&self) -> Result<(), String> {
        if self.run > 2 {
            return Err(format!("run must be 0, 1 or 2, not {}", self.run));
        }
        if self.pages_to_scan > u64::from(u32::MAX) || self.sleep_millisecs > u64::from(u32::MAX) {
            return Err("pages_to_scan and sleep_millisecs must fit in 32 bits".into());
        }
        if let Some(smart) = self.smart_scan.filter(|&v| v > 1) {
            return Err(format!("smart_scan must be 0 or 1, not {smart}"));
        }
        if let Some(mode) = &self.advisor_mode {
            if mode.is_empty() || mode.len() > 32 || !mode.bytes().all(|b| b.is_ascii_lowercase() || b == b'-') {
                return Err(format!("advisor_mode {mode:?} is not a kernel advisor name"));
            }
        }
        Ok(())
    }
}

/// What to write; `None` leaves a knob as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Target {
    pub run: Option<u8>,
    pub pages_to_scan: Option<u64>,
    pub sleep_millisecs: Option<u64>,
    pub advisor_mode: Option<String>,
    pub smart_scan: Option<u8>,
}

impl From<&Knobs> for Target {
    fn from(k: &Knobs) -> Self {
        Target {
            run: Some(k.run),
            pages_to_scan: Some(k.pages_to_scan),
            sleep_millisecs: Some(k.sleep_millisecs),
            advisor_mode: k.advisor_mode.clone(),
            smart_scan: k.smart_scan,
        }
    }
}

/// What went wrong with which file: callers turn it into a D-Bus error or a log line.
#[derive(Debug, thiserror::Error)]
pub enum SysfsError {
    #[error("reading {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("writing {value:?} to {}: {source}", path.display())]
    Write { path: PathBuf, value: String, source: io::Error },
    #[error("{} holds {content:?}, not a number", path.display())]
    Parse { path: PathBuf, content: String },
}

impl SysfsError {
    pub fn errno(&self) -> Option<i32> {
        match self {
            SysfsError::Read { source, .. } | SysfsError::Write { source, .. } => source.raw_os_error(),
            SysfsError::Parse { .. } => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Ksm {
    root: PathBuf,
}

impl Ksm {
    /// Checks that the directory has the three knobs every KSM kernel has.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, SysfsError> {
        let ksm = Ksm { root: root.into() };
        for name in [RUN, PAGES_TO_SCAN, SLEEP_MILLISECS] {
            let path = ksm.path(name);
            std::fs::metadata(&path).map_err(|source| SysfsError::Read { path, source })?;
        }
        Ok(ksm)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    pub fn has_advisor(&self) -> bool {
        self.path(ADVISOR_MODE).exists()
    }

    pub fn read(&self) -> Result<Knobs, SysfsError> {
        let run = self.read_number(RUN)?;
        let run =
            u8::try_from(run).map_err(|_| SysfsError::Parse { path: self.path(RUN), content: run.to_string() })?;
        Ok(Knobs {
            run,
            pages_to_scan: self.read_number(PAGES_TO_SCAN)?,
            sleep_millisecs: self.read_number(SLEEP_MILLISECS)?,
            advisor_mode: self.read_advisor()?,
            smart_scan: self.read_smart_scan()?,
        })
    }

    fn read_smart_scan(&self) -> Result<Option<u8>, SysfsError> {
        match self.read_counter(SMART_SCAN)? {
            None => Ok(None),
            Some(v @ 0..=1) => Ok(Some(v as u8)),
            Some(v) => Err(SysfsError::Parse { path: self.path(SMART_SCAN), content: v.to_string() }),
        }
    }

    /// A counter such as `pages_sharing`; `Ok(None)` where this kernel does not have it.
    pub fn read_counter(&self, name: &str) -> Result<Option<i64>, SysfsError> {
        let path = self.path(name);
        match std::fs::read_to_string(&path) {
            Ok(s) => s.trim().parse().map(Some).map_err(|_| SysfsError::Parse { path, content: s }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(SysfsError::Read { path, source }),
        }
    }

    fn read_number(&self, name: &str) -> Result<u64, SysfsError> {
        let path = self.path(name);
        let s = std::fs::read_to_string(&path).map_err(|source| SysfsError::Read { path: path.clone(), source })?;
        s.trim().parse().map_err(|_| SysfsError::Parse { path, content: s })
    }

    /// The kernel lists the choices with the current one in brackets: `[none] scan-time`.
    fn read_advisor(&self) -> Result<Option<String>, SysfsError> {
        let path = self.path(ADVISOR_MODE);
        match std::fs::read_to_string(&path) {
            Ok(s) => Ok(Some(parse_advisor(&s).ok_or(SysfsError::Parse { path, content: s })?)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(SysfsError::Read { path, source }),
        }
    }

    /// Writes `target`, skipping knobs that already hold their value, and returns how many files
    /// were written. Order matters:
    /// - the advisor is turned off first (while it scans by time, pages_to_scan refuses writes, and
    ///   turning it off resets pages_to_scan), and is put back last;
    /// - a running ksmd is paused (`run` = 0, merged pages kept) while its two scan knobs change,
    ///   and `run` is written after them, so it never runs on half a setting. One scan knob
    ///   alone (a setting sized again for new memory) is written as it runs: one write is never
    ///   half a setting, and a `run` write waits for ksmd's batch under way (the kernel's
    ///   `ksm_thread_mutex`), seconds when ksmd is starved of CPU;
    /// - `smart_scan` is written before `run`, so a scan started by it already skips (or not).
    pub fn apply(&self, target: &Target) -> Result<u32, SysfsError> {
        let mut writes = 0;
        let mut cur = self.read()?;

        let advisor_last = match (&target.advisor_mode, &cur.advisor_mode) {
            (Some(want), Some(have)) if want != have => {
                if want == ADVISOR_NONE {
                    self.write(ADVISOR_MODE, want)?;
                    writes += 1;
                    cur = self.read()?;
                    None
                } else {
                    Some(want.as_str())
                }
            }
            _ => None,
        };

        let pages = target.pages_to_scan.filter(|&v| v != cur.pages_to_scan);
        let sleep = target.sleep_millisecs.filter(|&v| v != cur.sleep_millisecs);
        let mut run_now = cur.run;
        if run_now == 1 && pages.is_some() && sleep.is_some() {
            self.write(RUN, 0)?;
            writes += 1;
            run_now = 0;
        }
        if let Some(v) = pages {
            self.write(PAGES_TO_SCAN, v)?;
            writes += 1;
        }
        if let Some(v) = sleep {
            self.write(SLEEP_MILLISECS, v)?;
            writes += 1;
        }
        if let Some(v) = target.smart_scan.filter(|&v| cur.smart_scan.is_some_and(|have| have != v)) {
            self.write(SMART_SCAN, v)?;
            writes += 1;
        }
        let run = target.run.unwrap_or(cur.run);
        if run != run_now {
            self.write(RUN, run)?;
            writes += 1;
        }
        if let Some(advisor) = advisor_last {
            self.write(ADVISOR_MODE, advisor)?;
            writes += 1;
        }
        Ok(writes)
    }

    /// Writes one attribute under the root.
    pub fn write(&self, name: &str, value: impl fmt::Display) -> Result<(), SysfsError> {
        let path = self.path(name);
        let value = value.to_string();
        // One write(2) of the whole line, as `echo` does; no O_CREAT, so a missing knob is an
        // error rather than a new file in a scratch directory.
        let result = OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)
            .and_then(|mut f| f.write_all(format!("{value}\n").as_bytes()));
        result.map_err(|source| SysfsError::Write { path, value, source })
    }
}

/// The kernel lists the choices with the current one in brackets (`[none] scan-time`); a scratch
/// directory holds just the word last written, which is read as it is.
pub fn parse_advisor(s: &str) -> Option<String> {
    let mode = match s.find('[') {
        Some(open) => {
            let rest = &s[open + 1..];
            &rest[..rest.find(']')?]
        }
        None if s.split_whitespace().count() == 1 => s.trim(),
        None => return None,
    };
    (!mode.is_empty()).then(|| mode.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(run: &str, pages: &str, sleep: &str, advisor: Option<&str>) -> (tempfile::TempDir, Ksm) {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(RUN), run).expect("write");
        std::fs::write(dir.path().join(PAGES_TO_SCAN), pages).expect("write");
        std::fs::write(dir.path().join(SLEEP_MILLISECS), sleep).expect("write");
        if let Some(a) = advisor {
            std::fs::write(dir.path().join(ADVISOR_MODE), a).expect("write");
        }
        let ksm = Ksm::open(dir.path()).expect("open");
        (dir, ksm)
    }

    #[test]
    fn reads_the_kernel_formats() {
        let (_d, ksm) = scratch("0\n", "100\n", "20\n", Some("[none] scan-time\n"));
        let k = ksm.read().expect("read");
        assert_eq!(
            k,
            Knobs {
                run: 0,
                pages_to_scan: 100,
                sleep_millisecs: 20,
                advisor_mode: Some("none".into()),
                smart_scan: None
            }
        );
        assert_eq!(parse_advisor("none [scan-time]\n").as_deref(), Some("scan-time"));
        assert_eq!(parse_advisor("none scan-time"), None);
        assert_eq!(parse_advisor("scan-time\n").as_deref(), Some("scan-time"));
        assert_eq!(parse_advisor("[]"), None);
    }

    #[test]
    fn smart_scan_is_read_where_present_written_only_when_it_differs_and_restored() {
        let (d, ksm) = scratch("0\n", "100\n", "20\n", None);
        assert_eq!(ksm.read().expect("read").smart_scan, None, "absent before 6.7");
        let t = Target { smart_scan: Some(0), ..Target::default() };
        assert_eq!(ksm.apply(&t).expect("apply"), 0, "a knob this kernel lacks is left alone");
        assert!(!d.path().join(SMART_SCAN).exists(), "and never created");

        std::fs::write(d.path().join(SMART_SCAN), "1\n").expect("write");
        let initial = ksm.read().expect("read");
        assert_eq!(initial.smart_scan, Some(1));
        assert_eq!(ksm.apply(&t).expect("apply"), 1);
        assert_eq!(ksm.read().expect("read").smart_scan, Some(0));
        assert_eq!(ksm.apply(&t).expect("apply"), 0, "already off");
        assert_eq!(ksm.apply(&Target::from(&initial)).expect("restore"), 1);
        assert_eq!(ksm.read().expect("read"), initial);

        std::fs::write(d.path().join(SMART_SCAN), "2\n").expect("write");
        assert!(matches!(ksm.read(), Err(SysfsError::Parse { .. })), "only 0 and 1 are kernel values");
    }

    #[test]
    fn garbage_in_a_knob_is_a_parse_error_naming_the_file() {
        let (_d, ksm) = scratch("0\n", "lots\n", "20\n", None);
        let err = ksm.read().unwrap_err();
        assert!(matches!(err, SysfsError::Parse { .. }));
        assert!(err.to_string().contains("pages_to_scan"), "{err}");
    }

    #[test]
    fn open_refuses_a_directory_without_knobs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = Ksm::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("run"), "{err}");
    }

    #[test]
    fn apply_skips_knobs_that_hold_their_value() {
        let (_d, ksm) = scratch("1\n", "100\n", "20\n", None);
        let t = Target { run: Some(1), pages_to_scan: Some(100), sleep_millisecs: Some(20), ..Target::default() };
        assert_eq!(ksm.apply(&t).expect("apply"), 0);
    }

    #[test]
    fn apply_pauses_a_running_ksmd_and_writes_run_last() {
        let (d, ksm) = scratch("1\n", "100\n", "20\n", None);
        let t = Target { run: Some(1), pages_to_scan: Some(5000), sleep_millisecs: Some(1), ..Target::default() };
        // run=0, pages, sleep, run=1
        assert_eq!(ksm.apply(&t).expect("apply"), 4);
        let read = |n: &str| std::fs::read_to_string(d.path().join(n)).expect("read");
        assert_eq!(
            (read(RUN), read(PAGES_TO_SCAN), read(SLEEP_MILLISECS)),
            ("1\n".into(), "5000\n".into(), "1\n".into())
        );
    }

    #[test]
    fn one_scan_knob_alone_is_written_without_pausing_ksmd() {
        let (d, ksm) = scratch("1\n", "100\n", "20\n", None);
        let t = Target { run: Some(1), pages_to_scan: Some(5000), sleep_millisecs: Some(20), ..Target::default() };
        assert_eq!(ksm.apply(&t).expect("apply"), 1, "pages_to_scan only: no run=0, no run=1");
        let read = |n: &str| std::fs::read_to_string(d.path().join(n)).expect("read");
        assert_eq!((read(RUN), read(PAGES_TO_SCAN)), ("1\n".into(), "5000\n".into()));
        let t = Target { sleep_millisecs: Some(1), ..t };
        assert_eq!(ksm.apply(&t).expect("apply"), 1, "sleep_millisecs only");
    }

    #[test]
    fn apply_turns_the_advisor_off_first_and_restores_it_last() {
        let (d, ksm) = scratch("0\n", "100\n", "20\n", Some("none [scan-time]\n"));
        let initial = ksm.read().expect("read");
        assert_eq!(initial.advisor_mode.as_deref(), Some("scan-time"));
        let t = Target {
            run: Some(1),
            pages_to_scan: Some(7),
            sleep_millisecs: Some(1),
            advisor_mode: Some("none".into()),
            smart_scan: None,
        };
        // advisor, pages, sleep, run. (The order itself is proven on the real kernel, which
        // refuses pages_to_scan while the advisor scans by time: see tests/real_ksm.rs.)
        assert_eq!(ksm.apply(&t).expect("apply"), 4);
        let read = |n: &str| std::fs::read_to_string(d.path().join(n)).expect("read");
        assert_eq!(read(ADVISOR_MODE), "none\n");
        assert_eq!(ksm.apply(&Target::from(&initial)).expect("restore"), 4, "run=0, pages, sleep, advisor");
        assert_eq!(ksm.read().expect("read"), initial);
    }

    #[test]
    fn a_missing_knob_is_not_created() {
        let (d, ksm) = scratch("0\n", "100\n", "20\n", None);
        std::fs::remove_file(d.path().join(SLEEP_MILLISECS)).expect("rm");
        let err = ksm.write(SLEEP_MILLISECS, 5).unwrap_err();
        assert_eq!(err.errno(), Some(2));
        assert!(!d.path().join(SLEEP_MILLISECS).exists());
    }

    #[test]
    fn validate_refuses_values_the_kernel_never_reports() {
        let ok = Knobs {
            run: 1,
            pages_to_scan: 100,
            sleep_millisecs: 20,
            advisor_mode: Some("scan-time".into()),
            smart_scan: Some(1),
        };
        assert_eq!(ok.validate(), Ok(()));
        assert!(Knobs { run: 3, ..ok.clone() }.validate().is_err());
        assert!(Knobs { pages_to_scan: 1 << 40, ..ok.clone() }.validate().is_err());
        assert!(Knobs { smart_scan: Some(2), ..ok.clone() }.validate().is_err());
        assert!(Knobs { advisor_mode: Some("none\n1".into()), ..ok }.validate().is_err());
    }
}
