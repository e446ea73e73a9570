//! The one task that owns the throttling state. The bus sends it commands; it feeds them and its
//! timer to the pure [`Policy`], applies the transitions to sysfs, keeps the administrator's
//! settings safe on disk while they are changed, and publishes a [`Status`] for the bus to show.
//!
//! ## Exit on idle
//!
//! With [`Engine::exit_when_idle`], an engine at rest in its start-up mode (initial settings,
//! nothing scheduled) for that long sends a notice; the bus edge then releases the bus name, lets
//! every call that was already routed here finish, and reports back ([`Handle::conclude_idle`]).
//! Calls keep being served meanwhile. If those late calls left the engine at rest, it ends
//! ([`Ended::Idle`]): a fresh instance would be in the very same state. If they moved it, it
//! either stays (the edge takes the name back) or, when the bus can start a successor, records
//! where it is ([`Handover`]) and ends without restoring anything ([`Ended::HandedOver`]); the
//! successor carries on from there. A stop signal that lands during that exchange (systemd
//! stops a `Type=dbus` unit as soon as its name is released) waits for the verdict.

use std::cell::Cell;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot, watch};

use crate::core::knobs::{Knobs, Target};
use crate::core::need::{Figure, Gate, Need, NeedGate, Readings, Thresholds};
use crate::core::plan::{self, plan};
use crate::core::policy::{resize_needed, Cause, Counters, Durations, Policy, Transition};
use crate::core::setting::Profiles;
use crate::core::setting::{Mode, Setting};
use crate::core::transitions::TransitionCounts;
use crate::core::written::{self, Written};
use crate::io::ksmd::Ksmd;
use crate::io::meminfo::{self, MeminfoError};
use crate::io::pressure;
use crate::io::state_file::{Handover, StateError, StateFile};
use crate::io::sysfs::{Ksm, SysfsError};
use crate::quick_kick::{self, QuickKick};

/// How long a failed timer step waits before it is tried again.
pub const RETRY_AFTER: Duration = Duration::from_secs(5);

/// A deadline that moves less than this is updated silently (see [`Engine::publish`]).
const SIGNAL_DEADLINE_MOVES_OVER_US: u64 = 1_000_000;

/// Everything the engine works on, injected so tests can point it at scratch files.
#[derive(Debug, Clone)]
pub struct Config {
    pub ksm: Ksm,
    pub meminfo: PathBuf,
    pub page_size: u64,
    pub state: StateFile,
    pub mode: Mode,
    pub durations: Durations,
    pub profiles: Profiles,
    /// Where ksmd's thread and /proc/pressure/memory are read (`/proc`).
    pub proc_root: PathBuf,
    /// The need gate at start-up and its thresholds (see [`crate::core::need`]).
    pub gate: Gate,
    pub need: Thresholds,
    /// Adaptive's profit back-off: full scans in a row with a negative general_profit (0: off).
    pub unprofitable_scans: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Sysfs(#[from] SysfsError),
    #[error(transparent)]
    Meminfo(#[from] MeminfoError),
    #[error("recording the initial settings: {0}")]
    State(#[from] StateError),
    #[error("the throttler is shutting down")]
    ShuttingDown,
}

pub type Reply = oneshot::Sender<Result<(), EngineError>>;

#[derive(Debug)]
pub enum Command {
    Kick(Reply),
    SetMode(Mode, Reply),
    /// New durations, profiles and need thresholds from a re-read configuration; the cycle
    /// goes on, and the running gate stays.
    Reload(Durations, Profiles, Thresholds, Reply),
    SetNeedGate(Gate, Reply),
    ConcludeIdle(Drain, oneshot::Sender<Verdict>),
}

/// What the bus edge found after an idle notice (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drain {
    /// The name is released and every call routed here before that has finished. `successor`:
    /// the bus can start another instance (the name is activatable).
    Done { successor: bool },
    /// The edge could not make sure of that (calls still in flight, a bus error): keep serving.
    Unsure,
}

/// The engine's answer to [`Handle::conclude_idle`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The engine is ending: do not take the name back.
    Exit,
    /// The engine keeps serving: take the name back.
    Stay,
}

/// Why [`Engine::run`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Asked to stop, or every handle gone: the administrator's settings are back.
    Shutdown,
    /// At rest, with the name released and nothing in flight: nothing to restore or lose.
    Idle,
    /// Moved by a late call after the name was released: the state is recorded for a successor
    /// and KSM is left as it is; the caller must see that a successor is started.
    HandedOver,
}

/// What the bus shows. `kick_count` changes without notifying watchers, so a kick storm does not
/// turn into a signal storm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub mode: Mode,
    pub setting: Setting,
    /// CLOCK_REALTIME microseconds of the next scheduled step, 0 when none.
    pub next_step_down_us: u64,
    pub kick_count: u64,
    /// Transitions applied since start-up, by cause; changes without a signal of its own (the
    /// setting's change is signalled).
    pub transitions: TransitionCounts,
    /// ksmd's CPU time at the start of the cycle under way or the last one (and at its end),
    /// for the bus to show ksmd's share of a CPU over it; `None` before any cycle, or where
    /// ksmd could not be read when it began.
    pub cycle_cpu: Option<CycleCpu>,
    pub gate: Gate,
    pub need: Need,
    /// The figure that decided the gate's state ("MemAvailable 12.0% < 20.0%").
    pub need_reason: String,
}

