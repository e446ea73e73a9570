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
/// Issue 27's targets: adaptive saves as much as the timeline, for at most this share of the
/// kernel advisor's ksmd CPU, leaving the guests as many cores as the advisor does (within this).
pub const VM_TARGET_FULL_SAVED_RATIO: f64 = 1.0;
pub const VM_TARGET_ADVISOR_CPU_RATIO: f64 = 0.5;
pub const VM_TARGET_CORES_SLACK: f64 = 0.05;
/// The floor for page visits per merged page: ksmd merges a page into the unstable tree
/// only once it has seen it twice unchanged. A nominal reference rather than a strict bound (a
/// page matching one already in the stable tree merges on its first visit).
pub const VISIT_FLOOR: f64 = 2.0;

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
    /// Pages ksmd visited over the window: `pages_scanned` at its end minus at its start
    /// (`None` where the kernel has no such counter, or in older results).
    #[serde(default)]
    pub pages_visited: Option<u64>,
    /// Pages `smart_scan` passed by over the window (`pages_skipped`, end minus start).
    #[serde(default)]
    pub pages_skipped: Option<u64>,
    /// The most pages merged at once within the window: the peak of pages_sharing +
    /// ksm_zero_pages (the memory saved, zero pages included), not its final value.
    #[serde(default)]
    pub peak_merged_pages: u64,
    /// `pages_visited / peak_merged_pages`; [`VISIT_FLOOR`] would be no visit wasted.
    #[serde(default)]
    pub visits_per_merged: Option<f64>,
    /// ksmd's CPU-seconds in the window per GiB·minute saved: `ksmd_cpu_s / (saved_mib_s /
    /// 1024 / 60)` (`None` when nothing was saved).
    #[serde(default)]
    pub ksmd_cpu_s_per_saved_gib_min: Option<f64>,
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
    let ksmd_cpu_s = at_time(samples, scale.window_s, |s| s.ksmd_cpu_ns as f64) / 1e9;
    let saved = saved_mib_s(samples, scale.page_size, scale.window_s);
    let pages_visited = counted_over_window(samples, scale.window_s, |s| s.pages_scanned);
    let peak_merged_pages = peak_merged(&within);
    Summary {
        t50: reach(0.50),
        t90: reach(0.90),
        t95,
        ksmd_cpu_to_t95_s: t95.map(|t| at_time(samples, t, |s| s.ksmd_cpu_ns as f64) / 1e9),
        ksmd_cpu_s,
        saved_mib_s: saved,
        max_merged: fraction(max_sharing, scale.max_pages_sharing),
        full_scans: at_time(samples, scale.window_s, |s| s.full_scans as f64) as u64 - first_scans,
        process_merged_s: starts.iter().map(|st| process_merged(&within, st, scale.shared_pages_per_process)).collect(),
        steps: steps(&within),
        pages_visited,
        pages_skipped: counted_over_window(samples, scale.window_s, |s| s.pages_skipped),
        peak_merged_pages,
        visits_per_merged: pages_visited.and_then(|v| per_merged_page(v, peak_merged_pages)),
        ksmd_cpu_s_per_saved_gib_min: cpu_per_saved_gib_min(ksmd_cpu_s, saved),
    }
}

/// How much a running count (`pages_scanned`, `pages_skipped`) went up from the first sample
/// to the window's end (interpolated as [`at_time`] does); `None` unless every sample has it.
pub fn counted_over_window(samples: &[Sample], window: f64, count: impl Fn(&Sample) -> Option<u64>) -> Option<u64> {
    let first = count(samples.first()?)?;
    if samples.iter().any(|s| count(s).is_none()) {
        return None;
    }
    let end = at_time(samples, window, |s| count(s).unwrap_or(0) as f64);
    Some((end.round() as u64).saturating_sub(first))
}

/// The peak of pages_sharing + ksm_zero_pages over `samples`.
pub fn peak_merged(samples: &[&Sample]) -> u64 {
    samples.iter().map(|s| s.pages_sharing + s.ksm_zero_pages.unwrap_or(0)).max().unwrap_or(0)
}

/// Visits per merged page (`None` when nothing merged).
pub fn per_merged_page(visits: u64, merged: u64) -> Option<f64> {
    (merged > 0).then(|| visits as f64 / merged as f64)
}

/// ksmd CPU-seconds per GiB·minute saved (`None` when nothing was saved).
pub fn cpu_per_saved_gib_min(ksmd_cpu_s: f64, saved_mib_s: f64) -> Option<f64> {
    let gib_min = saved_mib_s / 1024.0 / 60.0;
    (gib_min > 0.0).then(|| ksmd_cpu_s / gib_min)
}

