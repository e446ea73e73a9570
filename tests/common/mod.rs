//! The test fixture: a real private `dbus-daemon` loaded with the project's own bus policy, the
//! real daemon binary on a scratch sysfs directory, and a zbus client. Everything started here is
//! ended by PID when the fixture is dropped, even when a test fails. The tests use the panicking
//! functions; the `try_` ones under them return the error instead, for the shim's benchmark
//! (`grpc-shim/benches/grpc.rs`, which includes this file too).
#![allow(dead_code)]

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use kata_ksm_throttler::bus::private::{BusConfig, PrivateBus};
use kata_ksm_throttler::client::proxy::KsmThrottlerProxy;
use kata_ksm_throttler::names::BUS_NAME;
use rustix::process::{kill_process, Pid, Signal};
use tempfile::TempDir;
use zbus::Connection;

/// The daemon binary, as cargo names it for this package's own tests. The other workspace members'
/// tests include this file by path and have no such variable: they use [`daemon_binary`].
pub const DAEMON: &str = match option_env!("CARGO_BIN_EXE_kata-ksm-throttler") {
    Some(path) => path,
    None => "/nonexistent/kata-ksm-throttler (outside its own package, use common::daemon_binary())",
};

/// The daemon binary, in this package's tests and in the other workspace members'. For the others,
/// cargo does not build another package's binaries, so it is built here, once per test process,
/// with the cargo running the tests, into the same target folder and profile: a no-op when it is
/// up to date, and never a stale binary left from an earlier build. `KSM_THROTTLER_DAEMON` names
/// a ready-built one instead (e.g. to test an installed daemon).
pub fn daemon_binary() -> PathBuf {
    try_daemon_binary().unwrap_or_else(|e| panic!("{e}"))
}

pub fn try_daemon_binary() -> io::Result<PathBuf> {
    if let Some(path) = option_env!("CARGO_BIN_EXE_kata-ksm-throttler") {
        return Ok(path.into());
    }
    static BUILT: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| build_daemon().map_err(|e| e.to_string())).clone().map_err(io::Error::other)
}

fn build_daemon() -> io::Result<PathBuf> {
    if let Some(path) = std::env::var_os("KSM_THROTTLER_DAEMON") {
        return Ok(path.into());
    }
    // The test (or benchmark) runs as <target>/<profile>/deps/<test>.
    let exe = std::env::current_exe()?;
    let layout = || io::Error::other(format!("{} is not in <target>/<profile>/deps", exe.display()));
    let profile_dir = exe.parent().and_then(Path::parent).ok_or_else(layout)?;
    let target_dir = profile_dir.parent().ok_or_else(layout)?;
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
        .map_err(|e| io::Error::new(e.kind(), format!("running cargo to build the daemon: {e}")))?;
    if !out.status.success() {
        return Err(io::Error::other(format!("building the daemon failed:\n{}", String::from_utf8_lossy(&out.stderr))));
    }
    Ok(profile_dir.join("kata-ksm-throttler"))
}

/// A file of the workspace: this package's, or its parent's for the members that include this file.
pub fn project_file(rel: &str) -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = here.ancestors().find(|dir| dir.join("dbus/org.kata.KsmThrottler.conf").is_file()).unwrap_or(here);
    root.join(rel)
}

/// A private system-like bus with the project's policy file included.
pub fn start_bus() -> PrivateBus {
    start_bus_with(BusConfig::default())
}

pub fn start_bus_with(mut config: BusConfig) -> PrivateBus {
    config.policy_files.push(project_file("dbus/org.kata.KsmThrottler.conf"));
    PrivateBus::start(&config).expect("start dbus-daemon")
}

/// A directory laid out like /sys/kernel/mm/ksm, plus a meminfo file and a state folder.
pub struct Scratch {
    pub dir: TempDir,
}

pub const INITIAL: [(&str, &str); 5] = [
    ("run", "0\n"),
    ("pages_to_scan", "100\n"),
    ("sleep_millisecs", "20\n"),
    ("advisor_mode", "[none] scan-time\n"),
    ("smart_scan", "1\n"),
];

/// 4 GiB of anonymous memory: aggressive scans 104857 pages, standard 10485, slow 2097.
pub const ANON_KB: u64 = 4 * 1024 * 1024;

impl Scratch {
    pub fn new() -> Scratch {
        Scratch::try_new().expect("scratch sysfs")
    }

    pub fn try_new() -> io::Result<Scratch> {
        let dir = tempfile::tempdir()?;
        std::fs::create_dir(dir.path().join("ksm"))?;
        for (name, value) in INITIAL {
            std::fs::write(dir.path().join("ksm").join(name), value)?;
        }
        std::fs::write(dir.path().join("meminfo"), format!("MemTotal: 24000000 kB\nAnonPages: {ANON_KB} kB\n"))?;
        Ok(Scratch { dir })
    }

    pub fn ksm(&self) -> PathBuf {
        self.dir.path().join("ksm")
    }

    pub fn meminfo(&self) -> PathBuf {
        self.dir.path().join("meminfo")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn knob(&self, name: &str) -> String {
        std::fs::read_to_string(self.ksm().join(name)).expect("read knob")
    }

    /// run, pages_to_scan, sleep_millisecs as numbers.
    pub fn knobs(&self) -> (u64, u64, u64) {
        let n = |k: &str| self.knob(k).trim().parse::<u64>().expect("number");
        (n("run"), n("pages_to_scan"), n("sleep_millisecs"))
    }

    /// Every file of the scratch sysfs, byte for byte.
    pub fn snapshot(&self) -> Vec<(String, Vec<u8>)> {
        let mut files: Vec<_> = std::fs::read_dir(self.ksm())
            .expect("ls")
            .map(|e| {
                let e = e.expect("entry");
                (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).expect("read"))
            })
            .collect();
        files.sort();
        files
    }
}

