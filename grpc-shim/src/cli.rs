//! The command line, in the library so the man page and completions are built from it.

use std::str::FromStr;
use std::time::Duration;

use clap::Parser;
use tracing_subscriber::filter::LevelFilter;

use ksm_throttler_contract::address::BusArg;

/// Serves the Kata Containers KSM throttler's gRPC API (ksm.KSMThrottler/Kick) on a Unix socket and
/// forwards every call to org.kata.KsmThrottler on D-Bus.
#[derive(Debug, Parser)]
#[command(name = "kata-ksm-throttler-grpc", version, about)]
pub struct Args {
    /// The Unix socket to serve on (a path, or unix://PATH). Ignored when systemd passes the
    /// socket (LISTEN_FDS).
    #[arg(long, default_value = "/var/run/kata-ksm-throttler/ksm.sock", value_name = "PATH")]
    pub uri: String,

    /// The bus org.kata.KsmThrottler is on: system, session, or a D-Bus address.
    #[arg(long, default_value = "system", value_parser = BusArg::from_str)]
    pub bus: BusArg,

    /// How long a Kick may take on the bus before the gRPC call fails with UNAVAILABLE.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub kick_timeout: Duration,

    /// Connections served at once; when all are taken, a new one closes one of the peer (uid) holding the most, or the one idle the longest.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u16).range(1..), value_name = "N")]
    pub max_connections: u16,

    /// A client must have sent the HTTP/2 preface this soon after connecting, or is dropped.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub handshake_timeout: Duration,

    /// error, warn, info, debug or trace.
    #[arg(long, default_value = "info", value_name = "LEVEL")]
    pub log_level: LevelFilter,
}
