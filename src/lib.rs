//! kata-ksm-throttler: regulates the Linux KSM daemon for hosts that start many similar VMs,
//! served on D-Bus as `org.kata.KsmThrottler`.
//!
//! The core ([`setting`], [`policy`]) is pure; [`engine`] owns the state and applies it through
//! [`sysfs`], [`meminfo`] and [`state_file`]; [`service`] and [`authorize`] are the bus edge.

pub mod authorize;
pub mod bus_error;
pub mod bus_socket;
pub mod cli;
pub mod client;
pub mod config;
pub mod ctl;
pub mod engine;
pub mod heap;
pub mod idle_exit;
pub mod kicker;
pub mod logging;
pub mod meminfo;
pub mod policy;
pub mod private_bus;
pub mod service;
pub mod setting;
pub mod state_file;
pub mod sysfs;
pub mod timer;
