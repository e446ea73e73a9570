//! What the throttler wrote to each knob during a cycle, kept in the record beside the
//! administrator's settings, and what a successor puts back from that record ([`restore`]): a
//! recorded knob goes back only over a value this throttler wrote. Any other value was set by
//! someone else since (the administrator, by hand, after a record that could not be removed),
//! and stays.
//!
//! The record is updated before the writes it lists, so a kill between the two leaves the knob
//! at a value that is listed either way: each knob keeps its last few distinct values, the
//! pause of ksmd (`run` = 0) included, and the `pages_to_scan` the kernel itself sets when the
//! advisor is turned off.

use std::fmt::Display;

use serde::{Deserialize, Serialize};

use crate::core::knobs::{Knobs, Target, ADVISOR_MODE, ADVISOR_NONE, PAGES_TO_SCAN, RUN, SLEEP_MILLISECS, SMART_SCAN};
use crate::core::plan::{Write, PAGES_TO_SCAN_AFTER_ADVISOR_OFF};

/// Distinct values kept per knob: a cycle writes three settings, and a write-ahead record must
/// still list the value before the last write.
pub const KEPT_PER_KNOB: usize = 4;

/// The values this throttler wrote to each knob in the cycle under way, most recent last.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Written {
    pub run: Vec<u8>,
    pub pages_to_scan: Vec<u64>,
    pub sleep_millisecs: Vec<u64>,
    pub advisor_mode: Vec<String>,
    pub smart_scan: Vec<u8>,
}

fn remember<T: PartialEq>(values: &mut Vec<T>, value: T) {
    values.retain(|v| *v != value);
    values.push(value);
    if values.len() > KEPT_PER_KNOB {
        values.remove(0);
    }
}

impl Written {
    /// These values with `writes` added, and what the kernel sets by itself as they are made.
    pub fn with(&self, writes: &[Write]) -> Written {
        let mut w = self.clone();
        for write in writes {
            match write {
                Write::Run(v) => remember(&mut w.run, *v),
                Write::PagesToScan(v) => remember(&mut w.pages_to_scan, *v),
                Write::SleepMillisecs(v) => remember(&mut w.sleep_millisecs, *v),
                Write::SmartScan(v) => remember(&mut w.smart_scan, *v),
                Write::AdvisorMode(v) => {
                    if v == ADVISOR_NONE {
                        remember(&mut w.pages_to_scan, PAGES_TO_SCAN_AFTER_ADVISOR_OFF);
                    }
                    remember(&mut w.advisor_mode, v.clone());
                }
            }
        }
        w
    }
}

/// A recorded knob left as found: its value is not one this throttler wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept {
    pub knob: &'static str,
    pub found: String,
    pub recorded: String,
}

/// What a successor writes of a record, and the knobs it leaves to whoever set them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restore {
    pub target: Target,
    pub kept: Vec<Kept>,
}

/// What to put back of the administrator's settings `saved` over the knobs `have`, given what
/// the throttler had `written` (`None`: a record from a version that did not say, put back
/// whole as it always was).
pub fn restore(saved: &Knobs, written: Option<&Written>, have: &Knobs) -> Restore {
    let mut kept = vec![];
    let ours = |pick: fn(&Written) -> &[u64]| written.map(pick);
    let run = pick(RUN, saved.run, have.run, written.map(|w| &w.run[..]), &mut kept);
    let pages_to_scan =
        pick(PAGES_TO_SCAN, saved.pages_to_scan, have.pages_to_scan, ours(|w| &w.pages_to_scan), &mut kept);
    let sleep_millisecs =
        pick(SLEEP_MILLISECS, saved.sleep_millisecs, have.sleep_millisecs, ours(|w| &w.sleep_millisecs), &mut kept);
    let advisor_mode = match (&saved.advisor_mode, &have.advisor_mode) {
        (Some(recorded), Some(found)) => {
            pick_string(ADVISOR_MODE, recorded, found, written.map(|w| &w.advisor_mode[..]), &mut kept)
        }
        _ => None,
    };
    let smart_scan = match (saved.smart_scan, have.smart_scan) {
        (Some(recorded), Some(found)) => {
            pick(SMART_SCAN, recorded, found, written.map(|w| &w.smart_scan[..]), &mut kept)
        }
        _ => None,
    };
    // An advisor someone else turned on owns pages_to_scan (the kernel refuses writes to it).
    let advisor_kept = advisor_mode.is_none() && have.advisor_mode.as_deref().is_some_and(|a| a != ADVISOR_NONE);
    let pages_to_scan = pages_to_scan.filter(|_| !advisor_kept);
    Restore { target: Target { run, pages_to_scan, sleep_millisecs, advisor_mode, smart_scan }, kept }
}

fn pick<T: PartialEq + Copy + Display>(
    knob: &'static str,
    recorded: T,
    found: T,
    ours: Option<&[T]>,
    kept: &mut Vec<Kept>,
) -> Option<T> {
    if found == recorded || ours.is_none_or(|ours| ours.contains(&found)) {
        return Some(recorded);
    }
    kept.push(Kept { knob, found: found.to_string(), recorded: recorded.to_string() });
    None
}

