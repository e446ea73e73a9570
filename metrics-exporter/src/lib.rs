//! kata-ksm-throttler-exporter: `/metrics` over HTTP for Prometheus, from the contract crate's
//! `metrics` (one `GetAll` of the throttler, never activating it, and the KSM files).
//!
//! - [`cli`]: the flags (in the library, for the man page);
//! - [`listen`]: the listening socket, passed by systemd (`LISTEN_FDS`) or bound here;
//! - [`server`]: HTTP/1.1, a bounded number of connections, and scrapes that arrive together
//!   answered by one read of the bus.

pub mod cli;
pub mod listen;
pub mod server;

/// The default port: outside 9100-9999, which Prometheus's list of exporter ports has filled,
/// and below the kernel's ephemeral range (docs/fleet.md).
pub const DEFAULT_PORT: u16 = 17917;
