//! The plan of writes, as plain values: what a setting writes ([`target`]) and the ordered writes
//! that take the kernel's knobs there ([`plan`]). The sysfs edge only carries a plan out, so the
//! rules that keep ksmd from ever running on half a setting are tested here without root:
//! - the advisor is turned off first: while it scans by time the kernel refuses `pages_to_scan`,
//!   and turning it off resets `pages_to_scan` (to 100), which is therefore written after it even
//!   if it held the wanted value; an advisor is put back last;
//! - a running ksmd is paused (`run` = 0, merged pages kept) while both scan knobs change, and
//!   `run` is written after them. One scan knob alone (a setting sized again for new memory) is
//!   written while it runs: one write is never half a setting, and a `run` write waits for ksmd's
//!   batch under way (the kernel's `ksm_thread_mutex`), seconds when ksmd is starved of CPU;
//! - `smart_scan` is written before `run`, so a scan started by it already skips (or not), and
//!   only where the kernel has it;
//! - a knob that already holds its value is not written.

use std::fmt;

use crate::core::knobs::{Knobs, Target, ADVISOR_MODE, ADVISOR_NONE, PAGES_TO_SCAN, RUN, SLEEP_MILLISECS, SMART_SCAN};
use crate::core::setting::{Mode, Profile, Setting};

/// What the kernel sets `pages_to_scan` to when the advisor is turned off (`DEFAULT_PAGES_TO_SCAN`
/// in mm/ksm.c).
pub const PAGES_TO_SCAN_AFTER_ADVISOR_OFF: u64 = 100;

/// One write of one knob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    Run(u8),
    PagesToScan(u64),
    SleepMillisecs(u64),
    AdvisorMode(String),
    SmartScan(u8),
}

impl Write {
    /// The file under the KSM directory.
    pub fn knob(&self) -> &'static str {
        match self {
            Write::Run(_) => RUN,
            Write::PagesToScan(_) => PAGES_TO_SCAN,
            Write::SleepMillisecs(_) => SLEEP_MILLISECS,
            Write::AdvisorMode(_) => ADVISOR_MODE,
            Write::SmartScan(_) => SMART_SCAN,
        }
    }

    /// The text written to it.
    pub fn value(&self) -> String {
        match self {
            Write::Run(v) | Write::SmartScan(v) => v.to_string(),
            Write::PagesToScan(v) | Write::SleepMillisecs(v) => v.to_string(),
            Write::AdvisorMode(v) => v.clone(),
        }
    }
}

impl fmt::Display for Write {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.knob(), self.value())
    }
}

/// The writes, in order, and the knobs in force once they are all done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub writes: Vec<Write>,
    /// With an advisor put back, `pages_to_scan` is the advisor's to choose from then on; this
    /// holds the value written before it.
    pub after: Knobs,
}

/// What `setting` writes under `mode`. `profile`: the setting's scan profile (none for initial
/// and off); `saved`: the administrator's settings, recorded before the first change (none while
/// nothing has changed); `anon`: AnonPages, in pages, for a setting with a profile; `merged`:
/// KSM already holds merged pages (`pages_shared` > 0), see [`smart_scan`].
pub fn target(
    setting: Setting,
    mode: Mode,
    profile: Option<Profile>,
    saved: Option<&Knobs>,
    anon: Option<u64>,
    merged: bool,
) -> Target {
    if setting == Setting::Initial {
        return saved.map(Target::from).unwrap_or_default();
    }
    // The advisor would fight (and refuse) our pages_to_scan: off while we drive.
    let advisor_mode = saved.and_then(|k| k.advisor_mode.as_ref()).map(|_| ADVISOR_NONE.to_string());
    let smart_scan = smart_scan(mode, setting, saved, merged);
    match (profile, anon) {
        (Some(profile), Some(anon)) => Target {
            run: Some(1),
            pages_to_scan: Some(profile.pages_to_scan(anon)),
            sleep_millisecs: Some(profile.sleep_millisecs.into()),
            advisor_mode,
            smart_scan,
        },
        // `off`, or a throttling setting whose size is not known: ksmd stopped, merged pages kept.
        _ => Target { run: Some(0), smart_scan, ..Target::default() },
    }
}

/// smart_scan visits a page that has not merged for a while only every few scans (up to every
/// 9th), so a new VM whose twin has aged alone merges only when both happen to be visited in one
/// scan: adaptive turns it off while aggressive *and nothing is merged yet*. Once KSM holds
/// merged pages, new memory alike merges against them on its first visit whatever its twin's
/// age, and smart_scan spares the visits of the pages that do not merge, which cost ksmd many
/// times a merged page's. Every other setting and mode gets the administrator's value
/// (docs/performance.md has the measurements). `None` leaves it alone.
pub fn smart_scan(mode: Mode, setting: Setting, saved: Option<&Knobs>, merged: bool) -> Option<u8> {
    let found = saved.and_then(|k| k.smart_scan);
    match (mode, setting) {
        (Mode::Adaptive, Setting::Aggressive) if !merged => found.map(|_| 0),
        _ => found,
    }
}

