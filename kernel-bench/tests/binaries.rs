//! The two binaries as a user runs them: bad input is refused with a reason, the workload holds
//! mergeable memory until its input closes, and an interrupted benchmark leaves the real KSM as
//! found with nothing of its own still running.
//!
//! Tests that give KSM work or touch its knobs take the project's real-KSM lock (the benchmark
//! takes it itself), so they never overlap another user of the real KSM.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kata_ksm_throttler::io::sysfs::Ksm;
use kata_ksm_throttler_test_support::child::{alive, ensure_gone, Guarded};
use kata_ksm_throttler_test_support::eventually_blocking;
use kata_ksm_throttler_test_support::real_ksm::{self, skip_real_ksm, REAL_KSM};
use kernel_bench::pattern::{fill, Content, Layout};
use rustix::process::Signal;

const WORKLOAD: &str = env!("CARGO_BIN_EXE_ksm-workload");
const BENCH: &str = env!("CARGO_BIN_EXE_ksm-modes-bench");
const VM_BENCH: &str = env!("CARGO_BIN_EXE_ksm-vm-bench");

/// Whether a test that gives KSM work or touches its knobs skips (saying so); if not, it holds
/// the project's real-KSM lock for as long as it keeps the returned file.
fn real_ksm(test: &str) -> Option<File> {
    if skip_real_ksm(test) {
        return None;
    }
    Some(real_ksm::lock().expect("the real-KSM lock"))
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

    let err = refused(VM_BENCH, &["--guests", "1"]);
    assert!(err.contains("--guests must be at least 2"), "{err}");
    let err = refused(VM_BENCH, &["--mem-mib", "128", "--payload-mib", "120"]);
    assert!(err.contains("--mem-mib 128 is too small"), "{err}");
    let err = refused(VM_BENCH, &["--modes", "advisor,fast"]);
    assert!(err.contains("invalid value 'fast'"), "{err}");
    let err = refused(VM_BENCH, &["--trigger", "/nonexistent/kata-vc-throttler"]);
    assert!(err.contains("no trigger at /nonexistent/kata-vc-throttler"), "{err}");
    let err = refused(VM_BENCH, &["--cache-dir", env!("CARGO_MANIFEST_DIR"), "--modes", "kernel-default"]);
    assert!(err.contains("is inside the repository"), "{err}");
}

fn ksm_stat(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/ksm_stat")).unwrap_or_default()
}

fn gone(pid: u32) -> bool {
    !alive(pid)
}

