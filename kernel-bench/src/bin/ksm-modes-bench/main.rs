//! ksm-modes-bench: every throttling mode on the real kernel, measured.
//!
//! For each workload (all at once; staggered) and mode (throttle and adaptive with the release
//! daemon on a private bus; the kernel's default knobs and flat out with no daemon) it starts from
//! a clean KSM, runs `ksm-workload`, kicks as Kata's trigger would, samples every 100 ms and
//! reports time to 50/90/95 % merged, ksmd CPU-seconds and memory saved over the window. The real
//! KSM is held under the project's lock and put back exactly as found, even when interrupted.

mod run;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use kata_ksm_throttler::io::meminfo;
use kernel_bench::analysis::{self, Verdict};
use kernel_bench::harness::{self, Bench, Interrupts, Machine};
use kernel_bench::modes::BenchMode;
use kernel_bench::pattern::Layout;
use kernel_bench::plot;
use kernel_bench::real_ksm::RealKsm;
use kernel_bench::report::{self, RunRecord};
use serde::{Deserialize, Serialize};

/// How long filling the workload's memory may take before the run is called failed.
const READY_LIMIT: Duration = Duration::from_secs(120);
const UNMERGE_LIMIT: Duration = Duration::from_secs(120);
/// The smoke's daemon timeline: compressed, but long enough for adaptive to step down first.
const SMOKE_DURATIONS: [&str; 6] =
    ["--aggressive-duration", "5s", "--standard-duration", "3s", "--slow-duration", "3s"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
enum WorkloadKind {
    /// Every process at once; one kick when all are ready.
    AllAtOnce,
    /// One process every --stagger; a kick as each is ready.
    Staggered,
}

impl WorkloadKind {
    fn name(self) -> &'static str {
        match self {
            WorkloadKind::AllAtOnce => "all-at-once",
            WorkloadKind::Staggered => "staggered",
        }
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (examples: 270s, 10s, 4m30s)"))
}

/// Runs every throttling mode on the real /sys/kernel/mm/ksm and measures merging and ksmd's CPU.
#[derive(Debug, Parser)]
#[command(name = "ksm-modes-bench", about)]
struct Args {
    /// A short run for CI: 2 processes x 16 MiB, 3 s stagger, 15 s window, compressed daemon
    /// timeline; fails unless every run merged and KSM was restored.
    #[arg(long)]
    smoke: bool,
    /// Workload processes [default: 8; smoke 2].
    #[arg(long)]
    procs: Option<u32>,
    /// MiB per process [default: 256; smoke 16].
    #[arg(long)]
    size_mib: Option<u64>,
    /// Fraction of each process's pages that are its own.
    #[arg(long, default_value_t = 0.0)]
    unique_fraction: f64,
    /// Each process writes its memory over this long after it starts (and is kicked), as a
    /// booting VM does; 0s: filled before its kick.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    ramp: Duration,
    /// Fraction of each process's pages rewritten with new content of its own every 5 s.
    #[arg(long, default_value_t = 0.0)]
    dirty_fraction: f64,
    /// Time between starts in the staggered workload [default: 10s; smoke 3s].
    #[arg(long, value_parser = parse_duration)]
    stagger: Option<Duration>,
    /// How long each run is measured [default: 270s; smoke 15s].
    #[arg(long, value_parser = parse_duration)]
    window: Option<Duration>,
    /// Modes to run, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "throttle,adaptive,kernel-default,flat-out")]
    modes: Vec<BenchMode>,
    /// Workloads to run, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "all-at-once,staggered")]
    workloads: Vec<WorkloadKind>,
    /// Where results.json, table.md, modes.png and the daemon logs go.
    #[arg(long, default_value = "ksm-bench-results")]
    out: PathBuf,
    /// The release daemon [default: kata-ksm-throttler beside this program].
    #[arg(long)]
    daemon: Option<PathBuf>,
    /// The workload generator [default: ksm-workload beside this program].
    #[arg(long)]
    workload_bin: Option<PathBuf>,
    /// Exit non-zero if adaptive misses one of issue 7's targets.
    #[arg(long)]
    enforce_targets: bool,
    /// Touch nothing: analyse a results.json again and write the table and plot into --out.
    #[arg(long, value_name = "FILE")]
    from_json: Option<PathBuf>,
}

/// Everything a run needs, resolved and checked before KSM is touched.
#[derive(Debug)]
struct Plan {
    smoke: bool,
    procs: u32,
    size_mib: u64,
    unique_fraction: f64,
    ramp: Duration,
    dirty_fraction: f64,
    stagger: Duration,
    window: Duration,
    modes: Vec<BenchMode>,
    workloads: Vec<WorkloadKind>,
    out: PathBuf,
    daemon: PathBuf,
    workload_bin: PathBuf,
    daemon_args: Vec<String>,
    layout: Layout,
    page_size: u64,
    enforce_targets: bool,
}

impl Plan {
    fn new(args: Args) -> Result<Plan> {
        let smoke = args.smoke;
        let pick = |given: Option<u64>, full: u64, small: u64| given.unwrap_or(if smoke { small } else { full });
        let procs = args.procs.unwrap_or(if smoke { 2 } else { 8 });
        if procs < 2 {
            bail!("--procs must be at least 2: one process has nothing to merge with");
        }
        let size_mib = pick(args.size_mib, 256, 16);
        let stagger = args.stagger.unwrap_or(Duration::from_secs(if smoke { 3 } else { 10 }));
        let window = args.window.unwrap_or(Duration::from_secs(if smoke { 15 } else { 270 }));
        if window < Duration::from_secs(1) {
            bail!("--window must be at least 1s");
        }
        let page_size = meminfo::page_size();
        let layout = Layout::with_dirty(size_mib, args.unique_fraction, args.dirty_fraction, page_size)?;
        if layout.shared_pages() == 0 {
            bail!("--unique-fraction {} leaves nothing to merge", args.unique_fraction);
        }
        let here = std::env::current_exe().context("finding this program")?;
        let beside = |name: &str| here.with_file_name(name);
        let daemon = args.daemon.unwrap_or_else(|| beside("kata-ksm-throttler"));
        let workload_bin = args.workload_bin.unwrap_or_else(|| beside("ksm-workload"));
        if args.modes.iter().any(|m| m.daemon_mode().is_some()) {
            if !daemon.is_file() {
                bail!("no daemon at {}: build it with `cargo build --release --workspace`", daemon.display());
            }
            if !daemon.components().any(|c| c.as_os_str() == "release") {
                bail!("{} is not a release build: the benchmark measures the release daemon", daemon.display());
            }
        }
        if !workload_bin.is_file() {
            bail!(
                "no workload generator at {}: build it with `cargo build --release --workspace`",
                workload_bin.display()
            );
        }
        if args.modes.is_empty() || args.workloads.is_empty() {
            bail!("nothing to run: --modes and --workloads need at least one each");
        }
        let daemon_args = if smoke { SMOKE_DURATIONS.iter().map(|s| s.to_string()).collect() } else { vec![] };
        Ok(Plan {
            smoke,
            procs,
            size_mib,
            unique_fraction: args.unique_fraction,
            ramp: args.ramp,
            dirty_fraction: args.dirty_fraction,
            stagger,
            window,
            modes: args.modes,
            workloads: args.workloads,
            out: args.out,
            daemon,
            workload_bin,
            daemon_args,
            layout,
            page_size,
            enforce_targets: args.enforce_targets,
        })
    }

    fn max_pages_sharing(&self) -> u64 {
        self.layout.max_pages_sharing(u64::from(self.procs))
    }
}

fn main() -> ExitCode {
    harness::main::<ModesBench>(|| run(Args::parse()))
}

fn run(args: Args) -> Result<ExitCode> {
    if let Some(json) = &args.from_json {
        plot::register_font(plot::DEJAVU_SANS)?;
        harness::reanalyse::<ModesBench>(json, &args.out)?;
        return Ok(ExitCode::SUCCESS);
    }
    let plan = Plan::new(args)?;
    plot::register_font(plot::DEJAVU_SANS)?;
    std::fs::create_dir_all(&plan.out).with_context(|| format!("creating {}", plan.out.display()))?;
    harness::block_on(main_async(plan))?
}

async fn main_async(plan: Plan) -> Result<ExitCode> {
    // The lock first (a Ctrl-C while waiting for it just ends us: nothing is changed yet), then
    // the signal handlers, before anything is written.
    let mut real = RealKsm::take()?;
    let mut interrupts = Interrupts::catch()?;
    eprintln!("real KSM as found: {:?} (restored at the end)", real.found());
    if plan.smoke {
        // A smoke run checks the machinery; with smart_scan on, whether its two processes merge
        // at all is a lottery of scan phases (see kernel_bench::real_ksm).
        real.smart_scan_off()?;
        eprintln!("smoke: smart_scan off for the run");
    }

    let mut records = vec![];
    let outcome = interrupts.around(bench(&plan, &real, &mut records)).await;
    // Whatever was running (daemon, bus, workload) went with the bench future.
    let restored = harness::restore(real);
    harness::conclude::<ModesBench>(
        &plan.out,
        Meta::now(&plan),
        &mut records,
        outcome,
        restored,
        plan.smoke,
        plan.enforce_targets,
    )
}

async fn bench(plan: &Plan, real: &RealKsm, records: &mut Vec<RunRecord>) -> Result<()> {
    let said = |record: &RunRecord| {
        let s = &record.summary;
        eprintln!(
            "   95 % merged at {:?} s, ksmd {:.2} CPU-s, saved {:.0} MiB·s",
            s.t95.map(|t| (t * 10.0).round() / 10.0),
            s.ksmd_cpu_s,
            s.saved_mib_s
        );
    };
    harness::run_all::<ModesBench, _>(
        &plan.workloads,
        &plan.modes,
        WorkloadKind::name,
        records,
        async |workload, mode| run::run_one(plan, real, mode, workload).await,
        said,
        |records| harness::save::<ModesBench>(&plan.out, Meta::now(plan), records),
    )
    .await
}

/// What ksm-modes-bench adds to the shared skeleton.
struct ModesBench;

impl Bench for ModesBench {
    const NAME: &'static str = "ksm-modes-bench";
    const PLOT: &'static str = "modes.png";
    type Meta = Meta;

    fn title(meta: &Meta) -> String {
        format!(
            "KSM modes on the real kernel: {} processes x {} MiB, {:.0} s window, staggered every {:.0} s",
            meta.procs, meta.size_mib, meta.window_s, meta.stagger_s
        )
    }

    fn markdown_table(records: &[RunRecord]) -> String {
        report::markdown_table(records)
    }

    fn print_tables(records: &[RunRecord]) {
        println!("{}", report::text_table(records));
        println!("{}", report::details(records));
    }

    fn verdicts(records: &[RunRecord]) -> Vec<Verdict> {
        let mut out = vec![];
        let mut workloads: Vec<&str> = records.iter().map(|r| r.workload.as_str()).collect();
        workloads.dedup();
        for w in workloads {
            let find = |m: &str| records.iter().find(|r| r.workload == w && r.mode == m);
            if let (Some(t), Some(a)) = (find("throttle"), find("adaptive")) {
                out.extend(analysis::targets(w, &t.summary, &a.summary, w == "staggered"));
            }
        }
        out
    }

    fn smoke_problems(meta: &Meta, records: &[RunRecord]) -> Vec<String> {
        smoke_problems(meta, records)
    }

    fn reanalysed(_machine: &Machine, runs: &mut [RunRecord]) {
        for r in runs {
            r.resummarize();
        }
    }
}

fn smoke_problems(_meta: &Meta, records: &[RunRecord]) -> Vec<String> {
    let mut problems = vec![];
    for r in records {
        let name = format!("{} / {}", r.workload, r.mode);
        // A closed gate merges nothing by design.
        if r.mode != "kernel-default" && r.mode != "gate-closed" && r.summary.t95.is_none() {
            problems.push(format!("{name}: never 95 % merged (max {:.1} %)", r.summary.max_merged * 100.0));
        }
        if let Some(count) = r.kick_count {
            if count != u64::from(r.kicks) {
                problems.push(format!("{name}: sent {} kicks, the daemon counted {count}", r.kicks));
            }
            if r.mode != "gate-closed" && !r.summary.steps.iter().any(|s| s.setting == "aggressive") {
                problems.push(format!("{name}: the daemon never went aggressive"));
            }
        }
    }
    problems
}

/// How a benchmark was run; kept with its results, after the machine.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Meta {
    procs: u32,
    size_mib: u64,
    unique_fraction: f64,
    stagger_s: f64,
    window_s: f64,
    smoke: bool,
}

impl Meta {
    fn now(plan: &Plan) -> Meta {
        Meta {
            procs: plan.procs,
            size_mib: plan.size_mib,
            unique_fraction: plan.unique_fraction,
            stagger_s: plan.stagger.as_secs_f64(),
            window_s: plan.window.as_secs_f64(),
            smoke: plan.smoke,
        }
    }
}
