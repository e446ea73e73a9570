//! From samples to the figures the issue asks for. Pure functions over recorded data.

use serde::{Deserialize, Serialize};

use crate::sample::Sample;

/// A process counts as merged once this fraction of its shared pages is.
pub const PROCESS_MERGED: f64 = 0.95;
/// Issue 7's targets for adaptive mode against the throttle timeline.
pub const TARGET_T95_RATIO: f64 = 1.2;
pub const TARGET_CPU_RATIO: f64 = 0.25;
pub const TARGET_NEW_PROCESS_S: f64 = 3.0;
/// The real-guest targets (issue 12): adaptive keeps this share of the timeline's saved MiB·s
/// for at most this share of its ksmd CPU.
pub const VM_TARGET_SAVED_RATIO: f64 = 0.95;
pub const VM_TARGET_CPU_RATIO: f64 = 0.5;

const MIB: f64 = 1024.0 * 1024.0;

/// A workload process became ready (memory filled and MADV_MERGEABLE).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Start {
    pub index: u32,
    pub pid: u32,
    /// Seconds since the run's start; negative when it was ready before (all at once).
    pub t: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub t: f64,
    pub setting: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Seconds to 50, 90 and 95 % of the best possible pages_sharing; `None` if not in the window.
    pub t50: Option<f64>,
    pub t90: Option<f64>,
    pub t95: Option<f64>,
    /// ksmd's CPU-seconds until 95 % merged: the merge work, which load does not stretch.
    #[serde(default)]
    pub ksmd_cpu_to_t95_s: Option<f64>,
    pub ksmd_cpu_s: f64,
    pub saved_mib_s: f64,
    pub max_merged: f64,
    pub full_scans: u64,
    /// Per process: seconds from its start (or the run's, if earlier) to [`PROCESS_MERGED`].
    pub process_merged_s: Vec<Option<f64>>,
    /// The setting at the start and each change after.
    pub steps: Vec<Step>,
}

/// What a run's summary needs to know about its workload.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scale {
    pub max_pages_sharing: u64,
    pub shared_pages_per_process: u64,
    pub page_size: u64,
    pub window_s: f64,
}

pub fn summarize(samples: &[Sample], starts: &[Start], scale: Scale) -> Summary {
    let within: Vec<&Sample> = samples.iter().filter(|s| s.t <= scale.window_s).collect();
    let reach = |f: f64| time_to_fraction(&within, scale.max_pages_sharing, f);
    let max_sharing = within.iter().map(|s| s.pages_sharing).max().unwrap_or(0);
    let first_scans = samples.first().map_or(0, |s| s.full_scans);
    let t95 = reach(0.95);
    Summary {
        t50: reach(0.50),
        t90: reach(0.90),
        t95,
        ksmd_cpu_to_t95_s: t95.map(|t| at_time(samples, t, |s| s.ksmd_cpu_ns as f64) / 1e9),
        ksmd_cpu_s: at_time(samples, scale.window_s, |s| s.ksmd_cpu_ns as f64) / 1e9,
        saved_mib_s: saved_mib_s(samples, scale.page_size, scale.window_s),
        max_merged: fraction(max_sharing, scale.max_pages_sharing),
        full_scans: at_time(samples, scale.window_s, |s| s.full_scans as f64) as u64 - first_scans,
        process_merged_s: starts.iter().map(|st| process_merged(&within, st, scale.shared_pages_per_process)).collect(),
        steps: steps(&within),
    }
}

fn fraction(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// The first sample time at which pages_sharing reached `f` of the best possible.
pub fn time_to_fraction(samples: &[&Sample], max: u64, f: f64) -> Option<f64> {
    if max == 0 {
        return None;
    }
    samples.iter().find(|s| s.pages_sharing as f64 >= f * max as f64).map(|s| s.t)
}

/// A sampled value at time `t`, interpolated between the samples around it (the last one if
/// sampling ended before `t`).
pub fn at_time(samples: &[Sample], t: f64, value: impl Fn(&Sample) -> f64) -> f64 {
    let Some(after) = samples.iter().position(|s| s.t >= t) else {
        return samples.last().map_or(0.0, &value);
    };
    if after == 0 {
        return value(&samples[0]);
    }
    let (a, b) = (&samples[after - 1], &samples[after]);
    let span = b.t - a.t;
    if span <= 0.0 {
        return value(b);
    }
    value(a) + (value(b) - value(a)) * (t - a.t) / span
}

/// Memory saved over time, MiB x seconds: the area under pages_sharing from 0 to `window`.
pub fn saved_mib_s(samples: &[Sample], page_size: u64, window: f64) -> f64 {
    let mib = |s: &Sample| s.pages_sharing as f64 * page_size as f64 / MIB;
    let mut area = 0.0;
    for pair in samples.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        if a.t >= window {
            break;
        }
        let end = b.t.min(window);
        let end_value = if b.t > window { at_time(samples, window, mib) } else { mib(b) };
        area += (end - a.t) * (mib(a) + end_value) / 2.0;
    }
    area
}

