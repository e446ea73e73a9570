//! The command line, in the library so the man page and completions are built from it.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::Parser;
use tracing_subscriber::filter::LevelFilter;

use ksm_throttler_contract::address::BusArg;

use crate::config::{ConfigError, Trigger, DEFAULT_PATH};

/// Kicks the KSM throttler (org.kata.KsmThrottler on D-Bus) whenever a Kata Containers sandbox
/// starts, watching the sandbox folders of both Kata runtimes with inotify.
#[derive(Debug, Parser)]
#[command(name = "kata-vc-throttler", version)]
pub struct Args {
    /// The throttler's configuration file (and its config.d/); its [trigger] section names the
    /// folders to watch, and the flags below win over it.
    #[arg(long, default_value = DEFAULT_PATH, value_name = "FILE")]
    pub config: PathBuf,

    /// The Go runtime's (Kata 1.x-3.x) folder: sandboxes are DIR/sbs/<id> [config: trigger.vc-root;
    /// default /run/vc].
    #[arg(long, value_name = "DIR")]
    pub root: Option<PathBuf>,

    /// Do not watch --root.
    #[arg(long)]
    pub no_root: bool,

    /// The Rust runtime-rs (Kata 3.x) folder: sandboxes are DIR/<id> [config: trigger.kata-root;
    /// default /run/kata].
    #[arg(long, value_name = "DIR")]
    pub kata_root: Option<PathBuf>,

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

/// The folders to watch, as the configuration files and the flags over them name them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Folders {
    /// The Go runtime's root (its sandboxes are in `sbs/` below it).
    pub vc_root: Option<PathBuf>,
    pub kata_root: Option<PathBuf>,
}

impl Args {
    /// Reads the configuration files (a bad one is refused whole, as the daemon refuses it) and
    /// lays the flags over their `[trigger]` section.
    pub fn folders(&self) -> Result<Folders, ConfigError> {
        Ok(self.folders_over(&Trigger::load(&self.config)?))
    }

    fn folders_over(&self, settings: &Trigger) -> Folders {
        let pick = |off: bool, flag: &Option<PathBuf>, file: &Option<PathBuf>| {
            if off {
                None
            } else {
                flag.clone().or_else(|| file.clone())
            }
        };
        Folders {
            vc_root: pick(self.no_root, &self.root, &settings.vc_root),
            kata_root: pick(self.no_kata_root, &self.kata_root, &settings.kata_root),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(argv: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("kata-vc-throttler").chain(argv.iter().copied())).expect("parses")
    }

    #[test]
    fn the_trigger_section_names_the_folders_and_the_flags_win() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("config.toml");
        let config_arg = config.to_str().expect("utf-8");

        // No file: the built-in folders.
        let f = args(&["--config", config_arg]).folders().expect("no file is fine");
        assert_eq!(f.vc_root.as_deref(), Some(std::path::Path::new("/run/vc")));
        assert_eq!(f.kata_root.as_deref(), Some(std::path::Path::new("/run/kata")));

        std::fs::write(&config, "[trigger]\nvc-root = \"/srv/vc\"\nkata-root = \"\"\n").expect("write");
        let f = args(&["--config", config_arg]).folders().expect("reads");
        assert_eq!(f, Folders { vc_root: Some("/srv/vc".into()), kata_root: None }, "\"\" turns one off");

        // A drop-in is laid over the main file, and a flag over both.
        std::fs::create_dir(dir.path().join("config.d")).expect("mkdir");
        std::fs::write(dir.path().join("config.d/10-kata.toml"), "[trigger]\nkata-root = \"/srv/kata\"\n")
            .expect("write");
        let f = args(&["--config", config_arg, "--root", "/x"]).folders().expect("reads");
        assert_eq!(f, Folders { vc_root: Some("/x".into()), kata_root: Some("/srv/kata".into()) });
        let f = args(&["--config", config_arg, "--no-root", "--no-kata-root"]).folders().expect("reads");
        assert_eq!(f, Folders { vc_root: None, kata_root: None });

        // A bad file is refused with the file and key named.
        std::fs::write(&config, "[trigger]\nvc-rot = \"/srv/vc\"\n").expect("write");
        let err = args(&["--config", config_arg]).folders().unwrap_err().to_string();
        assert!(err.contains("config.toml") && err.contains("vc-rot"), "{err}");
    }
}
