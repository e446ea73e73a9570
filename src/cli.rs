//! The daemon's command line, and `--bus`, which the other binaries share.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::Parser;
use tracing_subscriber::filter::LevelFilter;

use crate::policy::Durations;
use crate::setting::Mode;

/// Which bus to serve on or call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusArg {
    System,
    Session,
    /// A `dbus-daemon` of our own, for hosts with no system bus.
    Private,
    /// Any D-Bus address, e.g. `unix:path=/run/dbus/system_bus_socket`.
    Address(String),
}

impl FromStr for BusArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "system" => BusArg::System,
            "session" => BusArg::Session,
            "private" => BusArg::Private,
            a if a.contains(':') => BusArg::Address(a.to_owned()),
            _ => return Err(format!("{s:?} is not system, session, private or a D-Bus address such as unix:path=/run/dbus/system_bus_socket")),
        })
    }
}

impl BusArg {
    /// A connection builder for an existing bus (`Private` has none: the caller starts it).
    pub fn builder(&self) -> zbus::Result<zbus::connection::Builder<'static>> {
        Ok(match self {
            BusArg::System => zbus::connection::Builder::system(),
            BusArg::Session => zbus::connection::Builder::session(),
            BusArg::Address(a) => zbus::connection::Builder::address(a.as_str()),
            BusArg::Private => {
                return Err(zbus::Error::Address("a private bus has no address until it is started".into()))
            }
        })
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (examples: 30s, 2m, 1m30s, 500ms)"))
}

/// Throttles the Linux KSM daemon (ksmd): aggressive when VMs start (Kick), then stepping down.
#[derive(Debug, Parser)]
#[command(name = "kata-ksm-throttler", version, about)]
pub struct Args {
    /// Bus to serve org.kata.KsmThrottler on: system, session, private (a dbus-daemon of its
    /// own, for hosts with no system bus) or a D-Bus address.
    #[arg(long, default_value = "system", value_parser = BusArg::from_str)]
    pub bus: BusArg,

    /// Start-up mode: throttle (alias auto), initial, off, aggressive, standard or slow.
    #[arg(long, default_value = "throttle", value_parser = Mode::from_str)]
    pub mode: Mode,

    /// The KSM sysfs directory.
    #[arg(long, default_value = "/sys/kernel/mm/ksm", value_name = "DIR")]
    pub sysfs_root: PathBuf,

    /// Where AnonPages is read from.
    #[arg(long, default_value = "/proc/meminfo", value_name = "FILE")]
    pub meminfo: PathBuf,

    /// Where the administrator's settings are kept while changed (survives a crash, not a reboot).
    #[arg(long, default_value = "/run/kata-ksm-throttler", value_name = "DIR")]
    pub state_dir: PathBuf,

    /// How long the aggressive setting lasts after the last kick.
    #[arg(long, default_value = "30s", value_parser = parse_duration, value_name = "DURATION")]
    pub aggressive_duration: Duration,

    /// How long the standard setting lasts.
    #[arg(long, default_value = "2m", value_parser = parse_duration, value_name = "DURATION")]
    pub standard_duration: Duration,

    /// How long the slow setting lasts before the initial settings are restored.
    #[arg(long, default_value = "2m", value_parser = parse_duration, value_name = "DURATION")]
    pub slow_duration: Duration,

    /// Exit after this long idle (still in the start-up mode, initial settings, nothing
    /// scheduled); for D-Bus activation, which starts the daemon again on the next call. Off
    /// unless given (the shipped activation file and unit give 60s).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub exit_idle_after: Option<Duration>,

    /// error, warn, info, debug or trace.
    #[arg(long, default_value = "info", value_name = "LEVEL")]
    pub log_level: LevelFilter,
}

impl Args {
    pub fn durations(&self) -> Durations {
        Durations { aggressive: self.aggressive_duration, standard: self.standard_duration, slow: self.slow_duration }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_argument_forms() {
        assert_eq!("system".parse(), Ok(BusArg::System));
        assert_eq!("private".parse(), Ok(BusArg::Private));
        assert_eq!("unix:path=/x".parse(), Ok(BusArg::Address("unix:path=/x".into())));
        assert!("sytem".parse::<BusArg>().is_err());
    }

    #[test]
    fn defaults_are_the_documented_timeline() {
        let args = Args::try_parse_from(["kata-ksm-throttler"]).expect("parse");
        assert_eq!(args.durations(), Durations::default());
        assert_eq!(args.mode, Mode::Throttle);
        assert_eq!(args.exit_idle_after, None);
    }

    #[test]
    fn durations_and_modes_are_validated() {
        let args = Args::try_parse_from(["x", "--aggressive-duration", "1m30s", "--mode", "auto"]).expect("parse");
        assert_eq!(args.aggressive_duration, Duration::from_secs(90));
        assert_eq!(args.mode, Mode::Throttle);
        let err = Args::try_parse_from(["x", "--slow-duration", "soon"]).unwrap_err().to_string();
        assert!(err.contains("examples"), "{err}");
        let err = Args::try_parse_from(["x", "--mode", "fast"]).unwrap_err().to_string();
        assert!(err.contains("valid modes"), "{err}");
    }
}
