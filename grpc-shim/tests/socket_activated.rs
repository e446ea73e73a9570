//! The daemon on a gRPC socket handed over as systemd hands it (`LISTEN_FDS`, `LISTEN_FDNAMES`
//! naming it `grpc`), with exit on idle: a supervisor that, like systemd, keeps the listening socket
//! across the daemon's exits and starts the daemon again when a connection waits on it. A client
//! connects exactly as the daemon decides to exit, round after round: every kick is answered OK
//! and applied, by the instance exiting or by the next one, and the socket stays.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use kata_ksm_throttler_grpc::proto::ksm_throttler_client::KsmThrottlerClient;
use kata_ksm_throttler_test_support::*;
use rustix::event::{poll, PollFd, PollFlags};
use tokio::net::UnixStream;

/// Short steps, so that a kicked instance is idle again within about 2 s.
const FAST: [&str; 8] = [
    "--aggressive-duration",
    "1s",
    "--standard-duration",
    "100ms",
    "--slow-duration",
    "100ms",
    "--exit-idle-after",
    "500ms",
];

/// What the daemon logs when it decides to exit on idle (the gRPC socket is paused right after).
const DECIDES_TO_EXIT: &str = "releasing the bus name to exit";

/// Starts the daemon on `listener` whenever a connection waits on it and no instance runs, as
/// systemd does for a `.socket` unit; the listener is never closed or removed meanwhile.
struct Supervisor {
    /// A message each time an instance logs [`DECIDES_TO_EXIT`], as it logs it.
    decisions: tokio::sync::mpsc::UnboundedReceiver<()>,
    stop: Arc<AtomicBool>,
    current: Arc<Mutex<Option<Guarded>>>,
    /// The exit status of each instance that has ended.
    exits: Arc<Mutex<Vec<ExitStatus>>>,
    thread: Option<JoinHandle<()>>,
}

impl Supervisor {
    fn start(listener: UnixListener, daemon: Vec<String>, log: PathBuf) -> Supervisor {
        let stop = Arc::new(AtomicBool::new(false));
        let current: Arc<Mutex<Option<Guarded>>> = Arc::default();
        let exits: Arc<Mutex<Vec<ExitStatus>>> = Arc::default();
        let (s, c, e) = (stop.clone(), current.clone(), exits.clone());
        let (decided, decisions) = tokio::sync::mpsc::unbounded_channel();
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let mut fds = [PollFd::new(&listener, PollFlags::IN)];
                let timeout = rustix::event::Timespec { tv_sec: 0, tv_nsec: 50_000_000 };
                if poll(&mut fds, Some(&timeout)).unwrap_or(0) == 0 {
                    continue;
                }
                let instance = activate(&listener, &daemon, &log, decided.clone());
                *lock(&c) = Some(instance);
                // Until it exits (or the test ends): the socket is the instance's meanwhile.
                while !s.load(Ordering::Relaxed) {
                    let mut current = lock(&c);
                    let Some(instance) = current.as_mut() else { break };
                    match instance.wait_for(Duration::from_millis(20)) {
                        Ok(Some(status)) => {
                            lock(&e).push(status);
                            *current = None;
                            break;
                        }
                        Ok(None) => {}
                        Err(err) => panic!("waiting for the daemon: {err}"),
                    }
                }
            }
        });
        Supervisor { decisions, stop, current, exits, thread: Some(thread) }
    }

    fn instances_ended(&self) -> Vec<ExitStatus> {
        lock(&self.exits).clone()
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        // Dropping the instance ends it by PID (SIGTERM: it restores).
        lock(&self.current).take();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The daemon with `listener` as descriptor 3, named `grpc`, and `LISTEN_PID` its own PID: a
/// shell sets it to its `$$` and execs the daemon in its place. Its output is copied to `log` by a
/// thread that sends `decided` as soon as it reads [`DECIDES_TO_EXIT`].
fn activate(
    listener: &UnixListener,
    daemon: &[String],
    log: &Path,
    decided: tokio::sync::mpsc::UnboundedSender<()>,
) -> Guarded {
    let fd = listener.as_raw_fd();
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!("export LISTEN_PID=$$; exec \"$@\" 3<&{fd} {fd}<&-"))
        .arg("sh")
        .args(daemon)
        .env("LISTEN_FDS", "1")
        .env("LISTEN_FDNAMES", "grpc");
    // SAFETY: fcntl is async-signal-safe; it only lets this child's copy of the listener survive
    // exec, for the shell to move to descriptor 3.
    unsafe {
        cmd.pre_exec(move || {
            let fd = std::os::fd::BorrowedFd::borrow_raw(fd);
            rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty()).map_err(std::io::Error::from)
        });
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("starting the daemon: {e}"));
    let stderr = child.stderr.take().expect("piped");
    let mut file = std::fs::File::options().create(true).append(true).open(log).expect("the log");
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if line.contains(DECIDES_TO_EXIT) {
                let _ = decided.send(());
            }
            let _ = writeln!(file, "{line}");
        }
    });
    Guarded::new(child, "kata-ksm-throttler")
}

