//! The listening sockets systemd passes (socket activation: `LISTEN_PID`, `LISTEN_FDS`,
//! `LISTEN_FDNAMES`): the one socket of the servers started by a `.socket` unit of their own (the
//! gRPC shim, the exporter), or the one named by its unit's `FileDescriptorName=` (the daemon's
//! gRPC socket, passed whether a connection or D-Bus activation started it). Each is checked to
//! be a listening stream socket of the family the caller serves, and made close-on-exec.

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
    let Some(count) = count(pid, fds)? else { return Ok(None) };
    match count {
        0 => return Ok(None),
        1 => {}
        n => {
            return Err(ActivationError(format!(
                "systemd passed {n} sockets; the .socket unit must have exactly one ListenStream="
            )))
        }
    }
    take(LISTEN_FDS_START, families, what).map(Some)
}

/// The socket systemd passed to this process under `name` (its `.socket` unit's
/// `FileDescriptorName=`), if it passed one; the other descriptors passed are left alone.
pub fn passed_named(name: &str, families: &[AddressFamily], what: &str) -> Result<Option<OwnedFd>, ActivationError> {
    let var = |v| std::env::var_os(v);
    named_from(var("LISTEN_PID").as_deref(), var("LISTEN_FDS").as_deref(), var("LISTEN_FDNAMES").as_deref(), name)?
        .map(|fd| take(fd, families, what))
        .transpose()
}

/// The descriptor named `name` among those passed, if any.
fn named_from(
    pid: Option<&OsStr>,
    fds: Option<&OsStr>,
    names: Option<&OsStr>,
    name: &str,
) -> Result<Option<i32>, ActivationError> {
    let Some(count) = count(pid, fds)? else { return Ok(None) };
    if count == 0 {
        return Ok(None);
    }
    let names = names.map(|n| n.to_str().ok_or_else(|| ActivationError(format!("LISTEN_FDNAMES={n:?} is not UTF-8"))));
    let Some(names) = names.transpose()? else { return Ok(None) };
    let names: Vec<&str> = names.split(':').collect();
    if names.len() != count as usize {
        return Err(ActivationError(format!(
            "LISTEN_FDS={count} but LISTEN_FDNAMES names {} descriptors",
            names.len()
        )));
    }
    let found: Vec<usize> = names.iter().enumerate().filter(|(_, n)| **n == name).map(|(i, _)| i).collect();
    match found[..] {
        [] => Ok(None),
        [i] => Ok(Some(LISTEN_FDS_START + i as i32)),
        _ => Err(ActivationError(format!(
            "systemd passed {} sockets named {name:?}; the .socket unit must have exactly one ListenStream=",
            found.len()
        ))),
    }
}

/// `LISTEN_FDS`, if the variables are meant for this process.
fn count(pid: Option<&OsStr>, fds: Option<&OsStr>) -> Result<Option<u32>, ActivationError> {
    let (Some(pid), Some(fds)) = (pid, fds) else { return Ok(None) };
    // Meant for another process (e.g. inherited from a parent that did not unset it).
    if pid.to_str().and_then(|p| p.parse::<i32>().ok()) != Some(rustix::process::getpid().as_raw_nonzero().get()) {
        return Ok(None);
    }
    let count = fds
        .to_str()
        .and_then(|n| n.parse::<u32>().ok())
        .ok_or_else(|| ActivationError(format!("LISTEN_FDS={fds:?} is not a number")))?;
    Ok(Some(count))
}

/// Takes ownership of passed descriptor `raw`, once checked.
fn take(raw: i32, families: &[AddressFamily], what: &str) -> Result<OwnedFd, ActivationError> {
    // SAFETY: by the socket activation protocol, descriptor `raw` (from 3 to 3 + LISTEN_FDS - 1)
    // was passed to this process (LISTEN_PID is ours), and each is taken once: the callers take
    // one descriptor each, by position or by name, at start-up.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
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
    Ok(fd)
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

    #[test]
    fn a_named_descriptor_is_found_by_its_name_among_several() {
        let me = rustix::process::getpid().as_raw_nonzero().get().to_string();
        let find = |pid: &str, fds: &str, names: Option<&str>| {
            named_from(Some(OsStr::new(pid)), Some(OsStr::new(fds)), names.map(OsStr::new), "grpc")
        };
        assert_eq!(find(&me, "1", Some("grpc")).expect("one"), Some(3));
        assert_eq!(find(&me, "3", Some("other:x:grpc")).expect("third"), Some(5));
        assert_eq!(find(&me, "2", Some("other:x")).expect("not passed"), None);
        assert_eq!(find(&me, "1", None).expect("no names"), None, "an unnamed socket is not taken as the gRPC one");
        assert_eq!(find("1", "1", Some("grpc")).expect("not ours"), None);
        assert_eq!(find(&me, "0", Some("")).expect("none"), None);
        let err = find(&me, "2", Some("grpc")).expect_err("names and count differ");
        assert!(err.to_string().contains("LISTEN_FDNAMES names 1"), "{err}");
        let err = find(&me, "2", Some("grpc:grpc")).expect_err("twice");
        assert!(err.to_string().contains("2 sockets named \"grpc\""), "{err}");
    }
}
