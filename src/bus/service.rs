//! The `org.kata.KsmThrottler` object: a thin layer that checks the caller, parses the input,
//! hands the command to the engine and reports the result. The engine's published [`Status`]
//! backs the properties; a task turns its changes into `PropertiesChanged` signals.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use zbus::fdo::Properties;
use zbus::message::Header;
use zbus::names::InterfaceName;
use zbus::object_server::SignalEmitter;
use zbus::{interface, Connection, Variant};

use crate::bus::authorize::{Action, Authority};
use crate::bus::calls::CallTracker;
use crate::bus::error::BusError;
use crate::core::accounting::saved_bytes;
use crate::core::need::Gate;
use crate::core::setting::Mode;
use crate::engine::{CycleCpu, Handle, Status};
use crate::io::ksmd::Ksmd;
use crate::io::sysfs::Ksm;
use crate::io::{meminfo, pressure};
use crate::names::{INTERFACE, OBJECT_PATH};

pub struct Throttler {
    engine: Handle,
    status: watch::Receiver<Status>,
    authority: Arc<Authority>,
    /// Read-only here: the statistics are read live on each Get; only the engine writes.
    ksm: Ksm,
    page_size: u64,
    calls: Arc<CallTracker>,
    readers: Readers,
}

/// What the live cost and need properties read: ksmd's thread, meminfo and the PSI file.
#[derive(Debug)]
pub struct Readers {
    ksmd: Ksmd,
    meminfo: PathBuf,
    pressure: PathBuf,
    /// When the daemon started and ksmd's CPU time then: the share shown before any cycle.
    started: (Instant, Option<Duration>),
}

impl Readers {
    pub fn new(proc_root: &Path, meminfo: &Path) -> Readers {
        let ksmd = Ksmd::new(proc_root);
        let started = (Instant::now(), ksmd.cpu_time().ok());
        Readers { ksmd, meminfo: meminfo.to_owned(), pressure: pressure::path_under(proc_root), started }
    }

    /// ksmd's share of one CPU over the cycle under way or the last one, else since start-up;
    /// `None` where ksmd cannot be read.
    pub fn ksmd_share(&self, cycle: Option<CycleCpu>, now: Instant) -> Option<f64> {
        let (cpu, wall) = self.ksmd_over(cycle, now)?;
        share(cpu, wall)
    }

    /// ksmd's CPU time and the wall time over the cycle under way or the last one, else since
    /// start-up; `None` where ksmd cannot be read.
    pub fn ksmd_over(&self, cycle: Option<CycleCpu>, now: Instant) -> Option<(Duration, Duration)> {
        let (from, cpu_from, to, cpu_to) = match cycle {
            Some(CycleCpu { started, cpu_at_start, ended: Some((at, cpu)) }) => (started, cpu_at_start, at, cpu),
            Some(CycleCpu { started, cpu_at_start, ended: None }) => {
                (started, cpu_at_start, now, self.ksmd.cpu_time().ok()?)
            }
            None => (self.started.0, self.started.1?, now, self.ksmd.cpu_time().ok()?),
        };
        Some((cpu_to.saturating_sub(cpu_from), to.saturating_duration_since(from)))
    }
}

/// CPU time over wall time; `None` over no time at all.
fn share(cpu: Duration, wall: Duration) -> Option<f64> {
    (!wall.is_zero()).then(|| cpu.as_secs_f64() / wall.as_secs_f64())
}

impl Throttler {
    pub fn new(
        engine: Handle,
        status: watch::Receiver<Status>,
        authority: Arc<Authority>,
        ksm: Ksm,
        page_size: u64,
        readers: Readers,
    ) -> Self {
        Throttler { engine, status, authority, ksm, page_size, calls: CallTracker::new(), readers }
    }

    /// The count of `Kick` and `SetMode` calls in flight, for exiting on idle.
    pub fn calls(&self) -> Arc<CallTracker> {
        Arc::clone(&self.calls)
    }

    /// A KSM counter read now; 0 where this kernel does not have it.
    fn counter(&self, name: &str) -> zbus::fdo::Result<i64> {
        self.ksm.read_counter(name).map(|v| v.unwrap_or(0)).map_err(|e| zbus::fdo::Error::IOError(e.to_string()))
    }

    fn count(&self, name: &str) -> zbus::fdo::Result<u64> {
        Ok(self.counter(name)?.max(0) as u64)
    }

    /// A knob every KSM kernel has: one that is missing or unreadable is an error naming the path
    /// (never 0 beside a setting that says otherwise).
    fn knob(&self, name: &str) -> zbus::fdo::Result<u64> {
        self.ksm.read_knob(name).map_err(|e| zbus::fdo::Error::IOError(e.to_string()))
    }
}

