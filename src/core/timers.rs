//! Every timer the engine keeps, in one table (as quinn-proto keeps a connection's): the engine
//! sleeps until [`Timers::next_timeout`] in one place and, woken, asks [`Timers::due`] which one
//! to serve. The policy's own three (step, sample, resize) are copied from its public API with
//! [`Timers::follow`]; the others are set by the engine as it arms them.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::core::policy::Policy;

/// One of the engine's timers, in the order they are served when several are due at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timer {
    /// The policy's next step down.
    Step,
    /// Adaptive mode's next read of the counters.
    Sample,
    /// The next check of AnonPages, to size the setting in force again.
    Resize,
    /// A kick that failed, applied again.
    KickRetry,
    /// The need gate's next read of meminfo and PSI.
    NeedPoll,
    /// The end of the idle time (exit on idle).
    Idle,
}

impl Timer {
    /// Every timer, in the order they are served.
    pub const ALL: [Timer; 6] =
        [Timer::Step, Timer::Sample, Timer::Resize, Timer::KickRetry, Timer::NeedPoll, Timer::Idle];

    /// Set by the policy itself: served together, by one wake-up of the policy.
    pub fn is_policy(self) -> bool {
        matches!(self, Timer::Step | Timer::Sample | Timer::Resize)
    }

    fn slot(self) -> usize {
        match self {
            Timer::Step => 0,
            Timer::Sample => 1,
            Timer::Resize => 2,
            Timer::KickRetry => 3,
            Timer::NeedPoll => 4,
            Timer::Idle => 5,
        }
    }
}

/// When each timer fires next; `None`: not armed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timers([Option<Instant>; Timer::ALL.len()]);

impl Timers {
    pub fn get(&self, timer: Timer) -> Option<Instant> {
        self.0[timer.slot()]
    }

    pub fn set(&mut self, timer: Timer, at: Option<Instant>) {
        self.0[timer.slot()] = at;
    }

    pub fn is_armed(&self, timer: Timer) -> bool {
        self.get(timer).is_some()
    }

    /// Copies the policy's deadlines (its step, sample and resize) into the table.
    pub fn follow(&mut self, policy: &Policy) {
        self.set(Timer::Step, policy.deadline());
        self.set(Timer::Sample, policy.sample_at());
        self.set(Timer::Resize, policy.resize_at());
    }

    /// The earliest armed timer; `None`: nothing to wake up for.
    pub fn next_timeout(&self) -> Option<Instant> {
        self.0.iter().flatten().min().copied()
    }

    /// The first timer due at `now`, in [`Timer::ALL`]'s order: the one to serve first.
    pub fn due(&self, now: Instant) -> Option<Timer> {
        Timer::ALL.into_iter().find(|&t| self.get(t).is_some_and(|at| at <= now))
    }
}

/// `deadline` as CLOCK_REALTIME microseconds, given the monotonic `now` and the wall clock `wall`
/// read at the same moment; 0 for none (and for a time before the epoch).
pub fn wall_micros(deadline: Option<Instant>, now: Instant, wall: SystemTime) -> u64 {
    deadline.map_or(0, |d| {
        let at = wall + d.saturating_duration_since(now);
        at.duration_since(UNIX_EPOCH).map_or(0, |t| t.as_micros() as u64)
    })
}

/// The inverse of [`wall_micros`]: CLOCK_REALTIME microseconds (0: none) as an `Instant`; one
/// already past is `now`.
pub fn from_wall_micros(us: u64, now: Instant, wall: SystemTime) -> Option<Instant> {
    (us > 0).then(|| {
        let due = UNIX_EPOCH + Duration::from_micros(us);
        now + due.duration_since(wall).unwrap_or_default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::policy::Durations;
    use crate::core::setting::Mode;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn nothing_armed_means_no_timeout_and_nothing_due() {
        let t = Timers::default();
        assert_eq!(t.next_timeout(), None);
        assert_eq!(t.due(Instant::now()), None);
    }

    #[test]
    fn the_earliest_is_the_timeout_and_due_follows_the_table_order() {
        let now = Instant::now();
        let mut t = Timers::default();
        t.set(Timer::Idle, Some(now + S));
        t.set(Timer::NeedPoll, Some(now + 3 * S));
        t.set(Timer::KickRetry, Some(now + 2 * S));
        assert_eq!(t.next_timeout(), Some(now + S));
        assert_eq!(t.due(now), None);
        assert_eq!(t.due(now + S), Some(Timer::Idle));
        // Both due: the retry is served before the idle time, whichever came first.
        assert_eq!(t.due(now + 2 * S), Some(Timer::KickRetry));
        assert_eq!(t.due(now + 10 * S), Some(Timer::KickRetry));
        t.set(Timer::KickRetry, None);
        assert_eq!(t.due(now + 10 * S), Some(Timer::NeedPoll));
        assert!(!t.is_armed(Timer::KickRetry));
    }

    #[test]
    fn follows_the_policy_deadlines() {
        let now = Instant::now();
        let mut p = Policy::new(Mode::Throttle, Durations::default());
        let mut t = Timers::default();
        t.follow(&p);
        assert_eq!(t.next_timeout(), None, "at rest, throttle sleeps");
        p.kick(now);
        t.follow(&p);
        assert_eq!(t.get(Timer::Step), p.deadline());
        assert_eq!(t.get(Timer::Resize), p.resize_at());
        assert_eq!(t.next_timeout(), p.wake_at());
        assert!(t.due(now + Durations::default().aggressive).is_some_and(Timer::is_policy));
    }

    #[test]
    fn wall_micros_round_trip_and_none_is_zero() {
        let now = Instant::now();
        let wall = UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(wall_micros(None, now, wall), 0);
        let us = wall_micros(Some(now + 30 * S), now, wall);
        assert_eq!(us, 1_000_030 * 1_000_000);
        assert_eq!(from_wall_micros(us, now, wall), Some(now + 30 * S));
        assert_eq!(from_wall_micros(0, now, wall), None);
        // A deadline that passed while no instance ran is due at once.
        assert_eq!(from_wall_micros(us, now, wall + 60 * S), Some(now));
    }
}
