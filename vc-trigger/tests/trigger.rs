//! The trigger binary on scratch sandbox folders, kicking the real daemon on a private bus.
//! Every kick request is logged ("new sandbox sandbox=" / "appeared") before it is made, and inotify events
//! are handled in order, so once a later sandbox is seen in the log, what came before it has been
//! handled: the log answers "was this ignored?" without waiting for a time-out.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use kata_ksm_throttler_test_support::*;
use ksm_throttler_contract::proxy::KsmThrottlerProxy;
use rustix::process::Signal;

const TRIGGER: &str = env!("CARGO_BIN_EXE_kata-vc-throttler");
/// A configuration file that does not exist: the built-in folders, whatever the host has.
const NO_CONFIG: &str = "/nonexistent/kata-ksm-throttler/config.toml";

/// The trigger binary, ended by PID when dropped.
struct Trigger {
    process: Guarded,
    _log: tempfile::NamedTempFile,
}

impl Trigger {
    fn spawn(bus: &str, args: &[&Path]) -> Trigger {
        let log = tempfile::NamedTempFile::new().expect("log");
        let mut command = Command::new(TRIGGER);
        // Never the host's configuration: the folders are the test's.
        command.args(["--config", NO_CONFIG, "--bus", bus]).args(args);
        let process = Guarded::spawn_logged(&mut command, "the trigger", log.path()).expect("spawn the trigger");
        Trigger { process, _log: log }
    }

    /// Watching `vc` (--root) and `kata` (--kata-root).
    fn watch(bus: &str, vc: &Path, kata: &Path) -> Trigger {
        Trigger::spawn(bus, &[Path::new("--root"), vc, Path::new("--kata-root"), kata])
    }

    fn log_text(&self) -> String {
        self.process.log_text()
    }

    fn count(&self, needle: &str) -> usize {
        self.count_all(&[needle])
    }

    fn count_all(&self, needles: &[&str]) -> usize {
        self.log_text().lines().filter(|l| needles.iter().all(|s| l.contains(s))).count()
    }

    /// Waits until `n` lines contain every one of `needles`.
    fn wait_log(&self, needles: &[&str], n: usize) {
        let what = || format!("{n} lines with {needles:?}; log:\n{}", self.log_text());
        eventually_blocking(Duration::from_secs(10), what, || self.count_all(needles) >= n);
    }

    fn running(&mut self) -> bool {
        self.process.is_running().expect("try_wait")
    }

    fn signal(&self, signal: Signal) {
        self.process.signal(signal).expect("signal the trigger");
    }

    fn terminate(&mut self) -> ExitStatus {
        self.signal(Signal::TERM);
        self.process.wait_within(Duration::from_secs(10)).unwrap_or_else(|e| panic!("{e}"))
    }
}

/// Waits until the daemon has counted `n` kicks (never more); how long that took.
async fn wait_kicks(proxy: &KsmThrottlerProxy<'_>, n: u64) -> Duration {
    let start = Instant::now();
    eventually(Duration::from_secs(10), format!("{n} kicks counted"), async || {
        let count = proxy.kick_count().await.expect("KickCount");
        assert!(count <= n, "{count} kicks, expected {n}");
        count == n
    })
    .await;
    start.elapsed()
}

