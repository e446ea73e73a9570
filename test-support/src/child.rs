//! Child processes of tests and benchmarks (the daemon, the shim, the trigger, polkitd, a
//! workload, QEMU): each is ended by its PID when its guard goes, on success, error, panic or
//! interruption alike. dbus-daemon aside, which `PrivateBus` owns.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::Duration;

use rustix::process::{kill_process, Pid, Signal};

use crate::eventually::until_some_blocking;

/// How long a guard waits after SIGTERM before SIGKILL when it is dropped.
pub const DROP_GRACE: Duration = Duration::from_secs(5);

/// A child process, signalled and reaped when dropped: SIGTERM, [`DROP_GRACE`] to exit (a
/// daemon restores what it changed), then SIGKILL.
#[derive(Debug)]
pub struct Guarded {
    child: Option<Child>,
    name: String,
    log: Option<PathBuf>,
}

impl Guarded {
    pub fn new(child: Child, name: impl Into<String>) -> Guarded {
        Guarded { child: Some(child), name: name.into(), log: None }
    }

    /// Spawns `command` with no input and its stdout and stderr appended to `log`.
    pub fn spawn_logged(command: &mut Command, name: impl Into<String>, log: &Path) -> io::Result<Guarded> {
        let name = name.into();
        let file = File::options().create(true).append(true).open(log).map_err(|e| at(e, "opening", log))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("starting {name}: {e}")))?;
        Ok(Guarded { child: Some(child), name, log: Some(log.to_owned()) })
    }

    /// Its PID while it has not been reaped.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn child_mut(&mut self) -> Option<&mut Child> {
        self.child.as_mut()
    }

    /// The file its output goes to, when it was spawned with [`Guarded::spawn_logged`].
    pub fn log(&self) -> Option<&Path> {
        self.log.as_deref()
    }

    /// Its output so far (empty when it has no log file or it cannot be read).
    pub fn log_text(&self) -> String {
        self.log.as_ref().and_then(|l| std::fs::read_to_string(l).ok()).unwrap_or_default()
    }

    /// Sends `sig`, if it has not been reaped.
    pub fn signal(&self, sig: Signal) -> io::Result<()> {
        match self.pid().and_then(|p| i32::try_from(p).ok()).and_then(Pid::from_raw) {
            Some(pid) => kill_process(pid, sig).map_err(|e| io::Error::other(format!("{sig:?} to {}: {e}", self.name))),
            None => Ok(()),
        }
    }

    /// Its exit status if it has ended (and is then reaped), without waiting.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        let Some(child) = self.child.as_mut() else { return Ok(None) };
        let status = child.try_wait()?;
        if status.is_some() {
            self.child = None;
        }
        Ok(status)
    }

    /// Whether it still runs (reaping it if it has ended).
    pub fn is_running(&mut self) -> io::Result<bool> {
        Ok(self.child.is_some() && self.try_wait()?.is_none())
    }

    /// Waits up to `grace` for it to end by itself (after its stdin was closed, say).
    pub fn wait_for(&mut self, grace: Duration) -> io::Result<Option<ExitStatus>> {
        if self.child.is_none() {
            return Ok(None);
        }
        let ended = until_some_blocking(grace, "", || self.try_wait().transpose());
        ended.ok().transpose()
    }

    /// Waits up to `limit` for it to end, failing with its log's tail if it does not (or was
    /// reaped already).
    pub fn wait_within(&mut self, limit: Duration) -> io::Result<ExitStatus> {
        if self.child.is_none() {
            return Err(io::Error::other(format!("{} was already reaped", self.name)));
        }
        self.wait_for(limit)?.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{} did not exit within {limit:?}; log:\n{}", self.name, self.log_text()),
            )
        })
    }

    /// SIGTERM, `grace` to exit, then SIGKILL; returns how it ended (`None` if already reaped).
    pub fn stop(&mut self, grace: Duration) -> io::Result<Option<ExitStatus>> {
        let Some(pid) = self.pid() else { return Ok(None) };
        signal_pid(pid, Signal::TERM);
        if let Some(status) = self.wait_for(grace)? {
            return Ok(Some(status));
        }
        let Some(mut child) = self.child.take() else { return Ok(None) };
        eprintln!("{} (pid {pid}) ignored SIGTERM for {grace:?}: SIGKILL", self.name);
        child.kill()?;
        child.wait().map(Some)
    }

    /// SIGKILL and reap; returns how it ended (`None` if already reaped).
    pub fn kill(&mut self) -> io::Result<Option<ExitStatus>> {
        let Some(mut child) = self.child.take() else { return Ok(None) };
        child.kill()?;
        child.wait().map(Some)
    }

    /// Waits for it to end and collects what it wrote to its piped stdout and stderr.
    pub fn wait_with_output(mut self) -> io::Result<Output> {
        match self.child.take() {
            Some(child) => child.wait_with_output(),
            None => Err(io::Error::other(format!("{} was already reaped", self.name))),
        }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        // A stopped process does not act on SIGTERM until it is continued.
        if let Some(pid) = self.pid() {
            signal_pid(pid, Signal::CONT);
        }
        if let Err(e) = self.stop(DROP_GRACE) {
            eprintln!("stopping {}: {e}", self.name);
        }
    }
}

