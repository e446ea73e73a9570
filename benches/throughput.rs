//! The throughput, footprint and wake-up benchmark. It starts its own private `dbus-daemon`s and
//! the release daemon on scratch sysfs directories, drives them as the issue lists, prints a
//! table and writes the same figures as JSON.
//!
//!   cargo bench --bench throughput                       # the full run (about 2 minutes)
//!   cargo bench --bench throughput -- --smoke            # a few seconds, checks only correctness
//!   cargo bench --bench throughput -- --json FILE        # where the JSON goes (target/throughput.json)
//!   cargo bench --bench throughput -- --daemon BIN       # measure another build of the daemon
//!   cargo bench --bench throughput -- --clients N        # N clients in the many-clients phase
//!   cargo bench --bench throughput -- --hold 60s         # keep daemon A up after its phases
//!   cargo bench --bench throughput -- --before BIN       # the Kick hot path of BIN too, same run
//!
//! The gRPC shim has a benchmark of its own: `cargo bench -p kata-ksm-throttler-grpc --bench grpc`.
//!
//! Nothing here touches the real /sys/kernel/mm/ksm.

#[path = "throughput/pieces.rs"]
mod pieces;
#[path = "throughput/table.rs"]
mod table;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use kata_ksm_throttler::names::{BUS_NAME, OBJECT_PATH};
use kata_ksm_throttler_test_support::bench::Latencies;
use kata_ksm_throttler_test_support::scratch::Scratch;
use kata_ksm_throttler_test_support::{procfs, writes};
use serde_json::{json, Value};

use pieces::{
    activation, concurrent, concurrent_calls, connect_bus, current_setting, footprint_json, get_id, kick, kick_count,
    ms, start_bus, us, wait_for_name, wakeups, Call, Cpu, Daemon,
};
use table::table;

const DAEMON: &str = env!("CARGO_BIN_EXE_kata-ksm-throttler");

/// How much of everything: the counts, or a few seconds' worth for CI.
#[derive(Debug, Clone, Copy)]
struct Plan {
    smoke: bool,
    single: usize,
    eight_each: usize,
    many_clients: usize,
    many_each: usize,
    idle: Duration,
    pending_after: Duration,
    activations: usize,
}

impl Plan {
    const FULL: Plan = Plan {
        smoke: false,
        single: 20_000,
        eight_each: 10_000,
        many_clients: 1_000,
        many_each: 100,
        idle: Duration::from_secs(30),
        pending_after: Duration::from_secs(20),
        activations: 20,
    };
    const SMOKE: Plan = Plan {
        smoke: true,
        single: 2_000,
        eight_each: 500,
        many_clients: 100,
        many_each: 10,
        idle: Duration::from_secs(2),
        pending_after: Duration::from_secs(1),
        activations: 3,
    };
}

struct Options {
    plan: Plan,
    json: PathBuf,
    /// Keep daemon A running this long after its phases, to look at it (gdb, perf, smaps).
    hold: Duration,
    /// Another build whose Kick hot path is measured beside this one's, in the same run.
    before: Option<String>,
}

/// The daemon measured: the release build of this package, or another (`--daemon BIN`) to
/// compare builds.
static DAEMON_BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn daemon_bin() -> &'static str {
    DAEMON_BIN.get().map_or(DAEMON, String::as_str)
}

fn options() -> Result<Options> {
    let mut o =
        Options { plan: Plan::FULL, json: PathBuf::from("target/throughput.json"), hold: Duration::ZERO, before: None };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--smoke" => o.plan = Plan::SMOKE,
            "--json" => o.json = args.next().context("--json needs a file")?.into(),
            "--daemon" => {
                let bin = args.next().context("--daemon needs a binary")?;
                DAEMON_BIN.set(bin).map_err(|_| anyhow!("--daemon given twice"))?;
            }
            // cargo bench passes --bench to harness-less benches.
            "--hold" => o.hold = humantime::parse_duration(&args.next().context("--hold needs a duration")?)?,
            "--clients" => o.plan.many_clients = args.next().context("--clients needs a number")?.parse()?,
            "--before" => o.before = Some(args.next().context("--before needs a binary")?),
            "--bench" => {}
            other => {
                bail!("unknown argument {other:?} (--smoke, --json FILE, --daemon BIN, --before BIN, --clients N, --hold DURATION)")
            }
        }
    }
    Ok(o)
}

fn main() -> std::process::ExitCode {
    kata_ksm_throttler_test_support::bench::main("throughput", || async { run().await.map_err(|e| format!("{e:#}")) })
}

