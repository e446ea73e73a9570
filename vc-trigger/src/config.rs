//! The trigger's part of the throttler's configuration: the `[trigger]` section of the same files
//! the daemon reads (the main file, then `config.d/*.toml` beside it in name order), read here so
//! the trigger needs nothing of the daemon. A file that cannot be read or does not parse, or a
//! `[trigger]` that names an unknown key, is refused whole, naming the file and the key; the
//! daemon's own sections are the daemon's to check.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use ksm_throttler_contract::config_files;
pub use ksm_throttler_contract::names::CONFIG_PATH as DEFAULT_PATH;

pub use ksm_throttler_contract::config_files::ConfigError;

/// The folders the configuration names; `None` turns watching one off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trigger {
    /// The Go runtime's sandbox root (`DIR/sbs/<id>`).
    pub vc_root: Option<PathBuf>,
    /// runtime-rs's sandbox root (`DIR/<id>`).
    pub kata_root: Option<PathBuf>,
}

impl Default for Trigger {
    fn default() -> Self {
        Trigger { vc_root: Some(PathBuf::from("/run/vc")), kata_root: Some(PathBuf::from("/run/kata")) }
    }
}

/// One file, as far as the trigger reads it.
#[derive(Debug, Default, Deserialize)]
struct Layer {
    trigger: Option<TriggerLayer>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct TriggerLayer {
    vc_root: Option<String>,
    kata_root: Option<String>,
}

impl Trigger {
    /// Reads the main file (if present) and its drop-ins over the defaults.
    pub fn load(main: &Path) -> Result<Trigger, ConfigError> {
        let mut trigger = Trigger::default();
        for file in config_files::files(main) {
            trigger.apply_toml(&file, &config_files::read(&file)?)?;
        }
        Ok(trigger)
    }

    /// Lays one file's `[trigger]` over these folders (`""` turns one off).
    pub fn apply_toml(&mut self, file: &Path, text: &str) -> Result<(), ConfigError> {
        let layer: Layer = config_files::parse(file, text)?;
        let Some(t) = layer.trigger else { return Ok(()) };
        let dir = |s: &String| (!s.is_empty()).then(|| PathBuf::from(s));
        if let Some(s) = &t.vc_root {
            self.vc_root = dir(s);
        }
        if let Some(s) = &t.kata_root {
            self.kata_root = dir(s);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_daemons_sections_are_left_to_it_and_a_bad_file_is_refused() {
        let mut t = Trigger::default();
        let file = Path::new("config.toml");
        t.apply_toml(file, "mode = \"adaptive\"\n[aggressive]\nduration = \"1m\"\n[trigger]\nkata-root = \"\"\n")
            .expect("the daemon's sections are not the trigger's to check");
        assert_eq!(t, Trigger { vc_root: Some("/run/vc".into()), kata_root: None });
        let err = t.apply_toml(file, "[trigger\n").unwrap_err();
        assert_eq!((err.key.as_str(), err.file.as_path()), ("line 1", file), "{err}");
        let err = t.apply_toml(file, "[trigger]\nvc-root = 3\n").unwrap_err().to_string();
        assert!(err.contains("config.toml"), "{err}");
    }
}
