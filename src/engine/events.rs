//! The events the engine feeds to the policy besides start-up and the need gate: kicks (those
//! the handles answered included), a kick retried, mode and gate changes, a reload, and the
//! policy's own timers (step, sample, resize).

use std::time::Instant;

use crate::core::need::Gate;
use crate::core::policy::{Cause, Counters, Durations};
use crate::core::setting::{Mode, Profiles};
use crate::core::timers::Timer;
use crate::core::verdicts;
use crate::io::meminfo;
use crate::io::sysfs::SysfsError;
use crate::quick_kick;

use super::idle::IdleExit;
use super::{now, Engine, EngineError, RETRY_AFTER};

impl Engine {
    pub(super) fn kick(&mut self) -> Result<(), EngineError> {
        self.kick_sized(true)
    }

    /// A kick; `size`: AnonPages read again if it changed nothing but the deadline.
    fn kick_sized(&mut self, size: bool) -> Result<(), EngineError> {
        let before = self.policy.setting();
        let result = self.step(|p, now| p.kick(now));
        // A kick that could not be applied is not lost (the caller still gets this error).
        self.retry_kick_if_failed(&result);
        // A kick that moved nothing (a storm, a pinned setting) still means new memory.
        if size && result.is_ok() && verdicts::kick_resizes(before, self.policy.setting()) {
            if let Err(e) = self.resize_if_moved() {
                tracing::error!("sizing {before} again for the kick: {e}");
            }
        }
        result
    }

    /// The kicks the handles answered in the window, taken in as one: they changed nothing
    /// but the deadline (from now) and perhaps the size, read again at most every
    /// [`quick_kick::SIZE_AT_MOST_EVERY`].
    pub(super) fn take_quick_kicks(&mut self) {
        if self.quick.take() == 0 {
            return;
        }
        let at = now();
        let size = quick_kick::size_again(self.quick_sized_at, at);
        if let Err(e) = self.kick_sized(size) {
            tracing::error!("a kick answered while nothing was to change: {e}");
        }
        if size {
            self.quick_sized_at = Some(at);
        }
        self.note_activity();
        self.publish();
    }

    /// Until when a kick would change nothing but the deadline: never past the next timer (the
    /// policy's, the need gate's), never while a kick waits to be retried, an idle exit is being
    /// concluded (a hand-over records the deadline) or the engine stops.
    pub(super) fn quick_window(&self) -> Option<Instant> {
        let exiting = self.idle.as_ref().is_some_and(IdleExit::asked);
        if !self.started || self.timers.is_armed(Timer::KickRetry) || self.stop_requested || exiting {
            return None;
        }
        let now = now();
        if self.policy.clone().kick(now).is_some() {
            return None;
        }
        match [self.policy.wake_at(), self.timers.get(Timer::NeedPoll)].into_iter().flatten().min() {
            Some(next) => next.checked_sub(quick_kick::MARGIN).filter(|&t| t > now),
            None => Some(now + quick_kick::NO_TIMER),
        }
    }

    /// A kick that failed (meminfo or sysfs unreadable, the record unwritable), applied again.
    pub(super) fn retry_kick(&mut self) {
        let result = self.step(|p, now| p.kick(now));
        if result.is_ok() {
            tracing::info!("the kick that had failed is applied");
        }
        self.retry_kick_if_failed(&result);
        self.note_activity();
        self.publish();
    }

    /// A kick that could not be applied is tried again [`RETRY_AFTER`] later, until it is.
    fn retry_kick_if_failed(&mut self, result: &Result<(), EngineError>) {
        let retry = result.as_ref().err().map(|e| {
            tracing::error!("the kick could not be applied, trying again in {}s: {e}", RETRY_AFTER.as_secs());
            now() + RETRY_AFTER
        });
        self.timers.set(Timer::KickRetry, retry);
    }

