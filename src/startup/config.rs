//! The configuration: built-in defaults, then `/etc/kata-ksm-throttler/config.toml`, then
//! `config.d/*.toml` beside it in name order, then the command line. Each file may name only
//! what it changes. A bad file is refused whole, naming the file, the key and the reason.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::core::need::{Gate, Thresholds};
use crate::core::policy::Durations;
use crate::core::setting::{Mode, Profile, Profiles};

use ksm_throttler_contract::config_files;
pub use ksm_throttler_contract::names::CONFIG_PATH as DEFAULT_PATH;

/// The effective configuration of the daemon (and the trigger's folders).
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub mode: Mode,
    pub durations: Durations,
    pub profiles: Profiles,
    pub exit_idle_after: Option<Duration>,
    /// The Go runtime's sandbox root (`DIR/sbs/<id>`); `None` turns watching it off.
    pub vc_root: Option<PathBuf>,
    /// runtime-rs's sandbox root (`DIR/<id>`); `None` turns watching it off.
    pub kata_root: Option<PathBuf>,
    /// The need gate at start-up (SetNeedGate changes it at run time) and its thresholds.
    pub gate: Gate,
    pub need: Thresholds,
    /// Adaptive's profit back-off (`[adaptive] unprofitable-scans`, 0: off).
    pub unprofitable_scans: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            mode: Mode::Throttle,
            durations: Durations::default(),
            profiles: Profiles::default(),
            exit_idle_after: None,
            vc_root: Some(PathBuf::from("/run/vc")),
            kata_root: Some(PathBuf::from("/run/kata")),
            gate: Gate::Always,
            need: Thresholds::default(),
            unprofitable_scans: crate::core::policy::UNPROFITABLE_SCANS,
        }
    }
}

pub use ksm_throttler_contract::config_files::ConfigError;

/// One file's worth of settings: all optional, unknown keys refused (a typo must not pass).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Layer {
    mode: Option<String>,
    exit_idle_after: Option<String>,
    aggressive: Option<ProfileLayer>,
    standard: Option<ProfileLayer>,
    slow: Option<ProfileLayer>,
    trigger: Option<TriggerLayer>,
    need: Option<NeedLayer>,
    adaptive: Option<AdaptiveLayer>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct AdaptiveLayer {
    unprofitable_scans: Option<u64>,
}

/// More full scans than this with a negative profit is a back-off nobody means.
const MAX_UNPROFITABLE_SCANS: u64 = 10_000;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct NeedLayer {
    gate: Option<String>,
    mem_available_below: Option<f64>,
    psi_some_above: Option<f64>,
    hysteresis: Option<f64>,
    min_dwell: Option<String>,
    poll_interval: Option<String>,
}

/// The need gate's poll interval: often enough to see a shortage come, never a busy loop.
const MIN_POLL: Duration = Duration::from_millis(100);
const MAX_POLL: Duration = Duration::from_secs(600);

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ProfileLayer {
    duration: Option<String>,
    anon_divisor: Option<u64>,
    sleep_millisecs: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct TriggerLayer {
    vc_root: Option<String>,
    kata_root: Option<String>,
}

/// ksmd sleeping longer than a minute between batches is a setting nobody means.
const MAX_SLEEP_MILLISECS: u32 = 60_000;

/// The longest duration accepted anywhere: longer ones are a typo, and far larger ones would
/// overflow the clock when a step is scheduled (found by tests/parsers.rs).
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 86_400);

/// A duration as written by a person (`30s`, `2m`, `1m30s`), at most [`MAX_DURATION`].
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration ({e})"))?;
    if d > MAX_DURATION {
        return Err(format!("{s:?} is longer than a year"));
    }
    Ok(d)
}

fn duration(file: &Path, key: &str, s: &str) -> Result<Duration, ConfigError> {
    parse_duration(s).map_err(|e| ConfigError {
        file: file.to_owned(),
        key: key.to_owned(),
        reason: format!("{e}; examples: 30s, 2m, 1m30s"),
    })
}

impl Settings {
    /// Reads the main file (if present) and its drop-ins over the defaults. Returns the files read.
    pub fn load(main: &Path) -> Result<(Settings, Vec<PathBuf>), ConfigError> {
        let mut settings = Settings::default();
        let files = config_files::files(main);
        for file in &files {
            settings.apply_toml(file, &config_files::read(file)?)?;
        }
        Ok((settings, files))
    }

