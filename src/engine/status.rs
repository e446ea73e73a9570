//! What the engine publishes for the bus to show, and when a change of it is worth a signal.

use std::time::{Duration, Instant, SystemTime};

use crate::core::need::{Gate, Need};
use crate::core::setting::{Mode, Setting};
use crate::core::timers::wall_micros;
use crate::core::transitions::TransitionCounts;
use crate::core::verdicts::need_shown;

use super::{now, Engine};

/// A deadline that moves less than this is updated silently (see [`Engine::publish`]).
const SIGNAL_DEADLINE_MOVES_OVER_US: u64 = 1_000_000;

/// What the bus shows. `kick_count` changes without notifying watchers, so a kick storm does not
/// turn into a signal storm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub mode: Mode,
    pub setting: Setting,
    /// CLOCK_REALTIME microseconds of the next scheduled step, 0 when none.
    pub next_step_down_us: u64,
    pub kick_count: u64,
    /// Transitions applied since start-up, by cause; changes without a signal of its own (the
    /// setting's change is signalled).
    pub transitions: TransitionCounts,
    /// ksmd's CPU time at the start of the cycle under way or the last one (and at its end),
    /// for the bus to show ksmd's share of a CPU over it; `None` before any cycle, or where
    /// ksmd could not be read when it began.
    pub cycle_cpu: Option<CycleCpu>,
    pub gate: Gate,
    pub need: Need,
    /// The figure that decided the gate's state ("MemAvailable 12.0% < 20.0%").
    pub need_reason: String,
}

/// ksmd's CPU time (since boot) when a cycle left the initial settings, and when it came back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CycleCpu {
    pub started: Instant,
    pub cpu_at_start: Duration,
    /// When the cycle ended and ksmd's CPU time then; `None` while it runs.
    pub ended: Option<(Instant, Duration)>,
}

impl Engine {
    pub(super) fn next_step_down_us(&self) -> u64 {
        wall_micros(self.policy.deadline(), now(), SystemTime::now())
    }

    /// As [`Self::next_step_down_us`], but the same value as last shown while the deadline has
    /// not moved.
    fn shown_next_step_down_us(&self) -> u64 {
        let deadline = self.policy.deadline();
        match self.shown_deadline.get() {
            Some((shown, us)) if Some(shown) == deadline => us,
            _ => {
                let us = self.next_step_down_us();
                self.shown_deadline.set(deadline.map(|d| (d, us)));
                us
            }
        }
    }

    pub(super) fn publish(&self) {
        let next_step_down_us = self.shown_next_step_down_us();
        let (mode, setting) = (self.policy.mode(), self.policy.setting());
        let kick_count = self.quick.count();
        self.quick.open_until(self.quick_window());
        let transitions = self.transitions;
        let cycle_cpu = self.cycle_cpu;
        let gate = self.policy.gate();
        let (need, need_reason) = need_shown(gate, self.policy.gated(), self.need.needed(), self.need.reason(), mode);
        self.status.send_if_modified(|s| {
            // A kick storm moves the deadline on every kick: the value is kept current for Get,
            // but only a move of more than a second (or a real change) is worth a signal. The
            // kick count changes without one.
            let moved = s.next_step_down_us.abs_diff(next_step_down_us) > SIGNAL_DEADLINE_MOVES_OVER_US;
            let changed = s.mode != mode
                || s.setting != setting
                || moved
                || s.gate != gate
                || s.need != need
                || s.need_reason != need_reason;
            s.mode = mode;
            s.setting = setting;
            s.next_step_down_us = next_step_down_us;
            s.kick_count = kick_count;
            s.transitions = transitions;
            s.cycle_cpu = cycle_cpu;
            s.gate = gate;
            s.need = need;
            s.need_reason = need_reason;
            changed
        });
    }
}
