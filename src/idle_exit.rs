//! The bus side of exiting on idle (`--exit-idle-after`), after systemd's `bus_event_loop_with_idle`:
//! release the name, serve whatever the bus had already routed here, then let the engine decide
//! (see [`crate::engine`]). What makes "already routed" exact is [`CallTracker`]: it reads every
//! message in the order the socket delivered them, so once it has seen the reply to a call made
//! after the release, it has seen every `Kick` and `SetMode` the bus sent before the release.
//! Each of those is then waited for until its handler has finished.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};
use zbus::fdo::DBusProxy;
use zbus::message::{Flags, Header, Message, Sequence, Type};
use zbus::{Connection, MessageStream};

use crate::engine::{Drain, EngineError, Handle, Verdict};
use crate::heap;
use crate::service::{BUS_NAME, INTERFACE, OBJECT_PATH};

/// How long the calls routed before the release may take to finish (a polkit check is
/// milliseconds; one waiting for a person to authenticate is not worth waiting for: the throttler
/// stays up instead).
pub const DRAIN_LIMIT: Duration = Duration::from_secs(5);

/// Bounds the whole exchange with the bus, so a stop signal held back meanwhile is not held long.
pub const PROTOCOL_LIMIT: Duration = Duration::from_secs(10);

/// A call, by the unique name of its sender and its serial: unique on a bus.
type CallId = (String, u32);

#[derive(Debug, Default)]
struct Calls {
    /// Seen on the socket, handler not finished.
    routed: HashSet<CallId>,
    /// Handler finished before the reader task saw the message (two tasks read the same queue).
    finished_early: HashSet<CallId>,
    /// The position of the last message the reader task has seen.
    seen: Sequence,
    /// The most calls in flight at once since the heap was last trimmed.
    peak: usize,
    /// Handlers finished, ever: unchanged across a wait means no call came meanwhile.
    finished: u64,
    /// A trim is waiting for the calls to stay away for [`heap::TRIM_AFTER_BURST`].
    trim_pending: bool,
    /// Trims done, for the tests.
    trims: u64,
}

/// Keeps count of the `Kick` and `SetMode` calls that have reached the connection and whose
/// handler has not finished. Handlers hold a [`CallGuard`] while they run.
#[derive(Debug)]
pub struct CallTracker {
    calls: watch::Sender<Calls>,
}

/// The other set only grows when a call the reader did not count reaches a handler; bounded so
/// that cannot grow memory.
const FINISHED_EARLY_MAX: usize = 4096;

impl Default for CallTracker {
    fn default() -> Self {
        CallTracker { calls: watch::Sender::new(Calls::default()) }
    }
}

impl CallTracker {
    pub fn new() -> Arc<Self> {
        Arc::new(CallTracker::default())
    }

    /// Reads every message `conn` receives, for as long as it is open. Spawn it before the name
    /// is requested, so no call is missed.
    pub async fn watch(self: Arc<Self>, conn: Connection) {
        let mut stream = MessageStream::from(&conn);
        drop(conn);
        while let Some(msg) = stream.next().await {
            let Ok(msg) = msg else { continue };
            let id = counted_call(&msg);
            self.calls.send_modify(|c| {
                if let Some(id) = id {
                    if !c.finished_early.remove(&id) {
                        c.routed.insert(id);
                        c.peak = c.peak.max(c.routed.len());
                    }
                }
                c.seen = msg.recv_position();
            });
        }
    }

    /// Held by a `Kick` or `SetMode` handler from its first line to its last.
    pub fn enter(self: &Arc<Self>, header: &Header<'_>) -> CallGuard {
        CallGuard { tracker: Arc::clone(self), id: call_id(header) }
    }

    pub fn in_flight(&self) -> usize {
        self.calls.borrow().routed.len()
    }

    /// Returns once the reader has seen everything the bus sent before the reply to a call made
    /// now, i.e. every call routed here before this moment.
    pub async fn fence(&self, conn: &Connection) -> zbus::Result<()> {
        let reply = conn
            .call_method(
                Some("org.freedesktop.DBus"),
                "/org/freedesktop/DBus",
                Some("org.freedesktop.DBus"),
                "GetId",
                &(),
            )
            .await?;
        let at = reply.recv_position();
        let mut calls = self.calls.subscribe();
        // The sender lives in `self`, so the wait can only end by the condition.
        let _ = calls.wait_for(|c| c.seen >= at).await;
        Ok(())
    }

