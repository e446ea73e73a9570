//! kata-vc-throttler: kicks `org.kata.KsmThrottler` when Kata Containers sandboxes start, as the
//! original virtcontainers trigger did, watching the sandbox folders of both Kata runtimes.

pub mod cli;
pub mod config;
pub mod kicks;
pub mod target;
pub mod watcher;
