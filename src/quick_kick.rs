//! Kicks that change nothing, answered without a round trip to the engine's thread. Nearly every
//! Kick of a storm finds the throttler aggressive already: all it does is move the deadline. The
//! engine says, after each change, until when a kick would change nothing ([`QuickKick::open_until`]:
//! never past its next timer, so nothing can step down before it has taken the kick in); until
//! then a [`crate::engine::Handle`] counts the kick, answers it at once and wakes the engine, which
//! takes every kick answered so in one go (the deadline moved from then, AnonPages read again). A
//! kick outside that window is a command with its reply after its transition, as before.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

#[derive(Debug)]
pub struct QuickKick {
    epoch: Instant,
    /// Nanoseconds after `epoch` until which a kick changes nothing; 0: not now.
    until_ns: AtomicU64,
    /// Kicks answered here and not yet taken in by the engine.
    pending: AtomicU64,
    /// Every kick received since start-up (KickCount), counted as it is answered.
    count: AtomicU64,
    taken: Notify,
}

impl QuickKick {
    pub fn new(now: Instant) -> QuickKick {
        QuickKick {
            epoch: now,
            until_ns: AtomicU64::new(0),
            pending: AtomicU64::new(0),
            count: AtomicU64::new(0),
            taken: Notify::new(),
        }
    }

    fn ns(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Until when a kick changes nothing; `None`: every kick goes to the engine.
    pub fn open_until(&self, until: Option<Instant>) {
        // An instant at (or before) the epoch is 0 too: closed.
        let ns = until.map_or(0, |t| self.ns(t));
        self.until_ns.store(ns, Ordering::Release);
    }

    /// Answers a kick at `now` if it changes nothing (`true`): counted, and the engine woken to
    /// take it in.
    pub fn try_answer(&self, now: Instant) -> bool {
        if self.ns(now) >= self.until_ns.load(Ordering::Acquire) {
            return false;
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.pending.fetch_add(1, Ordering::Release);
        self.taken.notify_one();
        true
    }

    /// A kick the engine received as a command.
    pub fn count_one(&self) {
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The kicks answered here since the last call (0 after a spurious wake-up).
    pub fn take(&self) -> u64 {
        self.pending.swap(0, Ordering::Acquire)
    }

    /// Completes once a kick has been answered here (or at once if one was since the last).
    pub async fn answered(&self) {
        self.taken.notified().await;
    }
}

/// How far before the engine's next timer the window closes: the engine takes a kick answered
/// here before any timer (its loop polls commands first), so this only has to cover the
/// instants being read on two threads.
pub const MARGIN: Duration = Duration::from_millis(10);

/// Kicks taken from the handles have AnonPages read again (the setting sized anew if it moved)
/// at most this often: in a storm the engine wakes every few kicks, and /proc/meminfo was the
/// dearest part of taking them. A kick that is a transition is sized as ever, and the size
/// checks (`core::policy::resize`) follow AnonPages in between.
pub const SIZE_AT_MOST_EVERY: Duration = Duration::from_millis(250);

/// Whether kicks taken at `now` have AnonPages read again, last read for such kicks at `last`.
pub fn size_again(last: Option<Instant>, now: Instant) -> bool {
    last.is_none_or(|at| now.saturating_duration_since(at) >= SIZE_AT_MOST_EVERY)
}

/// A window with no timer to close it (a pinned mode): a year.
pub const NO_TIMER: Duration = Duration::from_secs(365 * 24 * 3600);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kicks_are_answered_only_inside_the_window_and_all_are_counted_and_taken_once() {
        let t0 = Instant::now();
        let q = QuickKick::new(t0);
        assert!(!q.try_answer(t0), "closed at first");
        q.open_until(Some(t0 + Duration::from_secs(1)));
        assert!(q.try_answer(t0 + Duration::from_millis(999)));
        assert!(q.try_answer(t0 + Duration::from_millis(10)));
        assert!(!q.try_answer(t0 + Duration::from_secs(1)), "the window ends before its instant");
        q.count_one();
        assert_eq!(q.count(), 3);
        assert_eq!(q.take(), 2);
        assert_eq!(q.take(), 0);
        q.open_until(None);
        assert!(!q.try_answer(t0 + Duration::from_millis(1)));
        q.open_until(Some(t0));
        assert!(!q.try_answer(t0), "a window ending at the epoch is closed");
    }

    #[test]
    fn anon_pages_is_read_again_for_the_first_kicks_taken_then_at_most_every_quarter_second() {
        let t0 = Instant::now();
        assert!(size_again(None, t0));
        assert!(!size_again(Some(t0), t0 + SIZE_AT_MOST_EVERY - Duration::from_nanos(1)));
        assert!(size_again(Some(t0), t0 + SIZE_AT_MOST_EVERY));
    }
}