/// ksmd's CPU time (since boot) when a cycle left the initial settings, and when it came back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CycleCpu {
    pub started: Instant,
    pub cpu_at_start: Duration,
    /// When the cycle ended and ksmd's CPU time then; `None` while it runs.
    pub ended: Option<(Instant, Duration)>,
}

/// A handle to send commands to a running engine.
#[derive(Debug, Clone)]
pub struct Handle {
    commands: mpsc::Sender<Command>,
    quick: Arc<QuickKick>,
}

impl Handle {
    /// Answered at once if it changes nothing (see [`crate::quick_kick`]), else once applied.
    pub async fn kick(&self) -> Result<(), EngineError> {
        if self.quick.try_answer(now()) {
            return Ok(());
        }
        self.call(Command::Kick).await
    }

    /// Kicks received since start-up, those answered without the engine included.
    pub fn kick_count(&self) -> u64 {
        self.quick.count()
    }

    pub async fn set_mode(&self, mode: Mode) -> Result<(), EngineError> {
        self.call(|reply| Command::SetMode(mode, reply)).await
    }

    pub async fn reload(&self, durations: Durations, profiles: Profiles, need: Thresholds) -> Result<(), EngineError> {
        self.call(|reply| Command::Reload(durations, profiles, need, reply)).await
    }

    pub async fn set_need_gate(&self, gate: Gate) -> Result<(), EngineError> {
        self.call(|reply| Command::SetNeedGate(gate, reply)).await
    }

    /// Answers an idle notice: see the module documentation.
    pub async fn conclude_idle(&self, drain: Drain) -> Result<Verdict, EngineError> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(Command::ConcludeIdle(drain, tx)).await.map_err(|_| EngineError::ShuttingDown)?;
        rx.await.map_err(|_| EngineError::ShuttingDown)
    }

    async fn call(&self, make: impl FnOnce(Reply) -> Command) -> Result<(), EngineError> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(make(tx)).await.map_err(|_| EngineError::ShuttingDown)?;
        rx.await.map_err(|_| EngineError::ShuttingDown)?
    }
}

pub struct Engine {
    config: Config,
    policy: Policy,
    /// The administrator's settings while the throttler has changed anything; also on disk.
    saved: Option<Knobs>,
    /// What the cycle wrote over them, recorded beside them before each write.
    written: Written,
    /// `saved` is on disk (see [`Engine::record_writes`]).
    recorded: bool,
    /// The AnonPages (in pages) the setting in force was sized on, if it has a profile.
    sized_on: Option<u64>,
    /// Kicks that change nothing, answered by the handles; also counts every kick.
    quick: Arc<QuickKick>,
    transitions: TransitionCounts,
    status: watch::Sender<Status>,
    commands: mpsc::Receiver<Command>,
    idle: Option<IdleExit>,
    /// A stop signal arrived while an idle exit was being concluded.
    stop_requested: bool,
    /// [`Engine::start`] has run.
    started: bool,
    /// When to apply again a kick that failed (see [`Engine::retry_kick`]).
    kick_retry: Option<Instant>,
    /// The deadline last shown and its wall-clock form, so that a deadline that has not moved
    /// reads as the same microsecond every time (converting it again jitters by a microsecond).
    shown_deadline: Cell<Option<(Instant, u64)>>,
    ksmd: Ksmd,
    cycle_cpu: Option<CycleCpu>,
    need: NeedGate,
    /// When meminfo and PSI are read next: only while the gate applies.
    need_poll_at: Option<Instant>,
    /// A figure could not be read and that was logged: said once, not at every poll.
    need_garbled: bool,
}

struct IdleExit {
    after: Duration,
    notices: mpsc::Sender<()>,
    /// Since when the engine has been at rest with nothing happening; `None` while busy.
    since: Option<Instant>,
    /// A notice is out and not yet concluded.
    asked: bool,
}

impl Engine {
    /// The engine and its handle; nothing is read or written until [`Engine::run`], so a daemon
    /// can be serving (and queueing calls) before it touches KSM.
    pub fn new(config: Config) -> (Engine, Handle, watch::Receiver<Status>) {
        let mut policy = Policy::new(config.mode, config.durations);
        policy.set_unprofitable_scans(config.unprofitable_scans);
        let status = Status {
            mode: policy.mode(),
            setting: policy.setting(),
            next_step_down_us: 0,
            kick_count: 0,
            transitions: TransitionCounts::default(),
            cycle_cpu: None,
            gate: Gate::Always,
            need: Need::NotGated,
            need_reason: String::new(),
        };
        let (status_tx, status_rx) = watch::channel(status);
        // Bounded: a flood of callers waits here instead of growing memory.
        let (tx, rx) = mpsc::channel(256);
        let ksmd = Ksmd::new(&config.proc_root);
        let need = NeedGate::new(config.need);
        let quick = Arc::new(QuickKick::new(now()));
        let engine = Engine {
            config,
            policy,
            saved: None,
            written: Written::default(),
            recorded: false,
            sized_on: None,
            quick: quick.clone(),
            transitions: TransitionCounts::default(),
            status: status_tx,
            commands: rx,
            idle: None,
            stop_requested: false,
            started: false,
            kick_retry: None,
            shown_deadline: Cell::new(None),
            ksmd,
            cycle_cpu: None,
            need,
            need_poll_at: None,
            need_garbled: false,
        };
        (engine, Handle { commands: tx, quick }, status_rx)
    }

