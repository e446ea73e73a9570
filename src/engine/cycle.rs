//! A cycle's writes: the knobs read, the administrator's settings recorded before the first
//! change, the plan of writes carried out, and undone (restored) at its end or after a failure.

use std::time::Instant;

use crate::core::knobs::{Knobs, Target};
use crate::core::plan::{self, plan};
use crate::core::policy::{resize_needed, Policy, Transition};
use crate::core::setting::{Mode, Setting};
use crate::core::verdicts::{self, Rollback};
use crate::core::written::Written;
use crate::io::meminfo;

use super::{now, CycleCpu, Engine, EngineError};

impl Engine {
    /// Runs one policy event and applies its transition; on failure the policy is left as it was,
    /// so what the bus shows stays what is in force, and what the writes changed is rolled back
    /// as [`verdicts::rollback`] says.
    pub(super) fn step(
        &mut self,
        event: impl FnOnce(&mut Policy, Instant) -> Option<Transition>,
    ) -> Result<(), EngineError> {
        let before = self.policy.clone();
        let Some(t) = event(&mut self.policy, now()) else { return Ok(()) };
        let first = self.saved.is_none();
        self.apply(t).inspect_err(|e| {
            self.policy = before;
            match verdicts::rollback(first, self.policy.setting()) {
                Rollback::Restore => {
                    tracing::warn!("{e}: putting back what this first step changed");
                    if let Err(e) = self.restore("a first step failed") {
                        tracing::error!("{e}");
                    }
                }
                Rollback::PutBack(setting) => {
                    if let Err(e) = self.put_in_force_now(setting) {
                        tracing::error!(setting = %setting, "putting the setting in force back: {e}");
                    }
                }
                Rollback::Nothing => {}
            }
        })
    }

    /// Carries a transition out, reading the knobs once: what is found is recorded (before the
    /// first change of a cycle) and the plan of writes starts from it.
    pub(super) fn apply(&mut self, t: Transition) -> Result<(), EngineError> {
        let have = self.config.ksm.read()?;
        let written = if t.to == Setting::Initial {
            self.restore_over(have, &format!("{} -> initial", t.from))?
        } else {
            if self.saved.is_none() {
                self.warn_if_our_own(&have);
                // Recorded with the first writes (see record_writes).
                self.saved = Some(have.clone());
                self.written = Written::default();
                self.recorded = false;
                self.cycle_began();
            }
            self.put_in_force(&have, t.to)?
        };
        tracing::info!(
            from = %t.from,
            to = %t.to,
            cause = %t.cause,
            run = written.run,
            pages_to_scan = written.pages_to_scan,
            sleep_millisecs = written.sleep_millisecs,
            smart_scan = written.smart_scan,
            "KSM setting {} -> {} ({})",
            t.from,
            t.to,
            t.cause
        );
        self.transitions.record(t.cause);
        Ok(())
    }

    /// Knobs about to be recorded as the administrator's that look like one of the throttler's
    /// own settings ([`verdicts::looks_like_our_own`]) are most likely a crashed instance's whose
    /// record was lost: they are recorded all the same (no one can tell), but said loudly.
    fn warn_if_our_own(&self, have: &Knobs) {
        let Ok(anon) = meminfo::anon_pages(&self.config.meminfo, self.config.page_size) else { return };
        if let Some(setting) = verdicts::looks_like_our_own(have, &self.config.profiles, anon) {
            tracing::warn!(
                run = have.run,
                pages_to_scan = have.pages_to_scan,
                sleep_millisecs = have.sleep_millisecs,
                "the KSM settings found look like this throttler's own {setting} setting: an instance may \
                 have stopped without its record. They are recorded as the administrator's and will be \
                 put back as such; if they are not, set the intended ones by hand after the cycle"
            );
        }
    }

    /// [`Self::put_sized`] over the knobs as they are read now.
    pub(super) fn put_sized_now(&mut self, setting: Setting, anon: Option<u64>) -> Result<Knobs, EngineError> {
        let have = self.config.ksm.read()?;
        self.put_sized(&have, setting, anon)
    }

    /// [`Self::put_in_force`] over the knobs as they are read now.
    pub(super) fn put_in_force_now(&mut self, setting: Setting) -> Result<Knobs, EngineError> {
        let have = self.config.ksm.read()?;
        self.put_in_force(&have, setting)
    }

    /// Writes `setting` (a throttling one, or `off`) over the knobs `have`, sized on AnonPages as
    /// it is now; returns the knobs in force.
    pub(super) fn put_in_force(&mut self, have: &Knobs, setting: Setting) -> Result<Knobs, EngineError> {
        let anon = match self.config.profiles.get(setting) {
            Some(_) => Some(meminfo::anon_pages(&self.config.meminfo, self.config.page_size)?),
            None => None,
        };
        self.put_sized(have, setting, anon)
    }

    /// Writes `setting` sized on `anon` (AnonPages, for a setting with a profile) over `have`.
    fn put_sized(&mut self, have: &Knobs, setting: Setting, anon: Option<u64>) -> Result<Knobs, EngineError> {
        let target = self.target_for(setting, anon);
        let plan = plan(have, &target);
        self.record_writes(&plan.writes)?;
        let now = self.config.ksm.execute(&plan)?;
        self.sized_on = anon;
        Ok(now)
    }

