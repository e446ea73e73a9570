//! Processes the runner starts (dbus-daemon aside, which `PrivateBus` owns): each is ended by
//! its PID when its guard goes, on success, error, panic or interruption alike.

use std::path::Path;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use rustix::process::{kill_process, Pid, Signal};

/// A child process, signalled and reaped when dropped.
#[derive(Debug)]
pub struct Guarded {
    child: Option<Child>,
    name: String,
}

impl Guarded {
    pub fn new(child: Child, name: impl Into<String>) -> Guarded {
        Guarded { child: Some(child), name: name.into() }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn child_mut(&mut self) -> Option<&mut Child> {
        self.child.as_mut()
    }

    /// Its exit status if it has ended (and is then reaped), without waiting.
    pub fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        let Some(child) = self.child.as_mut() else { return Ok(None) };
        let status = child.try_wait()?;
        if status.is_some() {
            self.child = None;
        }
        Ok(status)
    }

    /// Waits up to `grace` for it to end by itself (after its stdin was closed, say).
    pub fn wait_for(&mut self, grace: Duration) -> std::io::Result<Option<ExitStatus>> {
        let start = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.child = None;
                    return Ok(Some(status));
                }
            } else {
                return Ok(None);
            }
            if start.elapsed() >= grace {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, `grace` to exit, then SIGKILL; returns how it ended (`None` if already reaped).
    pub fn stop(&mut self, grace: Duration) -> std::io::Result<Option<ExitStatus>> {
        let Some(pid) = self.pid() else { return Ok(None) };
        signal(pid, Signal::TERM);
        if let Some(status) = self.wait_for(grace)? {
            return Ok(Some(status));
        }
        let Some(mut child) = self.child.take() else { return Ok(None) };
        eprintln!("{} (pid {pid}) ignored SIGTERM for {grace:?}: SIGKILL", self.name);
        child.kill()?;
        child.wait().map(Some)
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if let Err(e) = self.stop(Duration::from_secs(5)) {
            eprintln!("stopping {}: {e}", self.name);
        }
    }
}

fn signal(pid: u32, sig: Signal) {
    if let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
        // It may have exited already: nothing to do then.
        let _ = kill_process(pid, sig);
    }
}

/// Makes sure a process that is not our child (a workload's worker) is gone: waits up to
/// `grace`, then SIGKILLs it if it still runs the same program (its PID was not reused).
/// Returns whether it had to be killed.
pub fn ensure_gone(pid: u32, program: &str, grace: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < grace {
        if !alive(pid) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let runs_program = std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| c.split(|&b| b == 0).next().is_some_and(|arg0| arg0.ends_with(program.as_bytes())));
    if alive(pid) && runs_program {
        eprintln!("{program} (pid {pid}) still running after {grace:?}: SIGKILL");
        signal(pid, Signal::KILL);
        return true;
    }
    false
}

/// Running (a zombie has already released its memory and only waits for its parent).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("stat")) {
        // The state follows the command name in parentheses, which may itself hold spaces.
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    #[test]
    fn a_dropped_guard_ends_its_process() {
        let child = Command::new("sleep").arg("600").stdin(Stdio::null()).spawn().expect("spawn sleep");
        let pid = child.id();
        assert!(alive(pid));
        drop(Guarded::new(child, "sleep"));
        assert!(!alive(pid), "ended and reaped by the guard");
    }

    #[test]
    fn stop_reports_how_it_ended() {
        let child = Command::new("sleep").arg("600").spawn().expect("spawn sleep");
        let mut g = Guarded::new(child, "sleep");
        let status = g.stop(Duration::from_secs(5)).expect("stop").expect("status");
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc_sigterm()));
        assert_eq!(g.stop(Duration::from_secs(1)).expect("stop"), None, "stopping twice is harmless");
    }

    fn libc_sigterm() -> i32 {
        Signal::TERM.as_raw()
    }

    #[test]
    fn ensure_gone_kills_only_what_still_runs_the_program() {
        let child = Command::new("sleep").arg("600").spawn().expect("spawn sleep");
        let pid = child.id();
        let mut g = Guarded::new(child, "sleep");
        assert!(!ensure_gone(pid, "not-sleep", Duration::from_millis(50)), "another program: left alone");
        assert!(alive(pid));
        assert!(ensure_gone(pid, "sleep", Duration::from_millis(50)));
        let status = g.wait_for(Duration::from_secs(5)).expect("wait").expect("ended");
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(Signal::KILL.as_raw()));
    }
}