/// A fresh connection and one Kick, as Kata's Go kicker makes them.
async fn kick(socket: &Path) -> Result<(), String> {
    let path = socket.to_owned();
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .map_err(|e| format!("connecting: {e:?}"))?;
    KsmThrottlerClient::new(channel).kick(()).await.map(|_| ()).map_err(|e| format!("Kick: {e:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_arriving_as_the_daemon_exits_on_idle_are_served_by_the_next_instance() {
    const ROUNDS: usize = 8;
    let bus = start_bus();
    let scratch = Scratch::fresh();
    let socket = scratch.path().join("ksm.sock");
    let listener = UnixListener::bind(&socket).expect("bind");
    let log = scratch.path().join("daemon.log");
    let mut daemon = vec![daemon_binary().display().to_string(), "--bus".into(), bus.address().into()];
    daemon.extend(scratch.args());
    daemon.extend(FAST.iter().map(|s| s.to_string()));
    let mut supervisor = Supervisor::start(listener, daemon, log.clone());
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    let conn = connect(&bus).await;
    let proxy = proxy(&conn).await;

    // Nothing runs until the first connection, which starts the daemon and is served by it.
    kick(&socket).await.unwrap_or_else(|e| panic!("the first kick: {e}; log:\n{}", log_text()));
    assert_eq!(proxy.current_setting().await.expect("get"), "aggressive", "{}", log_text());
    assert!(log_text().contains("on the socket systemd passed"), "{}", log_text());

    for round in 0..ROUNDS {
        let decided = tokio::time::timeout(Duration::from_secs(20), supervisor.decisions.recv()).await;
        assert!(matches!(decided, Ok(Some(()))), "round {round}: no decision to exit on idle; log:\n{}", log_text());
        // Spread over the first milliseconds of the exit: at once, and up to 3 ms later.
        if round % 4 > 0 {
            tokio::time::sleep(Duration::from_millis(round as u64 % 4)).await;
        }
        let answered = tokio::time::timeout(Duration::from_secs(30), kick(&socket)).await;
        match answered {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("round {round}: the kick failed: {e}; log:\n{}", log_text()),
            Err(_) => panic!("round {round}: no answer within 30 s; log:\n{}", log_text()),
        }
        // Answered once applied, by whichever instance took it: it owns the name by now.
        assert_eq!(proxy.current_setting().await.expect("get"), "aggressive", "round {round}; log:\n{}", log_text());
        assert!(socket.exists(), "round {round}: the socket was removed");
    }

    let ended = supervisor.instances_ended();
    eprintln!("{ROUNDS} kicks as the daemon exited: {} instances exited on idle meanwhile", ended.len());
    assert!(ended.iter().all(ExitStatus::success), "{ended:?}; log:\n{}", log_text());
    assert!(!ended.is_empty(), "no instance exited on idle: the hand-over was never tested; log:\n{}", log_text());
    assert!(!log_text().contains("UNAVAILABLE"), "{}", log_text());
    drop(supervisor);
    assert!(socket.exists(), "a socket systemd passed is left to systemd");
    assert_eq!(scratch.knobs(), (0, 100, 20), "restored");
}