fn mkdir(p: &Path) {
    std::fs::create_dir(p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
}

struct Roots {
    vc: PathBuf,
    kata: PathBuf,
}

fn roots(s: &Setup) -> Roots {
    Roots { vc: s.scratch.dir.path().join("vc"), kata: s.scratch.dir.path().join("kata") }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_new_sandbox_kicks_the_throttler_promptly() {
    let s = setup(&[]).await;
    let r = roots(&s);
    std::fs::create_dir_all(r.vc.join("sbs")).expect("mkdir");
    mkdir(&r.kata);
    let trigger = Trigger::watch(s.bus.address(), &r.vc, &r.kata);
    trigger.wait_log(&["watching for new sandboxes"], 2);
    assert_eq!(s.proxy.kick_count().await.expect("get"), 0, "folders that exist at start-up do not kick");

    // A caching proxy: only those follow PropertiesChanged.
    let watching = KsmThrottlerProxy::new(&s.conn).await.expect("proxy");
    let mut settings = watching.receive_current_setting_changed().await;
    let started = Instant::now();
    mkdir(&r.vc.join("sbs/sandbox-1"));
    loop {
        let change = tokio::time::timeout(Duration::from_secs(5), settings.next())
            .await
            .expect("a CurrentSetting change within 5 s")
            .expect("stream");
        if change.get().await.expect("value") == "aggressive" {
            break;
        }
    }
    let to_aggressive = started.elapsed();
    wait_kicks(&s.proxy, 1).await;
    assert_eq!(s.scratch.knobs(), expected(10, 1));

    // Already aggressive: each further sandbox restarts the period, one kick each.
    let mut latencies = vec![to_aggressive];
    for (i, dir) in [r.kata.join("sandbox-2"), r.vc.join("sbs/sandbox-3"), r.kata.join("sandbox-4")].iter().enumerate()
    {
        let started = Instant::now();
        mkdir(dir);
        wait_kicks(&s.proxy, i as u64 + 2).await;
        latencies.push(started.elapsed());
    }
    // How prompt is printed, not checked (a loaded machine is late): each kick is counted
    // within wait_kicks's time-out, and the trigger kicks with no delay of its own.
    eprintln!("mkdir to kick counted (the first: to CurrentSetting=aggressive signalled): {latencies:?}");

    // Files, nested folders and folders beside the watched ones are not sandboxes.
    std::fs::write(r.vc.join("sbs/sandbox-1.lock"), "").expect("write");
    std::fs::write(r.kata.join("notes"), "").expect("write");
    mkdir(&r.vc.join("sbs/sandbox-1/inner"));
    mkdir(&r.vc.join("vm"));
    mkdir(&r.vc.join("sbs/sandbox-5"));
    wait_kicks(&s.proxy, 5).await;
    trigger.wait_log(&["new sandbox sandbox=", "sandbox-5"], 1);
    assert_eq!(trigger.count("new sandbox sandbox="), 5, "{}", trigger.log_text());
    for ignored in ["sandbox-1.lock", "notes", "inner", "/vm"] {
        assert!(!trigger.log_text().contains(ignored), "{ignored} kicked:\n{}", trigger.log_text());
    }
    assert_eq!(trigger.count("appeared"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_is_folded_into_few_kicks_and_the_last_sandbox_restarts_the_period() {
    let s = setup(&[]).await;
    let r = roots(&s);
    std::fs::create_dir_all(r.vc.join("sbs")).expect("mkdir");
    let trigger = Trigger::spawn(s.bus.address(), &[Path::new("--root"), &r.vc, Path::new("--no-kata-root")]);
    trigger.wait_log(&["watching for new sandboxes"], 1);

    const BURST: usize = 200;
    let started = Instant::now();
    let mut last_created = SystemTime::now();
    for i in 0..BURST {
        last_created = SystemTime::now();
        mkdir(&r.vc.join(format!("sbs/burst-{i}")));
    }
    trigger.wait_log(&["new sandbox sandbox="], BURST);
    // The period restarts at the kick that follows the last sandbox: 30 s after a time after its mkdir began.
    let due = last_created.duration_since(UNIX_EPOCH).expect("clock").as_micros() as u64 + 30_000_000;
    let what = || {
        let tail: Vec<_> = trigger.log_text().lines().rev().take(8).map(str::to_owned).collect();
        format!("a kick after the last sandbox (NextStepDown >= {due}); log's end:\n{}", tail.join("\n"))
    };
    eventually(Duration::from_secs(10), what, async || s.proxy.next_step_down().await.expect("get") >= due).await;
    let took = started.elapsed();
    let kicks = s.proxy.kick_count().await.expect("get");
    eprintln!("{BURST} sandboxes: {kicks} kicks, the last one {took:?} after the first mkdir");
    assert_eq!(s.proxy.current_setting().await.expect("get"), "aggressive");
    assert!((1..=BURST as u64).contains(&kicks), "{kicks}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roots_created_late_are_waited_for_and_sbs_appearing_kicks_once() {
    let s = setup(&[]).await;
    let r = roots(&s);
    let trigger = Trigger::watch(s.bus.address(), &r.vc, &r.kata);
    trigger.wait_log(&["waiting for the sandboxes folder"], 2);

    // The Go runtime's root, then its sbs: only sbs kicks (once), as the original did.
    mkdir(&r.vc);
    trigger.wait_log(&["waiting for the sandboxes folder", &format!("watching={}", r.vc.display())], 1);
    mkdir(&r.vc.join("sbs"));
    trigger.wait_log(&["the sandboxes folder appeared", "sbs"], 1);
    wait_kicks(&s.proxy, 1).await;
    assert_eq!(trigger.count("appeared"), 1, "{}", trigger.log_text());
    mkdir(&r.vc.join("sbs/sandbox-1"));
    wait_kicks(&s.proxy, 2).await;

    // runtime-rs creates its root and the sandbox in one go: at least one kick, aggressive.
    std::fs::create_dir_all(r.kata.join("sandbox-2")).expect("mkdir -p");
    trigger.wait_log(&["watching for new sandboxes", "kata"], 1);
    let what = format!("a kick for {}", r.kata.display());
    eventually(Duration::from_secs(10), what, async || s.proxy.kick_count().await.expect("get") >= 3).await;
    mkdir(&r.kata.join("sandbox-3"));
    trigger.wait_log(&["new sandbox sandbox=", "sandbox-3"], 1);
    assert_eq!(s.proxy.current_setting().await.expect("get"), "aggressive");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_and_re_created_roots_are_watched_again() {
    let s = setup(&[]).await;
    let r = roots(&s);
    std::fs::create_dir_all(r.vc.join("sbs")).expect("mkdir");
    mkdir(&r.kata);
    let mut trigger = Trigger::watch(s.bus.address(), &r.vc, &r.kata);
    trigger.wait_log(&["watching for new sandboxes"], 2);

    let mut kicks = 0;
    for round in 0..3 {
        // The whole Go root goes, then comes back.
        let waiting = ["waiting for the sandboxes folder", "/vc/sbs"];
        let before = trigger.count_all(&waiting);
        std::fs::remove_dir_all(&r.vc).expect("rm -r");
        trigger.wait_log(&waiting, before + 1);
        std::fs::create_dir_all(r.vc.join("sbs")).expect("mkdir -p");
        trigger.wait_log(&["the sandboxes folder appeared", "vc/sbs"], round + 1);
        kicks += 1;
        wait_kicks(&s.proxy, kicks).await;
        mkdir(&r.vc.join(format!("sbs/sandbox-{round}")));
        kicks += 1;
        wait_kicks(&s.proxy, kicks).await;

        // runtime-rs's root is removed and re-created.
        std::fs::remove_dir_all(&r.kata).expect("rm -r");
        mkdir(&r.kata);
        trigger.wait_log(&["the sandboxes folder appeared", "/kata"], round + 1);
        kicks += 1;
        wait_kicks(&s.proxy, kicks).await;
        mkdir(&r.kata.join(format!("rs-{round}")));
        kicks += 1;
        wait_kicks(&s.proxy, kicks).await;
    }

    // sbs moved away: its new sandboxes are not ours; a new sbs is.
    std::fs::rename(r.vc.join("sbs"), r.vc.join("sbs.old")).expect("mv");
    mkdir(&r.vc.join("sbs.old/moved-away"));
    mkdir(&r.vc.join("sbs"));
    trigger.wait_log(&["the sandboxes folder appeared", "vc/sbs"], 4);
    mkdir(&r.vc.join("sbs/after-move"));
    trigger.wait_log(&["new sandbox sandbox=", "after-move"], 1);
    assert!(!trigger.log_text().contains("moved-away"), "{}", trigger.log_text());
    assert!(trigger.running());
    assert!(trigger.terminate().success());
}

/// Issue 14, item 12: the sandboxes folder swapped again and again with a symlink that points at
/// itself (inotify_add_watch then fails with ELOOP) is a folder that went away, not a reason to
/// exit; once it is a folder again, its sandboxes kick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandboxes_folder_swapped_with_a_looping_symlink_is_waited_for() {
    use rustix::fs::{renameat_with, RenameFlags, CWD};
    let s = setup(&[]).await;
    let r = roots(&s);
    let sbs = r.vc.join("sbs");
    std::fs::create_dir_all(&sbs).expect("mkdir");
    let lnk = r.vc.join("loop");
    std::os::unix::fs::symlink("loop", &lnk).expect("a symlink to itself");
    let mut trigger = Trigger::spawn(s.bus.address(), &[Path::new("--root"), &r.vc, Path::new("--no-kata-root")]);
    trigger.wait_log(&["watching for new sandboxes"], 1);
    let until = Instant::now() + Duration::from_secs(2);
    let mut swaps = 0;
    while Instant::now() < until {
        renameat_with(CWD, &sbs, CWD, &lnk, RenameFlags::EXCHANGE).expect("exchange");
        swaps += 1;
    }
    // An even number of swaps leaves sbs a folder again (and re-watched: it appeared anew).
    if swaps % 2 == 1 {
        renameat_with(CWD, &sbs, CWD, &lnk, RenameFlags::EXCHANGE).expect("exchange");
    }
    assert!(std::fs::symlink_metadata(&sbs).expect("sbs").is_dir());
    assert!(trigger.running(), "the trigger exited after {swaps} swaps:\n{}", trigger.log_text());
    let before = s.proxy.kick_count().await.expect("KickCount");
    mkdir(&sbs.join("after-the-swaps"));
    eventually(Duration::from_secs(10), "a kick for the sandbox after the swaps", async || {
        s.proxy.kick_count().await.expect("KickCount") > before
    })
    .await;
    assert!(trigger.running());
    assert!(trigger.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_throttler_is_logged_and_the_trigger_keeps_watching() {
    let bus = start_bus();
    let scratch = Scratch::fresh();
    let sbs = scratch.dir.path().join("vc/sbs");
    std::fs::create_dir_all(&sbs).expect("mkdir");
    let vc = scratch.dir.path().join("vc");
    let mut trigger = Trigger::spawn(bus.address(), &[Path::new("--root"), &vc, Path::new("--no-kata-root")]);
    trigger.wait_log(&["watching for new sandboxes"], 1);

    mkdir(&sbs.join("while-down"));
    trigger.wait_log(&["cannot be reached", "ServiceUnknown", "still watching"], 1);
    assert!(trigger.running());

    let daemon = Daemon::spawn(&bus, &scratch, &[]);
    let conn = connect(&bus).await;
    wait_for_name(&conn, &daemon).await;
    let proxy = proxy(&conn).await;
    mkdir(&sbs.join("once-up"));
    let took = wait_kicks(&proxy, 1).await;
    // KickCount counts a kick as the engine receives it, just before its transition is shown.
    eventually(Duration::from_secs(10), "aggressive after the kick", async || {
        proxy.current_setting().await.is_ok_and(|s| s == "aggressive")
    })
    .await;
    eprintln!("first kick after the throttler came up: counted {took:?} after mkdir");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inotify_queue_overflow_kicks_and_the_trigger_keeps_watching() {
    let s = setup(&[]).await;
    let r = roots(&s);
    std::fs::create_dir_all(r.vc.join("sbs")).expect("mkdir");
    let mut trigger = Trigger::spawn(s.bus.address(), &[Path::new("--root"), &r.vc, Path::new("--no-kata-root")]);
    trigger.wait_log(&["watching for new sandboxes"], 1);

    // Stopped, it reads nothing while more folders appear than the kernel queues.
    let queued: usize = std::fs::read_to_string("/proc/sys/fs/inotify/max_queued_events")
        .expect("max_queued_events")
        .trim()
        .parse()
        .expect("number");
    trigger.signal(Signal::STOP);
    for i in 0..queued + 100 {
        mkdir(&r.vc.join(format!("sbs/flood-{i}")));
    }
    trigger.signal(Signal::CONT);
    trigger.wait_log(&["inotify queue overflow"], 1);
    let before = s.proxy.kick_count().await.expect("get");
    assert!(before >= 1, "the flood kicked");
    assert!(trigger.running());

    mkdir(&r.vc.join("sbs/after-the-flood"));
    trigger.wait_log(&["new sandbox sandbox=", "after-the-flood"], 1);
    eventually(Duration::from_secs(10), "a kick after the flood", async || {
        s.proxy.kick_count().await.expect("get") > before
    })
    .await;
    eprintln!("{} folders while stopped: {before} kicks, the log has the overflow", queued + 100);
}

#[test]
fn bad_arguments_are_one_line_errors() {
    let out = Command::new(TRIGGER).args(["--config", NO_CONFIG, "--no-root", "--no-kata-root"]).output().expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nothing to watch") && err.trim().lines().count() == 1, "{err}");

    let out = Command::new(TRIGGER).args(["--config", NO_CONFIG, "--bus", "private"]).output().expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--bus private") && err.trim().lines().count() == 1, "{err}");
}

/// A stand-in for the throttler: the first `refusals` Kicks are answered `ShuttingDown`, as an
/// instance that is exiting (a restart, an idle exit) answers them, the rest are taken.
struct Exiting {
    refusals: u32,
    calls: std::sync::Arc<std::sync::atomic::AtomicU32>,
}

#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.kata.KsmThrottler.Error")]
enum ExitingError {
    #[zbus(error)]
    ZBus(zbus::Error),
    ShuttingDown(String),
}

#[zbus::interface(name = "org.kata.KsmThrottler")]
impl Exiting {
    async fn kick(&self) -> Result<(), ExitingError> {
        let n = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if n < self.refusals {
            return Err(ExitingError::ShuttingDown("the throttler is shutting down".into()));
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kick_answered_shutting_down_is_made_again_and_taken_by_the_next_instance() {
    // The end-to-end run's restarts under a live trigger: a kick that reached the instance being
    // stopped was answered ShuttingDown and lost ("still watching"), where the next instance,
    // milliseconds later, would have taken it.
    let bus = start_bus();
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let _throttler = zbus::connection::Builder::address(bus.address())
        .name(ksm_throttler_contract::names::BUS_NAME)
        .serve_at(ksm_throttler_contract::names::OBJECT_PATH, Exiting { refusals: 3, calls: calls.clone() })
        .build()
        .await
        .expect("the stand-in on the bus");
    let scratch = Scratch::fresh();
    let vc = scratch.dir.path().join("vc");
    std::fs::create_dir_all(vc.join("sbs")).expect("mkdir");
    let mut trigger = Trigger::spawn(bus.address(), &[Path::new("--root"), &vc, Path::new("--no-kata-root")]);
    trigger.wait_log(&["watching for new sandboxes"], 1);
    mkdir(&vc.join("sbs/during-a-restart"));
    trigger.wait_log(&["kicked the throttler"], 1);
    assert_eq!(trigger.count("still watching"), 0, "{}", trigger.log_text());
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 4, "three refused, the fourth taken");
    assert!(trigger.terminate().success());
}
