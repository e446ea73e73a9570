//! kata-ksm-throttler-grpc: the Kata Containers KSM throttler's gRPC API (`ksm.KSMThrottler`,
//! HTTP/2 path `/ksm.KSMThrottler/Kick`) on a Unix socket, forwarded to `org.kata.KsmThrottler`
//! on D-Bus, so existing Kata deployments keep working.

pub mod authority_rewrite;
pub mod cli;
pub mod conn;
pub mod server;
pub mod socket;

/// The generated `ksm` package: the server the binary serves, the client the tests call.
pub mod proto {
    tonic::include_proto!("ksm");
}
