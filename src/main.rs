use std::fs::File;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};

use kata_ksm_throttler::bus::authorize::Authority;
use kata_ksm_throttler::bus::idle_exit;
use kata_ksm_throttler::bus::inspect::Inspector;
use kata_ksm_throttler::bus::private::{BusConfig, PrivateBus, PROJECT_POLICY};
use kata_ksm_throttler::bus::service::{self, Readers, Throttler};
use kata_ksm_throttler::engine::{Config, Ended, Engine};
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
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;

    let ksm = Ksm::open(&args.sysfs_root)
        .with_context(|| format!("no KSM at {} (is this kernel built with CONFIG_KSM?)", args.sysfs_root.display()))?;
    let state = StateFile::new(&args.state_dir);
    // An instance started by the bus may find the previous one still exiting on idle: it waits
    // for it (see the README's "Exit on idle"). Started by hand, a second one is refused at once.
    let wait = if settings.exit_idle_after.is_some() { LOCK_WAIT } else { Duration::ZERO };
    let _lock = lock_state(&state, wait).await.context("taking the state directory's lock")?.ok_or_else(|| {
        anyhow!("another kata-ksm-throttler already drives KSM ({} is locked)", args.state_dir.display())
    })?;
    // Bound now, while nothing else creates files (the socket is made 0660 under a umask of
    // its own); served once the engine has restored, connections waiting in the backlog meanwhile.
    let grpc_socket = match (passed_grpc, &args.grpc_uri) {
        (Some(passed), _) => Some((grpc::socket::register(passed).context("registering the gRPC socket")?, None)),
        (None, Some(uri)) => Some(grpc_listener(uri)?),
        (None, None) => None,
    };
    let intake = grpc::conn::Intake::default();

    let private_bus;
    let address = match &args.bus {
        BusArg::Private => {
            let bus =
                PrivateBus::start(&BusConfig { policy_texts: vec![PROJECT_POLICY.into()], ..BusConfig::default() })
                    .context("starting a private dbus-daemon")?;
            let address = bus.address().parse().context("the private bus's address")?;
            private_bus = Some(bus);
            address
        }
        other => {
            private_bus = None;
            other.address().context("--bus")?
        }
    };
    let conn = zbus::connection::Builder::address(address).build().await.map_err(|e| match args.bus {
        BusArg::System => {
            anyhow!("cannot connect to the system bus ({e}); on a host without one, run with --bus private")
        }
        _ => anyhow!("cannot connect to the bus: {e}"),
    })?;

    let config = Config {
        ksm: ksm.clone(),
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
    };
    let (mut engine, handle, status) = Engine::new(config);
    let authority = Authority::new(&conn).await.context("setting up authorization")?;
    // Its own polkit proxy on the same connection: the Inspect interface is a second object
    // server entry, not a member of the throttler's.
    let inspect_authority = Authority::new(&conn).await.context("setting up authorization")?;
    let roots = Roots { vc_root: settings.vc_root.clone(), kata_root: settings.kata_root.clone() };
    let inspector = Inspector::new(
        args.proc_root.clone(),
        roots,
        ksm.clone(),
        meminfo::page_size(),
        status.clone(),
        inspect_authority,
    );
    let readers = Readers::new(&args.proc_root, &args.meminfo);
    let throttler = Throttler::new(handle.clone(), status.clone(), authority, ksm, meminfo::page_size(), readers);
    let calls = throttler.calls();
    // Before the name is taken, so that every call routed here is counted.
    tokio::spawn(calls.clone().watch(conn.clone()));
    conn.object_server().at(OBJECT_PATH, throttler).await.context("exporting the object")?;
    conn.object_server().at(OBJECT_PATH, inspector).await.context("exporting the Inspect interface")?;
    kata_ksm_throttler::bus::properties::install(conn.object_server(), OBJECT_PATH)
        .await
        .context("exporting the Properties interface")?;

    // Restored (after a crash) and in its start-up mode before the name is taken: a caller
    // never reads the previous instance's knobs as this one's setting.
    let notices = settings.exit_idle_after.map(|after| engine.exit_when_idle(after));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (started_tx, started) = tokio::sync::oneshot::channel::<()>();
    let mut done = run_engine(engine, stopped, started_tx)?;
    if started.await.is_err() {
        // The engine ended before it started: its error says why.
        let ended = done.await.map_err(|_| anyhow!("the engine's thread ended without a word"))?;
        return Err(match ended {
            Err(e) => e,
            Ok(_) => anyhow!("the engine ended before it started"),
        });
    }

    conn.request_name(BUS_NAME).await.map_err(|e| match e {
        zbus::Error::NameTaken => anyhow!("{BUS_NAME} is already owned on this bus: another throttler is running"),
        e => anyhow!("cannot own {BUS_NAME}: {e} (only root may, once dbus/{BUS_NAME}.conf is installed)"),
    })?;
    tokio::spawn(service::signal_changes(conn.clone(), status));
    let (grpc_stop, grpc_stopped) = tokio::sync::oneshot::channel::<()>();
    let mut grpc_stop = Some(grpc_stop);
    let grpc_served = grpc_socket.map(|(listener, path)| {
        match &path {
            Some(path) => tracing::info!(path = %path.display(), "serving ksm.KSMThrottler"),
            None => tracing::info!("serving ksm.KSMThrottler on the socket systemd passed"),
        }
        tokio::spawn(serve_grpc(listener, path, handle.clone(), intake.clone(), grpc_stopped))
    });
    let grpc_intake = grpc_served.is_some().then(|| Arc::new(intake) as Arc<dyn idle_exit::Intake>);

    if let Some(bus) = &private_bus {
        let address = bus.address().split(",guid=").next().unwrap_or_default();
        println!("kata-ksm-throttler: serving {BUS_NAME} on a private bus: {address}");
        println!("  try: busctl --address={address} call {BUS_NAME} {OBJECT_PATH} {INTERFACE} Kick");
        println!("       busctl --address={address} get-property {BUS_NAME} {OBJECT_PATH} {INTERFACE} CurrentSetting");
    }
    tracing::info!(bus = ?args.bus, mode = %settings.mode, "serving {BUS_NAME}");

    // SIGHUP: re-read the files (the command line still wins); a bad file changes nothing.
    let reload_handle = handle.clone();
    tokio::spawn(async move {
        while sighup.recv().await.is_some() {
            match self::settings(&args) {
                Ok(s) => {
                    if let Err(e) = reload_handle.reload(s.durations, s.profiles, s.need).await {
                        tracing::error!("applying the reloaded configuration: {e}");
                    }
                }
                Err(e) => tracing::error!("{e}: keeping the running configuration"),
            }
        }
    });

    let stop_calls = calls.clone();
    let (edge_failed, edge_failure) = tokio::sync::oneshot::channel::<anyhow::Error>();
    let edge = async {
        if let Some(notices) = notices {
            if let Err(e) = idle_exit::serve(conn.clone(), handle, notices, calls, grpc_intake).await {
                let _ = edge_failed.send(e);
            }
        }
        std::future::pending::<()>().await
    };
    let mut failure = None;
    let shutdown = async {
        tokio::select! {
            _ = sigterm.recv() => tracing::info!("SIGTERM: restoring and exiting"),
            _ = sigint.recv() => tracing::info!("SIGINT: restoring and exiting"),
            Ok(e) = edge_failure => {
                tracing::error!("{e:#}: restoring and exiting");
                failure = Some(e);
            }
            // Nobody can reach the throttler any more; under systemd, Restart=on-failure brings
            // it back with the bus.
            () = conn.closed() => {
                tracing::error!("the bus connection closed: restoring and exiting");
                failure = Some(anyhow!("the bus connection closed"));
            }
        }
    };
    let ended = {
        tokio::pin!(shutdown, edge);
        let mut stop = Some(stop);
        // The edge keeps serving after a stop: a stop that lands during an idle exit waits for
        // the engine's verdict, which the edge brings (systemd stops a Type=dbus unit as soon
        // as its name is released).
        loop {
            tokio::select! {
                ended = &mut done => break ended,
                () = &mut shutdown, if stop.is_some() => {
                    if let Some(stop) = stop.take() {
                        let _ = stop.send(());
                    }
                    if let Some(grpc_stop) = grpc_stop.take() {
                        let _ = grpc_stop.send(());
                    }
                }
                () = &mut edge => unreachable!("the edge task never completes"),
            }
        }
    };
    if let Some(served) = grpc_served {
        // Kicks in flight are answered (UNAVAILABLE once the engine has stopped), for up to
        // GRPC_DRAIN; the socket goes.
        if let Some(grpc_stop) = grpc_stop.take() {
            let _ = grpc_stop.send(());
        }
        let _ = served.await;
    }
    let ended = ended.map_err(|_| anyhow!("the engine's thread ended without a word"))??;
    match ended {
        Ended::Shutdown => idle_exit::release_and_answer(&conn, &stop_calls).await,
        Ended::Idle => tracing::info!("exiting on idle; the next call starts the throttler again"),
        Ended::HandedOver => {
            idle_exit::start_successor(&conn).await.context("asking the bus to start a successor")?;
            tracing::info!("exiting on idle; the successor carries on");
        }
    }
    idle_exit::flush(&conn).await;
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Runs the engine on a thread of its own until `stopped` (or until it ends by itself), and
/// returns its outcome; `started` is sent once its start-up is done. sysfs writes block: writing `run` waits for ksmd's batch under way
/// (the kernel's `ksm_thread_mutex`), seconds when ksmd is starved of CPU by busy vCPUs, and
/// the bus must keep answering meanwhile (properties come from the published status).
fn run_engine(
    mut engine: Engine,
    stopped: tokio::sync::oneshot::Receiver<()>,
    started: tokio::sync::oneshot::Sender<()>,
) -> Result<tokio::sync::oneshot::Receiver<Result<Ended>>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("the engine's runtime")?;
    std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || {
            let ended = runtime.block_on(async move {
                engine.start().context("KSM settings at start-up")?;
                let _ = started.send(());
                let stop = async {
                    let _ = stopped.await;
                };
                engine.run(stop).await.context("KSM settings")
            });
            let _ = tx.send(ended);
        })
        .context("starting the engine's thread")?;
    Ok(rx)
}

