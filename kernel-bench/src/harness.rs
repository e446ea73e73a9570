//! The skeleton both benchmark binaries (`ksm-modes-bench`, `ksm-vm-bench`) share: the real KSM
//! taken and put back even when a signal interrupts the runs, each workload run in each mode
//! with the results saved after every run, `results.json`, `table.md` and the plot, the report
//! on stdout, `--from-json` (the same report again from recorded samples), and the sample
//! clock. What differs between them (the metadata, the tables, the verdicts, the smoke's
//! checks) is a [`Bench`].

use std::fs::File;
use std::future::Future;
use std::io::{BufReader, BufWriter};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::time::{interval_at, timeout, Instant, Interval, MissedTickBehavior};

use crate::analysis::Verdict;
use crate::daemon::DaemonRun;
use crate::modes::BenchMode;
use crate::plot;
use crate::real_ksm::{RealKsm, RealKsmError};
use crate::report::{self, RunRecord};
use crate::sample::load_average;

/// How often a run samples the real KSM.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// What one benchmark binary adds to the shared skeleton.
pub trait Bench {
    /// The program, for its messages.
    const NAME: &'static str;
    /// The plot's file name in `--out`.
    const PLOT: &'static str;
    /// How the benchmark was run, after the [`Machine`] in `results.json`.
    type Meta: Serialize + DeserializeOwned + Clone;

    /// The plot's title.
    fn title(meta: &Self::Meta) -> String;
    /// The runs as a markdown table, for `table.md`.
    fn markdown_table(records: &[RunRecord]) -> String;
    /// The runs' tables as printed on stdout (the verdicts follow).
    fn print_tables(records: &[RunRecord]);
    /// The targets met or missed.
    fn verdicts(records: &[RunRecord]) -> Vec<Verdict>;
    /// What a smoke run found wrong with its runs (none: it passes).
    fn smoke_problems(meta: &Self::Meta, records: &[RunRecord]) -> Vec<String>;
    /// Brings the runs up to date with each other once one is added (each measured against
    /// the best of its workload, say); nothing by default.
    fn settle(_records: &mut [RunRecord]) {}
    /// Recorded runs brought to the current analysis, for `--from-json`.
    fn reanalysed(machine: &Machine, runs: &mut [RunRecord]);
}

/// The machine a benchmark ran on and the command that ran it: the first fields of
/// `results.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub command: Vec<String>,
    pub unix_time: u64,
    pub kernel: String,
    pub cpus: usize,
}

impl Machine {
    pub fn now() -> Machine {
        Machine {
            command: std::env::args().collect(),
            unix_time: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned(),
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        }
    }
}

/// `results.json`: the machine, how the benchmark was run, the verdicts and every run.
#[derive(Debug, Serialize, Deserialize)]
#[serde(bound = "M: Serialize + DeserializeOwned")]
pub struct Results<M> {
    #[serde(flatten)]
    pub machine: Machine,
    #[serde(flatten)]
    pub meta: M,
    pub verdicts: Vec<Verdict>,
    pub runs: Vec<RunRecord>,
}

/// A binary's `main`: exit 0, or 1 with `NAME: error` on stderr.
pub fn main<B: Bench>(run: impl FnOnce() -> Result<ExitCode>) -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{}: {e:#}", B::NAME);
            ExitCode::FAILURE
        }
    }
}

/// Runs `future` to its end on a runtime of this thread.
pub fn block_on<F: Future>(future: F) -> Result<F::Output> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("tokio runtime")?;
    Ok(runtime.block_on(future))
}

/// SIGINT, SIGTERM and SIGHUP, caught from before anything is written until the real KSM is
/// put back.
pub struct Interrupts {
    int: Signal,
    term: Signal,
    hup: Signal,
}

impl Interrupts {
    pub fn catch() -> Result<Interrupts> {
        Ok(Interrupts {
            int: signal(SignalKind::interrupt()).context("SIGINT handler")?,
            term: signal(SignalKind::terminate()).context("SIGTERM handler")?,
            hup: signal(SignalKind::hangup()).context("SIGHUP handler")?,
        })
    }

