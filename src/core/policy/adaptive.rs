//! Adaptive mode: the pace set from what the counters show, and the profit back-off.

use std::time::{Duration, Instant};

use super::{Cause, Counters, Policy, Transition};
use crate::core::setting::{Mode, Setting};

/// Adaptive mode's profit back-off: after this many full scans in a row with a negative
/// `general_profit` (KSM's metadata costs more than it saves: memory that does not merge), it
/// steps down one setting, and again after as many more; the next kick tries again. 0: off.
pub const UNPROFITABLE_SCANS: u64 = 10;
/// ... and over at least this long, with no memory arriving meanwhile: a booting VM fills its
/// RAM for tens of seconds after its kick, and the scans of a little memory before the rest
/// arrives say nothing of what it will save (the scans-only back-off once fired within a second
/// of a boot and merged almost none of it: docs/performance.md).
pub const UNPROFITABLE_FOR: Duration = Duration::from_secs(5);

/// Whether merging made no progress from `then` to `now`: pages_sharing grew by at most
/// [`QUIET_MIN_PAGES`] or 1/[`QUIET_FRACTION`] of it, whichever is more.
fn merging_still(then: Counters, now: Counters) -> bool {
    now.pages_sharing.saturating_sub(then.pages_sharing) <= QUIET_MIN_PAGES.max(now.pages_sharing / QUIET_FRACTION)
}

/// A full scan is a stall when it visited more than this many pages for each page it merged
/// (the floor is 2: a page merges after two visits, one where a twin is already merged). Pages
/// already merged cost ksmd a small fraction of a visit to one that is not (docs/performance.md),
/// so what a stalled pass pays for is mostly memory that is still changing: a booting guest's,
/// or the unique memory of those already merged.
pub const STALL_VISITS_PER_MERGED: u64 = 16;

/// Memory is *arriving* while AnonPages ([`Counters::anon_pages`]) grew, by more than
/// [`ARRIVAL_SLACK_PAGES`] or 1/[`ARRIVAL_SLACK_FRACTION`], within the last [`ARRIVAL_QUIET`]
/// (merging only lowers it: growth is memory written anew, net of what merged meanwhile). A
/// booting guest writes its RAM for seconds, and a page written between two visits never
/// merges: adaptive scans slowly then, and goes aggressive once it is in place. A guest
/// rewriting a little in place does not grow it.
pub const ARRIVAL_SLACK_PAGES: u64 = 1024;
pub const ARRIVAL_SLACK_FRACTION: u64 = 256;
pub const ARRIVAL_QUIET: Duration = Duration::from_secs(2);
/// How often a slow entered for arriving memory reads the counters and AnonPages.
pub const ARRIVAL_SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// Whether memory left from `then` to `now`: ksmd tracks fewer pages, by more than
/// [`ARRIVAL_SLACK_PAGES`] or 1/[`ARRIVAL_SLACK_FRACTION`] (a sandbox stopped, and its rmap
/// items went with it, all in the pass that reached it). What merged meanwhile is then hidden
/// by what left: such scans are neither quiet nor a stall. Guests giving a few pages back are
/// no departure (measured: 100-2,900 pages a pass over 8 guests, which restarted standard's
/// settling for 37 s).
fn departed(then: Counters, now: Counters) -> bool {
    now.scanned.saturating_add(arrival_slack(then.scanned)) < then.scanned
}

/// Whether the scans from `then` to `now` merged under 1/[`STALL_VISITS_PER_MERGED`] of the
/// pages they visited; `false` where the kernel does not count visits, and over scans in which
/// memory left (the pages ksmd tracks fell: a sandbox stopped), whose merging the totals cannot
/// tell from what left with it. Pages sharing that fell while ksmd tracks as many is guests
/// writing to merged pages: those scans merged nothing.
fn uneconomic(then: Counters, now: Counters) -> bool {
    if departed(then, now) {
        return false;
    }
    match (then.pages_scanned, now.pages_scanned) {
        (Some(a), Some(b)) => {
            let merged = now.pages_sharing.saturating_sub(then.pages_sharing);
            merged.saturating_mul(STALL_VISITS_PER_MERGED) < b.saturating_sub(a)
        }
        _ => false,
    }
}

