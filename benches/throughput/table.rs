//! The throughput benchmark's table: the figures and targets, from its JSON.

use std::fmt::Write as _;

use serde_json::Value;

/// The figures and targets, one line each.
pub fn table(v: &Value) -> String {
    let n = |path: &str| v.pointer(path).and_then(Value::as_f64).unwrap_or(f64::NAN);
    let mib = |path: &str| n(path) / 1024.0;
    let mut s = String::new();
    let mut row = |what: &str, measured: String, target: &str| {
        let _ = writeln!(s, "| {what} | {measured} | {target} |");
    };
    row("figure", "measured".into(), "target");
    row("---", "---".into(), "---");
    let lat = |p: &str| {
        format!(
            "p50 {} µs, p99 {} µs, max {} µs, {} kicks/s",
            n(&format!("{p}/latency/p50_us")),
            n(&format!("{p}/latency/p99_us")),
            n(&format!("{p}/latency/max_us")),
            n(&format!("{p}/latency/per_sec"))
        )
    };
    row("Kick, 1 kept connection", lat("/kick_1_client"), "p99 ≤ 380 µs");
    row("Kick, 8 clients", lat("/kick_8_clients"), "≥ 16,000 kicks/s");
    row(
        &format!("Kick, {} clients × {}", n("/kick_many_clients/clients"), n("/kick_many_clients/each")),
        lat("/kick_many_clients"),
        "every call answered",
    );
    row(
        "  bus alone (GetId) / + daemon's D-Bus layer (Peer.Ping)",
        format!(
            "p50 {} / {} µs, p99 {} / {} µs",
            n("/bus_get_id/p50_us"),
            n("/daemon_peer_ping/p50_us"),
            n("/bus_get_id/p99_us"),
            n("/daemon_peer_ping/p99_us")
        ),
        "",
    );
    row(
        "  CPU per Kick, 1 client: daemon / dbus-daemon / client",
        format!(
            "{} / {} / {} µs",
            n("/kick_1_client/cpu_per_call/daemon_us"),
            n("/kick_1_client/cpu_per_call/dbus_daemon_us"),
            n("/kick_1_client/cpu_per_call/client_us")
        ),
        "",
    );
    row(
        "  CPU per Kick, 8 clients: daemon / dbus-daemon / client",
        format!(
            "{} / {} / {} µs",
            n("/kick_8_clients/cpu_per_call/daemon_us"),
            n("/kick_8_clients/cpu_per_call/dbus_daemon_us"),
            n("/kick_8_clients/cpu_per_call/client_us")
        ),
        "",
    );
    row(
        "sysfs writes by a storm of kicks",
        format!(
            "{} file writes over {} kicks; {} file writes ({} IN_MODIFY) over all {} kicks",
            n("/sysfs_writes/file_writes_in_storm"),
            n("/sysfs_writes/kicks_in_storm"),
            n("/sysfs_writes/file_writes"),
            n("/sysfs_writes/modify_events"),
            n("/sysfs_writes/kicks_total")
        ),
        "one transition (3 knob files)",
    );
    let fp = |p: &str| {
        format!(
            "RSS {:.2} MiB, HWM {:.2} MiB, {} threads",
            mib(&format!("{p}/vm_rss_kib")),
            mib(&format!("{p}/vm_hwm_kib")),
            n(&format!("{p}/threads"))
        )
    };
    row("daemon fresh", fp("/fresh"), "RSS ≤ 4 MiB");
    row("daemon after the storm", fp("/after_storm"), "growth ≤ 1 MiB");
    row("daemon after the many clients", fp("/after_many_clients"), "growth ≤ 1 MiB");
    row(
        &format!("wake-ups in {} s idle (initial)", n("/wakeups/window_s")),
        format!("{} ({} preempted)", n("/wakeups/idle_initial"), n("/wakeups/idle_initial_involuntary")),
        "0",
    );
    row(
        &format!(
            "wake-ups in {} s, one step due at {} s, next pending",
            n("/wakeups/window_s"),
            n("/wakeups/step_due_after_s")
        ),
        format!("{} ({} preempted)", n("/wakeups/step_pending"), n("/wakeups/step_pending_involuntary")),
        "0 idle; a few per scheduled wake-up",
    );
    row(
        "cold start by D-Bus activation to first reply",
        format!(
            "first {} ms, p50 {} ms, max {} ms ({} starts)",
            n("/activation/first_ms"),
            n("/activation/p50_ms"),
            n("/activation/max_ms"),
            n("/activation/starts")
        ),
        "≤ 50 ms",
    );
    for (key, what) in [("this", "this build"), ("before", "--before")] {
        let p = format!("/hot_path/{key}");
        if v.pointer(&p).is_none() {
            continue;
        }
        row(
            &format!("hot path, {what}: Kick / GetId, 1 client"),
            format!(
                "p50 {} / {} µs, p99 {} / {} µs (p99 {}×)",
                n(&format!("{p}/kick_1_client/p50_us")),
                n(&format!("{p}/get_id_1_client/p50_us")),
                n(&format!("{p}/kick_1_client/p99_us")),
                n(&format!("{p}/get_id_1_client/p99_us")),
                n(&format!("{p}/kick_p99_over_get_id_p99"))
            ),
            "p99 ≤ 1.8× GetId's",
        );
        row(
            &format!("hot path, {what}: Kick / GetId, 8 clients"),
            format!(
                "{} / {} calls/s ({}×); daemon CPU per Kick {} µs",
                n(&format!("{p}/kick_8_clients/per_sec")),
                n(&format!("{p}/get_id_8_clients/per_sec")),
                n(&format!("{p}/kick_8_per_sec_over_get_id_8")),
                n(&format!("{p}/kick_8_clients_cpu_per_call/daemon_us"))
            ),
            "≥ 0.65× GetId's",
        );
        row(&format!("hot path, {what}: fresh"), fp(&format!("{p}/fresh")), "RSS ≤ 4.3 MiB");
    }
    let _ = writeln!(
        s,
        "\nload average before: {}; after: {}",
        v["loadavg_before"].as_str().unwrap_or(""),
        v["loadavg_after"].as_str().unwrap_or("")
    );
    s
}