async fn run() -> Result<()> {
    let opts = options()?;
    let plan = opts.plan;
    let fd_limit = procfs::raise_fd_limit();
    ensure!(fd_limit as usize > plan.many_clients + 64, "open-file limit {fd_limit} is too low for the clients");
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut out = serde_json::Map::new();
    out.insert("smoke".into(), json!(plan.smoke));
    out.insert("daemon".into(), json!(daemon_bin()));
    out.insert("loadavg_before".into(), json!(load_before.trim()));
    out.insert("cpus".into(), json!(std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)));

    // Daemon A: the throughput and footprint subject; aggressive lasts through every phase.
    let bus_a = start_bus(vec![])?;
    let scratch_a = Scratch::new()?;
    let mut a = Daemon::spawn(&bus_a, &scratch_a, &["--aggressive-duration", "1h"])?;
    // Daemon B: kicked once, so one step is due inside the window and the next is pending.
    let bus_b = start_bus(vec![])?;
    let scratch_b = Scratch::new()?;
    let pending = humantime::format_duration(plan.pending_after).to_string();
    let mut b = Daemon::spawn(&bus_b, &scratch_b, &["--aggressive-duration", &pending])?;

    let conn_a = connect_bus(&bus_a).await?;
    wait_for_name(&conn_a, &a).await?;
    let conn_b = connect_bus(&bus_b).await?;
    wait_for_name(&conn_b, &b).await?;
    println!("daemon A pid {} (bus pid {}), daemon B pid {}", a.pid(), bus_a.pid(), b.pid());

    let fresh = procfs::footprint(a.pid())?;
    out.insert("fresh".into(), footprint_json(fresh));

    // Wake-ups: A idle in initial; B with one step due at `pending_after` and the next pending.
    kick(&conn_b).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let w = wakeups(&[a.pid(), b.pid()], plan.idle).await?;
    let b_setting = current_setting(&conn_b).await?;
    ensure!(b_setting == "standard", "daemon B should have stepped to standard once, shows {b_setting}");
    out.insert(
        "wakeups".into(),
        json!({
            "window_s": plan.idle.as_secs_f64(),
            // Every context switch counts, as the target has it; the split says which were the
            // daemon waking (voluntary) and which the scheduler preempting it (involuntary).
            "idle_initial": w[0].total(),
            "idle_initial_involuntary": w[0].involuntary,
            "step_pending": w[1].total(),
            "step_pending_involuntary": w[1].involuntary,
            "steps_in_window": 1,
            "step_due_after_s": plan.pending_after.as_secs_f64(),
        }),
    );
    let status = b.terminate()?;
    ensure!(status.success(), "daemon B exited {status:?}:\n{}", b.log_text());

    // The storm: every kick from here is watched for sysfs writes.
    let mut watch = writes::WriteWatch::new(&scratch_a.ksm()).context("inotify on the scratch sysfs")?;

    // One kept connection. The first kick moves to aggressive (sysfs writes, state file fsync).
    let t = Instant::now();
    kick(&conn_a).await?;
    let first_kick = t.elapsed();
    let cpu = Cpu::start(a.pid(), bus_a.pid())?;
    let single = Latencies::sequential(plan.single, || kick(&conn_a)).await?;
    out.insert("first_kick_us".into(), json!(us(first_kick)));
    out.insert("kick_1_client".into(), json!({ "latency": single.json(), "cpu_per_call": cpu.per_call(plan.single)? }));

    // Where the time goes: the bus alone (GetId, answered by dbus-daemon), the bus and the
    // daemon's D-Bus layer (Peer.Ping, answered by zbus), then the whole Kick.
    let get_id = Latencies::sequential(plan.single / 2, || async {
        conn_a
            .call_method(
                Some("org.freedesktop.DBus"),
                "/org/freedesktop/DBus",
                Some("org.freedesktop.DBus"),
                "GetId",
                &(),
            )
            .await
            .map(drop)
    })
    .await?;
    let ping = Latencies::sequential(plan.single / 2, || async {
        conn_a.call_method(Some(BUS_NAME), OBJECT_PATH, Some("org.freedesktop.DBus.Peer"), "Ping", &()).await.map(drop)
    })
    .await?;
    out.insert("bus_get_id".into(), get_id.json());
    out.insert("daemon_peer_ping".into(), ping.json());

    // Eight clients at once.
    let cpu = Cpu::start(a.pid(), bus_a.pid())?;
    let (eight, _) = concurrent(&bus_a, 8, plan.eight_each).await?;
    out.insert(
        "kick_8_clients".into(),
        json!({ "latency": eight.json(), "cpu_per_call": cpu.per_call(8 * plan.eight_each)? }),
    );

    let storm_kicks = kick_count(&conn_a).await?;
    let storm_writes = watch.writes()?.files_written();
    let after_storm = procfs::footprint(a.pid())?;
    out.insert("after_storm".into(), footprint_json(after_storm));

    // A thousand clients, each kicking a hundred times.
    let cpu = Cpu::start(a.pid(), bus_a.pid())?;
    let (many, open_time) = concurrent(&bus_a, plan.many_clients, plan.many_each).await?;
    let many_calls = plan.many_clients * plan.many_each;
    ensure!(many.len() == many_calls, "{} of {many_calls} calls answered", many.len());
    out.insert(
        "kick_many_clients".into(),
        json!({
            "clients": plan.many_clients,
            "each": plan.many_each,
            "connect_all_ms": ms(open_time),
            "latency": many.json(),
            "cpu_per_call": cpu.per_call(many_calls)?,
        }),
    );
    // Let the bus tell the daemon about a thousand departures, and the daemon trim its heap
    // (src/heap.rs) before looking at its memory: it checks every TRIM_AFTER_BURST for a whole
    // one without calls, so the trim comes at most two of them after the last call.
    tokio::time::sleep(2 * kata_ksm_throttler::io::heap::TRIM_AFTER_BURST + Duration::from_secs(1)).await;
    let total_kicks = kick_count(&conn_a).await?;
    let after_many = procfs::footprint(a.pid())?;
    out.insert("after_many_clients".into(), footprint_json(after_many));

    if !opts.hold.is_zero() {
        println!("holding daemon A (pid {}) for {}", a.pid(), humantime::format_duration(opts.hold));
        tokio::time::sleep(opts.hold).await;
    }
    let seen = watch.writes()?;
    ensure!(!seen.overflowed, "the inotify queue overflowed: the daemon wrote sysfs on (nearly) every kick");
    let (writes, modifies, per_file) = (seen.files_written(), seen.modify_events, seen.per_file.clone());
    let expected_total = 1 + plan.single + 8 * plan.eight_each + many_calls;
    ensure!(total_kicks as usize == expected_total, "KickCount {total_kicks}, expected {expected_total}");
    out.insert(
        "sysfs_writes".into(),
        json!({
            "kicks_in_storm": storm_kicks,
            "file_writes_in_storm": storm_writes,
            "kicks_total": total_kicks,
            "file_writes": writes,
            "modify_events": modifies,
            "per_file": per_file,
        }),
    );
    // Initial run=0 → aggressive: pages_to_scan, sleep_millisecs, then run=1; advisor already none.
    ensure!(
        per_file.values().all(|&n| n == 1) && writes == 3,
        "a storm of kicks must write sysfs once (one transition, 3 files), saw {per_file:?}"
    );
    let status = a.terminate()?;
    ensure!(status.success(), "daemon A exited {status:?}:\n{}", a.log_text());
    ensure!(scratch_a.knob("run") == "0\n" && scratch_a.knob("sleep_millisecs") == "20\n", "A did not restore");

    out.insert("activation".into(), activation(plan).await?);

    // The Kick hot path beside the bus's own round trip, for this build and (--before) another,
    // one after the other in this run.
    let mut hot = serde_json::Map::new();
    hot.insert("this".into(), hot_path(daemon_bin(), plan).await?);
    if let Some(before) = &opts.before {
        hot.insert("before".into(), hot_path(before, plan).await?);
        hot.insert("before_bin".into(), json!(before));
    }
    out.insert("hot_path".into(), Value::Object(hot));

    out.insert("loadavg_after".into(), json!(std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim()));
    let out = Value::Object(out);
    print!("{}", table(&out));
    if let Some(dir) = opts.json.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&opts.json, serde_json::to_string_pretty(&out)? + "\n")?;
    println!("JSON: {}", opts.json.display());
    Ok(())
}

