//! The daemon's command line.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::Parser;
use tracing_subscriber::filter::LevelFilter;

use crate::core::setting::Mode;
use crate::startup::config::Settings;
use ksm_throttler_contract::address::BusArg;

/// `--mode`: clap lists the modes in the help, from [`Mode::ALL`].
fn mode_parser() -> impl clap::builder::TypedValueParser<Value = Mode> {
    use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
    let values = Mode::ALL.map(|m| {
        let aliases = Mode::ALIASES.iter().filter(move |(_, to)| *to == m).map(|(alias, _)| *alias);
        PossibleValue::new(m.as_str()).aliases(aliases)
    });
    PossibleValuesParser::new(values).try_map(|s| s.parse::<Mode>())
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    crate::startup::config::parse_duration(s).map_err(|e| format!("{e} (examples: 30s, 2m, 1m30s, 500ms)"))
}

/// Throttles the Linux KSM daemon (ksmd): aggressive when VMs start (Kick), then stepping down.
#[derive(Debug, Parser)]
#[command(name = "kata-ksm-throttler", version, about)]
pub struct Args {
    /// Bus to serve org.kata.KsmThrottler on: system, session, private (a dbus-daemon of its
    /// own, for hosts with no system bus) or a D-Bus address.
    #[arg(long, default_value = "system", value_parser = BusArg::from_str)]
    pub bus: BusArg,

    /// Start-up mode [config: mode; default throttle].
    #[arg(long, value_parser = mode_parser())]
    pub mode: Option<Mode>,

    /// The KSM sysfs directory.
    #[arg(long, default_value = "/sys/kernel/mm/ksm", value_name = "DIR")]
    pub sysfs_root: PathBuf,

    /// Where AnonPages is read from.
    #[arg(long, default_value = "/proc/meminfo", value_name = "FILE")]
    pub meminfo: PathBuf,

    /// The proc root: where ksmd's CPU time (`PID/stat`, `PID/schedstat`) and memory pressure
    /// (`pressure/memory`) are read, and what the Inspect interface walks (Sandboxes, Doctor).
    #[arg(long, default_value = "/proc", value_name = "DIR")]
    pub proc_root: PathBuf,

    /// Where the administrator's settings are kept while changed (survives a crash, not a reboot).
    #[arg(long, default_value = "/run/kata-ksm-throttler", value_name = "DIR")]
    pub state_dir: PathBuf,

    /// Also serve the original daemon's gRPC API (ksm.KSMThrottler/Kick) on this Unix socket (a
    /// path, or unix://PATH), kicks going straight to the engine: the socket's permissions (0660)
    /// are the gate, as they were the original's. Turns exit on idle off. Without it, the shim
    /// kata-ksm-throttler-grpc serves that API over the bus.
    #[arg(long, value_name = "PATH")]
    pub grpc_uri: Option<String>,

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
    #[arg(long, default_value = crate::startup::config::DEFAULT_PATH, value_name = "FILE")]
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
        for name in Mode::NAMES {
            assert!(err.contains(name), "{err} lacks {name}");
        }
        let alias = Args::try_parse_from(["x", "--mode", "auto"]).expect("the alias parses");
        assert_eq!(alias.mode, Some(Mode::Throttle));
    }
}
