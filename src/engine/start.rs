//! Start-up: carrying on from a hand-over, or putting back what a previous instance left changed
//! (its state file), then entering the start-up mode.

use crate::core::knobs::Target;
use crate::core::plan::{self, plan};
use crate::core::written;
use crate::io::state_file::{Record, StateError};

use super::{now, Engine, EngineError};

impl Engine {
    /// Puts back what a previous instance left changed (its state file), then enters the
    /// start-up mode. Fails if either cannot be done: starting on top of a half-restored host
    /// would record the wrong "initial" settings.
    pub(super) fn startup(&mut self) -> Result<(), EngineError> {
        if self.resume()? {
            self.start_gate();
            self.publish();
            return Ok(());
        }
        let config = &self.config;
        match config.state.load_record() {
            Ok(Some(record)) => {
                let knobs = &record.knobs;
                tracing::warn!(
                    path = %config.state.path().display(),
                    run = knobs.run,
                    pages_to_scan = knobs.pages_to_scan,
                    sleep_millisecs = knobs.sleep_millisecs,
                    "a previous instance stopped mid-cycle: restoring the settings it recorded"
                );
                if self.restore_recorded(&record)? {
                    config.state.remove()?;
                } else {
                    // Kept, in memory and on disk, for the next restore (at exit, or by a
                    // successor) to try again; meanwhile the throttler serves.
                    self.saved = Some(record.knobs);
                    self.written = record.written.unwrap_or_default();
                    self.recorded = true;
                }
            }
            Ok(None) => {}
            // Kept aside by load(); the current values are the best guess of the original.
            Err(e @ StateError::Corrupt { .. }) => tracing::error!("{e}"),
            Err(e) => return Err(e.into()),
        }
        if let Some(t) = self.policy.start(now()) {
            self.apply(t)?;
        }
        self.start_gate();
        self.publish();
        Ok(())
    }

    /// Puts a previous instance's record back over the knobs that still hold what it wrote
    /// (the others were set by someone else since, and stay: logged); `Ok(false)` if some knob
    /// could not be, which is logged. Knobs that cannot even be read (one left empty by a kill
    /// mid-write on a scratch directory) are all written blind, each one that can be.
    fn restore_recorded(&self, record: &Record) -> Result<bool, EngineError> {
        let target = Target::from(&record.knobs);
        let e = match self.config.ksm.read() {
            Ok(have) => {
                let restore = written::restore(&record.knobs, record.written.as_ref(), &have);
                for kept in &restore.kept {
                    tracing::warn!(
                        knob = kept.knob,
                        found = kept.found,
                        recorded = kept.recorded,
                        "{} holds {}, which this throttler did not write: set since by someone else, it stays \
                         (the record says {})",
                        kept.knob,
                        kept.found,
                        kept.recorded
                    );
                }
                match self.config.ksm.execute(&plan(&have, &restore.target)) {
                    Ok(_) => return Ok(true),
                    Err(e) => e,
                }
            }
            Err(e) => e,
        };
        tracing::error!("{e}: writing every recorded knob");
        let failed = self.config.ksm.execute_each(&plan::plan_blind(&target));
        for e in &failed {
            tracing::error!("{e}: this knob stays as it is; the record is kept to try again");
        }
        Ok(failed.is_empty())
    }
}
