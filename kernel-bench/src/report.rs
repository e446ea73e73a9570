//! What a benchmark run leaves: one record per mode and workload (kept as JSON), and the tables
//! printed from them.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::analysis::{self, Scale, Start, Summary, Verdict};
use crate::sample::Sample;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    pub mode: String,
    pub workload: String,
    pub procs: u32,
    pub size_mib: u64,
    pub unique_fraction: f64,
    pub stagger_s: f64,
    pub window_s: f64,
    pub max_pages_sharing: u64,
    pub shared_pages_per_process: u64,
    pub page_size: u64,
    /// Kicks sent, and the daemon's KickCount at the end (runs with a daemon).
    pub kicks: u32,
    pub kick_count: Option<u64>,
    /// 1-minute load average before and after the run: other work on the machine.
    pub load_before: Option<f64>,
    pub load_after: Option<f64>,
    /// How long the clean start's unmerge (`run` = 2) took.
    pub unmerge_s: f64,
    pub starts: Vec<Start>,
    pub summary: Summary,
    pub daemon_log: Option<String>,
    /// Real guests: each one's seconds from launch to ready (`None`: not within the window).
    #[serde(default)]
    pub ready_s: Vec<Option<f64>>,
    /// ksmd's CPU-seconds over the window as the daemon reported them (its KsmdCpuSeconds at
    /// the window's start and end), beside the benchmark's own schedstat reading.
    #[serde(default)]
    pub daemon_ksmd_cpu_s: Option<f64>,
    pub samples: Vec<Sample>,
}

impl RunRecord {
    pub fn scale(&self) -> Scale {
        Scale {
            max_pages_sharing: self.max_pages_sharing,
            shared_pages_per_process: self.shared_pages_per_process,
            page_size: self.page_size,
            window_s: self.window_s,
        }
    }

    /// The summary again from the recorded samples (after the analysis has changed).
    pub fn resummarize(&mut self) {
        self.summary = analysis::summarize(&self.samples, &self.starts, self.scale());
    }

    /// The slowest process to merge after the first (which has no peer until the second starts).
    /// Whether the knobs (run, pages_to_scan, sleep_millisecs) ever differed from the first
    /// sample's over the window.
    pub fn knobs_written(&self) -> bool {
        let Some(first) = self.samples.first() else { return false };
        self.samples.iter().any(|s| {
            (s.run, s.pages_to_scan, s.sleep_millisecs) != (first.run, first.pages_to_scan, first.sleep_millisecs)
        })
    }

    /// The benchmark's own ksmd CPU-seconds over the window (the last sample's).
    pub fn bench_ksmd_cpu_s(&self) -> f64 {
        self.samples.last().map_or(0.0, |s| s.ksmd_cpu_ns as f64 / 1e9)
    }

    pub fn slowest_new_process(&self) -> Option<Option<f64>> {
        let later: Vec<Option<f64>> = self.summary.process_merged_s.iter().skip(1).copied().collect();
        if later.is_empty() {
            return None;
        }
        Some(later.iter().try_fold(0.0f64, |w, t| t.map(|t| w.max(t))))
    }
}

fn secs(t: Option<f64>, window: f64) -> String {
    t.map_or_else(|| format!("> {window:.0}"), |t| format!("{t:.1}"))
}

fn slowest(r: &RunRecord) -> String {
    match r.slowest_new_process() {
        None => "-".into(),
        Some(t) => secs(t, r.window_s),
    }
}

const COLUMNS: usize = 9;
const HEAD: [&str; COLUMNS] = [
    "workload",
    "mode",
    "50 % (s)",
    "90 % (s)",
    "95 % (s)",
    "ksmd CPU-s to 95 %",
    "ksmd CPU-s in window",
    "saved MiB·s",
    "slowest new process (s)",
];

fn row(r: &RunRecord) -> [String; COLUMNS] {
    let s = &r.summary;
    [
        r.workload.clone(),
        r.mode.clone(),
        secs(s.t50, r.window_s),
        secs(s.t90, r.window_s),
        secs(s.t95, r.window_s),
        s.ksmd_cpu_to_t95_s.map_or("-".into(), |c| format!("{c:.2}")),
        format!("{:.2}", s.ksmd_cpu_s),
        format!("{:.0}", s.saved_mib_s),
        slowest(r),
    ]
}

/// An aligned plain-text table.
pub fn text_table(records: &[RunRecord]) -> String {
    aligned(&HEAD, &records.iter().map(row).collect::<Vec<_>>())
}

/// `rows` under `head`, each column as wide as its widest cell.
fn aligned<const N: usize>(head: &[&str; N], rows: &[[String; N]]) -> String {
    let width =
        |i: usize| rows.iter().map(|r| r[i].chars().count()).chain([head[i].chars().count()]).max().unwrap_or(0);
    let widths: Vec<usize> = (0..N).map(width).collect();
    let mut out = String::new();
    let line = |out: &mut String, cells: &[&str]| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        let _ = writeln!(out, "{}", padded.join("  ").trim_end());
    };
    line(&mut out, head);
    for r in rows {
        line(&mut out, &r.iter().map(String::as_str).collect::<Vec<_>>());
    }
    out
}

