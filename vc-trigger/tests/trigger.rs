//! The trigger binary on scratch sandbox folders, kicking the real daemon on a private bus.
//! Every kick request is logged ("new sandbox sandbox=" / "appeared") before it is made, and inotify events
//! are handled in order, so once a later sandbox is seen in the log, what came before it has been
//! handled: the log answers "was this ignored?" without waiting for a time-out.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use futures_util::StreamExt;
use kata_ksm_throttler::client::proxy::KsmThrottlerProxy;

const TRIGGER: &str = env!("CARGO_BIN_EXE_kata-vc-throttler");

/// The trigger binary, ended by PID when dropped.
struct Trigger {
    child: Option<Child>,
    log: tempfile::NamedTempFile,
}

impl Trigger {
    fn spawn(bus: &str, args: &[&Path]) -> Trigger {
        let log = tempfile::NamedTempFile::new().expect("log");
        let out = log.reopen().expect("log");
        let child = Command::new(TRIGGER)
            .arg("--bus")
            .arg(bus)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup"))
            .stderr(out)
            .spawn()
            .expect("spawn the trigger");
        Trigger { child: Some(child), log }
    }

    /// Watching `vc` (--root) and `kata` (--kata-root).
    fn watch(bus: &str, vc: &Path, kata: &Path) -> Trigger {
        Trigger::spawn(bus, &[Path::new("--root"), vc, Path::new("--kata-root"), kata])
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    fn count(&self, needle: &str) -> usize {
        self.count_all(&[needle])
    }

    fn count_all(&self, needles: &[&str]) -> usize {
        self.log_text().lines().filter(|l| needles.iter().all(|s| l.contains(s))).count()
    }

    /// Waits (bounded) until `n` lines contain every one of `needles`.
    fn wait_log(&self, needles: &[&str], n: usize) {
        let start = Instant::now();
        // Prompt for short waits, without rereading a long log thousands of times for long ones.
        let mut pause = Duration::from_millis(1);
        loop {
            if self.count_all(needles) >= n {
                return;
            }
            let text = self.log_text();
            assert!(start.elapsed() < Duration::from_secs(10), "no {n} lines with {needles:?} in 10 s; log:\n{text}");
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().expect("try_wait").is_none())
    }

    fn wait(&mut self, limit: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("running");
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return status;
            }
            assert!(start.elapsed() < limit, "the trigger did not exit within {limit:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn signal(&self, signal: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.child.as_ref().expect("running").id() as i32).expect("pid");
        rustix::process::kill_process(pid, signal).expect("kill");
    }

    fn terminate(&mut self) -> ExitStatus {
        self.signal(rustix::process::Signal::TERM);
        self.wait(Duration::from_secs(10))
    }
}

impl Drop for Trigger {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits (bounded) until the daemon has counted `n` kicks; how long that took.
async fn wait_kicks(proxy: &KsmThrottlerProxy<'_>, n: u64) -> Duration {
    let start = Instant::now();
    loop {
        let count = proxy.kick_count().await.expect("KickCount");
        assert!(count <= n, "{count} kicks, expected {n}");
        if count == n {
            return start.elapsed();
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{count} kicks after 10 s, expected {n}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
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
    eprintln!("mkdir to kick counted (the first: to CurrentSetting=aggressive signalled): {latencies:?}");
    for l in &latencies {
        assert!(*l < Duration::from_secs(1), "{latencies:?}");
    }

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
    loop {
        let next = s.proxy.next_step_down().await.expect("get");
        if next >= due {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no kick after the last sandbox: NextStepDown {next} < {due}; log:\n{}",
            trigger.log_text().lines().rev().take(8).collect::<Vec<_>>().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let took = started.elapsed();
    let kicks = s.proxy.kick_count().await.expect("get");
    eprintln!("{BURST} sandboxes: {kicks} kicks, the last one {took:?} after the first mkdir");
    assert_eq!(s.proxy.current_setting().await.expect("get"), "aggressive");
    assert!((1..=BURST as u64).contains(&kicks), "{kicks}");
    assert!(took < Duration::from_secs(5), "{took:?}");
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
    let start = Instant::now();
    while s.proxy.kick_count().await.expect("get") < 3 {
        assert!(start.elapsed() < Duration::from_secs(5), "no kick for {}", r.kata.display());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_throttler_is_logged_and_the_trigger_keeps_watching() {
    let bus = start_bus();
    let scratch = Scratch::new();
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
    assert_eq!(proxy.current_setting().await.expect("get"), "aggressive");
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
    trigger.signal(rustix::process::Signal::STOP);
    for i in 0..queued + 100 {
        mkdir(&r.vc.join(format!("sbs/flood-{i}")));
    }
    trigger.signal(rustix::process::Signal::CONT);
    trigger.wait_log(&["inotify queue overflow"], 1);
    let before = s.proxy.kick_count().await.expect("get");
    assert!(before >= 1, "the flood kicked");
    assert!(trigger.running());

    mkdir(&r.vc.join("sbs/after-the-flood"));
    trigger.wait_log(&["new sandbox sandbox=", "after-the-flood"], 1);
    let start = Instant::now();
    while s.proxy.kick_count().await.expect("get") <= before {
        assert!(start.elapsed() < Duration::from_secs(10), "no kick after the flood");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    eprintln!("{} folders while stopped: {before} kicks, the log has the overflow", queued + 100);
}

#[test]
fn bad_arguments_are_one_line_errors() {
    let out = Command::new(TRIGGER).args(["--no-root", "--no-kata-root"]).output().expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nothing to watch") && err.trim().lines().count() == 1, "{err}");

    let out = Command::new(TRIGGER).args(["--bus", "private"]).output().expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--bus private") && err.trim().lines().count() == 1, "{err}");
}
