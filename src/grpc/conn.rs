//! Accepted connections, bounded: at most `max_connections` at once, shared fairly between peers
//! (a peer is a uid, from the socket's credentials). When every slot is taken and another
//! connection arrives:
//! - from a peer holding fewer connections than another (by more than one), that other peer's
//!   connection idle the longest (no call in flight) is closed at once and its slot handed over:
//!   one peer holding every slot, however active its connections, keeps no one else out;
//! - otherwise the connection idle the longest of all is closed once it has been idle for
//!   `EVICTION_GRACE` (a burst of one peer's clients must not close each other's connections
//!   before their calls), the new connection waiting in a queue meanwhile.
//!
//! Accepting never waits: connections that must wait for room queue (at most `max`; beyond, the
//! one waiting longest is closed), so a connection of another peer behind them in the listen
//! backlog is taken in at once. A peer that has not sent the HTTP/2 preface within the handshake timeout is
//! dropped. Once the preface is in, HTTP/2 keep-alive and the connection age take over. What the
//! peer sends reaches h2 through the [`Rewriter`], for the authorities h2 would refuse.
//!
//! An [`Intake`] stops and resumes accepting, for exiting on idle: once it is paused, nothing more
//! is taken from the listen backlog (what arrives waits there, for this instance if it stays or
//! for the next one systemd starts on the same socket), and [`Intake::quiet`] says when every
//! connection already accepted has closed.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use futures_util::{FutureExt, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tokio::sync::{oneshot, watch, Notify, OwnedSemaphorePermit, Semaphore, TryAcquireError};
use tokio::time::Sleep;
use tonic::transport::server::{Connected, UdsConnectInfo};

use crate::grpc::authority_rewrite::{Bounds, Rewriter};

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

/// Whether connections are accepted, and the open ones (see the module documentation). Cloned,
/// it controls the same listener.
#[derive(Clone)]
pub struct Intake {
    accepting: Arc<watch::Sender<bool>>,
    table: Shared,
    /// Notified whenever a connection closes.
    closed: Arc<Notify>,
}

impl Default for Intake {
    fn default() -> Intake {
        Intake { accepting: Arc::new(watch::Sender::new(true)), table: Shared::default(), closed: Arc::default() }
    }
}

impl Intake {
    /// Accepts nothing more until [`Intake::resume`]; connections already accepted are served.
    pub fn pause(&self) {
        self.accepting.send_replace(false);
    }

    pub fn resume(&self) {
        self.accepting.send_replace(true);
    }

    /// Connections accepted and not yet closed (those waiting for room hold none while a slot is
    /// free, so they are only ever queued behind open ones).
    pub fn open(&self) -> usize {
        lock(&self.table).open.len()
    }

    /// Completes once no accepted connection is open.
    pub async fn quiet(&self) {
        loop {
            let closed = self.closed.notified();
            tokio::pin!(closed);
            closed.as_mut().enable();
            if self.open() == 0 {
                return;
            }
            closed.await;
        }
    }
}

impl crate::engine::Intake for Intake {
    fn pause(&self) {
        Intake::pause(self);
    }

    fn resume(&self) {
        Intake::resume(self);
    }

    fn quiet(&self) -> BoxFuture<'_, ()> {
        Intake::quiet(self).boxed()
    }
}

/// The next connection of `listener`, taken only while `accepting` says so.
async fn accept_while_open(
    listener: &tokio::net::UnixListener,
    accepting: &mut watch::Receiver<bool>,
) -> io::Result<(UnixStream, tokio::net::unix::SocketAddr)> {
    loop {
        // The sender lives as long as the Intake the server was given: gone, nothing pauses.
        if accepting.wait_for(|open| *open).await.is_err() {
            return listener.accept().await;
        }
        tokio::select! {
            biased;
            paused = accepting.wait_for(|open| !*open) => if paused.is_ok() { continue },
            accepted = listener.accept() => return accepted,
        }
    }
}

struct Entry {
    /// When the last request came in or call ended (or the connection was accepted).
    idle_since: Instant,
    calls_in_flight: usize,
    close: oneshot::Sender<()>,
    /// The peer's uid (`u32::MAX` when the credentials could not be read: a peer of its own).
    uid: u32,
    /// The connection's slot: handed straight to the new connection when this one is closed to
    /// make room (the closed one goes on its next poll), so no other waiter can take it.
    permit: OwnedSemaphorePermit,
}

