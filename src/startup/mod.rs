//! What the daemon's `main` reads before anything runs: configuration files and the command line
//! (logging and socket activation are the contract crate's, shared with the other binaries).

pub mod cli;
pub mod config;
