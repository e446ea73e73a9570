//! The Kata Containers KSM throttler's gRPC API (`ksm.KSMThrottler`, HTTP/2 path
//! `/ksm.KSMThrottler/Kick`) on a Unix socket, so existing Kata deployments keep working. Served
//! two ways, by the same code: by the daemon itself (`--grpc-uri`: a Kick goes straight to the
//! engine, as fast as the original daemon's), or by the separate shim binary
//! `kata-ksm-throttler-grpc`, which forwards each Kick to `org.kata.KsmThrottler` on D-Bus (the
//! HTTP/2 parser in a process of its own, with no capability).

pub mod authority_rewrite;
pub mod conn;
pub mod kick;
pub mod server;
pub mod socket;

/// The generated `ksm` package: the server both binaries serve, the client the tests call.
pub mod proto {
    tonic::include_proto!("ksm");
}