    /// Sends a notice on the returned channel each time the engine has been at rest in its
    /// start-up mode, with no command, for `after`; answer it with [`Handle::conclude_idle`].
    pub fn exit_when_idle(&mut self, after: Duration) -> mpsc::Receiver<()> {
        let (tx, rx) = mpsc::channel(1);
        self.idle = Some(IdleExit { after, notices: tx, since: None, asked: false });
        rx
    }

    /// What [`Engine::run`] does first, for a caller that must know it is done before it lets
    /// anyone in (the daemon takes its bus name only then, so nothing reads a crashed
    /// instance's knobs as this one's). On failure whatever start-up changed goes back, and the
    /// engine takes no command.
    pub fn start(&mut self) -> Result<(), EngineError> {
        self.started = true;
        self.startup().inspect_err(|_| {
            self.commands.close();
            let _ = self.restore("start-up failed");
        })
    }

    /// Puts back what a previous instance left changed (its state file), then enters the
    /// start-up mode. Fails if either cannot be done: starting on top of a half-restored host
    /// would record the wrong "initial" settings.
    fn startup(&mut self) -> Result<(), EngineError> {
        if self.resume()? {
            self.start_gate();
            self.publish();
            return Ok(());
        }
        let config = &self.config;
        match config.state.load_record() {
            Ok(Some(record)) => {
                let knobs = &record.knobs;
                tracing::warn!(
                    path = %config.state.path().display(),
                    run = knobs.run,
                    pages_to_scan = knobs.pages_to_scan,
                    sleep_millisecs = knobs.sleep_millisecs,
                    "a previous instance stopped mid-cycle: restoring the settings it recorded"
                );
                if self.restore_recorded(&record)? {
                    config.state.remove()?;
                } else {
                    // Kept, in memory and on disk, for the next restore (at exit, or by a
                    // successor) to try again; meanwhile the throttler serves.
                    self.saved = Some(record.knobs);
                    self.written = record.written.unwrap_or_default();
                    self.recorded = true;
                }
            }
            Ok(None) => {}
            // Kept aside by load(); the current values are the best guess of the original.
            Err(e @ StateError::Corrupt { .. }) => tracing::error!("{e}"),
            Err(e) => return Err(e.into()),
        }
        if let Some(t) = self.policy.start(now()) {
            self.apply(t)?;
        }
        self.start_gate();
        self.publish();
        Ok(())
    }

    /// Puts the configured gate in place and, if it applies, reads the need at once.
    fn start_gate(&mut self) {
        let gate = self.config.gate;
        if let Err(e) = self.step(|p, now| p.set_gate(gate, now)) {
            tracing::error!("the need gate at start-up: {e}");
        }
        self.poll_need();
    }

    /// Reads meminfo and PSI, lets the gate decide, and acts on it; schedules the next read
    /// while the gate applies (never otherwise: an ungated idle throttler never wakes).
    fn poll_need(&mut self) {
        if !self.policy.gated() {
            self.need_poll_at = None;
            return;
        }
        let now = now();
        let readings = self.read_need();
        let observed = self.need.observe(now, readings);
        if observed.garbled && !self.need_garbled {
            tracing::error!(?readings, "a need figure cannot be read: the gate keeps its last decision");
        } else if !observed.garbled && self.need_garbled {
            tracing::info!("the need figures read again");
        }
        self.need_garbled = observed.garbled;
        if let Some(needed) = observed.changed {
            tracing::info!(
                needed,
                reason = self.need.reason(),
                "memory {}",
                if needed { "needed" } else { "no longer needed" }
            );
        }
        // Every time, not only on a change: a step that failed is tried again at the next read.
        let needed = self.need.needed();
        if let Err(e) = self.step(|p, now| p.need(needed, now)) {
            tracing::error!(
                "acting on the need gate, again in {}s: {e}",
                self.need.thresholds().poll_interval.as_secs()
            );
        }
        self.need_poll_at = Some(now + self.need.thresholds().poll_interval);
    }

    fn on_need_poll(&mut self) {
        let before = self.policy.setting();
        self.poll_need();
        if self.policy.setting() != before {
            self.note_activity();
        }
        self.publish();
    }

    fn read_need(&self) -> Readings {
        let t = self.need.thresholds();
        let mem_available = if t.mem_available_below > 0.0 {
            match meminfo::mem_available(&self.config.meminfo) {
                Ok(m) => Figure::Value(m.ratio()),
                Err(e) => {
                    tracing::debug!("{e}");
                    Figure::Garbled
                }
            }
        } else {
            Figure::Absent
        };
        let psi_some = if t.psi_some_above > 0.0 {
            match pressure::read(&pressure::path_under(&self.config.proc_root)) {
                Ok(Some(p)) => Figure::Value(p.some_avg10),
                Ok(None) => Figure::Absent,
                Err(e) => {
                    tracing::debug!("{e}");
                    Figure::Garbled
                }
            }
        } else {
            Figure::Absent
        };
        Readings { mem_available, psi_some }
    }

