//! The contract of `org.kata.KsmThrottler` as its clients (ksmtctl, the sandbox trigger, the
//! metrics exporter, the gRPC shim) and the daemon share it, each fact stated once:
//! - plain data, always: [`names`] (where the throttler is on a bus), [`errors`] (the error
//!   names it answers with), [`accounting`] and [`doctor`] (the Inspect interface's answers),
//!   [`knobs`] (the KSM knob names);
//! - with `client` (the default): [`proxy`], [`address`] (`--bus`), [`kicker`], [`status`] (one
//!   `GetAll` read as ksmtctl shows it), [`logging`] and [`activation`] (systemd's sockets);
//! - with `metrics`: [`metrics`], the throttler and KSM as Prometheus text.
//!
//! Nothing here is of the daemon's own layers: a client built on it links no daemon code.

pub mod accounting;
pub mod doctor;
pub mod errors;
pub mod knobs;
pub mod names;

#[cfg(feature = "client")]
pub mod activation;
#[cfg(feature = "client")]
pub mod address;
#[cfg(feature = "config")]
pub mod config_files;
#[cfg(feature = "client")]
pub mod kicker;
#[cfg(feature = "client")]
pub mod logging;
#[cfg(feature = "metrics")]
pub mod metrics;
#[cfg(feature = "client")]
pub mod private_bus;
#[cfg(feature = "client")]
pub mod proxy;
#[cfg(feature = "client")]
pub mod status;
