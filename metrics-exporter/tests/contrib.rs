//! contrib/: the alert rules pass `promtool check rules` and their own unit tests (`promtool test
//! rules`); the Grafana dashboard is valid JSON and every query in it is accepted by a real
//! Prometheus scraping the exporter in front of the real daemon (and those on metrics that exist
//! today return data); the rules load and evaluate there, and the throttler stopping makes
//! KsmThrottlerUnavailable pending.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kata_ksm_throttler_test_support::bus::project_file;
use kata_ksm_throttler_test_support::prometheus::{spawn_exporter, Prometheus};
use kata_ksm_throttler_test_support::*;
use serde_json::Value;

const EXPORTER: &str = env!("CARGO_BIN_EXE_kata-ksm-throttler-exporter");
const LIMIT: Duration = Duration::from_secs(40);
/// Metrics of the issues still to land (ksmd's CPU and the need: 15; per sandbox: 16) and the
/// step-down time, 0 while nothing is scheduled: their queries are accepted but may be empty.
const NOT_YET: [&str; 5] =
    ["ksmd_cpu", "ksm_sandbox_", "ksm_memory_available", "ksm_memory_pressure", "next_step_down"];

fn rules() -> PathBuf {
    project_file("contrib/prometheus/kata-ksm-throttler.rules.yml")
}

fn promtool(args: &[&str], dir: &Path) {
    let out =
        Command::new("promtool").args(args).current_dir(dir).output().expect("promtool (Debian's prometheus package)");
    assert!(
        out.status.success(),
        "promtool {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("promtool {}: {}", args.join(" "), String::from_utf8_lossy(&out.stdout).trim().replace('\n', " "));
}

#[test]
fn the_rules_pass_promtool_check_and_their_unit_tests() {
    let dir = project_file("contrib/prometheus");
    promtool(&["check", "rules", "kata-ksm-throttler.rules.yml"], &dir);
    promtool(&["test", "rules", "kata-ksm-throttler.rules.test.yml"], &dir);
}

/// Every PromQL query of the dashboard, with Grafana's variables given values Prometheus takes.
fn dashboard_queries() -> Vec<(String, String)> {
    let path = project_file("contrib/grafana/kata-ksm-throttler.json");
    let text = std::fs::read_to_string(&path).expect("the dashboard");
    let dash: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()));
    assert_eq!(dash["uid"], "kata-ksm-throttler");
    let panels = dash["panels"].as_array().expect("panels");
    let mut queries = vec![];
    for p in panels {
        assert!(p["gridPos"]["w"].as_u64().is_some() && p["id"].as_u64().is_some(), "{p}");
        if p["type"] == "row" {
            continue;
        }
        let targets = p["targets"].as_array().unwrap_or_else(|| panic!("panel {} has no targets", p["title"]));
        assert!(!targets.is_empty(), "{p}");
        for t in targets {
            let expr = t["expr"].as_str().unwrap_or_else(|| panic!("a target without expr: {t}"));
            queries.push((p["title"].as_str().unwrap_or("?").to_owned(), expr.to_owned()));
        }
    }
    for v in dash["templating"]["list"].as_array().expect("variables") {
        if let Some(q) = v["query"]["query"].as_str() {
            // label_values(METRIC, LABEL) is Grafana's: the series of METRIC is what it reads.
            let metric = q.strip_prefix("label_values(").and_then(|r| r.split(',').next()).unwrap_or(q);
            queries.push((format!("variable {}", v["name"]), metric.trim().to_owned()));
        }
    }
    queries.into_iter().map(|(t, q)| (t, q.replace("$__rate_interval", "1m").replace("$instance", ".*"))).collect()
}

fn exporter(bus: &str, ksm: &Path, log: &Path) -> (Guarded, SocketAddr) {
    spawn_exporter(EXPORTER, bus, ksm, log, &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_is_accepted_by_a_real_prometheus_and_the_rules_evaluate() {
    let queries = dashboard_queries();
    assert!(queries.len() >= 15, "{queries:?}");
    let mut s = setup(&[]).await;
    s.scratch.set("pages_sharing", "1000\n");
    s.scratch.set("general_profit", "4096000\n");
    s.scratch.set("pages_scanned", "10\n");
    s.scratch.set("full_scans", "1\n");
    let (_exporter, addr) = exporter(s.bus.address(), &s.scratch.ksm(), &s.scratch.path().join("exporter.log"));
    let p = Prometheus::start(&[addr], &[rules()]).unwrap_or_else(|e| panic!("{e}"));
    s.proxy.kick().await.expect("kick");
    // Two scrapes at least, for rate() and increase().
    eventually_blocking(
        LIMIT,
        || format!("two scrapes in; log:\n{}", p.log()),
        || p.scalar("count_over_time(ksm_throttler_up[1m])").is_some_and(|n| n >= 3.0),
    );
    s.scratch.set("pages_scanned", "5000\n");
    eventually_blocking(LIMIT, "the new pages_scanned scraped", || p.scalar("ksm_pages_scanned_total") == Some(5000.0));

    for (title, q) in &queries {
        let data = p.query(q).unwrap_or_else(|e| panic!("panel {title:?}: {q}: {e}"));
        let n = data["result"].as_array().map_or(0, Vec::len);
        eprintln!("{title}: {q} -> {} series", n);
        if !NOT_YET.iter().any(|m| q.contains(m)) {
            assert!(n > 0, "panel {title:?}: {q} has no data: {data}");
        }
    }

    let groups = p.api("/api/v1/rules").expect("rules");
    let rules: Vec<Value> = groups["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .collect();
    assert_eq!(rules.len(), 5, "{groups}");
    eventually_blocking(LIMIT, "every rule evaluated", || {
        p.api("/api/v1/rules").is_ok_and(|g| {
            g["groups"][0]["rules"].as_array().is_some_and(|r| {
                r.iter().all(|r| {
                    r["health"] == "ok" && r["lastEvaluation"].as_str().is_some_and(|t| !t.starts_with("0001"))
                })
            })
        })
    });
    for r in p.api("/api/v1/rules").expect("rules")["groups"][0]["rules"].as_array().expect("rules") {
        eprintln!("rule {}: health {}, state {}", r["name"], r["health"], r["state"]);
    }

    // Stopped, and nothing on this bus can start it: the alert is pending (it fires after 10 min).
    assert!(s.daemon.terminate().success());
    eventually_blocking(
        LIMIT,
        || format!("KsmThrottlerUnavailable pending; alerts: {:?}", p.api("/api/v1/alerts")),
        || {
            p.api("/api/v1/alerts").is_ok_and(|a| {
                a["alerts"].as_array().is_some_and(|l| {
                    l.iter().any(|x| x["labels"]["alertname"] == "KsmThrottlerUnavailable" && x["state"] == "pending")
                })
            })
        },
    );
    // The alerts API shows each rule's last evaluation: read between two rules of one group, the
    // aggressive-for-a-day rule can still show the evaluation before the daemon stopped (seen in
    // CI once), so the list is awaited; anything else still there after LIMIT fails.
    let only_unavailable = || {
        p.api("/api/v1/alerts").is_ok_and(|a| {
            let names: Vec<&str> = a["alerts"]
                .as_array()
                .map(|l| l.iter().filter_map(|x| x["labels"]["alertname"].as_str()).collect())
                .unwrap_or_default();
            names == ["KsmThrottlerUnavailable"]
        })
    };
    eventually_blocking(
        LIMIT,
        || format!("nothing but KsmThrottlerUnavailable pending or firing; alerts: {:?}", p.api("/api/v1/alerts")),
        only_unavailable,
    );
}
