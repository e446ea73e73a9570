//! A scratch directory laid out like `/sys/kernel/mm/ksm`, with a meminfo file and a state
//! folder beside it: the one definition the tests and the benchmarks drive the daemon on.

use std::io;
use std::path::{Path, PathBuf};

use tempfile::TempDir;

/// The knobs the daemon may write, as a kernel with every one of them (6.7+) has them by
/// default: ksmd stopped, the advisor off.
pub const KNOBS: [(&str, &str); 5] = [
    ("run", "0\n"),
    ("pages_to_scan", "100\n"),
    ("sleep_millisecs", "20\n"),
    ("advisor_mode", "[none] scan-time\n"),
    ("smart_scan", "1\n"),
];

/// The counters the daemon reads (its statistics, and adaptive mode's progress). A fresh
/// scratch has none of them, as an old kernel lacks some: they read as 0; write them with
/// [`Scratch::set`], or start from [`Scratch::with_counters`].
pub const COUNTERS: [&str; 7] = [
    "pages_shared",
    "pages_sharing",
    "pages_unshared",
    "pages_volatile",
    "full_scans",
    "general_profit",
    "ksm_zero_pages",
];

/// 4 GiB of anonymous memory: aggressive scans 104857 pages, standard 10485, slow 2097.
pub const ANON_KB: u64 = 4 * 1024 * 1024;

/// The scratch meminfo: [`ANON_KB`] of AnonPages.
pub fn meminfo_text() -> String {
    format!("MemTotal: 24000000 kB\nAnonPages: {ANON_KB} kB\n")
}

/// The knobs the daemon writes for a setting on the scratch meminfo: run, pages_to_scan
/// (AnonPages over `divisor`), sleep_millisecs.
pub fn expected(divisor: u64, sleep: u64) -> (u64, u64, u64) {
    (1, ANON_KB * 1024 / rustix::param::page_size() as u64 / divisor, sleep)
}

/// The scratch sysfs `ksm/`, its `meminfo` and `state/`, in a folder removed when dropped.
#[derive(Debug)]
pub struct Scratch {
    pub dir: TempDir,
}

impl Scratch {
    /// On tmpfs where there is one, like sysfs: on a disk file system each write's `O_TRUNC`
    /// waits for the block layer (ext4 discards freed blocks), which would count as the daemon's
    /// time and wake-ups.
    pub fn new() -> io::Result<Scratch> {
        let dir = tempfile::Builder::new().prefix("ksm-scratch-").tempdir_in(tmpfs_parent())?;
        let ksm = dir.path().join("ksm");
        std::fs::create_dir(&ksm)?;
        for (name, value) in KNOBS {
            std::fs::write(ksm.join(name), value)?;
        }
        std::fs::write(dir.path().join("meminfo"), meminfo_text())?;
        Ok(Scratch { dir })
    }

    /// [`Scratch::new`] for tests: panics with the reason if it cannot be made.
    pub fn fresh() -> Scratch {
        Scratch::new().unwrap_or_else(|e| panic!("making a scratch sysfs: {e}"))
    }

    /// [`Scratch::fresh`] with every one of [`COUNTERS`] at 0.
    pub fn with_counters() -> Scratch {
        let scratch = Scratch::fresh();
        for name in COUNTERS {
            scratch.set(name, "0\n");
        }
        scratch
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn ksm(&self) -> PathBuf {
        self.dir.path().join("ksm")
    }

    pub fn meminfo(&self) -> PathBuf {
        self.dir.path().join("meminfo")
    }

    /// A fake proc root (absent until a test writes into it: no ksmd, no PSI).
    pub fn proc_root(&self) -> PathBuf {
        self.dir.path().join("proc")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The daemon's flags for this scratch: its sysfs root, meminfo, state folder, and a
    /// configuration file that does not exist (hermetic: no host configuration is read).
    pub fn args(&self) -> Vec<String> {
        let mut args = self.path_args();
        args.extend(["--config".to_owned(), self.dir.path().join("no-config.toml").display().to_string()]);
        args
    }

    /// [`Scratch::args`] without `--config`, for a caller that gives its own.
    pub fn path_args(&self) -> Vec<String> {
        let p = |s: &str| self.dir.path().join(s).display().to_string();
        vec!["--sysfs-root".into(), p("ksm"), "--meminfo".into(), p("meminfo"), "--state-dir".into(), p("state")]
    }

    /// Writes one file of the scratch sysfs.
    pub fn set(&self, name: &str, value: impl AsRef<[u8]>) {
        let path = self.ksm().join(name);
        std::fs::write(&path, value).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }

    /// Writes the scratch meminfo's AnonPages.
    pub fn set_anon_kb(&self, kb: u64) {
        let path = self.meminfo();
        std::fs::write(&path, format!("AnonPages: {kb} kB\n"))
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }

    /// Writes the whole scratch meminfo.
    pub fn set_meminfo(&self, text: &str) {
        let path = self.meminfo();
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }

    /// Puts a `ksmd` kernel thread (parent kthreadd) in the fake proc root with `cpu` of CPU
    /// time in its `schedstat`.
    pub fn set_ksmd(&self, pid: u32, cpu: std::time::Duration) {
        let dir = self.proc_root().join(pid.to_string());
        let write = |name: &str, text: String| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        };
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("making {}: {e}", dir.display()));
        write("comm", "ksmd\n".into());
        write("stat", format!("{pid} (ksmd) S 2 0 0 0 -1 2097216 0 0 0 0 0 0 0 0 25 5 1 0 26\n"));
        write("schedstat", format!("{} 1000 10\n", cpu.as_nanos()));
    }

