//! One look at the real KSM: its counters, its knobs, ksmd's CPU time, and how much of each
//! workload process is merged.

use std::path::{Path, PathBuf};

use kata_ksm_throttler::io::meminfo;
use kata_ksm_throttler::io::sysfs::{Ksm, SysfsError};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Seconds since the run's start (the first kick, or the knobs being written).
    pub t: f64,
    pub pages_sharing: u64,
    pub pages_shared: u64,
    pub full_scans: u64,
    pub pages_unshared: u64,
    pub pages_volatile: u64,
    /// ksmd's CPU time since the run's start, in nanoseconds.
    pub ksmd_cpu_ns: u64,
    /// The throttler's CurrentSetting, or the fixed profile of a run with no daemon.
    pub setting: String,
    pub run: u8,
    pub pages_to_scan: u64,
    pub sleep_millisecs: u64,
    pub anon_pages: u64,
    /// `ksm_merging_pages` of each workload process by index (0 before it started).
    pub merging: Vec<u64>,
    /// The kernel's running count of pages ksmd has visited (`pages_scanned`, Linux 6.10+;
    /// `None` on older kernels and in older results).
    #[serde(default)]
    pub pages_scanned: Option<u64>,
    /// Empty pages merged with the kernel's zero page (`ksm_zero_pages`, with `use_zero_pages`):
    /// merged, but not counted in pages_sharing.
    #[serde(default)]
    pub ksm_zero_pages: Option<u64>,
    /// Pages `smart_scan` let ksmd pass by (`pages_skipped`, Linux 6.7+), a running count.
    #[serde(default)]
    pub pages_skipped: Option<u64>,
}

