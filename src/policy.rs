//! The throttling policy: a pure state machine. Events (kick, mode change, timer) go in with the
//! time they happen; out comes the transition to apply, if any, and the time to wake up next.
//! It reads no clock and touches no file, so every timeline can be tested to the instant.

use std::fmt;
use std::time::Duration;

use tokio::time::Instant;

use crate::setting::{Mode, Setting};

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
    Startup,
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Cause::Kick => "kick",
            Cause::Timer => "timer",
            Cause::ModeChange => "mode-change",
            Cause::Startup => "startup",
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
}

impl Policy {
    /// A policy that has touched nothing yet; call [`Policy::start`] to enter its mode.
    pub fn new(mode: Mode, durations: Durations) -> Self {
        Policy { mode, setting: Setting::Initial, deadline: None, durations }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn setting(&self) -> Setting {
        self.setting
    }

    /// When [`Policy::timer`] has something to do; `None` while nothing is scheduled.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// A policy carried over from an instance that exited on idle while a late call had moved it
    /// (the engine's hand-over): `None` unless `mode`, `setting` and `deadline` are a state the
    /// policy itself could be in, so a damaged record cannot put it somewhere it never goes.
    pub fn resume(mode: Mode, setting: Setting, deadline: Option<Instant>, durations: Durations) -> Option<Self> {
        let consistent = match mode {
            Mode::Throttle => match setting {
                Setting::Initial => deadline.is_none(),
                Setting::Aggressive | Setting::Standard | Setting::Slow => deadline.is_some(),
                Setting::Off => false,
            },
            Mode::Initial => setting == Setting::Initial && deadline.is_none(),
            Mode::Off => setting == Setting::Off && deadline.is_none(),
            Mode::Pinned(p) => setting == p.setting() && deadline.is_none(),
        };
        consistent.then_some(Policy { mode, setting, deadline, durations })
    }

    /// At rest in `mode`: the initial settings, nothing scheduled. An instance started in `mode`
    /// is in this very state, so one that is at rest can exit and be started again losing nothing.
    pub fn at_rest_in(&self, mode: Mode) -> bool {
        self.mode == mode && self.setting == Setting::Initial && self.deadline.is_none()
    }

    /// Enters the start-up mode: `throttle` and `initial` change nothing until something happens.
    pub fn start(&mut self, _now: Instant) -> Option<Transition> {
        let target = match self.mode {
            Mode::Throttle | Mode::Initial => Setting::Initial,
            Mode::Off => Setting::Off,
            Mode::Pinned(p) => p.setting(),
        };
        self.move_to(target, None, Cause::Startup)
    }

    /// New VMs are starting. Only `throttle` reacts; a kick while aggressive only restarts the
    /// timer, so a storm of kicks costs one transition.
    pub fn kick(&mut self, now: Instant) -> Option<Transition> {
        if self.mode != Mode::Throttle {
            return None;
        }
        let deadline = Some(now + self.durations.aggressive);
        self.move_to(Setting::Aggressive, deadline, Cause::Kick)
    }

    pub fn set_mode(&mut self, mode: Mode, now: Instant) -> Option<Transition> {
        if mode == self.mode {
            return None;
        }
        self.mode = mode;
        let (target, deadline) = match mode {
            // Keep the cycle going from where a pinned setting left it, rather than dropping a
            // host that is busy merging straight back to its idle settings.
            Mode::Throttle => match self.duration_of(self.setting) {
                Some(d) => (self.setting, Some(now + d)),
                None => (Setting::Initial, None),
            },
            Mode::Initial => (Setting::Initial, None),
            Mode::Off => (Setting::Off, None),
            Mode::Pinned(p) => (p.setting(), None),
        };
        self.move_to(target, deadline, Cause::ModeChange)
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
            Setting::Slow => Setting::Initial,
            // Nothing is scheduled from these; a stale deadline is simply dropped.
            Setting::Initial | Setting::Off => {
                self.deadline = None;
                return None;
            }
        };
        let deadline = self.duration_of(next).map(|d| now + d);
        self.move_to(next, deadline, Cause::Timer)
    }

