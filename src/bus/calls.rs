//! Counts the `Kick` and `SetMode` calls that have reached the connection and whose handler has
//! not finished. It reads every message in the order the socket delivered them, so once it has
//! seen the reply to a call made after a given moment ([`CallTracker::fence`]), it has seen every
//! call the bus routed here before that moment: what the idle exit waits for
//! ([`crate::bus::idle_exit`]). A burst of calls, once over, also asks for the heap to be trimmed.

use std::collections::HashSet;
use std::sync::Arc;

use futures_util::StreamExt;
use tokio::sync::watch;
use zbus::message::{Header, Message, Sequence, Type};
use zbus::{Connection, MessageStream};

use crate::io::heap;
use crate::names::{INTERFACE, OBJECT_PATH};

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
    /// The trim after a huge message is waiting ([`LARGE_MESSAGE_RETRIM`]).
    retrim_pending: bool,
    /// Trims done, for the tests.
    trims: u64,
}

/// Keeps count of the `Kick` and `SetMode` calls that have reached the connection and whose
/// handler has not finished. Handlers hold a [`CallGuard`] while they run.
#[derive(Debug)]
pub struct CallTracker {
    calls: watch::Sender<Calls>,
}

/// A message this large costs the daemon a multiple of its size while it is handled.
const LARGE_MESSAGE: usize = 1 << 20;
/// The handler of a huge message (zbus's own, for a property name) may still hold its copies
/// when the first trim runs (on a loaded machine, writing a huge echo to the bus can outlast the
/// trim's wait: docs/performance.md, "The heap after a burst"): one more trim this long after
/// the message.
const LARGE_MESSAGE_RETRIM: std::time::Duration = std::time::Duration::from_secs(5);

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
            // A huge message (anyone may send one to any method, up to the bus's limit) leaves
            // its buffers and zbus's error echo in the heap: given back like a burst's.
            if msg.data().len() >= LARGE_MESSAGE {
                self.schedule_trim();
                self.trim_later(LARGE_MESSAGE_RETRIM);
            }
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
        let mut burst_over = false;
        self.calls.send_modify(|c| {
            if !c.routed.remove(&id) {
                if c.finished_early.len() >= FINISHED_EARLY_MAX {
                    c.finished_early.clear();
                }
                c.finished_early.insert(id);
            }
            c.finished += 1;
            burst_over = c.routed.is_empty() && c.peak >= heap::BURST;
        });
        if burst_over {
            self.schedule_trim();
        }
    }

    /// A trim once callers have stayed away for a while, unless one is already waiting. After
    /// the burst (or the huge message), not on a timer: one wake-up per burst and none while
    /// idle. Not from inside the call that ended it, whose task and the others' queued replies
    /// are not freed yet (a trim there leaves what a later trim releases); and only once the
    /// callers have stayed away for a while, as a thousand clients empty the queue now and then
    /// mid-burst (a trim then, and none at the end, leaves the burst's heap behind; the figures
    /// are in docs/performance.md, "The heap after a burst").
    fn schedule_trim(self: &Arc<Self>) {
        let mut schedule = false;
        self.calls.send_if_modified(|c| {
            schedule = !c.trim_pending;
            c.trim_pending = true;
            false
        });
        if schedule {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn(Arc::clone(self).trim_when_quiet());
                }
                Err(_) => self.trim_now(),
            }
        }
    }

    /// One more trim after `delay`, whatever else is scheduled; one at a time.
    fn trim_later(self: &Arc<Self>, delay: std::time::Duration) {
        let mut schedule = false;
        self.calls.send_if_modified(|c| {
            schedule = !c.retrim_pending;
            c.retrim_pending = true;
            false
        });
        if !schedule {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let this = Arc::clone(self);
            rt.spawn(async move {
                tokio::time::sleep(delay).await;
                this.calls.send_if_modified(|c| {
                    c.retrim_pending = false;
                    false
                });
                this.trim_now();
            });
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
    // The INTERFACE field is optional: a call without it is dispatched to our interface by its
    // member (these three are only ours), so it is counted too.
    if header.path()?.as_str() != OBJECT_PATH || header.interface().is_some_and(|i| i.as_str() != INTERFACE) {
        return None;
    }
    let signature = match header.member()?.as_str() {
        "Kick" => "",
        "SetMode" | "SetNeedGate" => "s",
        _ => return None,
    };
    if msg.body().signature().to_string() != signature {
        return None;
    }
    call_id(&header)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

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
