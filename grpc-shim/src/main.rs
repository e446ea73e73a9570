use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};

use kata_ksm_throttler::grpc::server::{self, Limits};
use kata_ksm_throttler::grpc::socket;
use kata_ksm_throttler_grpc::cli::Args;
use ksm_throttler_contract::kicker::Kicker;

/// How long calls in flight may go on after SIGTERM.
const DRAIN: Duration = Duration::from_secs(2);

fn main() -> ExitCode {
    let args = Args::parse();
    ksm_throttler_contract::logging::init_as("kata-ksm-throttler-grpc", args.log_level);
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
    let listener = socket::register(listener).context("registering the socket")?;

    let mut limits = Limits::new(args.kick_timeout);
    limits.max_connections = usize::from(args.max_connections);
    limits.handshake_timeout = args.handshake_timeout;
    let shutdown = async {
        tokio::select! {
            _ = sigterm.recv() => tracing::info!("SIGTERM: exiting"),
            _ = sigint.recv() => tracing::info!("SIGINT: exiting"),
        }
    };
    let intake = kata_ksm_throttler::grpc::conn::Intake::default();
    let served = server::serve(listener, kicker, &limits, &intake, shutdown, DRAIN).await;
    // A socket systemd made is systemd's to remove.
    if let Some(path) = made {
        socket::remove(&path);
    }
    served.context("serving gRPC")
}
