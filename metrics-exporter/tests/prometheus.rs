//! A real Prometheus server (Debian's 2.42) scrapes the exporter every second while the real
//! daemon on a private bus is kicked and steps down on short durations; the values are read
//! back through Prometheus's HTTP query API: the target is healthy (its OpenMetrics parser took
//! every scrape), the setting series shows initial -> aggressive -> standard -> slow in that
//! order, and the counters equal the throttler's properties.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use kata_ksm_throttler_test_support::prometheus::{spawn_exporter, Prometheus};
use kata_ksm_throttler_test_support::*;
use serde_json::Value;

const EXPORTER: &str = env!("CARGO_BIN_EXE_kata-ksm-throttler-exporter");
/// Long enough for a few 1 s scrapes of each setting on a loaded machine.
const STEPS: [&str; 6] = ["--aggressive-duration", "4s", "--standard-duration", "4s", "--slow-duration", "4s"];
const LIMIT: Duration = Duration::from_secs(40);

fn exporter(bus: &str, ksm: &Path, log: &Path) -> (Guarded, SocketAddr) {
    spawn_exporter(EXPORTER, bus, ksm, log, &[])
}

/// Waits until the query's one series has the value `want`.
fn until_value(p: &Prometheus, q: &str, want: f64) {
    eventually_blocking(
        LIMIT,
        || format!("{q} == {want} in Prometheus (now {:?}); log:\n{}", p.query(q), p.log()),
        || p.scalar(q) == Some(want),
    );
}

/// The first time (seconds since the epoch) each series of a range query was 1.
fn first_one(range: &Value, label: &str) -> Vec<(String, f64)> {
    let mut firsts: Vec<(String, f64)> = range["result"]
        .as_array()
        .map(|series| {
            series
                .iter()
                .filter_map(|s| {
                    let name = s["metric"][label].as_str()?.to_owned();
                    let t = s["values"].as_array()?.iter().find(|v| v[1] == "1")?[0].as_f64()?;
                    Some((name, t))
                })
                .collect()
        })
        .unwrap_or_default();
    firsts.sort_by(|a, b| a.1.total_cmp(&b.1));
    firsts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_sees_the_kick_the_steps_down_and_the_throttler_s_counters() {
    let s = setup(&STEPS).await;
    s.scratch.set("pages_sharing", "2048\n");
    s.scratch.set("full_scans", "5\n");
    let (_exporter, addr) = exporter(s.bus.address(), &s.scratch.ksm(), &s.scratch.path().join("exporter.log"));
    let p = Prometheus::start(&[addr], &[]).unwrap_or_else(|e| panic!("{e}"));

    until_value(&p, "ksm_throttler_up", 1.0);
    until_value(&p, "ksm_throttler_setting{setting=\"initial\"}", 1.0);
    let targets = p.api("/api/v1/targets").expect("targets");
    let target = &targets["activeTargets"][0];
    assert_eq!(target["health"], "up", "{target}");
    assert_eq!(target["lastError"], "", "{target}");
    eprintln!("target: {} health={} lastError={:?}", target["scrapeUrl"], target["health"], target["lastError"]);

    s.proxy.kick().await.expect("kick");
    until_value(&p, "ksm_throttler_setting{setting=\"aggressive\"}", 1.0);
    s.scratch.set("pages_sharing", "4096\n");
    s.scratch.set("full_scans", "9\n");
    until_value(&p, "ksm_throttler_setting{setting=\"standard\"}", 1.0);
    until_value(&p, "ksm_throttler_setting{setting=\"slow\"}", 1.0);
    // Slow's end, as scheduled: the property and the last sample agree (unless slow just ended).
    let seen = p.scalar("ksm_throttler_next_step_down_timestamp_seconds").expect("next step");
    let next = s.proxy.next_step_down().await.expect("NextStepDown") as f64 / 1e6;
    assert!(seen > 0.0 && (seen == next || next == 0.0), "next step down {seen} in Prometheus, {next} on the bus");
    eprintln!("next step down: Prometheus {seen}, NextStepDown {next}");

    // The transition, as Prometheus stored it.
    let range = p.query_range("ksm_throttler_setting", 60).expect("range");
    let order = first_one(&range, "setting");
    eprintln!("first sample at 1, by setting: {order:?}");
    let names: Vec<&str> = order.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["initial", "aggressive", "standard", "slow"], "{range}");
    let changes = p.scalar("changes(ksm_throttler_setting{setting=\"aggressive\"}[1m])").expect("changes");
    assert!(changes >= 2.0, "aggressive went 0 -> 1 -> 0: {changes}");

    // The counters equal the throttler's properties (once a scrape after the last change is in).
    let kicks = s.proxy.kick_count().await.expect("KickCount") as f64;
    let sharing = s.proxy.pages_sharing().await.expect("PagesSharing") as f64;
    let scans = s.proxy.full_scans().await.expect("FullScans") as f64;
    let saved = s.proxy.saved_bytes().await.expect("SavedBytes") as f64;
    assert_eq!((kicks, sharing, scans), (1.0, 4096.0, 9.0));
    until_value(&p, "ksm_throttler_kicks_total", kicks);
    until_value(&p, "ksm_pages_sharing", sharing);
    until_value(&p, "ksm_full_scans_total", scans);
    until_value(&p, "ksm_saved_bytes", saved);
    for q in [
        "ksm_throttler_kicks_total",
        "ksm_pages_sharing",
        "ksm_full_scans_total",
        "ksm_saved_bytes",
        "ksm_throttler_setting{setting=\"slow\"}",
        "changes(ksm_throttler_setting{setting=\"aggressive\"}[1m])",
    ] {
        eprintln!("query {q} = {:?}", p.scalar(q));
    }
    eprintln!("properties: KickCount={kicks} PagesSharing={sharing} FullScans={scans} SavedBytes={saved}");
}