/// What a run on real guests left to them. Figures of the whole record (the machine's CPUs, the
/// guests' own CPU time, the other runs of the workload), beside the samples' [`Summary`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Footprint {
    /// Cores left to the guests: the machine's CPUs minus ksmd's average use over the window
    /// (`cpus - ksmd_cpu_s / window`).
    pub cores_left: Option<f64>,
    /// The cores the guests used: their QEMU processes' utime + stime (each read before it was
    /// stopped), summed, over the window.
    pub guests_cores: Option<f64>,
    /// Mean launch-to-ready time of the guests that became ready.
    pub ready_mean_s: Option<f64>,
    /// `ready_mean_s` over the ksm-off run's of the same workload (1 for ksm-off itself).
    pub ready_vs_ksm_off: Option<f64>,
}

/// `cpus - ksmd_cpu_s / window`.
pub fn cores_left(cpus: usize, ksmd_cpu_s: f64, window_s: f64) -> Option<f64> {
    (cpus > 0 && window_s > 0.0).then(|| cpus as f64 - ksmd_cpu_s / window_s)
}

/// The guests' CPU-seconds summed (those never launched left out) over the window.
pub fn guests_cores(cpu_s: &[Option<f64>], window_s: f64) -> Option<f64> {
    if window_s <= 0.0 || cpu_s.iter().all(Option::is_none) {
        return None;
    }
    Some(cpu_s.iter().flatten().sum::<f64>() / window_s)
}

/// The mean of the times that are known (`None` if none is).
pub fn mean_known(times: &[Option<f64>]) -> Option<f64> {
    let known: Vec<f64> = times.iter().flatten().copied().collect();
    (!known.is_empty()).then(|| known.iter().sum::<f64>() / known.len() as f64)
}

