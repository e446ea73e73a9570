//! The engine's smaller decisions, as plain functions on plain values: what to do after a write
//! failed, when a setting is written again, what knobs look like the throttler's own, and what
//! the need gate's state reads as.

use crate::core::knobs::Knobs;
use crate::core::need::{Gate, Need};
use crate::core::policy::{Cause, Transition};
use crate::core::setting::{Mode, Profiles, Setting};

/// What to put back after a step's writes failed (the policy is back as it was before it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rollback {
    /// The cycle's very first step: put back what it changed, so that a later cycle records
    /// the settings as they are then.
    Restore,
    /// A step that failed half-way may have paused ksmd (run=0) or changed one scan knob of
    /// two: write the setting in force again, so what is shown is what runs.
    PutBack(Setting),
    /// The initial settings are in force: nothing of the throttler's to put back.
    Nothing,
}

/// The rollback after a failed write: `first` is whether the step began a cycle, `in_force`
/// the setting the policy is back to.
pub fn rollback(first: bool, in_force: Setting) -> Rollback {
    if first {
        Rollback::Restore
    } else if in_force != Setting::Initial {
        Rollback::PutBack(in_force)
    } else {
        Rollback::Nothing
    }
}

/// The SetMode re-write: a mode change that kept the setting (`before` to `after`) during a
/// cycle writes it again at the same size, so that only what the mode adds differs (adaptive's
/// smart_scan, for one): a transition of the setting to itself, [`Cause::ModeRewrite`].
pub fn rewrite_after_mode_change(before: Setting, after: Setting, in_cycle: bool) -> Option<Transition> {
    (before == after && in_cycle).then_some(Transition { from: before, to: after, cause: Cause::ModeRewrite })
}

/// A kick that moved nothing (a storm, a pinned setting) still means new memory: the setting
/// in force is sized again if AnonPages moved.
pub fn kick_resizes(before: Setting, after: Setting) -> bool {
    before == after
}

/// "Looks like our own setting": knobs about to be recorded as the administrator's that match
/// one of the throttler's throttling settings (ksmd running at a profile's pace and a size within
/// half to twice the profile's for `anon` pages) are most likely a crashed instance's whose
/// record was lost. Returns the setting they look like.
pub fn looks_like_our_own(have: &Knobs, profiles: &Profiles, anon: u64) -> Option<Setting> {
    [Setting::Aggressive, Setting::Standard, Setting::Slow].into_iter().find(|&s| {
        profiles.get(s).is_some_and(|p| {
            let pages = p.pages_to_scan(anon);
            have.run == 1
                && have.sleep_millisecs == u64::from(p.sleep_millisecs)
                && have.pages_to_scan >= pages / 2
                && have.pages_to_scan <= pages.saturating_mul(2)
        })
    })
}

/// The need gate's state as the bus shows it, and the reason text: the gate's own reason while
/// it applies (`needed` and `reason` are its decision), else why it does not.
pub fn need_shown(gate: Gate, gated: bool, needed: bool, reason: &str, mode: Mode) -> (Need, String) {
    if gated {
        (if needed { Need::Needed } else { Need::NotNeeded }, reason.to_owned())
    } else if gate == Gate::Always {
        (Need::NotGated, "every kick drives KSM".to_owned())
    } else {
        (Need::NotGated, format!("mode {mode} ignores the gate"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::setting::Pinned;

    fn knobs(run: u8, pages_to_scan: u64, sleep_millisecs: u64) -> Knobs {
        Knobs { run, pages_to_scan, sleep_millisecs, advisor_mode: None, smart_scan: None }
    }

    #[test]
    fn the_rollback_after_a_failed_write() {
        assert_eq!(rollback(true, Setting::Initial), Rollback::Restore);
        assert_eq!(rollback(true, Setting::Aggressive), Rollback::Restore);
        assert_eq!(rollback(false, Setting::Standard), Rollback::PutBack(Setting::Standard));
        assert_eq!(rollback(false, Setting::Off), Rollback::PutBack(Setting::Off));
        assert_eq!(rollback(false, Setting::Initial), Rollback::Nothing);
    }

    #[test]
    fn the_same_setting_under_a_new_mode_is_written_again_only_in_a_cycle() {
        let same = Transition { from: Setting::Aggressive, to: Setting::Aggressive, cause: Cause::ModeRewrite };
        assert_eq!(rewrite_after_mode_change(Setting::Aggressive, Setting::Aggressive, true), Some(same));
        assert_eq!(rewrite_after_mode_change(Setting::Aggressive, Setting::Aggressive, false), None);
        assert_eq!(rewrite_after_mode_change(Setting::Aggressive, Setting::Standard, true), None);
        assert!(kick_resizes(Setting::Aggressive, Setting::Aggressive));
        assert!(!kick_resizes(Setting::Standard, Setting::Aggressive));
    }

    #[test]
    fn our_own_settings_are_recognised_within_half_to_twice_the_size() {
        let profiles = Profiles::default();
        let anon = 1_000_000;
        // Standard: AnonPages / 100 at 10 ms, 10000 pages.
        assert_eq!(looks_like_our_own(&knobs(1, 10_000, 10), &profiles, anon), Some(Setting::Standard));
        assert_eq!(looks_like_our_own(&knobs(1, 20_000, 10), &profiles, anon), Some(Setting::Standard));
        assert_eq!(looks_like_our_own(&knobs(1, 20_001, 10), &profiles, anon), None);
        assert_eq!(looks_like_our_own(&knobs(1, 5_000, 10), &profiles, anon), Some(Setting::Standard));
        assert_eq!(looks_like_our_own(&knobs(1, 4_999, 10), &profiles, anon), None);
        assert_eq!(looks_like_our_own(&knobs(0, anon / 100, 10), &profiles, anon), None, "ksmd stopped");
        assert_eq!(looks_like_our_own(&knobs(1, 100, 20), &profiles, anon), None, "the kernel's defaults");
        assert_eq!(looks_like_our_own(&knobs(1, anon / 10, 1), &profiles, anon), Some(Setting::Aggressive));
    }

    #[test]
    fn the_need_reason() {
        let shown = |gate, gated, needed, mode| need_shown(gate, gated, needed, "MemAvailable 12.0% < 20.0%", mode);
        assert_eq!(
            shown(Gate::WhenNeeded, true, true, Mode::Throttle),
            (Need::Needed, "MemAvailable 12.0% < 20.0%".to_owned())
        );
        assert_eq!(shown(Gate::WhenNeeded, true, false, Mode::Adaptive).0, Need::NotNeeded);
        assert_eq!(
            shown(Gate::Always, false, false, Mode::Throttle),
            (Need::NotGated, "every kick drives KSM".to_owned())
        );
        assert_eq!(
            shown(Gate::WhenNeeded, false, true, Mode::Pinned(Pinned::Slow)),
            (Need::NotGated, "mode slow ignores the gate".to_owned())
        );
    }
}
