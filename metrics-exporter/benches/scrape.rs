//! The exporter's benchmark: the release exporter in front of the release daemon on a private
//! `dbus-daemon` and a scratch sysfs, scraped over TCP as Prometheus scrapes it (a new
//! connection per scrape, `Accept` asking for OpenMetrics). It prints a table and writes the
//! same figures as JSON:
//!
//! - scrape latency p50/p99/max over 1,000 scrapes one after another (each one reads the bus:
//!   none arrived while another was being read);
//! - the exporter's RSS fresh (before any scrape), after the first scrape and after the load;
//! - 1,000 scrapes at once: every one answered, the wall time, the peak RSS (VmHWM);
//! - under fire (issue 30, item 6): scrapes one every 100 ms while 1,000 connections are held
//!   open saying nothing, 50 drip their headers a byte at a time and oversized and fuzzed requests
//!   keep coming: latency p50/p99/max (it must stay under 1 s) and the peak RSS;
//! - wake-ups while not scraped: the exporter's context switches over 10 s of no scrape.
//!
//!   cargo bench -p kata-ksm-throttler-exporter --bench scrape                 # the full run (~20 s)
//!   cargo bench -p kata-ksm-throttler-exporter --bench scrape -- --smoke      # a few seconds
//!   cargo bench -p kata-ksm-throttler-exporter --bench scrape -- --json FILE  # (<target>/exporter.json)
//!
//! Nothing here touches the real /sys/kernel/mm/ksm.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use kata_ksm_throttler_test_support::bench::Latencies;
use kata_ksm_throttler_test_support::http::free_port;
use kata_ksm_throttler_test_support::http_fire::{Fire, FirePlan};
use kata_ksm_throttler_test_support::{procfs, start_bus, Daemon, Guarded, Scratch};
use serde_json::json;
use std::sync::atomic::Ordering;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const EXPORTER: &str = env!("CARGO_BIN_EXE_kata-ksm-throttler-exporter");
const ACCEPT: &str = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5";

#[derive(Debug, Clone, Copy)]
struct Plan {
    smoke: bool,
    sequential: usize,
    concurrent: usize,
    under_fire: usize,
    idle: Duration,
}

impl Plan {
    const FULL: Plan =
        Plan { smoke: false, sequential: 1_000, concurrent: 1_000, under_fire: 100, idle: Duration::from_secs(10) };
    const SMOKE: Plan =
        Plan { smoke: true, sequential: 100, concurrent: 100, under_fire: 20, idle: Duration::from_secs(2) };
}

fn options() -> Result<(Plan, PathBuf)> {
    let mut plan = Plan::FULL;
    let mut json = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--smoke" => plan = Plan::SMOKE,
            "--json" => json = Some(PathBuf::from(args.next().context("--json needs a file")?)),
            "--bench" => {}
            other => bail!("unknown argument {other:?} (--smoke, --json FILE)"),
        }
    }
    let json = match json {
        Some(p) => p,
        None => {
            let exe = std::env::current_exe().context("the benchmark's executable")?;
            exe.ancestors()
                .nth(3)
                .with_context(|| format!("no target folder above {}", exe.display()))?
                .join("exporter.json")
        }
    };
    Ok((plan, json))
}

fn main() -> std::process::ExitCode {
    kata_ksm_throttler_test_support::bench::main("exporter bench", || async {
        run().await.map_err(|e| format!("{e:#}"))
    })
}

/// One scrape on a new connection; the status and the body's length.
async fn scrape(addr: SocketAddr) -> Result<(u16, usize)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.context("connecting")?;
    let req = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nAccept: {ACCEPT}\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await.context("sending")?;
    let mut raw = Vec::with_capacity(8192);
    stream.read_to_end(&mut raw).await.context("reading")?;
    let status = raw.get(9..12).and_then(|s| std::str::from_utf8(s).ok()).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = raw.windows(4).position(|w| w == b"\r\n\r\n").map_or(0, |i| raw.len() - i - 4);
    Ok((status, body))
}

