//! kata-ksm-throttler: regulates the Linux KSM daemon for hosts that start many similar VMs,
//! served on D-Bus as `org.kata.KsmThrottler`. The layers, from the bottom (ARCHITECTURE.md has
//! one sentence on each):
//! - [`core`]: what to do, as plain values: the settings, the policy, the plan of writes. No I/O,
//!   no async runtime, no clock of its own.
//! - [`io`]: the files: sysfs, /proc/meminfo, the state file, the heap.
//! - [`engine`]: the one task that owns the state; it feeds events to the core and carries the
//!   plan out through `io`.
//! - [`bus`]: the D-Bus face: the object, authorization, error names, call counting, exit on idle.
//! - [`grpc`]: the gRPC face (`ksm.KSMThrottler/Kick` on a Unix socket) for the original Kata
//!   clients, served by the daemon (straight to the engine) or by the shim (over the bus).
//! - [`client`]: what callers use (the proxy, the kicker, `--bus`, ksmtctl); nothing of the above but the
//!   plain data of `core` that the Inspect interface's answers parse into.
//! - [`startup`]: configuration, command line and logging, for the daemon's `main`.

pub mod bus;
pub mod client;
pub mod core;
pub mod engine;
pub mod grpc;
pub mod io;
pub mod names;
pub mod quick_kick;
pub mod startup;
