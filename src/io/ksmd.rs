//! ksmd's own CPU time, read from procfs: what merging costs, shown next to what it saves.
//!
//! ksmd is a kernel thread (`comm` "ksmd", parent kthreadd, pid 2, or the `PF_KTHREAD` flag).
//! Its pid is found once by scanning the proc root and kept; it is looked for again only when
//! it vanishes (a module reload, or a fake /proc rewritten by a test). Where it cannot be found
//! (no KSM, a container with its own pid namespace) the reader says so: it never guesses.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use crate::io::small_file;

/// `PF_KTHREAD` in the flags field of `/proc/<pid>/stat` (include/linux/sched.h).
const PF_KTHREAD: u64 = 0x0020_0000;

#[derive(Debug, thiserror::Error)]
pub enum KsmdError {
    #[error("no ksmd kernel thread under {}", root.display())]
    NotFound { root: PathBuf },
    #[error("reading {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{} is not a valid {what} line: {text:?}", path.display())]
    Garbled { path: PathBuf, what: &'static str, text: String },
}

/// Reads ksmd's CPU time under a proc root (`/proc`, or a fake folder in tests).
#[derive(Debug)]
pub struct Ksmd {
    root: PathBuf,
    /// The pid found last; `None` until found (and again once it vanished).
    pid: Mutex<Option<u32>>,
    ticks_per_s: u64,
}

impl Ksmd {
    pub fn new(root: &Path) -> Ksmd {
        Ksmd { root: root.to_owned(), pid: Mutex::new(None), ticks_per_s: clock_ticks_per_s() }
    }

    /// With a given clock-tick rate, for tests of the `stat` fallback.
    pub fn with_ticks(root: &Path, ticks_per_s: u64) -> Ksmd {
        Ksmd { root: root.to_owned(), pid: Mutex::new(None), ticks_per_s: ticks_per_s.max(1) }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// ksmd's CPU time since boot: `schedstat`'s run time (nanoseconds) where the kernel has
    /// it, else `stat`'s utime + stime (clock ticks).
    pub fn cpu_time(&self) -> Result<Duration, KsmdError> {
        let cached = *self.pid.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pid) = cached {
            match self.cpu_time_of(pid) {
                Ok(t) => return Ok(t),
                // Gone, or another process now: look again.
                Err(KsmdError::Read { .. }) | Err(KsmdError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        let pid = self.find()?;
        *self.pid.lock().unwrap_or_else(|e| e.into_inner()) = Some(pid);
        self.cpu_time_of(pid)
    }

    fn cpu_time_of(&self, pid: u32) -> Result<Duration, KsmdError> {
        let dir = self.root.join(pid.to_string());
        // The comm is checked again: a pid that was ksmd's may have been reused.
        let comm = dir.join("comm");
        let name = small_file::read(&comm).map_err(|source| KsmdError::Read { path: comm, source })?;
        if name.trim_end() != "ksmd" {
            return Err(KsmdError::NotFound { root: self.root.clone() });
        }
        let schedstat = dir.join("schedstat");
        match small_file::read(&schedstat) {
            Ok(text) => {
                let ns = parse_schedstat_ns(&text).ok_or_else(|| KsmdError::Garbled {
                    path: schedstat.clone(),
                    what: "schedstat",
                    text: text.trim_end().chars().take(80).collect(),
                })?;
                return Ok(Duration::from_nanos(ns));
            }
            // Kernels without CONFIG_SCHED_INFO: the coarser stat.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(KsmdError::Read { path: schedstat, source }),
        }
        let stat = dir.join("stat");
        let text = small_file::read(&stat).map_err(|source| KsmdError::Read { path: stat.clone(), source })?;
        let fields = parse_stat(&text).ok_or_else(|| KsmdError::Garbled {
            path: stat.clone(),
            what: "stat",
            text: text.trim_end().chars().take(80).collect(),
        })?;
        let ticks = fields.utime.saturating_add(fields.stime);
        Ok(Duration::from_nanos(ticks.saturating_mul(1_000_000_000) / self.ticks_per_s))
    }

    /// Scans the proc root for the kernel thread named ksmd.
    fn find(&self) -> Result<u32, KsmdError> {
        let entries =
            std::fs::read_dir(&self.root).map_err(|source| KsmdError::Read { path: self.root.clone(), source })?;
        for entry in entries.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            let dir = entry.path();
            // Processes come and go during the scan: one that cannot be read is not ksmd.
            let Ok(comm) = small_file::read(&dir.join("comm")) else { continue };
            if comm.trim_end() != "ksmd" {
                continue;
            }
            let Ok(stat) = small_file::read(&dir.join("stat")) else { continue };
            if parse_stat(&stat).is_some_and(|s| s.ppid == 2 || s.flags & PF_KTHREAD != 0) {
                return Ok(pid);
            }
        }
        Err(KsmdError::NotFound { root: self.root.clone() })
    }
}

/// The fields of `/proc/<pid>/stat` used here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatFields {
    pub ppid: u32,
    pub flags: u64,
    pub utime: u64,
    pub stime: u64,
}

/// Parses `/proc/<pid>/stat`: the name in parentheses may hold spaces and parentheses, so the
/// fields are counted from the last `)`.
pub fn parse_stat(text: &str) -> Option<StatFields> {
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(0) ppid(1) pgrp session tty_nr tpgid flags(6) minflt cminflt majflt
    // cmajflt utime(11) stime(12).
    Some(StatFields {
        ppid: f.get(1)?.parse().ok()?,
        flags: f.get(6)?.parse().ok()?,
        utime: f.get(11)?.parse().ok()?,
        stime: f.get(12)?.parse().ok()?,
    })
}

/// The first field of `/proc/<pid>/schedstat`: time spent on a CPU, in nanoseconds.
pub fn parse_schedstat_ns(text: &str) -> Option<u64> {
    let mut f = text.split_whitespace();
    let ns = f.next()?.parse().ok()?;
    // The other two fields (wait time, time slices) must be there: a truncated line is garbled.
    f.next()?.parse::<u64>().ok()?;
    Some(ns)
}

fn clock_ticks_per_s() -> u64 {
    // SAFETY: sysconf has no preconditions; it returns -1 for an unknown name.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as u64
    } else {
        100
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thread(root: &Path, pid: u32, comm: &str, ppid: u32, flags: u64, utime: u64, stime: u64) {
        let dir = root.join(pid.to_string());
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("comm"), format!("{comm}\n")).expect("comm");
        std::fs::write(
            dir.join("stat"),
            format!("{pid} ({comm}) S {ppid} 0 0 0 -1 {flags} 0 0 0 0 {utime} {stime} 0 0 25 5 1 0 26\n"),
        )
        .expect("stat");
    }

