//! ksmtctl, the operators' command line, against the real daemon on a private bus.

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use kata_ksm_throttler_test_support::*;
use rustix::process::Signal;

const CTL: &str = env!("CARGO_BIN_EXE_ksmtctl");

fn ctl(s: &Setup, args: &[&str]) -> Output {
    Command::new(CTL).arg("--bus").arg(s.bus.address()).args(args).stdin(Stdio::null()).output().expect("run ksmtctl")
}

fn stderr_line(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(err.trim().lines().count(), 1, "one line on stderr: {err:?}");
    err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_kick_and_set_mode() {
    let s = setup(&[]).await;
    let out = ctl(&s, &["status"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("mode:     throttle") && text.contains("setting:  initial"), "{text}");

    assert!(ctl(&s, &["kick"]).status.success());
    assert_eq!(s.proxy.current_setting().await.expect("get"), "aggressive");
    let out = ctl(&s, &["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("setting:  aggressive (next step in 30s)") || text.contains("(next step in 29s)"), "{text}");

    let out = ctl(&s, &["set-mode", "off"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(s.proxy.mode().await.expect("get"), "off");
    assert_eq!(s.scratch.knob("run"), "0\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_parses_and_matches_the_bus() {
    let s = setup(&[]).await;
    s.scratch.set("pages_sharing", "2560\n");
    s.proxy.set_mode("standard").await.expect("standard");
    let out = ctl(&s, &["status", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["mode"], "standard");
    assert_eq!(v["current_setting"], "standard");
    assert_eq!(v["sleep_millisecs"], 10);
    assert_eq!(v["run"], 1);
    assert_eq!(v["pages_to_scan"], expected(100, 10).1);
    assert_eq!(v["saved_bytes"], 2560 * kata_ksm_throttler::io::meminfo::page_size());
    assert_eq!(v["next_step_down_us"], 0);
}

/// Issue 14, item 8: a knob the throttler cannot read (zbus's GetAll then leaves it out) is shown
/// as unknown, never as 0 beside the setting, and `status` exits 1 saying which.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_knob_the_throttler_cannot_read_is_unknown_and_status_fails() {
    let s = setup(&[]).await;
    s.proxy.kick().await.expect("kick");
    std::fs::remove_file(s.scratch.ksm().join("pages_to_scan")).expect("rm");
    let out = ctl(&s, &["status"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("run=1 pages_to_scan=unknown sleep_millisecs=1"), "{text}");
    assert!(stderr_line(&out).contains("could not read pages_to_scan"), "{out:?}");
    let out = ctl(&s, &["status", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["unreadable"], serde_json::json!(["pages_to_scan"]));
    assert_eq!(v["pages_to_scan"], serde_json::Value::Null, "unknown, never a value: {v}");
    assert_eq!((&v["run"], &v["sleep_millisecs"]), (&serde_json::json!(1), &serde_json::json!(1)));
    s.scratch.set("pages_to_scan", "100\n");
    assert!(ctl(&s, &["status"]).status.success());
}

/// Issue 30, item 3: a directory in place of `pages_to_scan` (read fails with EISDIR) is `null`
/// in `status --json`, as JSON readers take a number for a value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_shows_an_unreadable_knob_as_null() {
    let s = setup(&[]).await;
    let knob = s.scratch.ksm().join("pages_to_scan");
    std::fs::remove_file(&knob).expect("rm");
    std::fs::create_dir(&knob).expect("a directory in its place");
    let out = ctl(&s, &["status", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["pages_to_scan"], serde_json::Value::Null, "{v}");
    assert_eq!(v["unreadable"], serde_json::json!(["pages_to_scan"]), "{v}");
    assert_eq!(v["sleep_millisecs"], 20, "{v}");
    std::fs::remove_dir(&knob).expect("rmdir");
    s.scratch.set("pages_to_scan", "100\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_one_line_with_documented_exit_codes() {
    let s = setup(&[]).await;
    let out = ctl(&s, &["set-mode", "warp"]);
    assert_eq!(out.status.code(), Some(5), "invalid mode");
    assert!(stderr_line(&out).contains("valid modes"));

    // Not root, and no polkit on this bus: denied (fail closed).
    let out = Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", CTL, "--bus", s.bus.address(), "set-mode", "off"])
        .stdin(Stdio::null())
        .output()
        .expect("run as nobody");
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert!(stderr_line(&out).contains("access denied"));
    assert_eq!(s.proxy.mode().await.expect("get"), "throttle", "nothing changed");

    // A bus without the throttler.
    let empty = start_bus();
    let out = Command::new(CTL).args(["--bus", empty.address(), "kick"]).output().expect("run");
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(stderr_line(&out).contains("not running"));

    // No bus at all.
    let out = Command::new(CTL).args(["--bus", "unix:path=/nonexistent/bus", "status"]).output().expect("run");
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    stderr_line(&out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_prints_each_change_and_stops_cleanly_on_ctrl_c() {
    let s = setup(&[]).await;
    let mut child = Command::new(CTL)
        .args(["--bus", s.bus.address(), "watch", "--json", "--interval", "200ms"])
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn watch");
    let stdout = child.stdout.take().expect("stdout");
    let mut child = Guarded::new(child, "ksmtctl watch");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let next = |what: &str| -> serde_json::Value {
        let start = Instant::now();
        loop {
            let line = rx.recv_timeout(Duration::from_secs(5)).unwrap_or_else(|_| panic!("no {what} line within 5 s"));
            let v: serde_json::Value = serde_json::from_str(&line).expect("each line is JSON");
            assert!(v["time"].as_str().is_some_and(|t| t.ends_with('Z')), "timestamped: {line}");
            if v["event"] == what {
                return v;
            }
            assert!(start.elapsed() < Duration::from_secs(5));
        }
    };
    // The first stats line proves the watcher is subscribed and reading.
    let stats = next("stats");
    assert_eq!(stats["status"]["current_setting"], "initial");
    s.proxy.kick().await.expect("kick");
    let changed = next("changed");
    assert_eq!(changed["properties"]["CurrentSetting"], "aggressive", "{changed}");
    assert!(changed["properties"]["NextStepDown"].as_u64().is_some_and(|n| n > 0), "{changed}");
    let stats = next("stats");
    assert_eq!(stats["status"]["sleep_millisecs"], 1);

    child.signal(Signal::INT).expect("SIGINT");
    let status = child.wait_within(Duration::from_secs(10)).expect("watch stops on Ctrl-C");
    assert!(status.success(), "Ctrl-C is a clean stop: {status:?}");
}