    /// Puts a previous instance's record back over the knobs that still hold what it wrote
    /// (the others were set by someone else since, and stay: logged); `Ok(false)` if some knob
    /// could not be, which is logged. Knobs that cannot even be read (one left empty by a kill
    /// mid-write on a scratch directory) are all written blind, each one that can be.
    fn restore_recorded(&self, record: &crate::io::state_file::Record) -> Result<bool, EngineError> {
        let target = Target::from(&record.knobs);
        let e = match self.config.ksm.read() {
            Ok(have) => {
                let restore = written::restore(&record.knobs, record.written.as_ref(), &have);
                for kept in &restore.kept {
                    tracing::warn!(
                        knob = kept.knob,
                        found = kept.found,
                        recorded = kept.recorded,
                        "{} holds {}, which this throttler did not write: set since by someone else, it stays \
                         (the record says {})",
                        kept.knob,
                        kept.found,
                        kept.recorded
                    );
                }
                match self.config.ksm.execute(&plan(&have, &restore.target)) {
                    Ok(_) => return Ok(true),
                    Err(e) => e,
                }
            }
            Err(e) => e,
        };
        tracing::error!("{e}: writing every recorded knob");
        let failed = self.config.ksm.execute_each(&plan::plan_blind(&target));
        for e in &failed {
            tracing::error!("{e}: this knob stays as it is; the record is kept to try again");
        }
        Ok(failed.is_empty())
    }

    /// Carries on from where an instance that exited on idle handed over, if it did: `Ok(true)`.
    /// A hand-over that does not hold together is ignored (and the usual restore follows).
    fn resume(&mut self) -> Result<bool, EngineError> {
        let handover = match self.config.state.take_handover() {
            Ok(Some(h)) => h,
            Ok(None) => return Ok(false),
            Err(e @ StateError::Corrupt { .. }) => {
                tracing::error!("{e}");
                return Ok(false);
            }
            Err(e) => return Err(e.into()),
        };
        let record = match self.config.state.load_record() {
            Ok(record) => record,
            Err(e @ StateError::Corrupt { .. }) => {
                tracing::error!("{e}");
                return Ok(false);
            }
            Err(e) => return Err(e.into()),
        };
        let deadline = (handover.next_step_down_us > 0).then(|| {
            let due = UNIX_EPOCH + Duration::from_micros(handover.next_step_down_us);
            now() + due.duration_since(SystemTime::now()).unwrap_or_default()
        });
        let policy = match (handover.mode.parse::<Mode>(), Setting::from_name(&handover.setting)) {
            (Ok(mode), Some(setting)) => {
                Policy::resume(mode, setting, deadline, self.config.durations, now()).map(|mut p| {
                    p.set_unprofitable_scans(self.config.unprofitable_scans);
                    p
                })
            }
            _ => None,
        };
        let Some(policy) = policy.filter(|p| p.setting() == Setting::Initial || record.is_some()) else {
            tracing::error!(?handover, "ignoring a hand-over that does not hold together");
            return Ok(false);
        };
        tracing::info!(
            mode = %policy.mode(),
            setting = %policy.setting(),
            "carrying on where the instance that exited on idle left off"
        );
        self.recorded = record.is_some();
        (self.saved, self.written) = match record {
            Some(r) => (Some(r.knobs), r.written.unwrap_or_default()),
            None => (None, Written::default()),
        };
        self.policy = policy;
        if self.policy.setting() == Setting::Initial {
            // A record beside an initial setting is from a cycle that did not finish: put it back.
            self.restore("resumed in initial")?;
        } else {
            // In force already; applied again so that what the bus shows is what is in force
            // even if something touched KSM in between.
            self.put_in_force_now(self.policy.setting())?;
        }
        Ok(true)
    }

