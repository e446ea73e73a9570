//! ksm-modes-bench: every throttling mode on the real kernel, measured.
//!
//! For each workload (all at once; staggered) and mode (throttle and adaptive with the release
//! daemon on a private bus; the kernel's default knobs and flat out with no daemon) it starts from
//! a clean KSM, runs `ksm-workload`, kicks as Kata's trigger would, samples every 100 ms and
//! reports time to 50/90/95 % merged, ksmd CPU-seconds and memory saved over the window. The real
//! KSM is held under the project's lock and put back exactly as found, even when interrupted.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, ExitCode, ExitStatus, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, ValueEnum};
use kata_ksm_throttler::io::meminfo;
use kata_ksm_throttler_test_support::child::{ensure_gone, Guarded};
use kernel_bench::analysis::{self, Scale, Start, Verdict};
use kernel_bench::daemon::DaemonRun;
use kernel_bench::modes::BenchMode;
use kernel_bench::pattern::Layout;
use kernel_bench::plot;
use kernel_bench::real_ksm::RealKsm;
use kernel_bench::report::{self, RunRecord};
use kernel_bench::sample::{load_average, merging_pages, Sample, Sampler};
use serde::{Deserialize, Serialize};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio::time::{interval_at, timeout, Instant, MissedTickBehavior};

const SAMPLE_EVERY: Duration = Duration::from_millis(100);
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
    let args = Args::parse();
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ksm-modes-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<ExitCode> {
    if let Some(json) = &args.from_json {
        plot::register_font(plot::DEJAVU_SANS)?;
        reanalyse(json, &args.out)?;
        return Ok(ExitCode::SUCCESS);
    }
    let plan = Plan::new(args)?;
    plot::register_font(plot::DEJAVU_SANS)?;
    std::fs::create_dir_all(&plan.out).with_context(|| format!("creating {}", plan.out.display()))?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("tokio runtime")?;
    runtime.block_on(main_async(plan))
}

