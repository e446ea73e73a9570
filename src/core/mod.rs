//! What the throttler does, as plain values: no files, no bus, no runtime, no clock of its own
//! (every function is given the time).

pub mod knobs;
pub mod need;
pub(crate) mod plan;
pub mod policy;
pub mod setting;
