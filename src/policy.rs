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
    /// Adaptive: a full scan added almost nothing to pages_sharing.
    Settled,
    /// Adaptive: a full scan after stepping down merged again.
    MergingResumed,
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Cause::Kick => "kick",
            Cause::Timer => "timer",
            Cause::ModeChange => "mode-change",
            Cause::Startup => "startup",
            Cause::Settled => "merging-settled",
            Cause::MergingResumed => "merging-resumed",
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

/// The KSM counters adaptive mode decides on (`/sys/kernel/mm/ksm/{full_scans,pages_sharing}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    pub full_scans: u64,
    pub pages_sharing: u64,
}

/// Adaptive mode's rule, chosen from measurements on the real kernel (see README, "Adaptive mode"):
/// - KSM queues a newly mergeable process behind its cursor, so after a kick the scan under way
///   (the 1st) usually does not reach it; the 2nd visits its pages once and only records their
///   checksums (kernel-bench on 6.18: pages_volatile jumps to the new process's size), and they
///   merge on their second visit, in the 3rd, whether their twins are merged already or not.
///   The 4th is the first that can say merging is over, so nothing is judged before
///   [`SETTLE_AFTER_SCANS`] full scans; but once merging has been seen, a quiet scan after it is
///   judged from the [`SETTLE_AFTER_MERGING_SCANS`]rd on (the kick came when the new pages were
///   already behind the cursor, and they merged in the 2nd);
/// - while aggressive, adaptive mode turns the kernel's `smart_scan` off (the engine does, and
///   puts it back for every other setting): it visits pages that have not merged for a while
///   only every few scans, up to every 9th, so a new process whose twin aged alone merged only
///   when a scan happened to visit both (12.8 s after its kick, measured);
/// - a full scan is *quiet* when pages_sharing grew by at most [`QUIET_MIN_PAGES`] or
///   1/[`QUIET_FRACTION`] of what is shared, whichever is more;
/// - aggressive steps down to standard after a quiet judged scan, standard to initial after
///   [`CONFIRM_SCANS`] more quiet scan, and a scan that is not quiet while stepped down goes
///   back to aggressive;
/// - the throttle timeline's durations stay as upper bounds, so it is never slower to settle.
pub const SETTLE_AFTER_SCANS: u64 = 4;
pub const SETTLE_AFTER_MERGING_SCANS: u64 = 3;
pub const QUIET_MIN_PAGES: u64 = 256;
pub const QUIET_FRACTION: u64 = 200;
pub const CONFIRM_SCANS: u32 = 1;

/// How often adaptive mode reads the counters in each setting: a few times per full scan at
/// that setting's speed, and never while nothing is being driven (no wake-ups when idle).
pub fn sample_interval(setting: Setting) -> Option<Duration> {
    match setting {
        Setting::Aggressive => Some(Duration::from_millis(50)),
        Setting::Standard => Some(Duration::from_millis(250)),
        Setting::Slow => Some(Duration::from_secs(1)),
        Setting::Initial | Setting::Off => None,
    }
}

/// What adaptive mode has seen since the kick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Watch {
    next_sample: Instant,
    /// Counters at the first sample after the kick, and at the last completed scan.
    first: Option<Counters>,
    last: Option<Counters>,
    quiet_scans: u32,
    /// Whether a scan since the kick was not quiet.
    merged_since_kick: bool,
    /// Whether the counters (not a timer) made the last step down: only then does renewed
    /// merging go back up, so the timeline stays an upper bound when counters never settle.
    stepped_on_counters: bool,
}

#[derive(Debug, Clone)]
pub struct Policy {
    mode: Mode,
    setting: Setting,
    deadline: Option<Instant>,
    durations: Durations,
    watch: Option<Watch>,
}

