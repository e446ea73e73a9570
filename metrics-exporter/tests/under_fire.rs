//! Issue 30, item 6: the exporter under fire on its TCP port, which any local user reaches:
//! 1,000 connections held open saying nothing, requests whose headers drip a byte at a time,
//! oversized requests and fuzzed bytes, all at once. Scrapes meanwhile are answered (how fast is
//! the benchmark's figure: `cargo bench -p kata-ksm-throttler-exporter --bench scrape`), the
//! exporter's memory stays bounded, it keeps running, and the throttler is never activated.

use std::time::{Duration, Instant};

use kata_ksm_throttler_test_support::http::request;
use kata_ksm_throttler_test_support::http_fire::{Fire, FirePlan};
use kata_ksm_throttler_test_support::procfs::{footprint, raise_fd_limit};
use kata_ksm_throttler_test_support::prometheus::{sample, spawn_exporter};
use kata_ksm_throttler_test_support::*;
use ksm_throttler_contract::private_bus::BusConfig;

const EXPORTER: &str = env!("CARGO_BIN_EXE_kata-ksm-throttler-exporter");

/// The exporter's peak resident memory may not pass this, whatever the fire (it is ~5 MiB fresh).
const PEAK_LIMIT_KIB: u64 = 32 * 1024;

#[test]
fn scrapes_are_answered_under_fire_with_memory_bounded_and_the_throttler_never_activated() {
    assert!(raise_fd_limit() >= 1_500, "1,000 held connections need the descriptors");
    // The bus would start the throttler on the first call that asks it to: a mark instead.
    let services = tempfile::tempdir().expect("tempdir");
    let mark = services.path().join("activated");
    let shipped = std::fs::read_to_string(bus::project_file("dbus/org.kata.KsmThrottler.service")).expect("read");
    let exec = format!("Exec=/usr/bin/touch {}", mark.display());
    let copy: String =
        shipped.lines().map(|l| if l.starts_with("Exec=") { exec.clone() } else { l.to_owned() } + "\n").collect();
    std::fs::write(services.path().join("org.kata.KsmThrottler.service"), copy).expect("write .service");
    let bus = start_bus_with(BusConfig { service_dirs: vec![services.path().to_owned()], ..BusConfig::default() });
    let scratch = Scratch::with_counters();
    let (exporter, addr) =
        spawn_exporter(EXPORTER, bus.address(), &scratch.ksm(), &scratch.path().join("exporter.log"), &[]);
    let pid = exporter.pid().expect("running");
    let fresh = footprint(pid).expect("/proc");

    let fire = Fire::start(addr, FirePlan { held: 1_000, drips: 50, seed: 30 });
    // Every slot taken by the held connections before the first scrape.
    std::thread::sleep(Duration::from_secs(2));
    let mut slowest = Duration::ZERO;
    for i in 0..20 {
        let started = Instant::now();
        let r = request(addr, "GET", "/metrics", &[], Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("scrape {i} under fire: {e}; log:\n{}", exporter.log_text()));
        slowest = slowest.max(started.elapsed());
        assert_eq!(r.status, 200, "scrape {i}: {r:?}");
        assert_eq!(sample(&r.text(), "ksm_throttler_up"), Some(0.0), "{}", r.text());
        assert_eq!(sample(&r.text(), "ksm_throttler_activatable"), Some(1.0), "{}", r.text());
        std::thread::sleep(Duration::from_millis(250));
    }
    let counts = fire.stop();
    let peak = footprint(pid).expect("/proc").vm_hwm_kib;
    eprintln!(
        "under fire: 20 scrapes answered, the slowest in {slowest:?}; exporter RSS {} KiB fresh, peak {peak} KiB; \
         {} held or dripping connections closed by it, {} oversized or fuzzed requests",
        fresh.vm_rss_kib,
        counts.closed_by_server.load(std::sync::atomic::Ordering::Relaxed),
        counts.hostile_requests.load(std::sync::atomic::Ordering::Relaxed),
    );
    assert!(peak < PEAK_LIMIT_KIB, "peak RSS {peak} KiB; log:\n{}", exporter.log_text());
    let mut exporter = exporter;
    assert!(exporter.is_running().expect("running"), "{}", exporter.log_text());
    assert_eq!(request(addr, "GET", "/metrics", &[], Duration::from_secs(10)).expect("after").status, 200);
    assert!(!mark.exists(), "the throttler was activated; bus log:\n{}", bus.log_text());
}
