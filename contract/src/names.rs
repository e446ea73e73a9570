//! Where the throttler is found: its names on a bus (every layer that speaks D-Bus names it from
//! here) and its configuration file.

pub const BUS_NAME: &str = "org.kata.KsmThrottler";
pub const OBJECT_PATH: &str = "/org/kata/KsmThrottler";
pub const INTERFACE: &str = "org.kata.KsmThrottler";
pub const INSPECT_INTERFACE: &str = "org.kata.KsmThrottler.Inspect";

/// The configuration file the daemon reads (with `config.d/` beside it); the trigger reads its
/// `[trigger]` section.
pub const CONFIG_PATH: &str = "/etc/kata-ksm-throttler/config.toml";