/// `value / reference`, `None` without both or with a reference of 0.
pub fn ratio_to(value: Option<f64>, reference: Option<f64>) -> Option<f64> {
    match (value, reference) {
        (Some(v), Some(r)) if r > 0.0 => Some(v / r),
        _ => None,
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

/// One mode's run on real guests, as the verdicts see it.
#[derive(Debug, Clone, Copy)]
pub struct VmRun<'a> {
    pub summary: &'a Summary,
    pub footprint: &'a Footprint,
}

/// Adaptive against throttle (and the kernel's advisor, if run) on real guests.
pub fn vm_targets(workload: &str, throttle: VmRun, adaptive: VmRun, advisor: Option<VmRun>) -> Vec<Verdict> {
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::INFINITY };
    let (t, a) = (throttle.summary, adaptive.summary);
    let saved = ratio(a.saved_mib_s, t.saved_mib_s);
    let cpu = ratio(a.ksmd_cpu_s, t.ksmd_cpu_s);
    let verdict =
        |target: String, measured: String, met: bool| Verdict { workload: workload.into(), target, measured, met };
    let saved_measured =
        format!("adaptive {:.0}, throttle {:.0} ({:.1} %)", a.saved_mib_s, t.saved_mib_s, saved * 100.0);
    let mut out = vec![
        verdict(
            format!("adaptive saved MiB·s >= {:.0} % of throttle's", VM_TARGET_FULL_SAVED_RATIO * 100.0),
            saved_measured.clone(),
            t.saved_mib_s > 0.0 && saved >= VM_TARGET_FULL_SAVED_RATIO,
        ),
        verdict(
            format!("adaptive saved MiB·s >= {:.0} % of throttle's", VM_TARGET_SAVED_RATIO * 100.0),
            saved_measured,
            t.saved_mib_s > 0.0 && saved >= VM_TARGET_SAVED_RATIO,
        ),
        verdict(
            format!("adaptive ksmd CPU <= {:.0} % of throttle's", VM_TARGET_CPU_RATIO * 100.0),
            format!("adaptive {:.2} CPU-s, throttle {:.2} CPU-s ({:.1} %)", a.ksmd_cpu_s, t.ksmd_cpu_s, cpu * 100.0),
            cpu <= VM_TARGET_CPU_RATIO,
        ),
    ];
    if let Some(adv) = advisor {
        let v = adv.summary;
        let adv_cpu = ratio(a.ksmd_cpu_s, v.ksmd_cpu_s);
        out.push(verdict(
            "adaptive beats the kernel's advisor on saved MiB·s and on ksmd CPU".into(),
            format!(
                "saved MiB·s {:.0} vs {:.0}, CPU-s {:.2} vs {:.2}",
                a.saved_mib_s, v.saved_mib_s, a.ksmd_cpu_s, v.ksmd_cpu_s
            ),
            a.saved_mib_s >= v.saved_mib_s && a.ksmd_cpu_s <= v.ksmd_cpu_s,
        ));
        out.push(verdict(
            format!("adaptive ksmd CPU-s <= {:.0} % of the advisor's", VM_TARGET_ADVISOR_CPU_RATIO * 100.0),
            format!("adaptive {:.2} CPU-s, advisor {:.2} CPU-s ({:.1} %)", a.ksmd_cpu_s, v.ksmd_cpu_s, adv_cpu * 100.0),
            adv_cpu <= VM_TARGET_ADVISOR_CPU_RATIO,
        ));
        let cores = |c: Option<f64>| c.map_or("?".to_string(), |c| format!("{c:.3}"));
        let (mine, theirs) = (adaptive.footprint.cores_left, adv.footprint.cores_left);
        out.push(verdict(
            format!("adaptive leaves the guests as many cores as the advisor (within {VM_TARGET_CORES_SLACK})"),
            format!("cores left: adaptive {}, advisor {}", cores(mine), cores(theirs)),
            matches!((mine, theirs), (Some(m), Some(t)) if m >= t - VM_TARGET_CORES_SLACK),
        ));
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
            pages_scanned: None,
            ksm_zero_pages: None,
            pages_skipped: None,
        }
    }

    /// A sample with the visit counters: `scanned` pages visited so far, `zero` zero pages.
    fn v(t: f64, pages_sharing: u64, scanned: u64, zero: u64) -> Sample {
        Sample {
            pages_scanned: Some(scanned),
            ksm_zero_pages: Some(zero),
            pages_skipped: Some(scanned / 10),
            ..s(t, pages_sharing, 0, "x", &[])
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
            pages_visited: None,
            pages_skipped: None,
            peak_merged_pages: 0,
            visits_per_merged: None,
            ksmd_cpu_s_per_saved_gib_min: None,
        }
    }

    #[test]
    fn visits_are_counted_from_the_first_sample_to_the_window_end_per_peak_merged_page() {
        // pages_scanned starts at 5000 (earlier runs), then 1000 visits a second; the peak of
        // pages_sharing + zero pages is 300 + 100 at 2 s, more than the final 350 + 0.
        let samples = [v(0.0, 0, 5_000, 0), v(1.0, 100, 6_000, 0), v(2.0, 300, 7_000, 100), v(3.0, 350, 8_000, 0)];
        let sum = summarize(&samples, &[], scale(1000, 2.5));
        assert_eq!(sum.pages_visited, Some(2_500), "interpolated at the window's end, less the start");
        assert_eq!(sum.pages_skipped, Some(250));
        assert_eq!(sum.peak_merged_pages, 400);
        assert_eq!(sum.visits_per_merged, Some(2_500.0 / 400.0));
        let sum = summarize(&samples, &[], scale(1000, 10.0));
        assert_eq!(sum.pages_visited, Some(3_000), "sampling ended: the last sample's");
        assert_eq!(sum.peak_merged_pages, 400, "the peak, not the final 350");
        assert_eq!(sum.visits_per_merged.map(|x| x / VISIT_FLOOR), Some(3.75), "3.75 x the floor of 2");

        let old = [s(0.0, 0, 0, "x", &[]), s(1.0, 10, 0, "x", &[])];
        let sum = summarize(&old, &[], scale(1, 10.0));
        assert_eq!((sum.pages_visited, sum.visits_per_merged), (None, None), "no pages_scanned: unknown, not 0");
        assert_eq!(sum.peak_merged_pages, 10, "zero pages unknown: pages_sharing alone");
        let mut gap = samples.to_vec();
        gap[1].pages_scanned = None;
        assert_eq!(counted_over_window(&gap, 10.0, |s| s.pages_scanned), None, "a gap makes it unknown");
        let unmerged = [v(0.0, 0, 0, 0), v(1.0, 0, 900, 0)];
        assert_eq!(summarize(&unmerged, &[], scale(1, 10.0)).visits_per_merged, None, "nothing merged: no ratio");
        assert_eq!(per_merged_page(900, 0), None);
        assert_eq!(per_merged_page(900, 300), Some(3.0));
    }

    #[test]
    fn ksmd_cpu_per_saved_gib_minute() {
        // 1 GiB held for a minute is 1024 x 60 MiB·s: 3 CPU-s for it is 3 per GiB·min.
        assert_eq!(cpu_per_saved_gib_min(3.0, 1024.0 * 60.0), Some(3.0));
        assert_eq!(cpu_per_saved_gib_min(3.0, 512.0 * 30.0), Some(12.0));
        assert_eq!(cpu_per_saved_gib_min(3.0, 0.0), None, "nothing saved: no ratio");
        // Through summarize: 100 MiB for 10 s after a linear ramp of 10 s = 1500 MiB·s, 2 CPU-s.
        let samples = [
            s(0.0, 0, 0, "x", &[]),
            s(10.0, PAGES_PER_MIB * 100, 1000, "x", &[]),
            s(20.0, PAGES_PER_MIB * 100, 2000, "x", &[]),
        ];
        let sum = summarize(&samples, &[], scale(1, 20.0));
        let want = 2.0 / (1500.0 / 1024.0 / 60.0);
        let got = sum.ksmd_cpu_s_per_saved_gib_min.expect("saved");
        assert!((got - want).abs() < 1e-9, "{got} != {want}");
    }

    #[test]
    fn cores_left_guests_cores_and_the_ready_ratio() {
        assert_eq!(cores_left(4, 60.0, 240.0), Some(3.75));
        assert_eq!(cores_left(2, 0.0, 45.0), Some(2.0));
        assert_eq!(cores_left(0, 1.0, 45.0), None, "CPUs unknown");
        // Two guests of 30 and 90 CPU-s, one never launched, over 240 s: half a core.
        assert_eq!(guests_cores(&[Some(30.0), Some(90.0), None], 240.0), Some(0.5));
        assert_eq!(guests_cores(&[None, None], 240.0), None);
        assert_eq!(guests_cores(&[], 240.0), None);
        assert_eq!(mean_known(&[Some(10.0), Some(20.0), None]), Some(15.0), "the ones that became ready");
        assert_eq!(mean_known(&[None]), None);
        assert_eq!(ratio_to(Some(15.0), Some(12.0)), Some(1.25));
        assert_eq!(ratio_to(Some(15.0), None), None);
        assert_eq!(ratio_to(None, Some(12.0)), None);
        assert_eq!(ratio_to(Some(15.0), Some(0.0)), None);
    }

    type Run = (Summary, Footprint);

    fn run(r: &Run) -> VmRun<'_> {
        VmRun { summary: &r.0, footprint: &r.1 }
    }

    fn vm(saved: f64, cpu: f64, cores_left: Option<f64>) -> Run {
        (Summary { saved_mib_s: saved, ..summary(None, cpu, &[]) }, Footprint { cores_left, ..Footprint::default() })
    }

    #[test]
    fn vm_targets_are_judged_on_saved_memory_cpu_and_cores_against_throttle_and_the_advisor() {
        let throttle = vm(1000.0, 20.0, Some(1.9));
        let judge = |adaptive: Run, advisor: Option<Run>| -> Vec<bool> {
            vm_targets("v", run(&throttle), run(&adaptive), advisor.as_ref().map(run)).iter().map(|v| v.met).collect()
        };
        // [>= 100 % saved, >= 95 % saved, <= 50 % of throttle's CPU, beats the advisor,
        //  <= 50 % of the advisor's CPU, as many cores as the advisor]
        assert_eq!(
            judge(vm(1000.0, 10.0, Some(1.96)), Some(vm(900.0, 20.0, Some(2.0)))),
            [true, true, true, true, true, true]
        );
        assert_eq!(
            judge(vm(999.0, 10.1, Some(1.94)), Some(vm(998.0, 20.0, Some(2.0)))),
            [false, true, false, true, false, false],
            "99.9 % saved, 50.5 % of both CPUs, 0.06 fewer cores"
        );
        assert_eq!(
            judge(vm(949.0, 10.0, Some(1.91)), Some(vm(960.0, 5.0, Some(1.95)))),
            [false, false, true, false, false, true]
        );
        assert!(!judge(vm(1000.0, 1.0, None), Some(vm(1.0, 5.0, Some(2.0))))[5], "cores unknown: not met");
        let alone = vm(1.0, 1.0, Some(2.0));
        assert_eq!(vm_targets("v", run(&throttle), run(&alone), None).len(), 3, "no advisor run: no verdict on it");
        let (nothing, zero) = (vm(0.0, 1.0, Some(2.0)), vm(0.0, 0.0, Some(2.0)));
        let none_saved = vm_targets("v", run(&nothing), run(&zero), None);
        assert!(!none_saved[0].met && !none_saved[1].met, "nothing saved proves nothing");
        assert!(none_saved[0].target.contains("100 %") && none_saved[1].target.contains("95 %"));
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
