//! The modes a benchmark compares: the throttler's (the release daemon on a private bus) and the
//! kernel's own, with no daemon.

use kata_ksm_throttler::core::knobs::{Target, ADVISOR_NONE};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BenchMode {
    /// The daemon's default: Kata's timeline.
    Throttle,
    /// The daemon stepping down when the counters settle.
    Adaptive,
    /// No daemon; run=1, pages_to_scan=100, sleep_millisecs=20.
    KernelDefault,
    /// No daemon; run=1 and the kernel's advisor (`advisor_mode` = scan-time, Linux 6.8+) sizing
    /// pages_to_scan to scan everything in its target time.
    Advisor,
    /// No daemon; run=1, pages_to_scan=100000, sleep_millisecs=0.
    FlatOut,
    /// The daemon in throttle mode behind the need gate, its threshold above what is
    /// available (MemAvailable under 99.9 % of RAM): memory needed, the gate open.
    GateOpen,
    /// The same with the threshold below what is available (1 %): the gate closed, kicks
    /// answered and nothing written.
    GateClosed,
    /// No daemon and no KSM: run=0 (pages_to_scan=100, sleep_millisecs=20, the advisor off).
    /// The reference for what merging costs the guests, their boot time first.
    KsmOff,
}

impl BenchMode {
    pub const ALL: [BenchMode; 8] = [
        BenchMode::Throttle,
        BenchMode::Adaptive,
        BenchMode::KernelDefault,
        BenchMode::Advisor,
        BenchMode::FlatOut,
        BenchMode::GateOpen,
        BenchMode::GateClosed,
        BenchMode::KsmOff,
    ];

    pub fn name(self) -> &'static str {
        match self {
            BenchMode::Throttle => "throttle",
            BenchMode::Adaptive => "adaptive",
            BenchMode::KernelDefault => "kernel-default",
            BenchMode::Advisor => "advisor",
            BenchMode::FlatOut => "flat-out",
            BenchMode::GateOpen => "gate-open",
            BenchMode::GateClosed => "gate-closed",
            BenchMode::KsmOff => "ksm-off",
        }
    }

    /// The daemon's configuration file for this mode, if it needs one (the `[need]` table).
    pub fn daemon_config(self) -> Option<&'static str> {
        match self {
            // PSI off: the gate's state is set by MemAvailable alone, whatever else runs.
            BenchMode::GateOpen => {
                Some("[need]\ngate = \"when-needed\"\nmem-available-below = 0.999\npsi-some-above = 0\n")
            }
            BenchMode::GateClosed => {
                Some("[need]\ngate = \"when-needed\"\nmem-available-below = 0.01\npsi-some-above = 0\n")
            }
            _ => None,
        }
    }

    /// The daemon's `--mode`, for the modes run by the daemon.
    pub fn daemon_mode(self) -> Option<&'static str> {
        match self {
            BenchMode::Throttle => Some("throttle"),
            BenchMode::Adaptive => Some("adaptive"),
            BenchMode::GateOpen | BenchMode::GateClosed => Some("throttle"),
            BenchMode::KernelDefault | BenchMode::Advisor | BenchMode::FlatOut | BenchMode::KsmOff => None,
        }
    }

    /// What a run with no daemon writes at its start; `has_advisor`: the kernel has
    /// `advisor_mode` (it must be off for fixed knobs: it refuses pages_to_scan writes).
    pub fn fixed_knobs(self, has_advisor: bool) -> Option<Target> {
        let advisor = |mode: &str| has_advisor.then(|| mode.to_string());
        let fixed = |run, pages, sleep| Target {
            run: Some(run),
            pages_to_scan: Some(pages),
            sleep_millisecs: Some(sleep),
            advisor_mode: advisor(ADVISOR_NONE),
            smart_scan: None,
        };
        match self {
            BenchMode::KernelDefault => Some(fixed(1, 100, 20)),
            BenchMode::FlatOut => Some(fixed(1, 100_000, 0)),
            BenchMode::KsmOff => Some(fixed(0, 100, 20)),
            // The advisor's own sleep and limits, as the kernel has them by default.
            BenchMode::Advisor if has_advisor => {
                Some(Target { run: Some(1), advisor_mode: advisor("scan-time"), ..Target::default() })
            }
            BenchMode::Advisor
            | BenchMode::Throttle
            | BenchMode::Adaptive
            | BenchMode::GateOpen
            | BenchMode::GateClosed => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mode_is_run_by_the_daemon_or_by_fixed_knobs() {
        for mode in BenchMode::ALL {
            assert!(
                mode.daemon_mode().is_some() != mode.fixed_knobs(true).is_some(),
                "{}: exactly one way to run it",
                mode.name()
            );
        }
        assert_eq!(BenchMode::Advisor.fixed_knobs(false), None, "no advisor in the kernel: cannot run");
        let flat = BenchMode::FlatOut.fixed_knobs(true).expect("fixed");
        assert_eq!(flat.advisor_mode.as_deref(), Some("none"), "the advisor off, or pages_to_scan is refused");
        assert_eq!(BenchMode::FlatOut.fixed_knobs(false).expect("fixed").advisor_mode, None);
        let off = BenchMode::KsmOff.fixed_knobs(true).expect("fixed");
        assert_eq!((off.run, off.advisor_mode.as_deref()), (Some(0), Some("none")), "ksmd stopped, no advisor");
        assert_eq!(BenchMode::KsmOff.fixed_knobs(false).expect("fixed").run, Some(0), "any KSM kernel can run it");
    }
}
