//! One run of ksm-vm-bench: one workload of guests in one mode, sampled over the window.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use kernel_bench::analysis::{self, Scale};
use kernel_bench::daemon::DaemonRun;
use kernel_bench::guest::GuestImage;
use kernel_bench::harness::{current_setting, sample_clock};
use kernel_bench::modes::BenchMode;
use kernel_bench::real_ksm::RealKsm;
use kernel_bench::report::RunRecord;
use kernel_bench::sample::{load_average, merging_pages, process_cpu_s, Sample, Sampler};
use kernel_bench::vm::Vm;
use tokio::time::Instant;

use super::{Plan, Workload, ADVISOR_PRIME_LIMIT, UNMERGE_LIMIT};

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

pub(super) async fn run_one(
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
        Ok(Sample::at(&r, t.duration_since(t0).as_secs_f64(), cpu0, setting, merging))
    };
    let mut samples = vec![take(t0, current_setting(daemon.as_ref(), mode, false).await?, &guests)?];
    if daemon.is_none() && mode != BenchMode::Advisor {
        let knobs = mode
            .fixed_knobs(real.ksm().has_advisor())
            .ok_or_else(|| anyhow!("{} cannot run on this kernel (no advisor_mode?)", mode.name()))?;
        real.ksm().apply(&knobs)?;
    }

    let window = plan.window.as_secs_f64();
    let mut tick = sample_clock(t0);
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
        let s = take(now, current_setting(daemon.as_ref(), mode, true).await?, &guests)?;
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