/// Whether no mergeable memory arrived from `then` to `now`, `span` apart: the pages ksmd
/// tracks grew by at most [`ARRIVING_SLACK_PAGES`] plus [`ARRIVING_PAGES_PER_S`] for each second.
/// A rate, not a count: many fast scans of a little memory that keeps arriving would each
/// pass a count.
fn arrival_still(then: Counters, now: Counters, span: Duration) -> bool {
    let allowed = ARRIVING_SLACK_PAGES as f64 + ARRIVING_PAGES_PER_S as f64 * span.as_secs_f64();
    now.scanned.saturating_sub(then.scanned) as f64 <= allowed
}

/// Adaptive mode's rule, chosen from measurements on the real kernel and on real QEMU guests
/// (ARCHITECTURE.md and docs/performance.md have the evidence):
/// - KSM queues a newly mergeable process behind its cursor, so after a kick the scan under way
///   (the 1st) usually does not reach it; the 2nd visits its pages once and only records their
///   checksums, and they merge on their second visit, in the 3rd. So nothing is judged before
///   [`SETTLE_AFTER_SCANS`] full scans, or the [`SETTLE_AFTER_MERGING_SCANS`]rd once merging
///   has been seen;
/// - while aggressive, `smart_scan` is off (the engine does it): it visits a page that has not
///   merged for a while only every few scans, so a new VM whose twin aged alone merged late;
/// - growth is summed over a run of scans, from the last scan that broke it: a scan is
///   *merging-quiet* when pages_sharing grew by at most [`QUIET_MIN_PAGES`] or
///   1/[`QUIET_FRACTION`] over its run, and *settled* when, besides, the memory under scan
///   ([`Counters::scanned`]) grew no faster than [`ARRIVING_PAGES_PER_S`] over its own run;
/// - aggressive steps down to standard once merging stalls, and not before the memory the kick
///   announced has begun to arrive (a guest touches none of its RAM for a while after its
///   launch, and scans over what was there before look settled): at a merging-quiet judged
///   scan that is settled (the synthetic case: all memory was there at the kick, and is seen
///   in the 2nd scan), or, while memory is still arriving (a booting guest), once merging has
///   made no progress for [`STALLED_FOR`].
///   A guest's first pages merge by the hundred thousand in its first seconds (zeroed RAM, the
///   image it loads), and aggressive is what gets ksmd CPU against busy vCPUs; later in a
///   boot, arriving memory is written again before it can merge and scanning it fast is waste;
/// - with AnonPages read (every kernel: /proc/meminfo), memory seen arriving sends aggressive
///   (a kick's included) and standard to slow at once, and slow goes aggressive once what
///   arrived has held still for [`ARRIVAL_QUIET`]: each pass at aggressive rescans every merged
///   guest, so a kick pays for fast passes only once its memory is there to merge;
/// - a pace entered by these rules is judged from its [`PACED_SCANS`]th full scan on: memory
///   that arrived while ksmd ran slow was never visited, and the first pass over it only takes
///   its checksums; and the aggressive entered for memory in place ends with its merging burst
///   ([`BURST_OVER_FOR`]), not a judged pass later, in a rest ([`REST_SAMPLE_EVERY`]): the
///   passes after it merge nothing;
/// - standard (or slow) ends in the initial settings only after [`CONFIRM_SCANS`] settled
///   scans in a row spanning at least [`SETTLED_FOR`]: never while memory is still arriving or
///   merging. A scan that merges or sees new memory there restarts that count and stays at
///   that pace: no bounce back to aggressive; only a kick goes aggressive again;
/// - the throttle timeline's durations stay as upper bounds, so it is never slower to settle.
pub const SETTLE_AFTER_SCANS: u64 = 4;
pub const SETTLE_AFTER_MERGING_SCANS: u64 = 3;
pub const QUIET_MIN_PAGES: u64 = 256;
pub const QUIET_FRACTION: u64 = 200;
pub const ARRIVING_SLACK_PAGES: u64 = 64;
pub const ARRIVING_PAGES_PER_S: u64 = 256;
pub const STALLED_FOR: Duration = Duration::from_secs(2);
pub const CONFIRM_SCANS: u32 = 2;
/// Aggressive entered for memory in place ends once its merging is over: after it merged
/// 1/[`BURST_SHARE`] of what arrived (at least [`BURST_MIN_PAGES`]), pages_sharing has not grown
/// by [`QUIET_MIN_PAGES`] for [`BURST_OVER_FOR`]. ksmd merges a newcomer whose twins are merged
/// already on its first visit, in one burst as the pass reaches it; what comes after is a pass
/// over every merged guest that merges nothing (measured: a third of each arrival's aggressive
/// CPU on 8 guests). The share keeps the few pages that merge in a checksum pass (those ksmd saw
/// at slow) from passing for the burst. The quiet spans the longest pause measured within a
/// burst (200 ms) with a sample to spare. What follows is the rest ([`REST_SAMPLE_EVERY`]).
pub const BURST_SHARE: u64 = 4;
pub const BURST_MIN_PAGES: u64 = 1024;
pub const BURST_OVER_FOR: Duration = Duration::from_millis(300);
/// After an arrival's aggressive (its burst over, or its passes judged settled or stalled: memory
/// that does not merge), adaptive *rests*: the initial settings in force, ksmd as the
/// administrator had it, and AnonPages read every [`ARRIVAL_SAMPLE_EVERY`] for the slow's
/// duration; memory seen arriving meanwhile is scanned slowly and merged aggressively once in
/// place, as after a kick. The passes after a burst merged nothing in any run measured: standard's
/// a few pages for 0.2-1.1 ksmd CPU-s an arrival one at a time and 2-8.6 all at once; slow's
/// none at all, for 1.4-1.8 CPU-s in all on 8 guests (pages_sharing the same to the page from
/// each burst's end to the next arrival). Rest is no setting of its own: CurrentSetting says
/// initial, which is what KSM holds; NextStepDown says nothing is scheduled.
pub const REST_SAMPLE_EVERY: Duration = ARRIVAL_SAMPLE_EVERY;
/// Full scans finished at a pace before its yield is judged: the one under way at the step, the
/// one that takes the checksums of what arrived unvisited, the one that merges it.
pub const PACED_SCANS: u64 = 3;
pub const SETTLED_FOR: Duration = Duration::from_secs(3);

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
pub(super) struct Watch {
    pub(super) next_sample: Instant,
    /// Counters at the first sample after the kick, and at the last completed scan.
    first: Option<Counters>,
    last: Option<Counters>,
    /// The scans since merging last made progress, and since it or arriving memory did.
    merging: Option<Run>,
    settling: Option<Run>,
    /// Whether a scan since the kick merged.
    merged_since_kick: bool,
    /// Whether new memory (or merging) has been seen since the kick: until then the memory
    /// the kick announced has not arrived, and scans over the rest say nothing about it.
    arrived_since_kick: bool,
    /// Where the run of unprofitable scans started: general_profit found negative after being
    /// non-negative, after the last back-off, or after memory last arrived (the full_scans
    /// count before, the counters and the time then).
    unprofitable_from: Option<(u64, Counters, Instant)>,
    /// full_scans when the setting in force began to be watched: its own pace is judged only
    /// from the scan after.
    paced_since: Option<u64>,
    /// AnonPages as of its last growth (lowered by memory that merged or left), and when it last
    /// grew (`None`: not since the watch began).
    anon: Option<u64>,
    grew_at: Option<Instant>,
    /// Pages arrived since the watch began (growth only: what leaves takes none of it back), and
    /// that count when the arrival under way began.
    arrived: u64,
    burst_from: u64,
    /// Set while at a slow entered for arriving memory (or after a merging burst): the count of
    /// pages arrived when that arrival began (at the burst's end). Going aggressive needs memory
    /// arrived since.
    slowed_at: Option<u64>,
    /// Set while at an aggressive entered for memory in place: the merging burst it watches for.
    burst: Option<Burst>,
    /// Set while resting after an arrival's merging: when the rest ends, and the cycle with it.
    rest_until: Option<Instant>,
}