fn process_merged(samples: &[&Sample], start: &Start, shared: u64) -> Option<f64> {
    if shared == 0 {
        return None;
    }
    let from = start.t.max(0.0);
    let need = PROCESS_MERGED * shared as f64;
    samples
        .iter()
        .filter(|s| s.t >= from)
        .find(|s| s.merging.get(start.index as usize).is_some_and(|&m| m as f64 >= need))
        .map(|s| s.t - from)
}

fn steps(samples: &[&Sample]) -> Vec<Step> {
    let mut steps: Vec<Step> = vec![];
    for s in samples {
        if steps.last().is_none_or(|last| last.setting != s.setting) {
            steps.push(Step { t: s.t, setting: s.setting.clone() });
        }
    }
    steps
}

/// One of issue 7's targets, checked on measured figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub workload: String,
    pub target: String,
    pub measured: String,
    pub met: bool,
}

/// Adaptive against throttle on the same workload; `staggered` adds the per-process target,
/// which applies from the second process on (the first has nothing to merge with until then).
pub fn targets(workload: &str, throttle: &Summary, adaptive: &Summary, staggered: bool) -> Vec<Verdict> {
    let secs = |t: Option<f64>| t.map_or("never".to_string(), |t| format!("{t:.1} s"));
    let mut out = vec![Verdict {
        workload: workload.into(),
        target: format!("adaptive 95 % merged within {TARGET_T95_RATIO}x throttle's time"),
        measured: format!("adaptive {}, throttle {}", secs(adaptive.t95), secs(throttle.t95)),
        met: match (adaptive.t95, throttle.t95) {
            (Some(a), Some(t)) => a <= TARGET_T95_RATIO * t,
            (Some(_), None) => true,
            (None, _) => false,
        },
    }];
    let ratio = if throttle.ksmd_cpu_s > 0.0 { adaptive.ksmd_cpu_s / throttle.ksmd_cpu_s } else { f64::INFINITY };
    out.push(Verdict {
        workload: workload.into(),
        target: format!("adaptive ksmd CPU <= {:.0} % of throttle's", TARGET_CPU_RATIO * 100.0),
        measured: format!(
            "adaptive {:.2} CPU-s, throttle {:.2} CPU-s ({:.1} %)",
            adaptive.ksmd_cpu_s,
            throttle.ksmd_cpu_s,
            ratio * 100.0
        ),
        met: ratio <= TARGET_CPU_RATIO,
    });
    if staggered {
        let later = adaptive.process_merged_s.iter().skip(1);
        let worst = later.clone().try_fold(0.0f64, |w, t| t.map(|t| w.max(t)));
        out.push(Verdict {
            workload: workload.into(),
            target: format!("adaptive: every new process merged within {TARGET_NEW_PROCESS_S} s"),
            measured: match worst {
                Some(w) => format!("slowest {w:.1} s"),
                None => "a process was never merged".into(),
            },
            met: worst.is_some_and(|w| w <= TARGET_NEW_PROCESS_S) && later.count() > 0,
        });
    }
    out
}

