//! Accepted connections, bounded: at most `max_connections` at once. When every slot is taken and
//! another connection arrives, the connection idle the longest (no call in flight, and none for
//! the longest time; one that never completed a call is idle since it was accepted) is closed to
//! make room, so that peers holding connections open cannot keep a client out. Connections with a
//! call in flight, or idle for less than [`EVICTION_GRACE`], are not closed. A peer that has
//! not sent the HTTP/2 preface within the handshake timeout is dropped. Once the preface is in,
//! HTTP/2 keep-alive and the connection age take over. What the peer sends reaches h2 through the
//! [`Rewriter`], for the authorities h2 would refuse.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use futures_util::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore, TryAcquireError};
use tokio::time::Sleep;
use tonic::transport::server::{Connected, UdsConnectInfo};

use crate::authority_rewrite::{Bounds, Rewriter};

/// "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", what every HTTP/2 client sends first.
const PREFACE_LEN: usize = 24;

/// How long to wait before accepting again after accept(2) failed (e.g. out of descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Bytes read from the peer at a time.
const READ_SIZE: usize = 8 * 1024;

/// How long a new connection waits for the one closed to make room before another is closed.
const EVICTION_WAIT: Duration = Duration::from_secs(1);

/// A connection idle for less than this is not closed to make room: its client may not have sent
/// its call yet (300 clients connecting at once would otherwise close each other's connections).
/// So a new connection waits about this long for room when idle peers hold every slot.
const EVICTION_GRACE: Duration = Duration::from_secs(1);

/// The open connections, by id: when each last had a call, and how to close it.
#[derive(Default)]
struct Table {
    next_id: u64,
    open: HashMap<u64, Entry>,
}

struct Entry {
    /// When the last request came in or call ended (or the connection was accepted).
    idle_since: Instant,
    calls_in_flight: usize,
    close: oneshot::Sender<()>,
}

type Shared = Arc<Mutex<Table>>;

fn lock(table: &Mutex<Table>) -> MutexGuard<'_, Table> {
    table.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Closes the connection idle the longest, if it has no call in flight (calls end within the call
/// timeout) and has been idle for [`EVICTION_GRACE`]. If there is none, how long to wait.
fn close_idlest(table: &Mutex<Table>) -> Result<(), Duration> {
    let mut table = lock(table);
    let now = Instant::now();
    let idlest = table
        .open
        .iter()
        .filter(|(_, e)| e.calls_in_flight == 0 && now.duration_since(e.idle_since) >= EVICTION_GRACE)
        .min_by_key(|(_, e)| e.idle_since)
        .map(|(id, _)| *id);
    let Some(entry) = idlest.and_then(|id| table.open.remove(&id)) else {
        // Every one is busy, recently active, or already closing: wait for a slot, or until the
        // one idle the longest has been idle long enough.
        let oldest = table.open.values().filter(|e| e.calls_in_flight == 0).map(|e| e.idle_since).min();
        let grace_left = oldest.map(|t| EVICTION_GRACE.saturating_sub(now.duration_since(t)));
        return Err(grace_left.filter(|d| !d.is_zero()).unwrap_or(EVICTION_WAIT));
    };
    tracing::debug!("every connection slot is taken: closing the connection idle for {:?}", entry.idle_since.elapsed());
    let _ = entry.close.send(());
    Ok(())
}

/// A connection's slot and its entry in the table, both given back when the connection is dropped.
struct Slot {
    id: u64,
    table: Shared,
    _permit: OwnedSemaphorePermit,
}

impl Slot {
    fn touch(&self) {
        if let Some(entry) = lock(&self.table).open.get_mut(&self.id) {
            entry.idle_since = Instant::now();
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        lock(&self.table).open.remove(&self.id);
    }
}

/// What every call on a connection carries (tonic's connect info, in the request's extensions):
/// the peer, and the connection's entry, so that the call marks it busy.
#[derive(Clone)]
pub struct ConnInfo {
    pub peer: UdsConnectInfo,
    id: u64,
    table: Shared,
}

impl ConnInfo {
    /// Marks the connection busy until the returned guard is dropped, when the call ends.
    pub fn call(&self) -> CallGuard {
        if let Some(entry) = lock(&self.table).open.get_mut(&self.id) {
            entry.calls_in_flight += 1;
            entry.idle_since = Instant::now();
        }
        CallGuard { id: self.id, table: self.table.clone() }
    }
}

/// A call in flight on a connection (see [`ConnInfo::call`]).
pub struct CallGuard {
    id: u64,
    table: Shared,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        if let Some(entry) = lock(&self.table).open.get_mut(&self.id) {
            entry.calls_in_flight = entry.calls_in_flight.saturating_sub(1);
            entry.idle_since = Instant::now();
        }
    }
}

pub struct Conn {
    stream: UnixStream,
    slot: Slot,
    /// Fires when the connection is closed to make room for a new one.
    close: oneshot::Receiver<()>,
    closing: bool,
    /// Bytes of the preface still due, and by when; `None` once it is in.
    preface: Option<(usize, Pin<Box<Sleep>>)>,
    rewriter: Rewriter,
    /// Rewritten bytes h2 has not read yet, from `pending_at` on.
    pending: Vec<u8>,
    pending_at: usize,
    eof: bool,
}

impl Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        ConnInfo { peer: self.stream.connect_info(), id: self.slot.id, table: self.slot.table.clone() }
    }
}