/// The merging of an aggressive entered for memory in place: pages_sharing at the step, its
/// highest since, when it last grew by [`QUIET_MIN_PAGES`], and how much it must have merged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Burst {
    base: u64,
    peak: u64,
    grew_at: Instant,
    need: u64,
}

impl Burst {
    /// Follows pages_sharing; whether the burst has merged and is over.
    fn over(&mut self, now: Instant, sharing: u64) -> bool {
        if sharing > self.peak.saturating_add(QUIET_MIN_PAGES) {
            self.peak = sharing;
            self.grew_at = now;
        }
        self.peak.saturating_sub(self.base) >= self.need
            && now.saturating_duration_since(self.grew_at) >= BURST_OVER_FOR
    }
}

/// How much AnonPages may grow and still be still: pages written in place (a guest's
/// own data) do not grow it, merging does not change it.
fn arrival_slack(base: u64) -> u64 {
    ARRIVAL_SLACK_PAGES.max(base / ARRIVAL_SLACK_FRACTION)
}

impl Watch {
    /// Follows AnonPages; whether it is arriving.
    fn track_arrival(&mut self, now: Instant, c: Counters) -> bool {
        if let Some(written) = c.anon_pages {
            match self.anon {
                Some(mark) if written <= mark.saturating_add(arrival_slack(mark)) => {
                    // Memory that left (a sandbox stopped) lowers the mark growth is judged from.
                    self.anon = Some(mark.min(written));
                }
                Some(mark) => {
                    if !self.arriving(now) {
                        self.burst_from = self.arrived;
                    }
                    self.arrived = self.arrived.saturating_add(written - mark);
                    self.anon = Some(written);
                    self.grew_at = Some(now);
                }
                None => self.anon = Some(written),
            }
        }
        self.arriving(now)
    }