    /// Lays one file's text over these settings.
    pub fn apply_toml(&mut self, file: &Path, text: &str) -> Result<(), ConfigError> {
        let layer: Layer = config_files::parse(file, text)?;
        let err = |key: &str, reason: String| ConfigError { file: file.to_owned(), key: key.to_owned(), reason };
        if let Some(m) = &layer.mode {
            self.mode = m.parse().map_err(|e: crate::core::setting::UnknownMode| err("mode", e.to_string()))?;
        }
        if let Some(s) = &layer.exit_idle_after {
            self.exit_idle_after = match s.as_str() {
                "off" | "never" => None,
                s => Some(duration(file, "exit-idle-after", s)?).filter(|d| !d.is_zero()),
            };
        }
        let sections = [
            ("aggressive", &layer.aggressive, &mut self.durations.aggressive, &mut self.profiles.aggressive),
            ("standard", &layer.standard, &mut self.durations.standard, &mut self.profiles.standard),
            ("slow", &layer.slow, &mut self.durations.slow, &mut self.profiles.slow),
        ];
        for (name, section, lasts, profile) in sections {
            let Some(section) = section else { continue };
            if let Some(d) = &section.duration {
                *lasts = duration(file, &format!("{name}.duration"), d)?;
            }
            if let Some(div) = section.anon_divisor {
                if div == 0 {
                    return Err(err(
                        &format!("{name}.anon-divisor"),
                        "must be at least 1 (pages_to_scan = AnonPages / anon-divisor)".into(),
                    ));
                }
                profile.anon_divisor = div;
            }
            if let Some(ms) = section.sleep_millisecs {
                if ms > MAX_SLEEP_MILLISECS {
                    return Err(err(
                        &format!("{name}.sleep-millisecs"),
                        format!("{ms} is more than {MAX_SLEEP_MILLISECS}"),
                    ));
                }
                profile.sleep_millisecs = ms;
            }
        }
        if let Some(n) = &layer.need {
            self.apply_need(file, n)?;
        }
        if let Some(n) = layer.adaptive.as_ref().and_then(|a| a.unprofitable_scans) {
            if n > MAX_UNPROFITABLE_SCANS {
                return Err(err(
                    "adaptive.unprofitable-scans",
                    format!("{n} is out of range: 0 (off) to {MAX_UNPROFITABLE_SCANS} full scans"),
                ));
            }
            self.unprofitable_scans = n;
        }
        if let Some(t) = &layer.trigger {
            let dir = |s: &String| (!s.is_empty()).then(|| PathBuf::from(s));
            if let Some(s) = &t.vc_root {
                self.vc_root = dir(s);
            }
            if let Some(s) = &t.kata_root {
                self.kata_root = dir(s);
            }
        }
        Ok(())
    }

    /// `[need]`: each value checked against its range, naming the key.
    fn apply_need(&mut self, file: &Path, n: &NeedLayer) -> Result<(), ConfigError> {
        let err = |key: &str, reason: String| ConfigError { file: file.to_owned(), key: format!("need.{key}"), reason };
        if let Some(g) = &n.gate {
            self.gate = g.parse().map_err(|e: crate::core::need::UnknownGate| err("gate", e.to_string()))?;
        }
        let range = |key: &str, v: f64, lo: f64, hi: f64, what: &str| {
            if v.is_finite() && (lo..=hi).contains(&v) {
                Ok(v)
            } else {
                Err(err(key, format!("{v} is out of range: {what}")))
            }
        };
        if let Some(v) = n.mem_available_below {
            self.need.mem_available_below =
                range("mem-available-below", v, 0.0, 1.0, "a share of RAM from 0 (off) to 1, e.g. 0.2")?;
        }
        if let Some(v) = n.psi_some_above {
            self.need.psi_some_above = range("psi-some-above", v, 0.0, 100.0, "a percentage from 0 (off) to 100")?;
        }
        if let Some(v) = n.hysteresis {
            self.need.hysteresis = range("hysteresis", v, 0.0, 0.9, "a share of the threshold from 0 to 0.9")?;
        }
        if let Some(d) = &n.min_dwell {
            self.need.min_dwell = duration(file, "need.min-dwell", d)?;
        }
        if let Some(d) = &n.poll_interval {
            let d = duration(file, "need.poll-interval", d)?;
            if !(MIN_POLL..=MAX_POLL).contains(&d) {
                return Err(err(
                    "poll-interval",
                    format!("{} is out of range: 100ms to 10m", humantime::format_duration(d)),
                ));
            }
            self.need.poll_interval = d;
        }
        if self.gate == Gate::WhenNeeded && self.need.mem_available_below == 0.0 && self.need.psi_some_above == 0.0 {
            return Err(err("gate", "when-needed with both thresholds off (0) could never find memory needed".into()));
        }
        Ok(())
    }

