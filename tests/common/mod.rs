//! The test fixture: a real private `dbus-daemon` loaded with the project's own bus policy, the
//! real daemon binary on a scratch sysfs directory, and a zbus client. Everything started here is
//! ended by PID when the fixture is dropped, even when a test fails.
#![allow(dead_code)]

pub mod procfs;
pub mod writes;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use kata_ksm_throttler::client::KsmThrottlerProxy;
use kata_ksm_throttler::private_bus::{BusConfig, PrivateBus};
use kata_ksm_throttler::service::BUS_NAME;
use rustix::process::{kill_process, Pid, Signal};
use tempfile::TempDir;
use zbus::Connection;

pub const DAEMON: &str = env!("CARGO_BIN_EXE_kata-ksm-throttler");

pub fn project_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
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

pub const INITIAL: [(&str, &str); 4] =
    [("run", "0\n"), ("pages_to_scan", "100\n"), ("sleep_millisecs", "20\n"), ("advisor_mode", "[none] scan-time\n")];

/// 4 GiB of anonymous memory: aggressive scans 104857 pages, standard 10485, slow 2097.
pub const ANON_KB: u64 = 4 * 1024 * 1024;

impl Scratch {
    pub fn new() -> Scratch {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("ksm")).expect("mkdir");
        for (name, value) in INITIAL {
            std::fs::write(dir.path().join("ksm").join(name), value).expect("write knob");
        }
        std::fs::write(dir.path().join("meminfo"), format!("MemTotal: 24000000 kB\nAnonPages: {ANON_KB} kB\n"))
            .expect("write meminfo");
        Scratch { dir }
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
    (1, ANON_KB * 1024 / kata_ksm_throttler::meminfo::page_size() / divisor, sleep)
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

    /// The daemon on any sysfs root (the real one included); its log goes into `scratch`.
    pub fn spawn_on(
        bus: &PrivateBus,
        ksm: &Path,
        meminfo: &Path,
        state_dir: &Path,
        extra: &[&str],
        scratch: &Scratch,
    ) -> Daemon {
        let log = scratch.dir.path().join(format!("daemon-{}.log", std::process::id()));
        let log_file = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("log");
        let child = Command::new(DAEMON)
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
            .stdout(log_file.try_clone().expect("dup"))
            .stderr(log_file)
            .spawn()
            .expect("spawn daemon");
        Daemon { child: Some(child), log }
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
    let dbus = zbus::fdo::DBusProxy::new(conn).await.expect("dbus proxy");
    let start = Instant::now();
    while !dbus.name_has_owner(BUS_NAME.try_into().expect("name")).await.expect("NameHasOwner") {
        assert!(start.elapsed() < Duration::from_secs(10), "daemon never took its name; log:\n{}", daemon.log_text());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
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
