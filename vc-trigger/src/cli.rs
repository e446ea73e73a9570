//! The command line, in the library so the man page and completions are built from it.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::Parser;
use tracing_subscriber::filter::LevelFilter;

use kata_ksm_throttler::client::address::BusArg;

/// Kicks the KSM throttler (org.kata.KsmThrottler on D-Bus) whenever a Kata Containers sandbox
/// starts, watching the sandbox folders of both Kata runtimes with inotify.
#[derive(Debug, Parser)]
#[command(name = "kata-vc-throttler", version)]
pub struct Args {
    /// The Go runtime's (Kata 1.x-3.x) folder: sandboxes are DIR/sbs/<id>.
    #[arg(long, default_value = "/run/vc", value_name = "DIR")]
    pub root: PathBuf,

    /// Do not watch --root.
    #[arg(long)]
    pub no_root: bool,

    /// The Rust runtime-rs (Kata 3.x) folder: sandboxes are DIR/<id>.
    #[arg(long, default_value = "/run/kata", value_name = "DIR")]
    pub kata_root: PathBuf,

    /// Do not watch --kata-root.
    #[arg(long)]
    pub no_kata_root: bool,

    /// The bus org.kata.KsmThrottler is on: system, session, or a D-Bus address.
    #[arg(long, default_value = "system", value_parser = BusArg::from_str)]
    pub bus: BusArg,

    /// How long a Kick may take before it counts as failed.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub kick_timeout: Duration,

    /// error, warn, info, debug or trace.
    #[arg(long, default_value = "info", value_name = "LEVEL")]
    pub log_level: LevelFilter,
}
