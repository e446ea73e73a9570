//! Calls `Kick` once on the Kata KSM throttler's gRPC socket, the way an existing Kata client
//! does: plain HTTP/2 on a Unix socket, path `/ksm.KSMThrottler/Kick`, `google.protobuf.Empty`
//! both ways. Written from the wire contract only (no generated code shared with the shim), so
//! the end-to-end check proves compatibility rather than agreement with itself.
//!
//!     ksm-e2e-grpc-kick [SOCKET]   (default /run/kata-ksm-throttler/ksm.sock)
//!
//! Exits 0 and prints `OK` when the call returns status OK; otherwise prints the gRPC status
//! code and message on one line and exits 1.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use hyper_util::rt::TokioIo;
use tonic::transport::{Endpoint, Uri};

const DEFAULT_SOCKET: &str = "/run/kata-ksm-throttler/ksm.sock";
const KICK: &str = "/ksm.KSMThrottler/Kick";

async fn kick(socket: PathBuf) -> Result<()> {
    // The URI is required by the API and ignored: every connection goes to the socket.
    let channel = Endpoint::from_static("http://localhost")
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(30))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { tokio::net::UnixStream::connect(socket).await.map(TokioIo::new) }
        }))
        .await
        .context("connecting")?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.context("waiting for the connection")?;
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    let path = http::uri::PathAndQuery::from_static(KICK);
    grpc.unary(tonic::Request::new(()), path, codec).await?;
    Ok(())
}

fn main() -> ExitCode {
    let socket = std::env::args_os().nth(1).map_or_else(|| PathBuf::from(DEFAULT_SOCKET), PathBuf::from);
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ksm-e2e-grpc-kick: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(kick(socket.clone())) {
        Ok(()) => {
            println!("OK");
            ExitCode::SUCCESS
        }
        Err(e) => {
            match e.downcast_ref::<tonic::Status>() {
                Some(status) => println!("{:?}: {}", status.code(), status.message()),
                None => println!("{}: {e:#}", socket.display()),
            }
            ExitCode::FAILURE
        }
    }
}