    /// Returns once no counted call is in flight.
    pub async fn drained(&self) {
        let mut calls = self.calls.subscribe();
        let _ = calls.wait_for(|c| c.routed.is_empty()).await;
    }

    fn finished(self: &Arc<Self>, id: CallId) {
        let mut schedule = false;
        self.calls.send_modify(|c| {
            if !c.routed.remove(&id) {
                if c.finished_early.len() >= FINISHED_EARLY_MAX {
                    c.finished_early.clear();
                }
                c.finished_early.insert(id);
            }
            c.finished += 1;
            if c.routed.is_empty() && c.peak >= heap::BURST && !c.trim_pending {
                c.trim_pending = true;
                schedule = true;
            }
        });
        // After the burst, not on a timer: one wake-up per burst and none while idle. Not from
        // inside this call, whose task and the others' queued replies are not freed yet
        // (trimming here left 1.4 MiB that a later trim released); and only once the callers
        // have stayed away for a while, as 1,000 clients empty the queue now and then mid-burst
        // (a trim then, and none at the end, left up to 4 MiB in one run of three).
        if schedule {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn(Arc::clone(self).trim_when_quiet());
                }
                Err(_) => self.trim_now(),
            }
        }
    }

    async fn trim_when_quiet(self: Arc<Self>) {
        loop {
            let finished = self.calls.borrow().finished;
            tokio::time::sleep(heap::TRIM_AFTER_BURST).await;
            let quiet = {
                let c = self.calls.borrow();
                c.routed.is_empty() && c.finished == finished
            };
            if quiet {
                return self.trim_now();
            }
        }
    }

    fn trim_now(&self) {
        // Nothing a waiter looks at changes here: no one is woken.
        self.calls.send_if_modified(|c| {
            c.peak = c.routed.len();
            c.trim_pending = false;
            c.trims += 1;
            c.routed.shrink_to_fit();
            c.finished_early.shrink_to_fit();
            false
        });
        heap::release_free_memory();
    }
}

pub struct CallGuard {
    tracker: Arc<CallTracker>,
    id: Option<CallId>,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            self.tracker.finished(id);
        }
    }
}

fn call_id(header: &Header<'_>) -> Option<CallId> {
    Some((header.sender()?.to_string(), header.primary().serial_num().get()))
}

/// A call the object server hands to the `Kick` or `SetMode` handler: the right path, interface,
/// member and argument types (anything else zbus answers itself, without a handler).
fn counted_call(msg: &Message) -> Option<CallId> {
    if msg.message_type() != Type::MethodCall {
        return None;
    }
    let header = msg.header();
    if header.path()?.as_str() != OBJECT_PATH || header.interface()?.as_str() != INTERFACE {
        return None;
    }
    let signature = match header.member()?.as_str() {
        "Kick" => "",
        "SetMode" => "s",
        _ => return None,
    };
    if msg.body().signature().to_string() != signature {
        return None;
    }
    call_id(&header)
}

/// Answers the engine's idle notices until it ends; an error means the name could not be taken
/// back, and the throttler can no longer be reached.
pub async fn serve(
    conn: Connection,
    engine: Handle,
    mut notices: mpsc::Receiver<()>,
    calls: Arc<CallTracker>,
) -> anyhow::Result<()> {
    while notices.recv().await.is_some() {
        let drain = match tokio::time::timeout(PROTOCOL_LIMIT, release_and_drain(&conn, &calls)).await {
            Ok(drain) => drain,
            Err(_) => {
                tracing::warn!("the bus did not answer within {}s: staying", PROTOCOL_LIMIT.as_secs());
                Drain::Unsure
            }
        };
        match engine.conclude_idle(drain).await {
            Ok(Verdict::Exit) | Err(EngineError::ShuttingDown) => return Ok(()),
            Err(e) => return Err(e.into()),
            Ok(Verdict::Stay) => {
                conn.request_name(BUS_NAME)
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot take {BUS_NAME} back after an aborted idle exit: {e}"))?;
            }
        }
    }
    Ok(())
}

