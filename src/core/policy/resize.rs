//! The size checks: `pages_to_scan` follows AnonPages while a cycle runs.

use std::time::{Duration, Instant};

use super::Policy;

/// While a cycle runs, `pages_to_scan` follows AnonPages: checked this soon after each kick (a
/// step goes on at the pace reached), then twice as late each time it had not moved, up to [`RESIZE_AT_MOST_EVERY`]; a
/// booting guest's memory arrives after its kick, when the setting was sized.
pub const RESIZE_FIRST_AFTER: Duration = Duration::from_secs(1);
pub const RESIZE_AT_MOST_EVERY: Duration = Duration::from_secs(16);

/// Whether a setting sized on `sized_on` anonymous pages is to be sized again for `now`: when
/// they moved by more than a quarter up (or a fifth down), so that a storm of kicks over
/// unchanged memory writes nothing.
pub fn resize_needed(sized_on: u64, now: u64) -> bool {
    let (then, now) = (u128::from(sized_on), u128::from(now));
    now * 4 > then * 5 || now * 5 < then * 4
}

/// When `pages_to_scan` is next checked against AnonPages, and the wait after that.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Resize {
    pub(super) at: Instant,
    every: Duration,
}

impl Policy {
    /// AnonPages was read as asked by [`Policy::resize_at`]; `resized`: the setting was sized
    /// again, so memory is arriving: look again soon. Otherwise look again twice as late.
    pub fn resize_checked(&mut self, now: Instant, resized: bool) {
        if let Some(r) = &mut self.resize {
            r.every = if resized { RESIZE_FIRST_AFTER } else { (r.every * 2).min(RESIZE_AT_MOST_EVERY) };
            r.at = now + r.every;
        }
    }

    /// Starts (or stops) the size checks: while a cycle runs, first [`RESIZE_FIRST_AFTER`]
    /// from now.
    pub(super) fn resize_from(&mut self, now: Instant) {
        self.resize =
            self.deadline.is_some().then_some(Resize { at: now + RESIZE_FIRST_AFTER, every: RESIZE_FIRST_AFTER });
    }

    /// After a step: the step itself sized the new setting, and brings no memory of its own, so
    /// the checks go on at the pace they had reached (a kick starts them afresh).
    pub(super) fn resize_carry_on(&mut self, now: Instant) {
        let every = self.resize.map_or(RESIZE_FIRST_AFTER, |r| r.every);
        self.resize = self.deadline.is_some().then_some(Resize { at: now + every, every });
    }
}