/// How long gRPC calls in flight may go on after a stop.
const GRPC_DRAIN: Duration = Duration::from_secs(2);

/// `--grpc-uri`'s socket, made as the shim makes its own, and its path (removed at exit).
fn grpc_listener(uri: &str) -> Result<(tokio::net::UnixListener, Option<std::path::PathBuf>)> {
    let path = grpc::socket::parse_uri(uri).context("--grpc-uri")?;
    let listener = grpc::socket::bind(&path).context("--grpc-uri")?;
    let listener = grpc::socket::register(listener).context("registering the gRPC socket")?;
    Ok((listener, Some(path)))
}

/// Serves ksm.KSMThrottler on `listener`, each Kick handed to the engine, until `stopped`; then
/// removes the socket if this process made it (`made`): one systemd passed stays, listening, with
/// whatever waits in its backlog, for the next instance.
async fn serve_grpc(
    listener: tokio::net::UnixListener,
    made: Option<std::path::PathBuf>,
    handle: kata_ksm_throttler::engine::Handle,
    intake: grpc::conn::Intake,
    stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let limits = grpc::server::Limits::new(GRPC_KICK_TIMEOUT);
    let stop = async {
        let _ = stopped.await;
    };
    if let Err(e) = grpc::server::serve(listener, Arc::new(handle), &limits, &intake, stop, GRPC_DRAIN).await {
        tracing::error!("serving gRPC: {e}");
    }
    if let Some(path) = made {
        grpc::socket::remove(&path);
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
