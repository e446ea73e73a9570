//! ksm-workload: processes that give KSM something to merge, like VMs booting from one image.
//!
//! Each process maps anonymous memory, fills it (page i holds the same bytes in every process,
//! bar a fraction of unique pages), marks it MADV_MERGEABLE, prints `ready <index> <pid>` and
//! holds the memory until its standard input is closed. The parent starts them (all at once, or
//! one every --stagger), forwards their lines, and when its own standard input closes (or it is
//! killed) their inputs close too, so none outlives it.
//!
//! With --ramp a process boots like a VM instead: it marks its memory MADV_MERGEABLE first (as
//! QEMU does before the guest runs), says `ready` at once (when a VM is launched and kicked),
//! then writes its pages in order over the ramp and says `filled <index> <pid> <seconds>`.
//! With --dirty-fraction it then rewrites that share of its pages every --dirty-every, with
//! content of its own that is new each round, like a running guest.

use std::io::{self, BufRead, BufReader, Write};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use kata_ksm_throttler::io::meminfo;
use kernel_bench::pattern::{fill, Layout};
use rustix::mm::{madvise, mmap_anonymous, Advice, MapFlags, ProtFlags};

#[derive(Debug, Parser)]
#[command(name = "ksm-workload", about = "Processes with identical MADV_MERGEABLE memory, held until stdin closes")]
struct Args {
    /// How many processes.
    #[arg(long, default_value_t = 8)]
    procs: u32,
    /// Memory per process, MiB.
    #[arg(long, default_value_t = 256)]
    size_mib: u64,
    /// Fraction of each process's pages that are its own (0 to 1).
    #[arg(long, default_value_t = 0.0)]
    unique_fraction: f64,
    /// Time between process starts (0s: all at once).
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    stagger: Duration,
    /// Write each process's memory over this long, after `ready` (0s: all of it before).
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    ramp: Duration,
    /// Fraction of each process's pages it rewrites every --dirty-every once filled (0 to 1;
    /// with --unique-fraction at most 1: they are its own, not shared).
    #[arg(long, default_value_t = 0.0)]
    dirty_fraction: f64,
    /// Time between rewrites of the dirtied pages.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    dirty_every: Duration,
    /// (Internal) be worker number INDEX.
    #[arg(long, hide = true, value_name = "INDEX")]
    worker: Option<u32>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (examples: 10s, 500ms)"))
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match args.worker {
        Some(index) => worker(&args, index),
        None => parent(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ksm-workload: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Pages are written in chunks this far apart (or closer) over a ramp: steady, like a guest.
const RAMP_TICK: Duration = Duration::from_millis(50);

/// The layout, once the arguments are known to make sense (checked by parent and worker alike).
fn layout(args: &Args) -> Result<Layout> {
    let layout = Layout::with_dirty(args.size_mib, args.unique_fraction, args.dirty_fraction, meminfo::page_size())?;
    if args.dirty_fraction > 0.0 && args.dirty_every.is_zero() {
        bail!("--dirty-every must be more than 0s");
    }
    Ok(layout)
}

/// The process's memory, one slice of words per page.
struct Memory<'a> {
    words: &'a mut [u64],
    page_words: usize,
    layout: Layout,
    owner: u32,
}

impl Memory<'_> {
    /// Writes `pages` as they are after `round` dirtying rounds.
    fn write(&mut self, pages: impl IntoIterator<Item = u64>, round: u64) {
        for page in pages {
            let at = page as usize * self.page_words;
            fill(&mut self.words[at..at + self.page_words], page, self.layout.content(page, self.owner, round));
        }
    }
}

/// Input closing (or failing) while we wait: a message on `closed`.
type Closed = mpsc::Receiver<io::Result<u64>>;

/// Waits until `until` (`None`: for ever); true if our input closed first (time to go).
fn input_closed_by(closed: &Closed, until: Option<Instant>) -> Result<bool> {
    let got = match until {
        Some(t) => closed.recv_timeout(t.saturating_duration_since(Instant::now())),
        None => closed.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
    };
    match got {
        Ok(copied) => copied.map(|_| true).context("waiting on stdin"),
        Err(mpsc::RecvTimeoutError::Timeout) => Ok(false),
        Err(mpsc::RecvTimeoutError::Disconnected) => Ok(true),
    }
}

/// The next deadline `every` after `due`; if we are already past it, now: a slow or stalled
/// machine stretches the schedule rather than catching up in a burst. `None` when it is beyond
/// what the clock can represent (a duration of centuries): never.
fn next_due(due: Option<Instant>, every: Duration) -> Option<Instant> {
    due.and_then(|d| d.checked_add(every)).map(|d| d.max(Instant::now()))
}

fn say(line: std::fmt::Arguments) -> Result<()> {
    let mut out = io::stdout().lock();
    writeln!(out, "{line}").and_then(|()| out.flush()).context("reporting to the parent")
}

fn worker(args: &Args, index: u32) -> Result<()> {
    let layout = layout(args)?;
    let page_size = meminfo::page_size() as usize;
    let len = layout.pages as usize * page_size;
    // SAFETY: a fresh private anonymous mapping, used only as the slice below and never unmapped
    // (it goes with the process).
    let ptr =
        unsafe { mmap_anonymous(std::ptr::null_mut(), len, ProtFlags::READ | ProtFlags::WRITE, MapFlags::PRIVATE) }
            .with_context(|| format!("mmap of {} MiB", args.size_mib))?;
    // SAFETY: the mapping is `len` bytes, page-aligned (so u64-aligned), and ours alone.
    let words = unsafe { std::slice::from_raw_parts_mut(ptr.cast::<u64>(), len / 8) };
    let mut memory = Memory { words, page_words: page_size / 8, layout, owner: index };
    let mergeable = || {
        // SAFETY: advice on our own mapping; MADV_MERGEABLE does not change its contents.
        unsafe { madvise(ptr, len, Advice::LinuxMergeable) }.context("madvise(MADV_MERGEABLE) (is KSM built in?)")
    };
    // Hold the memory until the parent closes our input (or dies, which closes it too).
    let (tx, closed) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(io::copy(&mut io::stdin().lock(), &mut io::sink()));
    });
    let pid = std::process::id();

    if args.ramp.is_zero() {
        memory.write(0..layout.pages, 0);
        mergeable()?;
        say(format_args!("ready {index} {pid}"))?;
    } else {
        mergeable()?;
        say(format_args!("ready {index} {pid}"))?;
        let ready = Instant::now();
        // Even chunks, each written at the end of its share of the ramp, so `filled` comes no
        // sooner than the ramp.
        let chunks = args.ramp.as_nanos().div_ceil(RAMP_TICK.as_nanos()).clamp(1, u128::from(layout.pages));
        let tick = Duration::from_nanos(u64::try_from(args.ramp.as_nanos().div_ceil(chunks)).unwrap_or(u64::MAX));
        let pages = u128::from(layout.pages);
        let mut due = Some(ready);
        for k in 0..chunks {
            due = next_due(due, tick);
            if input_closed_by(&closed, due)? {
                return Ok(());
            }
            // k < chunks, so both ends are at most `pages` and fit a u64.
            let (from, to) = ((k * pages / chunks) as u64, ((k + 1) * pages / chunks) as u64);
            memory.write(from..to, 0);
        }
        say(format_args!("filled {index} {pid} {:.3}", ready.elapsed().as_secs_f64()))?;
    }

    if layout.dirty_pages == 0 {
        return input_closed_by(&closed, None).map(drop);
    }
    let dirty: Vec<u64> = (0..layout.pages).filter(|&p| layout.is_dirty(p)).collect();
    let mut due = Some(Instant::now());
    for round in 1.. {
        due = next_due(due, args.dirty_every);
        if input_closed_by(&closed, due)? {
            break;
        }
        memory.write(dirty.iter().copied(), round);
    }
    Ok(())
}

