//! The one task that owns the throttling state. The bus sends it commands; it feeds them and its
//! timers to the pure core, applies the transitions to sysfs, keeps the administrator's settings
//! safe on disk while they are changed, and publishes a [`Status`] for the bus to show. It reads,
//! asks the core ([`Policy`], [`crate::core::lifecycle`], [`crate::core::verdicts`]) and carries
//! the answer out; it decides nothing itself.
//!
//! - this module: the loop, its [`Handle`] and [`Command`]s, and the one timer table it sleeps on
//!   ([`Timers`]);
//! - `cycle`: a cycle's record, plan, write and undo;
//! - `events`: kicks, mode and gate changes, a reload, and the policy's own timers;
//! - `start`: start-up, putting back what a previous instance left changed;
//! - `idle`: exit on idle and the hand-over to a successor;
//! - `need`: the need gate's readings;
//! - `status`: the published [`Status`].
//!
//! ## Exit on idle
//!
//! With [`Engine::exit_when_idle`], an engine at rest in its start-up mode (initial settings,
//! nothing scheduled) for that long sends a notice; the bus edge then releases the bus name, lets
//! every call that was already routed here finish, and reports back ([`Handle::conclude_idle`]).
//! Calls keep being served meanwhile. If those late calls left the engine at rest, it ends
//! ([`Ended::Idle`]): a fresh instance would be in the very same state. If they moved it, it
//! either stays (the edge takes the name back) or, when the bus can start a successor, records
//! where it is ([`crate::io::state_file::Handover`]) and ends without restoring anything
//! ([`Ended::HandedOver`]); the successor carries on from there. A stop signal that lands during
//! that exchange (systemd stops a `Type=dbus` unit as soon as its name is released) waits for the
//! verdict.

mod cycle;
mod events;
mod idle;
mod need;
mod start;
mod status;
#[cfg(test)]
mod tests;

use std::cell::Cell;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

use crate::core::knobs::Knobs;
use crate::core::need::{Gate, Need, NeedGate, Thresholds};
use crate::core::policy::{Durations, Policy};
use crate::core::setting::{Mode, Profiles};
use crate::core::timers::{Timer, Timers};
use crate::core::transitions::TransitionCounts;
use crate::core::written::Written;
use crate::io::ksmd::Ksmd;
use crate::io::meminfo::MeminfoError;
use crate::io::state_file::{StateError, StateFile};
use crate::io::sysfs::{Ksm, SysfsError};
use crate::quick_kick::QuickKick;
use ksm_throttler_contract::errors;

pub use crate::core::lifecycle::{Drain, Ended, Verdict};
pub use idle::Intake;
pub use status::{CycleCpu, Status};

use idle::IdleExit;

/// How long a failed timer step waits before it is tried again.
pub const RETRY_AFTER: Duration = Duration::from_secs(5);
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

impl EngineError {
    /// The D-Bus error name a caller gets for it, whichever face it came through.
    pub fn error_name(&self) -> &'static str {
        match self {
            EngineError::Sysfs(_) => errors::SYSFS,
            EngineError::Meminfo(_) => errors::MEMINFO,
            EngineError::State(_) => errors::STATE_FILE,
            EngineError::ShuttingDown => errors::SHUTTING_DOWN,
        }
    }
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
    /// `saved` is on disk (see `cycle`'s `record_writes`).
    recorded: bool,
    /// The AnonPages (in pages) the setting in force was sized on, if it has a profile.
    sized_on: Option<u64>,
    /// Kicks that change nothing, answered by the handles; also counts every kick.
    quick: Arc<QuickKick>,
    /// When kicks taken from the handles last had AnonPages read for them (see
    /// [`quick_kick::SIZE_AT_MOST_EVERY`]).
    quick_sized_at: Option<Instant>,
    transitions: TransitionCounts,
    status: watch::Sender<Status>,
    commands: mpsc::Receiver<Command>,
    idle: Option<IdleExit>,
    /// A stop signal arrived while an idle exit was being concluded.
    stop_requested: bool,
    /// [`Engine::start`] has run.
    started: bool,
    /// Every timer: the policy's (copied in before each sleep), the kick retry, the need poll
    /// (armed only while the gate applies) and the idle time.
    timers: Timers,
    /// The deadline last shown and its wall-clock form, so that a deadline that has not moved
    /// reads as the same microsecond every time (converting it again jitters by a microsecond).
    shown_deadline: Cell<Option<(Instant, u64)>>,
    ksmd: Ksmd,
    cycle_cpu: Option<CycleCpu>,
    need: NeedGate,
    /// A figure could not be read and that was logged: said once, not at every poll.
    need_garbled: bool,
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
            quick_sized_at: None,
            transitions: TransitionCounts::default(),
            status: status_tx,
            commands: rx,
            idle: None,
            stop_requested: false,
            started: false,
            timers: Timers::default(),
            shown_deadline: Cell::new(None),
            ksmd,
            cycle_cpu: None,
            need,
            need_garbled: false,
        };
        (engine, Handle { commands: tx, quick }, status_rx)
    }

    /// Sends a notice on the returned channel each time the engine has been at rest in its
    /// start-up mode, with no command, for `after`; answer it with [`Handle::conclude_idle`].
    pub fn exit_when_idle(&mut self, after: Duration) -> mpsc::Receiver<()> {
        let (tx, rx) = mpsc::channel(1);
        self.idle = Some(IdleExit::new(after, tx));
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
            self.timers.follow(&self.policy);
            self.timers.set(Timer::Idle, self.idle_due());
            let next = self.timers.next_timeout();
            tokio::select! {
                biased;
                () = &mut shutdown, if !self.stop_requested => {
                    self.stop_requested = true;
                    if self.idle.as_ref().is_some_and(IdleExit::asked) {
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
                () = sleep_until(next) => self.on_timer(),
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

    /// Serves the first timer due, in the table's order; the loop comes back at once for the
    /// next one, commands and quick kicks first.
    fn on_timer(&mut self) {
        match self.timers.due(now()) {
            Some(t) if t.is_policy() => self.on_wake(),
            Some(Timer::KickRetry) => self.retry_kick(),
            Some(Timer::NeedPoll) => self.on_need_poll(),
            Some(Timer::Idle) => self.on_idle(),
            Some(_) | None => {}
        }
    }

    fn handle(&mut self, cmd: Command) -> Option<Ended> {
        // The engine runs on a thread of its own: the status is published before the reply is
        // sent, so a caller that reads a property after its call returned sees what it did.
        let (result, reply) = match cmd {
            Command::Kick(reply) => {
                self.quick.count_one();
                (self.kick(), reply)
            }
            Command::SetMode(mode, reply) => (self.set_mode(mode), reply),
            Command::Reload(durations, profiles, need, reply) => {
                self.need.set_thresholds(need);
                (self.reload(durations, profiles), reply)
            }
            Command::SetNeedGate(gate, reply) => (self.set_need_gate(gate), reply),
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
