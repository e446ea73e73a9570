//! A fleet of three hosts on this machine: three throttlers, each on its own scratch KSM and
//! private bus, three exporters on their own ports, and one real Prometheus finding them through
//! file-based service discovery (the scrape configuration docs/fleet.md shows). The dashboard's
//! fleet queries and the alert rules are evaluated across the three: the sum of the savings, the
//! top host, the hosts by setting, and one host kept aggressive firing its alert while the others
//! stay quiet.

use std::collections::BTreeMap;
use std::time::Duration;

use kata_ksm_throttler_test_support::bus::project_file;
use kata_ksm_throttler_test_support::prometheus::{spawn_exporter, Prometheus};
use kata_ksm_throttler_test_support::*;
use serde_json::{json, Value};

const EXPORTER: &str = env!("CARGO_BIN_EXE_kata-ksm-throttler-exporter");
const LIMIT: Duration = Duration::from_secs(60);

/// The dashboard's query of the panel `title` (its first target), over every instance.
fn panel_query(title: &str) -> String {
    let path = project_file("contrib/grafana/kata-ksm-throttler.json");
    let dash: Value = serde_json::from_str(&std::fs::read_to_string(path).expect("the dashboard")).expect("JSON");
    let panel = dash["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .find(|p| p["title"] == title)
        .unwrap_or_else(|| panic!("no panel {title:?}"));
    let expr = panel["targets"][0]["expr"].as_str().expect("expr");
    expr.replace("$instance", ".*").replace("$__rate_interval", "1m")
}

/// The shipped rules with every `for:` cut to 2 s: the expressions are the shipped ones, and an
/// alert that fires after a day fires here within the test.
fn rules_firing_soon(dir: &std::path::Path) -> std::path::PathBuf {
    let text = std::fs::read_to_string(project_file("contrib/prometheus/kata-ksm-throttler.rules.yml")).expect("rules");
    let cut: Vec<String> = text
        .lines()
        .map(|l| match l.trim_start().strip_prefix("for: ") {
            Some(_) => format!("{}for: 2s", &l[..l.len() - l.trim_start().len()]),
            None => l.to_owned(),
        })
        .collect();
    assert!(text.contains("for: 1d"), "the aggressive-for-a-day rule is there to cut");
    let path = dir.join("rules.yml");
    std::fs::write(&path, cut.join("\n") + "\n").expect("write rules");
    path
}

/// Each series of an instant query's result: its `host` label and value.
fn by_host(p: &Prometheus, q: &str) -> BTreeMap<String, f64> {
    let data = p.query(q).unwrap_or_else(|e| panic!("{q}: {e}"));
    data["result"]
        .as_array()
        .expect("result")
        .iter()
        .map(|r| {
            let host = r["metric"]["host"].as_str().unwrap_or("?").to_owned();
            (host, r["value"][1].as_str().and_then(|v| v.parse().ok()).unwrap_or(f64::NAN))
        })
        .collect()
}

/// Alerts in state `firing`, as (alert name, host).
fn firing(p: &Prometheus) -> Vec<(String, String)> {
    let alerts = p.api("/api/v1/alerts").unwrap_or_default();
    let mut out: Vec<(String, String)> = alerts["alerts"]
        .as_array()
        .map(|l| {
            l.iter()
                .filter(|a| a["state"] == "firing")
                .map(|a| {
                    let name = a["labels"]["alertname"].as_str().unwrap_or("?").to_owned();
                    (name, a["labels"]["host"].as_str().unwrap_or("?").to_owned())
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hosts_in_one_prometheus_sum_rank_and_alert_per_host() {
    // host a is kept aggressive; b saves most; c is at rest. Profits are positive everywhere,
    // so that only the aggressive rule has cause to fire.
    let hosts = [("a", "1000\n"), ("b", "3000\n"), ("c", "2000\n")];
    let mut fleet = vec![];
    for (host, sharing) in hosts {
        let s = setup(&[]).await;
        s.scratch.set("pages_sharing", sharing);
        s.scratch.set("general_profit", "4096000\n");
        let log = s.scratch.path().join("exporter.log");
        let (exporter, addr) = spawn_exporter(EXPORTER, s.bus.address(), &s.scratch.ksm(), &log, &[]);
        fleet.push((host, s, exporter, addr));
    }
    fleet[0].1.proxy.set_mode("aggressive").await.expect("host a pinned aggressive");

    let dir = tempfile::tempdir().expect("tempdir");
    let sd: Vec<Value> = fleet
        .iter()
        .map(|(host, _, _, addr)| json!({"targets": [addr.to_string()], "labels": {"host": host}}))
        .collect();
    let sd_file = dir.path().join("kata-ksm-throttler.json");
    std::fs::write(&sd_file, serde_json::to_string_pretty(&sd).expect("JSON")).expect("write the SD file");
    let p = Prometheus::start_file_sd(&sd_file, &[rules_firing_soon(dir.path())]).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{}", std::fs::read_to_string(p.dir().join("prometheus.yml")).unwrap_or_default());

    eventually_blocking(
        LIMIT,
        || format!("the three hosts discovered and up; log:\n{}", p.log()),
        || p.scalar("count(ksm_throttler_up == 1)") == Some(3.0),
    );

    // The dashboard's sum of savings is the three throttlers' SavedBytes added up.
    let mut want_sum = 0.0;
    let mut saved = BTreeMap::new();
    for (host, s, _, _) in &fleet {
        let v = s.proxy.saved_bytes().await.expect("SavedBytes") as f64;
        want_sum += v;
        saved.insert(host.to_string(), v);
    }
    let sum_query = panel_query("Memory saved, all hosts");
    eventually_blocking(LIMIT, || format!("{sum_query} = {want_sum}"), || p.scalar(&sum_query) == Some(want_sum));

    // The top host by savings, and the dashboard's ranking of them.
    let top = by_host(&p, "topk(1, ksm_saved_bytes)");
    assert_eq!(top, BTreeMap::from([("b".to_owned(), saved["b"])]), "the top host");
    let ranked = by_host(&p, &panel_query("Top hosts by memory saved"));
    assert_eq!(ranked, saved, "every host ranked with its own savings");

    // Hosts by setting: one aggressive, two at the initial settings.
    let by_setting = p.query(&panel_query("Hosts by setting")).expect("hosts by setting");
    let counts: BTreeMap<String, f64> = by_setting["result"]
        .as_array()
        .expect("result")
        .iter()
        .map(|r| {
            (
                r["metric"]["setting"].as_str().unwrap_or("?").to_owned(),
                r["value"][1].as_str().unwrap_or("").parse().unwrap_or(f64::NAN),
            )
        })
        .collect();
    assert_eq!(counts, BTreeMap::from([("aggressive".to_owned(), 1.0), ("initial".to_owned(), 2.0)]));
    // Transitions across the fleet: the one SetMode.
    assert_eq!(p.scalar("sum(ksm_throttler_transitions_total{cause=\"mode-change\"})"), Some(1.0));

    // The kept-aggressive host fires its alert; the other two fire nothing, and nothing else fires.
    eventually_blocking(
        LIMIT,
        || format!("KsmThrottlerStuckAggressive firing for host a alone; firing: {:?}", firing(&p)),
        || firing(&p) == [("KsmThrottlerStuckAggressive".to_owned(), "a".to_owned())],
    );
    // A few more evaluations (1 s apart) change nothing.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(firing(&p), [("KsmThrottlerStuckAggressive".to_owned(), "a".to_owned())]);
}
