//! kata-ksm-throttler-grpc: the Kata Containers KSM throttler's gRPC API (`ksm.KSMThrottler`,
//! HTTP/2 path `/ksm.KSMThrottler/Kick`) on a Unix socket, forwarded to `org.kata.KsmThrottler`
//! on D-Bus. The serving code is the daemon's own ([`kata_ksm_throttler::grpc`], which the
//! daemon serves itself with `--grpc-uri`); this crate is the binary that forwards over the bus.

pub mod cli;

pub use kata_ksm_throttler::grpc::{authority_rewrite, conn, proto, server, socket};
