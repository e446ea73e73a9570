//! A benchmark guest in QEMU, launched the way the Kata Containers runtime launches one: named
//! `sandbox-<id>`, its RAM either private and marked mergeable (`mem-merge=on`, what KSM works
//! on) or a shared memfd (what virtio-fs needs, and KSM cannot merge). TCG only, so it runs
//! anywhere and never needs `/dev/kvm`.
//!
//! Synchronous on purpose (std threads and a channel): an async runner polls [`Vm::try_ready`].

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::guest::GuestImage;
use kata_ksm_throttler_test_support::child::Guarded;

pub const DEFAULT_QEMU: &str = "qemu-system-x86_64";
/// What the guest's `/init` prints on the console (see [`crate::guest::INIT`]).
pub const READY_LINE: &str = "KSMBENCH READY";
pub const FAILED_PREFIX: &str = "KSMBENCH FAILED ";
/// Console lines kept for error messages.
const TAIL_LINES: usize = 20;
/// QEMU ends within milliseconds of SIGTERM; more than this means it is stuck.
const STOP_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Memory {
    /// `memory-backend-ram`: private anonymous memory that QEMU marks `MADV_MERGEABLE`.
    Private,
    /// A shared memfd backend (`share=on`), as virtio-fs requires: KSM never merges it.
    SharedMemfd,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    /// The sandbox id: QEMU is named `sandbox-<id>`, as Kata names it.
    pub id: String,
    pub mem_mib: u64,
    pub memory: Memory,
    /// MiB of random data the guest writes after the payload: its own, unmergeable.
    pub own_mib: u64,
    /// KiB of the guest's data rewritten every `dirty_every_s` seconds once ready.
    pub dirty_kib: u64,
    pub dirty_every_s: u64,
    /// Copy the guest's console to stderr, each line prefixed with its name.
    pub echo_console: bool,
}

impl VmSpec {
    /// The guest's defaults: 12 MiB of its own, 256 KiB rewritten every 5 s.
    pub fn new(id: impl Into<String>, mem_mib: u64, memory: Memory) -> VmSpec {
        VmSpec { id: id.into(), mem_mib, memory, own_mib: 12, dirty_kib: 256, dirty_every_s: 5, echo_console: false }
    }

    pub fn name(&self) -> String {
        format!("sandbox-{}", self.id)
    }