pub fn expected(divisor: u64, sleep: u64) -> (u64, u64, u64) {
    (1, ANON_KB * 1024 / kata_ksm_throttler::io::meminfo::page_size() / divisor, sleep)
}

/// The daemon binary, run on a scratch sysfs and a given bus.
pub struct Daemon {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Daemon {
    pub fn spawn(bus: &PrivateBus, scratch: &Scratch, extra: &[&str]) -> Daemon {
        Daemon::spawn_on(bus, &scratch.ksm(), &scratch.meminfo(), &scratch.state_dir(), extra, scratch)
    }

    pub fn try_spawn(bus: &PrivateBus, scratch: &Scratch, extra: &[&str]) -> io::Result<Daemon> {
        Daemon::try_spawn_on(bus, &scratch.ksm(), &scratch.meminfo(), &scratch.state_dir(), extra, scratch)
    }

    /// The daemon on any sysfs root (the real one included); its log goes into `scratch`.
    pub fn spawn_on(
        bus: &PrivateBus,
        ksm: &Path,
        meminfo: &Path,
        state_dir: &Path,
        extra: &[&str],
        scratch: &Scratch,
    ) -> Daemon {
        Daemon::try_spawn_on(bus, ksm, meminfo, state_dir, extra, scratch).expect("spawn daemon")
    }

    pub fn try_spawn_on(
        bus: &PrivateBus,
        ksm: &Path,
        meminfo: &Path,
        state_dir: &Path,
        extra: &[&str],
        scratch: &Scratch,
    ) -> io::Result<Daemon> {
        let log = scratch.dir.path().join(format!("daemon-{}.log", std::process::id()));
        let log_file = std::fs::OpenOptions::new().create(true).append(true).open(&log)?;
        let binary = try_daemon_binary()?;
        let child = Command::new(&binary)
            .arg("--bus")
            .arg(bus.address())
            .arg("--sysfs-root")
            .arg(ksm)
            .arg("--meminfo")
            .arg(meminfo)
            .arg("--state-dir")
            .arg(state_dir)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("starting {}: {e}", binary.display())))?;
        Ok(Daemon { child: Some(child), log })
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, sig: Signal) {
        if let Some(pid) = Pid::from_raw(self.pid()) {
            kill_process(pid, sig).expect("kill");
        }
    }

    /// Waits for the process to end (bounded), returning its status.
    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("running");
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return status;
            }
            assert!(start.elapsed() < limit, "daemon did not exit within {limit:?}; log:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn terminate(&mut self) -> ExitStatus {
        self.signal(Signal::TERM);
        self.wait(Duration::from_secs(10))
    }

    pub fn kill9(&mut self) {
        self.signal(Signal::KILL);
        self.wait(Duration::from_secs(10));
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub async fn connect(bus: &PrivateBus) -> Connection {
    zbus::connection::Builder::address(bus.address()).build().await.expect("connect")
}

/// Waits (bounded) until the throttler owns its name on `conn`'s bus.
pub async fn wait_for_name(conn: &Connection, daemon: &Daemon) {
    try_wait_for_name(conn, daemon).await.unwrap_or_else(|e| panic!("{e}"))
}

pub async fn try_wait_for_name(conn: &Connection, daemon: &Daemon) -> io::Result<()> {
    let bus_error = |e: &dyn std::fmt::Display| io::Error::other(format!("asking the bus for {BUS_NAME}: {e}"));
    let dbus = zbus::fdo::DBusProxy::new(conn).await.map_err(|e| bus_error(&e))?;
    let name = zbus::names::BusName::try_from(BUS_NAME).map_err(|e| bus_error(&e))?;
    let start = Instant::now();
    while !dbus.name_has_owner(name.clone()).await.map_err(|e| bus_error(&e))? {
        if start.elapsed() >= Duration::from_secs(10) {
            return Err(io::Error::other(format!("daemon never took its name; log:\n{}", daemon.log_text())));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

pub async fn proxy(conn: &Connection) -> KsmThrottlerProxy<'static> {
    KsmThrottlerProxy::builder(conn).cache_properties(zbus::proxy::CacheProperties::No).build().await.expect("proxy")
}

/// Bus, scratch sysfs, daemon and a client, ready to call.
pub struct Setup {
    pub conn: Connection,
    pub proxy: KsmThrottlerProxy<'static>,
    pub daemon: Daemon,
    pub scratch: Scratch,
    pub bus: PrivateBus,
}

pub async fn setup(extra: &[&str]) -> Setup {
    let bus = start_bus();
    let scratch = Scratch::new();
    let daemon = Daemon::spawn(&bus, &scratch, extra);
    let conn = connect(&bus).await;
    wait_for_name(&conn, &daemon).await;
    let proxy = proxy(&conn).await;
    Setup { conn, proxy, daemon, scratch, bus }
}

/// The D-Bus error name of a failed call.
pub fn error_name(e: &zbus::Error) -> String {
    match e {
        zbus::Error::MethodError(name, _, _) => name.to_string(),
        zbus::Error::FDO(e) => zbus::DBusError::name(e.as_ref()).to_string(),
        other => format!("not a D-Bus error: {other}"),
    }
}

pub fn error_message(e: &zbus::Error) -> String {
    match e {
        zbus::Error::MethodError(_, Some(m), _) => m.clone(),
        zbus::Error::FDO(e) => zbus::DBusError::description(e.as_ref()).unwrap_or_default().to_owned(),
        other => other.to_string(),
    }
}
