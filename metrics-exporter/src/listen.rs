//! The listening socket: the one systemd passes (`LISTEN_FDS`, from
//! kata-ksm-throttler-exporter.socket), or one bound here on `--listen`.

use std::ffi::OsStr;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{FromRawFd, OwnedFd};

use rustix::net::{sockopt, SocketType};

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: i32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("socket activation: {0}")]
    Activation(String),
    #[error("listening on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
}

/// The listen backlog of a socket bound here: a flood of scrapes waits in it while every
/// connection slot is taken (std's 128 made the 129th of 1,000 concurrent scrapes wait for a
/// SYN retransmission, 1 s later). systemd's sockets have SOMAXCONN (4096) by default.
pub const BACKLOG: u32 = 1024;

/// The socket systemd passed, or `addr` bound here (`true` for a passed one). Must be called
/// within a tokio runtime.
pub fn listener(addr: SocketAddr) -> Result<(tokio::net::TcpListener, bool), ListenError> {
    let register = |l: TcpListener| -> Result<tokio::net::TcpListener, ListenError> {
        l.set_nonblocking(true).map_err(|e| ListenError::Activation(format!("making the socket non-blocking: {e}")))?;
        tokio::net::TcpListener::from_std(l)
            .map_err(|e| ListenError::Activation(format!("registering the socket: {e}")))
    };
    match from_systemd(std::env::var_os("LISTEN_PID").as_deref(), std::env::var_os("LISTEN_FDS").as_deref())? {
        Some(l) => Ok((register(l)?, true)),
        None => bind(addr).map(|l| (l, false)).map_err(|source| ListenError::Bind { addr, source }),
    }
}

fn bind(addr: SocketAddr) -> io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

fn from_systemd(pid: Option<&OsStr>, fds: Option<&OsStr>) -> Result<Option<TcpListener>, ListenError> {
    let (Some(pid), Some(fds)) = (pid, fds) else { return Ok(None) };
    // Meant for another process (inherited from a parent that did not unset it).
    if pid.to_str().and_then(|p| p.parse::<i32>().ok()) != Some(rustix::process::getpid().as_raw_nonzero().get()) {
        return Ok(None);
    }
    let count = fds
        .to_str()
        .and_then(|n| n.parse::<u32>().ok())
        .ok_or_else(|| ListenError::Activation(format!("LISTEN_FDS={fds:?} is not a number")))?;
    match count {
        0 => return Ok(None),
        1 => {}
        n => {
            return Err(ListenError::Activation(format!(
                "systemd passed {n} sockets; the .socket unit must have exactly one ListenStream="
            )))
        }
    }
    // SAFETY: by the socket activation protocol, descriptor 3 was passed to this process
    // (LISTEN_PID is ours) and nothing else in it has taken ownership of it.
    let fd = unsafe { OwnedFd::from_raw_fd(LISTEN_FDS_START) };
    let fail = |what: &str| ListenError::Activation(format!("the passed descriptor is not {what}"));
    if !sockopt::socket_type(&fd).is_ok_and(|t| t == SocketType::STREAM) {
        return Err(fail("a stream socket"));
    }
    if !sockopt::socket_acceptconn(&fd).unwrap_or(false) {
        return Err(fail("listening (ListenStream=, Accept=no)"));
    }
    rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::CLOEXEC)
        .map_err(|e| ListenError::Activation(format!("setting close-on-exec: {e}")))?;
    Ok(Some(TcpListener::from(fd)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn another_process_s_or_no_descriptors_mean_bind_here() {
        assert!(from_systemd(None, None).expect("none").is_none());
        assert!(from_systemd(Some(OsStr::new("1")), Some(OsStr::new("1"))).expect("not ours").is_none());
        let me = rustix::process::getpid().as_raw_nonzero().get().to_string();
        assert!(from_systemd(Some(OsStr::new(&me)), Some(OsStr::new("0"))).expect("zero").is_none());
        let err = from_systemd(Some(OsStr::new(&me)), Some(OsStr::new("x"))).unwrap_err();
        assert!(err.to_string().contains("not a number"), "{err}");
        let err = from_systemd(Some(OsStr::new(&me)), Some(OsStr::new("2"))).unwrap_err();
        assert!(err.to_string().contains("exactly one"), "{err}");
    }
}