type Shared = Arc<Mutex<Table>>;

fn lock(table: &Mutex<Table>) -> MutexGuard<'_, Table> {
    table.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Makes room for a connection of `uid` when every slot is taken, closing one connection and
/// returning its slot; if none may be closed yet, how long to wait before asking again.
/// - Fair share: the peer holding the most connections, if it holds more than one more than
///   `uid` does, gives up its connection idle the longest that has no call in flight, at once.
/// - Otherwise (unless `share_only`) the connection idle the longest of all (no call in flight;
///   calls end within the call timeout), once it has been idle for [`EVICTION_GRACE`].
fn make_room(table: &Mutex<Table>, uid: u32, share_only: bool) -> Result<OwnedSemaphorePermit, Duration> {
    let mut table = lock(table);
    let now = Instant::now();
    let mut held: HashMap<u32, usize> = HashMap::new();
    for e in table.open.values() {
        *held.entry(e.uid).or_default() += 1;
    }
    let mine = held.get(&uid).copied().unwrap_or(0);
    let over_share = held.iter().filter(|&(&u, &n)| u != uid && n > mine + 1).max_by_key(|&(_, &n)| n).map(|(&u, _)| u);
    let idlest = |table: &Table, eligible: &dyn Fn(&Entry) -> bool| {
        table
            .open
            .iter()
            .filter(|(_, e)| e.calls_in_flight == 0 && eligible(e))
            .min_by_key(|(_, e)| e.idle_since)
            .map(|(id, _)| *id)
    };
    let victim = over_share.and_then(|big| idlest(&table, &|e| e.uid == big)).or_else(|| {
        (!share_only).then(|| idlest(&table, &|e| now.duration_since(e.idle_since) >= EVICTION_GRACE)).flatten()
    });
    let Some(entry) = victim.and_then(|id| table.open.remove(&id)) else {
        // Every one is busy or recently active: wait for a slot, or until the one idle the
        // longest has been idle long enough.
        let oldest = table.open.values().filter(|e| e.calls_in_flight == 0).map(|e| e.idle_since).min();
        let grace_left = oldest.map(|t| EVICTION_GRACE.saturating_sub(now.duration_since(t)));
        return Err(grace_left.filter(|d| !d.is_zero()).unwrap_or(EVICTION_WAIT));
    };
    tracing::debug!(
        uid,
        closed_uid = entry.uid,
        fair_share = over_share.is_some(),
        "every connection slot is taken: closing the connection idle for {:?}",
        entry.idle_since.elapsed()
    );
    let _ = entry.close.send(());
    Ok(entry.permit)
}