/// The same table in Markdown, for the README.
pub fn markdown_table(records: &[RunRecord]) -> String {
    let mut out = format!("| {} |\n|{}\n", HEAD.join(" | "), "---|".repeat(HEAD.len()));
    for r in records {
        let _ = writeln!(out, "| {} |", row(r).join(" | "));
    }
    out
}

/// Steps, per-process times and load, one block per run.
pub fn details(records: &[RunRecord]) -> String {
    let mut out = String::new();
    for r in records {
        let s = &r.summary;
        let steps: Vec<String> = s.steps.iter().map(|st| format!("{} at {:.1}", st.setting, st.t)).collect();
        let procs: Vec<String> = s.process_merged_s.iter().map(|t| secs(*t, r.window_s)).collect();
        let load = |l: Option<f64>| l.map_or("?".into(), |l| format!("{l:.2}"));
        let _ = writeln!(
            out,
            "{} / {}: {} full scans, max {:.1} % merged, load {} -> {}, kicks {}{}\n  settings: {}\n  per process merged (s from its start): {}",
            r.workload,
            r.mode,
            s.full_scans,
            s.max_merged * 100.0,
            load(r.load_before),
            load(r.load_after),
            r.kicks,
            r.kick_count.map_or(String::new(), |k| format!(" (daemon counted {k})")),
            steps.join(", "),
            procs.join(" "),
        );
        if let Some(d) = r.daemon_ksmd_cpu_s {
            let own = r.bench_ksmd_cpu_s();
            let diff = if own > 0.0 { format!("{:+.2} %", (d - own) / own * 100.0) } else { "-".into() };
            let _ = writeln!(
                out,
                "  ksmd CPU-s over the window: daemon's KsmdCpuSeconds {d:.3}, benchmark's schedstat {own:.3} ({diff}); knobs written: {}",
                if r.knobs_written() { "yes" } else { "no" }
            );
        }
    }
    out
}

/// pages_sharing at the end of the window (the last sample within it).
pub fn final_pages_sharing(r: &RunRecord) -> u64 {
    r.samples.iter().rev().find(|s| s.t <= r.window_s).map_or(0, |s| s.pages_sharing)
}

/// Launch-to-ready times as `median / max` seconds, `-` for none, `>` past the window.
pub fn ready_range(ready: &[Option<f64>]) -> String {
    if ready.is_empty() {
        return "-".into();
    }
    if ready.iter().any(Option::is_none) {
        let n = ready.iter().filter(|r| r.is_some()).count();
        return format!("{n}/{} ready", ready.len());
    }
    let mut t: Vec<f64> = ready.iter().flatten().copied().collect();
    t.sort_by(f64::total_cmp);
    format!("{:.1} / {:.1}", t[t.len() / 2], t[t.len() - 1])
}

const VM_COLUMNS: usize = 10;
const VM_HEAD: [&str; VM_COLUMNS] = [
    "workload",
    "mode",
    "saved at end (MiB)",
    "50 % (s)",
    "90 % (s)",
    "95 % (s)",
    "ksmd CPU-s to 95 %",
    "ksmd CPU-s in window",
    "saved MiB·s",
    "launch to ready, median / max (s)",
];

fn vm_row(r: &RunRecord) -> [String; VM_COLUMNS] {
    let s = &r.summary;
    let mib = final_pages_sharing(r) as f64 * r.page_size as f64 / (1024.0 * 1024.0);
    [
        r.workload.clone(),
        r.mode.clone(),
        format!("{mib:.0}"),
        secs(s.t50, r.window_s),
        secs(s.t90, r.window_s),
        secs(s.t95, r.window_s),
        s.ksmd_cpu_to_t95_s.map_or("-".into(), |c| format!("{c:.2}")),
        format!("{:.2}", s.ksmd_cpu_s),
        format!("{:.0}", s.saved_mib_s),
        ready_range(&r.ready_s),
    ]
}

/// The real-guest table (times are to a share of the best final saving of any mode).
pub fn vm_markdown_table(records: &[RunRecord]) -> String {
    let mut out = format!("| {} |\n|{}\n", VM_HEAD.join(" | "), "---|".repeat(VM_COLUMNS));
    for r in records {
        let _ = writeln!(out, "| {} |", vm_row(r).join(" | "));
    }
    out
}

/// The real-guest table as aligned text, and each run's steps.
pub fn vm_table(records: &[RunRecord]) -> String {
    let mut out = aligned(&VM_HEAD, &records.iter().map(vm_row).collect::<Vec<_>>());
    for r in records {
        let steps: Vec<String> = r.summary.steps.iter().map(|st| format!("{} at {:.1}", st.setting, st.t)).collect();
        let _ = writeln!(
            out,
            "{} / {}: {} full scans, kicks {}, settings: {}",
            r.workload,
            r.mode,
            r.summary.full_scans,
            r.kick_count.map_or("-".into(), |k| k.to_string()),
            steps.join(", ")
        );
    }
    out
}

pub fn verdicts(verdicts: &[Verdict]) -> String {
    let mut out = String::new();
    for v in verdicts {
        let _ =
            writeln!(out, "[{}] {}: {} — {}", if v.met { "met" } else { "MISSED" }, v.workload, v.target, v.measured);
    }
    out
}
