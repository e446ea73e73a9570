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
//! - The clients (ksmtctl, the trigger, the exporter, the shim) build on the bus contract,
//!   `ksm-throttler-contract` (contract/): the names, proxies, error names, the Inspect answers'
//!   data, `--bus` and the kicker, which the daemon takes from there too.
//! - [`startup`]: configuration, command line and logging, for the daemon's `main`.

pub mod bus;
pub mod core;
pub mod engine;
pub mod grpc;
pub mod io;
/// Where the throttler is found on a bus: the contract's, for the daemon's layers and tests.
pub use ksm_throttler_contract::names;

pub mod quick_kick;
pub mod startup;