    /// Whether AnonPages grew within [`ARRIVAL_QUIET`] of `now`.
    fn arriving(&self, now: Instant) -> bool {
        self.grew_at.is_some_and(|at| now.saturating_duration_since(at) < ARRIVAL_QUIET)
    }
}

/// Scans in a row in which something (merging; merging or arriving memory) did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    /// When the run began (at the scan that broke the last one, or a step), and the counters
    /// then: what its growth is summed from.
    since: Instant,
    base: Counters,
    scans: u32,
}

impl Run {
    fn from(now: Instant, c: Counters) -> Run {
        Run { since: now, base: c, scans: 0 }
    }

    /// One more finished scan at `now`: the run goes on if `quiet`, else starts again from it.
    fn extend(&mut self, now: Instant, c: Counters, quiet: bool) -> bool {
        if quiet {
            self.scans += 1;
        } else {
            *self = Run::from(now, c);
        }
        quiet
    }

    fn span(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.since)
    }
}

impl Policy {
    /// Adaptive mode: the counters read at `now`, as asked for by [`Policy::sample_at`].
    pub fn counters(&mut self, now: Instant, c: Counters) -> Option<Transition> {
        let mut w = self.watch?;
        if let Some(until) = w.rest_until {
            return self.rest_sample(now, c, w, until);
        }
        let interval = sample_interval(self.setting)?;
        // A slow waiting for arriving memory looks as often as standard: the sooner the memory
        // is seen in place, the sooner it merges.
        w.next_sample = now + if w.slowed_at.is_some() { ARRIVAL_SAMPLE_EVERY.min(interval) } else { interval };
        let arriving = w.track_arrival(now, c);
        // Read at every sample, not at finished scans only: at slow a scan takes a minute.
        if let Some(t) = self.pace_arrival(now, c, &mut w, arriving) {
            return Some(t);
        }
        if let Some(b) = w.burst.as_mut() {
            if self.setting == Setting::Aggressive && b.over(now, c.pages_sharing) {
                return self.rest(now, w, Cause::Settled);
            }
        }
        let (first, last, mut merging, mut settling) = match (w.first, w.last, w.merging, w.settling) {
            (Some(first), Some(last), Some(m), Some(s)) => (first, last, m, s),
            _ => {
                w.first = w.first.or(Some(c));
                w.paced_since = w.paced_since.or(Some(c.full_scans));
                w.last = Some(c);
                w.merging = Some(Run::from(now, c));
                w.settling = Some(Run::from(now, c));
                self.watch = Some(w);
                return None;
            }
        };
        if c.full_scans <= last.full_scans {
            self.watch = Some(w);
            return None; // no scan finished since the last look
        }
        w.last = Some(c);
        match c.general_profit {
            Some(p) if p < 0 => {
                let (from, base, since) = *w.unprofitable_from.get_or_insert((last.full_scans, c, now));
                if !arrival_still(base, c, now.saturating_duration_since(since)) {
                    // Memory is still arriving: the loss so far is no verdict on it.
                    w.unprofitable_from = Some((c.full_scans, c, now));
                } else if self.unprofitable_scans > 0
                    && c.full_scans.saturating_sub(from) >= self.unprofitable_scans
                    && now.saturating_duration_since(since) >= UNPROFITABLE_FOR
                {
                    w.unprofitable_from = Some((c.full_scans, c, now));
                    return self.back_off(now, w);
                }
            }
            _ => w.unprofitable_from = None,
        }
        // A scan in which memory left says nothing of merging: the runs start again from it.
        let left = departed(last, c);
        let merge_quiet = merging.extend(now, c, !left && merging_still(merging.base, c));
        let settled = merge_quiet
            && !left
            && merging_still(settling.base, c)
            && arrival_still(settling.base, c, settling.span(now));
        settling.extend(now, c, settled);
        w.merged_since_kick |= !merge_quiet;
        if !w.arrived_since_kick && (w.merged_since_kick || !arrival_still(first, c, Duration::ZERO)) {
            w.arrived_since_kick = true;
            // A stall is counted from the arrival, not from the kick.
            merging = Run::from(now, c);
        }
        w.merging = Some(merging);
        w.settling = Some(settling);
        self.watch = Some(w);

        let scans = c.full_scans - first.full_scans;
        let paced = c.full_scans.saturating_sub(w.paced_since.unwrap_or(c.full_scans));
        let judged = scans >= SETTLE_AFTER_SCANS || (w.merged_since_kick && scans >= SETTLE_AFTER_MERGING_SCANS);
        // The pass from the last look to this one, judged by its yield: at the setting's own
        // pace only (the scan under way at a step was partly at the pace before).
        // Memory that arrived unvisited has its checksums taken in the first pass at the new pace
        // and merges in the second: the first merges nothing, and is no verdict.
        let paced_enough = paced >= PACED_SCANS;
        let stalled = w.arrived_since_kick && paced_enough && uneconomic(last, c);
        match self.setting {
            Setting::Aggressive
                if judged
                    && paced_enough
                    && w.arrived_since_kick
                    && merge_quiet
                    && (settled || merging.span(now) >= STALLED_FOR) =>
            {
                self.pace_down(now, c, w, Cause::Settled, arriving)
            }
            Setting::Aggressive if judged && stalled => self.pace_down(now, c, w, Cause::Stalled, arriving),
            Setting::Standard | Setting::Slow
                if settling.scans >= CONFIRM_SCANS && settling.span(now) >= SETTLED_FOR =>
            {
                self.floor(Cause::Settled)
            }
            _ => None,
        }
    }