/// Controls the Linux KSM daemon (ksmd) for hosts that start many similar virtual machines.
#[interface(name = "org.kata.KsmThrottler", spawn = true)]
impl Throttler {
    /// New virtual machines are starting: scan aggressively now, then step down.
    async fn kick(&self, #[zbus(header)] header: Header<'_>) -> Result<(), BusError> {
        let _call = self.calls.enter(&header);
        self.authority.check(&header, Action::Kick).await?;
        Ok(self.engine.kick().await?)
    }

    /// Changes how KSM is driven: one of `Mode::NAMES` (or an alias); anything else is InvalidArgs.
    async fn set_mode(&self, mode: &str, #[zbus(header)] header: Header<'_>) -> Result<(), BusError> {
        let _call = self.calls.enter(&header);
        let mode: Mode = mode.parse()?;
        self.authority.check(&header, Action::SetMode).await?;
        Ok(self.engine.set_mode(mode).await?)
    }

    /// Sets the need gate: `always` or `when-needed`; anything else is InvalidArgs. Under the
    /// set-mode polkit action.
    async fn set_need_gate(&self, gate: &str, #[zbus(header)] header: Header<'_>) -> Result<(), BusError> {
        let _call = self.calls.enter(&header);
        let gate: Gate = gate.parse()?;
        self.authority.check(&header, Action::SetMode).await?;
        Ok(self.engine.set_need_gate(gate).await?)
    }

    /// The need gate: always or when-needed.
    #[zbus(property)]
    fn need_gate(&self) -> String {
        self.status.borrow().gate.as_str().to_owned()
    }

    /// The gate's state: not-gated, needed or not-needed.
    #[zbus(property)]
    fn need(&self) -> String {
        self.status.borrow().need.as_str().to_owned()
    }

    /// The figure that decided the gate's state.
    #[zbus(property)]
    fn need_reason(&self) -> String {
        self.status.borrow().need_reason.clone()
    }

    /// The setting in force: initial, aggressive, standard, slow or off.
    #[zbus(property)]
    fn current_setting(&self) -> String {
        self.status.borrow().setting.as_str().to_owned()
    }

    /// How KSM is driven: one of `Mode::NAMES`.
    #[zbus(property)]
    fn mode(&self) -> String {
        self.status.borrow().mode.as_str().to_owned()
    }

    /// CLOCK_REALTIME microseconds of the next scheduled step down; 0 when none.
    #[zbus(property)]
    fn next_step_down(&self) -> u64 {
        self.status.borrow().next_step_down_us
    }

    /// Kicks received since start-up. Not signalled: it changes with every kick.
    #[zbus(property(emits_changed_signal = "false"))]
    fn kick_count(&self) -> u64 {
        // Counted as each kick is answered: the published status lags the kicks answered
        // without the engine (quick_kick).
        self.engine.kick_count()
    }

    /// Setting changes applied since start-up, by cause, every cause present. Not signalled: the
    /// change of CurrentSetting that comes with each one is.
    #[zbus(property(emits_changed_signal = "false"))]
    fn transition_counts(&self) -> HashMap<String, u64> {
        self.status.borrow().transitions.iter().map(|(c, n)| (c.to_string(), n)).collect()
    }

    /// The throttler's version.
    #[zbus(property(emits_changed_signal = "const"))]
    fn version(&self) -> String {
        env!("CARGO_PKG_VERSION").to_owned()
    }

    /// KSM pages in use (each backs several mappings): /sys/kernel/mm/ksm/pages_shared, read live.
    #[zbus(property(emits_changed_signal = "false"))]
    fn pages_shared(&self) -> zbus::fdo::Result<u64> {
        self.count("pages_shared")
    }

    /// Mappings that share a KSM page, i.e. pages saved: pages_sharing, read live.
    #[zbus(property(emits_changed_signal = "false"))]
    fn pages_sharing(&self) -> zbus::fdo::Result<u64> {
        self.count("pages_sharing")
    }

    /// Pages unique but checked again and again: pages_unshared, read live.
    #[zbus(property(emits_changed_signal = "false"))]
    fn pages_unshared(&self) -> zbus::fdo::Result<u64> {
        self.count("pages_unshared")
    }

    /// Pages changing too fast to merge: pages_volatile, read live.
    #[zbus(property(emits_changed_signal = "false"))]
    fn pages_volatile(&self) -> zbus::fdo::Result<u64> {
        self.count("pages_volatile")
    }

    /// Full scans of all mergeable memory completed: full_scans, read live.
    #[zbus(property(emits_changed_signal = "false"))]
    fn full_scans(&self) -> zbus::fdo::Result<u64> {
        self.count("full_scans")
    }

    /// Empty pages merged with the zero page (use_zero_pages): ksm_zero_pages; 0 before Linux 6.10.
    #[zbus(property(emits_changed_signal = "false"))]
    fn ksm_zero_pages(&self) -> zbus::fdo::Result<u64> {
        self.count("ksm_zero_pages")
    }

    /// Bytes KSM saves net of its own metadata (may be negative): general_profit; 0 before Linux 6.7.
    #[zbus(property(emits_changed_signal = "false"))]
    fn general_profit(&self) -> zbus::fdo::Result<i64> {
        self.counter("general_profit")
    }

