//! The need gate's half in the engine: reading meminfo and PSI while the gate applies, and
//! acting on what [`crate::core::need::NeedGate`] decides.

use crate::core::need::{Figure, Readings};
use crate::core::timers::Timer;
use crate::io::{meminfo, pressure};

use super::{now, Engine};

impl Engine {
    /// Puts the configured gate in place and, if it applies, reads the need at once.
    pub(super) fn start_gate(&mut self) {
        let gate = self.config.gate;
        if let Err(e) = self.step(|p, now| p.set_gate(gate, now)) {
            tracing::error!("the need gate at start-up: {e}");
        }
        self.poll_need();
    }

    /// Reads meminfo and PSI, lets the gate decide, and acts on it; schedules the next read
    /// while the gate applies (never otherwise: an ungated idle throttler never wakes).
    pub(super) fn poll_need(&mut self) {
        if !self.policy.gated() {
            self.timers.set(Timer::NeedPoll, None);
            return;
        }
        let now = now();
        let readings = self.read_need();
        let observed = self.need.observe(now, readings);
        if observed.garbled && !self.need_garbled {
            tracing::error!(?readings, "a need figure cannot be read: the gate keeps its last decision");
        } else if !observed.garbled && self.need_garbled {
            tracing::info!("the need figures read again");
        }
        self.need_garbled = observed.garbled;
        if let Some(needed) = observed.changed {
            tracing::info!(
                needed,
                reason = self.need.reason(),
                "memory {}",
                if needed { "needed" } else { "no longer needed" }
            );
        }
        // Every time, not only on a change: a step that failed is tried again at the next read.
        let needed = self.need.needed();
        if let Err(e) = self.step(|p, now| p.need(needed, now)) {
            tracing::error!(
                "acting on the need gate, again in {}s: {e}",
                self.need.thresholds().poll_interval.as_secs()
            );
        }
        self.timers.set(Timer::NeedPoll, Some(now + self.need.thresholds().poll_interval));
    }

    pub(super) fn on_need_poll(&mut self) {
        let before = self.policy.setting();
        self.poll_need();
        if self.policy.setting() != before {
            self.note_activity();
        }
        self.publish();
    }

    fn read_need(&self) -> Readings {
        let t = self.need.thresholds();
        let mem_available = if t.mem_available_below > 0.0 {
            match meminfo::mem_available(&self.config.meminfo) {
                Ok(m) => Figure::Value(m.ratio()),
                Err(e) => {
                    tracing::debug!("{e}");
                    Figure::Garbled
                }
            }
        } else {
            Figure::Absent
        };
        let psi_some = if t.psi_some_above > 0.0 {
            match pressure::read(&pressure::path_under(&self.config.proc_root)) {
                Ok(Some(p)) => Figure::Value(p.some_avg10),
                Ok(None) => Figure::Absent,
                Err(e) => {
                    tracing::debug!("{e}");
                    Figure::Garbled
                }
            }
        } else {
            Figure::Absent
        };
        Readings { mem_available, psi_some }
    }
}