    /// `runs` to its end, or the error of the first signal to arrive (what `runs` was running
    /// goes with it).
    pub async fn around(&mut self, runs: impl Future<Output = Result<()>>) -> Result<()> {
        tokio::select! {
            r = runs => r,
            _ = self.int.recv() => Err(anyhow!("interrupted by SIGINT")),
            _ = self.term.recv() => Err(anyhow!("interrupted by SIGTERM")),
            _ = self.hup.recv() => Err(anyhow!("interrupted by SIGHUP")),
        }
    }
}

/// Puts the real KSM back exactly as found, saying so either way.
pub fn restore(mut real: RealKsm) -> Result<(), RealKsmError> {
    let restored = real.restore();
    match &restored {
        Ok(()) => eprintln!("real KSM restored exactly as found: {:?}", real.found()),
        Err(e) => eprintln!("COULD NOT RESTORE the real KSM: {e}"),
    }
    drop(real);
    restored
}

/// Each workload in each mode, one after the other: `run` runs one, `said` prints its summary
/// line; the results so far are saved (`save`, [`save`] with the binary's metadata) after each
/// run, in case a later one fails or is interrupted.
pub async fn run_all<B: Bench, W: Copy>(
    workloads: &[W],
    modes: &[BenchMode],
    workload_name: fn(W) -> &'static str,
    records: &mut Vec<RunRecord>,
    mut run: impl AsyncFnMut(W, BenchMode) -> Result<RunRecord>,
    said: impl Fn(&RunRecord),
    save: impl Fn(&[RunRecord]) -> Result<()>,
) -> Result<()> {
    for &workload in workloads {
        for &mode in modes {
            let name = format!("{} / {}", workload_name(workload), mode.name());
            eprintln!("== {name} (load {:?})", load_average());
            let record = run(workload, mode).await.with_context(|| name.clone())?;
            said(&record);
            records.push(record);
            B::settle(records);
            save(records)?;
        }
    }
    Ok(())
}

