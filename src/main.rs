use std::fs::File;
use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use clap::Parser;
use futures_util::FutureExt;
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use kata_ksm_throttler::bus::authorize::Authority;
use kata_ksm_throttler::bus::idle_exit;
use kata_ksm_throttler::bus::inspect::Inspector;
use kata_ksm_throttler::bus::objects;
use kata_ksm_throttler::bus::private::{BusConfig, PrivateBus, PROJECT_POLICY};
use kata_ksm_throttler::bus::service::{self, Readers, Throttler};
use kata_ksm_throttler::engine::{Config, Ended, Engine, Handle, Status};
use kata_ksm_throttler::grpc;
use kata_ksm_throttler::io::meminfo;
use kata_ksm_throttler::io::procwalk::Roots;
use kata_ksm_throttler::io::state_file::{StateError, StateFile};
use kata_ksm_throttler::io::sysfs::Ksm;
use kata_ksm_throttler::names::{BUS_NAME, INTERFACE, OBJECT_PATH};
use kata_ksm_throttler::startup::cli::Args;
use kata_ksm_throttler::startup::config::{ConfigError, Settings};
use ksm_throttler_contract::address::BusArg;
use ksm_throttler_contract::logging;

fn main() -> ExitCode {
    let args = Args::parse();
    logging::init(args.log_level);
    // One thread: the work is a few small file writes per transition and bus messages.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kata-ksm-throttler: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kata-ksm-throttler: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The configuration files with the command line over them.
fn settings(args: &Args) -> Result<Settings, ConfigError> {
    Settings::load(&args.config).map(|(files, _)| args.over(files))
}

async fn run(args: Args) -> Result<()> {
    let mut settings = settings(&args)?;
    if args.check_config {
        print!("{}", settings.to_toml());
        return Ok(());
    }
    // Taken first, before anything else owns descriptors. systemd holds the socket it passes
    // across this process's exits, so exiting on idle loses nothing; one made here (`--grpc-uri`)
    // would close with it.
    let passed_grpc = grpc::socket::named_from_systemd().context("the gRPC socket systemd passed")?;
    if passed_grpc.is_some() && args.grpc_uri.is_some() {
        tracing::info!("--grpc-uri ignored: serving the gRPC socket systemd passed");
    }
    if passed_grpc.is_none() && args.grpc_uri.is_some() && settings.exit_idle_after.take().is_some() {
        tracing::warn!("--grpc-uri: not exiting on idle (the gRPC socket would close with it)");
    }
    // Before anything changes KSM, so a stop at any point still restores.
    let (mut stops, hangup) = Stops::install()?;
    let ksm = Ksm::open(&args.sysfs_root)
        .with_context(|| format!("no KSM at {} (is this kernel built with CONFIG_KSM?)", args.sysfs_root.display()))?;
    let state = StateFile::new(&args.state_dir);
    // An instance started by the bus may find the previous one still exiting on idle: it waits
    // for it (see ARCHITECTURE.md's "Exit on idle"). Started by hand, a second one is refused.
    let wait = if settings.exit_idle_after.is_some() { LOCK_WAIT } else { Duration::ZERO };
    let _lock = lock_state(&state, wait).await.context("taking the state directory's lock")?.ok_or_else(|| {
        anyhow!("another kata-ksm-throttler already drives KSM ({} is locked)", args.state_dir.display())
    })?;
    // Bound now, while nothing else creates files (the socket is made 0660 under a umask of
    // its own); served once the engine has restored, connections waiting in the backlog meanwhile.
    let grpc_socket = grpc_socket(passed_grpc, args.grpc_uri.as_deref())?;
    let (private_bus, conn) = connect(&args.bus).await?;

    let (mut engine, handle, status) = Engine::new(engine_config(&args, &settings, ksm.clone(), state));
    let authority = Arc::new(Authority::new(&conn).await.context("setting up authorization")?);
    let (throttler, inspector) = bus_objects(&args, &settings, ksm, &handle, &status, authority);
    let calls = throttler.calls();
    let mut tasks = JoinSet::new();
    // Before the name is taken, so that every call routed here is counted.
    tasks.spawn(calls.clone().watch(conn.clone()).map(Ok));
    objects::export(&conn, throttler, inspector).await?;

    // Restored (after a crash) and in its start-up mode before the name is taken: a caller
    // never reads the previous instance's knobs as this one's setting.
    let notices = settings.exit_idle_after.map(|after| engine.exit_when_idle(after));
    let stop = CancellationToken::new();
    // Whatever ends run (an error included) stops the engine, as the end of every handle would.
    let _stopped_on_return = stop.clone().drop_guard();
    let mut done = start_engine(engine, stop.clone()).await?;
    conn.request_name(BUS_NAME).await.map_err(|e| match e {
        zbus::Error::NameTaken => anyhow!("{BUS_NAME} is already owned on this bus: another throttler is running"),
        e => anyhow!("cannot own {BUS_NAME}: {e} (only root may, once dbus/{BUS_NAME}.conf is installed)"),
    })?;
    tasks.spawn(service::signal_changes(conn.clone(), status).map(|_| Ok(())));
    let (mut grpc_served, grpc_intake) = serve_grpc_socket(grpc_socket, &handle, &stop);
    announce(private_bus.as_ref(), &args, &settings);
    tasks.spawn(reload_on_hangup(hangup, args, handle.clone()));
    let edge =
        notices.map(|notices| tasks.spawn(idle_exit::serve(conn.clone(), handle, notices, calls.clone(), grpc_intake)));

    // A stop cancels the engine and the gRPC server; the edge keeps serving, so a stop that lands
    // during an idle exit waits for the engine's verdict, which the edge brings (systemd stops a
    // Type=dbus unit as soon as its name is released).
    let mut failure = None;
    let ended = loop {
        tokio::select! {
            ended = &mut done => break ended,
            why = stops.stop(&conn), if !stop.is_cancelled() => {
                failure = why;
                stop.cancel();
            }
            Some(joined) = tasks.join_next(), if !stop.is_cancelled() => if let Ok(Err(e)) = joined {
                tracing::error!("{e:#}: restoring and exiting");
                failure = Some(e);
                stop.cancel();
            },
        }
    };
    if let Some(edge) = edge {
        edge.abort();
    }
    // Kicks in flight are answered (UNAVAILABLE once the engine has stopped), for up to
    // GRPC_DRAIN; the socket goes.
    stop.cancel();
    while grpc_served.join_next().await.is_some() {}
    let ended = ended.map_err(|_| anyhow!("the engine's thread ended without a word"))??;
    match ended {
        Ended::Shutdown => idle_exit::release_and_answer(&conn, &calls).await,
        Ended::Idle => tracing::info!("exiting on idle; the next call starts the throttler again"),
        Ended::HandedOver => {
            idle_exit::start_successor(&conn).await.context("asking the bus to start a successor")?;
            tracing::info!("exiting on idle; the successor carries on");
        }
    }
    idle_exit::flush(&conn).await;
    failure.map_or(Ok(()), Err)
}

/// The signals that stop the daemon.
struct Stops {
    terminate: Signal,
    interrupt: Signal,
}

impl Stops {
    /// SIGTERM and SIGINT, and SIGHUP (the reload) beside them.
    fn install() -> Result<(Stops, Signal)> {
        let stops = Stops {
            terminate: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            interrupt: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        };
        Ok((stops, signal(SignalKind::hangup()).context("installing the SIGHUP handler")?))
    }

    /// Completes on SIGTERM or SIGINT (`None`), or when the bus connection closes (the failure to
    /// exit with).
    async fn stop(&mut self, conn: &zbus::Connection) -> Option<anyhow::Error> {
        tokio::select! {
            _ = self.terminate.recv() => tracing::info!("SIGTERM: restoring and exiting"),
            _ = self.interrupt.recv() => tracing::info!("SIGINT: restoring and exiting"),
            // Nobody can reach the throttler any more; under systemd, Restart=on-failure brings
            // it back with the bus.
            () = conn.closed() => {
                tracing::error!("the bus connection closed: restoring and exiting");
                return Some(anyhow!("the bus connection closed"));
            }
        }
        None
    }
}

/// The engine's configuration from the command line and the files.
fn engine_config(args: &Args, settings: &Settings, ksm: Ksm, state: StateFile) -> Config {
    Config {
        ksm,
        meminfo: args.meminfo.clone(),
        page_size: meminfo::page_size(),
        state,
        mode: settings.mode,
        durations: settings.durations,
        profiles: settings.profiles,
        proc_root: args.proc_root.clone(),
        gate: settings.gate,
        need: settings.need,
        unprofitable_scans: settings.unprofitable_scans,
    }
}

/// The throttler's object and its Inspect interface, checking callers with the one `authority`.
fn bus_objects(
    args: &Args,
    settings: &Settings,
    ksm: Ksm,
    handle: &Handle,
    status: &watch::Receiver<Status>,
    authority: Arc<Authority>,
) -> (Throttler, Inspector) {
    let roots = Roots { vc_root: settings.vc_root.clone(), kata_root: settings.kata_root.clone() };
    let page_size = meminfo::page_size();
    let inspector =
        Inspector::new(args.proc_root.clone(), roots, ksm.clone(), page_size, status.clone(), authority.clone());
    let readers = Readers::new(&args.proc_root, &args.meminfo);
    let throttler = Throttler::new(handle.clone(), status.clone(), authority, ksm, page_size, readers);
    (throttler, inspector)
}

/// The bus `--bus` names, and the private dbus-daemon when it asks for one (kept running as long
/// as it is held).
async fn connect(bus: &BusArg) -> Result<(Option<PrivateBus>, zbus::Connection)> {
    let (private_bus, address) = match bus {
        BusArg::Private => {
            let private =
                PrivateBus::start(&BusConfig { policy_texts: vec![PROJECT_POLICY.into()], ..BusConfig::default() })
                    .context("starting a private dbus-daemon")?;
            let address = private.address().parse().context("the private bus's address")?;
            (Some(private), address)
        }
        other => (None, other.address().context("--bus")?),
    };
    let conn = zbus::connection::Builder::address(address).build().await.map_err(|e| match bus {
        BusArg::System => {
            anyhow!("cannot connect to the system bus ({e}); on a host without one, run with --bus private")
        }
        _ => anyhow!("cannot connect to the bus: {e}"),
    })?;
    Ok((private_bus, conn))
}

/// Says where the throttler is served.
fn announce(private_bus: Option<&PrivateBus>, args: &Args, settings: &Settings) {
    if let Some(bus) = private_bus {
        let address = bus.address().split(",guid=").next().unwrap_or_default();
        println!("kata-ksm-throttler: serving {BUS_NAME} on a private bus: {address}");
        println!("  try: busctl --address={address} call {BUS_NAME} {OBJECT_PATH} {INTERFACE} Kick");
        println!("       busctl --address={address} get-property {BUS_NAME} {OBJECT_PATH} {INTERFACE} CurrentSetting");
    }
    tracing::info!(bus = ?args.bus, mode = %settings.mode, "serving {BUS_NAME}");
}

/// SIGHUP: re-read the files (the command line still wins); a bad file changes nothing.
async fn reload_on_hangup(mut hangup: Signal, args: Args, handle: Handle) -> Result<()> {
    while hangup.recv().await.is_some() {
        match settings(&args) {
            Ok(s) => {
                if let Err(e) = handle.reload(s.durations, s.profiles, s.need).await {
                    tracing::error!("applying the reloaded configuration: {e}");
                }
            }
            Err(e) => tracing::error!("{e}: keeping the running configuration"),
        }
    }
    Ok(())
}

/// Runs the engine on a thread of its own until `stop` (or until it ends by itself), and returns
/// its outcome to come once its start-up is done; the start-up's failure is returned as it is.
/// sysfs writes block: writing `run` waits for ksmd's batch under way (the kernel's
/// `ksm_thread_mutex`), seconds when ksmd is starved of CPU by busy vCPUs, and the bus must keep
/// answering meanwhile (properties come from the published status).
async fn start_engine(mut engine: Engine, stop: CancellationToken) -> Result<oneshot::Receiver<Result<Ended>>> {
    let (started_tx, started) = oneshot::channel::<()>();
    let (tx, done) = oneshot::channel();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("the engine's runtime")?;
    std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || {
            let ended = runtime.block_on(async move {
                engine.start().context("KSM settings at start-up")?;
                let _ = started_tx.send(());
                engine.run(stop.cancelled_owned()).await.context("KSM settings")
            });
            let _ = tx.send(ended);
        })
        .context("starting the engine's thread")?;
    if started.await.is_err() {
        // The engine ended before it started: its error says why.
        let ended = done.await.map_err(|_| anyhow!("the engine's thread ended without a word"))?;
        return Err(match ended {
            Err(e) => e,
            Ok(_) => anyhow!("the engine ended before it started"),
        });
    }
    Ok(done)
}