    #[test]
    fn parses_stat_with_odd_names() {
        let s = parse_stat("36 (ksmd) S 2 0 0 0 -1 2097216 0 0 0 0 12 34 0 0 25 5\n").expect("parses");
        assert_eq!(s, StatFields { ppid: 2, flags: 2_097_216, utime: 12, stime: 34 });
        let odd = parse_stat("7 (a) b (c) R 1 0 0 0 -1 0 0 0 0 0 5 6 0\n").expect("parses");
        assert_eq!((odd.ppid, odd.utime, odd.stime), (1, 5, 6));
        assert_eq!(parse_stat("36 (ksmd) S 2 0"), None);
        assert_eq!(parse_stat("no parentheses"), None);
        assert_eq!(parse_schedstat_ns("3143 215476 2\n"), Some(3143));
        assert_eq!(parse_schedstat_ns("3143\n"), None);
        assert_eq!(parse_schedstat_ns("x 1 2\n"), None);
    }

    #[test]
    fn finds_the_kernel_thread_not_a_user_process_of_that_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A user process named ksmd (parent 1, no kthread flag) is not the thread.
        thread(dir.path(), 500, "ksmd", 1, 0, 999, 999);
        thread(dir.path(), 36, "ksmd", 2, 0, 150, 50);
        thread(dir.path(), 37, "kswapd0", 2, PF_KTHREAD, 1, 1);
        let ksmd = Ksmd::with_ticks(dir.path(), 100);
        assert_eq!(ksmd.cpu_time().expect("found"), Duration::from_secs(2), "(150 + 50) ticks at 100/s");
        // schedstat, where there is one, wins: nanoseconds.
        std::fs::write(dir.path().join("36/schedstat"), "2500000000 10 3\n").expect("write");
        assert_eq!(ksmd.cpu_time().expect("found"), Duration::from_millis(2500));
        std::fs::write(dir.path().join("36/schedstat"), "garbage\n").expect("write");
        assert!(matches!(ksmd.cpu_time(), Err(KsmdError::Garbled { what: "schedstat", .. })));
    }

    #[test]
    fn the_kthread_flag_is_enough_and_a_vanished_thread_is_found_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        thread(dir.path(), 40, "ksmd", 0, PF_KTHREAD, 100, 0);
        let ksmd = Ksmd::with_ticks(dir.path(), 100);
        assert_eq!(ksmd.cpu_time().expect("found"), Duration::from_secs(1));
        std::fs::remove_dir_all(dir.path().join("40")).expect("rm");
        thread(dir.path(), 41, "ksmd", 2, 0, 300, 0);
        assert_eq!(ksmd.cpu_time().expect("found again"), Duration::from_secs(3));
        // The old pid reused by another process is not read as ksmd.
        std::fs::remove_dir_all(dir.path().join("41")).expect("rm");
        thread(dir.path(), 41, "bash", 1, 0, 7, 7);
        assert!(matches!(ksmd.cpu_time(), Err(KsmdError::NotFound { .. })), "never a guess");
    }

    #[test]
    fn no_ksmd_and_no_proc_root_say_so() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = Ksmd::new(dir.path()).cpu_time().unwrap_err();
        assert!(matches!(err, KsmdError::NotFound { .. }), "{err}");
        assert!(err.to_string().contains("no ksmd"), "{err}");
        let err = Ksmd::new(&dir.path().join("absent")).cpu_time().unwrap_err();
        assert!(matches!(err, KsmdError::Read { .. }), "{err}");
    }

    #[test]
    fn reads_the_real_ksmd_where_the_kernel_has_one() {
        if !Path::new("/sys/kernel/mm/ksm").exists() {
            return;
        }
        let ksmd = Ksmd::new(Path::new("/proc"));
        let a = ksmd.cpu_time().expect("a KSM kernel has ksmd");
        let b = ksmd.cpu_time().expect("cached");
        assert!(b >= a, "a counter: {a:?} then {b:?}");
    }
}
