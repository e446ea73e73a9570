//! The KSM knobs in sysfs (`/sys/kernel/mm/ksm` or a scratch directory in tests): read them, and
//! carry out a plan of writes (`core::plan` decides the order).

use std::fmt;
use std::fs::OpenOptions;
use std::io::{self, Write as _};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::core::knobs::{Knobs, Target, ADVISOR_MODE, ADVISOR_NONE, PAGES_TO_SCAN, RUN, SLEEP_MILLISECS, SMART_SCAN};
use crate::core::plan::{plan, Plan, Write};
use crate::io::small_file;

/// What went wrong with which file: callers turn it into a D-Bus error or a log line.
#[derive(Debug, thiserror::Error)]
pub enum SysfsError {
    #[error("reading {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("writing {value:?} to {}: {source}", path.display())]
    Write { path: PathBuf, value: String, source: io::Error },
    #[error("{} holds {content:?}, {}", path.display(), why(content))]
    Parse { path: PathBuf, content: String },
}

/// A number too large for the knob is not "not a number".
fn why(content: &str) -> &'static str {
    let t = content.trim();
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        "out of range for this knob"
    } else {
        "not a number"
    }
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
        let run = self.read_knob(RUN)?;
        let run =
            u8::try_from(run).map_err(|_| SysfsError::Parse { path: self.path(RUN), content: run.to_string() })?;
        Ok(Knobs {
            run,
            pages_to_scan: self.read_knob(PAGES_TO_SCAN)?,
            sleep_millisecs: self.read_knob(SLEEP_MILLISECS)?,
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
        match small_file::read(&path) {
            Ok(s) => s.trim().parse().map(Some).map_err(|_| SysfsError::Parse { path, content: s }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(SysfsError::Read { path, source }),
        }
    }

    /// One of the knobs every KSM kernel has (`run`, `pages_to_scan`, `sleep_millisecs`).
    pub fn read_knob(&self, name: &str) -> Result<u64, SysfsError> {
        let path = self.path(name);
        let s = small_file::read(&path).map_err(|source| SysfsError::Read { path: path.clone(), source })?;
        s.trim().parse().map_err(|_| SysfsError::Parse { path, content: s })
    }

    /// The kernel lists the choices with the current one in brackets: `[none] scan-time`.
    fn read_advisor(&self) -> Result<Option<String>, SysfsError> {
        let path = self.path(ADVISOR_MODE);
        match small_file::read(&path) {
            Ok(s) => Ok(Some(parse_advisor(&s).ok_or(SysfsError::Parse { path, content: s })?)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(SysfsError::Read { path, source }),
        }
    }

    /// Reads the knobs and writes `target` over them (see `core::plan`); returns the
    /// knobs in force.
    pub fn apply(&self, target: &Target) -> Result<Knobs, SysfsError> {
        self.execute(&plan(&self.read()?, target))
    }

    /// Carries out `plan`'s writes in order and returns the knobs in force: the plan's own word,
    /// except after an advisor is put back, which chooses `pages_to_scan` itself (read back).
    pub fn execute(&self, plan: &Plan) -> Result<Knobs, SysfsError> {
        for w in &plan.writes {
            self.write(w.knob(), w.value())?;
        }
        match plan.writes.last() {
            Some(Write::AdvisorMode(a)) if a != ADVISOR_NONE => self.read(),
            _ => Ok(plan.after.clone()),
        }
    }

    /// Carries out `writes` in order, going on past a write that fails: for putting recorded
    /// settings back when the knobs in force cannot even be read. Returns the failures.
    pub fn execute_each(&self, writes: &[Write]) -> Vec<SysfsError> {
        writes.iter().filter_map(|w| self.write(w.knob(), w.value()).err()).collect()
    }

    /// Writes one attribute under the root.
    pub fn write(&self, name: &str, value: impl fmt::Display) -> Result<(), SysfsError> {
        let path = self.path(name);
        let value = value.to_string();
        // One write(2) of the whole line, as `echo` does; no O_CREAT, so a missing knob is an
        // error rather than a new file in a scratch directory.
        // O_NONBLOCK: sysfs ignores it; a FIFO in place of a knob fails at once instead of
        // holding the engine until someone reads it.
        let result = OpenOptions::new()
            .write(true)
            .truncate(true)
            .custom_flags(libc::O_NONBLOCK)
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
    fn smart_scan_is_read_where_present_and_never_created() {
        let (d, ksm) = scratch("0\n", "100\n", "20\n", None);
        assert_eq!(ksm.read().expect("read").smart_scan, None, "absent before 6.7");
        let t = Target { smart_scan: Some(0), ..Target::default() };
        assert_eq!(ksm.apply(&t).expect("apply").smart_scan, None, "a knob this kernel lacks is left alone");
        assert!(!d.path().join(SMART_SCAN).exists(), "and never created");

        std::fs::write(d.path().join(SMART_SCAN), "1\n").expect("write");
        let initial = ksm.read().expect("read");
        assert_eq!(initial.smart_scan, Some(1));
        assert_eq!(ksm.apply(&t).expect("apply").smart_scan, Some(0));
        assert_eq!(ksm.read().expect("read").smart_scan, Some(0));
        assert_eq!(ksm.apply(&Target::from(&initial)).expect("restore"), initial);
        assert_eq!(ksm.read().expect("read"), initial);

        std::fs::write(d.path().join(SMART_SCAN), "2\n").expect("write");
        assert!(matches!(ksm.read(), Err(SysfsError::Parse { .. })), "only 0 and 1 are kernel values");
    }

    #[test]
    fn garbage_in_a_knob_is_a_parse_error_naming_the_file() {
        let (_d, ksm) = scratch("0\n", "lots\n", "20\n", None);
        let err = ksm.read().unwrap_err();
        assert!(matches!(err, SysfsError::Parse { .. }));
        assert!(err.to_string().contains("pages_to_scan") && err.to_string().contains("not a number"), "{err}");
        std::fs::write(_d.path().join(PAGES_TO_SCAN), "99999999999999999999999\n").expect("write");
        let err = ksm.read().unwrap_err().to_string();
        assert!(err.contains("out of range"), "{err}");
    }

    #[test]
    fn open_refuses_a_directory_without_knobs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = Ksm::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("run"), "{err}");
    }

    #[test]
    fn a_plan_is_carried_out_in_its_order_and_the_knobs_after_it_are_returned() {
        let (d, ksm) = scratch("1\n", "100\n", "20\n", None);
        let t = Target { run: Some(1), pages_to_scan: Some(5000), sleep_millisecs: Some(1), ..Target::default() };
        let p = plan(&ksm.read().expect("read"), &t);
        assert_eq!(p.writes.first(), Some(&Write::Run(0)), "{:?}", p.writes);
        // A knob written out of turn would be overwritten by the plan's later writes; a failure
        // half-way stops there: with pages_to_scan gone, ksmd stays paused.
        std::fs::remove_file(d.path().join(PAGES_TO_SCAN)).expect("rm");
        assert!(matches!(ksm.execute(&p), Err(SysfsError::Write { .. })));
        let read = |n: &str| std::fs::read_to_string(d.path().join(n)).expect("read");
        assert_eq!((read(RUN), read(SLEEP_MILLISECS)), ("0\n".into(), "20\n".into()), "stopped at the failed write");
        std::fs::write(d.path().join(PAGES_TO_SCAN), "100\n").expect("write");
        let after = ksm.execute(&p).expect("execute");
        assert_eq!(after, ksm.read().expect("read"));
        assert_eq!(
            (read(RUN), read(PAGES_TO_SCAN), read(SLEEP_MILLISECS)),
            ("1\n".into(), "5000\n".into(), "1\n".into())
        );
    }

    #[test]
    fn the_advisor_goes_off_and_comes_back_through_a_plan() {
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
        // (The kernel refusing pages_to_scan while the advisor scans by time is proven on the
        // real one: tests/real_ksm.rs.)
        assert_eq!(ksm.apply(&t).expect("apply"), ksm.read().expect("read"));
        let read = |n: &str| std::fs::read_to_string(d.path().join(n)).expect("read");
        assert_eq!(read(ADVISOR_MODE), "none\n");
        assert_eq!(ksm.apply(&Target::from(&initial)).expect("restore"), initial, "read back after the advisor");
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