    /// Moves the deadline without a transition: a step that could not be applied is tried again.
    pub fn postpone(&mut self, until: Instant) {
        if self.deadline.is_some() {
            self.deadline = Some(until);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::setting::Pinned;

    const S: Duration = Duration::from_secs(1);

    fn throttle() -> (Policy, Instant) {
        let mut p = Policy::new(Mode::Throttle, Durations::default());
        let t0 = Instant::now();
        assert_eq!(p.start(t0), None, "throttle starts in initial and touches nothing");
        (p, t0)
    }

    fn to(t: Option<Transition>) -> Option<Setting> {
        t.map(|t| t.to)
    }

    #[test]
    fn full_timeline_after_one_kick() {
        let (mut p, t0) = throttle();
        let kick = p.kick(t0).expect("kick moves");
        assert_eq!((kick.from, kick.to, kick.cause), (Setting::Initial, Setting::Aggressive, Cause::Kick));
        assert_eq!(p.deadline(), Some(t0 + 30 * S), "aggressive lasts 30 s, not the original's 120 s");

        assert_eq!(p.timer(t0 + 29 * S), None, "early wake-up changes nothing");
        assert_eq!(p.setting(), Setting::Aggressive);

        assert_eq!(to(p.timer(t0 + 30 * S)), Some(Setting::Standard));
        assert_eq!(p.deadline(), Some(t0 + 150 * S));
        assert_eq!(to(p.timer(t0 + 150 * S)), Some(Setting::Slow));
        assert_eq!(p.deadline(), Some(t0 + 270 * S));
        let last = p.timer(t0 + 270 * S).expect("slow ends");
        assert_eq!((last.from, last.to, last.cause), (Setting::Slow, Setting::Initial, Cause::Timer));
        assert_eq!(p.deadline(), None, "nothing scheduled once back to initial");
        assert_eq!(p.timer(t0 + 10_000 * S), None);
    }

    #[test]
    fn kick_while_aggressive_only_restarts_the_timer() {
        let (mut p, t0) = throttle();
        p.kick(t0);
        for i in 1..1000 {
            assert_eq!(p.kick(t0 + i * Duration::from_millis(10)), None);
        }
        let last = t0 + 999 * Duration::from_millis(10);
        assert_eq!(p.deadline(), Some(last + 30 * S));
        assert_eq!(p.timer(t0 + 30 * S), None, "the first kick's deadline is gone");
        assert_eq!(to(p.timer(last + 30 * S)), Some(Setting::Standard));
    }

    #[test]
    fn kick_from_any_later_step_returns_to_aggressive() {
        for steps in 1..=3 {
            let (mut p, t0) = throttle();
            p.kick(t0);
            let mut now = t0;
            for _ in 0..steps {
                now = p.deadline().expect("scheduled");
                p.timer(now);
            }
            let from = p.setting();
            let t = p.kick(now + S).expect("kick moves");
            assert_eq!((t.from, t.to), (from, Setting::Aggressive));
            assert_eq!(p.deadline(), Some(now + 31 * S));
        }
    }

    #[test]
    fn at_rest_only_in_the_start_up_mode_with_nothing_scheduled() {
        let (mut p, t0) = throttle();
        assert!(p.at_rest_in(Mode::Throttle));
        assert!(!p.at_rest_in(Mode::Off), "another start-up mode would not come back here");
        p.kick(t0);
        assert!(!p.at_rest_in(Mode::Throttle), "a cycle is running");
        p.set_mode(Mode::Initial, t0);
        assert!(!p.at_rest_in(Mode::Throttle), "a mode set at run time would be lost");
        p.set_mode(Mode::Throttle, t0);
        assert!(p.at_rest_in(Mode::Throttle));
        p.set_mode(Mode::Off, t0);
        assert!(!p.at_rest_in(Mode::Throttle));
    }

    #[test]
    fn resume_accepts_only_reachable_states() {
        let t0 = Instant::now();
        let d = Durations::default();
        let p = Policy::resume(Mode::Throttle, Setting::Standard, Some(t0 + S), d).expect("mid-cycle");
        assert_eq!((p.mode(), p.setting(), p.deadline()), (Mode::Throttle, Setting::Standard, Some(t0 + S)));
        assert!(Policy::resume(Mode::Off, Setting::Off, None, d).is_some());
        assert!(Policy::resume(Mode::Pinned(Pinned::Slow), Setting::Slow, None, d).is_some());
        assert!(Policy::resume(Mode::Throttle, Setting::Aggressive, None, d).is_none(), "a cycle has a deadline");
        assert!(Policy::resume(Mode::Throttle, Setting::Off, None, d).is_none());
        assert!(Policy::resume(Mode::Off, Setting::Aggressive, None, d).is_none());
        assert!(Policy::resume(Mode::Pinned(Pinned::Slow), Setting::Standard, None, d).is_none());
        assert!(Policy::resume(Mode::Initial, Setting::Initial, Some(t0), d).is_none());
    }

    #[test]
    fn other_modes_ignore_kicks() {
        for mode in [Mode::Initial, Mode::Off, Mode::Pinned(Pinned::Slow)] {
            let mut p = Policy::new(mode, Durations::default());
            let t0 = Instant::now();
            let start = p.start(t0);
            let expected = match mode {
                Mode::Initial => None,
                Mode::Off => Some(Setting::Off),
                _ => Some(Setting::Slow),
            };
            assert_eq!(to(start), expected, "{mode}");
            assert_eq!(p.kick(t0), None, "{mode}");
            assert_eq!(p.deadline(), None, "{mode}");
        }
    }

    #[test]
    fn mode_changes() {
        let (mut p, t0) = throttle();
        p.kick(t0);
        let t = p.set_mode(Mode::Off, t0 + S).expect("off");
        assert_eq!((t.from, t.to, t.cause), (Setting::Aggressive, Setting::Off, Cause::ModeChange));
        assert_eq!(p.deadline(), None, "off schedules nothing");
        assert_eq!(p.set_mode(Mode::Off, t0 + S), None, "same mode twice is a no-op");

        assert_eq!(to(p.set_mode(Mode::Pinned(Pinned::Standard), t0 + S)), Some(Setting::Standard));
        // Back to throttle from a pinned setting: the cycle goes on from there.
        assert_eq!(p.set_mode(Mode::Throttle, t0 + 2 * S), None);
        assert_eq!(p.setting(), Setting::Standard);
        assert_eq!(p.deadline(), Some(t0 + 122 * S));

        assert_eq!(to(p.set_mode(Mode::Initial, t0 + 3 * S)), Some(Setting::Initial));
        assert_eq!(p.deadline(), None);
        assert_eq!(p.kick(t0 + 4 * S), None, "initial mode is hands off");

        // From off, throttle means back to the administrator's settings until a kick.
        p.set_mode(Mode::Off, t0 + 5 * S);
        assert_eq!(to(p.set_mode(Mode::Throttle, t0 + 6 * S)), Some(Setting::Initial));
        assert_eq!(to(p.kick(t0 + 7 * S)), Some(Setting::Aggressive));
    }

    #[test]
    fn zero_durations_step_through_at_once() {
        let zero = Durations { aggressive: Duration::ZERO, standard: Duration::ZERO, slow: Duration::ZERO };
        let mut p = Policy::new(Mode::Throttle, zero);
        let t0 = Instant::now();
        p.kick(t0);
        let mut seen = vec![];
        while let Some(t) = p.timer(t0) {
            seen.push(t.to);
        }
        assert_eq!(seen, [Setting::Standard, Setting::Slow, Setting::Initial]);
    }
}
