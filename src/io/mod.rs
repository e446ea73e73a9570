//! The files the engine reads and writes, each behind a typed error.

pub mod heap;
pub mod ksmd;
pub mod meminfo;
pub mod pressure;
pub mod procwalk;
pub mod small_file;
pub mod state_file;
pub mod sysfs;
