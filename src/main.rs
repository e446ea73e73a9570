use std::process::ExitCode;

use anyhow::{anyhow, Context, Result};
use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};

use kata_ksm_throttler::authorize::Authority;
use kata_ksm_throttler::cli::{Args, BusArg};
use kata_ksm_throttler::config::{ConfigError, Settings};
use kata_ksm_throttler::engine::{Config, Engine};
use kata_ksm_throttler::private_bus::{BusConfig, PrivateBus, PROJECT_POLICY};
use kata_ksm_throttler::service::{self, Throttler, BUS_NAME, INTERFACE, OBJECT_PATH};
use kata_ksm_throttler::state_file::StateFile;
use kata_ksm_throttler::sysfs::Ksm;
use kata_ksm_throttler::{logging, meminfo};

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
    let settings = settings(&args)?;
    if args.check_config {
        print!("{}", settings.to_toml());
        return Ok(());
    }

    // Before anything changes KSM, so a stop at any point still restores.
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;

    let ksm = Ksm::open(&args.sysfs_root)
        .with_context(|| format!("no KSM at {} (is this kernel built with CONFIG_KSM?)", args.sysfs_root.display()))?;
    let state = StateFile::new(&args.state_dir);
    let _lock = state.lock().context("taking the state directory's lock")?.ok_or_else(|| {
        anyhow!("another kata-ksm-throttler already drives KSM ({} is locked)", args.state_dir.display())
    })?;

    let private_bus;
    let builder = match &args.bus {
        BusArg::Private => {
            let bus =
                PrivateBus::start(&BusConfig { policy_texts: vec![PROJECT_POLICY.into()], ..BusConfig::default() })
                    .context("starting a private dbus-daemon")?;
            let builder = zbus::connection::Builder::address(bus.address());
            private_bus = Some(bus);
            builder
        }
        other => {
            private_bus = None;
            other.builder().context("--bus")?
        }
    };
    let conn = builder.build().await.map_err(|e| match args.bus {
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
    };
    let (engine, handle, status) = Engine::new(config);
    let engine = engine.with_timerfd().context("creating the step timer (timerfd)")?;
    let engine_handle = handle.clone();
    let authority = Authority::new(&conn).await.context("setting up authorization")?;
    conn.object_server()
        .at(OBJECT_PATH, Throttler::new(engine_handle, status.clone(), authority, ksm, meminfo::page_size()))
        .await
        .context("exporting the object")?;
    conn.request_name(BUS_NAME).await.map_err(|e| match e {
        zbus::Error::NameTaken => anyhow!("{BUS_NAME} is already owned on this bus: another throttler is running"),
        e => anyhow!("cannot own {BUS_NAME}: {e} (only root may, once dbus/{BUS_NAME}.conf is installed)"),
    })?;
    tokio::spawn(service::signal_changes(conn.clone(), status));

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
                    if let Err(e) = reload_handle.reload(s.durations, s.profiles).await {
                        tracing::error!("applying the reloaded configuration: {e}");
                    }
                }
                Err(e) => tracing::error!("{e}: keeping the running configuration"),
            }
        }
    });

    let shutdown = async {
        tokio::select! {
            _ = sigterm.recv() => tracing::info!("SIGTERM: restoring and exiting"),
            _ = sigint.recv() => tracing::info!("SIGINT: restoring and exiting"),
        }
    };
    engine.run(shutdown).await.context("KSM settings")?;
    Ok(())
}
