//! The real daemon binary on a private bus over a scratch sysfs, and a client ready to call it.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::OnceLock;
use std::time::Duration;

use ksm_throttler_contract::private_bus::PrivateBus;
use ksm_throttler_contract::proxy::KsmThrottlerProxy;
use rustix::process::Signal;
use zbus::Connection;

use crate::bus::{connect, project_file, proxy, start_bus, wait_for_throttler};
use crate::child::Guarded;
use crate::scratch::Scratch;

/// Names a ready-built daemon for the tests to run instead of building one (an installed
/// daemon, say).
pub const DAEMON_VAR: &str = "KSM_THROTTLER_DAEMON";

/// How long a stopping daemon may take before the test fails.
pub const EXIT_LIMIT: Duration = Duration::from_secs(10);

/// The daemon binary the tests run. Cargo builds a package's binaries only for that package's
/// own tests, so it is built here, once per test process, with the cargo running the tests,
/// into the same target folder and profile: a no-op when it is up to date, and never a stale
/// binary left from an earlier build. [`DAEMON_VAR`] names a ready-built one instead.
pub fn daemon_binary() -> &'static Path {
    try_daemon_binary().unwrap_or_else(|e| panic!("the daemon binary: {e}"))
}

/// [`daemon_binary`], returning why it could not be had (for the benchmarks).
pub fn try_daemon_binary() -> Result<&'static Path, String> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT.get_or_init(build_daemon).as_deref().map_err(Clone::clone)
}

fn build_daemon() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os(DAEMON_VAR) {
        return Ok(path.into());
    }
    // A test runs as <target>/<profile>/deps/<test>, a benchmark as <target>/<profile>/deps/<bench>.
    let exe = std::env::current_exe().map_err(|e| format!("the test's executable: {e}"))?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| format!("{}: not in <target>/<profile>/deps", exe.display()))?;
    let target_dir = profile_dir.parent().ok_or_else(|| format!("{}: no target folder", profile_dir.display()))?;
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "dev",
        Some(other) => other,
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args(["build", "--quiet", "--package", "kata-ksm-throttler", "--bin", "kata-ksm-throttler"])
        .args(["--profile", profile, "--manifest-path"])
        .arg(project_file("Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir)
        .output()
        .map_err(|e| format!("running cargo: {e}"))?;
    if !out.status.success() {
        return Err(format!("building the daemon failed:\n{}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(profile_dir.join("kata-ksm-throttler"))
}

/// The daemon binary, run on a bus and a sysfs root; ended by its PID when dropped (SIGTERM
/// first: it restores what it changed).
pub struct Daemon {
    process: Guarded,
}

impl Daemon {
    /// On `scratch`: its sysfs, meminfo and state folder, and no host configuration file
    /// (unless `extra` names one with `--config`).
    pub fn spawn(bus: &PrivateBus, scratch: &Scratch, extra: &[&str]) -> Daemon {
        Daemon::try_spawn(bus, scratch, extra).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Daemon::spawn`], returning why it could not start (for the benchmarks).
    pub fn try_spawn(bus: &PrivateBus, scratch: &Scratch, extra: &[&str]) -> Result<Daemon, String> {
        let mut paths = if extra.contains(&"--config") { scratch.path_args() } else { scratch.args() };
        paths.extend(extra.iter().map(|s| s.to_string()));
        Daemon::try_spawn_args(bus, &paths, scratch)
    }

    /// On any sysfs root (the real one included); its log goes into `scratch`.
    pub fn spawn_on(
        bus: &PrivateBus,
        ksm: &Path,
        meminfo: &Path,
        state_dir: &Path,
        extra: &[&str],
        scratch: &Scratch,
    ) -> Daemon {
        let mut args: Vec<String> = vec![];
        for (flag, path) in [("--sysfs-root", ksm), ("--meminfo", meminfo), ("--state-dir", state_dir)] {
            args.extend([flag.to_owned(), path.display().to_string()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        Daemon::try_spawn_args(bus, &args, scratch).unwrap_or_else(|e| panic!("{e}"))
    }

    fn try_spawn_args(bus: &PrivateBus, args: &[String], scratch: &Scratch) -> Result<Daemon, String> {
        // One log per test process: the daemons a test starts on one scratch follow each other in it.
        let log = scratch.path().join(format!("daemon-{}.log", std::process::id()));
        let mut command = Command::new(try_daemon_binary()?);
        command.arg("--bus").arg(bus.address()).args(args);
        let process = Guarded::spawn_logged(&mut command, "kata-ksm-throttler", &log)
            .map_err(|e| format!("starting the daemon: {e}"))?;
        Ok(Daemon { process })
    }

    /// Its PID; panics once it has been reaped.
    pub fn pid(&self) -> u32 {
        self.process.pid().unwrap_or_else(|| panic!("the daemon has exited; log:\n{}", self.log_text()))
    }

    /// The file its output goes to.
    pub fn log(&self) -> &Path {
        self.process.log().unwrap_or_else(|| Path::new("/dev/null"))
    }

    pub fn log_text(&self) -> String {
        self.process.log_text()
    }

    pub fn signal(&self, sig: Signal) {
        self.process.signal(sig).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Waits for it to exit (bounded), returning its status.
    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        self.process.wait_within(limit).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Whether it has not exited yet.
    pub fn is_running(&mut self) -> bool {
        self.process.is_running().unwrap_or_else(|e| panic!("{e}"))
    }

    /// SIGTERM, and its exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal(Signal::TERM);
        self.wait(EXIT_LIMIT)
    }

    /// SIGKILL, and it is reaped.
    pub fn kill9(&mut self) {
        self.signal(Signal::KILL);
        self.wait(EXIT_LIMIT);
    }
}

/// Waits until the throttler owns its name on `conn`'s bus, or fails with `daemon`'s log.
pub async fn wait_for_name(conn: &Connection, daemon: &Daemon) {
    wait_for_throttler(conn, || format!("the daemon to take its name; log:\n{}", daemon.log_text())).await;
}

/// Bus, scratch sysfs, daemon and a client, ready to call. Dropped in this order: the client,
/// the daemon (which restores the scratch), the scratch, the bus.
pub struct Setup {
    pub conn: Connection,
    pub proxy: KsmThrottlerProxy<'static>,
    pub daemon: Daemon,
    pub scratch: Scratch,
    pub bus: PrivateBus,
}

/// A fresh bus and scratch, the daemon on them with `extra` flags, and a client once it serves.
pub async fn setup(extra: &[&str]) -> Setup {
    let bus = start_bus();
    let scratch = Scratch::fresh();
    let daemon = Daemon::spawn(&bus, &scratch, extra);
    serve(bus, scratch, daemon).await
}

/// The client side of [`setup`], for a bus and daemon the caller started.
pub async fn serve(bus: PrivateBus, scratch: Scratch, daemon: Daemon) -> Setup {
    let conn = connect(&bus).await;
    wait_for_name(&conn, &daemon).await;
    let proxy = proxy(&conn).await;
    Setup { conn, proxy, daemon, scratch, bus }
}
