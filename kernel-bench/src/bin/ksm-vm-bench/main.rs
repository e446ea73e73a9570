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

mod run;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use kata_ksm_throttler::io::meminfo;
use kernel_bench::analysis::{self, Verdict, VmRun};
use kernel_bench::guest::{GuestImage, GuestSpec};
use kernel_bench::harness::{self, Bench, Interrupts, Machine, SAMPLE_EVERY};
use kernel_bench::modes::BenchMode;
use kernel_bench::plot;
use kernel_bench::real_ksm::RealKsm;
use kernel_bench::report::{self, RunRecord};
use kernel_bench::vm::{Memory, VmSpec};
use serde::{Deserialize, Serialize};

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
    harness::main::<VmBench>(|| run(Args::parse()))
}

fn run(args: Args) -> Result<ExitCode> {
    plot::register_font(plot::DEJAVU_SANS)?;
    if let Some(json) = &args.from_json {
        harness::reanalyse::<VmBench>(json, &args.out)?;
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
    harness::block_on(main_async(plan, image))?
}

async fn main_async(plan: Plan, image: GuestImage) -> Result<ExitCode> {
    // The lock first, then the signal handlers, before anything is written.
    let real = RealKsm::take()?;
    let mut interrupts = Interrupts::catch()?;
    eprintln!("real KSM as found: {:?} (restored at the end)", real.found());

    let mut records = vec![];
    let outcome = interrupts.around(bench(&plan, &image, &real, &mut records)).await;
    // Every guest, the trigger and the daemon went with the bench future.
    let restored = harness::restore(real);
    harness::conclude::<VmBench>(
        &plan.out,
        Meta::now(&plan),
        &mut records,
        outcome,
        restored,
        plan.smoke,
        plan.enforce_targets,
    )
}

async fn bench(plan: &Plan, image: &GuestImage, real: &RealKsm, records: &mut Vec<RunRecord>) -> Result<()> {
    let said = |record: &RunRecord| {
        let last = record.samples.last();
        eprintln!(
            "   saved {:.0} MiB at the end, ksmd {:.2} CPU-s, saved {:.0} MiB·s, ready {}",
            last.map_or(0.0, |s| s.pages_sharing as f64 * plan.page_size as f64 / 1048576.0),
            record.summary.ksmd_cpu_s,
            record.summary.saved_mib_s,
            report::ready_range(&record.ready_s)
        );
    };
    harness::run_all::<VmBench, _>(
        &plan.workloads,
        &plan.modes,
        Workload::name,
        records,
        async |workload, mode| run::run_one(plan, image, real, mode, workload).await,
        said,
        |records| harness::save::<VmBench>(&plan.out, Meta::now(plan), records),
    )
    .await
}

/// What ksm-vm-bench adds to the shared skeleton.
struct VmBench;

impl Bench for VmBench {
    const NAME: &'static str = "ksm-vm-bench";
    const PLOT: &'static str = "vm-modes.png";
    type Meta = Meta;

    fn title(meta: &Meta) -> String {
        format!(
            "KSM modes on {} QEMU guests x {} MiB ({} MiB of files alike), {:.0} s window, staggered every {:.0} s{}",
            meta.guests,
            meta.mem_mib,
            meta.payload_mib,
            meta.window_s,
            meta.stagger_s,
            meta.lifetime_s.map_or(String::new(), |l| format!(", churn lifetime {l:.0} s"))
        )
    }

    fn markdown_table(records: &[RunRecord]) -> String {
        report::vm_markdown_table(records)
    }

    fn print_tables(records: &[RunRecord]) {
        println!("{}", report::vm_table(records));
    }

    fn verdicts(records: &[RunRecord]) -> Vec<Verdict> {
        verdicts(records)
    }

    fn smoke_problems(meta: &Meta, records: &[RunRecord]) -> Vec<String> {
        smoke_problems(meta, records)
    }

    fn settle(records: &mut [RunRecord]) {
        rescale(records);
    }

    fn reanalysed(machine: &Machine, runs: &mut [RunRecord]) {
        // Older results knew the machine's CPUs only in their metadata.
        let cpus = (machine.cpus > 0).then_some(machine.cpus);
        for r in runs.iter_mut().filter(|r| r.cpus.is_none()) {
            r.cpus = cpus;
        }
        rescale(runs);
    }
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

fn smoke_problems(meta: &Meta, records: &[RunRecord]) -> Vec<String> {
    let guests = meta.guests;
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

/// How a benchmark was run; kept with its results, after the machine.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Meta {
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
