//! The one listening socket systemd passes (socket activation: `LISTEN_PID`, `LISTEN_FDS`), for
//! the servers started by a `.socket` unit (the gRPC shim, the exporter): checked to be a
//! listening stream socket of the family the caller serves, and made close-on-exec.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

use rustix::net::{sockopt, AddressFamily, SocketType};

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: i32 = 3;

#[derive(Debug, thiserror::Error)]
#[error("socket activation: {0}")]
pub struct ActivationError(String);

/// The socket systemd passed to this process, if it passed one; `what` names `families` in errors
/// ("a Unix socket").
pub fn passed(families: &[AddressFamily], what: &str) -> Result<Option<OwnedFd>, ActivationError> {
    passed_from(std::env::var_os("LISTEN_PID").as_deref(), std::env::var_os("LISTEN_FDS").as_deref(), families, what)
}

fn passed_from(
    pid: Option<&OsStr>,
    fds: Option<&OsStr>,
    families: &[AddressFamily],
    what: &str,
) -> Result<Option<OwnedFd>, ActivationError> {
    let (Some(pid), Some(fds)) = (pid, fds) else { return Ok(None) };
    // Meant for another process (e.g. inherited from a parent that did not unset it).
    if pid.to_str().and_then(|p| p.parse::<i32>().ok()) != Some(rustix::process::getpid().as_raw_nonzero().get()) {
        return Ok(None);
    }
    let count = fds
        .to_str()
        .and_then(|n| n.parse::<u32>().ok())
        .ok_or_else(|| ActivationError(format!("LISTEN_FDS={fds:?} is not a number")))?;
    match count {
        0 => return Ok(None),
        1 => {}
        n => {
            return Err(ActivationError(format!(
                "systemd passed {n} sockets; the .socket unit must have exactly one ListenStream="
            )))
        }
    }
    // SAFETY: by the socket activation protocol, descriptor 3 was passed to this process (LISTEN_PID
    // is ours) and nothing else in it has taken ownership of it.
    let fd = unsafe { OwnedFd::from_raw_fd(LISTEN_FDS_START) };
    let check = |what: &str, ok: io::Result<bool>| match ok {
        Ok(true) => Ok(()),
        Ok(false) => Err(ActivationError(format!("the passed descriptor is not {what}"))),
        Err(e) => Err(ActivationError(format!("the passed descriptor: {e}"))),
    };
    check(what, sockopt::socket_domain(&fd).map(|d| families.contains(&d)).map_err(io::Error::from))?;
    check("a stream socket", sockopt::socket_type(&fd).map(|t| t == SocketType::STREAM).map_err(io::Error::from))?;
    check("listening (ListenStream=, Accept=no)", sockopt::socket_acceptconn(&fd).map_err(io::Error::from))?;
    rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::CLOEXEC)
        .map_err(|e| ActivationError(format!("setting close-on-exec: {e}")))?;
    Ok(Some(fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_for_another_process_or_no_descriptors_mean_none_and_bad_ones_are_errors() {
        let unix = [AddressFamily::UNIX];
        let none = |pid: Option<&str>, fds: Option<&str>| {
            passed_from(pid.map(OsStr::new), fds.map(OsStr::new), &unix, "a Unix socket").map(|fd| fd.is_none())
        };
        assert!(none(None, None).expect("none"));
        assert!(none(Some("1"), Some("1")).expect("not ours"));
        let me = rustix::process::getpid().as_raw_nonzero().get().to_string();
        assert!(none(Some(&me), Some("0")).expect("zero"));
        let err = none(Some(&me), Some("2")).expect_err("two sockets");
        assert!(err.to_string().contains("exactly one ListenStream="), "{err}");
        let err = none(Some(&me), Some("x")).expect_err("not a number");
        assert!(err.to_string().contains("not a number"), "{err}");
    }
}