enum Event {
    InputClosed,
    /// A worker's `ready` or `filled` line, to forward.
    Line(String),
    WorkerFailed(u32, String),
}

#[derive(Default)]
struct State {
    closed: bool,
    failure: Option<String>,
}

impl State {
    fn running(&self) -> bool {
        !self.closed && self.failure.is_none()
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::InputClosed => self.closed = true,
            Event::Line(line) => {
                let mut out = io::stdout().lock();
                // The runner is gone if this fails: stop as if the input had closed.
                if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                    self.closed = true;
                }
            }
            Event::WorkerFailed(i, why) => self.failure = Some(format!("worker {i}: {why}")),
        }
    }
}

fn parent(args: &Args) -> Result<()> {
    layout(args)?;
    if args.procs == 0 {
        bail!("--procs must be at least 1");
    }
    let exe = std::env::current_exe().context("finding this program")?;
    let (tx, rx) = mpsc::channel();
    let input = tx.clone();
    std::thread::spawn(move || {
        let _ = io::copy(&mut io::stdin().lock(), &mut io::sink());
        let _ = input.send(Event::InputClosed);
    });

    let mut workers: Vec<Child> = vec![];
    let start = Instant::now();
    let mut state = State::default();
    for index in 0..args.procs {
        let at = start + args.stagger * index;
        while state.running() {
            let left = at.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(ev) => state.handle(ev),
                Err(mpsc::RecvTimeoutError::Timeout) => break,
                Err(mpsc::RecvTimeoutError::Disconnected) => state.closed = true,
            }
        }
        if !state.running() {
            break;
        }
        let mut child = Command::new(&exe)
            .arg("--worker")
            .arg(index.to_string())
            .arg("--size-mib")
            .arg(args.size_mib.to_string())
            .arg("--unique-fraction")
            .arg(args.unique_fraction.to_string())
            .arg("--ramp")
            .arg(humantime::format_duration(args.ramp).to_string())
            .arg("--dirty-fraction")
            .arg(args.dirty_fraction.to_string())
            .arg("--dirty-every")
            .arg(humantime::format_duration(args.dirty_every).to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting worker {index}"))?;
        let stdout = child.stdout.take().context("worker stdout")?;
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut line = String::new();
            let mut reader = BufReader::new(stdout);
            let event = match reader.read_line(&mut line) {
                Ok(n) if n > 0 && line.starts_with("ready ") => Event::Line(line.trim_end().to_owned()),
                Ok(_) => Event::WorkerFailed(index, "exited before it was ready".into()),
                Err(e) => Event::WorkerFailed(index, format!("reading its output: {e}")),
            };
            let ready = matches!(event, Event::Line(_));
            let _ = tx.send(event);
            // Then `filled`, when it has a ramp; a worker ending early shows when it is waited on.
            for line in reader.lines().map_while(Result::ok) {
                if ready && line.starts_with("filled ") {
                    let _ = tx.send(Event::Line(line));
                }
            }
        });
        workers.push(child);
    }
    drop(tx);
    while state.running() {
        match rx.recv() {
            Ok(ev) => state.handle(ev),
            Err(_) => break,
        }
    }
    // Closing their inputs ends them; wait so their memory is gone when we exit.
    for w in &mut workers {
        drop(w.stdin.take());
    }
    let mut bad = vec![];
    for (i, w) in workers.iter_mut().enumerate() {
        let status = w.wait().with_context(|| format!("waiting for worker {i}"))?;
        if !status.success() {
            bad.push(format!("worker {i} {status}"));
        }
    }
    if let Some(f) = state.failure {
        bail!("{f}");
    }
    if !bad.is_empty() {
        bail!("{}", bad.join(", "));
    }
    Ok(())
}
