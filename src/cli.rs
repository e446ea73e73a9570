//! The daemon's command line, and `--bus`, which the other binaries share.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::Parser;
use tracing_subscriber::filter::LevelFilter;

use crate::config::Settings;
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
    /// The address of an existing bus (`Private` has none until the caller starts it).
    pub fn address(&self) -> zbus::Result<zbus::Address> {
        match self {
            BusArg::System => zbus::Address::system(),
            BusArg::Session => zbus::Address::session(),
            BusArg::Address(a) => a.parse(),
            BusArg::Private => Err(zbus::Error::Address("a private bus has no address until it is started".into())),
        }
    }

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
    crate::config::parse_duration(s).map_err(|e| format!("{e} (examples: 30s, 2m, 1m30s, 500ms)"))
}

/// Throttles the Linux KSM daemon (ksmd): aggressive when VMs start (Kick), then stepping down.
#[derive(Debug, Parser)]
#[command(name = "kata-ksm-throttler", version, about)]
pub struct Args {
    /// Bus to serve org.kata.KsmThrottler on: system, session, private (a dbus-daemon of its
    /// own, for hosts with no system bus) or a D-Bus address.
    #[arg(long, default_value = "system", value_parser = BusArg::from_str)]
    pub bus: BusArg,

    /// Start-up mode: throttle (alias auto), adaptive, initial, off, aggressive, standard or slow
    /// [config: mode; default throttle].
    #[arg(long, value_parser = Mode::from_str)]
    pub mode: Option<Mode>,

    /// The KSM sysfs directory.
    #[arg(long, default_value = "/sys/kernel/mm/ksm", value_name = "DIR")]
    pub sysfs_root: PathBuf,

    /// Where AnonPages is read from.
    #[arg(long, default_value = "/proc/meminfo", value_name = "FILE")]
    pub meminfo: PathBuf,

    /// Where the administrator's settings are kept while changed (survives a crash, not a reboot).
    #[arg(long, default_value = "/run/kata-ksm-throttler", value_name = "DIR")]
    pub state_dir: PathBuf,

    /// How long the aggressive setting lasts after the last kick [config: aggressive.duration; default 30s].
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub aggressive_duration: Option<Duration>,

    /// How long the standard setting lasts [config: standard.duration; default 2m].
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub standard_duration: Option<Duration>,

    /// How long the slow setting lasts before the initial settings are restored
    /// [config: slow.duration; default 2m].
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub slow_duration: Option<Duration>,

    /// Exit after this long idle (still in the start-up mode, initial settings, nothing
    /// scheduled); for D-Bus activation, which starts the daemon again on the next call
    /// [config: exit-idle-after; default off; the shipped activation file and unit give 60s].
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub exit_idle_after: Option<Duration>,

    /// The configuration file; `config.d/*.toml` beside it are read after it, in name order.
    /// Command-line flags override both. Re-read on SIGHUP.
    #[arg(long, default_value = crate::config::DEFAULT_PATH, value_name = "FILE")]
    pub config: PathBuf,

    /// Validate the configuration, print the effective one, and exit (1 if it is invalid).
    #[arg(long)]
    pub check_config: bool,

    /// error, warn, info, debug or trace.
    #[arg(long, default_value = "info", value_name = "LEVEL")]
    pub log_level: LevelFilter,
}

impl Args {
    /// The files' settings with this command line laid over them.
    pub fn over(&self, mut settings: Settings) -> Settings {
        if let Some(m) = self.mode {
            settings.mode = m;
        }
        let d = &mut settings.durations;
        for (flag, lasts) in [
            (self.aggressive_duration, &mut d.aggressive),
            (self.standard_duration, &mut d.standard),
            (self.slow_duration, &mut d.slow),
        ] {
            if let Some(flag) = flag {
                *lasts = flag;
            }
        }
        if self.exit_idle_after.is_some() {
            settings.exit_idle_after = self.exit_idle_after.filter(|d| !d.is_zero());
        }
        settings
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
    fn no_flags_leave_the_files_settings_alone() {
        let args = Args::try_parse_from(["kata-ksm-throttler"]).expect("parse");
        let mut file = Settings { mode: Mode::Adaptive, ..Settings::default() };
        file.durations.slow = Duration::from_secs(1);
        assert_eq!(args.over(file.clone()), file);
        assert_eq!(args.config, std::path::Path::new("/etc/kata-ksm-throttler/config.toml"));
    }

    #[test]
    fn flags_override_the_files() {
        let args =
            Args::try_parse_from(["x", "--aggressive-duration", "1m30s", "--mode", "auto", "--exit-idle-after", "0s"])
                .expect("parse");
        let file = Settings { mode: Mode::Off, exit_idle_after: Some(Duration::from_secs(60)), ..Settings::default() };
        let s = args.over(file);
        assert_eq!(s.durations.aggressive, Duration::from_secs(90));
        assert_eq!(s.mode, Mode::Throttle);
        assert_eq!(s.exit_idle_after, None, "0 turns it off");
    }

    #[test]
    fn durations_and_modes_are_validated() {
        let err = Args::try_parse_from(["x", "--slow-duration", "soon"]).unwrap_err().to_string();
        assert!(err.contains("examples"), "{err}");
        let err = Args::try_parse_from(["x", "--mode", "fast"]).unwrap_err().to_string();
        assert!(err.contains("valid modes"), "{err}");
    }
}
