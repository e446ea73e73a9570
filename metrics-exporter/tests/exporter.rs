//! The exporter binary in front of the real daemon on a private bus with the project's policy:
//! what it serves passes `promtool check metrics` and follows the throttler's properties, in
//! both text formats; a throttler that stops is `ksm_throttler_up 0` in a scrape that still
//! succeeds; systemd's socket activation (`systemd-socket-activate`); bad requests, and silent
//! clients holding every connection slot, leave it serving.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use kata_ksm_throttler_test_support::http::{free_port, get, request, Response};
use kata_ksm_throttler_test_support::prometheus::{promtool_check_metrics, sample, spawn_exporter};
use kata_ksm_throttler_test_support::*;

const EXPORTER: &str = env!("CARGO_BIN_EXE_kata-ksm-throttler-exporter");
const OPENMETRICS: &str = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5";

struct Exporter {
    process: Guarded,
    addr: SocketAddr,
}

impl Exporter {
    fn spawn(bus: &str, ksm: &Path, log: &Path, extra: &[&str]) -> Exporter {
        let (process, addr) = spawn_exporter(EXPORTER, bus, ksm, log, extra);
        Exporter { process, addr }
    }

    fn scrape(&self, accept: Option<&str>) -> Response {
        let headers: Vec<(&str, &str)> = accept.map(|a| ("Accept", a)).into_iter().collect();
        get(self.addr, "/metrics", &headers)
            .unwrap_or_else(|e| panic!("scraping: {e}; log:\n{}", self.process.log_text()))
    }
}

fn promtool_check(text: &[u8]) {
    let out = promtool_check_metrics(text);
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(text)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrapes_follow_the_throttler_in_both_formats_and_survive_it_stopping() {
    let mut s = setup(&[]).await;
    s.scratch.set("pages_sharing", "5120\n");
    s.scratch.set("full_scans", "3\n");
    let e = Exporter::spawn(s.bus.address(), &s.scratch.ksm(), &s.scratch.path().join("exporter.log"), &[]);

    let r = e.scrape(None);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("content-type"), Some("text/plain; version=0.0.4; charset=utf-8"));
    promtool_check(&r.body);
    let text = r.text();
    assert_eq!(sample(&text, "ksm_throttler_up"), Some(1.0), "{text}");
    assert_eq!(sample(&text, "ksm_throttler_setting{setting=\"initial\"}"), Some(1.0), "{text}");
    assert_eq!(sample(&text, "ksm_pages_sharing"), Some(5120.0), "{text}");

    s.proxy.kick().await.expect("kick");
    let r = e.scrape(Some(OPENMETRICS));
    assert_eq!(r.header("content-type"), Some("application/openmetrics-text; version=1.0.0; charset=utf-8"));
    let text = r.text();
    assert!(text.ends_with("# EOF\n"), "{text}");
    assert_eq!(sample(&text, "ksm_throttler_setting{setting=\"aggressive\"}"), Some(1.0), "{text}");
    assert_eq!(sample(&text, "ksm_throttler_setting{setting=\"initial\"}"), Some(0.0), "{text}");
    assert_eq!(sample(&text, "ksm_throttler_kicks_total"), Some(s.proxy.kick_count().await.expect("KickCount") as f64));
    assert_eq!(sample(&text, "ksm_full_scans_total"), Some(s.proxy.full_scans().await.expect("FullScans") as f64));
    assert_eq!(sample(&text, "ksm_pages_to_scan"), Some(s.proxy.pages_to_scan().await.expect("PagesToScan") as f64));
    assert!(
        text.contains("# TYPE ksm_throttler_kicks counter") && text.contains("# UNIT ksm_saved_bytes bytes"),
        "{text}"
    );

    let head = request(e.addr, "HEAD", "/metrics", &[], Duration::from_secs(10)).expect("HEAD");
    assert_eq!(head.status, 200);

    // The throttler stops (restoring the scratch): the scrape still succeeds and says so.
    assert!(s.daemon.terminate().success());
    let r = e.scrape(None);
    assert_eq!(r.status, 200);
    promtool_check(&r.body);
    let text = r.text();
    assert_eq!(sample(&text, "ksm_throttler_up"), Some(0.0), "{text}");
    assert_eq!(sample(&text, "ksm_throttler_bus_up"), Some(1.0), "{text}");
    assert_eq!(sample(&text, "ksm_run"), Some(0.0), "read from the restored sysfs: {text}");
    assert_eq!(sample(&text, "ksm_pages_sharing"), Some(5120.0), "{text}");

    // And it comes back: a new throttler on the same bus is found again.
    let daemon = Daemon::spawn(&s.bus, &s.scratch, &[]);
    wait_for_name(&s.conn, &daemon).await;
    let r = e.scrape(None);
    assert_eq!(sample(&r.text(), "ksm_throttler_up"), Some(1.0), "{}", r.text());
    assert_eq!(sample(&r.text(), "ksm_throttler_kicks_total"), Some(0.0), "a new throttler's count");
}

