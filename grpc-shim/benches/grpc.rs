//! The gRPC shim's benchmark: the release shim in front of the release daemon, on a private
//! `dbus-daemon` and a scratch sysfs directory, driven by the tonic client of the shim's tests
//! (the code generated from `proto/ksm.proto`) on its Unix socket. It prints a table and writes
//! the same figures as JSON.
//!
//!   cargo bench -p kata-ksm-throttler-grpc --bench grpc                    # the full run (~15 s)
//!   cargo bench -p kata-ksm-throttler-grpc --bench grpc -- --smoke         # a few seconds, for CI
//!   cargo bench -p kata-ksm-throttler-grpc --bench grpc -- --json FILE     # where the JSON goes
//!                                                                          # (<target>/grpc.json)
//!   cargo bench -p kata-ksm-throttler-grpc --bench grpc -- --against SOCKET
//!       # also another ksm.KSMThrottler server on SOCKET (the original Go daemon, say), with the
//!       # same client, its kicks interleaved with the shim's
//!
//! Kicks over a kept connection are timed in rounds that take turns: the shim, the bare D-Bus
//! call it makes (the same daemon, no gRPC: what the shim cannot be faster than), a `Peer.Ping`
//! to the daemon (the bus hop alone), the installed path (a second daemon, on a bus of its own,
//! started by `systemd-socket-activate` on its socket named `grpc` with the command line of
//! `systemd/kata-ksm-throttler.service`, as the shipped socket unit starts it), and the
//! `--against` server; so a busy moment of the machine falls on all of them alike.
//!
//! The daemon is built as the shim's tests build it (the test-support crate: the same cargo,
//! target folder and profile), or taken from `KSM_THROTTLER_DAEMON`. Nothing here touches the
//! real /sys/kernel/mm/ksm.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use kata_ksm_throttler::bus::private::{BusConfig, PrivateBus, PROJECT_POLICY};
use kata_ksm_throttler_grpc::proto::ksm_throttler_client::KsmThrottlerClient;
use kata_ksm_throttler_test_support::bench::Latencies;
use kata_ksm_throttler_test_support::eventually::until_some;
use kata_ksm_throttler_test_support::{procfs, try_daemon_binary, Daemon, Scratch};
use ksm_throttler_contract::names::{BUS_NAME, OBJECT_PATH};
use ksm_throttler_contract::proxy::KsmThrottlerProxy;
use serde_json::{json, Value};
use tokio::net::UnixStream;
use tonic::transport::Channel;

const SHIM: &str = env!("CARGO_BIN_EXE_kata-ksm-throttler-grpc");

/// How many calls: the figures of docs/performance.md, or a few seconds' worth for CI.
#[derive(Debug, Clone, Copy)]
struct Plan {
    smoke: bool,
    /// Kicks over one kept connection (and as many on the bus, and to `--against`).
    kept: usize,
    /// Kicks per turn when the kept-connection figures take turns.
    round: usize,
    /// Kicks each on a connection of its own.
    new_connection: usize,
}

impl Plan {
    const FULL: Plan = Plan { smoke: false, kept: 20_000, round: 500, new_connection: 2_000 };
    const SMOKE: Plan = Plan { smoke: true, kept: 2_000, round: 500, new_connection: 200 };
}

struct Options {
    plan: Plan,
    json: PathBuf,
    against: Option<PathBuf>,
}

fn options() -> Result<Options> {
    let mut plan = Plan::FULL;
    let mut json = None;
    let mut against = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--smoke" => plan = Plan::SMOKE,
            "--json" => json = Some(PathBuf::from(args.next().context("--json needs a file")?)),
            "--against" => against = Some(PathBuf::from(args.next().context("--against needs a Unix socket")?)),
            // cargo bench passes --bench to harness-less benches.
            "--bench" => {}
            other => bail!("unknown argument {other:?} (--smoke, --json FILE, --against SOCKET)"),
        }
    }
    let json = match json {
        Some(path) => path,
        // The bench runs as <target>/<profile>/deps/grpc-<hash>, from the shim's folder.
        None => {
            let exe = std::env::current_exe().context("the benchmark's executable")?;
            let target = exe.ancestors().nth(3).with_context(|| format!("no target folder above {}", exe.display()))?;
            target.join("grpc.json")
        }
    };
    Ok(Options { plan, json, against })
}

fn main() -> std::process::ExitCode {
    kata_ksm_throttler_test_support::bench::main("grpc bench", || async { run().await.map_err(|e| format!("{e:#}")) })
}

// ---------------------------------------------------------------------------------------------
// The pieces: the shim process, the client, latency figures.

/// The shim binary, ended by its PID when dropped.
struct Shim {
    child: Child,
    log: PathBuf,
}

