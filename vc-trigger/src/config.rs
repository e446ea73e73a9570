//! The trigger's part of the throttler's configuration: the `[trigger]` section of the same files
//! the daemon reads (the main file, then `config.d/*.toml` beside it in name order), read here so
//! the trigger needs nothing of the daemon. A file that cannot be read or does not parse, or a
//! `[trigger]` that names an unknown key, is refused whole, naming the file and the key; the
//! daemon's own sections are the daemon's to check.

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use ksm_throttler_contract::names::CONFIG_PATH as DEFAULT_PATH;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {key}: {reason}", file.display())]
pub struct ConfigError {
    pub file: PathBuf,
    /// The key (`trigger.vc-root`), or `line N` where the file does not parse.
    pub key: String,
    pub reason: String,
}

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
        let mut files = vec![];
        if main.exists() {
            files.push(main.to_owned());
        }
        let dropins = main.parent().unwrap_or(Path::new("/")).join("config.d");
        if let Ok(entries) = std::fs::read_dir(&dropins) {
            let mut more: Vec<_> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                .collect();
            more.sort();
            files.extend(more);
        }
        for file in &files {
            let text = std::fs::read_to_string(file).map_err(|e| ConfigError {
                file: file.clone(),
                key: "-".into(),
                reason: format!("cannot be read: {e}"),
            })?;
            trigger.apply_toml(file, &text)?;
        }
        Ok(trigger)
    }

    /// Lays one file's `[trigger]` over these folders (`""` turns one off).
    pub fn apply_toml(&mut self, file: &Path, text: &str) -> Result<(), ConfigError> {
        let layer: Layer = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| text[..s.start.min(text.len())].lines().count().max(1));
            ConfigError {
                file: file.to_owned(),
                key: line.map_or("-".into(), |l| format!("line {l}")),
                reason: e.message().to_owned(),
            }
        })?;
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
