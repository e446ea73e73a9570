//! The throttler's configuration files as the daemon and the trigger both read them: the main
//! file (if present), then `config.d/*.toml` beside it in name order, each parsed whole, an error
//! naming the file and the key (or the line). What each reads of them is its own.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {key}: {reason}", file.display())]
pub struct ConfigError {
    pub file: PathBuf,
    /// The key (`aggressive.duration`, `trigger.vc-root`), or `line N` where the file does not parse.
    pub key: String,
    pub reason: String,
}

/// The files to read, in order: `main` if it exists, then its drop-ins.
pub fn files(main: &Path) -> Vec<PathBuf> {
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
    files
}

/// One file's text.
pub fn read(file: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(file).map_err(|e| ConfigError {
        file: file.to_owned(),
        key: "-".into(),
        reason: format!("cannot be read: {e}"),
    })
}

/// One file's text parsed as `T`; a syntax or schema error names the line it is on.
pub fn parse<T: DeserializeOwned>(file: &Path, text: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| text[..s.start.min(text.len())].lines().count().max(1));
        ConfigError {
            file: file.to_owned(),
            key: line.map_or("-".into(), |l| format!("line {l}")),
            reason: e.message().to_owned(),
        }
    })
}
