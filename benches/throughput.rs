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

use kata_ksm_throttler_test_support::scratch::Scratch;
use kata_ksm_throttler_test_support::{procfs, writes};

use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use kata_ksm_throttler::bus::private::{BusConfig, PrivateBus, PROJECT_POLICY};
use kata_ksm_throttler::names::{BUS_NAME, INTERFACE, OBJECT_PATH};
use kata_ksm_throttler_test_support::bench::Latencies;
use ksm_throttler_contract::proxy::KsmThrottlerProxy;
use rustix::process::{kill_process, Pid, Signal};
use serde_json::{json, Value};
use zbus::Connection;

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

// ---------------------------------------------------------------------------------------------
// The pieces: daemon process, latency figures, sysfs write counting (the scratch sysfs is the
// test-support crate's, on tmpfs like the tests').

/// The release daemon, ended by its PID when dropped.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn spawn(bus: &PrivateBus, scratch: &Scratch, extra: &[&str]) -> Result<Daemon> {
        Daemon::spawn_bin(daemon_bin(), bus, scratch, extra)
    }

    fn spawn_bin(bin: &str, bus: &PrivateBus, scratch: &Scratch, extra: &[&str]) -> Result<Daemon> {
        let log = scratch.dir.path().join("daemon.log");
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&log)?;
        let child = Command::new(bin)
            .arg("--bus")
            .arg(bus.address())
            .args(scratch.args())
            .args(extra)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {bin}"))?;
        Ok(Daemon { child, log })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, and the exit status within 10 s.
    fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        signal(self.pid(), Signal::TERM)?;
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            ensure!(start.elapsed() < Duration::from_secs(10), "daemon {} ignored SIGTERM", self.pid());
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn signal(pid: u32, sig: Signal) -> Result<()> {
    let pid = Pid::from_raw(pid as i32).ok_or_else(|| anyhow!("pid 0"))?;
    kill_process(pid, sig).with_context(|| format!("signalling {pid:?}"))
}

fn start_bus(service_dirs: Vec<PathBuf>) -> Result<PrivateBus> {
    PrivateBus::start(&BusConfig {
        policy_texts: vec![PROJECT_POLICY.into(), kata_ksm_throttler_test_support::bus::MANY_CONNECTIONS.into()],
        service_dirs,
        ..BusConfig::default()
    })
    .context("starting a private dbus-daemon")
}

async fn connect_bus(bus: &PrivateBus) -> Result<Connection> {
    Ok(zbus::connection::Builder::address(bus.address()).build().await?)
}

