//! HTTP/1.1 on `/metrics`. Bounded: at most `max_connections` open at once, one request per
//! connection (no idle keep-alive connection holds a slot), request headers within 8 KiB and
//! 5 s. The port is any local user's to reach, so connections that hold a slot without a
//! request being answered (silent, dripping their headers, or not reading the answer) must not
//! keep a scrape out: with every slot taken, a new connection closes the oldest one that has sent
//! nothing at all, else the oldest one with no request in the handler, once it is [`GRACE`]
//! old. A scrape sends its request on connecting, so a flood of silent connections closes one
//! another, and not it. Only when every open connection has a request in the
//! handler (at most [`BUS_TIMEOUT`] each) does a new one wait in the listen backlog. Scrapes that
//! arrive while one is being read wait for it and take its answer, read after they arrived, so
//! a flood of 1,000 costs a couple of bus round trips, and memory stays that of
//! `max_connections` requests. Nothing runs between scrapes: no timer, no poll of the bus.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ACCEPT, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, Mutex, Notify};
use zbus::Connection;

use ksm_throttler_contract::address::BusArg;
use ksm_throttler_contract::metrics::{self, Format, MetricsError, Throttler};

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

/// The open connections, by id in the order they were accepted.
#[derive(Default)]
struct Table {
    next_id: u64,
    open: BTreeMap<u64, Open>,
}

struct Open {
    accepted: Instant,
    /// A request is in the handler (being answered): not to be closed.
    in_request: bool,
    /// The peer has sent a byte.
    heard: Arc<AtomicBool>,
    close: oneshot::Sender<()>,
}

/// What [`Table::make_room`] did.
enum Room {
    Made,
    /// Only connections younger than [`GRACE`] could be closed: ask again then.
    WaitUntil(Instant),
    /// Every connection has a request in the handler.
    Full,
}

/// A connection is not closed to make room before it is this old: a client that has just
/// connected gets this long for its request to reach us, however fast others connect. It bounds
/// how fast a flood of connections can close one another (`max_connections` per `GRACE`).
pub const GRACE: Duration = Duration::from_millis(100);

impl Table {
    /// Closes the oldest connection that has sent nothing, else the oldest with no request in the
    /// handler, once it is [`GRACE`] old.
    fn make_room(&mut self, now: Instant) -> Room {
        let closable = |o: &Open| !o.in_request;
        let silent = |o: &Open| closable(o) && !o.heard.load(Ordering::Relaxed);
        let old = |o: &Open| o.accepted + GRACE <= now;
        let pick = self
            .open
            .iter()
            .find(|(_, o)| silent(o) && old(o))
            .or_else(|| self.open.iter().find(|(_, o)| closable(o) && old(o)))
            .map(|(&id, _)| id);
        if let Some(open) = pick.and_then(|id| self.open.remove(&id)) {
            let _ = open.close.send(());
            return Room::Made;
        }
        // Ids rise with the accept time: the first closable is the next to come of age.
        match self.open.values().find(|o| closable(o)) {
            Some(o) => Room::WaitUntil(o.accepted + GRACE),
            None => Room::Full,
        }
    }
}

/// The connection's stream, noting when the peer first sent something.
struct Heard {
    stream: TcpStream,
    heard: Arc<AtomicBool>,
}

impl AsyncRead for Heard {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.heard.store(true, Ordering::Relaxed);
        }
        polled
    }
}

impl AsyncWrite for Heard {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Whether the peer has sent something already, without taking it from the socket.
fn has_sent(stream: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    let flags = rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT;
    rustix::net::recv(stream, &mut byte[..], flags).is_ok_and(|(n, _)| n > 0)
}

fn lock(table: &StdMutex<Table>) -> MutexGuard<'_, Table> {
    table.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Marks a connection's request as in the handler until dropped; then the connection may be
/// closed to make room, which `freed` tells a waiting accept.
struct InRequest {
    table: Arc<StdMutex<Table>>,
    freed: Arc<Notify>,
    id: u64,
}

impl InRequest {
    fn enter(table: &Arc<StdMutex<Table>>, freed: &Arc<Notify>, id: u64) -> InRequest {
        if let Some(open) = lock(table).open.get_mut(&id) {
            open.in_request = true;
        }
        InRequest { table: table.clone(), freed: freed.clone(), id }
    }
}

impl Drop for InRequest {
    fn drop(&mut self) {
        if let Some(open) = lock(&self.table).open.get_mut(&self.id) {
            open.in_request = false;
        }
        self.freed.notify_one();
    }
}

/// Serves until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    exporter: Arc<Exporter>,
    max_connections: usize,
    shutdown: impl Future<Output = ()>,
) {
    let table = Arc::new(StdMutex::new(Table::default()));
    let freed = Arc::new(Notify::new());
    tokio::pin!(shutdown);
    loop {
        // Room first: with every connection in the handler, new ones wait in the kernel's backlog.
        loop {
            let room = {
                let mut t = lock(&table);
                if t.open.len() < max_connections {
                    Room::Made
                } else {
                    t.make_room(Instant::now())
                }
            };
            let until = match room {
                Room::Made => break,
                Room::WaitUntil(at) => Some(tokio::time::Instant::from_std(at)),
                Room::Full => None,
            };
            tokio::select! {
                () = freed.notified() => {}
                () = async { match until { Some(at) => tokio::time::sleep_until(at).await, None => std::future::pending().await } } => {}
                _ = &mut shutdown => return,
            }
        }
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = &mut shutdown => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE and the like: the next accept is tried a little later.
                tracing::warn!("accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (close, closed) = oneshot::channel();
        let heard = Arc::new(AtomicBool::new(has_sent(&stream)));
        let id = {
            let mut t = lock(&table);
            let id = t.next_id;
            t.next_id += 1;
            t.open.insert(id, Open { accepted: Instant::now(), in_request: false, heard: heard.clone(), close });
            id
        };
        let (exporter, table, freed) = (exporter.clone(), table.clone(), freed.clone());
        tokio::spawn(async move {
            let (requests, answered) = (table.clone(), freed.clone());
            let service = hyper::service::service_fn(move |req| {
                let in_request = InRequest::enter(&requests, &answered, id);
                let exporter = exporter.clone();
                async move {
                    let _in_request = in_request;
                    handle(req, exporter).await
                }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false)
                .max_buf_size(8192)
                .serve_connection(TokioIo::new(Heard { stream, heard }), service);
            tokio::select! {
                served = served => if let Err(e) = served {
                    tracing::debug!("connection: {e}");
                },
                // Dropping the connection closes the socket.
                _ = closed => tracing::debug!("connection closed to make room for a new one"),
            }
            lock(&table).open.remove(&id);
            freed.notify_one();
        });
        // Every connection already in gets polled (hyper reads its request, marking it heard)
        // before the next accept may close one: a flood of accepts must not close a scrape
        // before its request, already in the socket, was read.
        tokio::task::yield_now().await;
    }
}