impl Shim {
    fn serve(bus: &PrivateBus, socket: &Path, log: PathBuf) -> Result<Shim> {
        let file = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new(SHIM)
            .arg("--bus")
            .arg(bus.address())
            .arg("--uri")
            .arg(socket)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {SHIM}"))?;
        let mut shim = Shim { child, log };
        // Until a connection to the socket is accepted.
        let start = Instant::now();
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            if let Some(status) = shim.child.try_wait()? {
                bail!("the shim exited {status} before serving; log:\n{}", shim.log_text());
            }
            ensure!(start.elapsed() < Duration::from_secs(10), "no socket after 10 s; log:\n{}", shim.log_text());
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(shim)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Shim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The daemon as installed: `systemd-socket-activate` listens on `socket` (its descriptor named
/// `grpc`, as `kata-ksm-throttler-grpc.socket` names it) and execs the daemon with the shipped
/// unit's flags on the first connection; ended by its PID when dropped.
struct Installed {
    child: Child,
    log: PathBuf,
    socket: PathBuf,
    /// The unit's flags, as read from the unit file.
    flags: Vec<String>,
    _scratch: Scratch,
    _bus: PrivateBus,
}

/// The flags of `systemd/kata-ksm-throttler.service`'s ExecStart= (after the binary).
fn unit_flags() -> Result<Vec<String>> {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/kata-ksm-throttler.service");
    let text = std::fs::read_to_string(&unit).with_context(|| format!("reading {}", unit.display()))?;
    let exec = text.lines().find_map(|l| l.strip_prefix("ExecStart=")).context("no ExecStart= in the unit")?;
    Ok(exec.split_whitespace().skip(1).map(str::to_owned).collect())
}

impl Installed {
    fn start() -> Result<Installed> {
        let bus = PrivateBus::start(&BusConfig { policy_texts: vec![PROJECT_POLICY.into()], ..BusConfig::default() })
            .context("starting a private dbus-daemon")?;
        let scratch = Scratch::new().context("making the scratch sysfs")?;
        let socket = scratch.path().join("installed.sock");
        let log = scratch.path().join("installed.log");
        let file = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let flags = unit_flags()?;
        let child = Command::new("systemd-socket-activate")
            .arg("--listen")
            .arg(&socket)
            .arg("--fdname=grpc")
            .arg("--")
            .arg(try_daemon_binary().map_err(anyhow::Error::msg)?)
            .args(&flags)
            .arg("--bus")
            .arg(bus.address())
            .args(scratch.args())
            .args(["--aggressive-duration", "1h"])
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .context("starting systemd-socket-activate")?;
        let installed = Installed { child, log, socket, flags, _scratch: scratch, _bus: bus };
        let start = Instant::now();
        while !installed.log_text().contains("Listening on") {
            ensure!(start.elapsed() < Duration::from_secs(10), "not listening; log:\n{}", installed.log_text());
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(installed)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        // SIGTERM first (it restores), then reaped.
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tonic client on the Unix socket, plain HTTP/2, as in `tests/grpc.rs`.
async fn client(socket: &Path) -> Result<KsmThrottlerClient<Channel>> {
    let path = socket.to_owned();
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .with_context(|| format!("connecting to {}", socket.display()))?;
    Ok(KsmThrottlerClient::new(channel))
}

async fn kick(client: &mut KsmThrottlerClient<Channel>) -> Result<()> {
    client.kick(()).await.context("Kick over gRPC")?;
    Ok(())
}

fn footprint_json(f: procfs::Footprint) -> Value {
    json!({ "vm_rss_kib": f.vm_rss_kib, "vm_hwm_kib": f.vm_hwm_kib, "threads": f.threads })
}

// ---------------------------------------------------------------------------------------------

async fn run() -> Result<()> {
    let opts = options()?;
    let plan = opts.plan;
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();

    let bus = PrivateBus::start(&BusConfig { policy_texts: vec![PROJECT_POLICY.into()], ..BusConfig::default() })
        .context("starting a private dbus-daemon")?;
    let scratch = Scratch::new().context("making the scratch sysfs")?;
    // Aggressive lasts through every phase (one transition, on the first kick); no host config.
    // The daemon serves gRPC itself too, beside the shim.
    let direct = scratch.path().join("daemon.sock");
    let direct_arg = direct.to_str().context("a UTF-8 scratch path")?;
    let daemon = Daemon::try_spawn(&bus, &scratch, &["--aggressive-duration", "1h", "--grpc-uri", direct_arg])
        .map_err(anyhow::Error::msg)?;
    let conn = zbus::connection::Builder::address(bus.address()).build().await.context("connecting to the bus")?;
    let dbus = zbus::fdo::DBusProxy::new(&conn).await.context("the bus's own proxy")?;
    let owned = async || dbus.name_has_owner(BUS_NAME.try_into().ok()?).await.ok().filter(|&yes| yes);
    until_some(Duration::from_secs(20), "the daemon to take its name", owned)
        .await
        .map_err(|e| anyhow::anyhow!("{e}; log:\n{}", daemon.log_text()))?;
    let daemon_bin = try_daemon_binary().map_err(anyhow::Error::msg)?;

    let socket = scratch.path().join("ksm.sock");
    let shim = Shim::serve(&bus, &socket, scratch.path().join("shim.log"))?;
    let installed = Installed::start()?;
    println!("daemon pid {} (bus pid {}), shim pid {}", daemon.pid(), bus.pid(), shim.pid());
    let fresh = procfs::footprint(shim.pid()).context("the shim's footprint")?;

    let proxy = KsmThrottlerProxy::builder(&conn).cache_properties(zbus::proxy::CacheProperties::No).build().await?;
    let measured = async {
        // The first kick moves to aggressive (sysfs writes, the state file's fsync): not timed.
        let kept = client(&socket).await?;
        kick(&mut kept.clone()).await.context("the first kick")?;
        let direct = client(&direct).await?;
        kick(&mut direct.clone()).await.context("the first kick on the daemon's own socket")?;
        // The first connection starts the installed daemon; its first kick is its transition.
        let started = Instant::now();
        let as_installed = client(&installed.socket).await?;
        kick(&mut as_installed.clone()).await.context("the first kick on the installed socket")?;
        let installed_first = started.elapsed();
        let against = match &opts.against {
            Some(path) => {
                let other = client(path).await?;
                kick(&mut other.clone()).await.with_context(|| format!("the first kick to {}", path.display()))?;
                Some(other)
            }
            None => None,
        };
        let peer = zbus::fdo::PeerProxy::builder(&conn)
            .destination(BUS_NAME)
            .path(OBJECT_PATH)
            .build()
            .await
            .context("a Peer proxy")?;
        let (mut shim_parts, mut direct_parts, mut bus_parts, mut ping_parts, mut against_parts) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut installed_parts = Vec::new();
        let mut done = 0;
        while done < plan.kept {
            let n = plan.round.min(plan.kept - done);
            let over = |c: &KsmThrottlerClient<Channel>| {
                let mut c = c.clone();
                async move { kick(&mut c).await }
            };
            shim_parts.push(Latencies::sequential(n, || over(&kept)).await.context("kicks over a kept connection")?);
            direct_parts
                .push(Latencies::sequential(n, || over(&direct)).await.context("kicks on the daemon's own socket")?);
            installed_parts
                .push(Latencies::sequential(n, || over(&as_installed)).await.context("kicks on the installed socket")?);
            bus_parts.push(
                Latencies::sequential(n, || async { proxy.kick().await.context("Kick on the bus") })
                    .await
                    .context("kicks on the bus")?,
            );
            ping_parts.push(
                Latencies::sequential(n, || async { peer.ping().await.context("Peer.Ping on the bus") })
                    .await
                    .context("pings on the bus")?,
            );
            if let Some(other) = &against {
                against_parts.push(Latencies::sequential(n, || over(other)).await.context("kicks to --against")?);
            }
            done += n;
        }
        // Connect (HTTP/2 handshake included), kick, drop the connection.
        let new_connection =
            Latencies::sequential(plan.new_connection, || async { kick(&mut client(&socket).await?).await })
                .await
                .context("kicks on a new connection each")?;
        let installed_new =
            Latencies::sequential(plan.new_connection, || async { kick(&mut client(&installed.socket).await?).await })
                .await
                .context("kicks on a new connection each, installed")?;
        let against = against.map(|_| Latencies::join(against_parts));
        let (shim, bus, ping) = (Latencies::join(shim_parts), Latencies::join(bus_parts), Latencies::join(ping_parts));
        let installed = (installed_first, Latencies::join(installed_parts), installed_new);
        Ok::<_, anyhow::Error>((shim, Latencies::join(direct_parts), bus, ping, against, new_connection, installed))
    }
    .await;
    let (
        kept,
        direct_kicks,
        bus_kicks,
        bus_pings,
        against,
        new_connection,
        (installed_first, installed_kept, installed_new),
    ) = measured
        .with_context(|| format!("shim log:\n{}\ninstalled log:\n{}", shim.log_text(), installed.log_text()))?;
    ensure!(
        installed.log_text().contains("on the socket systemd passed"),
        "the installed daemon did not serve the passed socket; log:\n{}",
        installed.log_text()
    );
    let after = procfs::footprint(shim.pid()).context("the shim's footprint")?;

    let kicks = proxy.kick_count().await.context("reading KickCount")?;
    let expected = 2 + 3 * plan.kept + plan.new_connection;
    ensure!(kicks as usize == expected, "the daemon counted {kicks} kicks, {expected} were sent");
    ensure!(proxy.current_setting().await? == "aggressive", "the daemon is not aggressive after the kicks");
    drop(shim);

    let out = json!({
        "smoke": plan.smoke,
        "shim": SHIM,
        "daemon": daemon_bin,
        "client": "tonic (grpc-shim/tests/grpc.rs's generated client)",
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "loadavg_before": load_before.trim(),
        "loadavg_after": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
        "kicks_counted": kicks,
        "kept": kept.json(),
        "direct_kept": direct_kicks.json(),
        "bus_kept": bus_kicks.json(),
        "ping_kept": bus_pings.json(),
        "against_socket": opts.against.as_ref().map(|p| p.display().to_string()),
        "against_kept": against.as_ref().map(Latencies::json),
        "new_connection": new_connection.json(),
        "installed_flags": installed.flags.join(" "),
        "installed_first_kick_us": installed_first.as_micros() as u64,
        "installed_kept": installed_kept.json(),
        "installed_new_connection": installed_new.json(),
        "shim_fresh": footprint_json(fresh),
        "shim_after": footprint_json(after),
    });
    print!("{}", table(&out));
    if let Some(dir) = opts.json.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&opts.json, serde_json::to_string_pretty(&out)? + "\n")
        .with_context(|| format!("writing {}", opts.json.display()))?;
    println!("JSON: {}", opts.json.display());
    Ok(())
}

/// The figures and targets, one line each (the rows docs/performance.md has).
fn table(v: &Value) -> String {
    let n = |path: &str| v.pointer(path).and_then(Value::as_f64).unwrap_or(f64::NAN);
    let mib = |path: &str| n(path) / 1024.0;
    let lat = |p: &str, unit: &str| {
        format!(
            "p50 {} µs, p99 {} µs, max {} µs, {} {unit}/s",
            n(&format!("{p}/p50_us")),
            n(&format!("{p}/p99_us")),
            n(&format!("{p}/max_us")),
            n(&format!("{p}/per_sec"))
        )
    };
    let mut s = String::new();
    let mut row = |what: &str, measured: String, target: &str| {
        let _ = writeln!(s, "| {what} | {measured} | {target} |");
    };
    row("figure", "measured".into(), "target");
    row("---", "---".into(), "---");
    row(&format!("gRPC shim Kick, kept connection ({})", n("/kept/calls")), lat("/kept", "kicks"), "p99 ≤ 600 µs");
    row(
        &format!("the daemon's own gRPC socket (--grpc-uri) Kick, kept connection ({})", n("/direct_kept/calls")),
        lat("/direct_kept", "kicks"),
        "(the original's p50/p99 or less)",
    );
    row(
        &format!("the shim's D-Bus call alone, Kick on the bus ({})", n("/bus_kept/calls")),
        lat("/bus_kept", "kicks"),
        "(the floor under the shim's figure)",
    );
    row(
        &format!("the bus hop alone, Peer.Ping to the daemon ({})", n("/ping_kept/calls")),
        lat("/ping_kept", "pings"),
        "",
    );
    row(
        &format!(
            "as installed (systemd-socket-activate, {}) Kick, kept connection ({})",
            v["installed_flags"].as_str().unwrap_or(""),
            n("/installed_kept/calls")
        ),
        lat("/installed_kept", "kicks"),
        "(the original's p50/p99 or less)",
    );
    row(
        &format!("as installed, Kick, new connection each ({})", n("/installed_new_connection/calls")),
        lat("/installed_new_connection", "kicks"),
        "",
    );
    row(
        "as installed, the first connection (starts the daemon) to its reply",
        format!("{} µs", n("/installed_first_kick_us")),
        "",
    );
    if let Some(socket) = v["against_socket"].as_str() {
        row(
            &format!("--against {socket}: Kick, kept connection ({})", n("/against_kept/calls")),
            lat("/against_kept", "kicks"),
            "(the shim's p50/p99 at most this)",
        );
    }
    row(
        &format!("gRPC shim Kick, new connection each ({})", n("/new_connection/calls")),
        lat("/new_connection", "kicks"),
        "(original's kicker: 3.2 ms)",
    );
    row(
        "gRPC shim footprint: fresh / after",
        format!(
            "RSS {:.2} / {:.2} MiB, HWM {:.2} MiB, {} threads",
            mib("/shim_fresh/vm_rss_kib"),
            mib("/shim_after/vm_rss_kib"),
            mib("/shim_after/vm_hwm_kib"),
            n("/shim_after/threads")
        ),
        "",
    );
    let _ = writeln!(
        s,
        "\nload average before: {}; after: {}",
        v["loadavg_before"].as_str().unwrap_or(""),
        v["loadavg_after"].as_str().unwrap_or("")
    );
    s
}
