//! ksm-vm-bench: every KSM mode on real QEMU guests booting after their kick.
//!
//! A Kata host kicks the throttler when a sandbox folder appears, that is before its VM has any
//! memory: the guest then fills it over tens of seconds while it boots. For each workload (N
//! guests at once; one every --stagger; one every --stagger, each stopped --lifetime after its
//! launch) and mode (throttle and adaptive with the release daemon and the real
//! `kata-vc-throttler` watching a scratch sandboxes folder; the kernel's default knobs, its
//! advisor, flat out and KSM off with no daemon), this starts from a clean KSM, creates
//! `sbs/<id>` and launches each guest as the Kata runtime does, samples every 100 ms over the
//! window, and reports the memory saved (against the best final saving of any mode), ksmd's
//! CPU-seconds and the guests' launch-to-ready times; then what that cost (issue 27): ksmd's
//! page visits per merged page, its CPU-seconds per GiB·min saved, the cores left to the guests
//! and the cores they used, and their boot time against ksm-off's. The real KSM is held under
//! the project's lock and put back exactly as found, even when interrupted.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, ValueEnum};
use kata_ksm_throttler::io::meminfo;
use kernel_bench::analysis::{self, Scale, Verdict, VmRun};
use kernel_bench::daemon::DaemonRun;
use kernel_bench::guest::{GuestImage, GuestSpec};
use kernel_bench::modes::BenchMode;
use kernel_bench::plot;
use kernel_bench::real_ksm::RealKsm;
use kernel_bench::report::{self, RunRecord};
use kernel_bench::sample::{load_average, merging_pages, process_cpu_s, Sample, Sampler};
use kernel_bench::vm::{Memory, Vm, VmSpec};
use serde::{Deserialize, Serialize};
use tokio::signal::unix::{signal, SignalKind};
use tokio::time::{interval_at, timeout, Instant, MissedTickBehavior};

const SAMPLE_EVERY: Duration = Duration::from_millis(100);
const UNMERGE_LIMIT: Duration = Duration::from_secs(180);
/// How long the advisor is given to reach its steady state before an advisor run.
const ADVISOR_PRIME_LIMIT: Duration = Duration::from_secs(60);
/// The smoke's daemon timeline: compressed to fit its window.
const SMOKE_DURATIONS: [&str; 6] =
    ["--aggressive-duration", "10s", "--standard-duration", "10s", "--slow-duration", "10s"];