    fn check(&self) -> Result<(), VmError> {
        let id_ok = !self.id.is_empty() && self.id.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
        if !id_ok {
            return Err(VmError::Spec(format!("id {:?}: want [A-Za-z0-9._-]+ (it lands in QEMU's options)", self.id)));
        }
        if self.mem_mib == 0 {
            return Err(VmError::Spec("mem_mib 0".into()));
        }
        if self.dirty_every_s == 0 {
            return Err(VmError::Spec("dirty_every_s 0 would rewrite without pause".into()));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("bad VM spec: {0}")]
    Spec(String),
    #[error("starting {qemu}: {source}")]
    Spawn { qemu: String, source: io::Error },
    #[error("{name}: the guest failed: {what}{tail}")]
    Failed { name: String, what: String, tail: String },
    #[error("{name}: QEMU ended ({status}) before the guest was ready{tail}")]
    Exited { name: String, status: String, tail: String },
    #[error("{name}: not ready {waited:?} after launch{tail}")]
    Timeout { name: String, waited: Duration, tail: String },
    #[error("{name}: {what}: {source}")]
    Io { name: String, what: &'static str, source: io::Error },
}

/// QEMU's command line for `spec` booting `image`.
pub fn qemu_args(image: &GuestImage, spec: &VmSpec) -> Vec<OsString> {
    let mem = format!("{}M", spec.mem_mib);
    let append = format!(
        "console=ttyS0 panic=-1 quiet ksmb.own_mib={} ksmb.dirty_kib={} ksmb.dirty_every={}",
        spec.own_mib, spec.dirty_kib, spec.dirty_every_s
    );
    let mut args: Vec<OsString> = Vec::new();
    let mut push = |a: &[&str]| args.extend(a.iter().map(OsString::from));
    push(&["-name", &spec.name(), "-machine", "q35,mem-merge=on"]);
    // A small translation cache, so that the host's memory goes to guest RAM.
    push(&["-accel", "tcg,tb-size=64", "-smp", "1", "-m", &mem]);
    // As the Kata Go runtime has it (govmm's appendMemoryKnobs): guest RAM is a memory backend
    // on NUMA node 0; `memory-backend-ram` unless the shared file system needs `share=on`
    // (there a file in /dev/shm; a memfd is the same shared memory without the file).
    let backend = match spec.memory {
        Memory::Private => format!("memory-backend-ram,id=dimm1,size={mem}"),
        Memory::SharedMemfd => format!("memory-backend-memfd,id=dimm1,size={mem},share=on"),
    };
    push(&["-object", &backend, "-numa", "node,memdev=dimm1"]);
    push(&["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-serial", "stdio"]);
    args.extend([OsString::from("-kernel"), image.kernel().into_os_string()]);
    args.extend([OsString::from("-initrd"), image.initrd().into_os_string()]);
    args.extend([OsString::from("-append"), OsString::from(append)]);
    args
}

/// What the console readers report; lines themselves go to the shared tail.
enum Event {
    Ready(Instant),
    Failed(String),
    /// One of QEMU's output pipes closed (it has exited, or is about to).
    Closed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Booting,
    Ready(Duration),
    Failed(String),
    Exited(String),
}

/// A running guest; QEMU is stopped (SIGTERM, then SIGKILL) when it is dropped.
#[derive(Debug)]
pub struct Vm {
    name: String,
    launched: Instant,
    events: Receiver<Event>,
    tail: Arc<Mutex<VecDeque<String>>>,
    open_pipes: u8,
    state: State,
    child: Guarded,
}

impl Vm {
    /// Starts `qemu-system-x86_64` from `PATH`.
    pub fn launch(image: &GuestImage, spec: &VmSpec) -> Result<Vm, VmError> {
        Vm::launch_with(Path::new(DEFAULT_QEMU), image, spec)
    }

    /// Starts `qemu` in its own process group (a ^C to the runner is the runner's to handle).
    pub fn launch_with(qemu: &Path, image: &GuestImage, spec: &VmSpec) -> Result<Vm, VmError> {
        spec.check()?;
        let name = spec.name();
        let mut child = Command::new(qemu)
            .args(qemu_args(image, spec))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .map_err(|source| VmError::Spawn { qemu: qemu.display().to_string(), source })?;
        let launched = Instant::now();
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        let child = Guarded::new(child, name.clone());
        let (tx, events) = mpsc::channel();
        let tail = Arc::new(Mutex::new(VecDeque::with_capacity(TAIL_LINES)));
        let echo = spec.echo_console.then(|| name.clone());
        let mut open_pipes = 0;
        for (pipe, prefix) in
            [(stdout.map(|p| Box::new(p) as Box<dyn Read + Send>), ""), (stderr.map(|p| Box::new(p) as _), "qemu: ")]
        {
            let Some(pipe) = pipe else { continue };
            let (tx, tail, echo) = (tx.clone(), Arc::clone(&tail), echo.clone());
            std::thread::Builder::new()
                .name(format!("{name}-console"))
                .spawn(move || read_console(pipe, prefix, &tx, &tail, echo.as_deref()))
                .map_err(|source| VmError::Io { name: name.clone(), what: "starting a console reader", source })?;
            open_pipes += 1;
        }
        Ok(Vm { name, launched, events, tail, open_pipes, state: State::Booting, child })
    }

    /// QEMU's PID (`None` once it has been reaped).
    pub fn pid(&self) -> Option<u32> {
        self.child.pid()
    }

    /// QEMU's exit status if it has ended (reaping it), without waiting.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, VmError> {
        self.child.try_wait().map_err(|source| VmError::Io {
            name: self.name.clone(),
            what: "checking on QEMU",
            source,
        })
    }

    /// `sandbox-<id>`.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn launched(&self) -> Instant {
        self.launched
    }

