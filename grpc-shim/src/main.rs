use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};
use tracing_subscriber::filter::LevelFilter;

use kata_ksm_throttler::cli::BusArg;
use kata_ksm_throttler::kicker::Kicker;
use kata_ksm_throttler_grpc::server::{self, Limits};
use kata_ksm_throttler_grpc::socket;

/// Serves the Kata Containers KSM throttler's gRPC API (ksm.KSMThrottler/Kick) on a Unix socket and
/// forwards every call to org.kata.KsmThrottler on D-Bus.
#[derive(Debug, Parser)]
#[command(name = "kata-ksm-throttler-grpc", version, about)]
struct Args {
    /// The Unix socket to serve on (a path, or unix://PATH). Ignored when systemd passes the
    /// socket (LISTEN_FDS).
    #[arg(long, default_value = "/var/run/kata-ksm-throttler/ksm.sock", value_name = "PATH")]
    uri: String,

    /// The bus org.kata.KsmThrottler is on: system, session, or a D-Bus address.
    #[arg(long, default_value = "system", value_parser = BusArg::from_str)]
    bus: BusArg,

    /// How long a Kick may take on the bus before the gRPC call fails with UNAVAILABLE.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    kick_timeout: Duration,

    /// Connections served at once; more wait until one closes.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u16).range(1..), value_name = "N")]
    max_connections: u16,

    /// A client must have sent the HTTP/2 preface this soon after connecting, or is dropped.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    handshake_timeout: Duration,

    /// error, warn, info, debug or trace.
    #[arg(long, default_value = "info", value_name = "LEVEL")]
    log_level: LevelFilter,
}

/// How long calls in flight may go on after SIGTERM.
const DRAIN: Duration = Duration::from_secs(2);

fn main() -> ExitCode {
    let args = Args::parse();
    kata_ksm_throttler::logging::init_as("kata-ksm-throttler-grpc", args.log_level);
    // One thread: each call is a few bytes in and one bus message out.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kata-ksm-throttler-grpc: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kata-ksm-throttler-grpc: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<()> {
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let kicker = Arc::new(Kicker::new(args.bus.clone(), args.kick_timeout)?);

    let (listener, made): (_, Option<PathBuf>) = match socket::from_systemd()? {
        Some(listener) => {
            tracing::info!("serving ksm.KSMThrottler on the socket systemd passed");
            (listener, None)
        }
        None => {
            let path = socket::parse_uri(&args.uri)?;
            let listener = socket::bind(&path)?;
            tracing::info!(path = %path.display(), "serving ksm.KSMThrottler");
            (listener, Some(path))
        }
    };
    listener.set_nonblocking(true).context("making the socket non-blocking")?;
    let listener = tokio::net::UnixListener::from_std(listener).context("registering the socket")?;

    let mut limits = Limits::new(args.kick_timeout);
    limits.max_connections = usize::from(args.max_connections);
    limits.handshake_timeout = args.handshake_timeout;
    let shutdown = async {
        tokio::select! {
            _ = sigterm.recv() => tracing::info!("SIGTERM: exiting"),
            _ = sigint.recv() => tracing::info!("SIGINT: exiting"),
        }
    };
    let served = server::serve(listener, kicker, &limits, shutdown, DRAIN).await;
    // A socket systemd made is systemd's to remove.
    if let Some(path) = made {
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!(path = %path.display(), "removing the socket: {e}");
        }
    }
    served.context("serving gRPC")
}