    pub(super) fn on_wake(&mut self) {
        let now = now();
        if self.policy.sample_at().is_some_and(|at| at <= now) {
            let result = match self.read_counters() {
                Ok(c) => {
                    let mut seen = None;
                    let result = self.step(|p, now| {
                        seen = p.counters(now, c);
                        seen
                    });
                    if let (Ok(()), Some(t)) = (&result, seen.filter(|t| t.cause == Cause::Unprofitable)) {
                        tracing::warn!(
                            general_profit = c.general_profit,
                            full_scans = c.full_scans,
                            pages_sharing = c.pages_sharing,
                            "KSM costs more than it saves: general_profit {} bytes over {} full scans in a row; \
                             {} -> {} (the next kick tries again)",
                            c.general_profit.unwrap_or(0),
                            self.policy.unprofitable_scans(),
                            t.from,
                            t.to
                        );
                    }
                    result
                }
                Err(e) => Err(e.into()),
            };
            if let Err(e) = result {
                // The timeline still bounds every step; a later sample may do better.
                tracing::error!("adaptive sample failed, next in {}s: {e}", RETRY_AFTER.as_secs());
                self.policy.postpone_sample(now + RETRY_AFTER);
            }
        }
        if let Err(e) = self.step(|p, now| p.timer(now)) {
            tracing::error!("step down failed, retrying in {}s: {e}", RETRY_AFTER.as_secs());
            self.policy.postpone(now + RETRY_AFTER);
        }
        if self.policy.resize_at().is_some_and(|at| at <= now) {
            let resized = self.resize_if_moved().unwrap_or_else(|e| {
                tracing::error!("sizing {} again: {e}", self.policy.setting());
                false
            });
            self.policy.resize_checked(now, resized);
        }
        self.note_activity();
        self.publish();
    }

    fn read_counters(&self) -> Result<Counters, SysfsError> {
        let ksm = &self.config.ksm;
        let read = |name| -> Result<u64, SysfsError> { Ok(ksm.read_counter(name)?.unwrap_or(0).max(0) as u64) };
        Ok(Counters::new(
            read("full_scans")?,
            read("pages_shared")?,
            read("pages_sharing")?,
            read("pages_unshared")?,
            read("pages_volatile")?,
        )
        .with_profit(ksm.read_counter("general_profit")?)
        .with_visits(ksm.read_counter("pages_scanned")?.map(|v| v.max(0) as u64))
        // Unread, it only takes away the arrival rule (see `policy::ARRIVAL_QUIET`).
        .with_anon(meminfo::anon_pages(&self.config.meminfo, self.config.page_size).ok()))
    }

    /// A new mode. The same setting under it is written again at the same size when
    /// [`verdicts::rewrite_after_mode_change`] says so, so only what the mode adds differs; the
    /// mode has changed by then, so a failure there is logged, not returned.
    pub(super) fn set_mode(&mut self, mode: Mode) -> Result<(), EngineError> {
        let setting = self.policy.setting();
        let result = self.step(|p, now| p.set_mode(mode, now));
        let rewrite = verdicts::rewrite_after_mode_change(setting, self.policy.setting(), self.saved.is_some());
        if let (Ok(()), Some(t)) = (&result, rewrite) {
            match self.put_sized_now(setting, self.sized_on) {
                Ok(_) => self.transitions.record(t.cause),
                Err(e) => tracing::error!(mode = %mode, "{setting} under the new mode: {e}"),
            }
        }
        // The gate applies in throttle and adaptive only: reading starts or stops.
        if self.policy.gated() != self.timers.is_armed(Timer::NeedPoll) {
            self.poll_need();
        }
        result
    }

    pub(super) fn set_need_gate(&mut self, gate: Gate) -> Result<(), EngineError> {
        let result = self.step(|p, now| p.set_gate(gate, now));
        if result.is_ok() {
            tracing::info!(gate = %gate, "need gate set");
            self.poll_need();
        }
        result
    }

    /// Takes new durations (for the steps still to come) and profiles (applied at once to the
    /// setting in force if its profile changed).
    pub(super) fn reload(&mut self, durations: Durations, profiles: Profiles) -> Result<(), EngineError> {
        self.policy.set_durations(durations);
        let setting = self.policy.setting();
        let changed = self.config.profiles.get(setting) != profiles.get(setting);
        self.config.profiles = profiles;
        self.config.durations = durations;
        tracing::info!("configuration reloaded");
        if changed {
            self.put_in_force_now(setting)?;
            tracing::info!(setting = %setting, "new profile applied to the setting in force");
        }
        Ok(())
    }
}