/// Kick against GetId on one bus, 1 client then 8, and the fresh RSS, for daemon binary `bin`
/// (aggressive throughout: every Kick after the first changes nothing but the deadline).
async fn hot_path(bin: &str, plan: Plan) -> Result<Value> {
    let bus = start_bus(vec![])?;
    let scratch = Scratch::new()?;
    let mut d = Daemon::spawn_bin(bin, &bus, &scratch, &["--aggressive-duration", "1h"])?;
    let conn = connect_bus(&bus).await?;
    wait_for_name(&conn, &d).await?;
    let fresh = procfs::footprint(d.pid())?;
    kick(&conn).await?;
    let kick1 = Latencies::sequential(plan.single, || kick(&conn)).await?;
    let getid1 = Latencies::sequential(plan.single, || get_id(&conn)).await?;
    let cpu = Cpu::start(d.pid(), bus.pid())?;
    let (kick8, _) = concurrent_calls(&bus, 8, plan.eight_each, Call::Kick).await?;
    let kick8_cpu = cpu.per_call(8 * plan.eight_each)?;
    let (getid8, _) = concurrent_calls(&bus, 8, plan.eight_each, Call::GetId).await?;
    let status = d.terminate()?;
    ensure!(status.success(), "{bin} exited {status:?}:\n{}", d.log_text());
    let ratio = |a: f64, b: f64| (a / b * 100.0).round() / 100.0;
    Ok(json!({
        "fresh": footprint_json(fresh),
        "kick_1_client": kick1.json(),
        "get_id_1_client": getid1.json(),
        "kick_8_clients": kick8.json(),
        "kick_8_clients_cpu_per_call": kick8_cpu,
        "get_id_8_clients": getid8.json(),
        "kick_p99_over_get_id_p99": ratio(kick1.quantile(0.99).as_secs_f64(), getid1.quantile(0.99).as_secs_f64()),
        "kick_8_per_sec_over_get_id_8": ratio(kick8.per_sec(), getid8.per_sec()),
    }))
}
