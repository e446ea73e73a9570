//! The release throttler on a private bus of its own, driving the real KSM, and the Kata
//! trigger (`kata-vc-throttler`) watching a scratch sandboxes folder, kicking it as it does on
//! a Kata host.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use kata_ksm_throttler::bus::private::{BusConfig, PrivateBus, PROJECT_POLICY};
use kata_ksm_throttler::names::BUS_NAME;
use kata_ksm_throttler_test_support::eventually::until_some;
use ksm_throttler_contract::proxy::KsmThrottlerProxy;

use crate::real_ksm::REAL_KSM;
use kata_ksm_throttler_test_support::child::Guarded;

/// How long the daemon and the trigger may take to start serving.
const START_LIMIT: Duration = Duration::from_secs(10);

pub struct DaemonRun {
    pub proxy: KsmThrottlerProxy<'static>,
    // Dropped in this order: the trigger, the client, the daemon (SIGTERM: it restores and
    // exits), its state folder, then the bus.
    trigger: Option<Trigger>,
    _conn: zbus::Connection,
    process: Guarded,
    log: PathBuf,
    _state: tempfile::TempDir,
    bus: PrivateBus,
}

impl DaemonRun {
    /// `daemon` in `mode` with `extra` arguments, its log in `log`.
    pub async fn start(daemon: &Path, mode: &str, extra: &[String], log: PathBuf) -> Result<DaemonRun> {
        let bus = PrivateBus::start(&BusConfig { policy_texts: vec![PROJECT_POLICY.into()], ..BusConfig::default() })
            .context("starting a private dbus-daemon")?;
        let state = tempfile::Builder::new().prefix("ksm-bench-state-").tempdir().context("state folder")?;
        let log_file = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new(daemon)
            .args(["--bus", bus.address(), "--sysfs-root", REAL_KSM, "--meminfo", "/proc/meminfo"])
            .arg("--state-dir")
            .arg(state.path())
            .args(["--mode", mode])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().context("log file")?)
            .stderr(log_file)
            // Our signals reach it only through us, so we choose when it restores.
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {}", daemon.display()))?;
        let mut process = Guarded::new(child, "kata-ksm-throttler");
        let conn = zbus::connection::Builder::address(bus.address()).build().await.context("connecting to the bus")?;
        let dbus = zbus::fdo::DBusProxy::new(&conn).await?;
        let serving = until_some(START_LIMIT, "the daemon to serve", async || {
            match dbus.name_has_owner(BUS_NAME.try_into().ok()?).await {
                Ok(true) => Some(Ok(())),
                Ok(false) => match process.try_wait() {
                    Ok(Some(status)) => Some(Err(anyhow!("the daemon exited ({status}) before serving"))),
                    Ok(None) => None,
                    Err(e) => Some(Err(e.into())),
                },
                Err(e) => Some(Err(e.into())),
            }
        });
        match serving.await {
            Ok(served) => served.map_err(|e| anyhow!("{e}:\n{}", log_tail(&log)))?,
            Err(e) => bail!("the daemon did not take {BUS_NAME}: {e}:\n{}", log_tail(&log)),
        }
        let proxy =
            KsmThrottlerProxy::builder(&conn).cache_properties(zbus::proxy::CacheProperties::No).build().await?;
        let serving = proxy.mode().await?;
        if serving != mode {
            bail!("the daemon serves mode {serving}, not {mode}");
        }
        Ok(DaemonRun { proxy, trigger: None, _conn: conn, process, log, _state: state, bus })
    }

    /// Starts `kata-vc-throttler` on this daemon's bus, watching `vc_root`/sbs as it watches
    /// /run/vc/sbs on a Kata host, and waits until it watches.
    pub async fn start_trigger(&mut self, trigger: &Path, vc_root: &Path, log: PathBuf) -> Result<()> {
        let log_file = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new(trigger)
            .args(["--config", "/nonexistent/kata-ksm-throttler/config.toml", "--root"])
            .arg(vc_root)
            .args(["--no-kata-root", "--bus", self.bus.address()])
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().context("log file")?)
            .stderr(log_file)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {}", trigger.display()))?;
        let mut process = Guarded::new(child, "kata-vc-throttler");
        let watching = until_some(START_LIMIT, "the trigger to watch", async || {
            if std::fs::read_to_string(&log).is_ok_and(|l| l.contains("watching for new sandboxes")) {
                return Some(Ok(()));
            }
            match process.try_wait() {
                Ok(Some(status)) => Some(Err(anyhow!("the trigger exited ({status})"))),
                Ok(None) => None,
                Err(e) => Some(Err(e.into())),
            }
        });
        match watching.await {
            Ok(watched) => watched.map_err(|e| anyhow!("{e}:\n{}", log_tail(&log)))?,
            Err(e) => bail!("{e}:\n{}", log_tail(&log)),
        }
        self.trigger = Some(Trigger { _process: process });
        Ok(())
    }

    /// Ends the trigger, then SIGTERM to the daemon: it must restore the settings it recorded
    /// and exit 0.
    pub fn stop(mut self) -> Result<()> {
        drop(self.trigger.take());
        let status = self.process.stop(Duration::from_secs(10))?;
        match status {
            Some(s) if s.success() => Ok(()),
            other => bail!("the daemon ended with {other:?}:\n{}", log_tail(&self.log)),
        }
    }
}

struct Trigger {
    _process: Guarded,
}

pub fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