/// Adaptive against throttle (and the kernel's advisor, if run) on real guests.
pub fn vm_targets(workload: &str, throttle: &Summary, adaptive: &Summary, advisor: Option<&Summary>) -> Vec<Verdict> {
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::INFINITY };
    let saved = ratio(adaptive.saved_mib_s, throttle.saved_mib_s);
    let cpu = ratio(adaptive.ksmd_cpu_s, throttle.ksmd_cpu_s);
    let mut out = vec![
        Verdict {
            workload: workload.into(),
            target: format!("adaptive saved MiB·s >= {:.0} % of throttle's", VM_TARGET_SAVED_RATIO * 100.0),
            measured: format!(
                "adaptive {:.0}, throttle {:.0} ({:.1} %)",
                adaptive.saved_mib_s,
                throttle.saved_mib_s,
                saved * 100.0
            ),
            met: throttle.saved_mib_s > 0.0 && saved >= VM_TARGET_SAVED_RATIO,
        },
        Verdict {
            workload: workload.into(),
            target: format!("adaptive ksmd CPU <= {:.0} % of throttle's", VM_TARGET_CPU_RATIO * 100.0),
            measured: format!(
                "adaptive {:.2} CPU-s, throttle {:.2} CPU-s ({:.1} %)",
                adaptive.ksmd_cpu_s,
                throttle.ksmd_cpu_s,
                cpu * 100.0
            ),
            met: cpu <= VM_TARGET_CPU_RATIO,
        },
    ];
    if let Some(adv) = advisor {
        out.push(Verdict {
            workload: workload.into(),
            target: "adaptive beats the kernel's advisor on saved MiB·s and on ksmd CPU".into(),
            measured: format!(
                "saved MiB·s {:.0} vs {:.0}, CPU-s {:.2} vs {:.2}",
                adaptive.saved_mib_s, adv.saved_mib_s, adaptive.ksmd_cpu_s, adv.ksmd_cpu_s
            ),
            met: adaptive.saved_mib_s >= adv.saved_mib_s && adaptive.ksmd_cpu_s <= adv.ksmd_cpu_s,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(t: f64, pages_sharing: u64, cpu_ms: u64, setting: &str, merging: &[u64]) -> Sample {
        Sample {
            t,
            pages_sharing,
            pages_shared: 0,
            full_scans: (t * 2.0) as u64,
            pages_unshared: 0,
            pages_volatile: 0,
            ksmd_cpu_ns: cpu_ms * 1_000_000,
            setting: setting.into(),
            run: 1,
            pages_to_scan: 100,
            sleep_millisecs: 20,
            anon_pages: 0,
            merging: merging.to_vec(),
        }
    }

    const PAGE: u64 = 4096;
    const PAGES_PER_MIB: u64 = 256;

    fn scale(max: u64, window: f64) -> Scale {
        Scale { max_pages_sharing: max, shared_pages_per_process: 100, page_size: PAGE, window_s: window }
    }

    #[test]
    fn times_to_merged_are_first_samples_at_or_over_the_fraction() {
        let samples = [
            s(0.0, 0, 0, "aggressive", &[]),
            s(1.0, 499, 100, "aggressive", &[]),
            s(2.0, 500, 200, "aggressive", &[]),
            s(3.0, 949, 300, "aggressive", &[]),
            s(4.0, 950, 400, "standard", &[]),
            s(5.0, 1000, 450, "initial", &[]),
        ];
        let sum = summarize(&samples, &[], scale(1000, 10.0));
        assert_eq!((sum.t50, sum.t90, sum.t95), (Some(2.0), Some(3.0), Some(4.0)));
        assert_eq!(sum.ksmd_cpu_to_t95_s, Some(0.4));
        assert_eq!(sum.max_merged, 1.0);
        let steps: Vec<_> = sum.steps.iter().map(|s| (s.t, s.setting.as_str())).collect();
        assert_eq!(steps, [(0.0, "aggressive"), (4.0, "standard"), (5.0, "initial")]);
        // Not reached inside the window: None, not a time past it.
        let sum = summarize(&samples, &[], scale(1000, 3.5));
        assert_eq!((sum.t90, sum.t95), (Some(3.0), None));
        assert_eq!(summarize(&samples, &[], scale(0, 10.0)).t50, None, "nothing to merge: no time");
    }

    #[test]
    fn cpu_and_saved_memory_are_taken_over_the_window_exactly() {
        let samples =
            [s(0.0, 0, 0, "x", &[]), s(10.0, PAGES_PER_MIB * 100, 1000, "x", &[]), s(20.0, 0, 3000, "x", &[])];
        // Linear ramp to 100 MiB over 10 s: 500 MiB s; half-way down at 15 s: +375.
        assert!((saved_mib_s(&samples, PAGE, 10.0) - 500.0).abs() < 1e-9);
        assert!((saved_mib_s(&samples, PAGE, 15.0) - 875.0).abs() < 1e-9);
        assert!((saved_mib_s(&samples, PAGE, 100.0) - 1000.0).abs() < 1e-9, "sampling ended: no more area");
        let sum = summarize(&samples, &[], scale(1, 15.0));
        assert!((sum.ksmd_cpu_s - 2.0).abs() < 1e-9, "interpolated at 15 s: {}", sum.ksmd_cpu_s);
    }

    #[test]
    fn each_process_is_timed_from_its_own_start() {
        let samples = [
            s(0.0, 0, 0, "a", &[0, 0]),
            s(0.5, 0, 0, "a", &[50, 0]),
            s(1.0, 0, 0, "a", &[95, 0]),
            s(10.0, 0, 0, "a", &[100, 0]),
            s(10.5, 0, 0, "a", &[100, 94]),
            s(12.5, 0, 0, "a", &[100, 95]),
        ];
        let starts = [Start { index: 0, pid: 1, t: -0.3 }, Start { index: 1, pid: 2, t: 10.0 }];
        let sum = summarize(&samples, &starts, scale(1, 100.0));
        assert_eq!(sum.process_merged_s, [Some(1.0), Some(2.5)]);
        let unmerged = [s(0.0, 0, 0, "a", &[0]), s(1.0, 0, 0, "a", &[94])];
        let sum = summarize(&unmerged, &starts[..1], scale(1, 100.0));
        assert_eq!(sum.process_merged_s, [None]);
    }

    fn summary(t95: Option<f64>, cpu: f64, procs: &[Option<f64>]) -> Summary {
        Summary {
            t50: None,
            t90: None,
            t95,
            ksmd_cpu_to_t95_s: None,
            ksmd_cpu_s: cpu,
            saved_mib_s: 0.0,
            max_merged: 0.0,
            full_scans: 0,
            process_merged_s: procs.to_vec(),
            steps: vec![],
        }
    }

    #[test]
    fn vm_targets_are_judged_on_saved_memory_and_cpu_against_throttle_and_the_advisor() {
        let with = |saved: f64, cpu: f64| Summary { saved_mib_s: saved, ..summary(None, cpu, &[]) };
        let throttle = with(1000.0, 20.0);
        let met = vm_targets("v", &throttle, &with(950.0, 10.0), Some(&with(900.0, 11.0)));
        assert_eq!(met.iter().map(|v| v.met).collect::<Vec<_>>(), [true, true, true]);
        let missed = vm_targets("v", &throttle, &with(949.0, 10.1), Some(&with(960.0, 5.0)));
        assert_eq!(missed.iter().map(|v| v.met).collect::<Vec<_>>(), [false, false, false]);
        assert_eq!(vm_targets("v", &throttle, &with(1.0, 1.0), None).len(), 2, "no advisor run: no verdict on it");
        assert!(!vm_targets("v", &with(0.0, 1.0), &with(0.0, 0.0), None)[0].met, "nothing saved proves nothing");
    }

    #[test]
    fn targets_are_judged_on_the_figures() {
        let throttle = summary(Some(3.0), 20.0, &[]);
        let met = targets("w", &throttle, &summary(Some(3.5), 5.0, &[]), false);
        assert_eq!(met.iter().map(|v| v.met).collect::<Vec<_>>(), [true, true]);
        let missed = targets("w", &throttle, &summary(Some(3.7), 5.1, &[]), false);
        assert_eq!(missed.iter().map(|v| v.met).collect::<Vec<_>>(), [false, false]);
        assert!(missed[1].measured.contains("25.5 %"), "{}", missed[1].measured);
        assert!(!targets("w", &throttle, &summary(None, 1.0, &[]), false)[0].met, "never merged is a miss");
    }

    #[test]
    fn staggered_target_skips_the_first_process_and_fails_on_any_slow_or_unmerged_one() {
        let throttle = summary(Some(70.0), 100.0, &[]);
        let judge = |procs: &[Option<f64>]| targets("s", &throttle, &summary(Some(70.0), 1.0, procs), true)[2].met;
        assert!(judge(&[Some(12.0), Some(1.0), Some(3.0)]), "the first waits for a peer: not judged");
        assert!(!judge(&[Some(1.0), Some(1.0), Some(3.1)]));
        assert!(!judge(&[Some(1.0), None, Some(1.0)]));
        assert!(!judge(&[Some(1.0)]), "a single process proves nothing");
    }
}