/// A connection's entry in the table (which holds its slot), given back when the connection is
/// dropped.
struct Slot {
    id: u64,
    table: Shared,
    closed: Arc<Notify>,
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
        self.closed.notify_waiters();
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

/// A slot for a connection of `uid` that found every one taken: room is made as
/// [`make_room`] allows, or a slot given back is taken.
async fn take_slot(slots: Arc<Semaphore>, table: Shared, uid: u32) -> Option<OwnedSemaphorePermit> {
    loop {
        match slots.clone().try_acquire_owned() {
            Ok(permit) => return Some(permit),
            Err(TryAcquireError::Closed) => return None,
            Err(TryAcquireError::NoPermits) => {}
        }
        let wait = match make_room(&table, uid, false) {
            Ok(permit) => return Some(permit),
            Err(wait) => wait,
        };
        // The semaphore is never closed.
        if let Ok(permit) = tokio::time::timeout(wait, slots.clone().acquire_owned()).await {
            return permit.ok();
        }
    }
}

/// The peer's uid, `u32::MAX` if the socket cannot say.
fn peer_uid(stream: &UnixStream) -> u32 {
    stream.peer_cred().map(|c| c.uid()).unwrap_or(u32::MAX)
}

/// The listener and the connections waiting for room, in order: the first one waits (in
/// `head`) for [`take_slot`], the rest behind it.
struct Accepting {
    listener: tokio::net::UnixListener,
    accepting: watch::Receiver<bool>,
    slots: Arc<Semaphore>,
    table: Shared,
    max: usize,
    queue: VecDeque<(UnixStream, u32)>,
    head: Option<BoxFuture<'static, Option<OwnedSemaphorePermit>>>,
}

enum Next {
    Accepted(io::Result<(UnixStream, tokio::net::unix::SocketAddr)>),
    Room(Option<OwnedSemaphorePermit>),
}

impl Accepting {
    /// The next connection given a slot (`None` when slots can no longer be had), or an accept
    /// error.
    async fn next(&mut self) -> Option<io::Result<(UnixStream, OwnedSemaphorePermit)>> {
        loop {
            if self.head.is_none() {
                if let Some(&(_, uid)) = self.queue.front() {
                    self.head = Some(take_slot(self.slots.clone(), self.table.clone(), uid).boxed());
                }
            }
            let next = match &mut self.head {
                Some(head) => tokio::select! {
                    permit = head => Next::Room(permit),
                    accepted = accept_while_open(&self.listener, &mut self.accepting) => Next::Accepted(accepted),
                },
                None => Next::Accepted(accept_while_open(&self.listener, &mut self.accepting).await),
            };
            match next {
                Next::Room(permit) => {
                    self.head = None;
                    let (stream, _) = self.queue.pop_front()?;
                    return Some(Ok((stream, permit?)));
                }
                Next::Accepted(Err(e)) => {
                    tracing::warn!("accepting a connection: {e}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    return Some(Err(e));
                }
                Next::Accepted(Ok((stream, _))) => {
                    let uid = peer_uid(&stream);
                    // Queued ones first, unless this peer may take a slot by its fair share.
                    if self.queue.is_empty() {
                        match self.slots.clone().try_acquire_owned() {
                            Ok(permit) => return Some(Ok((stream, permit))),
                            Err(TryAcquireError::Closed) => return None,
                            Err(TryAcquireError::NoPermits) => {}
                        }
                    }
                    if let Ok(permit) = make_room(&self.table, uid, true) {
                        return Some(Ok((stream, permit)));
                    }
                    if self.queue.len() >= self.max {
                        // The one waiting longest goes (a new client is likelier alive than one
                        // that has waited all this while).
                        tracing::debug!(uid, "{} connections wait for room: closing the first", self.queue.len());
                        self.queue.pop_front();
                        self.head = None;
                    }
                    self.queue.push_back((stream, uid));
                }
            }
        }
    }
}

/// The accepted connections of `listener`, never more than `max` open at once, taken while
/// `intake` lets them in.
pub fn incoming(
    listener: tokio::net::UnixListener,
    max: usize,
    handshake_timeout: Duration,
    bounds: Bounds,
    intake: &Intake,
) -> impl Stream<Item = io::Result<Conn>> {
    let closed = intake.closed.clone();
    let accepting = Accepting {
        listener,
        accepting: intake.accepting.subscribe(),
        slots: Arc::new(Semaphore::new(max)),
        table: intake.table.clone(),
        max,
        queue: VecDeque::new(),
        head: None,
    };
    futures_util::stream::unfold(accepting, move |mut accepting| {
        let closed = closed.clone();
        async move {
            let conn = match accepting.next().await? {
                Ok((stream, permit)) => {
                    let uid = peer_uid(&stream);
                    let (close_tx, close) = oneshot::channel();
                    let table = accepting.table.clone();
                    let id = {
                        let mut t = lock(&table);
                        let id = t.next_id;
                        t.next_id += 1;
                        let entry =
                            Entry { idle_since: Instant::now(), calls_in_flight: 0, close: close_tx, uid, permit };
                        t.open.insert(id, entry);
                        id
                    };
                    let deadline = Box::pin(tokio::time::sleep(handshake_timeout));
                    Ok(Conn {
                        stream,
                        slot: Slot { id, table, closed },
                        close,
                        closing: false,
                        preface: Some((PREFACE_LEN, deadline)),
                        rewriter: Rewriter::new(bounds),
                        pending: vec![],
                        pending_at: 0,
                        eof: false,
                    })
                }
                Err(e) => Err(e),
            };
            Some((conn, accepting))
        }
    })
}