fn kib(f: procfs::Footprint) -> String {
    format!(
        "{:.2} MiB (peak {:.2} MiB, {} threads)",
        f.vm_rss_kib as f64 / 1024.0,
        f.vm_hwm_kib as f64 / 1024.0,
        f.threads
    )
}

async fn run() -> Result<()> {
    let (plan, json_path) = options()?;
    let bus = start_bus();
    let scratch = Scratch::with_counters();
    scratch.set("pages_sharing", "262144\n");
    let _daemon = Daemon::try_spawn(&bus, &scratch, &[]).map_err(anyhow::Error::msg)?;
    // The daemon owns its name before the first scrape, so every scrape finds it up.
    let conn = zbus::connection::Builder::address(bus.address()).build().await?;
    kata_ksm_throttler_test_support::bus::wait_for_throttler(&conn, "the daemon to take its name").await;

    let addr = free_port();
    let log = scratch.path().join("exporter.log");
    let mut command = Command::new(EXPORTER);
    command.args(["--bus", bus.address(), "--listen", &addr.to_string(), "--sysfs-root"]).arg(scratch.ksm());
    let exporter = Guarded::spawn_logged(&mut command, "kata-ksm-throttler-exporter", &log)?;
    let pid = exporter.pid().context("the exporter's PID")?;
    let start = Instant::now();
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        ensure!(start.elapsed() < Duration::from_secs(10), "not listening after 10 s; log:\n{}", exporter.log_text());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let fresh = procfs::footprint(pid)?;
    let (status, size) = scrape(addr).await?;
    ensure!(status == 200, "the first scrape: status {status}; log:\n{}", exporter.log_text());
    let first = procfs::footprint(pid)?;

    let sequential = Latencies::sequential(plan.sequential, || async {
        let (status, _) = scrape(addr).await?;
        ensure!(status == 200, "status {status}");
        Ok::<_, anyhow::Error>(())
    })
    .await?;
    let after_sequential = procfs::footprint(pid)?;

    // All at once: each task connects, asks and reads; none is answered before all have started.
    let flood_start = Instant::now();
    let tasks: Vec<_> =
        (0..plan.concurrent).map(|_| tokio::spawn(async move { (scrape(addr).await, Instant::now()) })).collect();
    let mut answered = 0;
    let mut failed = vec![];
    let mut times = Vec::with_capacity(plan.concurrent);
    for t in tasks {
        let (result, done) = t.await?;
        match result {
            Ok((200, _)) => {
                answered += 1;
                times.push(done - flood_start);
            }
            Ok((status, _)) => failed.push(format!("status {status}")),
            Err(e) => failed.push(format!("{e:#}")),
        }
    }
    let flood = Latencies::new(times, flood_start.elapsed());
    let after_flood = procfs::footprint(pid)?;

    // Under fire: the hostile clients on threads of their own, the scrapes spaced as a scraper's.
    ensure!(procfs::raise_fd_limit() >= 1_500, "1,000 held connections need the descriptors");
    let fire = Fire::start(addr, FirePlan { held: 1_000, drips: 50, seed: 30 });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let fire_start = Instant::now();
    let mut fire_times = Vec::with_capacity(plan.under_fire);
    for _ in 0..plan.under_fire {
        let asked = Instant::now();
        let (status, _) = scrape(addr).await?;
        ensure!(status == 200, "a scrape under fire: status {status}; log:\n{}", exporter.log_text());
        fire_times.push(asked.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let under_fire = Latencies::new(fire_times, fire_start.elapsed());
    let counts = fire.stop();
    let after_fire = procfs::footprint(pid)?;

    // Not scraped: wait for what the load left (tokio's idle blocking threads end after 10 s),
    // then count.
    tokio::time::sleep(Duration::from_secs(if plan.smoke { 1 } else { 11 })).await;
    let before_idle = procfs::context_switches(pid)?;
    tokio::time::sleep(plan.idle).await;
    let idle = procfs::context_switches(pid)?.since(before_idle);
    let after_idle = procfs::footprint(pid)?;

    let ms = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1e3);
    let mut table = String::new();
    use std::fmt::Write as _;
    writeln!(
        table,
        "exporter benchmark{} (release exporter and daemon, private bus, scratch sysfs)",
        if plan.smoke { " (smoke)" } else { "" }
    )?;
    writeln!(table, "  scrape size:                 {size} bytes (OpenMetrics)")?;
    writeln!(
        table,
        "  {} scrapes in sequence:     p50 {}  p99 {}  max {}  ({:.0}/s)",
        sequential.len(),
        ms(sequential.quantile(0.5)),
        ms(sequential.quantile(0.99)),
        ms(sequential.quantile(1.0)),
        sequential.per_sec()
    )?;
    writeln!(
        table,
        "  {} scrapes at once:         {answered} answered, {} failed; done by p50 {}  p99 {}  all {}",
        plan.concurrent,
        failed.len(),
        ms(flood.quantile(0.5)),
        ms(flood.quantile(0.99)),
        ms(flood.quantile(1.0))
    )?;
    writeln!(
        table,
        "  {} scrapes under fire:      p50 {}  p99 {}  max {}  ({} hostile connections closed, {} hostile requests)",
        plan.under_fire,
        ms(under_fire.quantile(0.5)),
        ms(under_fire.quantile(0.99)),
        ms(under_fire.quantile(1.0)),
        counts.closed_by_server.load(Ordering::Relaxed),
        counts.hostile_requests.load(Ordering::Relaxed)
    )?;
    writeln!(table, "  RSS fresh:                   {}", kib(fresh))?;
    writeln!(table, "  RSS after the first scrape:  {}", kib(first))?;
    writeln!(table, "  RSS after {} in sequence:  {}", plan.sequential, kib(after_sequential))?;
    writeln!(table, "  RSS after {} at once:      {}", plan.concurrent, kib(after_flood))?;
    writeln!(table, "  RSS after the fire:          {}", kib(after_fire))?;
    writeln!(table, "  RSS after idling:            {}", kib(after_idle))?;
    writeln!(
        table,
        "  wake-ups in {:?} unscraped:   {} voluntary, {} involuntary context switches",
        plan.idle, idle.voluntary, idle.involuntary
    )?;
    print!("{table}");
    if let Some(f) = failed.first() {
        eprintln!("first failure of the flood: {f}");
    }
    let fp =
        |f: procfs::Footprint| json!({ "vm_rss_kib": f.vm_rss_kib, "vm_hwm_kib": f.vm_hwm_kib, "threads": f.threads });
    let out = json!({
        "smoke": plan.smoke,
        "scrape_bytes": size,
        "sequential": sequential.json(),
        "concurrent": { "scrapes": plan.concurrent, "answered": answered, "failed": failed.len(), "done_by": flood.json() },
        "rss_fresh": fp(fresh),
        "rss_first_scrape": fp(first),
        "rss_after_sequential": fp(after_sequential),
        "rss_after_concurrent": fp(after_flood),
        "under_fire": { "scrapes": plan.under_fire, "latency": under_fire.json(), "rss": fp(after_fire) },
        "rss_after_idle": fp(after_idle),
        "idle": { "seconds": plan.idle.as_secs_f64(), "voluntary": idle.voluntary, "involuntary": idle.involuntary },
    });
    std::fs::write(&json_path, serde_json::to_string_pretty(&out)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    println!("figures: {}", json_path.display());
    ensure!(failed.is_empty(), "{} of {} concurrent scrapes failed", failed.len(), plan.concurrent);
    ensure!(
        under_fire.quantile(1.0) < Duration::from_secs(1),
        "a scrape under fire took {} (issue 30: within 1 s)",
        ms(under_fire.quantile(1.0))
    );
    Ok(())
}