fn pick_string(
    knob: &'static str,
    recorded: &str,
    found: &str,
    ours: Option<&[String]>,
    kept: &mut Vec<Kept>,
) -> Option<String> {
    if found == recorded || ours.is_none_or(|ours| ours.iter().any(|v| v == found)) {
        return Some(recorded.to_owned());
    }
    kept.push(Kept { knob, found: found.to_owned(), recorded: recorded.to_owned() });
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn knobs(run: u8, pages: u64, sleep: u64) -> Knobs {
        Knobs { run, pages_to_scan: pages, sleep_millisecs: sleep, advisor_mode: None, smart_scan: None }
    }

    fn aggressive() -> Written {
        Written::default().with(&[Write::Run(0), Write::PagesToScan(5000), Write::SleepMillisecs(1), Write::Run(1)])
    }

    #[test]
    fn knobs_holding_what_we_wrote_go_back() {
        let r = restore(&knobs(0, 100, 20), Some(&aggressive()), &knobs(1, 5000, 1));
        assert_eq!(r.target, Target::from(&knobs(0, 100, 20)));
        assert!(r.kept.is_empty());
    }

    /// Issue 30, item 1: the record could not be removed, then the administrator set 555 / 55.
    #[test]
    fn knobs_someone_else_set_since_stay_and_are_named() {
        let r = restore(&knobs(0, 100, 20), Some(&aggressive()), &knobs(0, 555, 55));
        assert_eq!(r.target, Target { run: Some(0), ..Target::default() });
        assert_eq!(
            r.kept,
            [
                Kept { knob: PAGES_TO_SCAN, found: "555".into(), recorded: "100".into() },
                Kept { knob: SLEEP_MILLISECS, found: "55".into(), recorded: "20".into() },
            ]
        );
        // One changed by hand, the others still ours.
        let r = restore(&knobs(0, 100, 20), Some(&aggressive()), &knobs(1, 5000, 55));
        assert_eq!(
            r.target,
            Target { run: Some(0), pages_to_scan: Some(100), sleep_millisecs: None, ..Target::default() }
        );
        assert_eq!(r.kept.len(), 1);
    }

    #[test]
    fn a_record_that_does_not_say_what_was_written_goes_back_whole() {
        let r = restore(&knobs(0, 100, 20), None, &knobs(0, 555, 55));
        assert_eq!(r.target, Target::from(&knobs(0, 100, 20)));
        assert!(r.kept.is_empty());
    }

    #[test]
    fn a_kill_between_the_record_and_its_writes_leaves_a_listed_value() {
        // Standard recorded before it was written: the knobs still hold aggressive's.
        let w = aggressive().with(&[Write::PagesToScan(500), Write::SleepMillisecs(10)]);
        let r = restore(&knobs(0, 100, 20), Some(&w), &knobs(1, 5000, 1));
        assert!(r.kept.is_empty(), "{:?}", r.kept);
        // Killed after the pause of ksmd.
        let r = restore(&knobs(1, 100, 20), Some(&w), &knobs(0, 500, 10));
        assert!(r.kept.is_empty(), "{:?}", r.kept);
    }

    #[test]
    fn the_advisor_reset_of_pages_to_scan_counts_as_ours() {
        let w = Written::default().with(&[Write::AdvisorMode(ADVISOR_NONE.into())]);
        assert_eq!(w.pages_to_scan, [PAGES_TO_SCAN_AFTER_ADVISOR_OFF]);
        let saved = Knobs { advisor_mode: Some("scan-time".into()), ..knobs(1, 1000, 20) };
        let have = Knobs { advisor_mode: Some(ADVISOR_NONE.into()), ..knobs(1, 100, 20) };
        let r = restore(&saved, Some(&w), &have);
        assert_eq!(r.target.advisor_mode.as_deref(), Some("scan-time"));
        assert!(r.kept.is_empty());
    }

    #[test]
    fn an_advisor_turned_on_by_someone_else_keeps_pages_to_scan() {
        let w = aggressive().with(&[Write::AdvisorMode(ADVISOR_NONE.into())]);
        let saved = Knobs { advisor_mode: Some(ADVISOR_NONE.into()), ..knobs(0, 100, 20) };
        let have = Knobs { advisor_mode: Some("scan-time".into()), ..knobs(1, 5000, 1) };
        let r = restore(&saved, Some(&w), &have);
        assert_eq!((r.target.advisor_mode, r.target.pages_to_scan), (None, None));
        assert_eq!((r.target.run, r.target.sleep_millisecs), (Some(0), Some(20)));
    }

    #[test]
    fn each_knob_keeps_its_last_few_distinct_values() {
        let mut w = Written::default();
        for v in [1, 2, 3, 2, 4, 5] {
            w = w.with(&[Write::SleepMillisecs(v)]);
        }
        assert_eq!(w.sleep_millisecs, [3, 2, 4, 5]);
    }
}