    /// The effective configuration as a TOML file would state it (for `--check-config`).
    pub fn to_toml(&self) -> String {
        #[derive(Serialize)]
        #[serde(rename_all = "kebab-case")]
        struct P {
            duration: String,
            anon_divisor: u64,
            sleep_millisecs: u32,
        }
        #[derive(Serialize)]
        #[serde(rename_all = "kebab-case")]
        struct T {
            vc_root: String,
            kata_root: String,
        }
        #[derive(Serialize)]
        #[serde(rename_all = "kebab-case")]
        struct N {
            gate: String,
            mem_available_below: f64,
            psi_some_above: f64,
            hysteresis: f64,
            min_dwell: String,
            poll_interval: String,
        }
        #[derive(Serialize)]
        #[serde(rename_all = "kebab-case")]
        struct A {
            unprofitable_scans: u64,
        }
        #[derive(Serialize)]
        #[serde(rename_all = "kebab-case")]
        struct Out {
            mode: String,
            exit_idle_after: String,
            aggressive: P,
            standard: P,
            slow: P,
            trigger: T,
            need: N,
            adaptive: A,
        }
        let p = |d: Duration, p: Profile| P {
            duration: humantime::format_duration(d).to_string(),
            anon_divisor: p.anon_divisor,
            sleep_millisecs: p.sleep_millisecs,
        };
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
        let out = Out {
            mode: self.mode.to_string(),
            exit_idle_after: self.exit_idle_after.map_or("off".into(), |d| humantime::format_duration(d).to_string()),
            aggressive: p(self.durations.aggressive, self.profiles.aggressive),
            standard: p(self.durations.standard, self.profiles.standard),
            slow: p(self.durations.slow, self.profiles.slow),
            trigger: T { vc_root: path(&self.vc_root), kata_root: path(&self.kata_root) },
            need: N {
                gate: self.gate.to_string(),
                mem_available_below: self.need.mem_available_below,
                psi_some_above: self.need.psi_some_above,
                hysteresis: self.need.hysteresis,
                min_dwell: humantime::format_duration(self.need.min_dwell).to_string(),
                poll_interval: humantime::format_duration(self.need.poll_interval).to_string(),
            },
            adaptive: A { unprofitable_scans: self.unprofitable_scans },
        };
        toml::to_string(&out).unwrap_or_else(|e| format!("# cannot be shown: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(text: &str) -> Result<Settings, ConfigError> {
        let mut s = Settings::default();
        s.apply_toml(Path::new("/etc/x.toml"), text).map(|()| s)
    }

    #[test]
    fn the_shipped_file_states_the_defaults() {
        let shipped = include_str!("../../config/config.toml");
        assert_eq!(apply(shipped).expect("parses"), Settings::default());
        // Uncommented, every line still holds: the comments tell the truth about the defaults.
        let uncommented: String = shipped
            .lines()
            .filter(|l| l.starts_with('#') && !l.starts_with("# ") && l.len() > 1)
            .map(|l| format!("{}\n", l[1..].split("  #").next().unwrap_or_default()))
            .collect();
        assert!(uncommented.contains("[aggressive]"), "{uncommented}");
        assert_eq!(apply(&uncommented).expect("uncommented parses"), Settings::default(), "{uncommented}");
    }

    #[test]
    fn an_empty_file_changes_nothing() {
        assert_eq!(apply("").expect("ok"), Settings::default());
    }

    #[test]
    fn every_key() {
        let s = apply(
            r#"
mode = "adaptive"
exit-idle-after = "60s"
[aggressive]
duration = "45s"
anon-divisor = 20
sleep-millisecs = 2
[slow]
duration = "10m"
[trigger]
vc-root = ""
kata-root = "/run/kata2"
"#,
        )
        .expect("ok");
        assert_eq!(s.mode, Mode::Adaptive);
        assert_eq!(s.exit_idle_after, Some(Duration::from_secs(60)));
        assert_eq!(s.durations.aggressive, Duration::from_secs(45));
        assert_eq!(s.profiles.aggressive, Profile { sleep_millisecs: 2, anon_divisor: 20 });
        assert_eq!(s.durations.slow, Duration::from_secs(600));
        assert_eq!(s.durations.standard, Durations::default().standard, "unnamed keys keep their value");
        assert_eq!(s.vc_root, None, "an empty folder turns watching it off");
        assert_eq!(s.kata_root, Some(PathBuf::from("/run/kata2")));
    }

    #[test]
    fn bad_files_name_the_file_the_key_and_the_reason() {
        let e = apply("[aggressive]\nduration = \"soon\"\n").unwrap_err();
        assert_eq!((e.file.as_path(), e.key.as_str()), (Path::new("/etc/x.toml"), "aggressive.duration"));
        assert!(e.reason.contains("soon"), "{e}");
        let e = apply("mode = \"fast\"\n").unwrap_err();
        assert_eq!(e.key, "mode");
        assert!(e.reason.contains("valid modes"), "{e}");
        let e = apply("[standard]\nanon-divisor = 0\n").unwrap_err();
        assert_eq!(e.key, "standard.anon-divisor");
        let e = apply("\n\n[agressive]\nduration = \"1s\"\n").unwrap_err();
        assert_eq!(e.key, "line 3", "{e}");
        assert!(e.reason.contains("agressive"), "{e}");
        let e = apply("[slow]\nsleep-millisecs = -5\n").unwrap_err();
        assert_eq!(e.key, "line 2", "{e}");
        assert!(e.to_string().starts_with("/etc/x.toml: line 2: "), "{e}");
    }

    #[test]
    fn the_need_table_and_its_ranges() {
        let s = apply(
            "[need]\ngate = \"when-needed\"\nmem-available-below = 0.1\npsi-some-above = 0\nhysteresis = 0.5\n\
             min-dwell = \"1m\"\npoll-interval = \"2s\"\n",
        )
        .expect("ok");
        assert_eq!(s.gate, Gate::WhenNeeded);
        assert_eq!(
            s.need,
            Thresholds {
                mem_available_below: 0.1,
                psi_some_above: 0.0,
                hysteresis: 0.5,
                min_dwell: Duration::from_secs(60),
                poll_interval: Duration::from_secs(2),
            }
        );
        for (text, key) in [
            ("mem-available-below = 1.5", "need.mem-available-below"),
            ("mem-available-below = -0.1", "need.mem-available-below"),
            ("mem-available-below = nan", "need.mem-available-below"),
            ("psi-some-above = 101.0", "need.psi-some-above"),
            ("hysteresis = 1.0", "need.hysteresis"),
            ("min-dwell = \"soon\"", "need.min-dwell"),
            ("poll-interval = \"10ms\"", "need.poll-interval"),
            ("poll-interval = \"1h\"", "need.poll-interval"),
            ("gate = \"sometimes\"", "need.gate"),
            ("gate = \"when-needed\"\nmem-available-below = 0\npsi-some-above = 0", "need.gate"),
        ] {
            let e = apply(&format!("[need]\n{text}\n")).unwrap_err();
            assert_eq!((e.file.as_path(), e.key.as_str()), (Path::new("/etc/x.toml"), key), "{text}: {e}");
        }
        assert_eq!(apply("[adaptive]\nunprofitable-scans = 0\n").expect("off").unprofitable_scans, 0);
        let e = apply("[adaptive]\nunprofitable-scans = 100000\n").unwrap_err();
        assert_eq!(e.key, "adaptive.unprofitable-scans", "{e}");
        let e = apply("[need]\npsi-some-above = 101.0\n").unwrap_err();
        assert!(e.to_string().starts_with("/etc/x.toml: need.psi-some-above: 101 is out of range"), "{e}");
    }

    #[test]
    fn drop_ins_override_the_main_file_in_name_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let main = dir.path().join("config.toml");
        std::fs::write(&main, "mode = \"off\"\n[aggressive]\nduration = \"1m\"\n").expect("write");
        std::fs::create_dir(dir.path().join("config.d")).expect("mkdir");
        std::fs::write(dir.path().join("config.d/20-b.toml"), "mode = \"slow\"\n").expect("write");
        std::fs::write(dir.path().join("config.d/10-a.toml"), "mode = \"standard\"\n").expect("write");
        std::fs::write(dir.path().join("config.d/README"), "not toml, not read").expect("write");
        let (s, files) = Settings::load(&main).expect("load");
        assert_eq!(files.len(), 3);
        assert_eq!(s.mode.as_str(), "slow", "the last drop-in wins");
        assert_eq!(s.durations.aggressive, Duration::from_secs(60));
    }

    #[test]
    fn no_file_at_all_is_the_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (s, files) = Settings::load(&dir.path().join("config.toml")).expect("load");
        assert_eq!((s, files.len()), (Settings::default(), 0));
    }

    #[test]
    fn the_printed_configuration_reads_back_the_same() {
        let s = apply(
            "mode = \"adaptive\"\n[standard]\nduration = \"90s\"\n[trigger]\nkata-root = \"\"\n\
             [need]\ngate = \"when-needed\"\nmem-available-below = 0.35\nmin-dwell = \"45s\"\n\
             [adaptive]\nunprofitable-scans = 20\n",
        )
        .expect("ok");
        let printed = s.to_toml();
        assert_eq!(apply(&printed).expect("reads back"), s, "{printed}");
    }
}
