//! Where the throttler is found on a bus: every layer that speaks D-Bus names it from here.

pub const BUS_NAME: &str = "org.kata.KsmThrottler";
pub const OBJECT_PATH: &str = "/org/kata/KsmThrottler";
pub const INTERFACE: &str = "org.kata.KsmThrottler";
pub const INSPECT_INTERFACE: &str = "org.kata.KsmThrottler.Inspect";
