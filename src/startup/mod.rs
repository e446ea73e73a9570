//! What the daemon's `main` reads before anything runs: configuration files, the command line,
//! logging.

pub mod cli;
pub mod config;
pub mod logging;