async fn release_and_drain(conn: &Connection, calls: &CallTracker) -> Drain {
    if calls.in_flight() > 0 {
        tracing::debug!("{} call(s) in flight: not idle", calls.in_flight());
        return Drain::Unsure;
    }
    if let Err(e) = conn.release_name(BUS_NAME).await {
        tracing::warn!("releasing {BUS_NAME}: {e}");
        return Drain::Unsure;
    }
    if let Err(e) = calls.fence(conn).await {
        tracing::warn!("asking the bus after releasing {BUS_NAME}: {e}");
        return Drain::Unsure;
    }
    if tokio::time::timeout(DRAIN_LIMIT, calls.drained()).await.is_err() {
        tracing::info!("calls still in flight after {}s: staying", DRAIN_LIMIT.as_secs());
        return Drain::Unsure;
    }
    let successor = match activatable(conn).await {
        Ok(yes) => yes,
        Err(e) => {
            tracing::warn!("asking the bus whether {BUS_NAME} is activatable: {e}");
            false
        }
    };
    Drain::Done { successor }
}

async fn activatable(conn: &Connection) -> zbus::Result<bool> {
    let names = DBusProxy::new(conn).await?.list_activatable_names().await?;
    Ok(names.iter().any(|n| n.as_str() == BUS_NAME))
}

/// Asks the bus to start the next instance, without waiting: it cannot start before this one
/// has exited and released the state directory's lock. Under systemd the start is queued behind
/// this unit's stop.
pub async fn start_successor(conn: &Connection) -> zbus::Result<()> {
    let msg = Message::method_call("/org/freedesktop/DBus", "StartServiceByName")
        .destination("org.freedesktop.DBus")
        .interface("org.freedesktop.DBus")
        .with_flags(Flags::NO_REPLY_EXPECTED)
        .build(&(BUS_NAME, 0u32))?;
    conn.send(&msg).await
}

/// One round trip to the bus: replies that handlers were sending when the engine ended have been
/// written by the time it returns (writes go out in the order they were started).
pub async fn flush(conn: &Connection) {
    if let Err(e) = conn
        .call_method(Some("org.freedesktop.DBus"), "/org/freedesktop/DBus", Some("org.freedesktop.DBus"), "GetId", &())
        .await
    {
        tracing::debug!("flushing before exit: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u32) -> CallId {
        (":1.7".into(), n)
    }

    /// What the reader task does for each call it sees.
    fn route(t: &CallTracker, ids: impl IntoIterator<Item = u32>) {
        t.calls.send_modify(|c| {
            for n in ids {
                c.routed.insert(id(n));
                c.peak = c.peak.max(c.routed.len());
            }
        });
    }

    fn finish(t: &Arc<CallTracker>, ids: impl IntoIterator<Item = u32>) {
        for n in ids {
            t.finished(id(n));
        }
    }

    fn trims(t: &CallTracker) -> u64 {
        t.calls.borrow().trims
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_is_trimmed_once_the_callers_have_stayed_away_a_second() {
        let t = CallTracker::new();
        route(&t, 0..64);
        finish(&t, 0..64);
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert_eq!(trims(&t), 0, "not while the callers may come back");
        // The queue emptied mid-burst: a few more calls come, fewer than a burst.
        route(&t, 64..67);
        finish(&t, 64..67);
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert_eq!(trims(&t), 0, "a call within the second puts the trim off");
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert_eq!(trims(&t), 1, "the burst's tail still counts as the burst");

        // Ordinary kicks afterwards never trim; the next burst does, once.
        for n in 67..80 {
            route(&t, [n]);
            finish(&t, [n]);
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(trims(&t), 1);
        route(&t, 80..200);
        finish(&t, 80..200);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(trims(&t), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn fewer_calls_at_once_than_a_burst_never_trim() {
        let t = CallTracker::new();
        for round in 0..10u32 {
            let calls = round * 100..round * 100 + heap::BURST as u32 - 1;
            route(&t, calls.clone());
            finish(&t, calls);
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        assert_eq!(trims(&t), 0);
    }
}