    /// Aggressive to standard as merging settled or stalled (to slow while memory is arriving,
    /// to rest after the aggressive of an arrival); the watch goes on at the new pace, its runs
    /// and its yield counted afresh from there.
    fn pace_down(&mut self, now: Instant, c: Counters, w: Watch, cause: Cause, arriving: bool) -> Option<Transition> {
        match (arriving, w.burst) {
            (true, _) => self.repace(now, c, w, Setting::Slow, cause),
            (false, Some(_)) => self.rest(now, w, cause),
            (false, None) => self.repace(now, c, w, Setting::Standard, cause),
        }
    }

    /// The initial settings after an arrival's merging, AnonPages still watched for the slow's
    /// duration (see [`REST_SAMPLE_EVERY`]); with memory needed (the need gate), the cycle's end.
    fn rest(&mut self, now: Instant, w: Watch, cause: Cause) -> Option<Transition> {
        if self.holds_slow() {
            return self.floor(cause);
        }
        let until = now + self.durations.slow;
        let t = self.move_to(Setting::Initial, None, cause);
        self.resize = None;
        // The scan runs are not judged while resting: leaving it (`repace`, or a kick's fresh
        // watch) counts them afresh.
        self.watch = Some(Watch {
            next_sample: now + REST_SAMPLE_EVERY,
            slowed_at: None,
            burst: None,
            rest_until: Some(until),
            ..w
        });
        t
    }

