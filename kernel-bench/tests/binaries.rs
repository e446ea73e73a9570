//! The two binaries as a user runs them: bad input is refused with a reason, the workload holds
//! mergeable memory until its input closes, and an interrupted benchmark leaves the real KSM as
//! found with nothing of its own still running.
//!
//! Tests that give KSM work or touch its knobs take the project's real-KSM lock (the benchmark
//! takes it itself), so they never overlap another user of the real KSM.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kata_ksm_throttler::sysfs::Ksm;
use kernel_bench::real_ksm::{REAL_KSM, REAL_KSM_LOCK};
use rustix::process::{kill_process, Pid, Signal};

const WORKLOAD: &str = env!("CARGO_BIN_EXE_ksm-workload");
const BENCH: &str = env!("CARGO_BIN_EXE_ksm-modes-bench");

/// Ends a child by PID even if the test fails.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn skip_real_ksm() -> bool {
    if std::env::var_os("KSM_THROTTLER_SKIP_REAL_KSM").is_some() {
        eprintln!("KSM_THROTTLER_SKIP_REAL_KSM set: not touching the real KSM");
        return true;
    }
    assert!(rustix::process::geteuid().is_root(), "needs root (or KSM_THROTTLER_SKIP_REAL_KSM=1)");
    assert!(Path::new(REAL_KSM).join("run").exists(), "no KSM in this kernel (or KSM_THROTTLER_SKIP_REAL_KSM=1)");
    false
}

fn real_ksm_lock() -> File {
    let lock = File::options().create(true).truncate(false).write(true).open(REAL_KSM_LOCK).expect("lock file");
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).expect("flock");
    lock
}

fn refused(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).stdin(Stdio::null()).output().expect("run");
    assert!(!out.status.success(), "{program} {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_input_is_refused_with_a_reason_before_anything_is_touched() {
    let err = refused(WORKLOAD, &["--unique-fraction", "2"]);
    assert!(err.contains("--unique-fraction must be between 0 and 1"), "{err}");
    let err = refused(WORKLOAD, &["--procs", "0"]);
    assert!(err.contains("--procs must be at least 1"), "{err}");
    let err = refused(WORKLOAD, &["--stagger", "soon"]);
    assert!(err.contains("examples"), "{err}");

    let err = refused(BENCH, &["--procs", "1"]);
    assert!(err.contains("--procs must be at least 2"), "{err}");
    let err = refused(BENCH, &["--unique-fraction", "1"]);
    assert!(err.contains("leaves nothing to merge"), "{err}");
    let err = refused(BENCH, &["--modes", "fast"]);
    assert!(err.contains("invalid value 'fast'"), "{err}");
    let err = refused(BENCH, &["--daemon", "/bin/true"]);
    assert!(err.contains("is not a release build"), "{err}");
    let err = refused(BENCH, &["--daemon", "/nonexistent/kata-ksm-throttler"]);
    assert!(err.contains("no daemon at /nonexistent/kata-ksm-throttler"), "{err}");
}

fn ksm_stat(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/ksm_stat")).unwrap_or_default()
}

fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with(['Z', 'X'])),
        Err(_) => true,
    }
}

