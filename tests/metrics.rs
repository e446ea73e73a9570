//! `ksmtctl metrics` against the real daemon on a private bus with the project's policy: read as
//! `nobody` (the properties are public), checked by the real `promtool check metrics`, the
//! values those of the throttler's properties; a throttler not running is a metric and is never
//! started by D-Bus activation; no bus at all is a metric too.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use kata_ksm_throttler::bus::private::BusConfig;
use kata_ksm_throttler_test_support::bus::has_owner;
use kata_ksm_throttler_test_support::prometheus::{promtool_check_metrics as promtool_check, sample};
use kata_ksm_throttler_test_support::*;

const CTL: &str = env!("CARGO_BIN_EXE_ksmtctl");

/// Lets `nobody` read the scratch sysfs, as anyone may read /sys/kernel/mm/ksm.
fn world_readable(dir: &Path) {
    for d in [dir.to_owned(), dir.join("ksm")] {
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
}

fn as_nobody(bus: &str, args: &[&str]) -> Output {
    Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", CTL, "--bus", bus, "metrics"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("ksmtctl as nobody")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_of_a_running_throttler_read_by_nobody_pass_promtool() {
    let s = setup(&[]).await;
    world_readable(s.scratch.path());
    for (file, value) in [
        ("pages_sharing", "2560\n"),
        ("pages_shared", "40\n"),
        ("full_scans", "7\n"),
        ("pages_scanned", "123456\n"),
        ("general_profit", "-4096\n"),
    ] {
        s.scratch.set(file, value);
    }
    s.proxy.kick().await.expect("kick");
    s.proxy.kick().await.expect("kick");
    let ksm = s.scratch.ksm().display().to_string();

    let out = as_nobody(s.bus.address(), &["--sysfs-root", &ksm]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout.clone()).expect("UTF-8");
    let check = promtool_check(&out.stdout);
    assert!(
        check.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );

    let p = &s.proxy;
    let want = [
        ("ksm_throttler_bus_up", 1.0),
        ("ksm_throttler_up", 1.0),
        ("ksm_throttler_setting{setting=\"aggressive\"}", 1.0),
        ("ksm_throttler_setting{setting=\"initial\"}", 0.0),
        ("ksm_throttler_mode{mode=\"throttle\"}", 1.0),
        ("ksm_throttler_kicks_total", p.kick_count().await.expect("KickCount") as f64),
        ("ksm_pages_sharing", p.pages_sharing().await.expect("PagesSharing") as f64),
        ("ksm_pages_shared", p.pages_shared().await.expect("PagesShared") as f64),
        ("ksm_full_scans_total", p.full_scans().await.expect("FullScans") as f64),
        ("ksm_general_profit_bytes", p.general_profit().await.expect("GeneralProfit") as f64),
        ("ksm_saved_bytes", p.saved_bytes().await.expect("SavedBytes") as f64),
        ("ksm_pages_to_scan", p.pages_to_scan().await.expect("PagesToScan") as f64),
        ("ksm_sleep_seconds", p.sleep_millisecs().await.expect("SleepMillisecs") as f64 / 1000.0),
        ("ksm_run", 1.0),
        ("ksm_pages_scanned_total", 123456.0),
        ("ksm_smart_scan", 1.0),
        ("ksm_advisor_mode{mode=\"none\"}", 1.0),
        ("ksm_sysfs_file_present{file=\"pages_scanned\"}", 1.0),
        ("ksm_sysfs_file_present{file=\"use_zero_pages\"}", 0.0),
        ("ksm_throttler_property_present{property=\"KickCount\"}", 1.0),
        ("ksm_throttler_transitions_total{cause=\"kick\"}", 1.0),
        ("ksm_throttler_transitions_total{cause=\"timer\"}", 0.0),
        ("ksm_throttler_transitions_total{cause=\"merging-stalled\"}", 0.0),
    ];
    for (series, value) in want {
        assert_eq!(sample(&text, series), Some(value), "{series} in:\n{text}");
    }
    assert_eq!(sample(&text, "ksm_throttler_kicks_total"), Some(2.0));
    for (cause, n) in p.transition_counts().await.expect("TransitionCounts") {
        let series = format!("ksm_throttler_transitions_total{{cause=\"{cause}\"}}");
        assert_eq!(sample(&text, &series), Some(n as f64), "{series} in:\n{text}");
    }
    let next = sample(&text, "ksm_throttler_next_step_down_timestamp_seconds").expect("next step");
    assert_eq!(next, p.next_step_down().await.expect("NextStepDown") as f64 / 1e6);
    assert!(text.contains("# HELP ksm_throttler_up "), "help text:\n{text}");
    assert!(sample(&text, "ksm_use_zero_pages").is_none(), "a missing file has no metric");

    // --output: the same text, written whole.
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("kata-ksm-throttler.prom");
    let out = Command::new(CTL)
        .args(["--bus", s.bus.address(), "metrics", "--sysfs-root", &ksm, "--output"])
        .arg(&file)
        .output()
        .expect("ksmtctl");
    assert!(out.status.success() && out.stdout.is_empty(), "{out:?}");
    let written = std::fs::read(&file).expect("the file");
    assert!(promtool_check(&written).status.success());
    assert_eq!(sample(&String::from_utf8_lossy(&written), "ksm_throttler_kicks_total"), Some(2.0));
    assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 1, "no temporary file left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttler_not_running_is_a_metric_and_is_never_activated() {
    // The bus would start the throttler on the first call: its activation file runs a command
    // that leaves a mark.
    let services = tempfile::tempdir().expect("tempdir");
    let mark = services.path().join("activated");
    let shipped = std::fs::read_to_string(bus::project_file("dbus/org.kata.KsmThrottler.service")).expect("read");
    let exec = format!("Exec=/usr/bin/touch {}", mark.display());
    let copy: String =
        shipped.lines().map(|l| if l.starts_with("Exec=") { exec.clone() } else { l.to_owned() } + "\n").collect();
    std::fs::write(services.path().join("org.kata.KsmThrottler.service"), copy).expect("write .service");
    let bus = start_bus_with(BusConfig { service_dirs: vec![services.path().to_owned()], ..BusConfig::default() });
    let scratch = Scratch::with_counters();
    world_readable(scratch.path());
    scratch.set("pages_sharing", "99\n");

    let out = as_nobody(bus.address(), &["--sysfs-root", &scratch.ksm().display().to_string()]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout.clone()).expect("UTF-8");
    assert!(promtool_check(&out.stdout).status.success(), "{text}");
    assert_eq!(sample(&text, "ksm_throttler_bus_up"), Some(1.0), "{text}");
    assert_eq!(sample(&text, "ksm_throttler_up"), Some(0.0), "{text}");
    assert_eq!(sample(&text, "ksm_throttler_activatable"), Some(1.0), "{text}");
    assert_eq!(sample(&text, "ksm_pages_sharing"), Some(99.0), "the kernel's figures from sysfs: {text}");
    assert!(!text.contains("ksm_throttler_setting"), "nothing is said of a setting nobody knows");
    let conn = connect(&bus).await;
    assert!(!has_owner(&conn, kata_ksm_throttler::names::BUS_NAME).await);
    assert!(!mark.exists(), "the scrape activated the throttler; bus log:\n{}", bus.log_text());
    // The control: a plain call does activate it (and waits for a reply the mark never gives).
    let call = tokio::spawn(async move {
        let _ = conn
            .call_method(
                Some("org.kata.KsmThrottler"),
                "/org/kata/KsmThrottler",
                Some("org.freedesktop.DBus.Peer"),
                "Ping",
                &(),
            )
            .await;
    });
    eventually(bus::STARTUP_LIMIT, "the activation mark of a plain call", async || mark.exists()).await;
    call.abort();
}

#[test]
fn no_bus_is_a_metric_and_exit_0() {
    let scratch = Scratch::with_counters();
    let out = Command::new(CTL)
        .args(["--bus", "unix:path=/nonexistent/bus", "metrics", "--sysfs-root", &scratch.ksm().display().to_string()])
        .output()
        .expect("ksmtctl");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(sample(&text, "ksm_throttler_bus_up"), Some(0.0), "{text}");
    assert_eq!(sample(&text, "ksm_throttler_up"), Some(0.0), "{text}");
    assert_eq!(sample(&text, "ksm_full_scans_total"), Some(0.0), "{text}");

    let out = Command::new(CTL).args(["metrics", "--output", "/nonexistent/dir/ksm.prom"]).output().expect("ksmtctl");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.trim().lines().count() == 1 && err.contains("/nonexistent/dir/ksm.prom"), "{err}");
}

