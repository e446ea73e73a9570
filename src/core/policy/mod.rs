//! The throttling policy: a pure state machine. Events (kick, mode change, timer) go in with the
//! time they happen; out comes the transition to apply, if any, and the time to wake up next.
//! It reads no clock and touches no file, so every timeline can be tested to the instant.
//! The timeline and the modes are here; adaptive mode's rule in `adaptive.rs`, the need gate's
//! half in `gate.rs`, the size checks in `resize.rs`.

use std::fmt;
use std::time::{Duration, Instant};

use crate::core::need::Gate;
use crate::core::setting::{Mode, Setting};

mod adaptive;
mod counters;
mod gate;
mod resize;
#[cfg(test)]
mod tests;

use adaptive::Watch;
pub use adaptive::{
    sample_interval, ARRIVAL_QUIET, ARRIVAL_SAMPLE_EVERY, ARRIVAL_SLACK_FRACTION, ARRIVAL_SLACK_PAGES,
    ARRIVING_PAGES_PER_S, ARRIVING_SLACK_PAGES, BURST_MIN_PAGES, BURST_OVER_FOR, BURST_SHARE, CONFIRM_SCANS,
    PACED_SCANS, QUIET_FRACTION, QUIET_MIN_PAGES, REST_SAMPLE_EVERY, SETTLED_FOR, SETTLE_AFTER_MERGING_SCANS,
    SETTLE_AFTER_SCANS, STALLED_FOR, STALL_VISITS_PER_MERGED, UNPROFITABLE_FOR, UNPROFITABLE_SCANS,
};
pub use counters::Counters;
use resize::Resize;
pub use resize::{resize_needed, RESIZE_AT_MOST_EVERY, RESIZE_FIRST_AFTER};

/// How long each throttling setting lasts with no further kick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Durations {
    pub aggressive: Duration,
    pub standard: Duration,
    pub slow: Duration,
}

impl Default for Durations {
    fn default() -> Self {
        Durations {
            aggressive: Duration::from_secs(30),
            standard: Duration::from_secs(120),
            slow: Duration::from_secs(120),
        }
    }
}

/// Why a transition happened: logged with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    Kick,
    Timer,
    ModeChange,
    /// SetMode kept the setting during a cycle: written again at the same size, so that only what
    /// the new mode adds differs (adaptive's smart_scan, for one). A transition to itself.
    ModeRewrite,
    Startup,
    /// Adaptive: full scans added almost nothing to pages_sharing or to the memory under scan.
    Settled,
    /// The need gate found memory needed: as if kicked.
    Need,
    /// Adaptive: general_profit stayed negative over the configured full scans.
    Unprofitable,
    /// Adaptive, aggressive: a full scan merged under 1/[`STALL_VISITS_PER_MERGED`] of the pages it
    /// visited.
    Stalled,
    /// Adaptive: memory is arriving (AnonPages growing): scanning it while it is written is waste,
    /// so ksmd slows down until it is in place.
    Arriving,
    /// Adaptive: the memory that arrived is in place (AnonPages still): aggressive, to merge it.
    Arrived,
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Cause::Kick => "kick",
            Cause::Timer => "timer",
            Cause::ModeChange => "mode-change",
            Cause::ModeRewrite => "mode-rewrite",
            Cause::Startup => "startup",
            Cause::Settled => "merging-settled",
            Cause::Need => "memory-needed",
            Cause::Unprofitable => "no-profit",
            Cause::Stalled => "merging-stalled",
            Cause::Arriving => "memory-arriving",
            Cause::Arrived => "memory-arrived",
        })
    }
}

/// A change of setting for the daemon to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub from: Setting,
    pub to: Setting,
    pub cause: Cause,
}

