//! ksm-workload: processes that give KSM something to merge, like VMs booting from one image.
//!
//! Each process maps anonymous memory, fills it (page i holds the same bytes in every process,
//! bar a fraction of unique pages), marks it MADV_MERGEABLE, prints `ready <index> <pid>` and
//! holds the memory until its standard input is closed. The parent starts them (all at once, or
//! one every --stagger), forwards their `ready` lines, and when its own standard input closes (or
//! it is killed) their inputs close too, so none outlives it.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use kata_ksm_throttler::meminfo;
use kernel_bench::pattern::{fill_page, Layout};
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

fn layout(args: &Args) -> Result<Layout> {
    Ok(Layout::new(args.size_mib, args.unique_fraction, meminfo::page_size())?)
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
    for (page, chunk) in words.chunks_exact_mut(page_size / 8).enumerate() {
        let page = page as u64;
        fill_page(chunk, page, layout.is_unique(page).then_some(index));
    }
    // SAFETY: advice on our own mapping; MADV_MERGEABLE does not change its contents.
    unsafe { madvise(ptr, len, Advice::LinuxMergeable) }.context("madvise(MADV_MERGEABLE) (is KSM built in?)")?;
    let mut out = io::stdout().lock();
    writeln!(out, "ready {index} {}", std::process::id()).and_then(|()| out.flush()).context("reporting ready")?;
    // Hold the memory until the parent closes our input (or dies, which closes it too).
    io::copy(&mut io::stdin().lock(), &mut io::sink()).context("waiting on stdin")?;
    Ok(())
}

enum Event {
    InputClosed,
    Ready(String),
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
            Event::Ready(line) => {
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
                Ok(n) if n > 0 && line.starts_with("ready ") => Event::Ready(line.trim_end().to_owned()),
                Ok(_) => Event::WorkerFailed(index, "exited before it was ready".into()),
                Err(e) => Event::WorkerFailed(index, format!("reading its output: {e}")),
            };
            let _ = tx.send(event);
            let _ = reader.read_to_end(&mut Vec::new());
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