/// The textfile timer's service runs exactly this command: it writes where node_exporter's
/// textfile collector reads (Debian's folder), which is the one folder the unit may write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_textfile_unit_s_command_writes_a_file_promtool_accepts() {
    let unit =
        std::fs::read_to_string(bus::project_file("systemd/kata-ksm-throttler-metrics.service")).expect("the unit");
    let exec = unit.lines().find_map(|l| l.strip_prefix("ExecStart=")).expect("ExecStart=");
    let argv: Vec<&str> = exec.split_whitespace().collect();
    assert_eq!(argv[..3], ["/usr/bin/ksmtctl", "metrics", "--output"], "{exec}");
    let target = Path::new(argv[3]);
    assert_eq!(target.parent(), Some(Path::new("/var/lib/prometheus/node-exporter")), "Debian's textfile folder");
    assert!(target.extension().is_some_and(|e| e == "prom"), "the collector reads *.prom only");
    let writable = unit.lines().find_map(|l| l.strip_prefix("ReadWritePaths=")).expect("ReadWritePaths=");
    assert_eq!(Path::new(writable), target.parent().expect("folder"));

    let s = setup(&[]).await;
    s.proxy.kick().await.expect("kick");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join(target.file_name().expect("name"));
    let out = Command::new(CTL)
        .args(&argv[1..3])
        .arg(&file)
        .args(&argv[4..])
        .args(["--bus", s.bus.address(), "--sysfs-root", &s.scratch.ksm().display().to_string()])
        .output()
        .expect("ksmtctl");
    assert!(out.status.success(), "{out:?}");
    let text = std::fs::read(&file).expect("written");
    assert!(promtool_check(&text).status.success(), "{}", String::from_utf8_lossy(&text));
    assert_eq!(sample(&String::from_utf8_lossy(&text), "ksm_throttler_setting{setting=\"aggressive\"}"), Some(1.0));
}

