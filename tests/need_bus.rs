//! ksmd's cost and the memory need, read live over the bus from a fake proc root and meminfo:
//! the daemon binary on a private bus over a scratch sysfs.

use std::time::Duration;

use kata_ksm_throttler_test_support::daemon::serve;
use kata_ksm_throttler_test_support::*;

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-6
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ksmd_and_memory_figures_are_read_live_and_unknown_ones_say_minus_one() {
    let bus = start_bus();
    let scratch = Scratch::fresh();
    let proc_root = scratch.proc_root().display().to_string();
    std::fs::create_dir_all(scratch.proc_root()).expect("mkdir proc");
    let daemon = Daemon::spawn(&bus, &scratch, &["--proc-root", &proc_root, "--aggressive-duration", "1h"]);
    let s = serve(bus, scratch, daemon).await;
    let p = &s.proxy;

    // Nothing there yet: no ksmd, no PSI, and a meminfo without MemAvailable.
    assert_eq!(p.ksmd_cpu_seconds().await.expect("get"), -1.0, "never a guess");
    assert_eq!(p.ksmd_cpu_share().await.expect("get"), -1.0);
    assert_eq!(p.ksmd_cycle_cpu_seconds().await.expect("get"), -1.0);
    assert_eq!(p.memory_pressure_some().await.expect("get"), -1.0, "no PSI file");
    assert_eq!(p.memory_pressure_full().await.expect("get"), -1.0);
    assert_eq!(p.mem_available_ratio().await.expect("get"), -1.0, "no MemAvailable line");

    s.scratch.set_ksmd(36, Duration::from_millis(1500));
    s.scratch.set_pressure(7.25, 1.5);
    s.scratch.set_meminfo("MemTotal: 1000000 kB\nMemAvailable: 120000 kB\nAnonPages: 4194304 kB\n");
    assert!(close(p.ksmd_cpu_seconds().await.expect("get"), 1.5));
    assert!(close(p.memory_pressure_some().await.expect("get"), 7.25));
    assert!(close(p.memory_pressure_full().await.expect("get"), 1.5));
    assert!(close(p.mem_available_ratio().await.expect("get"), 0.12));

    // A cycle: the share is ksmd's CPU over the cycle's wall time so far.
    p.kick().await.expect("kick");
    let kicked = std::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.scratch.set_ksmd(36, Duration::from_millis(1500 + 250));
    let share = p.ksmd_cpu_share().await.expect("get");
    let wall = kicked.elapsed().as_secs_f64();
    // 0.25 CPU-s over at least 0.5 s (and at most the time since the kick, plus the reply's).
    assert!(share > 0.0 && share <= 0.5 + 1e-9, "share {share}");
    assert!(share >= 0.25 / (wall + 1.0), "share {share} over {wall} s");
    // What the cycle cost: the CPU-s since the kick, not since boot.
    assert!(close(p.ksmd_cycle_cpu_seconds().await.expect("get"), 0.25));

    // Garbled files: the properties say unknown, and the daemon keeps serving.
    s.scratch.set_pressure_text("garbage\n");
    assert_eq!(p.memory_pressure_some().await.expect("get"), -1.0);
    std::fs::write(s.scratch.proc_root().join("36/schedstat"), "x\n").expect("write");
    assert_eq!(p.ksmd_cpu_seconds().await.expect("get"), -1.0);
    assert_eq!(p.current_setting().await.expect("still serving"), "aggressive");
}

const MEM_PLENTY: &str = "MemTotal: 1000000 kB\nMemAvailable: 500000 kB\nAnonPages: 4194304 kB\n";
const MEM_SHORT: &str = "MemTotal: 1000000 kB\nMemAvailable: 100000 kB\nAnonPages: 4194304 kB\n";

/// The daemon over a scratch with a fake proc root (no PSI) and a `[need]` table.
async fn gated(need: &str, extra: &[&str]) -> kata_ksm_throttler_test_support::Setup {
    let bus = start_bus();
    let scratch = Scratch::fresh();
    scratch.set_meminfo(MEM_PLENTY);
    std::fs::create_dir_all(scratch.proc_root()).expect("mkdir proc");
    let config = scratch.path().join("config.toml");
    std::fs::write(&config, format!("[need]\n{need}\n")).expect("config");
    let (proc_root, config) = (scratch.proc_root().display().to_string(), config.display().to_string());
    let mut args = vec!["--proc-root", &proc_root, "--config", &config];
    args.extend_from_slice(extra);
    let daemon = Daemon::spawn(&bus, &scratch, &args);
    serve(bus, scratch, daemon).await
}

