//! What the throttler does, as plain values: no files, no bus, no runtime, no clock of its own
//! (every function is given the time).

pub mod accounting;
pub mod doctor;
pub mod knobs;
pub mod lifecycle;
pub mod need;
pub(crate) mod plan;
pub mod policy;
pub mod sandbox;
pub mod setting;
pub mod timers;
pub mod transitions;
pub mod verdicts;
pub mod written;