async fn wait_for_name(conn: &Connection, daemon: &Daemon) -> Result<()> {
    let dbus = zbus::fdo::DBusProxy::new(conn).await?;
    let start = Instant::now();
    while !dbus.name_has_owner(BUS_NAME.try_into()?).await? {
        ensure!(start.elapsed() < Duration::from_secs(10), "the daemon never took its name:\n{}", daemon.log_text());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

async fn kick(conn: &Connection) -> zbus::Result<()> {
    conn.call_method(Some(BUS_NAME), OBJECT_PATH, Some(INTERFACE), "Kick", &()).await.map(drop)
}

async fn proxy(conn: &Connection) -> Result<KsmThrottlerProxy<'static>> {
    Ok(KsmThrottlerProxy::builder(conn).cache_properties(zbus::proxy::CacheProperties::No).build().await?)
}

async fn kick_count(conn: &Connection) -> Result<u64> {
    Ok(proxy(conn).await?.kick_count().await?)
}

async fn current_setting(conn: &Connection) -> Result<String> {
    Ok(proxy(conn).await?.current_setting().await?)
}

fn us(d: Duration) -> u64 {
    d.as_micros() as u64
}

/// CPU time of the three processes of a phase, per call.
struct Cpu {
    pids: [(String, u32); 2],
    start: [u64; 3],
}

impl Cpu {
    fn start(daemon: u32, bus: u32) -> Result<Cpu> {
        Ok(Cpu {
            pids: [("daemon".into(), daemon), ("dbus-daemon".into(), bus)],
            start: [procfs::cpu_ns(daemon)?, procfs::cpu_ns(bus)?, procfs::cpu_ns(std::process::id())?],
        })
    }

    /// Microseconds of CPU per call in the daemon, the dbus-daemon and this client process.
    fn per_call(&self, calls: usize) -> Result<Value> {
        let now =
            [procfs::cpu_ns(self.pids[0].1)?, procfs::cpu_ns(self.pids[1].1)?, procfs::cpu_ns(std::process::id())?];
        let per = |i: usize| ((now[i] - self.start[i]) as f64 / calls.max(1) as f64 / 1000.0 * 10.0).round() / 10.0;
        Ok(json!({ "daemon_us": per(0), "dbus_daemon_us": per(1), "client_us": per(2) }))
    }
}

// ---------------------------------------------------------------------------------------------
// The phases.

/// `clients` connections, opened first, then kicking `each` times all at once.
async fn concurrent(bus: &PrivateBus, clients: usize, each: usize) -> Result<(Latencies, Duration)> {
    concurrent_calls(bus, clients, each, Call::Kick).await
}

/// What the many-clients phases call: the throttler's Kick, or the bus's own GetId (the floor).
#[derive(Debug, Clone, Copy)]
enum Call {
    Kick,
    GetId,
}

async fn get_id(conn: &Connection) -> zbus::Result<()> {
    conn.call_method(Some("org.freedesktop.DBus"), "/org/freedesktop/DBus", Some("org.freedesktop.DBus"), "GetId", &())
        .await
        .map(drop)
}

async fn concurrent_calls(bus: &PrivateBus, clients: usize, each: usize, call: Call) -> Result<(Latencies, Duration)> {
    let opened = Instant::now();
    let mut conns = Vec::with_capacity(clients);
    // In batches: the bus authenticates a bounded number of new connections at a time.
    for batch in (0..clients).collect::<Vec<_>>().chunks(64) {
        let mut set = tokio::task::JoinSet::new();
        for _ in batch {
            let address = bus.address().to_owned();
            set.spawn(async move { zbus::connection::Builder::address(address.as_str()).build().await });
        }
        while let Some(c) = set.join_next().await {
            conns.push(c??);
        }
    }
    let open_time = opened.elapsed();
    let gate = Arc::new(tokio::sync::Barrier::new(clients + 1));
    let mut set = tokio::task::JoinSet::new();
    for conn in conns {
        let gate = gate.clone();
        set.spawn(async move {
            let mut samples = Vec::with_capacity(each);
            gate.wait().await;
            for _ in 0..each {
                let t = Instant::now();
                match call {
                    Call::Kick => kick(&conn).await?,
                    Call::GetId => get_id(&conn).await?,
                }
                samples.push(t.elapsed());
            }
            drop(conn);
            Ok::<_, zbus::Error>(samples)
        });
    }
    gate.wait().await;
    let start = Instant::now();
    let mut all = Vec::with_capacity(clients * each);
    while let Some(r) = set.join_next().await {
        all.extend(r??);
    }
    Ok((Latencies::new(all, start.elapsed()), open_time))
}

/// Context switches of `pids` over `window`.
async fn wakeups(pids: &[u32], window: Duration) -> Result<Vec<procfs::Switches>> {
    let before: Vec<_> = pids.iter().map(|&p| procfs::context_switches(p)).collect::<Result<_, _>>()?;
    tokio::time::sleep(window).await;
    let after: Vec<_> = pids.iter().map(|&p| procfs::context_switches(p)).collect::<Result<_, _>>()?;
    Ok(after.iter().zip(&before).map(|(a, b)| a.since(*b)).collect())
}

fn footprint_json(f: procfs::Footprint) -> Value {
    json!({ "vm_rss_kib": f.vm_rss_kib, "vm_hwm_kib": f.vm_hwm_kib, "threads": f.threads })
}

/// Cold starts by D-Bus activation: from the first Kick on the unowned name to its reply.
async fn activation(plan: Plan) -> Result<Value> {
    let services = tempfile::Builder::new().prefix("ksm-bench-services-").tempdir()?;
    let bus = start_bus(vec![services.path().to_owned()])?;
    let scratch = Scratch::new()?;
    let mut exec =
        vec![daemon_bin().to_owned(), "--bus".into(), bus.address().split(",guid=").next().unwrap_or("").into()];
    exec.extend(scratch.args());
    let log = scratch.dir.path().join("daemon.log");
    // dbus-daemon runs Exec= without a shell; the log goes where dbus-daemon's stderr goes.
    std::fs::write(
        services.path().join(format!("{BUS_NAME}.service")),
        format!("[D-BUS Service]\nName={BUS_NAME}\nExec={}\nUser=root\n", exec.join(" ")),
    )?;
    std::fs::set_permissions(services.path(), std::fs::Permissions::from_mode(0o755))?;

    let conn = connect_bus(&bus).await?;
    let dbus = zbus::fdo::DBusProxy::new(&conn).await?;
    let mut samples = vec![];
    let mut started: Vec<u32> = vec![];
    let result = async {
        for _ in 0..plan.activations {
            ensure!(!dbus.name_has_owner(BUS_NAME.try_into()?).await?, "the name is still owned");
            let t = Instant::now();
            kick(&conn).await.context("the activating call")?;
            samples.push(t.elapsed());
            let pid = dbus.get_connection_unix_process_id(BUS_NAME.try_into()?).await?;
            started.push(pid);
            signal(pid, Signal::TERM)?;
            let gone = Instant::now();
            while dbus.name_has_owner(BUS_NAME.try_into()?).await? || Path::new(&format!("/proc/{pid}")).exists() {
                ensure!(gone.elapsed() < Duration::from_secs(10), "activated daemon {pid} did not exit");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            ensure!(scratch.knob("run") == "0\n", "the activated daemon did not restore on SIGTERM");
        }
        Ok(())
    }
    .await;
    // Whatever is still running is ended by its PID before the bus goes.
    for pid in started {
        if Path::new(&format!("/proc/{pid}")).exists() {
            let _ = signal(pid, Signal::KILL);
        }
    }
    if let Err(e) = result {
        return Err(e.context(std::fs::read_to_string(log).unwrap_or_default()));
    }
    let first = samples[0];
    let lat = Latencies::new(samples, Duration::from_secs(1));
    Ok(json!({
        "starts": lat.len(),
        "first_ms": ms(first),
        "p50_ms": ms(lat.quantile(0.5)),
        "max_ms": ms(lat.quantile(1.0)),
    }))
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

// ---------------------------------------------------------------------------------------------

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

/// The figures and targets, one line each.
fn table(v: &Value) -> String {
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