    /// Bytes saved: (pages_sharing + ksm_zero_pages) x page size.
    #[zbus(property(emits_changed_signal = "false"))]
    fn saved_bytes(&self) -> zbus::fdo::Result<u64> {
        Ok(saved_bytes(self.count("pages_sharing")?, self.count("ksm_zero_pages")?, self.page_size))
    }

    /// The `run` knob in force (0 stopped, 1 running, 2 unmerging), read live.
    #[zbus(property(emits_changed_signal = "false"))]
    fn run(&self) -> zbus::fdo::Result<u32> {
        Ok(u32::try_from(self.knob("run")?).unwrap_or(u32::MAX))
    }

    /// The `pages_to_scan` knob in force, read live.
    #[zbus(property(emits_changed_signal = "false"))]
    fn pages_to_scan(&self) -> zbus::fdo::Result<u64> {
        self.knob("pages_to_scan")
    }

    /// The `sleep_millisecs` knob in force, read live.
    #[zbus(property(emits_changed_signal = "false"))]
    fn sleep_millisecs(&self) -> zbus::fdo::Result<u64> {
        self.knob("sleep_millisecs")
    }

    /// ksmd's CPU time since boot in seconds, read live; -1 where ksmd cannot be found.
    #[zbus(property(emits_changed_signal = "false"))]
    fn ksmd_cpu_seconds(&self) -> f64 {
        self.readers.ksmd.cpu_time().map_or(-1.0, |d| d.as_secs_f64())
    }

    /// ksmd's share of one CPU over the cycle under way or the last one (since start-up before
    /// any); -1 where unknown.
    #[zbus(property(emits_changed_signal = "false"))]
    fn ksmd_cpu_share(&self) -> f64 {
        let cycle = self.status.borrow().cycle_cpu;
        self.readers.ksmd_share(cycle, Instant::now()).unwrap_or(-1.0)
    }

    /// ksmd's CPU seconds over the cycle under way or the last one (since start-up before any),
    /// what the cycle's savings cost; -1 where unknown.
    #[zbus(property(emits_changed_signal = "false"))]
    fn ksmd_cycle_cpu_seconds(&self) -> f64 {
        let cycle = self.status.borrow().cycle_cpu;
        self.readers.ksmd_over(cycle, Instant::now()).map_or(-1.0, |(cpu, _)| cpu.as_secs_f64())
    }

    /// MemAvailable / MemTotal, read live; -1 where meminfo lacks them.
    #[zbus(property(emits_changed_signal = "false"))]
    fn mem_available_ratio(&self) -> f64 {
        meminfo::mem_available(&self.readers.meminfo).map_or(-1.0, |m| m.ratio())
    }

    /// Memory PSI `some avg10` (percent), read live; -1 without PSI.
    #[zbus(property(emits_changed_signal = "false"))]
    fn memory_pressure_some(&self) -> f64 {
        pressure::read(&self.readers.pressure).ok().flatten().map_or(-1.0, |p| p.some_avg10)
    }

    /// Memory PSI `full avg10` (percent), read live; -1 without PSI.
    #[zbus(property(emits_changed_signal = "false"))]
    fn memory_pressure_full(&self) -> f64 {
        pressure::read(&self.readers.pressure).ok().flatten().map_or(-1.0, |p| p.full_avg10)
    }
}

/// Emits one `PropertiesChanged` per published change, holding every property that changed.
pub async fn signal_changes(conn: Connection, mut status: watch::Receiver<Status>) -> zbus::Result<()> {
    let emitter = SignalEmitter::new(&conn, OBJECT_PATH)?;
    let iface = InterfaceName::from_static_str_unchecked(INTERFACE);
    let mut last = status.borrow_and_update().clone();
    while status.changed().await.is_ok() {
        let now = status.borrow_and_update().clone();
        let mut changed: HashMap<&str, Variant<'_>> = HashMap::new();
        if now.setting != last.setting {
            changed.insert("CurrentSetting", Variant::from(now.setting.as_str()));
        }
        if now.mode != last.mode {
            changed.insert("Mode", Variant::from(now.mode.as_str()));
        }
        if now.next_step_down_us != last.next_step_down_us {
            changed.insert("NextStepDown", Variant::from(now.next_step_down_us));
        }
        if now.gate != last.gate {
            changed.insert("NeedGate", Variant::from(now.gate.as_str()));
        }
        if now.need != last.need {
            changed.insert("Need", Variant::from(now.need.as_str()));
        }
        if now.need_reason != last.need_reason {
            changed.insert("NeedReason", Variant::from(now.need_reason.clone()));
        }
        if !changed.is_empty() {
            if let Err(e) = Properties::properties_changed(&emitter, iface.clone(), changed, Cow::Borrowed(&[])).await {
                tracing::warn!("emitting PropertiesChanged: {e}");
            }
        }
        last = now;
    }
    Ok(())
}