impl Policy {
    /// A policy that has touched nothing yet; call [`Policy::start`] to enter its mode.
    pub fn new(mode: Mode, durations: Durations) -> Self {
        Policy { mode, setting: Setting::Initial, deadline: None, durations, watch: None }
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

    /// When the daemon must next wake up: the earlier of the deadline and the next sample.
    pub fn wake_at(&self) -> Option<Instant> {
        match (self.deadline, self.sample_at()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
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
                Setting::Aggressive | Setting::Standard | Setting::Slow => deadline.is_some(),
                Setting::Off => false,
            },
            Mode::Initial => setting == Setting::Initial && deadline.is_none(),
            Mode::Off => setting == Setting::Off && deadline.is_none(),
            Mode::Pinned(p) => setting == p.setting() && deadline.is_none(),
        };
        consistent.then(|| {
            let mut p = Policy { mode, setting, deadline, durations, watch: None };
            p.watch_from(now);
            p
        })
    }

    /// At rest in `mode`: the initial settings, nothing scheduled. An instance started in `mode`
    /// is in this very state, so one that is at rest can exit and be started again losing nothing.
    pub fn at_rest_in(&self, mode: Mode) -> bool {
        self.mode == mode && self.setting == Setting::Initial && self.deadline.is_none()
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
        if !self.mode.reacts_to_kicks() {
            return None;
        }
        let deadline = Some(now + self.durations.aggressive);
        let t = self.move_to(Setting::Aggressive, deadline, Cause::Kick);
        // A kick means new memory: judge settling afresh (a storm only restarts the count).
        self.watch_from(now);
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
        t
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
        let t = self.move_to(next, deadline, Cause::Timer);
        self.watch_from(now);
        t
    }

    /// Adaptive mode: the counters read at `now`, as asked for by [`Policy::sample_at`].
    pub fn counters(&mut self, now: Instant, c: Counters) -> Option<Transition> {
        let mut w = self.watch?;
        let interval = sample_interval(self.setting)?;
        w.next_sample = now + interval;
        let (first, last) = match (w.first, w.last) {
            (Some(first), Some(last)) => (first, last),
            _ => {
                w.first = Some(c);
                w.last = Some(c);
                self.watch = Some(w);
                return None;
            }
        };
        if c.full_scans <= last.full_scans {
            self.watch = Some(w);
            return None; // no scan finished since the last look
        }
        let grown = c.pages_sharing.saturating_sub(last.pages_sharing);
        let quiet = grown <= QUIET_MIN_PAGES.max(c.pages_sharing / QUIET_FRACTION);
        w.last = Some(c);
        w.quiet_scans = if quiet { w.quiet_scans + 1 } else { 0 };
        w.merged_since_kick |= !quiet;
        self.watch = Some(w);

        let scans = c.full_scans - first.full_scans;
        let judged = scans >= SETTLE_AFTER_SCANS || (w.merged_since_kick && scans >= SETTLE_AFTER_MERGING_SCANS);
        match self.setting {
            Setting::Aggressive if quiet && judged => {
                let deadline = Some(now + self.durations.standard);
                let t = self.move_to(Setting::Standard, deadline, Cause::Settled);
                self.keep_watching(now, Watch { stepped_on_counters: true, ..w });
                t
            }
            Setting::Standard | Setting::Slow if !quiet && w.stepped_on_counters => {
                let deadline = Some(now + self.durations.aggressive);
                let t = self.move_to(Setting::Aggressive, deadline, Cause::MergingResumed);
                self.keep_watching(now, Watch { stepped_on_counters: false, ..w });
                t
            }
            Setting::Standard | Setting::Slow if w.quiet_scans >= CONFIRM_SCANS => {
                let t = self.move_to(Setting::Initial, None, Cause::Settled);
                self.watch = None;
                t
            }
            _ => None,
        }
    }

    /// Starts (or stops) reading the counters, as mode and setting require.
    fn watch_from(&mut self, now: Instant) {
        self.watch = match (self.mode, sample_interval(self.setting)) {
            (Mode::Adaptive, Some(_)) => Some(Watch {
                next_sample: now,
                first: None,
                last: None,
                quiet_scans: 0,
                merged_since_kick: false,
                stepped_on_counters: false,
            }),
            _ => None,
        };
    }

