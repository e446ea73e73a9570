//! The command line, in the library so the man page and completions are built from it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

use clap::Parser;
use tracing_subscriber::filter::LevelFilter;

use ksm_throttler_contract::address::BusArg;

/// Serves kata-ksm-throttler (org.kata.KsmThrottler, read as any user may) and the kernel's KSM
/// figures (/sys/kernel/mm/ksm) as Prometheus metrics on HTTP /metrics. Never starts the
/// throttler: one that is not running is `ksm_throttler_up 0`.
#[derive(Debug, Parser)]
#[command(name = "kata-ksm-throttler-exporter", version, about)]
pub struct Args {
    /// The address to listen on. Ignored when systemd passes the socket (LISTEN_FDS), as
    /// kata-ksm-throttler-exporter.socket does.
    #[arg(long, default_value_t = SocketAddr::from(([127, 0, 0, 1], crate::DEFAULT_PORT)), value_name = "ADDR:PORT")]
    pub listen: SocketAddr,

    /// The bus org.kata.KsmThrottler is on: system, session, or a D-Bus address.
    #[arg(long, default_value = "system", value_parser = BusArg::from_str)]
    pub bus: BusArg,

    /// The KSM sysfs folder.
    #[arg(long, default_value = "/sys/kernel/mm/ksm", value_name = "DIR")]
    pub sysfs_root: PathBuf,

    /// Connections open at once; a new one closes the oldest (of 100 ms or more) that has no
    /// request being answered (silent or slow clients), and waits in the listen backlog only
    /// while every one has.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u16).range(1..), value_name = "N")]
    pub max_connections: u16,

    /// error, warn, info, debug or trace.
    #[arg(long, default_value = "info", value_name = "LEVEL")]
    pub log_level: LevelFilter,
}