async fn main_async(plan: Plan) -> Result<ExitCode> {
    // The lock first (a Ctrl-C while waiting for it just ends us: nothing is changed yet), then
    // the signal handlers, before anything is written.
    let mut real = RealKsm::take()?;
    let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    eprintln!("real KSM as found: {:?} (restored at the end)", real.found());
    if plan.smoke {
        // A smoke run checks the machinery; with smart_scan on, whether its two processes merge
        // at all is a lottery of scan phases (see kernel_bench::real_ksm).
        real.smart_scan_off()?;
        eprintln!("smoke: smart_scan off for the run");
    }

    let mut records = vec![];
    let outcome = tokio::select! {
        r = bench(&plan, &real, &mut records) => r,
        _ = sigint.recv() => Err(anyhow!("interrupted by SIGINT")),
        _ = sigterm.recv() => Err(anyhow!("interrupted by SIGTERM")),
        _ = sighup.recv() => Err(anyhow!("interrupted by SIGHUP")),
    };
    // Whatever was running (daemon, bus, workload) went with the bench future.
    let restored = real.restore();
    match &restored {
        Ok(()) => eprintln!("real KSM restored exactly as found: {:?}", real.found()),
        Err(e) => eprintln!("COULD NOT RESTORE the real KSM: {e}"),
    }
    drop(real);

    let verdicts = verdicts(&records);
    if !records.is_empty() {
        save(&plan, &records, &verdicts)?;
        println!("{}", report::text_table(&records));
        println!("{}", report::details(&records));
        print!("{}", report::verdicts(&verdicts));
        println!("results in {}", plan.out.display());
    }
    outcome?;
    restored?;
    let mut failed = false;
    if plan.smoke {
        for problem in smoke_problems(&records) {
            eprintln!("smoke: {problem}");
            failed = true;
        }
    }
    if plan.enforce_targets && verdicts.iter().any(|v| !v.met) {
        eprintln!("adaptive missed a target (--enforce-targets)");
        failed = true;
    }
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

async fn bench(plan: &Plan, real: &RealKsm, records: &mut Vec<RunRecord>) -> Result<()> {
    for &workload in &plan.workloads {
        for &mode in &plan.modes {
            eprintln!("== {} / {} (load {:?})", workload.name(), mode.name(), load_average());
            let record = run_one(plan, real, mode, workload)
                .await
                .with_context(|| format!("{} / {}", workload.name(), mode.name()))?;
            let s = &record.summary;
            eprintln!(
                "   95 % merged at {:?} s, ksmd {:.2} CPU-s, saved {:.0} MiB·s",
                s.t95.map(|t| (t * 10.0).round() / 10.0),
                s.ksmd_cpu_s,
                s.saved_mib_s
            );
            records.push(record);
            // Keep what is done, in case a later run fails or is interrupted.
            save(plan, records, &verdicts(records))?;
        }
    }
    Ok(())
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

fn smoke_problems(records: &[RunRecord]) -> Vec<String> {
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

/// How a benchmark was run; kept with its results.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Meta {
    command: Vec<String>,
    unix_time: u64,
    kernel: String,
    cpus: usize,
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
            command: std::env::args().collect(),
            unix_time: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned(),
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            procs: plan.procs,
            size_mib: plan.size_mib,
            unique_fraction: plan.unique_fraction,
            stagger_s: plan.stagger.as_secs_f64(),
            window_s: plan.window.as_secs_f64(),
            smoke: plan.smoke,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Results {
    #[serde(flatten)]
    meta: Meta,
    verdicts: Vec<Verdict>,
    runs: Vec<RunRecord>,
}

fn save(plan: &Plan, records: &[RunRecord], verdicts: &[Verdict]) -> Result<()> {
    write_results(&plan.out, Meta::now(plan), records, verdicts)
}

fn write_results(out: &Path, meta: Meta, records: &[RunRecord], verdicts: &[Verdict]) -> Result<()> {
    let title = format!(
        "KSM modes on the real kernel: {} processes x {} MiB, {:.0} s window, staggered every {:.0} s",
        meta.procs, meta.size_mib, meta.window_s, meta.stagger_s
    );
    let results = Results { meta, verdicts: verdicts.to_vec(), runs: records.to_vec() };
    let json = out.join("results.json");
    let file = File::create(&json).with_context(|| format!("creating {}", json.display()))?;
    serde_json::to_writer(std::io::BufWriter::new(file), &results).context("writing results.json")?;
    let md = format!("{}\n{}", report::markdown_table(records), report::verdicts(verdicts));
    std::fs::write(out.join("table.md"), md).context("writing table.md")?;
    plot::draw(records, &out.join("modes.png"), &title)?;
    Ok(())
}

/// `--from-json`: the same report from recorded samples, with the current analysis.
fn reanalyse(json: &Path, out: &Path) -> Result<()> {
    let file = File::open(json).with_context(|| format!("opening {}", json.display()))?;
    let mut results: Results = serde_json::from_reader(std::io::BufReader::new(file))
        .with_context(|| format!("{} is not a ksm-modes-bench results.json", json.display()))?;
    for r in &mut results.runs {
        r.resummarize();
    }
    let verdicts = verdicts(&results.runs);
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    write_results(out, results.meta, &results.runs, &verdicts)?;
    println!("{}", report::text_table(&results.runs));
    println!("{}", report::details(&results.runs));
    print!("{}", report::verdicts(&verdicts));
    println!("results in {}", out.display());
    Ok(())
}

enum WorkloadEvent {
    Ready { index: u32, pid: u32 },
    Closed,
}

/// A running `ksm-workload`: its `ready` lines as events; closing its input ends it.
struct WorkloadRun {
    process: Guarded,
    input: Option<ChildStdin>,
    events: mpsc::UnboundedReceiver<WorkloadEvent>,
    workers: Vec<u32>,
}

impl WorkloadRun {
    fn spawn(plan: &Plan, kind: WorkloadKind) -> Result<WorkloadRun> {
        let stagger = match kind {
            WorkloadKind::AllAtOnce => "0s".to_string(),
            WorkloadKind::Staggered => format!("{}ms", plan.stagger.as_millis()),
        };
        let mut child = Command::new(&plan.workload_bin)
            .args(["--procs", &plan.procs.to_string(), "--size-mib", &plan.size_mib.to_string()])
            .args(["--unique-fraction", &plan.unique_fraction.to_string(), "--stagger", &stagger])
            .args(["--ramp", &format!("{}ms", plan.ramp.as_millis())])
            .args(["--dirty-fraction", &plan.dirty_fraction.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {}", plan.workload_bin.display()))?;
        let input = child.stdin.take();
        let output = child.stdout.take().context("workload output")?;
        let process = Guarded::new(child, "ksm-workload");
        let (tx, events) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(output).lines() {
                let Ok(line) = line else { break };
                let mut words = line.split_whitespace();
                match (words.next(), words.next(), words.next()) {
                    (Some("ready"), Some(index), Some(pid)) => {
                        if let (Ok(index), Ok(pid)) = (index.parse(), pid.parse()) {
                            let _ = tx.send(WorkloadEvent::Ready { index, pid });
                            continue;
                        }
                    }
                    // A ramp's end: the samples show it.
                    (Some("filled"), Some(_), Some(_)) => continue,
                    _ => {}
                }
                eprintln!("ksm-workload said {line:?}");
            }
            let _ = tx.send(WorkloadEvent::Closed);
        });
        Ok(WorkloadRun { process, input, events, workers: vec![] })
    }

    /// Closes its input and waits for it and every worker to be gone.
    fn finish(&mut self) -> Result<Option<ExitStatus>> {
        drop(self.input.take());
        // Freeing gigabytes takes a moment; then SIGTERM, then SIGKILL.
        let status = match self.process.wait_for(Duration::from_secs(30))? {
            Some(s) => Some(s),
            None => self.process.stop(Duration::from_secs(5))?,
        };
        for &pid in &self.workers {
            ensure_gone(pid, "ksm-workload", Duration::from_secs(10));
        }
        Ok(status)
    }
}

impl Drop for WorkloadRun {
    fn drop(&mut self) {
        if let Err(e) = self.finish() {
            eprintln!("ending the workload: {e}");
        }
    }
}

async fn run_one(plan: &Plan, real: &RealKsm, mode: BenchMode, kind: WorkloadKind) -> Result<RunRecord> {
    let unmerge = real.clean(UNMERGE_LIMIT)?;
    let load_before = load_average();
    let sampler = Sampler::new(real.ksm().clone())?;
    let log = plan.out.join(format!("{}-{}-daemon.log", kind.name(), mode.name()));
    let mut daemon_args = plan.daemon_args.clone();
    if let Some(config) = mode.daemon_config() {
        let path = plan.out.join(format!("{}-{}-config.toml", kind.name(), mode.name()));
        std::fs::write(&path, config).with_context(|| format!("writing {}", path.display()))?;
        daemon_args.extend(["--config".to_owned(), path.display().to_string()]);
    } else {
        // Hermetic: not the host's configuration.
        daemon_args.extend(["--config".to_owned(), "/nonexistent/kata-ksm-throttler/config.toml".to_owned()]);
    }
    let daemon = match mode.daemon_mode() {
        Some(m) => Some(DaemonRun::start(&plan.daemon, m, &daemon_args, log.clone()).await?),
        None => None,
    };
    let mut workload = WorkloadRun::spawn(plan, kind)?;

    // Ready: all of them (all at once) or the first (staggered).
    let mut ready: Vec<(u32, u32, Instant)> = vec![];
    let need = match kind {
        WorkloadKind::AllAtOnce => plan.procs as usize,
        WorkloadKind::Staggered => 1,
    };
    while ready.len() < need {
        match timeout(READY_LIMIT, workload.events.recv()).await {
            Ok(Some(WorkloadEvent::Ready { index, pid })) => {
                workload.workers.push(pid);
                ready.push((index, pid, Instant::now()));
            }
            Ok(Some(WorkloadEvent::Closed) | None) => bail!("the workload ended before it was ready"),
            Err(_) => bail!("the workload was not ready within {READY_LIMIT:?}"),
        }
    }

    let t0 = Instant::now();
    let cpu0 = sampler.read()?.ksmd_cpu_ns;
    // The daemon's own figure at the same instant, for the comparison with the benchmark's.
    let daemon_cpu0 = match &daemon {
        Some(d) => Some(d.proxy.ksmd_cpu_seconds().await.context("reading KsmdCpuSeconds")?),
        None => None,
    };
    let mut started = false;
    let mut samples = vec![];
    let take = |t: Instant, setting: String, ready: &[(u32, u32, Instant)]| -> Result<Sample> {
        let r = sampler.read()?;
        let mut merging = vec![0; plan.procs as usize];
        for &(index, pid, _) in ready {
            let m = merging_pages(pid).ok_or_else(|| anyhow!("workload process {index} (pid {pid}) is gone"))?;
            if let Some(slot) = merging.get_mut(index as usize) {
                *slot = m;
            }
        }
        Ok(Sample {
            t: t.duration_since(t0).as_secs_f64(),
            pages_sharing: r.pages_sharing,
            pages_shared: r.pages_shared,
            full_scans: r.full_scans,
            pages_unshared: r.pages_unshared,
            pages_volatile: r.pages_volatile,
            ksmd_cpu_ns: r.ksmd_cpu_ns.saturating_sub(cpu0),
            setting,
            run: r.run,
            pages_to_scan: r.pages_to_scan,
            sleep_millisecs: r.sleep_millisecs,
            anon_pages: r.anon_pages,
            merging,
            pages_scanned: r.pages_scanned,
            ksm_zero_pages: r.ksm_zero_pages,
            pages_skipped: r.pages_skipped,
        })
    };
    let setting = |daemon: &Option<DaemonRun>, started: bool| {
        let daemon = daemon.as_ref().map(|d| d.proxy.clone());
        async move {
            match daemon {
                Some(p) => timeout(Duration::from_secs(5), p.current_setting())
                    .await
                    .map_err(|_| anyhow!("CurrentSetting took over 5 s"))?
                    .context("reading CurrentSetting"),
                None if started => Ok(mode.name().to_string()),
                None => Ok("initial".to_string()),
            }
        }
    };
    samples.push(take(t0, setting(&daemon, started).await?, &ready)?);

    // The start: a kick (daemon modes) or the mode's fixed knobs.
    let mut kicks = 0u32;
    match (&daemon, mode.fixed_knobs(real.ksm().has_advisor())) {
        (Some(d), _) => {
            d.proxy.kick().await.context("Kick")?;
            kicks += 1;
        }
        (None, Some(knobs)) => {
            real.ksm().apply(&knobs)?;
        }
        (None, None) => bail!("{} cannot run on this kernel (no advisor_mode?)", mode.name()),
    }
    started = true;

    let window = plan.window.as_secs_f64();
    let mut tick = interval_at(t0 + SAMPLE_EVERY, SAMPLE_EVERY);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut next_report = 30.0;
    loop {
        tokio::select! {
            now = tick.tick() => {
                let s = take(now, setting(&daemon, started).await?, &ready)?;
                let done = s.t >= window;
                if s.t >= next_report {
                    next_report += 30.0;
                    eprintln!(
                        "   t={:.0}s merged {:.1} % ksmd {:.2} CPU-s setting {} load {:?}",
                        s.t,
                        100.0 * s.pages_sharing as f64 / plan.max_pages_sharing() as f64,
                        s.ksmd_cpu_ns as f64 / 1e9,
                        s.setting,
                        load_average()
                    );
                }
                samples.push(s);
                if done {
                    break;
                }
            }
            event = workload.events.recv() => match event {
                Some(WorkloadEvent::Ready { index, pid }) => {
                    workload.workers.push(pid);
                    ready.push((index, pid, Instant::now()));
                    if let Some(d) = &daemon {
                        d.proxy.kick().await.context("Kick")?;
                        kicks += 1;
                    }
                }
                Some(WorkloadEvent::Closed) | None => bail!("the workload ended during the run"),
            },
        }
    }

    // At once after the last sample: the window's end, as the benchmark measured it.
    let daemon_ksmd_cpu_s = match (&daemon, daemon_cpu0) {
        (Some(d), Some(c0)) if c0 >= 0.0 => {
            let c1 = d.proxy.ksmd_cpu_seconds().await.context("reading KsmdCpuSeconds")?;
            (c1 >= 0.0).then_some(c1 - c0)
        }
        _ => None,
    };
    let kick_count = match &daemon {
        Some(d) => Some(d.proxy.kick_count().await.context("reading KickCount")?),
        None => None,
    };
    if let Some(d) = daemon {
        d.stop()?;
    }
    let status = workload.finish()?;
    if let Some(s) = status.filter(|s| !s.success()) {
        bail!("the workload ended with {s}");
    }
    let starts: Vec<Start> = ready
        .iter()
        .map(|&(index, pid, at)| Start {
            index,
            pid,
            t: if at >= t0 { at.duration_since(t0).as_secs_f64() } else { -t0.duration_since(at).as_secs_f64() },
        })
        .collect();
    let scale = Scale {
        max_pages_sharing: plan.max_pages_sharing(),
        shared_pages_per_process: plan.layout.shared_pages(),
        page_size: plan.page_size,
        window_s: window,
    };
    let summary = analysis::summarize(&samples, &starts, scale);
    Ok(RunRecord {
        mode: mode.name().into(),
        workload: kind.name().into(),
        procs: plan.procs,
        size_mib: plan.size_mib,
        unique_fraction: plan.unique_fraction,
        stagger_s: match kind {
            WorkloadKind::AllAtOnce => 0.0,
            WorkloadKind::Staggered => plan.stagger.as_secs_f64(),
        },
        window_s: window,
        max_pages_sharing: scale.max_pages_sharing,
        shared_pages_per_process: scale.shared_pages_per_process,
        page_size: plan.page_size,
        kicks,
        kick_count,
        load_before,
        load_after: load_average(),
        unmerge_s: unmerge.as_secs_f64(),
        starts,
        summary,
        daemon_log: mode.daemon_mode().map(|_| log.display().to_string()),
        ready_s: vec![],
        daemon_ksmd_cpu_s,
        cpus: std::thread::available_parallelism().ok().map(|n| n.get()),
        guest_cpu_s: vec![],
        lifetime_s: None,
        footprint: Default::default(),
        samples,
    })
}
