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

/// The share of pages_sharing that the workload's live processes hold: their merged pages
/// (`ksm_merging_pages`, 0 once gone) over all that KSM counts merged (pages_shared +
/// pages_sharing). Once ksmd stops, the rmap items of a process that exited stay counted until
/// it runs again: without this, a mode that stops ksmd while sandboxes come and go is credited
/// with memory no one holds. 1 where no process is followed; at most 1 (the two are read a
/// moment apart).
pub fn live_share(s: &Sample) -> f64 {
    let merged = s.pages_sharing + s.pages_shared;
    if s.merging.is_empty() || merged == 0 {
        return 1.0;
    }
    (s.merging.iter().sum::<u64>() as f64 / merged as f64).min(1.0)
}

/// pages_sharing as the live processes hold it ([`live_share`]): what is saved.
pub fn live_pages_sharing(s: &Sample) -> f64 {
    s.pages_sharing as f64 * live_share(s)
}

/// Memory saved over time, MiB x seconds: the area under [`live_pages_sharing`] from 0 to
/// `window`.
pub fn saved_mib_s(samples: &[Sample], page_size: u64, window: f64) -> f64 {
    let mib = |s: &Sample| live_pages_sharing(s) * page_size as f64 / MIB;
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
mod tests;
