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

    // Garbled files: the properties say unknown, and the daemon keeps serving.
    s.scratch.set_pressure_text("garbage\n");
    assert_eq!(p.memory_pressure_some().await.expect("get"), -1.0);
    std::fs::write(s.scratch.proc_root().join("36/schedstat"), "x\n").expect("write");
    assert_eq!(p.ksmd_cpu_seconds().await.expect("get"), -1.0);
    assert_eq!(p.current_setting().await.expect("still serving"), "aggressive");
}