impl Sample {
    /// A sample from `r`, read `t` seconds into the run: ksmd's CPU time counted from `cpu0`
    /// (its reading at the start), with the setting and the processes' merged pages the caller
    /// knows.
    pub fn at(r: &Reading, t: f64, cpu0: u64, setting: String, merging: Vec<u64>) -> Sample {
        Sample {
            t,
            pages_sharing: r.pages_sharing,
            pages_shared: r.pages_shared,
            full_scans: r.full_scans,
            pages_unshared: r.pages_unshared,
            pages_volatile: r.pages_volatile,
            ksmd_cpu_ns: r.ksmd_cpu_ns.saturating_sub(cpu0),
            setting,
            run: r.run,
            pages_to_scan: r.pages_to_scan,
            sleep_millisecs: r.sleep_millisecs,
            anon_pages: r.anon_pages,
            merging,
            pages_scanned: r.pages_scanned,
            ksm_zero_pages: r.ksm_zero_pages,
            pages_skipped: r.pages_skipped,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    #[error(transparent)]
    Sysfs(#[from] SysfsError),
    #[error("reading {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{} holds {content:?}, not what was expected", path.display())]
    Parse { path: PathBuf, content: String },
    #[error("no ksmd thread in /proc (is KSM built in?)")]
    NoKsmd,
    #[error(transparent)]
    Meminfo(#[from] kata_ksm_throttler::io::meminfo::MeminfoError),
}

/// Reads everything but the setting (which the caller knows or asks the daemon for).
#[derive(Debug, Clone)]
pub struct Sampler {
    ksm: Ksm,
    ksmd: PathBuf,
    page_size: u64,
}

/// Counters and knobs read at one instant (the rest of a [`Sample`] comes from the caller).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reading {
    pub pages_sharing: u64,
    pub pages_shared: u64,
    pub full_scans: u64,
    pub pages_unshared: u64,
    pub pages_volatile: u64,
    pub ksmd_cpu_ns: u64,
    pub run: u8,
    pub pages_to_scan: u64,
    pub sleep_millisecs: u64,
    pub anon_pages: u64,
    /// The counters some kernels lack: `None` there.
    pub pages_scanned: Option<u64>,
    pub ksm_zero_pages: Option<u64>,
    pub pages_skipped: Option<u64>,
}

impl Sampler {
    pub fn new(ksm: Ksm) -> Result<Sampler, SampleError> {
        let pid = ksmd_pid()?.ok_or(SampleError::NoKsmd)?;
        Ok(Sampler {
            ksm,
            ksmd: Path::new("/proc").join(pid.to_string()).join("schedstat"),
            page_size: meminfo::page_size(),
        })
    }

    pub fn read(&self) -> Result<Reading, SampleError> {
        let optional =
            |name| -> Result<Option<u64>, SampleError> { Ok(self.ksm.read_counter(name)?.map(|n| n.max(0) as u64)) };
        let counter = |name| -> Result<u64, SampleError> { Ok(optional(name)?.unwrap_or(0)) };
        let knobs = self.ksm.read()?;
        Ok(Reading {
            pages_sharing: counter("pages_sharing")?,
            pages_shared: counter("pages_shared")?,
            full_scans: counter("full_scans")?,
            pages_unshared: counter("pages_unshared")?,
            pages_volatile: counter("pages_volatile")?,
            ksmd_cpu_ns: schedstat_cpu_ns(&self.ksmd)?,
            run: knobs.run,
            pages_to_scan: knobs.pages_to_scan,
            sleep_millisecs: knobs.sleep_millisecs,
            anon_pages: meminfo::anon_pages(Path::new("/proc/meminfo"), self.page_size)?,
            pages_scanned: optional("pages_scanned")?,
            ksm_zero_pages: optional("ksm_zero_pages")?,
            pages_skipped: optional("pages_skipped")?,
        })
    }
}

/// The PID of the `ksmd` kernel thread (a child of kthreadd, PID 2).
pub fn ksmd_pid() -> Result<Option<u32>, SampleError> {
    let proc = Path::new("/proc");
    let entries = std::fs::read_dir(proc).map_err(|source| SampleError::Read { path: proc.into(), source })?;
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        if let Some((comm, ppid)) = parse_stat_comm_ppid(&stat) {
            if comm == "ksmd" && ppid == 2 {
                return Ok(Some(pid));
            }
        }
    }
    Ok(None)
}

/// The fields of `/proc/<pid>/stat` after the command name (which may hold spaces and
/// parentheses: it ends at the last `)`), from field 3 (`state`) on.
fn stat_fields_after_comm(stat: &str) -> Option<std::str::SplitWhitespace<'_>> {
    Some(stat.get(stat.rfind(')')? + 1..)?.split_whitespace())
}

/// `comm` and `ppid` from `/proc/<pid>/stat` (`pid (comm) state ppid ...`).
fn parse_stat_comm_ppid(stat: &str) -> Option<(&str, u32)> {
    let comm = stat.get(stat.find('(')? + 1..stat.rfind(')')?)?;
    let mut rest = stat_fields_after_comm(stat)?;
    let _state = rest.next()?;
    Some((comm, rest.next()?.parse().ok()?))
}

/// Field 1 of `/proc/<pid>/schedstat`: time spent on a CPU, in nanoseconds.
pub fn schedstat_cpu_ns(path: &Path) -> Result<u64, SampleError> {
    let text = std::fs::read_to_string(path).map_err(|source| SampleError::Read { path: path.into(), source })?;
    text.split_whitespace()
        .next()
        .and_then(|f| f.parse().ok())
        .ok_or_else(|| SampleError::Parse { path: path.into(), content: text.clone() })
}

/// `utime` + `stime` (fields 14 and 15 of `/proc/<pid>/stat`, every thread of the process),
/// in clock ticks.
fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    // Field 3 (state) first, so field n is at n - 3.
    let mut rest = stat_fields_after_comm(stat)?.skip(14 - 3);
    let utime: u64 = rest.next()?.parse().ok()?;
    let stime: u64 = rest.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The CPU-seconds a process has used so far, user and system, all its threads (`None` once
/// it is gone).
pub fn process_cpu_s(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let ticks = parse_stat_cpu_ticks(&stat)?;
    Some(ticks as f64 / rustix::param::clock_ticks_per_second() as f64)
}

/// `ksm_merging_pages` of a process: how many of its pages KSM has merged. `None` once the
/// process is gone.
pub fn merging_pages(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/ksm_merging_pages")).ok()?.trim().parse().ok()
}

/// The 1-minute load average, as `uptime` shows it.
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg").ok()?.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_odd_command_names() {
        assert_eq!(parse_stat_comm_ppid("36 (ksmd) S 2 0 0 0 -1"), Some(("ksmd", 2)));
        assert_eq!(parse_stat_comm_ppid("99 (a) b (c)) R 1 0"), Some(("a) b (c)", 1)));
        assert_eq!(parse_stat_comm_ppid("garbage"), None);
    }