#[derive(Debug, Clone)]
pub struct Policy {
    mode: Mode,
    setting: Setting,
    deadline: Option<Instant>,
    durations: Durations,
    watch: Option<Watch>,
    resize: Option<Resize>,
    gate: Gate,
    /// The need gate's last decision (see [`crate::core::need`]).
    needed: bool,
    /// [`UNPROFITABLE_SCANS`], as configured.
    unprofitable_scans: u64,
}

impl Policy {
    /// A policy that has touched nothing yet; call [`Policy::start`] to enter its mode.
    pub fn new(mode: Mode, durations: Durations) -> Self {
        Policy {
            mode,
            setting: Setting::Initial,
            deadline: None,
            durations,
            watch: None,
            resize: None,
            gate: Gate::Always,
            needed: false,
            unprofitable_scans: UNPROFITABLE_SCANS,
        }
    }

    /// The profit back-off's count of full scans (0 turns it off).
    pub fn set_unprofitable_scans(&mut self, scans: u64) {
        self.unprofitable_scans = scans;
    }

    pub fn unprofitable_scans(&self) -> u64 {
        self.unprofitable_scans
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn setting(&self) -> Setting {
        self.setting
    }

    /// The next scheduled step down (in adaptive mode, the latest it will happen); `None` while
    /// nothing is scheduled.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// When the counters should next be read (adaptive mode while driving KSM).
    pub fn sample_at(&self) -> Option<Instant> {
        self.watch.map(|w| w.next_sample)
    }

    /// When AnonPages should next be read to size the setting in force again (see
    /// [`RESIZE_FIRST_AFTER`]): only while a cycle runs, never while idle.
    pub fn resize_at(&self) -> Option<Instant> {
        self.resize.map(|r| r.at)
    }

    /// When the daemon must next wake up: the earliest of the deadline, the next sample and the
    /// next size check.
    pub fn wake_at(&self) -> Option<Instant> {
        [self.deadline, self.sample_at(), self.resize_at()].into_iter().flatten().min()
    }

    /// A policy carried over from an instance that exited on idle while a late call had moved it
    /// (the engine's hand-over): `None` unless `mode`, `setting` and `deadline` are a state the
    /// policy itself could be in, so a damaged record cannot put it somewhere it never goes.
    /// `now` restarts adaptive mode's sampling, which starts afresh.
    pub fn resume(
        mode: Mode,
        setting: Setting,
        deadline: Option<Instant>,
        durations: Durations,
        now: Instant,
    ) -> Option<Self> {
        let consistent = match mode {
            Mode::Throttle | Mode::Adaptive => match setting {
                Setting::Initial => deadline.is_none(),
                Setting::Aggressive | Setting::Standard => deadline.is_some(),
                // Without a deadline: held by the need gate.
                Setting::Slow => true,
                Setting::Off => false,
            },
            Mode::Initial => setting == Setting::Initial && deadline.is_none(),
            Mode::Off => setting == Setting::Off && deadline.is_none(),
            Mode::Pinned(p) => setting == p.setting() && deadline.is_none(),
        };
        consistent.then(|| {
            let mut p = Policy {
                mode,
                setting,
                deadline,
                durations,
                watch: None,
                resize: None,
                ..Policy::new(mode, durations)
            };
            p.watch_from(now);
            p.resize_from(now);
            p
        })
    }

    /// At rest in `mode`: the initial settings, nothing scheduled. An instance started in `mode`
    /// is in this very state, so one that is at rest can exit and be started again losing nothing.
    pub fn at_rest_in(&self, mode: Mode) -> bool {
        // Adaptive resting after an arrival still watches for memory arriving.
        self.mode == mode && self.setting == Setting::Initial && self.deadline.is_none() && self.watch.is_none()
    }

    /// Enters the start-up mode: `throttle` and `initial` change nothing until something happens.
    pub fn start(&mut self, _now: Instant) -> Option<Transition> {
        let target = match self.mode {
            Mode::Throttle | Mode::Adaptive | Mode::Initial => Setting::Initial,
            Mode::Off => Setting::Off,
            Mode::Pinned(p) => p.setting(),
        };
        self.move_to(target, None, Cause::Startup)
    }

    /// New VMs are starting. Only `throttle` reacts; a kick while aggressive only restarts the
    /// timer, so a storm of kicks costs one transition.
    pub fn kick(&mut self, now: Instant) -> Option<Transition> {
        if !self.mode.reacts_to_kicks() || self.closed() {
            return None;
        }
        let deadline = Some(now + self.durations.aggressive);
        let t = self.move_to(Setting::Aggressive, deadline, Cause::Kick);
        // A kick means new memory: judge settling afresh (a storm only restarts the count), and
        // follow its arrival from the start.
        self.watch_from(now);
        self.resize_from(now);
        t
    }

    pub fn set_mode(&mut self, mode: Mode, now: Instant) -> Option<Transition> {
        if mode == self.mode {
            return None;
        }
        self.mode = mode;
        let (target, deadline) = match mode {
            // Keep the cycle going from where a pinned setting left it, rather than dropping a
            // host that is busy merging straight back to its idle settings.
            Mode::Throttle | Mode::Adaptive => match self.duration_of(self.setting) {
                Some(d) => (self.setting, Some(now + d)),
                None => (Setting::Initial, None),
            },
            Mode::Initial => (Setting::Initial, None),
            Mode::Off => (Setting::Off, None),
            Mode::Pinned(p) => (p.setting(), None),
        };
        let t = self.move_to(target, deadline, Cause::ModeChange);
        self.watch_from(now);
        self.resize_from(now);
        self.act_on_need(t, now)
    }

    /// The timer fired: step down if the deadline has passed (an early wake-up changes nothing).
    pub fn timer(&mut self, now: Instant) -> Option<Transition> {
        match self.deadline {
            Some(deadline) if now >= deadline => {}
            _ => return None,
        }
        let next = match self.setting {
            Setting::Aggressive => Setting::Standard,
            Setting::Standard => Setting::Slow,
            Setting::Slow => return self.floor(Cause::Timer),
            // Nothing is scheduled from these; a stale deadline is simply dropped.
            Setting::Initial | Setting::Off => {
                self.deadline = None;
                return None;
            }
        };
        let deadline = self.duration_of(next).map(|d| now + d);
        let t = self.move_to(next, deadline, Cause::Timer);
        self.watch_from(now);
        self.resize_carry_on(now);
        t
    }

    /// Where a cycle ends: the initial settings, or `slow` held while memory is needed.
    fn floor(&mut self, cause: Cause) -> Option<Transition> {
        let to = if self.holds_slow() { Setting::Slow } else { Setting::Initial };
        let t = self.move_to(to, None, cause);
        self.watch = None;
        self.resize = None;
        t
    }

    /// New durations for the steps still to come; the one under way keeps its deadline.
    pub fn set_durations(&mut self, durations: Durations) {
        self.durations = durations;
    }

    /// Moves the deadline without a transition: a step that could not be applied is tried again.
    pub fn postpone(&mut self, until: Instant) {
        if self.deadline.is_some() {
            self.deadline = Some(until);
        }
    }

    /// Moves the next sample: one that could not be read or applied is tried again later.
    pub fn postpone_sample(&mut self, until: Instant) {
        if let Some(w) = &mut self.watch {
            w.next_sample = until;
        }
    }

    fn duration_of(&self, setting: Setting) -> Option<Duration> {
        match setting {
            Setting::Aggressive => Some(self.durations.aggressive),
            Setting::Standard => Some(self.durations.standard),
            Setting::Slow => Some(self.durations.slow),
            Setting::Initial | Setting::Off => None,
        }
    }

    fn move_to(&mut self, to: Setting, deadline: Option<Instant>, cause: Cause) -> Option<Transition> {
        self.deadline = deadline;
        let from = std::mem::replace(&mut self.setting, to);
        (from != to).then_some(Transition { from, to, cause })
    }
}
