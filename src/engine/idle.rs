//! Exit on idle and the hand-over to a successor (see the module documentation of
//! [`crate::engine`]): the engine reads and writes; [`crate::core::lifecycle`] decides.

use std::time::{Duration, Instant, SystemTime};

use futures_util::future::BoxFuture;
use tokio::sync::mpsc;

use crate::core::lifecycle::{self, Conclusion, Drain, Ended, Verdict};
use crate::core::setting::Setting;
use crate::core::timers::{from_wall_micros, Timer};
use crate::core::written::Written;
use crate::io::state_file::{Handover, StateError};

use super::{now, Engine, EngineError};

pub(super) struct IdleExit {
    after: Duration,
    notices: mpsc::Sender<()>,
    /// Since when the engine has been at rest with nothing happening; `None` while busy.
    since: Option<Instant>,
    /// A notice is out and not yet concluded.
    asked: bool,
}

impl IdleExit {
    pub(super) fn new(after: Duration, notices: mpsc::Sender<()>) -> IdleExit {
        IdleExit { after, notices, since: None, asked: false }
    }

    pub(super) fn asked(&self) -> bool {
        self.asked
    }
}

impl Engine {
    fn at_rest(&self) -> bool {
        lifecycle::at_rest(&self.policy, self.config.mode, self.saved.is_some(), self.timers.is_armed(Timer::KickRetry))
    }

    /// Restarts the idle clock: from now if at rest, else not running.
    pub(super) fn note_activity(&mut self) {
        let since = self.at_rest().then(now);
        if let Some(idle) = &mut self.idle {
            idle.since = since;
        }
    }

    /// When the idle time is up: never while a notice is out.
    pub(super) fn idle_due(&self) -> Option<Instant> {
        self.idle.as_ref().filter(|i| !i.asked).and_then(|i| i.since.map(|s| s + i.after))
    }

    pub(super) fn on_idle(&mut self) {
        let Some(idle) = &mut self.idle else { return };
        match idle.notices.try_send(()) {
            Ok(()) => {
                tracing::info!("idle for {}: releasing the bus name to exit", humantime::format_duration(idle.after));
                idle.asked = true;
            }
            // Nobody listens any more: stay.
            Err(_) => self.idle = None,
        }
    }

    pub(super) fn conclude_idle(&mut self, drain: Drain) -> (Verdict, Option<Ended>) {
        if let Some(idle) = &mut self.idle {
            idle.asked = false;
        }
        let ended = match lifecycle::conclude_idle(drain, self.at_rest()) {
            Conclusion::Idle => Some(Ended::Idle),
            Conclusion::HandOver => match self.hand_over() {
                Ok(()) => Some(Ended::HandedOver),
                Err(e) => {
                    tracing::error!("cannot hand over to a successor, staying: {e}");
                    None
                }
            },
            Conclusion::Stay => None,
        };
        let (verdict, ended) = lifecycle::settle(ended, self.stop_requested);
        if verdict == Verdict::Stay {
            tracing::info!("calls arrived while exiting on idle: staying");
            self.note_activity();
        }
        (verdict, ended)
    }

    fn hand_over(&mut self) -> Result<(), EngineError> {
        let handover = Handover {
            mode: self.policy.mode().as_str().to_owned(),
            setting: self.policy.setting().as_str().to_owned(),
            next_step_down_us: self.next_step_down_us(),
        };
        self.config.state.save_handover(&handover)?;
        tracing::info!(?handover, "a late call moved the throttler after its name was released: handing over");
        Ok(())
    }

    /// Carries on from where an instance that exited on idle handed over, if it did: `Ok(true)`.
    /// A hand-over that does not hold together is ignored (and the usual restore follows).
    pub(super) fn resume(&mut self) -> Result<bool, EngineError> {
        let handover = match self.config.state.take_handover() {
            Ok(Some(h)) => h,
            Ok(None) => return Ok(false),
            Err(e @ StateError::Corrupt { .. }) => {
                tracing::error!("{e}");
                return Ok(false);
            }
            Err(e) => return Err(e.into()),
        };
        let record = match self.config.state.load_record() {
            Ok(record) => record,
            Err(e @ StateError::Corrupt { .. }) => {
                tracing::error!("{e}");
                return Ok(false);
            }
            Err(e) => return Err(e.into()),
        };
        let now = now();
        let deadline = from_wall_micros(handover.next_step_down_us, now, SystemTime::now());
        let accepted = lifecycle::accept_handover(
            &handover.mode,
            &handover.setting,
            deadline,
            record.is_some(),
            self.config.durations,
            self.config.unprofitable_scans,
            now,
        );
        let Some(policy) = accepted else {
            tracing::error!(?handover, "ignoring a hand-over that does not hold together");
            return Ok(false);
        };
        tracing::info!(
            mode = %policy.mode(),
            setting = %policy.setting(),
            "carrying on where the instance that exited on idle left off"
        );
        self.recorded = record.is_some();
        (self.saved, self.written) = match record {
            Some(r) => (Some(r.knobs), r.written.unwrap_or_default()),
            None => (None, Written::default()),
        };
        self.policy = policy;
        if self.policy.setting() == Setting::Initial {
            // A record beside an initial setting is from a cycle that did not finish: put it back.
            self.restore("resumed in initial")?;
        } else {
            // In force already; applied again so that what the bus shows is what is in force
            // even if something touched KSM in between.
            self.put_in_force_now(self.policy.setting())?;
        }
        Ok(true)
    }
}

/// A way in to the engine besides the bus (the gRPC socket), closed before the bus name is
/// released on idle: both faces name it here, below them.
pub trait Intake: Send + Sync {
    /// Accepts nothing more (what is already accepted is still served).
    fn pause(&self);
    fn resume(&self);
    /// Completes once everything accepted has been served and closed.
    fn quiet(&self) -> BoxFuture<'_, ()>;
}
