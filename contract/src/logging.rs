//! Logging, set up once: to the journal when stderr is the journal, else readable text on stderr.

use std::io::IsTerminal;
use std::os::fd::AsFd;

use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::prelude::*;

/// Whether stderr is the journal stream systemd names in `JOURNAL_STREAM` (`device:inode`).
fn stderr_is_journal() -> bool {
    let Some(expected) = std::env::var_os("JOURNAL_STREAM") else { return false };
    let Ok(stat) = rustix::fs::fstat(std::io::stderr().as_fd()) else { return false };
    expected.to_string_lossy() == format!("{}:{}", stat.st_dev, stat.st_ino)
}

pub fn init(level: LevelFilter) {
    init_as("kata-ksm-throttler", level);
}

/// As [`init`], for the project's other binaries: `identifier` names them in the journal.
pub fn init_as(identifier: &str, level: LevelFilter) {
    let registry = tracing_subscriber::registry().with(level);
    if stderr_is_journal() {
        if let Ok(journald) = tracing_journald::layer() {
            // Fields under their own names (FROM, TO, CAUSE, ...), as the README documents them,
            // not tracing-journald's default F_FROM, F_TO, ...
            registry.with(journald.with_syslog_identifier(identifier.to_owned()).with_field_prefix(None)).init();
            return;
        }
    }
    registry
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_target(false)
                .with_ansi(std::io::stderr().is_terminal()),
        )
        .init();
}
