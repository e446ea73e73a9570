//! The need gate's half of the policy: kicks answered but KSM left alone while memory is not
//! needed, and `slow` held while it is.

use std::time::Instant;

use super::{Cause, Policy, Transition};
use crate::core::need::Gate;
use crate::core::setting::Setting;

impl Policy {
    pub fn gate(&self) -> Gate {
        self.gate
    }

    /// Whether the gate applies: `when-needed` in a mode that reacts to kicks (pinned settings,
    /// `off` and `initial` ignore it).
    pub fn gated(&self) -> bool {
        self.gate == Gate::WhenNeeded && self.mode.reacts_to_kicks()
    }

    /// The gate is closed: kicks are counted and answered, and KSM stays as it is.
    pub(super) fn closed(&self) -> bool {
        self.gated() && !self.needed
    }

    /// While memory is needed the cycle ends in `slow`, held, instead of the initial settings.
    pub(super) fn holds_slow(&self) -> bool {
        self.gated() && self.needed
    }

    /// Changes the gate. Opening it (`always`) lets a held `slow` step down at the mode's pace.
    pub fn set_gate(&mut self, gate: Gate, now: Instant) -> Option<Transition> {
        self.gate = gate;
        if gate == Gate::Always {
            // Not read while open: the gate's next reading says again.
            self.needed = false;
        }
        self.release_hold(now);
        self.act_on_need(None, now)
    }

    /// The need gate decided: memory is needed (act as if kicked) or no longer (a held `slow`
    /// steps down at the mode's pace). Never anything below the initial settings: the gate
    /// never writes `run`=2, which unmerges everything at once.
    pub fn need(&mut self, needed: bool, now: Instant) -> Option<Transition> {
        let appeared = needed && !self.needed;
        self.needed = needed;
        if appeared && self.gated() {
            let t = self.kick(now);
            return t.map(|t| Transition { cause: Cause::Need, ..t });
        }
        self.release_hold(now);
        None
    }

    /// A `slow` held by need (no deadline) gets the slow duration once it is no longer held.
    pub(super) fn release_hold(&mut self, now: Instant) {
        if !self.holds_slow() && self.mode.reacts_to_kicks() && self.setting == Setting::Slow && self.deadline.is_none()
        {
            self.deadline = Some(now + self.durations.slow);
            self.watch_from(now);
            self.resize_carry_on(now);
        }
    }

    /// In the initial settings while memory is needed (the gate or the mode just changed): as
    /// if kicked. `t`: the transition that brought it there, if any.
    pub(super) fn act_on_need(&mut self, t: Option<Transition>, now: Instant) -> Option<Transition> {
        if !(self.holds_slow() && self.setting == Setting::Initial) {
            return t;
        }
        let from = t.map_or(self.setting, |t| t.from);
        self.kick(now).map(|k| Transition { from, to: k.to, cause: Cause::Need }).filter(|k| k.from != k.to)
    }
}
