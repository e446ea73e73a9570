//! The pieces of the throughput benchmark: the daemon process, the buses and calls, CPU per
//! call, and the phases (many clients at once, idle wake-ups, cold starts by activation). The
//! children are test-support's guarded ones and every wait its bounded polling loop; the scratch
//! sysfs is the test-support crate's, on tmpfs like the tests'.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use kata_ksm_throttler::bus::private::{BusConfig, PrivateBus, PROJECT_POLICY};
use kata_ksm_throttler::names::{BUS_NAME, INTERFACE, OBJECT_PATH};
use kata_ksm_throttler_test_support::bench::Latencies;
use kata_ksm_throttler_test_support::child::{signal_pid, Guarded};
use kata_ksm_throttler_test_support::eventually::until_some;
use kata_ksm_throttler_test_support::procfs;
use kata_ksm_throttler_test_support::scratch::Scratch;
use ksm_throttler_contract::proxy::KsmThrottlerProxy;
use rustix::process::Signal;
use serde_json::{json, Value};
use zbus::Connection;

use super::{daemon_bin, Plan};

/// How long a daemon may take to take its name or to exit on SIGTERM.
const LIMIT: Duration = Duration::from_secs(10);

/// The release daemon, ended by its PID when dropped (test-support's guard).
pub struct Daemon {
    process: Guarded,
    pid: u32,
}

impl Daemon {
    pub fn spawn(bus: &PrivateBus, scratch: &Scratch, extra: &[&str]) -> Result<Daemon> {
        Daemon::spawn_bin(daemon_bin(), bus, scratch, extra)
    }

    pub fn spawn_bin(bin: &str, bus: &PrivateBus, scratch: &Scratch, extra: &[&str]) -> Result<Daemon> {
        let log = scratch.dir.path().join("daemon.log");
        let mut command = Command::new(bin);
        command.arg("--bus").arg(bus.address()).args(scratch.args()).args(extra);
        let process = Guarded::spawn_logged(&mut command, "kata-ksm-throttler", &log)
            .with_context(|| format!("starting {bin}"))?;
        let pid = process.pid().context("the daemon's pid")?;
        Ok(Daemon { process, pid })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn log_text(&self) -> String {
        self.process.log_text()
    }

    /// SIGTERM, and the exit status within 10 s.
    pub fn terminate(&mut self) -> Result<ExitStatus> {
        self.process.signal(Signal::TERM)?;
        Ok(self.process.wait_within(LIMIT)?)
    }
}

pub fn start_bus(service_dirs: Vec<PathBuf>) -> Result<PrivateBus> {
    PrivateBus::start(&BusConfig {
        policy_texts: vec![PROJECT_POLICY.into(), kata_ksm_throttler_test_support::bus::MANY_CONNECTIONS.into()],
        service_dirs,
        ..BusConfig::default()
    })
    .context("starting a private dbus-daemon")
}

pub async fn connect_bus(bus: &PrivateBus) -> Result<Connection> {
    Ok(zbus::connection::Builder::address(bus.address()).build().await?)
}

pub async fn wait_for_name(conn: &Connection, daemon: &Daemon) -> Result<()> {
    let dbus = zbus::fdo::DBusProxy::new(conn).await?;
    let owned = until_some(LIMIT, "the daemon to take its name", async || {
        match dbus.name_has_owner(BUS_NAME.try_into().ok()?).await {
            Ok(true) => Some(Ok(())),
            Ok(false) => None,
            Err(e) => Some(Err(e)),
        }
    })
    .await;
    match owned {
        Ok(answered) => Ok(answered?),
        Err(_) => bail!("the daemon never took its name:\n{}", daemon.log_text()),
    }
}

pub async fn kick(conn: &Connection) -> zbus::Result<()> {
    conn.call_method(Some(BUS_NAME), OBJECT_PATH, Some(INTERFACE), "Kick", &()).await.map(drop)
}

async fn proxy(conn: &Connection) -> Result<KsmThrottlerProxy<'static>> {
    Ok(KsmThrottlerProxy::builder(conn).cache_properties(zbus::proxy::CacheProperties::No).build().await?)
}