/// The writes that take the knobs from `have` to `want` (see the module documentation).
pub fn plan(have: &Knobs, want: &Target) -> Plan {
    let mut writes = vec![];
    let mut now = have.clone();

    let mut advisor_last = None;
    if let (Some(want), Some(have)) = (&want.advisor_mode, &have.advisor_mode) {
        if want != have {
            if want == ADVISOR_NONE {
                writes.push(Write::AdvisorMode(want.clone()));
                now.advisor_mode = Some(want.clone());
                now.pages_to_scan = PAGES_TO_SCAN_AFTER_ADVISOR_OFF;
            } else {
                advisor_last = Some(want.clone());
            }
        }
    }
    // After the advisor is turned off the kernel holds its own default, whatever was read.
    let advisor_reset = now.advisor_mode != have.advisor_mode;
    let pages = want.pages_to_scan.filter(|&v| advisor_reset || v != now.pages_to_scan);
    let sleep = want.sleep_millisecs.filter(|&v| v != now.sleep_millisecs);
    if now.run == 1 && pages.is_some() && sleep.is_some() {
        writes.push(Write::Run(0));
        now.run = 0;
    }
    if let Some(v) = pages {
        writes.push(Write::PagesToScan(v));
        now.pages_to_scan = v;
    }
    if let Some(v) = sleep {
        writes.push(Write::SleepMillisecs(v));
        now.sleep_millisecs = v;
    }
    if let Some(v) = want.smart_scan.filter(|&v| now.smart_scan.is_some_and(|have| have != v)) {
        writes.push(Write::SmartScan(v));
        now.smart_scan = Some(v);
    }
    let run = want.run.unwrap_or(have.run);
    if run != now.run {
        writes.push(Write::Run(run));
        now.run = run;
    }
    if let Some(advisor) = advisor_last {
        writes.push(Write::AdvisorMode(advisor.clone()));
        now.advisor_mode = Some(advisor);
    }
    Plan { writes, after: now }
}

