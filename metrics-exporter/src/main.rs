use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};

use kata_ksm_throttler_exporter::cli::Args;
use kata_ksm_throttler_exporter::listen;
use kata_ksm_throttler_exporter::server::{self, Exporter};

fn main() -> ExitCode {
    let args = Args::parse();
    ksm_throttler_contract::logging::init_as("kata-ksm-throttler-exporter", args.log_level);
    // One thread: a scrape is one bus round trip and a few small file reads.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kata-ksm-throttler-exporter: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kata-ksm-throttler-exporter: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<()> {
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let (listener, passed) = listen::listener(args.listen)?;
    let addr = listener.local_addr().context("the socket's address")?;
    if passed {
        tracing::info!(%addr, "serving /metrics on the socket systemd passed");
    } else {
        tracing::info!(%addr, "serving /metrics");
    }
    let exporter = Arc::new(Exporter::new(args.bus, args.sysfs_root));
    let shutdown = async {
        tokio::select! {
            _ = sigterm.recv() => tracing::info!("SIGTERM: exiting"),
            _ = sigint.recv() => tracing::info!("SIGINT: exiting"),
        }
    };
    server::serve(listener, exporter, usize::from(args.max_connections), shutdown).await;
    Ok(())
}