    /// After an adaptive step: same baseline, quiet count restarted, next sample at the new pace.
    fn keep_watching(&mut self, now: Instant, w: Watch) {
        self.watch = sample_interval(self.setting).map(|i| Watch { next_sample: now + i, quiet_scans: 0, ..w });
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
        let p = Policy::resume(Mode::Throttle, Setting::Standard, Some(t0 + S), d, t0).expect("mid-cycle");
        assert_eq!((p.mode(), p.setting(), p.deadline()), (Mode::Throttle, Setting::Standard, Some(t0 + S)));
        assert!(Policy::resume(Mode::Off, Setting::Off, None, d, t0).is_some());
        assert!(Policy::resume(Mode::Pinned(Pinned::Slow), Setting::Slow, None, d, t0).is_some());
        assert!(Policy::resume(Mode::Throttle, Setting::Aggressive, None, d, t0).is_none(), "a cycle has a deadline");
        assert!(Policy::resume(Mode::Throttle, Setting::Off, None, d, t0).is_none());
        assert!(Policy::resume(Mode::Off, Setting::Aggressive, None, d, t0).is_none());
        assert!(Policy::resume(Mode::Pinned(Pinned::Slow), Setting::Standard, None, d, t0).is_none());
        assert!(Policy::resume(Mode::Initial, Setting::Initial, Some(t0), d, t0).is_none());
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

    fn adaptive() -> (Policy, Instant) {
        let mut p = Policy::new(Mode::Adaptive, Durations::default());
        let t0 = Instant::now();
        assert_eq!(p.start(t0), None);
        assert_eq!(p.wake_at(), None, "no wake-ups while idle");
        (p, t0)
    }

    fn c(full_scans: u64, pages_sharing: u64) -> Counters {
        Counters { full_scans, pages_sharing }
    }

    #[test]
    fn adaptive_steps_down_once_a_judged_scan_is_quiet_then_confirms_to_initial() {
        let (mut p, t0) = adaptive();
        assert_eq!(to(p.kick(t0)), Some(Setting::Aggressive));
        assert_eq!(p.sample_at(), Some(t0), "first sample at once, for the baseline");
        assert_eq!(p.counters(t0, c(10, 0)), None);
        assert_eq!(p.sample_at(), Some(t0 + Duration::from_millis(50)));
        let ms = |n: u64| t0 + Duration::from_millis(n);
        // scan 1 (maybe begun before the kick) and scan 2 (checksums): quiet but not judged.
        assert_eq!(p.counters(ms(100), c(11, 0)), None);
        assert_eq!(p.counters(ms(200), c(12, 0)), None);
        assert_eq!(p.counters(ms(300), c(12, 0)), None, "no scan finished: nothing to judge");
        // scan 3 merges a lot: not quiet.
        assert_eq!(p.counters(ms(400), c(13, 400_000)), None);
        assert_eq!(p.setting(), Setting::Aggressive);
        // scan 4 adds 0.4 %: quiet and judged.
        let t = p.counters(ms(500), c(14, 401_600)).expect("settled");
        assert_eq!((t.from, t.to, t.cause), (Setting::Aggressive, Setting::Standard, Cause::Settled));
        assert_eq!(p.deadline(), Some(ms(500) + 120 * S), "the timeline stays the upper bound");
        assert_eq!(p.sample_at(), Some(ms(750)), "sampled at the standard pace");
        assert_eq!(p.counters(ms(750), c(14, 401_700)), None, "no scan finished: nothing confirmed");
        let t = p.counters(ms(1000), c(15, 401_700)).expect("confirmed");
        assert_eq!((t.to, t.cause), (Setting::Initial, Cause::Settled));
        assert_eq!((p.deadline(), p.wake_at()), (None, None), "idle again: no wake-ups");
    }

    #[test]
    fn adaptive_waits_for_the_fourth_scan_the_first_pair_of_processes_needs() {
        // Measured on kernel 6.18 (kernel-bench, staggered): kicked at full_scans 5 for a second
        // process, scans 6, 7 and 8 added nothing (the scan begun before the kick, then the new
        // pages' checksums), and the 65,536 pages merged during scan 9.
        let (mut p, t0) = adaptive();
        p.kick(t0);
        let s = |n: u32| t0 + n * S;
        assert_eq!(p.counters(s(0), c(5, 0)), None);
        for scans in 6..=8 {
            assert_eq!(p.counters(s(scans as u32 - 5), c(scans, 0)), None, "scan {scans} is not judged");
            assert_eq!(p.setting(), Setting::Aggressive);
        }
        assert_eq!(p.counters(s(4), c(9, 65_536)), None, "merging: still aggressive");
        let t = p.counters(s(5), c(10, 65_536)).expect("the first quiet judged scan steps down");
        assert_eq!((t.to, t.cause), (Setting::Standard, Cause::Settled));
    }

    #[test]
    fn adaptive_judges_the_third_scan_once_merging_was_seen() {
        // The new pages were already behind the cursor at the kick: checksums recorded in the
        // scan under way, merged in the 2nd; a quiet 3rd visits them all once more.
        let (mut p, t0) = adaptive();
        p.kick(t0);
        let s = |n: u32| t0 + n * S / 10;
        assert_eq!(p.counters(s(0), c(20, 400_000)), None);
        assert_eq!(p.counters(s(1), c(21, 400_000)), None, "the scan under way at the kick");
        assert_eq!(p.counters(s(2), c(22, 460_000)), None, "merging on the second visit");
        let t = p.counters(s(3), c(23, 460_100)).expect("quiet third visit: settled");
        assert_eq!((t.to, t.cause), (Setting::Standard, Cause::Settled));

        // Without merging seen, a quiet third scan is not judged (the first pair may merge in
        // the fourth).
        p.kick(s(4));
        assert_eq!(p.counters(s(4), c(23, 460_100)), None);
        for scans in 24..=26 {
            assert_eq!(p.counters(s(scans as u32 - 19), c(scans, 460_100)), None, "scan {scans}");
        }
        assert_eq!(p.setting(), Setting::Aggressive);
        assert_eq!(to(p.counters(s(8), c(27, 460_100))), Some(Setting::Standard), "the 4th quiet scan settles");
    }

    #[test]
    fn adaptive_goes_back_up_when_merging_resumes_after_it_stepped_down() {
        let (mut p, t0) = adaptive();
        p.kick(t0);
        for (i, sharing) in [0, 0, 0, 1000, 1000].into_iter().enumerate() {
            p.counters(t0 + i as u32 * S / 10, c(i as u64, sharing));
        }
        assert_eq!(p.setting(), Setting::Standard);
        let t = p.counters(t0 + S, c(5, 50_000)).expect("resumed");
        assert_eq!((t.to, t.cause), (Setting::Aggressive, Cause::MergingResumed));
        assert_eq!(p.deadline(), Some(t0 + 31 * S));
    }

    #[test]
    fn adaptive_never_lags_the_timeline_when_counters_do_not_settle() {
        let (mut p, t0) = adaptive();
        p.kick(t0);
        let mut sharing = 0;
        let mut scans = 0;
        let mut now = t0;
        let mut seen = vec![];
        // Merging that never settles: every scan adds 1 % and more.
        while now < t0 + 300 * S {
            now = p.wake_at().expect("driving: always a wake-up");
            if p.sample_at().is_some_and(|s| s <= now) {
                scans += 1;
                sharing += sharing / 100 + 1_000;
                if let Some(t) = p.counters(now, c(scans, sharing)) {
                    seen.push((t.to, t.cause));
                }
            }
            if let Some(t) = p.timer(now) {
                seen.push((t.to, t.cause));
            }
            if p.setting() == Setting::Initial {
                break;
            }
        }
        assert_eq!(
            seen,
            [(Setting::Standard, Cause::Timer), (Setting::Slow, Cause::Timer), (Setting::Initial, Cause::Timer)],
            "forced steps do not bounce back up"
        );
        assert_eq!(now, t0 + 270 * S);
    }

    #[test]
    fn throttle_mode_never_samples() {
        let (mut p, t0) = throttle();
        p.kick(t0);
        assert_eq!(p.sample_at(), None);
        assert_eq!(p.counters(t0, c(1, 1)), None);
        assert_eq!(p.wake_at(), p.deadline());
    }
}