fn at(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

/// Sends `sig` to `pid`; one that has exited already needs nothing.
pub fn signal_pid(pid: u32, sig: Signal) {
    if let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
        let _ = kill_process(pid, sig);
    }
}

/// Makes sure a process that is not our child (a workload's worker) is gone: waits up to
/// `grace`, then SIGKILLs it if it still runs the same program (its PID was not reused).
/// Returns whether it had to be killed.
pub fn ensure_gone(pid: u32, program: &str, grace: Duration) -> bool {
    if gone_within(pid, grace) {
        return false;
    }
    let runs_program = std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| c.split(|&b| b == 0).next().is_some_and(|arg0| arg0.ends_with(program.as_bytes())));
    if alive(pid) && runs_program {
        eprintln!("{program} (pid {pid}) still running after {grace:?}: SIGKILL");
        signal_pid(pid, Signal::KILL);
        return true;
    }
    false
}

/// Ends a process that is not our child (one dbus-daemon started) if it still runs `exe`
/// (so a reused PID is left alone): SIGTERM, `grace` to exit, then SIGKILL.
pub fn end_foreign(pid: u32, exe: &Path, grace: Duration) {
    let runs = |pid: u32| std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|e| e == exe);
    if !runs(pid) {
        return;
    }
    signal_pid(pid, Signal::TERM);
    if !gone_within(pid, grace) && runs(pid) {
        signal_pid(pid, Signal::KILL);
    }
}

/// Whether `pid` is gone (or a zombie) within `grace`.
fn gone_within(pid: u32, grace: Duration) -> bool {
    until_some_blocking(grace, "", || (!alive(pid)).then_some(())).is_ok()
}

/// Running: a zombie has already released its memory and only waits for its parent to reap it.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("stat")) {
        // The state follows the command name in parentheses, which may itself hold spaces.
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    fn sleeper() -> Child {
        Command::new("sleep").arg("600").stdin(Stdio::null()).spawn().expect("spawn sleep")
    }

    #[test]
    fn a_dropped_guard_ends_its_process() {
        let child = sleeper();
        let pid = child.id();
        assert!(alive(pid));
        drop(Guarded::new(child, "sleep"));
        assert!(!alive(pid), "ended and reaped by the guard");
    }

    #[test]
    fn a_dropped_guard_ends_a_stopped_process_too() {
        let g = Guarded::new(sleeper(), "sleep");
        let pid = g.pid().expect("running");
        g.signal(Signal::STOP).expect("SIGSTOP");
        drop(g);
        assert!(!alive(pid));
    }

    #[test]
    fn stop_reports_how_it_ended() {
        let mut g = Guarded::new(sleeper(), "sleep");
        let status = g.stop(Duration::from_secs(5)).expect("stop").expect("status");
        assert_eq!(status.signal(), Some(Signal::TERM.as_raw()));
        assert_eq!(g.stop(Duration::from_secs(1)).expect("stop"), None, "stopping twice is harmless");
        assert!(g.wait_within(Duration::from_secs(1)).is_err(), "nothing left to wait for");
    }

    #[test]
    fn a_logged_child_writes_to_its_log_and_is_waited_for() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("echo.log");
        let mut g = Guarded::spawn_logged(Command::new("sh").args(["-c", "echo out; echo err >&2"]), "sh", &log)
            .expect("spawn");
        let status = g.wait_within(Duration::from_secs(10)).expect("exits");
        assert!(status.success());
        assert_eq!(g.log_text(), "out\nerr\n");
        assert_eq!(g.pid(), None, "reaped");
    }

    #[test]
    fn waiting_too_short_names_the_process_and_its_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("sleep.log");
        let mut g =
            Guarded::spawn_logged(Command::new("sh").args(["-c", "echo started; exec sleep 600"]), "sleeper", &log)
                .expect("spawn");
        crate::eventually_blocking(Duration::from_secs(10), "the first line", || g.log_text() == "started\n");
        let err = g.wait_within(Duration::from_millis(20)).expect_err("still running");
        assert!(err.to_string().contains("sleeper did not exit") && err.to_string().contains("started"), "{err}");
        assert!(g.kill().expect("kill").is_some_and(|s| s.signal() == Some(Signal::KILL.as_raw())));
    }

    #[test]
    fn ensure_gone_kills_only_what_still_runs_the_program() {
        let child = sleeper();
        let pid = child.id();
        let mut g = Guarded::new(child, "sleep");
        assert!(!ensure_gone(pid, "not-sleep", Duration::from_millis(50)), "another program: left alone");
        assert!(alive(pid));
        assert!(ensure_gone(pid, "sleep", Duration::from_millis(50)));
        let status = g.wait_for(Duration::from_secs(5)).expect("wait").expect("ended");
        assert_eq!(status.signal(), Some(Signal::KILL.as_raw()));
    }

    #[test]
    fn end_foreign_leaves_other_programs_alone() {
        let mut g = Guarded::new(sleeper(), "sleep");
        let pid = g.pid().expect("running");
        end_foreign(pid, Path::new("/nonexistent/program"), Duration::from_millis(50));
        assert!(alive(pid));
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).expect("exe");
        end_foreign(pid, &exe, Duration::from_secs(5));
        let status = g.wait_for(Duration::from_secs(5)).expect("wait").expect("ended");
        assert_eq!(status.signal(), Some(Signal::TERM.as_raw()));
    }
}