/// How long gRPC calls in flight may go on after a stop.
const GRPC_DRAIN: Duration = Duration::from_secs(2);

/// The gRPC socket to serve: the one systemd passed, else `--grpc-uri`'s, and the path of one
/// made here (removed at exit).
fn grpc_socket(
    passed: Option<std::os::unix::net::UnixListener>,
    uri: Option<&str>,
) -> Result<Option<(UnixListener, Option<PathBuf>)>> {
    Ok(match (passed, uri) {
        (Some(passed), _) => Some((grpc::socket::register(passed).context("registering the gRPC socket")?, None)),
        (None, Some(uri)) => Some(grpc_listener(uri)?),
        (None, None) => None,
    })
}

/// `--grpc-uri`'s socket, made as the shim makes its own, and its path (removed at exit).
fn grpc_listener(uri: &str) -> Result<(UnixListener, Option<PathBuf>)> {
    let path = grpc::socket::parse_uri(uri).context("--grpc-uri")?;
    let listener = grpc::socket::bind(&path).context("--grpc-uri")?;
    let listener = grpc::socket::register(listener).context("registering the gRPC socket")?;
    Ok((listener, Some(path)))
}

/// Serves the gRPC socket, if there is one, until `stop`; and the way in it is to the engine,
/// for exiting on idle to close.
fn serve_grpc_socket(
    socket: Option<(UnixListener, Option<PathBuf>)>,
    handle: &Handle,
    stop: &CancellationToken,
) -> (JoinSet<()>, Option<Arc<dyn kata_ksm_throttler::engine::Intake>>) {
    let mut served = JoinSet::new();
    let Some((listener, path)) = socket else { return (served, None) };
    let intake = grpc::conn::Intake::default();
    served.spawn(serve_grpc(listener, path, handle.clone(), intake.clone(), stop.clone()));
    (served, Some(Arc::new(intake)))
}

