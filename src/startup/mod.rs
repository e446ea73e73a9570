//! What the daemon's `main` reads before anything runs: configuration files, the command line,
//! logging; and, for the servers a `.socket` unit starts, the socket systemd passes.

pub mod activation;
pub mod cli;
pub mod config;
pub mod logging;
