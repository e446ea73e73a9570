//! One run of ksm-modes-bench: `ksm-workload` in one workload and one mode, kicked as Kata's
//! trigger would and sampled over the window.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{ChildStdin, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use kata_ksm_throttler_test_support::child::{ensure_gone, Guarded};
use kernel_bench::analysis::{self, Scale, Start};
use kernel_bench::daemon::DaemonRun;
use kernel_bench::harness::{current_setting, sample_clock, SAMPLE_EVERY};
use kernel_bench::modes::BenchMode;
use kernel_bench::real_ksm::RealKsm;
use kernel_bench::report::RunRecord;
use kernel_bench::sample::{load_average, merging_pages, Sample, Sampler};
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};

use super::{Plan, WorkloadKind, READY_LIMIT, UNMERGE_LIMIT};

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

pub(super) async fn run_one(plan: &Plan, real: &RealKsm, mode: BenchMode, kind: WorkloadKind) -> Result<RunRecord> {
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
        Ok(Sample::at(&r, t.duration_since(t0).as_secs_f64(), cpu0, setting, merging))
    };
    samples.push(take(t0, current_setting(daemon.as_ref(), mode, started).await?, &ready)?);

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
    let mut tick = sample_clock(t0 + SAMPLE_EVERY);
    let mut next_report = 30.0;
    loop {
        tokio::select! {
            now = tick.tick() => {
                let s = take(now, current_setting(daemon.as_ref(), mode, started).await?, &ready)?;
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
