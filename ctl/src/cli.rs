//! `ksmtctl`'s command line and exit codes; the binary (src/bin/ksmtctl.rs in the workspace's
//! root) is the I/O.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{Parser, Subcommand};
use ksm_throttler_contract::address::BusArg;
use ksm_throttler_contract::errors;

/// Read, drive and watch kata-ksm-throttler (org.kata.KsmThrottler) over D-Bus.
///
/// Exit codes: 0 done; 1 failed; 2 bad usage; 3 the throttler is not running (or no bus);
/// 4 access denied (polkit); 5 invalid argument (e.g. an unknown mode); 6 the doctor found an error.
#[derive(Debug, Parser)]
#[command(name = "ksmtctl", version)]
pub struct Cli {
    /// The bus: system (default), session, or a D-Bus address (as printed by
    /// `kata-ksm-throttler --bus private`).
    #[arg(long, global = true, default_value = "system", value_parser = BusArg::from_str)]
    pub bus: BusArg,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Mode, setting, time to the next step, knobs, memory saved.
    Status {
        /// One JSON object, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// New VMs are starting: go aggressive (needs org.kata.KsmThrottler.kick).
    Kick,
    /// Sets the mode; the throttler refuses a name it does not know and lists the valid ones
    /// (needs org.kata.KsmThrottler.set-mode; asks for authentication when run from a terminal).
    SetMode {
        mode: String,
        /// Never ask for authentication, even from a terminal.
        #[arg(long)]
        no_ask: bool,
    },
    /// One timestamped line per property change, and the statistics every --interval, until Ctrl-C.
    Watch {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// How often to print the statistics (e.g. 5s, 1m).
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        interval: Duration,
    },
    /// The throttler and KSM as Prometheus metrics (text format 0.0.4, for node_exporter's
    /// textfile collector). A throttler that is down is a metric, not an error, and is never
    /// started by this.
    Metrics {
        /// Write to FILE atomically (a temporary file in its folder, renamed over it) instead of
        /// standard output, e.g. /var/lib/prometheus/node-exporter/kata-ksm-throttler.prom.
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// The KSM sysfs folder read for the files the throttler has no property for.
        #[arg(long, value_name = "DIR", default_value = "/sys/kernel/mm/ksm")]
        sysfs_root: PathBuf,
        /// OpenMetrics 1.0 instead (what the HTTP exporter serves when asked).
        #[arg(long)]
        openmetrics: bool,
    },
    /// KSM's savings per Kata sandbox and per process, most first, with the host's totals
    /// (needs org.kata.KsmThrottler.inspect).
    Sandboxes {
        /// The throttler's JSON answer, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// `sandboxes`, refreshed every --interval until Ctrl-C.
    Top {
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        interval: Duration,
        /// How many processes outside sandboxes to show.
        #[arg(long, default_value_t = 10)]
        processes: usize,
    },
    /// Why KSM saves what it saves: findings with a severity and what to do; exits 6 when one
    /// is an error (needs org.kata.KsmThrottler.inspect).
    Doctor {
        /// The throttler's JSON answer, for scripts.
        #[arg(long)]
        json: bool,
    },
}

/// Exit codes, documented in docs/operating.md and the man page.
pub mod exit {
    pub const OK: u8 = 0;
    pub const FAILED: u8 = 1;
    /// The throttler is not running and could not be started (or no bus).
    pub const NOT_RUNNING: u8 = 3;
    /// polkit said no, or wants interactive authentication that was not allowed.
    pub const ACCESS_DENIED: u8 = 4;
    /// The throttler refused an argument (an unknown mode).
    pub const INVALID: u8 = 5;
    /// `ksmtctl doctor` found an error.
    pub const DOCTOR_ERROR: u8 = 6;
}

/// The exit code for an error the throttler (or the bus) returned.
pub fn exit_code(error_name: &str) -> u8 {
    match error_name {
        errors::SERVICE_UNKNOWN
        | errors::NAME_HAS_NO_OWNER
        | errors::NO_REPLY
        | errors::SPAWN_CHILD_EXITED
        | errors::SPAWN_FAILED => exit::NOT_RUNNING,
        errors::ACCESS_DENIED | errors::INTERACTIVE_AUTHORIZATION_REQUIRED => exit::ACCESS_DENIED,
        errors::INVALID_ARGS => exit::INVALID,
        _ => exit::FAILED,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_names_map_to_documented_exit_codes() {
        assert_eq!(exit_code("org.freedesktop.DBus.Error.ServiceUnknown"), 3);
        assert_eq!(exit_code("org.freedesktop.DBus.Error.InteractiveAuthorizationRequired"), 4);
        assert_eq!(exit_code("org.freedesktop.DBus.Error.InvalidArgs"), 5);
        assert_eq!(exit_code("org.kata.KsmThrottler.Error.Sysfs"), 1);
    }
}