    #[test]
    fn samples_recorded_before_the_visit_counters_still_load() {
        let old = r#"{"t":1.5,"pages_sharing":7,"pages_shared":1,"full_scans":2,"pages_unshared":0,
            "pages_volatile":0,"ksmd_cpu_ns":9,"setting":"aggressive","run":1,"pages_to_scan":100,
            "sleep_millisecs":20,"anon_pages":100,"merging":[3,4]}"#;
        let s: Sample = serde_json::from_str(old).expect("an older sample");
        assert_eq!((s.pages_sharing, s.pages_scanned, s.ksm_zero_pages, s.pages_skipped), (7, None, None, None));
    }

    #[test]
    fn process_cpu_is_user_plus_system_ticks() {
        // A real line's shape (a QEMU guest's), utime 1500 and stime 250 in fields 14 and 15.
        let stat = "4242 (qemu-system-x86) S 1 4242 4242 0 -1 4194560 9000 0 3 0 1500 250 0 0 20 0 5 0 \
                    8000 600000000 40000 18446744073709551615";
        assert_eq!(parse_stat_cpu_ticks(stat), Some(1750));
        assert_eq!(parse_stat_cpu_ticks("7 (a b) c) R 1 0 0 0 -1 0 0 0 0 0 30 12 0 0"), Some(42));
        assert_eq!(parse_stat_cpu_ticks("7 (short) R 1 0"), None);
        // This process's own, after some work: as the kernel's process CPU clock has it (to
        // the tick, 10 ms at most at 100 Hz, and what the other test threads add meanwhile).
        let clock = || {
            let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
            t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
        };
        let spin = std::time::Instant::now();
        let mut x = 0u64;
        while clock() < 0.3 && spin.elapsed() < std::time::Duration::from_secs(20) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(1));
        }
        let before = clock();
        let read = process_cpu_s(std::process::id()).expect("this process's stat");
        let after = clock();
        assert!(before >= 0.3, "spun to {before} CPU-s");
        assert!(read > before - 0.05 && read < after + 0.05, "stat {read} CPU-s, clock {before}..{after}");
    }

    #[test]
    fn ksmd_cpu_time_is_read_and_bad_files_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let good = dir.path().join("good");
        std::fs::write(&good, "1234567 89 10\n").expect("write");
        assert_eq!(schedstat_cpu_ns(&good).expect("parse"), 1_234_567);
        let bad = dir.path().join("bad");
        std::fs::write(&bad, "x y z\n").expect("write");
        let err = schedstat_cpu_ns(&bad).unwrap_err().to_string();
        assert!(err.contains("bad") && err.contains("x y z"), "{err}");
    }

    #[test]
    fn this_kernel_has_a_ksmd_with_cpu_time() {
        // Runs wherever the project's tests run: a KSM kernel (the real-KSM test needs one too).
        if !Path::new("/sys/kernel/mm/ksm/run").exists() {
            let skip = kata_ksm_throttler_test_support::switch::SKIP_REAL_KSM;
            assert!(std::env::var_os(skip).is_some(), "no KSM in this kernel (or {skip}=1)");
            return;
        }
        let pid = ksmd_pid().expect("scan /proc").expect("a ksmd thread");
        let path = Path::new("/proc").join(pid.to_string()).join("schedstat");
        schedstat_cpu_ns(&path).expect("ksmd schedstat");
    }
}