const DEFAULT_CACHE: &str = "/var/cache/kata-ksm-throttler-bench/guest";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Workload {
    /// Every guest launched at once (a pod of many sandboxes, a host coming back up).
    AllAtOnce,
    /// One guest every --stagger.
    Staggered,
    /// One guest every --stagger, each stopped --lifetime after its launch (its sandbox folder
    /// removed): guests come and go, fewer alive at once than --guests.
    Churn,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::AllAtOnce => "vm-all-at-once",
            Workload::Staggered => "vm-staggered",
            Workload::Churn => "vm-churn",
        }
    }

    /// When guest `i` is launched, from the run's start.
    fn launch_at(self, i: u32, stagger: Duration) -> Duration {
        match self {
            Workload::AllAtOnce => Duration::ZERO,
            Workload::Staggered | Workload::Churn => stagger * i,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum GuestMemory {
    /// Private RAM that QEMU marks mergeable (Kata with virtio-9p or no shared file system).
    Private,
    /// A shared memfd (what virtio-fs, Kata 3.x's default, requires): KSM cannot merge it.
    Shared,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (examples: 240s, 15s, 4m)"))
}

/// Runs every KSM mode on real QEMU guests and measures merging and ksmd's CPU.
#[derive(Debug, Parser)]
#[command(name = "ksm-vm-bench", about)]
struct Args {
    /// A short run for CI: 2 guests x 192 MiB with 16 MiB of files, 10 s stagger, 45 s window,
    /// compressed daemon timeline, throttle and adaptive; fails unless every run kicked,
    /// merged and KSM was restored.
    #[arg(long)]
    smoke: bool,
    /// Guests per workload (churn: in all, not alive at once) [default: 8; smoke 2].
    #[arg(long)]
    guests: Option<u32>,
    /// Guest RAM, MiB [default: 512; smoke 192].
    #[arg(long)]
    mem_mib: Option<u64>,
    /// The files every guest holds alike (its container image), MiB [default: 120; smoke 16].
    #[arg(long)]
    payload_mib: Option<u64>,
    /// Random data of each guest's own, MiB.
    #[arg(long, default_value_t = 12)]
    own_mib: u64,
    /// KiB each guest rewrites every --dirty-every once ready.
    #[arg(long, default_value_t = 256)]
    dirty_kib: u64,
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    dirty_every: Duration,
    /// Guest RAM: private (mergeable) or shared (virtio-fs style).
    #[arg(long, value_enum, default_value = "private")]
    memory: GuestMemory,
    /// Time between launches in the staggered and churn workloads [default: 15s; smoke 10s].
    #[arg(long, value_parser = parse_duration)]
    stagger: Option<Duration>,
    /// Churn: how long each guest runs, from its launch, before it is stopped.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    lifetime: Duration,
    /// How long each run is measured, from the first launch [default: 240s; smoke 45s].
    #[arg(long, value_parser = parse_duration)]
    window: Option<Duration>,
    /// Modes to run, comma-separated [default: all; smoke throttle,adaptive].
    #[arg(long, value_enum, value_delimiter = ',')]
    modes: Option<Vec<BenchMode>>,
    /// Workloads to run, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "all-at-once,staggered")]
    workloads: Vec<Workload>,
    /// Where results.json, table.md, vm-modes.png and the logs go.
    #[arg(long, default_value = "ksm-vm-bench-results")]
    out: PathBuf,
    /// The release daemon [default: kata-ksm-throttler beside this program].
    #[arg(long)]
    daemon: Option<PathBuf>,
    /// The Kata trigger [default: kata-vc-throttler beside this program].
    #[arg(long)]
    trigger: Option<PathBuf>,
    /// Where the guest image is built and kept (never inside the repository).
    #[arg(long, default_value = DEFAULT_CACHE)]
    cache_dir: PathBuf,
    /// Exit non-zero if adaptive misses one of the real-guest targets.
    #[arg(long)]
    enforce_targets: bool,
    /// Touch nothing: analyse a results.json again and write the table and plot into --out.
    #[arg(long, value_name = "FILE")]
    from_json: Option<PathBuf>,
}

#[derive(Debug)]
struct Plan {
    smoke: bool,
    guests: u32,
    mem_mib: u64,
    payload_mib: u64,
    own_mib: u64,
    dirty_kib: u64,
    dirty_every: Duration,
    memory: Memory,
    stagger: Duration,
    lifetime: Duration,
    window: Duration,
    modes: Vec<BenchMode>,
    workloads: Vec<Workload>,
    out: PathBuf,
    daemon: PathBuf,
    trigger: PathBuf,
    cache_dir: PathBuf,
    daemon_args: Vec<String>,
    page_size: u64,
    /// The machine's CPUs, what the guests and ksmd share.
    cpus: Option<usize>,
    enforce_targets: bool,
}

impl Plan {
    fn new(args: Args) -> Result<Plan> {
        let smoke = args.smoke;
        let pick = |given: Option<u64>, full: u64, small: u64| given.unwrap_or(if smoke { small } else { full });
        let guests = args.guests.unwrap_or(if smoke { 2 } else { 8 });
        if guests < 2 {
            bail!("--guests must be at least 2: one guest has nothing to merge with");
        }
        let mem_mib = pick(args.mem_mib, 512, 192);
        let payload_mib = pick(args.payload_mib, 120, 16);
        if payload_mib + args.own_mib + 64 > mem_mib {
            bail!(
                "--mem-mib {mem_mib} is too small for {payload_mib} MiB of files, {} MiB of its own and the kernel",
                args.own_mib
            );
        }
        let stagger = args.stagger.unwrap_or(Duration::from_secs(if smoke { 10 } else { 15 }));
        let window = args.window.unwrap_or(Duration::from_secs(if smoke { 45 } else { 240 }));
        if window < Duration::from_secs(5) {
            bail!("--window must be at least 5s");
        }
        if args.lifetime < SAMPLE_EVERY {
            bail!("--lifetime must be at least {SAMPLE_EVERY:?}");
        }
        let modes = args.modes.unwrap_or_else(|| {
            if smoke {
                vec![BenchMode::Throttle, BenchMode::Adaptive]
            } else {
                BenchMode::ALL.to_vec()
            }
        });
        if modes.is_empty() || args.workloads.is_empty() {
            bail!("nothing to run: --modes and --workloads need at least one each");
        }
        let here = std::env::current_exe().context("finding this program")?;
        let beside = |name: &str| here.with_file_name(name);
        let daemon = args.daemon.unwrap_or_else(|| beside("kata-ksm-throttler"));
        let trigger = args.trigger.unwrap_or_else(|| beside("kata-vc-throttler"));
        if modes.iter().any(|m| m.daemon_mode().is_some()) {
            for (bin, what) in [(&daemon, "daemon"), (&trigger, "trigger")] {
                if !bin.is_file() {
                    bail!("no {what} at {}: build it with `cargo build --release --workspace`", bin.display());
                }
            }
            if !daemon.components().any(|c| c.as_os_str() == "release") {
                bail!("{} is not a release build: the benchmark measures the release daemon", daemon.display());
            }
        }
        let daemon_args = if smoke { SMOKE_DURATIONS.iter().map(|s| s.to_string()).collect() } else { vec![] };
        Ok(Plan {
            smoke,
            guests,
            mem_mib,
            payload_mib,
            own_mib: args.own_mib,
            dirty_kib: args.dirty_kib,
            dirty_every: args.dirty_every,
            memory: match args.memory {
                GuestMemory::Private => Memory::Private,
                GuestMemory::Shared => Memory::SharedMemfd,
            },
            stagger,
            lifetime: args.lifetime,
            window,
            modes,
            workloads: args.workloads,
            out: args.out,
            daemon,
            trigger,
            cache_dir: args.cache_dir,
            daemon_args,
            page_size: meminfo::page_size(),
            cpus: std::thread::available_parallelism().ok().map(|n| n.get()),
            enforce_targets: args.enforce_targets,
        })
    }

    fn vm_spec(&self, id: &str) -> VmSpec {
        VmSpec {
            own_mib: self.own_mib,
            dirty_kib: self.dirty_kib,
            dirty_every_s: self.dirty_every.as_secs().max(1),
            ..VmSpec::new(id, self.mem_mib, self.memory)
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ksm-vm-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<ExitCode> {
    plot::register_font(plot::DEJAVU_SANS)?;
    if let Some(json) = &args.from_json {
        reanalyse(json, &args.out)?;
        return Ok(ExitCode::SUCCESS);
    }
    let plan = Plan::new(args)?;
    std::fs::create_dir_all(&plan.out).with_context(|| format!("creating {}", plan.out.display()))?;
    // The image before the lock: building it touches no KSM.
    let started = std::time::Instant::now();
    let image =
        GuestImage::ensure(&GuestSpec { payload_mib: plan.payload_mib }, &plan.cache_dir).context("the guest image")?;
    eprintln!(
        "guest image {} ({:.0} MiB of files, {}){}",
        image.dir().display(),
        image.info().payload_bytes as f64 / 1048576.0,
        image.info().sources.kernel.name,
        image.built_in().map_or(" from the cache".into(), |_| format!(", built in {:.0?}", started.elapsed()))
    );
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("tokio runtime")?;
    runtime.block_on(main_async(plan, image))
}

async fn main_async(plan: Plan, image: GuestImage) -> Result<ExitCode> {
    // The lock first, then the signal handlers, before anything is written.
    let real = RealKsm::take()?;
    let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    eprintln!("real KSM as found: {:?} (restored at the end)", real.found());

    let mut records = vec![];
    let outcome = tokio::select! {
        r = bench(&plan, &image, &real, &mut records) => r,
        _ = sigint.recv() => Err(anyhow!("interrupted by SIGINT")),
        _ = sigterm.recv() => Err(anyhow!("interrupted by SIGTERM")),
        _ = sighup.recv() => Err(anyhow!("interrupted by SIGHUP")),
    };
    // Every guest, the trigger and the daemon went with the bench future.
    let mut real = real;
    let restored = real.restore();
    match &restored {
        Ok(()) => eprintln!("real KSM restored exactly as found: {:?}", real.found()),
        Err(e) => eprintln!("COULD NOT RESTORE the real KSM: {e}"),
    }
    drop(real);

    rescale(&mut records);
    let verdicts = verdicts(&records);
    if !records.is_empty() {
        save(&plan, &records, &verdicts)?;
        println!("{}", report::vm_table(&records));
        print!("{}", report::verdicts(&verdicts));
        println!("results in {}", plan.out.display());
    }
    outcome?;
    restored?;
    let mut failed = false;
    if plan.smoke {
        for problem in smoke_problems(&records, plan.guests) {
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

async fn bench(plan: &Plan, image: &GuestImage, real: &RealKsm, records: &mut Vec<RunRecord>) -> Result<()> {
    for &workload in &plan.workloads {
        for &mode in &plan.modes {
            eprintln!("== {} / {} (load {:?})", workload.name(), mode.name(), load_average());
            let record = run_one(plan, image, real, mode, workload)
                .await
                .with_context(|| format!("{} / {}", workload.name(), mode.name()))?;
            let last = record.samples.last();
            eprintln!(
                "   saved {:.0} MiB at the end, ksmd {:.2} CPU-s, saved {:.0} MiB·s, ready {}",
                last.map_or(0.0, |s| s.pages_sharing as f64 * plan.page_size as f64 / 1048576.0),
                record.summary.ksmd_cpu_s,
                record.summary.saved_mib_s,
                report::ready_range(&record.ready_s)
            );
            records.push(record);
            // Keep what is done, in case a later run fails or is interrupted.
            rescale(records);
            save(plan, records, &verdicts(records))?;
        }
    }
    Ok(())
}

/// The guests' "best possible" is not known in advance: each run of a workload is measured
/// against the best final saving of any mode in this benchmark (recomputed as runs are added),
/// and its boot times against the workload's ksm-off run.
fn rescale(records: &mut [RunRecord]) {
    let mut workloads: Vec<String> = records.iter().map(|r| r.workload.clone()).collect();
    workloads.dedup();
    for w in workloads {
        let best = records.iter().filter(|r| r.workload == w).map(report::final_pages_sharing).max().unwrap_or(0);
        for r in records.iter_mut().filter(|r| r.workload == w) {
            r.max_pages_sharing = best;
            r.resummarize();
        }
    }
    report::footprints(records);
}

fn verdicts(records: &[RunRecord]) -> Vec<Verdict> {
    let mut out = vec![];
    let mut workloads: Vec<&str> = records.iter().map(|r| r.workload.as_str()).collect();
    workloads.dedup();
    for w in workloads {
        let find = |m: BenchMode| {
            records
                .iter()
                .find(|r| r.workload == w && r.mode == m.name())
                .map(|r| VmRun { summary: &r.summary, footprint: &r.footprint })
        };
        if let (Some(t), Some(a)) = (find(BenchMode::Throttle), find(BenchMode::Adaptive)) {
            out.extend(analysis::vm_targets(w, t, a, find(BenchMode::Advisor)));
        }
    }
    out
}

fn smoke_problems(records: &[RunRecord], guests: u32) -> Vec<String> {
    let mut problems = vec![];
    for r in records {
        let name = format!("{} / {}", r.workload, r.mode);
        if r.ready_s.iter().any(Option::is_none) {
            problems.push(format!("{name}: a guest was never ready: {:?}", r.ready_s));
        }
        let merges = ![BenchMode::KernelDefault, BenchMode::KsmOff].iter().any(|m| r.mode == m.name());
        if report::final_pages_sharing(r) == 0 && merges {
            problems.push(format!("{name}: nothing merged"));
        }
        if let Some(count) = r.kick_count {
            if count != u64::from(guests) {
                problems.push(format!("{name}: {guests} sandboxes appeared, the daemon counted {count} kicks"));
            }
            if !r.summary.steps.iter().any(|s| s.setting == "aggressive") {
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
    guests: u32,
    mem_mib: u64,
    payload_mib: u64,
    own_mib: u64,
    memory: String,
    stagger_s: f64,
    window_s: f64,
    smoke: bool,
    /// The churn workload's --lifetime (absent in older results).
    #[serde(default)]
    lifetime_s: Option<f64>,
}

impl Meta {
    fn now(plan: &Plan) -> Meta {
        Meta {
            command: std::env::args().collect(),
            unix_time: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned(),
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            guests: plan.guests,
            mem_mib: plan.mem_mib,
            payload_mib: plan.payload_mib,
            own_mib: plan.own_mib,
            memory: format!("{:?}", plan.memory),
            stagger_s: plan.stagger.as_secs_f64(),
            window_s: plan.window.as_secs_f64(),
            smoke: plan.smoke,
            lifetime_s: plan.workloads.contains(&Workload::Churn).then_some(plan.lifetime.as_secs_f64()),
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
        "KSM modes on {} QEMU guests x {} MiB ({} MiB of files alike), {:.0} s window, staggered every {:.0} s{}",
        meta.guests,
        meta.mem_mib,
        meta.payload_mib,
        meta.window_s,
        meta.stagger_s,
        meta.lifetime_s.map_or(String::new(), |l| format!(", churn lifetime {l:.0} s"))
    );
    let results = Results { meta, verdicts: verdicts.to_vec(), runs: records.to_vec() };
    let json = out.join("results.json");
    let file = File::create(&json).with_context(|| format!("creating {}", json.display()))?;
    serde_json::to_writer(std::io::BufWriter::new(file), &results).context("writing results.json")?;
    let md = format!("{}\n{}", report::vm_markdown_table(records), report::verdicts(verdicts));
    std::fs::write(out.join("table.md"), md).context("writing table.md")?;
    plot::draw(records, &out.join("vm-modes.png"), &title)?;
    Ok(())
}

/// `--from-json`: the same report from recorded samples, with the current analysis.
fn reanalyse(json: &Path, out: &Path) -> Result<()> {
    let file = File::open(json).with_context(|| format!("opening {}", json.display()))?;
    let mut results: Results = serde_json::from_reader(std::io::BufReader::new(file))
        .with_context(|| format!("{} is not a ksm-vm-bench results.json", json.display()))?;
    // Older results knew the machine's CPUs only in their metadata.
    let cpus = (results.meta.cpus > 0).then_some(results.meta.cpus);
    for r in results.runs.iter_mut().filter(|r| r.cpus.is_none()) {
        r.cpus = cpus;
    }
    rescale(&mut results.runs);
    let verdicts = verdicts(&results.runs);
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    write_results(out, results.meta, &results.runs, &verdicts)?;
    println!("{}", report::vm_table(&results.runs));
    print!("{}", report::verdicts(&verdicts));
    println!("results in {}", out.display());
    Ok(())
}

/// One guest of a run: launched when its time comes, after its sandbox folder appeared.
struct Guest {
    id: String,
    at: Duration,
    /// Running (`None` before its launch and once stopped).
    vm: Option<Vm>,
    launched: bool,
    ready: Option<f64>,
    /// Its QEMU's CPU-seconds, read just before it was stopped.
    cpu_s: Option<f64>,
}

impl Guest {
    /// Reads the guest's CPU time, then stops it (a no-op if it is not running).
    fn stop(&mut self) -> Result<()> {
        if let Some(mut vm) = self.vm.take() {
            self.cpu_s = vm.pid().and_then(process_cpu_s);
            vm.stop().with_context(|| format!("stopping {}", vm.name()))?;
        }
        Ok(())
    }
}

async fn run_one(
    plan: &Plan,
    image: &GuestImage,
    real: &RealKsm,
    mode: BenchMode,
    kind: Workload,
) -> Result<RunRecord> {
    let unmerge = real.clean(UNMERGE_LIMIT)?;
    let load_before = load_average();
    let sampler = Sampler::new(real.ksm().clone())?;
    let vc_root = tempfile::Builder::new().prefix("ksm-vm-bench-vc-").tempdir().context("sandboxes folder")?;
    let sandboxes = vc_root.path().join("sbs");
    std::fs::create_dir(&sandboxes).with_context(|| format!("creating {}", sandboxes.display()))?;
    let log = plan.out.join(format!("{}-{}-daemon.log", kind.name(), mode.name()));
    let mut daemon = match mode.daemon_mode() {
        Some(m) => {
            let mut d = DaemonRun::start(&plan.daemon, m, &plan.daemon_args, log.clone()).await?;
            let trigger_log = plan.out.join(format!("{}-{}-trigger.log", kind.name(), mode.name()));
            d.start_trigger(&plan.trigger, vc_root.path(), trigger_log).await?;
            Some(d)
        }
        None => None,
    };
    let mut guests: Vec<Guest> = (0..plan.guests)
        .map(|i| Guest {
            id: format!("bench{i:02}"),
            at: kind.launch_at(i, plan.stagger),
            vm: None,
            launched: false,
            ready: None,
            cpu_s: None,
        })
        .collect();

    let setting = |daemon: &Option<DaemonRun>, started: bool| {
        let proxy = daemon.as_ref().map(|d| d.proxy.clone());
        async move {
            match proxy {
                Some(p) => timeout(Duration::from_secs(5), p.current_setting())
                    .await
                    .map_err(|_| anyhow!("CurrentSetting took over 5 s"))?
                    .context("reading CurrentSetting"),
                None if started => Ok(mode.name().to_string()),
                None => Ok("initial".to_string()),
            }
        }
    };
    if mode == BenchMode::Advisor {
        // Before the clock starts: the advisor as a host that has run it has it.
        let knobs = mode.fixed_knobs(real.ksm().has_advisor()).ok_or_else(|| anyhow!("no advisor_mode here"))?;
        real.ksm().apply(&knobs)?;
        let (pages, scans) = real.prime_advisor(ADVISOR_PRIME_LIMIT)?;
        println!("   advisor primed: pages_to_scan {pages} after {scans} full scans of 64 pages of our own");
    }
    let t0 = Instant::now();
    let cpu0 = sampler.read()?.ksmd_cpu_ns;
    let take = |t: Instant, setting: String, guests: &[Guest]| -> Result<Sample> {
        let r = sampler.read()?;
        let merging =
            guests.iter().map(|g| g.vm.as_ref().and_then(Vm::pid).and_then(merging_pages).unwrap_or(0)).collect();
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
    let mut samples = vec![take(t0, setting(&daemon, false).await?, &guests)?];
    if daemon.is_none() && mode != BenchMode::Advisor {
        let knobs = mode
            .fixed_knobs(real.ksm().has_advisor())
            .ok_or_else(|| anyhow!("{} cannot run on this kernel (no advisor_mode?)", mode.name()))?;
        real.ksm().apply(&knobs)?;
    }

    let window = plan.window.as_secs_f64();
    let mut tick = interval_at(t0, SAMPLE_EVERY);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut next_report = 30.0;
    loop {
        let now = tick.tick().await;
        // Launch whoever's time has come: the sandbox folder first, as the Kata runtime
        // creates it before it starts the VMM (the trigger kicks on it).
        for g in guests.iter_mut().filter(|g| !g.launched && now.duration_since(t0) >= g.at) {
            let folder = sandboxes.join(&g.id);
            std::fs::create_dir(&folder).with_context(|| format!("creating {}", folder.display()))?;
            g.vm = Some(Vm::launch(image, &plan.vm_spec(&g.id)).with_context(|| format!("launching {}", g.id))?);
            g.launched = true;
        }
        for g in guests.iter_mut() {
            let Some(vm) = g.vm.as_mut() else { continue };
            if g.ready.is_none() {
                if let Some(d) = vm.try_ready()? {
                    g.ready = Some(d.as_secs_f64());
                }
            }
            // Churn: its time is up. Stopped by the benchmark, so not an early end; the folder
            // goes with it, as the Kata runtime removes it.
            if kind == Workload::Churn && vm.launched().elapsed() >= plan.lifetime {
                g.stop()?;
                let folder = sandboxes.join(&g.id);
                std::fs::remove_dir(&folder).with_context(|| format!("removing {}", folder.display()))?;
                continue;
            }
            if let Some(status) = vm.try_wait()? {
                bail!("{} ended ({status}) during the run: {:?}", vm.name(), vm.console_tail());
            }
        }
        let s = take(now, setting(&daemon, true).await?, &guests)?;
        let done = s.t >= window;
        if s.t >= next_report {
            next_report += 30.0;
            eprintln!(
                "   t={:.0}s saved {:.0} MiB ksmd {:.2} CPU-s setting {} pages_to_scan {} ready {}/{} alive {} load {:?}",
                s.t,
                s.pages_sharing as f64 * plan.page_size as f64 / 1048576.0,
                s.ksmd_cpu_ns as f64 / 1e9,
                s.setting,
                s.pages_to_scan,
                guests.iter().filter(|g| g.ready.is_some()).count(),
                guests.len(),
                guests.iter().filter(|g| g.vm.is_some()).count(),
                load_average()
            );
        }
        samples.push(s);
        if done {
            break;
        }
    }

    let kick_count = match &daemon {
        Some(d) => Some(d.proxy.kick_count().await.context("reading KickCount")?),
        None => None,
    };
    let ready_s: Vec<Option<f64>> = guests.iter().map(|g| g.ready).collect();
    // The guests go first (their memory with them, their CPU time read), then the trigger and
    // the daemon.
    for g in &mut guests {
        g.stop()?;
    }
    let guest_cpu_s: Vec<Option<f64>> = guests.iter().map(|g| g.cpu_s).collect();
    if let Some(d) = daemon.take() {
        d.stop()?;
    }
    let scale =
        Scale { max_pages_sharing: 0, shared_pages_per_process: 0, page_size: plan.page_size, window_s: window };
    let summary = analysis::summarize(&samples, &[], scale);
    Ok(RunRecord {
        mode: mode.name().into(),
        workload: kind.name().into(),
        procs: plan.guests,
        size_mib: plan.mem_mib,
        unique_fraction: 0.0,
        stagger_s: kind.launch_at(1, plan.stagger).as_secs_f64(),
        window_s: window,
        max_pages_sharing: 0,
        shared_pages_per_process: 0,
        page_size: plan.page_size,
        kicks: if mode.daemon_mode().is_some() { plan.guests } else { 0 },
        kick_count,
        load_before,
        load_after: load_average(),
        unmerge_s: unmerge.as_secs_f64(),
        starts: vec![],
        summary,
        daemon_log: mode.daemon_mode().map(|_| log.display().to_string()),
        ready_s,
        daemon_ksmd_cpu_s: None,
        cpus: plan.cpus,
        guest_cpu_s,
        lifetime_s: (kind == Workload::Churn).then_some(plan.lifetime.as_secs_f64()),
        footprint: Default::default(),
        samples,
    })
}