    /// Serves commands and timers until `shutdown` completes or every handle is gone, then puts
    /// the administrator's settings back; or until an idle exit concludes (see the module
    /// documentation).
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<Ended, EngineError> {
        if !self.started {
            self.start()?;
        }
        self.note_activity();
        tokio::pin!(shutdown);
        let ended = loop {
            let wake = self.policy.wake_at();
            let idle_due = self.idle_due();
            tokio::select! {
                biased;
                () = &mut shutdown, if !self.stop_requested => {
                    self.stop_requested = true;
                    if self.idle.as_ref().is_some_and(|i| i.asked) {
                        tracing::info!("stop requested while exiting on idle: concluding that first");
                    } else {
                        break Ended::Shutdown;
                    }
                }
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => if let Some(ended) = self.handle(cmd) { break ended },
                    None => break Ended::Shutdown,
                },
                // Before every timer: a kick answered in the window moves the deadline first.
                () = self.quick.answered() => self.take_quick_kicks(),
                () = sleep_until(wake) => self.on_wake(),
                () = sleep_until(self.kick_retry) => self.retry_kick(),
                () = sleep_until(self.need_poll_at) => self.on_need_poll(),
                () = sleep_until(idle_due) => self.on_idle(),
            }
        };
        self.commands.close();
        self.quick.open_until(None);
        match ended {
            Ended::HandedOver => Ok(ended),
            Ended::Idle => self.restore("idle exit").map(|()| ended),
            Ended::Shutdown => self.restore("shutdown").map(|()| ended),
        }
    }

    /// With the gate applying, never: the throttler has memory to watch.
    fn at_rest(&self) -> bool {
        self.saved.is_none()
            && self.kick_retry.is_none()
            && self.policy.at_rest_in(self.config.mode)
            && !self.policy.gated()
    }

    /// Restarts the idle clock: from now if at rest, else not running.
    fn note_activity(&mut self) {
        let since = self.at_rest().then(now);
        if let Some(idle) = &mut self.idle {
            idle.since = since;
        }
    }

    fn idle_due(&self) -> Option<Instant> {
        self.idle.as_ref().filter(|i| !i.asked).and_then(|i| i.since.map(|s| s + i.after))
    }

    fn on_idle(&mut self) {
        let Some(idle) = &mut self.idle else { return };
        match idle.notices.try_send(()) {
            Ok(()) => {
                tracing::info!("idle for {}: releasing the bus name to exit", humantime::format_duration(idle.after));
                idle.asked = true;
            }
            // Nobody listens any more: stay.
            Err(_) => self.idle = None,
        }
    }

    fn conclude_idle(&mut self, drain: Drain) -> (Verdict, Option<Ended>) {
        if let Some(idle) = &mut self.idle {
            idle.asked = false;
        }
        let ended = match drain {
            Drain::Done { .. } if self.at_rest() => Some(Ended::Idle),
            Drain::Done { successor: true } => match self.hand_over() {
                Ok(()) => Some(Ended::HandedOver),
                Err(e) => {
                    tracing::error!("cannot hand over to a successor, staying: {e}");
                    None
                }
            },
            Drain::Done { successor: false } | Drain::Unsure => None,
        };
        match ended.or(self.stop_requested.then_some(Ended::Shutdown)) {
            Some(ended) => (Verdict::Exit, Some(ended)),
            None => {
                tracing::info!("calls arrived while exiting on idle: staying");
                self.note_activity();
                (Verdict::Stay, None)
            }
        }
    }

    fn hand_over(&mut self) -> Result<(), EngineError> {
        let handover = Handover {
            mode: self.policy.mode().as_str().to_owned(),
            setting: self.policy.setting().as_str().to_owned(),
            next_step_down_us: self.next_step_down_us(),
        };
        self.config.state.save_handover(&handover)?;
        tracing::info!(?handover, "a late call moved the throttler after its name was released: handing over");
        Ok(())
    }

    fn handle(&mut self, cmd: Command) -> Option<Ended> {
        // The engine runs on a thread of its own: the status is published before the reply is
        // sent, so a caller that reads a property after its call returned sees what it did.
        let (result, reply) = match cmd {
            Command::Kick(reply) => {
                self.quick.count_one();
                (self.kick(), reply)
            }
            Command::SetMode(mode, reply) => {
                let setting = self.policy.setting();
                let result = self.step(|p, now| p.set_mode(mode, now));
                // The same setting under another mode: written again at the same size, so only what
                // the mode adds differs. The mode has changed by now, so a failure here is logged,
                // not returned.
                if result.is_ok() && self.policy.setting() == setting && self.saved.is_some() {
                    if let Err(e) = self.put_sized_now(setting, self.sized_on) {
                        tracing::error!(mode = %mode, "{setting} under the new mode: {e}");
                    }
                }
                // The gate applies in throttle and adaptive only: reading starts or stops.
                if self.policy.gated() != self.need_poll_at.is_some() {
                    self.poll_need();
                }
                (result, reply)
            }
            Command::Reload(durations, profiles, need, reply) => {
                self.need.set_thresholds(need);
                (self.reload(durations, profiles), reply)
            }
            Command::SetNeedGate(gate, reply) => {
                let result = self.step(|p, now| p.set_gate(gate, now));
                if result.is_ok() {
                    tracing::info!(gate = %gate, "need gate set");
                    self.poll_need();
                }
                (result, reply)
            }
            Command::ConcludeIdle(drain, reply) => {
                let (verdict, ended) = self.conclude_idle(drain);
                let _ = reply.send(verdict);
                return ended;
            }
        };
        self.note_activity();
        self.publish();
        let _ = reply.send(result);
        None
    }

    fn kick(&mut self) -> Result<(), EngineError> {
        let before = self.policy.setting();
        let result = self.step(|p, now| p.kick(now));
        // A kick that could not be applied is not lost (the caller still gets this error).
        self.retry_kick_if_failed(&result);
        // A kick that moved nothing (a storm, a pinned setting) still means new memory.
        if result.is_ok() && self.policy.setting() == before {
            if let Err(e) = self.resize_if_moved() {
                tracing::error!("sizing {before} again for the kick: {e}");
            }
        }
        result
    }

    /// The kicks the handles answered in the window, taken in as one: they changed nothing
    /// but the deadline (from now) and perhaps the size.
    fn take_quick_kicks(&mut self) {
        if self.quick.take() == 0 {
            return;
        }
        if let Err(e) = self.kick() {
            tracing::error!("a kick answered while nothing was to change: {e}");
        }
        self.note_activity();
        self.publish();
    }

    /// Until when a kick would change nothing but the deadline: never past the next timer (the
    /// policy's, the need gate's), never while a kick waits to be retried, an idle exit is being
    /// concluded (a hand-over records the deadline) or the engine stops.
    fn quick_window(&self) -> Option<Instant> {
        let exiting = self.idle.as_ref().is_some_and(|i| i.asked);
        if !self.started || self.kick_retry.is_some() || self.stop_requested || exiting {
            return None;
        }
        let now = now();
        if self.policy.clone().kick(now).is_some() {
            return None;
        }
        match [self.policy.wake_at(), self.need_poll_at].into_iter().flatten().min() {
            Some(next) => next.checked_sub(quick_kick::MARGIN).filter(|&t| t > now),
            None => Some(now + quick_kick::NO_TIMER),
        }
    }

    /// A kick that failed (meminfo or sysfs unreadable, the record unwritable), applied again.
    fn retry_kick(&mut self) {
        let result = self.step(|p, now| p.kick(now));
        if result.is_ok() {
            tracing::info!("the kick that had failed is applied");
        }
        self.retry_kick_if_failed(&result);
        self.note_activity();
        self.publish();
    }

    /// A kick that could not be applied is tried again [`RETRY_AFTER`] later, until it is.
    fn retry_kick_if_failed(&mut self, result: &Result<(), EngineError>) {
        self.kick_retry = result.as_ref().err().map(|e| {
            tracing::error!("the kick could not be applied, trying again in {}s: {e}", RETRY_AFTER.as_secs());
            now() + RETRY_AFTER
        });
    }

    fn on_wake(&mut self) {
        let now = now();
        if self.policy.sample_at().is_some_and(|at| at <= now) {
            let result = match self.read_counters() {
                Ok(c) => {
                    let mut seen = None;
                    let result = self.step(|p, now| {
                        seen = p.counters(now, c);
                        seen
                    });
                    if let (Ok(()), Some(t)) = (&result, seen.filter(|t| t.cause == Cause::Unprofitable)) {
                        tracing::warn!(
                            general_profit = c.general_profit,
                            full_scans = c.full_scans,
                            pages_sharing = c.pages_sharing,
                            "KSM costs more than it saves: general_profit {} bytes over {} full scans in a row; \
                             {} -> {} (the next kick tries again)",
                            c.general_profit.unwrap_or(0),
                            self.policy.unprofitable_scans(),
                            t.from,
                            t.to
                        );
                    }
                    result
                }
                Err(e) => Err(e.into()),
            };
            if let Err(e) = result {
                // The timeline still bounds every step; a later sample may do better.
                tracing::error!("adaptive sample failed, next in {}s: {e}", RETRY_AFTER.as_secs());
                self.policy.postpone_sample(now + RETRY_AFTER);
            }
        }
        if let Err(e) = self.step(|p, now| p.timer(now)) {
            tracing::error!("step down failed, retrying in {}s: {e}", RETRY_AFTER.as_secs());
            self.policy.postpone(now + RETRY_AFTER);
        }
        if self.policy.resize_at().is_some_and(|at| at <= now) {
            let resized = self.resize_if_moved().unwrap_or_else(|e| {
                tracing::error!("sizing {} again: {e}", self.policy.setting());
                false
            });
            self.policy.resize_checked(now, resized);
        }
        self.note_activity();
        self.publish();
    }

    fn read_counters(&self) -> Result<Counters, SysfsError> {
        let ksm = &self.config.ksm;
        let read = |name| -> Result<u64, SysfsError> { Ok(ksm.read_counter(name)?.unwrap_or(0).max(0) as u64) };
        Ok(Counters::new(
            read("full_scans")?,
            read("pages_shared")?,
            read("pages_sharing")?,
            read("pages_unshared")?,
            read("pages_volatile")?,
        )
        .with_profit(ksm.read_counter("general_profit")?)
        .with_visits(ksm.read_counter("pages_scanned")?.map(|v| v.max(0) as u64))
        // Unread, it only takes away the arrival rule (see `policy::ARRIVAL_QUIET`).
        .with_anon(meminfo::anon_pages(&self.config.meminfo, self.config.page_size).ok()))
    }

    /// Runs one policy event and applies its transition; on failure the policy is left as it was,
    /// so what the bus shows stays what is in force, and a cycle that failed at its very first
    /// step is undone (so a later cycle records the settings as they are then).
    fn step(&mut self, event: impl FnOnce(&mut Policy, Instant) -> Option<Transition>) -> Result<(), EngineError> {
        let before = self.policy.clone();
        let Some(t) = event(&mut self.policy, now()) else { return Ok(()) };
        let first = self.saved.is_none();
        self.apply(t).inspect_err(|e| {
            self.policy = before;
            if first {
                tracing::warn!("{e}: putting back what this first step changed");
                if let Err(e) = self.restore("a first step failed") {
                    tracing::error!("{e}");
                }
            } else if self.policy.setting() != Setting::Initial {
                // A step that failed half-way may have paused ksmd (run=0) or changed one scan
                // knob of two: put the setting in force back, so what is shown is what runs.
                let setting = self.policy.setting();
                if let Err(e) = self.put_in_force_now(setting) {
                    tracing::error!(setting = %setting, "putting the setting in force back: {e}");
                }
            }
        })
    }

    /// Takes new durations (for the steps still to come) and profiles (applied at once to the
    /// setting in force if its profile changed).
    fn reload(&mut self, durations: Durations, profiles: Profiles) -> Result<(), EngineError> {
        self.policy.set_durations(durations);
        let setting = self.policy.setting();
        let changed = self.config.profiles.get(setting) != profiles.get(setting);
        self.config.profiles = profiles;
        self.config.durations = durations;
        tracing::info!("configuration reloaded");
        if changed {
            self.put_in_force_now(setting)?;
            tracing::info!(setting = %setting, "new profile applied to the setting in force");
        }
        Ok(())
    }

    /// Carries a transition out, reading the knobs once: what is found is recorded (before the
    /// first change of a cycle) and the plan of writes starts from it.
    fn apply(&mut self, t: Transition) -> Result<(), EngineError> {
        let have = self.config.ksm.read()?;
        let written = if t.to == Setting::Initial {
            self.restore_over(have, &format!("{} -> initial", t.from))?
        } else {
            if self.saved.is_none() {
                self.warn_if_our_own(&have);
                // Recorded with the first writes (see record_writes).
                self.saved = Some(have.clone());
                self.written = Written::default();
                self.recorded = false;
                self.cycle_began();
            }
            self.put_in_force(&have, t.to)?
        };
        tracing::info!(
            from = %t.from,
            to = %t.to,
            cause = %t.cause,
            run = written.run,
            pages_to_scan = written.pages_to_scan,
            sleep_millisecs = written.sleep_millisecs,
            smart_scan = written.smart_scan,
            "KSM setting {} -> {} ({})",
            t.from,
            t.to,
            t.cause
        );
        self.transitions.record(t.cause);
        Ok(())
    }

    /// Knobs about to be recorded as the administrator's that look like one of the throttler's
    /// own settings (ksmd running at a profile's pace and a size near the profile's) are most
    /// likely a crashed instance's whose record was lost: they are recorded all the same (no one
    /// can tell), but said loudly.
    fn warn_if_our_own(&self, have: &Knobs) {
        let Ok(anon) = meminfo::anon_pages(&self.config.meminfo, self.config.page_size) else { return };
        let own = [Setting::Aggressive, Setting::Standard, Setting::Slow].into_iter().find(|&s| {
            self.config.profiles.get(s).is_some_and(|p| {
                let pages = p.pages_to_scan(anon);
                have.run == 1
                    && have.sleep_millisecs == u64::from(p.sleep_millisecs)
                    && have.pages_to_scan >= pages / 2
                    && have.pages_to_scan <= pages.saturating_mul(2)
            })
        });
        if let Some(setting) = own {
            tracing::warn!(
                run = have.run,
                pages_to_scan = have.pages_to_scan,
                sleep_millisecs = have.sleep_millisecs,
                "the KSM settings found look like this throttler's own {setting} setting: an instance may \
                 have stopped without its record. They are recorded as the administrator's and will be \
                 put back as such; if they are not, set the intended ones by hand after the cycle"
            );
        }
    }

    /// [`Self::put_sized`] over the knobs as they are read now.
    fn put_sized_now(&mut self, setting: Setting, anon: Option<u64>) -> Result<Knobs, EngineError> {
        let have = self.config.ksm.read()?;
        self.put_sized(&have, setting, anon)
    }

    /// [`Self::put_in_force`] over the knobs as they are read now.
    fn put_in_force_now(&mut self, setting: Setting) -> Result<Knobs, EngineError> {
        let have = self.config.ksm.read()?;
        self.put_in_force(&have, setting)
    }

    /// Writes `setting` (a throttling one, or `off`) over the knobs `have`, sized on AnonPages as
    /// it is now; returns the knobs in force.
    fn put_in_force(&mut self, have: &Knobs, setting: Setting) -> Result<Knobs, EngineError> {
        let anon = match self.config.profiles.get(setting) {
            Some(_) => Some(meminfo::anon_pages(&self.config.meminfo, self.config.page_size)?),
            None => None,
        };
        self.put_sized(have, setting, anon)
    }

    /// Writes `setting` sized on `anon` (AnonPages, for a setting with a profile) over `have`.
    fn put_sized(&mut self, have: &Knobs, setting: Setting, anon: Option<u64>) -> Result<Knobs, EngineError> {
        let target = self.target_for(setting, anon);
        let plan = plan(have, &target);
        self.record_writes(&plan.writes)?;
        let now = self.config.ksm.execute(&plan)?;
        self.sized_on = anon;
        Ok(now)
    }

    /// Records the administrator's settings with `writes` added to what the cycle wrote, before
    /// they are made: a successor puts a knob back only over a value listed (see
    /// [`crate::core::written`]). The first record of a cycle must be made; a later one that
    /// cannot (a state folder turned read-only) is logged, and the cycle goes on rather than
    /// hold ksmd at its current pace.
    fn record_writes(&mut self, writes: &[plan::Write]) -> Result<(), EngineError> {
        let Some(saved) = &self.saved else { return Ok(()) };
        let written = self.written.with(writes);
        if self.recorded && written == self.written {
            return Ok(());
        }
        match self.config.state.save_with(saved, &written) {
            Ok(()) => self.recorded = true,
            Err(e) if !self.recorded => return Err(e.into()),
            Err(e) => tracing::error!(
                "{e}: the record of the initial KSM settings cannot list this write; after a crash, a \
                 successor would take the knobs it changes for someone else's and leave them"
            ),
        }
        self.written = written;
        Ok(())
    }

    /// Sizes the setting in force again if AnonPages moved by more than a fair share since it
    /// was sized (see [`crate::core::policy::resize_needed`]); `Ok(true)` if it did.
    fn resize_if_moved(&mut self) -> Result<bool, EngineError> {
        let setting = self.policy.setting();
        let Some(sized_on) = self.sized_on.filter(|_| self.saved.is_some()) else { return Ok(false) };
        if self.config.profiles.get(setting).is_none() {
            return Ok(false);
        }
        let anon = meminfo::anon_pages(&self.config.meminfo, self.config.page_size)?;
        if !resize_needed(sized_on, anon) {
            return Ok(false);
        }
        self.put_sized_now(setting, Some(anon))?;
        tracing::info!(
            setting = %setting,
            anon_pages_before = sized_on,
            anon_pages = anon,
            "AnonPages moved: {setting} sized again"
        );
        Ok(true)
    }

    /// What `setting` writes; `anon`: AnonPages, for a setting with a profile.
    fn target_for(&self, setting: Setting, anon: Option<u64>) -> Target {
        let mode = self.policy.mode();
        // Only adaptive's aggressive setting asks (see plan::smart_scan); unreadable: not merged,
        // the setting that merges a new VM whatever its twin's age.
        let merged = mode == Mode::Adaptive
            && setting == Setting::Aggressive
            && self.config.ksm.read_counter("pages_shared").ok().flatten().is_some_and(|n| n > 0);
        plan::target(setting, mode, self.config.profiles.get(setting), self.saved.as_ref(), anon, merged)
    }

    /// Puts the administrator's settings back if they were changed; they stay recorded (in
    /// memory and on disk) until that has worked.
    fn restore(&mut self, why: &str) -> Result<(), EngineError> {
        if self.saved.is_some() {
            let have = self.config.ksm.read()?;
            self.restore_over(have, why)?;
        }
        Ok(())
    }

    /// [`Self::restore`] over the knobs `have`, just read; returns the knobs in force.
    fn restore_over(&mut self, have: Knobs, why: &str) -> Result<Knobs, EngineError> {
        let Some(saved) = self.saved.clone() else { return Ok(have) };
        let now = self.config.ksm.execute(&plan(&have, &self.target_for(Setting::Initial, None)))?;
        // The knobs are back: a record that cannot be removed (a read-only or full state folder)
        // must not make the timeline flap between the originals and the last setting. A later
        // start puts it back only over knobs that still hold what this cycle wrote.
        if let Err(e) = self.config.state.remove() {
            tracing::error!(
                path = %self.config.state.path().display(),
                "the initial KSM settings are back, but their record cannot be removed ({e}): a later \
                 start puts it back only over knobs that still hold this throttler's values; remove it by hand"
            );
        }
        tracing::info!(
            run = saved.run,
            pages_to_scan = saved.pages_to_scan,
            sleep_millisecs = saved.sleep_millisecs,
            "initial KSM settings restored ({why})"
        );
        self.saved = None;
        self.written = Written::default();
        self.recorded = false;
        self.sized_on = None;
        self.cycle_ended();
        Ok(now)
    }

    /// ksmd's CPU time as a cycle leaves the initial settings; unknown where ksmd is not found.
    fn cycle_began(&mut self) {
        self.cycle_cpu = match self.ksmd.cpu_time() {
            Ok(cpu) => Some(CycleCpu { started: now(), cpu_at_start: cpu, ended: None }),
            Err(e) => {
                tracing::debug!("ksmd's CPU time at the start of a cycle: {e}");
                None
            }
        };
    }

    fn cycle_ended(&mut self) {
        if let Some(c) = &mut self.cycle_cpu {
            c.ended = self.ksmd.cpu_time().ok().map(|cpu| (now(), cpu));
            if c.ended.is_none() {
                self.cycle_cpu = None;
            }
        }
    }

    fn next_step_down_us(&self) -> u64 {
        self.policy.deadline().map_or(0, |d| {
            let wall = SystemTime::now() + d.saturating_duration_since(now());
            wall.duration_since(UNIX_EPOCH).map_or(0, |t| t.as_micros() as u64)
        })
    }

    /// As [`Self::next_step_down_us`], but the same value as last shown while the deadline has
    /// not moved.
    fn shown_next_step_down_us(&self) -> u64 {
        let deadline = self.policy.deadline();
        match self.shown_deadline.get() {
            Some((shown, us)) if Some(shown) == deadline => us,
            _ => {
                let us = self.next_step_down_us();
                self.shown_deadline.set(deadline.map(|d| (d, us)));
                us
            }
        }
    }

    fn publish(&self) {
        let next_step_down_us = self.shown_next_step_down_us();
        let (mode, setting) = (self.policy.mode(), self.policy.setting());
        let kick_count = self.quick.count();
        self.quick.open_until(self.quick_window());
        let transitions = self.transitions;
        let cycle_cpu = self.cycle_cpu;
        let gate = self.policy.gate();
        let (need, need_reason) = if self.policy.gated() {
            let need = if self.need.needed() { Need::Needed } else { Need::NotNeeded };
            (need, self.need.reason().to_owned())
        } else if gate == Gate::Always {
            (Need::NotGated, "every kick drives KSM".to_owned())
        } else {
            (Need::NotGated, format!("mode {mode} ignores the gate"))
        };
        self.status.send_if_modified(|s| {
            // A kick storm moves the deadline on every kick: the value is kept current for Get,
            // but only a move of more than a second (or a real change) is worth a signal. The
            // kick count changes without one.
            let moved = s.next_step_down_us.abs_diff(next_step_down_us) > SIGNAL_DEADLINE_MOVES_OVER_US;
            let changed = s.mode != mode
                || s.setting != setting
                || moved
                || s.gate != gate
                || s.need != need
                || s.need_reason != need_reason;
            s.mode = mode;
            s.setting = setting;
            s.next_step_down_us = next_step_down_us;
            s.kick_count = kick_count;
            s.transitions = transitions;
            s.cycle_cpu = cycle_cpu;
            s.gate = gate;
            s.need = need;
            s.need_reason = need_reason;
            changed
        });
    }
}

/// The time on tokio's clock, which tests can pause; the core takes it as a plain `Instant`.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
        None => std::future::pending().await,
    }
}