#[test]
fn socket_activation_serves_on_the_passed_socket() {
    let scratch = Scratch::with_counters();
    let bus = start_bus();
    let addr = free_port();
    let log = scratch.path().join("activate.log");
    let mut command = Command::new("systemd-socket-activate");
    // --listen names an address the exporter must not use: the passed socket wins.
    command
        .args(["-l", &addr.to_string(), EXPORTER, "--bus", bus.address(), "--listen", "127.0.0.1:1", "--sysfs-root"])
        .arg(scratch.ksm());
    let activator =
        Guarded::spawn_logged(&mut command, "systemd-socket-activate", &log).expect("systemd-socket-activate");
    let r = until_some(addr, &activator);
    assert_eq!(r.status, 200, "{r:?}");
    promtool_check(&r.body);
    assert_eq!(sample(&r.text(), "ksm_throttler_up"), Some(0.0), "no throttler on this bus");
    eventually_blocking(Duration::from_secs(5), "the exporter's log line", || {
        activator.log_text().contains("on the socket systemd passed")
    });
}

fn until_some(addr: SocketAddr, activator: &Guarded) -> Response {
    let mut last = None;
    let found =
        kata_ksm_throttler_test_support::eventually::until_some_blocking(Duration::from_secs(10), "a scrape", || {
            match get(addr, "/metrics", &[]) {
                Ok(r) => Some(r),
                Err(e) => {
                    last = Some(e.to_string());
                    None
                }
            }
        });
    found.unwrap_or_else(|e| panic!("{e}: {last:?}; log:\n{}", activator.log_text()))
}

#[test]
fn bad_requests_and_silent_clients_leave_it_serving() {
    let scratch = Scratch::with_counters();
    let bus = start_bus();
    let e = Exporter::spawn(
        bus.address(),
        &scratch.ksm(),
        &scratch.path().join("exporter.log"),
        &["--max-connections", "2"],
    );

    let mut garbage = TcpStream::connect(e.addr).expect("connect");
    garbage.write_all(b"\x16\x03\x01 not HTTP at all\r\n\r\n").expect("write");
    let mut answer = vec![];
    garbage.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let _ = garbage.read_to_end(&mut answer);
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 400"), "{:?}", String::from_utf8_lossy(&answer));

    assert_eq!(request(e.addr, "POST", "/metrics", &[], Duration::from_secs(10)).expect("POST").status, 405);
    assert_eq!(get(e.addr, "/other", &[]).expect("GET").status, 404);
    let huge = "x".repeat(64 * 1024);
    let r = get(e.addr, "/metrics", &[("X-Big", &huge)]).map(|r| r.status).unwrap_or(0);
    assert_ne!(r, 200, "headers over the limit are refused");

    // Two clients that connect and say nothing hold both slots: a scrape closes the older one
    // to make room (issue 30, item 6; it used to wait for the header time-out to free one).
    let mut silent: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(e.addr).expect("connect")).collect();
    std::thread::sleep(Duration::from_millis(200));
    let r = request(e.addr, "GET", "/metrics", &[], Duration::from_secs(30)).expect("answered");
    assert_eq!(r.status, 200);
    silent[0].set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut byte = [0u8; 1];
    assert_eq!(silent[0].read(&mut byte).expect("closed, not timed out"), 0, "the older silent one was closed");
    drop(silent);
    assert_eq!(e.scrape(None).status, 200);
    let mut process = e.process;
    assert!(process.is_running().expect("running"), "{}", process.log_text());
}