    /// A sample while resting: memory arriving is scanned slowly (and merged aggressively once in
    /// place, by [`Policy::pace_arrival`]); at the rest's end the cycle is over.
    fn rest_sample(&mut self, now: Instant, c: Counters, mut w: Watch, until: Instant) -> Option<Transition> {
        if now >= until {
            self.watch = None;
            return None;
        }
        w.next_sample = now + REST_SAMPLE_EVERY;
        if w.track_arrival(now, c) {
            return self.repace(now, c, w, Setting::Slow, Cause::Arriving);
        }
        self.watch = Some(w);
        None
    }

    /// Adaptive, while a cycle runs: slow while memory arrives, aggressive once what arrived is
    /// in place. Only a slow entered for arriving memory (or at a burst's end) goes aggressive
    /// again, and only for memory that arrived since: the timeline's slow, or the profit
    /// back-off's, stays.
    fn pace_arrival(&mut self, now: Instant, c: Counters, w: &mut Watch, arriving: bool) -> Option<Transition> {
        if self.deadline.is_none() || w.first.is_none() {
            return None;
        }
        let mark = w.anon?;
        match self.setting {
            // A kick's aggressive over memory that has begun to arrive: the passes until a stall
            // shows would only rescan the guests merged already (measured: a third of adaptive's
            // ksmd CPU one guest at a time went there, for a few thousand pages).
            Setting::Aggressive | Setting::Standard if arriving => {
                self.repace(now, c, *w, Setting::Slow, Cause::Arriving)
            }
            Setting::Slow
                if !arriving
                    && w.slowed_at.is_some_and(|from| w.arrived > from.saturating_add(arrival_slack(mark))) =>
            {
                self.repace(now, c, *w, Setting::Aggressive, Cause::Arrived)
            }
            _ => None,
        }
    }

    /// A step decided by adaptive mode's pace rules: the setting's own duration from now, the
    /// runs and the yield counted afresh.
    fn repace(&mut self, now: Instant, c: Counters, w: Watch, next: Setting, cause: Cause) -> Option<Transition> {
        let t = self.move_to(next, self.duration_of(next).map(|d| now + d), cause);
        let slowed_at = match next {
            Setting::Slow if w.arriving(now) => Some(w.burst_from),
            _ => None,
        };
        let burst = (next == Setting::Aggressive && cause == Cause::Arrived).then(|| Burst {
            base: c.pages_sharing,
            peak: c.pages_sharing,
            grew_at: now,
            need: BURST_MIN_PAGES.max(w.arrived.saturating_sub(w.slowed_at.unwrap_or(0)) / BURST_SHARE),
        });
        self.watch = sample_interval(next).map(|i| Watch {
            next_sample: now + if slowed_at.is_some() { ARRIVAL_SAMPLE_EVERY.min(i) } else { i },
            merging: Some(Run::from(now, c)),
            settling: Some(Run::from(now, c)),
            paced_since: Some(c.full_scans),
            slowed_at,
            burst,
            rest_until: None,
            ..w
        });
        self.resize_carry_on(now);
        t
    }

    /// One setting down, as the profit back-off decided; the watch goes on at the new pace
    /// (another run of unprofitable scans steps down again).
    fn back_off(&mut self, now: Instant, w: Watch) -> Option<Transition> {
        let next = match self.setting {
            Setting::Aggressive => Setting::Standard,
            Setting::Standard => Setting::Slow,
            Setting::Slow | Setting::Initial | Setting::Off => return self.floor(Cause::Unprofitable),
        };
        let t = self.move_to(next, self.duration_of(next).map(|d| now + d), Cause::Unprofitable);
        self.watch = sample_interval(next).map(|i| Watch {
            next_sample: now + i,
            paced_since: w.last.map(|l| l.full_scans),
            ..w
        });
        self.resize_carry_on(now);
        t
    }

    /// Starts (or stops) reading the counters, as mode and setting require.
    pub(super) fn watch_from(&mut self, now: Instant) {
        self.watch = match (self.mode, sample_interval(self.setting)) {
            (Mode::Adaptive, Some(_)) => Some(Watch {
                next_sample: now,
                first: None,
                last: None,
                merging: None,
                settling: None,
                merged_since_kick: false,
                arrived_since_kick: false,
                unprofitable_from: None,
                paced_since: None,
                anon: None,
                grew_at: None,
                arrived: 0,
                burst_from: 0,
                slowed_at: None,
                burst: None,
                rest_until: None,
            }),
            _ => None,
        };
    }
}
