//! The engine loop on a tokio task over a scratch sysfs, with the default durations and
//! profiles: for tests on tokio's paused clock, where the real timeline's minutes pass in no
//! time.

use std::time::Duration;

use kata_ksm_throttler::core::policy::Durations;
use kata_ksm_throttler::core::setting::{Mode, Profiles, Setting};
use kata_ksm_throttler::engine::{Config, Ended, Engine, EngineError, Handle, Status};
use kata_ksm_throttler::io::state_file::StateFile;
use kata_ksm_throttler::io::sysfs::Ksm;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::scratch::Scratch;

/// A running engine: its handle, the status it publishes, and what stops it.
pub struct Running {
    pub handle: Handle,
    pub status: watch::Receiver<Status>,
    /// Its exit-on-idle notices, when started with [`Running::exiting_when_idle`].
    pub notices: Option<mpsc::Receiver<()>>,
    stop: Option<oneshot::Sender<()>>,
    pub task: JoinHandle<Result<Ended, EngineError>>,
}

fn config(scratch: &Scratch, mode: Mode) -> Config {
    Config {
        ksm: Ksm::open(scratch.ksm()).unwrap_or_else(|e| panic!("opening the scratch sysfs: {e}")),
        meminfo: scratch.meminfo(),
        page_size: kata_ksm_throttler::io::meminfo::page_size(),
        state: StateFile::new(scratch.state_dir()),
        mode,
        durations: Durations::default(),
        profiles: Profiles::default(),
        proc_root: scratch.proc_root(),
        gate: kata_ksm_throttler::core::need::Gate::Always,
        need: kata_ksm_throttler::core::need::Thresholds::default(),
        unprofitable_scans: kata_ksm_throttler::core::policy::UNPROFITABLE_SCANS,
    }
}

impl Running {
    /// The engine in `mode` on `scratch`, spawned on the current runtime.
    pub fn start(scratch: &Scratch, mode: Mode) -> Running {
        Running::spawn(Engine::new(config(scratch, mode)), None)
    }

    /// [`Running::start`], with a notice on [`Running::notices`] after `idle` of rest.
    pub fn exiting_when_idle(scratch: &Scratch, mode: Mode, idle: Duration) -> Running {
        let (mut engine, handle, status) = Engine::new(config(scratch, mode));
        let notices = engine.exit_when_idle(idle);
        Running::spawn((engine, handle, status), Some(notices))
    }

    fn spawn(
        (engine, handle, status): (Engine, Handle, watch::Receiver<Status>),
        notices: Option<mpsc::Receiver<()>>,
    ) -> Running {
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(engine.run(async {
            let _ = stopped.await;
        }));
        Running { handle, status, notices, stop: Some(stop), task }
    }

    /// The setting in force, as last published.
    pub fn setting(&self) -> Setting {
        self.status.borrow().setting
    }

    /// Asks it to stop (as SIGTERM does); it may still be finishing.
    pub fn stop(&mut self) {
        let stop = self.stop.take().unwrap_or_else(|| panic!("the engine was already told to stop"));
        // Sending fails only if the engine has ended already: then there is nothing to stop.
        let _ = stop.send(());
    }

    /// Whether an exit-on-idle notice has come by now (after letting the engine run).
    pub async fn noticed(&mut self) -> bool {
        tokio::task::yield_now().await;
        let notices = self.notices.as_mut().unwrap_or_else(|| panic!("started without exit on idle"));
        notices.try_recv().is_ok()
    }

    /// Waits for it to end by itself (or after [`Running::stop`]): how, or a panic if it failed.
    pub async fn ended(self) -> Ended {
        match self.task.await {
            Ok(Ok(ended)) => ended,
            Ok(Err(e)) => panic!("the engine failed: {e}"),
            Err(e) => panic!("the engine task: {e}"),
        }
    }

    /// Stops it and waits for it to end.
    pub async fn shut_down(mut self) -> Ended {
        self.stop();
        self.ended().await
    }
}
