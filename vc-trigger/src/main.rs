use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};

use kata_vc_throttler::cli::Args;
use kata_vc_throttler::kicks;
use kata_vc_throttler::watcher::{Found, Watcher};
use ksm_throttler_contract::kicker::Kicker;

fn main() -> ExitCode {
    let args = Args::parse();
    ksm_throttler_contract::logging::init_as("kata-vc-throttler", args.log_level);
    // One thread: a few events a minute.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kata-vc-throttler: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kata-vc-throttler: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<()> {
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let kicker = Kicker::new(args.bus.clone(), args.kick_timeout)?;

    let named = args.folders()?;
    let mut folders = vec![];
    if let Some(root) = &named.vc_root {
        folders.push(std::path::absolute(root.join("sbs")).context("--root")?);
    }
    if let Some(root) = &named.kata_root {
        folders.push(std::path::absolute(root).context("--kata-root")?);
    }
    if folders.is_empty() {
        bail!("--no-root and --no-kata-root (or an empty vc-root and kata-root in [trigger]) leave nothing to watch");
    }
    let mut watcher = Watcher::new(&folders).context("setting up inotify")?;
    let kicks = kicks::spawn(kicker);

    loop {
        let found = tokio::select! {
            found = watcher.next() => found.context("reading inotify events")?,
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        };
        for f in found {
            match f {
                Found::Sandbox(path) => tracing::info!(sandbox = %path.display(), "new sandbox"),
                Found::Appeared(path) => {
                    tracing::info!(folder = %path.display(), "the sandboxes folder appeared; sandboxes may be starting")
                }
                Found::Overflow => {}
            }
            kicks.kick();
        }
    }
    tracing::info!("exiting");
    Ok(())
}