/// The writes that put `want` in force when the knobs in force cannot be read (a knob left
/// empty or unreadable): every knob of it, in the same order of safety as [`plan`] (an advisor
/// off first and back last, ksmd paused while its scan knobs change, `run` last).
pub fn plan_blind(want: &Target) -> Vec<Write> {
    let mut writes = vec![];
    let advisor_back = want.advisor_mode.as_ref().filter(|a| *a != ADVISOR_NONE);
    if want.advisor_mode.is_some() {
        writes.push(Write::AdvisorMode(ADVISOR_NONE.into()));
    }
    // Paused only where the target says how to start it again.
    let scan = want.pages_to_scan.is_some() || want.sleep_millisecs.is_some();
    if scan && want.run.is_some() {
        writes.push(Write::Run(0));
    }
    writes.extend(want.pages_to_scan.map(Write::PagesToScan));
    writes.extend(want.sleep_millisecs.map(Write::SleepMillisecs));
    writes.extend(want.smart_scan.map(Write::SmartScan));
    writes.extend(want.run.map(Write::Run));
    writes.extend(advisor_back.cloned().map(Write::AdvisorMode));
    writes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::setting::Profiles;
    use Write::*;

    fn knobs(run: u8, pages: u64, sleep: u64) -> Knobs {
        Knobs { run, pages_to_scan: pages, sleep_millisecs: sleep, advisor_mode: None, smart_scan: None }
    }

    fn scan(run: u8, pages: u64, sleep: u64) -> Target {
        Target { run: Some(run), pages_to_scan: Some(pages), sleep_millisecs: Some(sleep), ..Target::default() }
    }

    /// What the knobs read after `writes`, done one by one as the kernel does them (the advisor
    /// resets pages_to_scan when it is turned off).
    fn carry_out(have: &Knobs, writes: &[Write]) -> Knobs {
        let mut k = have.clone();
        for w in writes {
            match w {
                Run(v) => k.run = *v,
                PagesToScan(v) => k.pages_to_scan = *v,
                SleepMillisecs(v) => k.sleep_millisecs = *v,
                SmartScan(v) => k.smart_scan = Some(*v),
                AdvisorMode(v) => {
                    if v == ADVISOR_NONE && k.advisor_mode.as_deref() != Some(ADVISOR_NONE) {
                        k.pages_to_scan = PAGES_TO_SCAN_AFTER_ADVISOR_OFF;
                    }
                    k.advisor_mode = Some(v.clone());
                }
            }
        }
        k
    }

    #[test]
    fn a_knob_that_holds_its_value_is_not_written() {
        let have = knobs(1, 100, 20);
        let p = plan(&have, &scan(1, 100, 20));
        assert_eq!(p.writes, vec![]);
        assert_eq!(p.after, have);
        assert_eq!(plan(&have, &Target::default()).writes, vec![], "an empty target writes nothing");
    }

    #[test]
    fn a_running_ksmd_is_paused_while_both_scan_knobs_change_and_run_comes_last() {
        let p = plan(&knobs(1, 100, 20), &scan(1, 5000, 1));
        assert_eq!(p.writes, vec![Run(0), PagesToScan(5000), SleepMillisecs(1), Run(1)]);
        assert_eq!(p.after, knobs(1, 5000, 1));
    }

    #[test]
    fn a_stopped_ksmd_is_started_after_its_scan_knobs() {
        let p = plan(&knobs(0, 100, 20), &scan(1, 5000, 1));
        assert_eq!(p.writes, vec![PagesToScan(5000), SleepMillisecs(1), Run(1)]);
    }

    #[test]
    fn one_scan_knob_alone_is_written_while_ksmd_runs() {
        assert_eq!(plan(&knobs(1, 100, 20), &scan(1, 5000, 20)).writes, vec![PagesToScan(5000)]);
        assert_eq!(plan(&knobs(1, 100, 20), &scan(1, 100, 1)).writes, vec![SleepMillisecs(1)]);
    }

    #[test]
    fn stopping_ksmd_writes_run_alone() {
        let off = Target { run: Some(0), ..Target::default() };
        assert_eq!(plan(&knobs(1, 5000, 1), &off).writes, vec![Run(0)]);
    }

    #[test]
    fn the_advisor_is_turned_off_first_and_pages_to_scan_is_written_after_its_reset() {
        let have = Knobs { advisor_mode: Some("scan-time".into()), ..knobs(0, 100, 20) };
        let want = Target { advisor_mode: Some(ADVISOR_NONE.into()), ..scan(1, 100, 1) };
        let p = plan(&have, &want);
        // pages_to_scan held 100 before, but the reset is the kernel's: written all the same.
        assert_eq!(p.writes, vec![AdvisorMode("none".into()), PagesToScan(100), SleepMillisecs(1), Run(1)]);
        assert_eq!(carry_out(&have, &p.writes), p.after);
    }

    #[test]
    fn a_running_ksmd_under_the_advisor_is_paused_after_the_advisor_is_off() {
        let have = Knobs { advisor_mode: Some("scan-time".into()), ..knobs(1, 2000, 20) };
        let want = Target { advisor_mode: Some(ADVISOR_NONE.into()), ..scan(1, 5000, 1) };
        let p = plan(&have, &want);
        assert_eq!(p.writes, vec![AdvisorMode("none".into()), Run(0), PagesToScan(5000), SleepMillisecs(1), Run(1)]);
    }

    #[test]
    fn an_advisor_is_put_back_last() {
        let saved = Knobs { advisor_mode: Some("scan-time".into()), ..knobs(1, 300, 20) };
        let driven = Knobs { advisor_mode: Some(ADVISOR_NONE.into()), ..knobs(1, 5000, 1) };
        let p = plan(&driven, &Target::from(&saved));
        assert_eq!(
            p.writes,
            vec![Run(0), PagesToScan(300), SleepMillisecs(20), Run(1), AdvisorMode("scan-time".into())]
        );
        assert_eq!(p.after, saved);
    }

    #[test]
    fn smart_scan_is_written_before_run_and_only_where_the_kernel_has_it() {
        let have = Knobs { smart_scan: Some(1), ..knobs(0, 100, 20) };
        let want = Target { smart_scan: Some(0), ..scan(1, 5000, 1) };
        assert_eq!(plan(&have, &want).writes, vec![PagesToScan(5000), SleepMillisecs(1), SmartScan(0), Run(1)]);
        let without = knobs(0, 100, 20);
        let p = plan(&without, &want);
        assert!(!p.writes.contains(&SmartScan(0)), "{:?}", p.writes);
        assert_eq!(p.after.smart_scan, None);
    }

    #[test]
    fn every_plan_ends_where_it_says_and_never_runs_on_half_a_setting() {
        // Every pair of these states, both ways: the writes carried out one by one end in
        // `after`, the target's knobs hold, and ksmd never runs between two scan-knob writes.
        let states = [
            knobs(0, 100, 20),
            knobs(1, 100, 20),
            knobs(1, 5000, 1),
            knobs(2, 77, 3),
            Knobs { advisor_mode: Some("scan-time".into()), smart_scan: Some(1), ..knobs(1, 400, 20) },
            Knobs { advisor_mode: Some(ADVISOR_NONE.into()), smart_scan: Some(0), ..knobs(1, 9000, 1) },
        ];
        for have in &states {
            for to in &states {
                let want = Target::from(to);
                let p = plan(have, &want);
                assert_eq!(carry_out(have, &p.writes), p.after, "{have:?} -> {to:?}: {:?}", p.writes);
                assert_eq!(p.after.run, to.run);
                assert_eq!(p.after.sleep_millisecs, to.sleep_millisecs);
                // A kernel without the advisor (or smart_scan) never gets one written.
                let advisor = have.advisor_mode.as_ref().map(|have| to.advisor_mode.as_ref().unwrap_or(have));
                assert_eq!(p.after.advisor_mode.as_ref(), advisor);
                let smart = have.smart_scan.map(|have| to.smart_scan.unwrap_or(have));
                assert_eq!(p.after.smart_scan, smart);
                if p.after.advisor_mode.as_deref().is_none_or(|a| a == ADVISOR_NONE) {
                    assert_eq!(p.after.pages_to_scan, to.pages_to_scan, "{have:?} -> {to:?}");
                }
                let mut running = have.run == 1;
                let both = p.writes.iter().filter(|w| matches!(w, PagesToScan(_) | SleepMillisecs(_))).count() == 2;
                for w in &p.writes {
                    match w {
                        Run(v) => running = *v == 1,
                        PagesToScan(_) | SleepMillisecs(_) => {
                            assert!(!(both && running), "{have:?} -> {to:?}: {:?}", p.writes);
                        }
                        AdvisorMode(a) if a != ADVISOR_NONE => {
                            assert_eq!(Some(w), p.writes.last(), "the advisor comes back last")
                        }
                        _ => {}
                    }
                }
            }
        }
    }

    #[test]
    fn a_blind_plan_writes_every_knob_in_the_safe_order() {
        let saved = Knobs { advisor_mode: Some("scan-time".into()), smart_scan: Some(1), ..knobs(1, 300, 20) };
        assert_eq!(
            plan_blind(&Target::from(&saved)),
            vec![
                AdvisorMode("none".into()),
                Run(0),
                PagesToScan(300),
                SleepMillisecs(20),
                SmartScan(1),
                Run(1),
                AdvisorMode("scan-time".into())
            ]
        );
        let plain = knobs(0, 100, 20);
        assert_eq!(plan_blind(&Target::from(&plain)), vec![Run(0), PagesToScan(100), SleepMillisecs(20), Run(0)]);
    }

    #[test]
    fn each_setting_and_mode_has_its_target() {
        let profiles = Profiles::default();
        let saved = Knobs { advisor_mode: Some("scan-time".into()), smart_scan: Some(1), ..knobs(0, 100, 20) };
        let anon = 1_000_000;
        for mode in Mode::ALL {
            for setting in Setting::ALL {
                let t = target(setting, mode, profiles.get(setting), Some(&saved), Some(anon), false);
                let with_merged = target(setting, mode, profiles.get(setting), Some(&saved), Some(anon), true);
                match (setting, profiles.get(setting)) {
                    (Setting::Initial, _) => assert_eq!(t, Target::from(&saved), "{mode} {setting}"),
                    (Setting::Off, _) => {
                        assert_eq!(t, Target { run: Some(0), smart_scan: Some(1), ..Target::default() }, "{mode}")
                    }
                    (_, Some(p)) => {
                        assert_eq!(t.run, Some(1));
                        assert_eq!(t.pages_to_scan, Some(anon / p.anon_divisor));
                        assert_eq!(t.sleep_millisecs, Some(p.sleep_millisecs.into()));
                        assert_eq!(t.advisor_mode.as_deref(), Some(ADVISOR_NONE), "{mode} {setting}");
                        let smart = if mode == Mode::Adaptive && setting == Setting::Aggressive { 0 } else { 1 };
                        assert_eq!(t.smart_scan, Some(smart), "{mode} {setting}");
                        assert_eq!(with_merged.smart_scan, Some(1), "merged pages there: {mode} {setting}");
                        assert_eq!(Target { smart_scan: t.smart_scan, ..with_merged }, t, "nothing else differs");
                    }
                    (_, None) => unreachable!("every throttling setting has a profile"),
                }
            }
        }
    }

    #[test]
    fn a_kernel_without_the_advisor_or_smart_scan_gets_neither_written() {
        let saved = knobs(0, 100, 20);
        let t = target(Setting::Aggressive, Mode::Adaptive, Some(Profile::AGGRESSIVE), Some(&saved), Some(5000), false);
        assert_eq!((t.advisor_mode, t.smart_scan), (None, None));
        assert_eq!(
            target(Setting::Initial, Mode::Throttle, None, None, None, false),
            Target::default(),
            "nothing saved"
        );
    }
}