/// After the runs and the restore: the results saved and printed, then the exit: failure if
/// the runs or the restore failed, a `smoke` run found problems with its runs, or
/// `enforce_targets` and a target was missed.
pub fn conclude<B: Bench>(
    out: &Path,
    meta: B::Meta,
    records: &mut [RunRecord],
    outcome: Result<()>,
    restored: Result<(), RealKsmError>,
    smoke: bool,
    enforce_targets: bool,
) -> Result<ExitCode> {
    B::settle(records);
    let verdicts = B::verdicts(records);
    if !records.is_empty() {
        write_results::<B>(out, Machine::now(), meta.clone(), records, &verdicts)?;
        print_report::<B>(out, records, &verdicts);
    }
    outcome?;
    restored?;
    let mut failed = false;
    if smoke {
        for problem in B::smoke_problems(&meta, records) {
            eprintln!("smoke: {problem}");
            failed = true;
        }
    }
    if enforce_targets && verdicts.iter().any(|v| !v.met) {
        eprintln!("adaptive missed a target (--enforce-targets)");
        failed = true;
    }
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

/// The results so far into `out`, with the verdicts they give.
pub fn save<B: Bench>(out: &Path, meta: B::Meta, records: &[RunRecord]) -> Result<()> {
    write_results::<B>(out, Machine::now(), meta, records, &B::verdicts(records))
}

fn write_results<B: Bench>(
    out: &Path,
    machine: Machine,
    meta: B::Meta,
    records: &[RunRecord],
    verdicts: &[Verdict],
) -> Result<()> {
    let title = B::title(&meta);
    let results = Results { machine, meta, verdicts: verdicts.to_vec(), runs: records.to_vec() };
    let json = out.join("results.json");
    let file = File::create(&json).with_context(|| format!("creating {}", json.display()))?;
    serde_json::to_writer(BufWriter::new(file), &results).context("writing results.json")?;
    let md = format!("{}\n{}", B::markdown_table(records), report::verdicts(verdicts));
    std::fs::write(out.join("table.md"), md).context("writing table.md")?;
    plot::draw(records, &out.join(B::PLOT), &title)?;
    Ok(())
}

fn print_report<B: Bench>(out: &Path, records: &[RunRecord], verdicts: &[Verdict]) {
    B::print_tables(records);
    print!("{}", report::verdicts(verdicts));
    println!("results in {}", out.display());
}

/// `--from-json`: the same report from recorded samples, with the current analysis.
pub fn reanalyse<B: Bench>(json: &Path, out: &Path) -> Result<()> {
    let file = File::open(json).with_context(|| format!("opening {}", json.display()))?;
    let mut results: Results<B::Meta> = serde_json::from_reader(BufReader::new(file))
        .with_context(|| format!("{} is not a {} results.json", json.display(), B::NAME))?;
    B::reanalysed(&results.machine, &mut results.runs);
    let verdicts = B::verdicts(&results.runs);
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    write_results::<B>(out, results.machine, results.meta, &results.runs, &verdicts)?;
    print_report::<B>(out, &results.runs, &verdicts);
    Ok(())
}

/// The sample clock: a tick every [`SAMPLE_EVERY`] from `first`, late ticks delayed (never
/// bunched).
pub fn sample_clock(first: Instant) -> Interval {
    let mut tick = interval_at(first, SAMPLE_EVERY);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    tick
}

/// The setting a sample records: the daemon's CurrentSetting, or with no daemon the mode's
/// fixed profile once `started` (`initial` before).
pub async fn current_setting(daemon: Option<&DaemonRun>, mode: BenchMode, started: bool) -> Result<String> {
    match daemon.map(|d| d.proxy.clone()) {
        Some(p) => timeout(Duration::from_secs(5), p.current_setting())
            .await
            .map_err(|_| anyhow!("CurrentSetting took over 5 s"))?
            .context("reading CurrentSetting"),
        None if started => Ok(mode.name().to_string()),
        None => Ok("initial".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A binary's metadata as the binaries wrote it before the harness: the machine's fields in
    /// the same struct.
    #[derive(Serialize)]
    struct Before {
        command: Vec<String>,
        unix_time: u64,
        kernel: String,
        cpus: usize,
        guests: u32,
        stagger_s: f64,
        lifetime_s: Option<f64>,
    }

    #[derive(Serialize)]
    struct BeforeResults {
        #[serde(flatten)]
        meta: Before,
        verdicts: Vec<Verdict>,
        runs: Vec<RunRecord>,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Meta {
        guests: u32,
        stagger_s: f64,
        #[serde(default)]
        lifetime_s: Option<f64>,
    }

    fn machine() -> Machine {
        Machine { command: vec!["ksm-vm-bench".into(), "--smoke".into()], unix_time: 7, kernel: "6.18".into(), cpus: 2 }
    }

    #[test]
    fn results_json_is_written_as_before_the_harness() {
        let m = machine();
        let before = BeforeResults {
            meta: Before {
                command: m.command.clone(),
                unix_time: m.unix_time,
                kernel: m.kernel.clone(),
                cpus: m.cpus,
                guests: 2,
                stagger_s: 10.0,
                lifetime_s: Some(60.0),
            },
            verdicts: vec![],
            runs: vec![],
        };
        let now = Results {
            machine: m,
            meta: Meta { guests: 2, stagger_s: 10.0, lifetime_s: Some(60.0) },
            verdicts: vec![],
            runs: vec![],
        };
        let (before, now) = (serde_json::to_string(&before).unwrap(), serde_json::to_string(&now).unwrap());
        assert_eq!(now, before);
    }

    #[test]
    fn older_results_without_an_optional_field_still_read() {
        let json = r#"{"command":["x"],"unix_time":1,"kernel":"6.1","cpus":4,"guests":8,"stagger_s":15,
            "verdicts":[],"runs":[]}"#;
        let read: Results<Meta> = serde_json::from_str(json).unwrap();
        assert_eq!(read.machine.cpus, 4);
        assert_eq!(read.meta, Meta { guests: 8, stagger_s: 15.0, lifetime_s: None });
    }
}