impl Conn {
    /// An error once the connection is to be closed to make room; registers the task to be woken then.
    fn poll_closing(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if self.closing || Pin::new(&mut self.close).poll(cx).is_ready() {
            self.closing = true;
            return Err(io::Error::new(io::ErrorKind::ConnectionAborted, "closed to make room for a new connection"));
        }
        Ok(())
    }
}

impl AsyncRead for Conn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        this.poll_closing(cx)?;
        loop {
            if this.pending_at < this.pending.len() {
                let n = buf.remaining().min(this.pending.len() - this.pending_at);
                buf.put_slice(&this.pending[this.pending_at..this.pending_at + n]);
                this.pending_at += n;
                if this.pending_at == this.pending.len() {
                    this.pending.clear();
                    this.pending_at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            let mut raw = [0u8; READ_SIZE];
            let mut raw_buf = ReadBuf::new(&mut raw);
            match Pin::new(&mut this.stream).poll_read(cx, &mut raw_buf) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    return match &mut this.preface {
                        Some((_, deadline)) => {
                            ready!(deadline.as_mut().poll(cx));
                            Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "no HTTP/2 preface in time")))
                        }
                        None => Poll::Pending,
                    }
                }
            }
            let read = raw_buf.filled();
            let headers_seen = this.rewriter.headers_seen;
            if let Some((due, _)) = &mut this.preface {
                *due = due.saturating_sub(read.len());
                if *due == 0 {
                    this.preface = None;
                }
            }
            if read.is_empty() {
                this.eof = true;
                this.rewriter.finish(&mut this.pending);
            } else if let Err(e) = this.rewriter.feed(read, &mut this.pending) {
                tracing::debug!("dropping a connection: {e}");
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
            }
            if this.rewriter.headers_seen != headers_seen {
                // A request (or its trailers) came in: the connection is not idle.
                this.slot.touch();
            }
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_closing(cx)?;
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.poll_closing(cx)?;
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_closing(cx)?;
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// A slot for a new connection: when every one is taken, the connection idle the longest is
/// closed, and its slot taken once it is given back.
async fn take_slot(slots: &Arc<Semaphore>, table: &Mutex<Table>) -> Option<OwnedSemaphorePermit> {
    loop {
        match slots.clone().try_acquire_owned() {
            Ok(permit) => return Some(permit),
            Err(TryAcquireError::Closed) => return None,
            Err(TryAcquireError::NoPermits) => {}
        }
        // The semaphore is never closed. If the closed connection is slow to go, close another.
        let wait = close_idlest(table).err().unwrap_or(EVICTION_WAIT);
        if let Ok(permit) = tokio::time::timeout(wait, slots.clone().acquire_owned()).await {
            return permit.ok();
        }
    }
}

/// The accepted connections of `listener`, never more than `max` open at once.
pub fn incoming(
    listener: tokio::net::UnixListener,
    max: usize,
    handshake_timeout: Duration,
    bounds: Bounds,
) -> impl Stream<Item = io::Result<Conn>> {
    let slots = Arc::new(Semaphore::new(max));
    let table = Shared::default();
    futures_util::stream::unfold((listener, slots, table), move |(listener, slots, table)| async move {
        let accepted = match listener.accept().await {
            Ok((stream, _)) => {
                let permit = take_slot(&slots, &table).await?;
                let (close_tx, close) = oneshot::channel();
                let now = Instant::now();
                let id = {
                    let mut t = lock(&table);
                    let id = t.next_id;
                    t.next_id += 1;
                    t.open.insert(id, Entry { idle_since: now, calls_in_flight: 0, close: close_tx });
                    id
                };
                let deadline = Box::pin(tokio::time::sleep(handshake_timeout));
                Ok(Conn {
                    stream,
                    slot: Slot { id, table: table.clone(), _permit: permit },
                    close,
                    closing: false,
                    preface: Some((PREFACE_LEN, deadline)),
                    rewriter: Rewriter::new(bounds),
                    pending: vec![],
                    pending_at: 0,
                    eof: false,
                })
            }
            Err(e) => {
                tracing::warn!("accepting a connection: {e}");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                Err(e)
            }
        };
        Some((accepted, (listener, slots, table)))
    })
}