    /// Without blocking: `Some(launch-to-ready time)` once the guest has printed
    /// [`READY_LINE`], `None` while it boots, an error if it failed or QEMU ended first.
    pub fn try_ready(&mut self) -> Result<Option<Duration>, VmError> {
        while self.state == State::Booting {
            match self.events.try_recv() {
                Ok(event) => self.handle(event),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => self.exited(),
            }
        }
        self.outcome()
    }

    /// Blocks until the guest is ready, failed, or `timeout` after launch has passed.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<Duration, VmError> {
        let deadline = self.launched + timeout;
        while self.state == State::Booting {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(event) => self.handle(event),
                Err(RecvTimeoutError::Timeout) => {
                    let (name, tail) = (self.name.clone(), self.tail_text());
                    return Err(VmError::Timeout { name, waited: timeout, tail });
                }
                Err(RecvTimeoutError::Disconnected) => self.exited(),
            }
        }
        self.outcome()?.ok_or_else(|| VmError::Timeout {
            name: self.name.clone(),
            waited: timeout,
            tail: String::new(),
        })
    }

    /// The last console lines (QEMU's own messages prefixed `qemu: `), oldest first.
    pub fn console_tail(&self) -> Vec<String> {
        self.tail.lock().unwrap_or_else(PoisonError::into_inner).iter().cloned().collect()
    }

    /// SIGTERM, then SIGKILL if QEMU has not ended within a few seconds; how it ended.
    pub fn stop(&mut self) -> Result<Option<ExitStatus>, VmError> {
        self.child.stop(STOP_GRACE).map_err(|source| VmError::Io {
            name: self.name.clone(),
            what: "stopping QEMU",
            source,
        })
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Ready(at) => self.state = State::Ready(at.saturating_duration_since(self.launched)),
            Event::Failed(what) => self.state = State::Failed(what),
            Event::Closed => {
                self.open_pipes = self.open_pipes.saturating_sub(1);
                if self.open_pipes == 0 {
                    self.exited();
                }
            }
        }
    }

    /// Both pipes closed: QEMU has ended, or is about to. Its status, for the error message.
    fn exited(&mut self) {
        let status = match self.child.wait_for(STOP_GRACE) {
            Ok(Some(status)) => status.to_string(),
            Ok(None) => "still running with its output closed".into(),
            Err(e) => format!("status unknown: {e}"),
        };
        self.state = State::Exited(status);
    }

    fn outcome(&self) -> Result<Option<Duration>, VmError> {
        let (name, tail) = (self.name.clone(), self.tail_text());
        match &self.state {
            State::Booting => Ok(None),
            State::Ready(d) => Ok(Some(*d)),
            State::Failed(what) => Err(VmError::Failed { name, what: what.clone(), tail }),
            State::Exited(status) => Err(VmError::Exited { name, status: status.clone(), tail }),
        }
    }

    fn tail_text(&self) -> String {
        let lines = self.console_tail();
        if lines.is_empty() {
            return " (no console output)".into();
        }
        format!("; its console ended:\n  {}", lines.join("\n  "))
    }
}

/// Reads one of QEMU's pipes to its end: keeps the tail, reports READY / FAILED as they come.
fn read_console(
    pipe: Box<dyn Read + Send>,
    prefix: &str,
    tx: &Sender<Event>,
    tail: &Mutex<VecDeque<String>>,
    echo: Option<&str>,
) {
    let mut reader = BufReader::new(pipe);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let at = Instant::now();
        let text = String::from_utf8_lossy(&buf);
        let line = text.trim_end_matches(['\r', '\n']);
        if let Some(name) = echo {
            eprintln!("[{name}] {prefix}{line}");
        }
        // A receiver gone means the Vm was dropped: keep draining so QEMU never blocks on a
        // full pipe while it is being stopped.
        if prefix.is_empty() {
            if line.trim_end().ends_with(READY_LINE) {
                let _ = tx.send(Event::Ready(at));
            } else if let Some((_, what)) = line.split_once(FAILED_PREFIX) {
                let _ = tx.send(Event::Failed(what.trim().to_owned()));
            }
        }
        let mut tail = tail.lock().unwrap_or_else(PoisonError::into_inner);
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(format!("{prefix}{line}"));
    }
    let _ = tx.send(Event::Closed);
}
