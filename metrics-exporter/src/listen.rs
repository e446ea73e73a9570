//! The listening socket: the one systemd passes (`LISTEN_FDS`, from
//! kata-ksm-throttler-exporter.socket), or one bound here on `--listen`.

use std::io;
use std::net::{SocketAddr, TcpListener};

use ksm_throttler_contract::activation::{self, ActivationError};
use rustix::net::AddressFamily;

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error(transparent)]
    Passed(#[from] ActivationError),
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
    match from_systemd()? {
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

fn from_systemd() -> Result<Option<TcpListener>, ListenError> {
    let families = [AddressFamily::INET, AddressFamily::INET6];
    Ok(activation::passed(&families, "a TCP/IP socket")?.map(TcpListener::from))
}
