//! The engine's life as verdicts on plain values: whether it is at rest, what an idle notice's
//! answer leads to, and whether a predecessor's hand-over can be carried on (see
//! [`crate::engine`]'s "Exit on idle").

use std::time::Instant;

use crate::core::policy::{Durations, Policy};
use crate::core::setting::{Mode, Setting};

/// What the bus edge found after an idle notice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drain {
    /// The name is released and every call routed here before that has finished. `successor`:
    /// the bus can start another instance (the name is activatable).
    Done { successor: bool },
    /// The edge could not make sure of that (calls still in flight, a bus error): keep serving.
    Unsure,
}

/// The engine's answer to an idle notice's [`Drain`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The engine is ending: do not take the name back.
    Exit,
    /// The engine keeps serving: take the name back.
    Stay,
}

/// Why the engine ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Asked to stop, or every handle gone: the administrator's settings are back.
    Shutdown,
    /// At rest, with the name released and nothing in flight: nothing to restore or lose.
    Idle,
    /// Moved by a late call after the name was released: the state is recorded for a successor
    /// and KSM is left as it is; the caller must see that a successor is started.
    HandedOver,
}

/// At rest: in the start-up mode's own state, no cycle recorded, no kick waiting to be retried,
/// and no need gate applying (the throttler then has memory to watch). An instance started
/// afresh would be in this very state, so one at rest can exit losing nothing.
pub fn at_rest(policy: &Policy, start_mode: Mode, in_cycle: bool, kick_retry_armed: bool) -> bool {
    !in_cycle && !kick_retry_armed && policy.at_rest_in(start_mode) && !policy.gated()
}

/// What an idle notice's answer leads to, before anything is carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conclusion {
    /// End: nothing to restore or hand over.
    Idle,
    /// Moved by a late call, and a successor can be started: record where it is and end.
    HandOver,
    /// Keep serving (the edge takes the name back).
    Stay,
}

/// The idle verdict: at rest with the name released, end; moved, hand over if a successor can
/// be started; unsure, stay.
pub fn conclude_idle(drain: Drain, at_rest: bool) -> Conclusion {
    match drain {
        Drain::Done { .. } if at_rest => Conclusion::Idle,
        Drain::Done { successor: true } => Conclusion::HandOver,
        Drain::Done { successor: false } | Drain::Unsure => Conclusion::Stay,
    }
}

/// The answer to the edge, once the conclusion is carried out (`ended`: how the engine ends, if
/// it does): a stop requested meanwhile ends it anyway.
pub fn settle(ended: Option<Ended>, stop_requested: bool) -> (Verdict, Option<Ended>) {
    match ended.or(stop_requested.then_some(Ended::Shutdown)) {
        Some(ended) => (Verdict::Exit, Some(ended)),
        None => (Verdict::Stay, None),
    }
}

/// Hand-over acceptance: the policy a successor carries on with, from what its predecessor
/// recorded (`mode`, `setting`, the deadline on this instance's clock) and whether a record of
/// the administrator's settings is beside it; `None` for a hand-over that does not hold together
/// (a throttling setting without a record would have nothing to put back).
pub fn accept_handover(
    mode: &str,
    setting: &str,
    deadline: Option<Instant>,
    has_record: bool,
    durations: Durations,
    unprofitable_scans: u64,
    now: Instant,
) -> Option<Policy> {
    let (Ok(mode), Some(setting)) = (mode.parse::<Mode>(), Setting::from_name(setting)) else { return None };
    let mut policy = Policy::resume(mode, setting, deadline, durations, now)?;
    policy.set_unprofitable_scans(unprofitable_scans);
    (policy.setting() == Setting::Initial || has_record).then_some(policy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::need::Gate;
    use std::time::Duration;

    #[test]
    fn at_rest_only_in_the_start_up_state_with_nothing_pending() {
        let now = Instant::now();
        let mut p = Policy::new(Mode::Throttle, Durations::default());
        assert!(at_rest(&p, Mode::Throttle, false, false));
        assert!(!at_rest(&p, Mode::Adaptive, false, false), "another start-up mode");
        assert!(!at_rest(&p, Mode::Throttle, true, false), "a cycle is recorded");
        assert!(!at_rest(&p, Mode::Throttle, false, true), "a kick waits to be retried");
        p.set_gate(Gate::WhenNeeded, now);
        assert!(!at_rest(&p, Mode::Throttle, false, false), "the gate watches memory");
        let mut p = Policy::new(Mode::Throttle, Durations::default());
        p.kick(now);
        assert!(!at_rest(&p, Mode::Throttle, false, false), "a step is scheduled");
    }

    #[test]
    fn the_idle_verdict() {
        assert_eq!(conclude_idle(Drain::Done { successor: false }, true), Conclusion::Idle);
        assert_eq!(conclude_idle(Drain::Done { successor: true }, true), Conclusion::Idle);
        assert_eq!(conclude_idle(Drain::Done { successor: true }, false), Conclusion::HandOver);
        assert_eq!(conclude_idle(Drain::Done { successor: false }, false), Conclusion::Stay);
        assert_eq!(conclude_idle(Drain::Unsure, true), Conclusion::Stay);
        assert_eq!(conclude_idle(Drain::Unsure, false), Conclusion::Stay);
    }

    #[test]
    fn a_stop_during_the_exchange_ends_it_anyway() {
        assert_eq!(settle(None, false), (Verdict::Stay, None));
        assert_eq!(settle(None, true), (Verdict::Exit, Some(Ended::Shutdown)));
        assert_eq!(settle(Some(Ended::Idle), true), (Verdict::Exit, Some(Ended::Idle)));
        assert_eq!(settle(Some(Ended::HandedOver), false), (Verdict::Exit, Some(Ended::HandedOver)));
    }

    #[test]
    fn hand_over_acceptance() {
        let now = Instant::now();
        let d = Durations::default();
        let soon = Some(now + Duration::from_secs(10));
        let p = accept_handover("throttle", "standard", soon, true, d, 7, now).expect("consistent");
        assert_eq!((p.mode(), p.setting(), p.deadline()), (Mode::Throttle, Setting::Standard, soon));
        assert_eq!(p.unprofitable_scans(), 7);
        assert!(accept_handover("throttle", "standard", soon, false, d, 7, now).is_none(), "no record");
        assert!(accept_handover("throttle", "initial", None, false, d, 7, now).is_some(), "nothing to put back");
        assert!(accept_handover("throttle", "standard", None, true, d, 7, now).is_none(), "no deadline");
        assert!(accept_handover("sideways", "standard", soon, true, d, 7, now).is_none(), "unknown mode");
        assert!(accept_handover("throttle", "fast", soon, true, d, 7, now).is_none(), "unknown setting");
    }
}