    /// Records the administrator's settings with `writes` added to what the cycle wrote, before
    /// they are made: a successor puts a knob back only over a value listed (see
    /// [`crate::core::written`]). The first record of a cycle must be made; a later one that
    /// cannot (a state folder turned read-only) is logged, and the cycle goes on rather than
    /// hold ksmd at its current pace.
    fn record_writes(&mut self, writes: &[plan::Write]) -> Result<(), EngineError> {
        let Some(saved) = &self.saved else { return Ok(()) };
        let written = self.written.with(writes);
        if self.recorded && written == self.written {
            return Ok(());
        }
        match self.config.state.save_with(saved, &written) {
            Ok(()) => self.recorded = true,
            Err(e) if !self.recorded => return Err(e.into()),
            Err(e) => tracing::error!(
                "{e}: the record of the initial KSM settings cannot list this write; after a crash, a \
                 successor would take the knobs it changes for someone else's and leave them"
            ),
        }
        self.written = written;
        Ok(())
    }

    /// Sizes the setting in force again if AnonPages moved by more than a fair share since it
    /// was sized (see [`crate::core::policy::resize_needed`]); `Ok(true)` if it did.
    pub(super) fn resize_if_moved(&mut self) -> Result<bool, EngineError> {
        let setting = self.policy.setting();
        let Some(sized_on) = self.sized_on.filter(|_| self.saved.is_some()) else { return Ok(false) };
        if self.config.profiles.get(setting).is_none() {
            return Ok(false);
        }
        let anon = meminfo::anon_pages(&self.config.meminfo, self.config.page_size)?;
        if !resize_needed(sized_on, anon) {
            return Ok(false);
        }
        self.put_sized_now(setting, Some(anon))?;
        tracing::info!(
            setting = %setting,
            anon_pages_before = sized_on,
            anon_pages = anon,
            "AnonPages moved: {setting} sized again"
        );
        Ok(true)
    }

    /// What `setting` writes; `anon`: AnonPages, for a setting with a profile.
    pub(super) fn target_for(&self, setting: Setting, anon: Option<u64>) -> Target {
        let mode = self.policy.mode();
        // Only adaptive's aggressive setting asks (see plan::smart_scan); unreadable: not merged,
        // the setting that merges a new VM whatever its twin's age.
        let merged = mode == Mode::Adaptive
            && setting == Setting::Aggressive
            && self.config.ksm.read_counter("pages_shared").ok().flatten().is_some_and(|n| n > 0);
        plan::target(setting, mode, self.config.profiles.get(setting), self.saved.as_ref(), anon, merged)
    }

    /// Puts the administrator's settings back if they were changed; they stay recorded (in
    /// memory and on disk) until that has worked.
    pub(super) fn restore(&mut self, why: &str) -> Result<(), EngineError> {
        if self.saved.is_some() {
            let have = self.config.ksm.read()?;
            self.restore_over(have, why)?;
        }
        Ok(())
    }

    /// [`Self::restore`] over the knobs `have`, just read; returns the knobs in force.
    pub(super) fn restore_over(&mut self, have: Knobs, why: &str) -> Result<Knobs, EngineError> {
        let Some(saved) = self.saved.clone() else { return Ok(have) };
        let now = self.config.ksm.execute(&plan(&have, &self.target_for(Setting::Initial, None)))?;
        // The knobs are back: a record that cannot be removed (a read-only or full state folder)
        // must not make the timeline flap between the originals and the last setting. A later
        // start puts it back only over knobs that still hold what this cycle wrote.
        if let Err(e) = self.config.state.remove() {
            tracing::error!(
                path = %self.config.state.path().display(),
                "the initial KSM settings are back, but their record cannot be removed ({e}): a later \
                 start puts it back only over knobs that still hold this throttler's values; remove it by hand"
            );
        }
        tracing::info!(
            run = saved.run,
            pages_to_scan = saved.pages_to_scan,
            sleep_millisecs = saved.sleep_millisecs,
            "initial KSM settings restored ({why})"
        );
        self.saved = None;
        self.written = Written::default();
        self.recorded = false;
        self.sized_on = None;
        self.cycle_ended();
        Ok(now)
    }

    /// ksmd's CPU time as a cycle leaves the initial settings; unknown where ksmd is not found.
    pub(super) fn cycle_began(&mut self) {
        self.cycle_cpu = match self.ksmd.cpu_time() {
            Ok(cpu) => Some(CycleCpu { started: now(), cpu_at_start: cpu, ended: None }),
            Err(e) => {
                tracing::debug!("ksmd's CPU time at the start of a cycle: {e}");
                None
            }
        };
    }

    pub(super) fn cycle_ended(&mut self) {
        if let Some(c) = &mut self.cycle_cpu {
            c.ended = self.ksmd.cpu_time().ok().map(|cpu| (now(), cpu));
            if c.ended.is_none() {
                self.cycle_cpu = None;
            }
        }
    }
}