const WHEN_NEEDED: &str = "gate = \"when-needed\"\npoll-interval = \"100ms\"\nmin-dwell = \"1s\"";
const FAST: &[&str] = &["--aggressive-duration", "300ms", "--standard-duration", "300ms", "--slow-duration", "300ms"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_kicks_touch_nothing_need_acts_holds_slow_and_steps_down_when_gone() {
    let s = gated(WHEN_NEEDED, FAST).await;
    let p = &s.proxy;
    let before = s.scratch.snapshot();
    assert_eq!(p.need_gate().await.expect("get"), "when-needed");
    assert_eq!(p.need().await.expect("get"), "not-needed");
    let reason = p.need_reason().await.expect("get");
    assert!(reason.contains("MemAvailable 50.0%") && reason.contains("no PSI"), "{reason}");

    // Closed: kicks are counted and answered, KSM untouched.
    for _ in 0..3 {
        p.kick().await.expect("kick answered");
    }
    assert_eq!(p.kick_count().await.expect("get"), 3);
    assert_eq!(p.current_setting().await.expect("get"), "initial");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(s.scratch.snapshot(), before, "nothing written while not needed");
    assert!(!s.scratch.state_dir().join("initial-settings.json").exists());

    // Need appears: as if kicked, then down to slow and held there (not initial).
    s.scratch.set_meminfo(MEM_SHORT);
    eventually(Duration::from_secs(10), "need to act as a kick", async || {
        p.current_setting().await.is_ok_and(|c| c != "initial")
    })
    .await;
    assert_eq!(p.need().await.expect("get"), "needed");
    assert_eq!(p.need_reason().await.expect("get"), "MemAvailable 10.0% < 20.0% (no PSI: MemAvailable only)");
    eventually(Duration::from_secs(10), "slow, held", async || p.current_setting().await.is_ok_and(|c| c == "slow"))
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(p.current_setting().await.expect("get"), "slow", "held while need lasts, past slow's 300 ms");
    assert_eq!(s.scratch.knobs(), expected(500, 100));
    assert_eq!(p.next_step_down().await.expect("get"), 0, "nothing scheduled while held");

    // A garbled meminfo: the decision stands, logged once.
    s.scratch.set_meminfo("MemTotal: lots\n");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(p.need().await.expect("get"), "needed");
    assert_eq!(p.current_setting().await.expect("get"), "slow");
    let log = s.daemon.log_text();
    assert_eq!(log.matches("a need figure cannot be read").count(), 1, "logged once:\n{log}");

    // Need gone: down at the mode's pace, every knob back.
    let gone = std::time::Instant::now();
    s.scratch.set_meminfo(MEM_PLENTY);
    eventually(Duration::from_secs(10), "the initial settings", async || {
        p.current_setting().await.is_ok_and(|c| c == "initial")
    })
    .await;
    assert!(gone.elapsed() >= Duration::from_millis(300), "slow's duration first: {:?}", gone.elapsed());
    assert_eq!(p.need().await.expect("get"), "not-needed");
    assert_eq!(s.scratch.snapshot(), before, "every knob back, byte for byte");
    let log = s.daemon.log_text();
    assert!(!log.contains("run=2") && !log.contains("run = 2"), "never unmerges:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_need_gate_switches_and_refuses_unknown_names() {
    let s = gated(WHEN_NEEDED, &[]).await;
    let p = &s.proxy;
    let err = p.set_need_gate("sometimes").await.expect_err("unknown");
    assert_eq!(error_name(&err), "org.freedesktop.DBus.Error.InvalidArgs");
    assert!(error_message(&err).contains("always, when-needed"), "{err}");
    let err = p.set_need_gate(&"x".repeat(1 << 20)).await.expect_err("huge");
    assert_eq!(error_name(&err), "org.freedesktop.DBus.Error.InvalidArgs");
    assert!(error_message(&err).len() < 200, "bounded");

    p.kick().await.expect("kick");
    assert_eq!(p.current_setting().await.expect("get"), "initial", "closed");
    p.set_need_gate("always").await.expect("always");
    assert_eq!(
        (p.need_gate().await.expect("get"), p.need().await.expect("get")),
        ("always".into(), "not-gated".into())
    );
    p.kick().await.expect("kick");
    assert_eq!(p.current_setting().await.expect("get"), "aggressive", "open: today's behaviour");
    // A pinned mode ignores the gate.
    p.set_need_gate("when-needed").await.expect("when-needed");
    p.set_mode("standard").await.expect("standard");
    assert_eq!(p.need().await.expect("get"), "not-gated");
    assert!(p.need_reason().await.expect("get").contains("ignores the gate"));
    assert_eq!(p.current_setting().await.expect("still serving"), "standard");
}

#[test]
fn a_threshold_out_of_range_is_refused_naming_the_file_and_the_key() {
    let scratch = Scratch::fresh();
    let config = scratch.path().join("config.toml");
    std::fs::write(&config, "[need]\nmem-available-below = 1.5\n").expect("config");
    let out = std::process::Command::new(daemon_binary())
        .args(["--bus", "unix:path=/nonexistent"])
        .args(scratch.path_args())
        .arg("--config")
        .arg(&config)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains(&config.display().to_string()) && err.contains("need.mem-available-below"), "{err}");
    assert_eq!(scratch.knobs(), (0, 100, 20), "nothing touched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adaptive_backs_off_when_general_profit_stays_negative_and_logs_the_figures() {
    let bus = start_bus();
    let scratch = Scratch::with_counters();
    scratch.set("general_profit", "-409600\n");
    scratch.set("pages_unshared", "100000\n");
    let daemon = Daemon::spawn(&bus, &scratch, &["--mode", "adaptive", "--aggressive-duration", "1h"]);
    let s = serve(bus, scratch, daemon).await;
    let p = &s.proxy;
    p.kick().await.expect("kick");
    assert_eq!(p.current_setting().await.expect("get"), "aggressive");
    // Full scans go by with nothing merged and a negative profit: every page different.
    let mut scans = 0u64;
    eventually(Duration::from_secs(20), "a back-off to standard", async || {
        scans += 1;
        s.scratch.set("full_scans", format!("{scans}\n"));
        tokio::time::sleep(Duration::from_millis(60)).await;
        p.current_setting().await.is_ok_and(|c| c == "standard")
    })
    .await;
    assert!(scans >= 10, "not before 10 unprofitable full scans: {scans}");
    let log = s.daemon.log_text();
    assert!(log.contains("costs more than it saves") && log.contains("-409600"), "{log}");
    // The next kick tries again.
    p.kick().await.expect("kick");
    assert_eq!(p.current_setting().await.expect("get"), "aggressive");
}