#[test]
fn workload_staggers_its_processes_holds_mergeable_memory_and_ends_with_its_input() {
    if skip_real_ksm() {
        return;
    }
    let _lock = real_ksm_lock();
    let start = Instant::now();
    let mut child = Command::new(WORKLOAD)
        .args(["--procs", "2", "--size-mib", "2", "--unique-fraction", "0.5", "--stagger", "300ms"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn ksm-workload");
    let input = child.stdin.take();
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut child = Reap(child);

    let mut ready = vec![];
    for _ in 0..2 {
        let line = lines.next().expect("a ready line").expect("read");
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(words.len(), 3, "{line}");
        assert_eq!(words[0], "ready", "{line}");
        let index: u32 = words[1].parse().expect("index");
        let pid: u32 = words[2].parse().expect("pid");
        ready.push((index, pid, start.elapsed()));
    }
    assert_eq!(ready.iter().map(|r| r.0).collect::<Vec<_>>(), [0, 1]);
    assert!(ready[1].2 >= Duration::from_millis(300), "the second starts a stagger later: {:?}", ready[1].2);
    for &(_, pid, _) in &ready {
        let stat = ksm_stat(pid);
        assert!(stat.contains("ksm_mergeable: yes"), "pid {pid} madvised MERGEABLE: {stat}");
        assert!(!gone(pid));
    }

    drop(input);
    let limit = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("try_wait") {
            break status;
        }
        assert!(Instant::now() < limit, "ksm-workload did not end after its input closed");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "{status}");
    for &(_, pid, _) in &ready {
        assert!(gone(pid), "worker {pid} ended with its parent");
    }
}

#[test]
fn a_dead_parent_takes_its_workers_with_it() {
    if skip_real_ksm() {
        return;
    }
    let _lock = real_ksm_lock();
    let mut child = Command::new(WORKLOAD)
        .args(["--procs", "1", "--size-mib", "1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn ksm-workload");
    let _input = child.stdin.take(); // kept open: only the parent's death ends the worker
    let line = BufReader::new(child.stdout.take().expect("stdout")).lines().next().expect("line").expect("read");
    let pid: u32 = line.split_whitespace().nth(2).and_then(|p| p.parse().ok()).expect("pid");
    let mut child = Reap(child);
    child.0.kill().expect("SIGKILL the parent");
    child.0.wait().expect("reap");
    let limit = Instant::now() + Duration::from_secs(10);
    while !gone(pid) {
        assert!(Instant::now() < limit, "worker {pid} outlived its parent");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Processes still running this worktree's ksm-workload binary with `tag` in their environment
/// (inherited from the benchmark): the other tests here run the same binary at the same time.
fn workload_processes(tag: &str) -> Vec<u32> {
    let me = std::fs::canonicalize(WORKLOAD).expect("canonical path");
    let marker = format!("{TAG_VAR}={tag}");
    let mut pids = vec![];
    for entry in std::fs::read_dir("/proc").expect("ls /proc").flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let ours = std::fs::read(entry.path().join("environ"))
            .is_ok_and(|env| env.split(|&b| b == 0).any(|var| var == marker.as_bytes()));
        if ours && std::fs::read_link(entry.path().join("exe")).is_ok_and(|exe| exe == me) && !gone(pid) {
            pids.push(pid);
        }
    }
    pids
}

/// Marks the processes one test starts, so it counts only its own.
const TAG_VAR: &str = "KSM_BENCH_TEST_TAG";

#[test]
fn an_interrupted_benchmark_restores_the_real_ksm_and_leaves_nothing_running() {
    if skip_real_ksm() {
        return;
    }
    // The benchmark takes the lock itself; this test waits for it to be free first, so what it
    // records as "found" is not someone else's run.
    let found = {
        let _lock = real_ksm_lock();
        Ksm::open(REAL_KSM).expect("open").read().expect("read")
    };
    let out = tempfile::tempdir().expect("tempdir");
    let tag = format!("interrupted-{}", std::process::id());
    let mut child = Command::new(BENCH)
        .env(TAG_VAR, &tag)
        .args(["--smoke", "--modes", "flat-out", "--workloads", "staggered", "--window", "60s", "--out"])
        .arg(out.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ksm-modes-bench");
    let mut stderr = child.stderr.take().expect("stderr");
    let mut child = Reap(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        let _ = tx.send(text);
    });

    // Interrupt once it is mid-run: flat out written and the first worker up.
    let ksm = Ksm::open(REAL_KSM).expect("open");
    let limit = Instant::now() + Duration::from_secs(120);
    let mid_run = || ksm.read().expect("read").sleep_millisecs == 0 && !workload_processes(&tag).is_empty();
    while !mid_run() {
        assert!(Instant::now() < limit, "the benchmark never started flat out");
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = Pid::from_raw(child.0.id() as i32).expect("pid");
    kill_process(pid, Signal::INT).expect("SIGINT");
    let status = child.0.wait().expect("wait");
    let text = rx.recv_timeout(Duration::from_secs(10)).expect("stderr");

    assert!(!status.success(), "an interrupted run is not a success");
    assert!(text.contains("interrupted by SIGINT"), "{text}");
    assert!(text.contains("real KSM restored exactly as found"), "{text}");
    let now = ksm.read().expect("read");
    assert_eq!(now, found, "the real KSM is as found");
    assert_eq!(now.smart_scan, found.smart_scan, "smart_scan (which a smoke run turns off) is as found");
    assert_eq!(ksm.read_counter("pages_sharing").expect("read"), Some(0), "nothing left merged");
    assert_eq!(workload_processes(&tag), Vec::<u32>::new(), "no workload process left");
}