#[test]
fn workload_staggers_its_processes_holds_mergeable_memory_and_ends_with_its_input() {
    let Some(_lock) = real_ksm("workload_staggers_its_processes_holds_mergeable_memory_and_ends_with_its_input") else {
        return;
    };
    let start = Instant::now();
    let mut child = Command::new(WORKLOAD)
        .args(["--procs", "2", "--size-mib", "2", "--unique-fraction", "0.5", "--stagger", "300ms"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn ksm-workload");
    let input = child.stdin.take();
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut child = Guarded::new(child, "ksm-workload");

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
    let status = child.wait_within(Duration::from_secs(10)).expect("ksm-workload ends once its input closes");
    assert!(status.success(), "{status}");
    for &(_, pid, _) in &ready {
        assert!(gone(pid), "worker {pid} ended with its parent");
    }
}

#[test]
fn a_dead_parent_takes_its_workers_with_it() {
    let Some(_lock) = real_ksm("a_dead_parent_takes_its_workers_with_it") else { return };
    let mut child = Command::new(WORKLOAD)
        .args(["--procs", "1", "--size-mib", "1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn ksm-workload");
    let _input = child.stdin.take(); // kept open: only the parent's death ends the worker
    let line = BufReader::new(child.stdout.take().expect("stdout")).lines().next().expect("line").expect("read");
    let pid: u32 = line.split_whitespace().nth(2).and_then(|p| p.parse().ok()).expect("pid");
    let mut child = Guarded::new(child, "ksm-workload");
    child.kill().expect("SIGKILL the parent");
    eventually_blocking(Duration::from_secs(10), format!("worker {pid} to end with its parent"), || gone(pid));
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
    if skip_real_ksm("an_interrupted_benchmark_restores_the_real_ksm_and_leaves_nothing_running") {
        return;
    }
    // The benchmark takes the lock itself; this test waits for it to be free first, so what it
    // records as "found" is not someone else's run.
    let found = {
        let _lock = real_ksm::lock().expect("the real-KSM lock");
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
    let mut child = Guarded::new(child, "ksm-modes-bench");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        let _ = tx.send(text);
    });

    // Interrupt once it is mid-run: flat out written and the first worker up.
    let ksm = Ksm::open(REAL_KSM).expect("open");
    let mid_run = || ksm.read().expect("read").sleep_millisecs == 0 && !workload_processes(&tag).is_empty();
    eventually_blocking(Duration::from_secs(120), "the benchmark to run flat out", mid_run);
    child.signal(Signal::INT).expect("SIGINT");
    let status = child.wait_within(Duration::from_secs(180)).expect("the interrupted benchmark ends");
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

#[test]
fn bad_ramp_and_dirt_are_refused_with_a_one_line_reason() {
    let one_line = |args: &[&str], reason: &str| {
        let err = refused(WORKLOAD, args);
        assert!(err.contains(reason), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: one line: {err}");
    };
    one_line(&["--dirty-fraction", "2"], "--dirty-fraction must be between 0 and 1, not 2");
    one_line(&["--dirty-fraction=-0.5"], "--dirty-fraction must be between 0 and 1, not -0.5");
    one_line(
        &["--unique-fraction", "0.6", "--dirty-fraction", "0.5"],
        "--unique-fraction 0.6 plus --dirty-fraction 0.5 is more than 1",
    );
    one_line(&["--dirty-fraction", "0.1", "--dirty-every", "0s"], "--dirty-every must be more than 0s");
    // Durations are parsed by clap, which adds a hint below: the reason is on its first line.
    for flag in ["--ramp", "--dirty-every"] {
        let err = refused(WORKLOAD, &[flag, "soon"]);
        let first = err.lines().next().unwrap_or_default();
        assert!(first.contains(flag) && first.contains("examples"), "{flag}: {err}");
    }
}

/// A running ksm-workload whose lines arrive on a channel, so a missing line fails the test
/// rather than hanging it. Dropping it ends the parent and then every worker, by PID.
struct Workload {
    child: Guarded,
    input: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    workers: Vec<u32>,
}

impl Workload {
    fn spawn(args: &[&str]) -> Workload {
        let mut child = Command::new(WORKLOAD)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn ksm-workload");
        let input = child.stdin.take();
        let stdout = child.stdout.take();
        let (tx, lines) = mpsc::channel();
        let workload = Workload { child: Guarded::new(child, "ksm-workload"), input, lines, workers: vec![] };
        let stdout = stdout.expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        workload
    }

    /// The next line, which must start with `word`: (index, pid, the words after them).
    fn expect(&mut self, word: &str, limit: Duration) -> (u32, u32, Vec<String>) {
        let line = self.lines.recv_timeout(limit).unwrap_or_else(|e| panic!("no {word:?} line in {limit:?}: {e}"));
        let words: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
        assert!(words.len() >= 3 && words[0] == word, "expected {word:?}, got {line:?}");
        let index: u32 = words[1].parse().expect("index");
        let pid: u32 = words[2].parse().expect("pid");
        if word == "ready" {
            self.workers.push(pid);
        }
        (index, pid, words[3..].to_vec())
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        drop(self.input.take());
        let _ = self.child.kill();
        // Its workers end when their input closes; any still running it after 10 s is killed.
        for &pid in &self.workers {
            ensure_gone(pid, "ksm-workload", Duration::from_secs(10));
        }
    }
}

/// The worker's one MADV_MERGEABLE mapping (`mg` in its smaps VmFlags): its workload memory.
#[derive(Debug)]
struct Region {
    start: u64,
    size_kib: u64,
    rss_kib: u64,
}

fn mergeable_region(pid: u32) -> Region {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("smaps");
    let mut found = vec![];
    let (mut start, mut size_kib, mut rss_kib) = (0, 0, 0);
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("Size:") => size_kib = words.next().and_then(|n| n.parse().ok()).expect("Size"),
            Some("Rss:") => rss_kib = words.next().and_then(|n| n.parse().ok()).expect("Rss"),
            Some("VmFlags:") if words.any(|flag| flag == "mg") => found.push(Region { start, size_kib, rss_kib }),
            Some(range) if range.contains('-') && !range.ends_with(':') => {
                let from = range.split('-').next().unwrap_or_default();
                start = u64::from_str_radix(from, 16).expect("mapping start");
            }
            _ => {}
        }
    }
    assert_eq!(found.len(), 1, "pid {pid}: one mergeable mapping: {found:?}");
    found.remove(0)
}

fn page_size() -> u64 {
    kata_ksm_throttler::io::meminfo::page_size()
}

/// Page `page` of the worker's memory as it is now, read through /proc/<pid>/mem (we are root).
fn read_page(pid: u32, region: &Region, page: u64) -> Vec<u64> {
    use std::os::unix::fs::FileExt;
    let mem = File::open(format!("/proc/{pid}/mem")).expect("open /proc/<pid>/mem");
    let mut bytes = vec![0; page_size() as usize];
    mem.read_exact_at(&mut bytes, region.start + page * page_size()).expect("read the worker's page");
    bytes.chunks_exact(8).map(|w| u64::from_ne_bytes(w.try_into().expect("8 bytes"))).collect()
}

fn expected_page(page: u64, content: Content) -> Vec<u64> {
    let mut words = vec![0; page_size() as usize / 8];
    fill(&mut words, page, content);
    words
}

#[test]
fn a_ramp_says_ready_at_once_mergeable_and_fills_in_order_over_the_ramp() {
    let Some(_lock) = real_ksm("a_ramp_says_ready_at_once_mergeable_and_fills_in_order_over_the_ramp") else { return };
    const MIB: u64 = 16;
    let mut w = Workload::spawn(&["--procs", "2", "--size-mib", "16", "--ramp", "2s"]);
    let layout = Layout::new(MIB, 0.0, page_size()).expect("layout");
    let last = layout.pages - 1;
    let mut ready = vec![];
    for _ in 0..2 {
        let (index, pid, _) = w.expect("ready", Duration::from_secs(30));
        // Right after `ready`: mergeable already, little resident, the last page not yet written.
        let region = mergeable_region(pid);
        assert_eq!(region.size_kib, MIB * 1024, "{region:?}");
        assert!(region.rss_kib < MIB * 1024 / 2, "pid {pid}: most memory resident at ready: {region:?}");
        assert!(read_page(pid, &region, last).iter().all(|&w| w == 0), "pid {pid}: last page written before ready");
        assert!(ksm_stat(pid).contains("ksm_mergeable: yes"), "pid {pid}: {}", ksm_stat(pid));
        ready.push((index, pid, Instant::now()));
    }
    let mut indices: Vec<u32> = ready.iter().map(|r| r.0).collect();
    indices.sort_unstable();
    assert_eq!(indices, [0, 1]);
    for _ in 0..2 {
        let (index, pid, rest) = w.expect("filled", Duration::from_secs(60));
        let &(_, ready_pid, ready_at) = ready.iter().find(|r| r.0 == index).expect("filled a ready worker");
        assert_eq!(pid, ready_pid);
        let reported: f64 = rest.first().and_then(|s| s.parse().ok()).expect("filled <index> <pid> <seconds>");
        assert!(reported >= 2.0, "worker {index} filled in {reported} s, under the 2 s ramp");
        // Seen from here (its `ready` reached us a little after it was said): about the ramp.
        let seen = ready_at.elapsed();
        assert!(seen >= Duration::from_millis(1_800), "worker {index} filled {seen:?} after ready");
        let region = mergeable_region(pid);
        assert!(region.rss_kib >= MIB * 1024 * 9 / 10, "pid {pid}: not all resident once filled: {region:?}");
        assert_eq!(read_page(pid, &region, last), expected_page(last, Content::Shared), "pid {pid}: last page");
        assert_eq!(read_page(pid, &region, 0), expected_page(0, Content::Shared), "pid {pid}: first page");
    }
}

/// The round whose content `page` of worker `owner` holds now (torn reads retried by the caller).
fn dirt_round(words: &[u64], page: u64, owner: u32) -> Option<u64> {
    let mut first = [0];
    (0..100_000).find(|&round| {
        fill(&mut first, page, Content::Dirty { owner, round });
        first[0] == words[0] && words == expected_page(page, Content::Dirty { owner, round })
    })
}

#[test]
fn dirtied_pages_get_new_content_of_their_own_every_round_with_or_without_a_ramp() {
    let Some(_lock) = real_ksm("dirtied_pages_get_new_content_of_their_own_every_round_with_or_without_a_ramp") else {
        return;
    };
    for ramp in ["0s", "500ms"] {
        let mut w = Workload::spawn(&[
            "--procs",
            "2",
            "--size-mib",
            "4",
            "--unique-fraction",
            "0.25",
            "--dirty-fraction",
            "0.25",
            "--dirty-every",
            "300ms",
            "--ramp",
            ramp,
        ]);
        let layout = Layout::with_dirty(4, 0.25, 0.25, page_size()).expect("layout");
        let mut workers = vec![];
        for _ in 0..2 {
            workers.push(w.expect("ready", Duration::from_secs(30)));
        }
        if ramp != "0s" {
            for _ in 0..2 {
                w.expect("filled", Duration::from_secs(60));
            }
        }
        // Pages of each kind, spread over the mapping.
        let of_kind = |pick: &dyn Fn(u64) -> bool| -> Vec<u64> {
            let all: Vec<u64> = (0..layout.pages).filter(|&p| pick(p)).collect();
            vec![all[0], all[all.len() / 2], all[all.len() - 1]]
        };
        let dirty = of_kind(&|p| layout.is_dirty(p));
        let unique = of_kind(&|p| layout.is_unique(p));
        let shared = of_kind(&|p| !layout.is_dirty(p) && !layout.is_unique(p));
        for &(index, pid, _) in &workers {
            let region = mergeable_region(pid);
            let rss_filled = region.rss_kib;
            assert!(rss_filled >= 4 * 1024 * 9 / 10, "{ramp}: pid {pid} filled: {region:?}");
            // Each dirtied page moves on to new rounds of its own content.
            for &page in &dirty {
                let mut seen = vec![];
                // Two rounds after the first fill (round 0), one after the other.
                let what = format!("{ramp}: worker {index} page {page} to move on two rounds");
                eventually_blocking(Duration::from_secs(20), what, || {
                    if let Some(r) = dirt_round(&read_page(pid, &region, page), page, index) {
                        if seen.last() != Some(&r) {
                            seen.push(r);
                        }
                    }
                    seen.iter().filter(|&&r| r >= 1).count() >= 2
                });
                assert!(seen.windows(2).all(|w| w[0] < w[1]), "{ramp}: worker {index} page {page}: {seen:?}");
            }
            for &page in &unique {
                let own = expected_page(page, Content::Unique { owner: index });
                assert_eq!(read_page(pid, &region, page), own, "{ramp}: worker {index} unique page {page}");
            }
            for &page in &shared {
                assert_eq!(read_page(pid, &region, page), expected_page(page, Content::Shared), "{ramp}: {page}");
            }
            let region = mergeable_region(pid);
            assert!(region.rss_kib.abs_diff(rss_filled) <= 4 * 1024 / 10, "{ramp}: pid {pid} {region:?}");
            assert!(!gone(pid), "{ramp}: worker {index} still running");
        }
    }
}