/// Serves ksm.KSMThrottler on `listener`, each Kick handed to the engine, until `stop`; then
/// removes the socket if this process made it (`made`): one systemd passed stays, listening, with
/// whatever waits in its backlog, for the next instance. Says so at once, before it is spawned.
fn serve_grpc(
    listener: UnixListener,
    made: Option<PathBuf>,
    handle: Handle,
    intake: grpc::conn::Intake,
    stop: CancellationToken,
) -> impl Future<Output = ()> {
    match &made {
        Some(path) => tracing::info!(path = %path.display(), "serving ksm.KSMThrottler"),
        None => tracing::info!("serving ksm.KSMThrottler on the socket systemd passed"),
    }
    async move {
        let limits = grpc::server::Limits::new(GRPC_KICK_TIMEOUT);
        let stopped = stop.cancelled();
        if let Err(e) = grpc::server::serve(listener, Arc::new(handle), &limits, &intake, stopped, GRPC_DRAIN).await {
            tracing::error!("serving gRPC: {e}");
        }
        if let Some(path) = made {
            grpc::socket::remove(&path);
        }
    }
}

/// A gRPC Kick's bound, as the shim's default `--kick-timeout`.
const GRPC_KICK_TIMEOUT: Duration = Duration::from_secs(5);

/// How long an instance started by the bus waits for one that is exiting on idle; under the bus's
/// own activation timeout (25 s by default).
const LOCK_WAIT: Duration = Duration::from_secs(20);

async fn lock_state(state: &StateFile, wait: Duration) -> Result<Option<File>, StateError> {
    let start = Instant::now();
    let mut logged = false;
    loop {
        if let Some(lock) = state.lock()? {
            return Ok(Some(lock));
        }
        if start.elapsed() >= wait {
            return Ok(None);
        }
        if !logged {
            tracing::info!(
                "the state directory is locked: waiting up to {}s for the previous instance to exit",
                wait.as_secs()
            );
            logged = true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
