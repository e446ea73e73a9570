//! The ksm.KSMThrottler service, handing each Kick to the engine or the bus, and the limits that keep
//! misbehaving peers from starving the others or the host.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use crate::grpc::authority_rewrite::Bounds;
use crate::grpc::conn;
use crate::grpc::kick::Kick;
use crate::grpc::proto::ksm_throttler_server::{KsmThrottler, KsmThrottlerServer};
use ksm_throttler_contract::kicker::KickError;

/// Every bound the server enforces. Per connection: the 64 KiB connection window of request data,
/// decoded headers of at most 4 streams × 16 KiB, a header block of at most 64 KiB being
/// rewritten, two 4 KiB HPACK tables and h2's buffers.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Open connections at once; when all are taken, a new one closes one of the peer (uid) holding the most, or the one idle the longest.
    pub max_connections: usize,
    /// A peer must send the HTTP/2 preface within this, or is dropped.
    pub handshake_timeout: Duration,
    /// After this a connection is told to go away (GOAWAY); clients reconnect on their next call.
    pub max_connection_age: Duration,
    /// ...and closed this long after that, whatever it is doing.
    pub max_connection_age_grace: Duration,
    /// HTTP/2 PING every this long; a peer that does not answer within the timeout is dropped.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// Calls in flight on one connection (SETTINGS_MAX_CONCURRENT_STREAMS).
    pub max_concurrent_streams: u32,
    /// Decoded request headers of one call (SETTINGS_MAX_HEADER_LIST_SIZE); gRPC's are ~200 bytes.
    pub max_header_list_size: u32,
    /// The largest frame a peer may send (SETTINGS_MAX_FRAME_SIZE; 16 KiB is HTTP/2's minimum).
    pub max_frame_size: u32,
    /// A header block held while its `:authority` is looked at (encoded, and decoded): larger
    /// ones close the connection. Above `max_header_list_size`, so that h2 refuses the call
    /// itself up to here.
    pub max_rewritten_block: usize,
    /// Flow-control windows: request data buffered per connection and per call.
    pub connection_window: u32,
    pub stream_window: u32,
    /// A call's request message (an Empty is 0 bytes).
    pub max_message_size: usize,
    /// The whole call, server side.
    pub call_timeout: Duration,
}

impl Limits {
    /// The defaults, with `kick_timeout` bounding the bus call inside each gRPC call.
    pub fn new(kick_timeout: Duration) -> Limits {
        Limits {
            max_connections: 256,
            handshake_timeout: Duration::from_secs(10),
            max_connection_age: Duration::from_secs(60),
            max_connection_age_grace: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(20),
            keepalive_timeout: Duration::from_secs(10),
            max_concurrent_streams: 4,
            max_header_list_size: 16 * 1024,
            max_frame_size: 16 * 1024,
            max_rewritten_block: 64 * 1024,
            connection_window: 64 * 1024,
            stream_window: 16 * 1024,
            max_message_size: 1024,
            call_timeout: kick_timeout + Duration::from_secs(1),
        }
    }
}

/// Serves Kick with `K`: the engine (in the daemon) or the bus (in the shim).
pub struct KickService<K> {
    kick: Arc<K>,
    /// Whether the last call reached the throttler: failures are logged when this changes, so a
    /// flood of calls while the throttler is down does not flood the log.
    reachable: AtomicBool,
}

impl<K: Kick> KickService<K> {
    pub fn new(kick: Arc<K>) -> KickService<K> {
        KickService { kick, reachable: AtomicBool::new(true) }
    }
}

#[tonic::async_trait]
impl<K: Kick> KsmThrottler for KickService<K> {
    async fn kick(&self, request: Request<()>) -> Result<Response<()>, Status> {
        // The connection is busy until the call ends: not the one closed to make room.
        let _busy = request.extensions().get::<conn::ConnInfo>().map(conn::ConnInfo::call);
        let result = self.kick.kick().await;
        let reachable = !matches!(result, Err(KickError::Unreachable(_)));
        if self.reachable.swap(reachable, Ordering::Relaxed) != reachable {
            match &result {
                Err(e) => tracing::warn!("{e}; Kick calls fail with UNAVAILABLE until it is back"),
                Ok(()) => tracing::info!("the throttler is reachable again"),
            }
        }
        match result {
            Ok(()) => Ok(Response::new(())),
            Err(e @ KickError::Unreachable(_)) => Err(Status::unavailable(e.to_string())),
            Err(e @ KickError::Denied(_)) => Err(Status::permission_denied(e.to_string())),
            // The throttler received the kick and keeps it to apply once it can (it retries);
            // the original daemon never failed a Kick, and its Go trigger exits on an error, so
            // old clients are answered OK. D-Bus callers still get the specific error.
            Err(e @ KickError::Failed { .. }) => {
                tracing::warn!("{e}; answered OK, as the original throttler did: it retries the kick");
                Ok(Response::new(()))
            }
        }
    }
}

/// Serves until `shutdown` completes, then lets calls in flight finish for up to `drain`;
/// `intake` pauses and resumes accepting meanwhile (see [`conn::Intake`]).
pub async fn serve<K: Kick>(
    listener: tokio::net::UnixListener,
    kick: Arc<K>,
    limits: &Limits,
    intake: &conn::Intake,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) -> Result<(), tonic::transport::Error> {
    let service = KsmThrottlerServer::new(KickService::new(kick)).max_decoding_message_size(limits.max_message_size);
    let bounds = Bounds {
        max_frame: limits.max_frame_size as usize,
        max_block: limits.max_rewritten_block,
        max_headers: limits.max_rewritten_block,
    };
    let incoming = conn::incoming(listener, limits.max_connections, limits.handshake_timeout, bounds, intake);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tonic::transport::Server::builder()
        .timeout(limits.call_timeout)
        .max_concurrent_streams(limits.max_concurrent_streams)
        .concurrency_limit_per_connection(limits.max_concurrent_streams as usize)
        .http2_max_header_list_size(limits.max_header_list_size)
        .max_frame_size(limits.max_frame_size)
        .initial_connection_window_size(limits.connection_window)
        .initial_stream_window_size(limits.stream_window)
        .http2_keepalive_interval(Some(limits.keepalive_interval))
        .http2_keepalive_timeout(Some(limits.keepalive_timeout))
        .max_connection_age(limits.max_connection_age)
        .max_connection_age_grace(limits.max_connection_age_grace)
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, async {
            let _ = stopped.await;
        });
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => return result,
        () = shutdown => {}
    }
    let _ = stop.send(());
    if tokio::time::timeout(drain, server).await.is_err() {
        tracing::info!("closing the connections still open");
    }
    Ok(())
}
