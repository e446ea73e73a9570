//! What callers of the throttler use: the gRPC shim, the sandbox trigger, ksmtctl and tests. It
//! imports nothing of the daemon's own layers, so a client builds on the bus contract alone.

pub mod address;
pub mod ctl;
pub mod inspect;
pub mod kicker;
pub mod ksm_files;
pub mod metrics;
pub mod proxy;