pub async fn kick_count(conn: &Connection) -> Result<u64> {
    Ok(proxy(conn).await?.kick_count().await?)
}

pub async fn current_setting(conn: &Connection) -> Result<String> {
    Ok(proxy(conn).await?.current_setting().await?)
}

pub fn us(d: Duration) -> u64 {
    d.as_micros() as u64
}

/// CPU time of the three processes of a phase, per call.
pub struct Cpu {
    pids: [(String, u32); 2],
    start: [u64; 3],
}

impl Cpu {
    pub fn start(daemon: u32, bus: u32) -> Result<Cpu> {
        Ok(Cpu {
            pids: [("daemon".into(), daemon), ("dbus-daemon".into(), bus)],
            start: [procfs::cpu_ns(daemon)?, procfs::cpu_ns(bus)?, procfs::cpu_ns(std::process::id())?],
        })
    }

    /// Microseconds of CPU per call in the daemon, the dbus-daemon and this client process.
    pub fn per_call(&self, calls: usize) -> Result<Value> {
        let now =
            [procfs::cpu_ns(self.pids[0].1)?, procfs::cpu_ns(self.pids[1].1)?, procfs::cpu_ns(std::process::id())?];
        let per = |i: usize| ((now[i] - self.start[i]) as f64 / calls.max(1) as f64 / 1000.0 * 10.0).round() / 10.0;
        Ok(json!({ "daemon_us": per(0), "dbus_daemon_us": per(1), "client_us": per(2) }))
    }
}

/// `clients` connections, opened first, then kicking `each` times all at once.
pub async fn concurrent(bus: &PrivateBus, clients: usize, each: usize) -> Result<(Latencies, Duration)> {
    concurrent_calls(bus, clients, each, Call::Kick).await
}

/// What the many-clients phases call: the throttler's Kick, or the bus's own GetId (the floor).
#[derive(Debug, Clone, Copy)]
pub enum Call {
    Kick,
    GetId,
}

pub async fn get_id(conn: &Connection) -> zbus::Result<()> {
    conn.call_method(Some("org.freedesktop.DBus"), "/org/freedesktop/DBus", Some("org.freedesktop.DBus"), "GetId", &())
        .await
        .map(drop)
}

pub async fn concurrent_calls(
    bus: &PrivateBus,
    clients: usize,
    each: usize,
    call: Call,
) -> Result<(Latencies, Duration)> {
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
pub async fn wakeups(pids: &[u32], window: Duration) -> Result<Vec<procfs::Switches>> {
    let before: Vec<_> = pids.iter().map(|&p| procfs::context_switches(p)).collect::<Result<_, _>>()?;
    tokio::time::sleep(window).await;
    let after: Vec<_> = pids.iter().map(|&p| procfs::context_switches(p)).collect::<Result<_, _>>()?;
    Ok(after.iter().zip(&before).map(|(a, b)| a.since(*b)).collect())
}

pub fn footprint_json(f: procfs::Footprint) -> Value {
    json!({ "vm_rss_kib": f.vm_rss_kib, "vm_hwm_kib": f.vm_hwm_kib, "threads": f.threads })
}

/// Cold starts by D-Bus activation: from the first Kick on the unowned name to its reply.
pub async fn activation(plan: Plan) -> Result<Value> {
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
            signal_pid(pid, Signal::TERM);
            let gone = until_some(LIMIT, "the activated daemon to exit", async || {
                match dbus.name_has_owner(BUS_NAME.try_into().ok()?).await {
                    Ok(owned) => (!owned && !Path::new(&format!("/proc/{pid}")).exists()).then_some(Ok(())),
                    Err(e) => Some(Err(e)),
                }
            })
            .await;
            match gone {
                Ok(answered) => answered?,
                Err(_) => bail!("activated daemon {pid} did not exit"),
            }
            ensure!(scratch.knob("run") == "0\n", "the activated daemon did not restore on SIGTERM");
        }
        Ok(())
    }
    .await;
    // Whatever is still running is ended by its PID before the bus goes.
    for pid in started {
        if Path::new(&format!("/proc/{pid}")).exists() {
            signal_pid(pid, Signal::KILL);
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

pub fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}
