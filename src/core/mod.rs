//! What the throttler does, as plain values: no files, no bus, no runtime, no clock of its own
//! (every function is given the time).

pub mod accounting;
pub mod doctor;
pub mod knobs;
pub mod need;
pub(crate) mod plan;
pub mod policy;
pub mod sandbox;
pub mod setting;
pub mod transitions;
pub mod written;
