//! HTTP/1.1 on `/metrics`. Bounded: at most `max_connections` served at once (more wait in the
//! listen backlog, costing nothing here), one request per connection (no idle keep-alive
//! connection holds a slot), request headers within 8 KiB and 5 s. Scrapes that arrive while one
//! is being read wait for it and take its answer, read after they arrived, so a flood of 1,000
//! costs a couple of bus round trips, and memory stays that of `max_connections` requests.
//! Nothing runs between scrapes: no timer, no poll of the bus.

use std::convert::Infallible;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ACCEPT, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{Mutex, Semaphore};
use zbus::Connection;

use kata_ksm_throttler::client::address::BusArg;
use kata_ksm_throttler::client::metrics::{self, Format, MetricsError, Throttler};

/// A client must have sent its request headers this soon after connecting.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest one read of the bus may take before the scrape says the throttler is down.
pub const BUS_TIMEOUT: Duration = Duration::from_secs(5);

/// One scrape's text in both formats.
#[derive(Debug, Clone)]
pub struct Scrape {
    /// When its reading began: it answers every request that arrived before.
    pub at: Instant,
    pub openmetrics: Bytes,
    pub prometheus: Bytes,
}

impl Scrape {
    pub fn text(&self, format: Format) -> &Bytes {
        match format {
            Format::OpenMetrics => &self.openmetrics,
            Format::Prometheus => &self.prometheus,
        }
    }
}

#[derive(Default)]
struct State {
    /// Kept while the throttler answers; dropped otherwise, so a restarted bus is found again.
    conn: Option<Connection>,
    last: Option<Scrape>,
    /// Why the last scrape found no bus, logged when it changes (not once per scrape).
    no_bus: Option<String>,
}

/// What every connection shares: where to read, and the last scrape.
pub struct Exporter {
    bus: BusArg,
    ksm_root: PathBuf,
    state: Mutex<State>,
}

impl Exporter {
    pub fn new(bus: BusArg, ksm_root: PathBuf) -> Exporter {
        Exporter { bus, ksm_root, state: Mutex::new(State::default()) }
    }

    /// A scrape read after `arrived`: the one just read if it began after `arrived`, else a new one.
    pub async fn scrape(&self, arrived: Instant) -> Result<Scrape, MetricsError> {
        let mut state = self.state.lock().await;
        if let Some(last) = state.last.as_ref().filter(|l| l.at >= arrived) {
            return Ok(last.clone());
        }
        let at = Instant::now();
        if state.conn.is_none() {
            state.conn = match self.connect().await {
                Ok(conn) => Some(conn),
                Err(reason) => {
                    let snapshot = metrics::gather(Err(reason), &self.ksm_root).await;
                    return self.keep(&mut state, at, &snapshot);
                }
            };
        }
        let snapshot = match &state.conn {
            Some(conn) => match tokio::time::timeout(BUS_TIMEOUT, metrics::gather(Ok(conn), &self.ksm_root)).await {
                Ok(s) => s,
                Err(_) => {
                    let mut s = metrics::gather(Err(String::new()), &self.ksm_root).await;
                    s.throttler = Throttler::Down(format!("no answer on the bus in {BUS_TIMEOUT:?}"));
                    s
                }
            },
            None => metrics::gather(Err("no connection".into()), &self.ksm_root).await,
        };
        if !matches!(snapshot.throttler, Throttler::Up(_)) {
            if let Throttler::Down(reason) | Throttler::NoBus(reason) = &snapshot.throttler {
                tracing::debug!(reason, "the throttler did not answer");
            }
            state.conn = None;
        }
        self.keep(&mut state, at, &snapshot)
    }

    fn keep(&self, state: &mut State, at: Instant, snapshot: &metrics::Snapshot) -> Result<Scrape, MetricsError> {
        let no_bus = match &snapshot.throttler {
            Throttler::NoBus(reason) => Some(reason.clone()),
            _ => None,
        };
        if no_bus != state.no_bus {
            match &no_bus {
                Some(reason) => tracing::warn!("no bus: {reason}"),
                None => tracing::info!("the bus is reachable"),
            }
            state.no_bus = no_bus;
        }
        let scrape = Scrape {
            at,
            openmetrics: Bytes::from(metrics::encode(snapshot, Format::OpenMetrics)?),
            prometheus: Bytes::from(metrics::encode(snapshot, Format::Prometheus)?),
        };
        state.last = Some(scrape.clone());
        Ok(scrape)
    }

    async fn connect(&self) -> Result<Connection, String> {
        let builder = self.bus.builder().map_err(|e| e.to_string())?;
        match tokio::time::timeout(BUS_TIMEOUT, builder.build()).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(format!("connecting to the bus: {e}")),
            Err(_) => Err(format!("connecting to the bus: no answer in {BUS_TIMEOUT:?}")),
        }
    }
}

fn response(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// One request.
pub async fn handle(req: Request<Incoming>, exporter: Arc<Exporter>) -> Result<Response<Full<Bytes>>, Infallible> {
    let arrived = Instant::now();
    let path = req.uri().path();
    let readable = matches!(*req.method(), Method::GET | Method::HEAD);
    Ok(match (readable, path) {
        (true, "/metrics") => {
            let format = Format::negotiate(req.headers().get(ACCEPT).and_then(|v| v.to_str().ok()));
            match exporter.scrape(arrived).await {
                Ok(s) => response(StatusCode::OK, format.content_type(), s.text(format).clone()),
                Err(e) => {
                    tracing::error!("{e}");
                    response(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "text/plain; charset=utf-8",
                        Bytes::from(format!("{e}\n")),
                    )
                }
            }
        }
        (true, "/") => response(
            StatusCode::OK,
            "text/plain; charset=utf-8",
            Bytes::from_static(b"kata-ksm-throttler-exporter: the metrics are at /metrics\n"),
        ),
        (false, "/metrics" | "/") => {
            let mut r = response(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain; charset=utf-8",
                Bytes::from_static(b"GET or HEAD only\n"),
            );
            r.headers_mut().insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            r
        }
        _ => response(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            Bytes::from_static(b"not found: the metrics are at /metrics\n"),
        ),
    })
}

/// Serves until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    exporter: Arc<Exporter>,
    max_connections: usize,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(max_connections));
    tokio::pin!(shutdown);
    loop {
        // A slot first: with every one taken, new connections wait in the kernel's backlog.
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => s,
            _ = &mut shutdown => return,
        };
        let Ok(slot) = slot else { return };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = &mut shutdown => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE and the like: the slot goes back, and the next accept is tried a little later.
                tracing::warn!("accepting a connection: {e}");
                drop(slot);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let exporter = exporter.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req| handle(req, exporter.clone()));
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false)
                .max_buf_size(8192)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                tracing::debug!("connection: {e}");
            }
        });
    }
}