/// Per sandbox, for a caller the throttler lets inspect (root, as the metrics timer runs): the
/// series are the Inspect report's figures; a caller it does not (here `nobody`, with no
/// polkit on this bus) gets `ksm_sandbox_metrics_available 0` and no sandbox series.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_gets_the_savings_per_sandbox_and_nobody_is_told_they_are_unavailable() {
    use kata_ksm_throttler_test_support::fakeproc::{ksm_stat, smaps_entry, FakeProc};
    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const MIB: u64 = 1 << 20;
    let proc = FakeProc::new();
    let runs = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(runs.path().join("vc/sbs").join(ID)).expect("sandbox folder");
    let config = runs.path().join("config.toml");
    let toml = format!("[trigger]\nvc-root = \"{}\"\nkata-root = \"\"\n", runs.path().join("vc").display());
    std::fs::write(&config, toml).expect("config");
    let name = format!("sandbox-{ID}");
    let ram = smaps_entry(0x7f00_0000_0000, 256 * MIB, "rw-p", "ac mg", "");
    proc.add(
        100,
        "qemu-system-x86",
        &["qemu-system-x86_64", "-name", &name],
        Some(&ksm_stat(1000, 24, 3_000_000, true)),
        &ram,
    );
    let (config, root) = (config.display().to_string(), proc.path().display().to_string());
    let s = setup(&["--config", &config, "--proc-root", &root]).await;
    world_readable(s.scratch.path());
    let ksm = s.scratch.ksm().display().to_string();

    let out =
        Command::new(CTL).args(["--bus", s.bus.address(), "metrics", "--sysfs-root", &ksm]).output().expect("ksmtctl");
    assert!(out.status.success(), "{out:?}");
    assert!(promtool_check(&out.stdout).status.success());
    let text = String::from_utf8(out.stdout).expect("UTF-8");
    let report = ksm_throttler_contract::metrics::gather_sandboxes(&s.conn).await.expect("the report");
    let row = report.sandboxes.iter().find(|r| r.id == ID).expect("the sandbox row");
    let labels = format!("{{sandbox=\"{ID}\",vmm=\"qemu\"}}");
    assert_eq!(sample(&text, "ksm_sandbox_metrics_available"), Some(1.0), "{text}");
    assert_eq!(sample(&text, &format!("ksm_sandbox_saved_bytes{labels}")), Some(row.saved_bytes as f64), "{text}");
    assert_eq!(sample(&text, &format!("ksm_sandbox_profit_bytes{labels}")), Some(row.profit_bytes as f64), "{text}");
    assert_eq!(sample(&text, &format!("ksm_sandbox_mergeable_bytes{labels}")), Some(row.mergeable_bytes as f64));
    assert_eq!(row.saved_bytes, (1000 + 24) * ksm_throttler_contract::metrics::page_size(), "ksm_stat's pages");
    let ram_series = format!("ksm_sandbox_guest_ram_bytes{{sandbox=\"{ID}\",vmm=\"qemu\",guest_ram=\"mergeable\"}}");
    assert_eq!(sample(&text, &ram_series), Some((256 * MIB) as f64), "{text}");
    assert_eq!(sample(&text, "ksm_sandboxes"), Some(1.0));
    // The need gate's state is a state set of the property's value.
    assert_eq!(sample(&text, "ksm_throttler_need{need=\"not-gated\"}"), Some(1.0), "{text}");

    let out = as_nobody(s.bus.address(), &["--sysfs-root", &ksm]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).expect("UTF-8");
    assert_eq!(sample(&text, "ksm_sandbox_metrics_available"), Some(0.0), "{text}");
    assert!(!text.contains("ksm_sandbox_saved_bytes{"), "no sandbox series for nobody:\n{text}");
}