    /// Writes the fake proc root's `pressure/memory` (raw text, so a test can garble it).
    pub fn set_pressure_text(&self, text: &str) {
        let dir = self.proc_root().join("pressure");
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("making {}: {e}", dir.display()));
        std::fs::write(dir.join("memory"), text).unwrap_or_else(|e| panic!("writing the PSI file: {e}"));
    }

    /// [`Scratch::set_pressure_text`] with these avg10 percentages.
    pub fn set_pressure(&self, some: f64, full: f64) {
        self.set_pressure_text(&format!(
            "some avg10={some:.2} avg60=0.00 avg300=0.00 total=0\nfull avg10={full:.2} avg60=0.00 avg300=0.00 total=0\n"
        ));
    }

    pub fn try_knob(&self, name: &str) -> io::Result<String> {
        std::fs::read_to_string(self.ksm().join(name))
    }

    /// One file of the scratch sysfs, as text; panics if it cannot be read.
    pub fn knob(&self, name: &str) -> String {
        self.try_knob(name).unwrap_or_else(|e| panic!("reading the scratch knob {name}: {e}"))
    }

    /// run, pages_to_scan, sleep_millisecs as numbers.
    pub fn knobs(&self) -> (u64, u64, u64) {
        let n = |k: &str| {
            let text = self.knob(k);
            text.trim().parse::<u64>().unwrap_or_else(|e| panic!("the scratch knob {k} reads {text:?}: {e}"))
        };
        (n("run"), n("pages_to_scan"), n("sleep_millisecs"))
    }

    /// Every file of the scratch sysfs, byte for byte, by name.
    pub fn snapshot(&self) -> Vec<(String, Vec<u8>)> {
        let ksm = self.ksm();
        let entries = std::fs::read_dir(&ksm).unwrap_or_else(|e| panic!("listing {}: {e}", ksm.display()));
        let mut files: Vec<_> = entries
            .map(|e| {
                let e = e.unwrap_or_else(|e| panic!("listing {}: {e}", ksm.display()));
                let bytes =
                    std::fs::read(e.path()).unwrap_or_else(|err| panic!("reading {}: {err}", e.path().display()));
                (e.file_name().to_string_lossy().into_owned(), bytes)
            })
            .collect();
        files.sort();
        files
    }
}

/// Where scratch folders go: tmpfs (`/dev/shm`, `/run`) where there is one, else the temp dir.
pub fn tmpfs_parent() -> PathBuf {
    ["/dev/shm", "/run"].iter().map(PathBuf::from).find(|p| p.is_dir()).unwrap_or_else(std::env::temp_dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_scratch_has_every_knob_as_a_kernel_has_it_and_no_counters() {
        let s = Scratch::fresh();
        let names: Vec<String> = s.snapshot().into_iter().map(|(n, _)| n).collect();
        let mut want: Vec<String> = KNOBS.iter().map(|(n, _)| n.to_string()).collect();
        want.sort();
        assert_eq!(names, want);
        assert_eq!(s.knobs(), (0, 100, 20));
        assert_eq!(s.knob("smart_scan"), "1\n");
        let with = Scratch::with_counters();
        assert_eq!(with.snapshot().len(), KNOBS.len() + COUNTERS.len());
        assert_eq!(with.knob("full_scans"), "0\n");
    }

    #[cfg(feature = "engine")]
    #[test]
    fn the_daemon_reads_the_scratch_meminfo_as_anon_kb() {
        let s = Scratch::fresh();
        let pages = kata_ksm_throttler::io::meminfo::anon_pages(&s.meminfo(), 4096).expect("AnonPages");
        assert_eq!(pages, ANON_KB / 4);
        assert_eq!(expected(1, 1).1 * kata_ksm_throttler::io::meminfo::page_size(), ANON_KB * 1024);
        s.set_anon_kb(8);
        assert_eq!(kata_ksm_throttler::io::meminfo::anon_pages(&s.meminfo(), 4096).expect("AnonPages"), 2);
    }

    #[test]
    fn args_name_the_scratch_paths_and_no_host_configuration() {
        let s = Scratch::fresh();
        let args = s.args();
        assert_eq!(args[1], s.ksm().display().to_string());
        assert!(!Path::new(&args[7]).exists(), "the configuration file is absent: {args:?}");
        assert_eq!(&args[..6], &s.path_args()[..]);
    }
}
