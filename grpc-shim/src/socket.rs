//! The listening socket: passed by systemd (`LISTEN_FDS`), or made here as the original made it:
//! parent folder created 0750, a stale socket replaced, the socket 0660, over-long paths refused.
//! Its permissions are the only gate: the shim offers nothing but Kick.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use rustix::net::{sockopt, AddressFamily, SocketType};

/// `sun_path` holds 108 bytes, the last of which is the terminating NUL.
pub const MAX_PATH_LEN: usize = 107;

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: i32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("the socket path is empty")]
    Empty,
    #[error("{uri:?}: not a Unix socket path; give a path or unix://PATH")]
    NotUnix { uri: String },
    #[error("{path}: a Unix socket path may be at most {MAX_PATH_LEN} bytes long, this one is {len}")]
    TooLong { path: PathBuf, len: usize },
    #[error("{path} exists and is not a socket: refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("{path}: another server is listening on this socket")]
    InUse { path: PathBuf },
    #[error("{path}: {what}: {source}")]
    Io { path: PathBuf, what: &'static str, source: io::Error },
    #[error("socket activation: {0}")]
    Activation(String),
}

/// `--uri`: a path, or the `unix://PATH` / `unix:PATH` form gRPC clients use.
pub fn parse_uri(uri: &str) -> Result<PathBuf, SocketError> {
    let path = uri.strip_prefix("unix://").or_else(|| uri.strip_prefix("unix:")).unwrap_or(uri);
    if path.is_empty() {
        return Err(SocketError::Empty);
    }
    if path.contains("://") {
        return Err(SocketError::NotUnix { uri: uri.to_owned() });
    }
    Ok(PathBuf::from(path))
}

fn io_error<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(io::Error) -> SocketError + 'a {
    move |source| SocketError::Io { path: path.to_owned(), what, source }
}

/// Binds `path`, creating its folder (0750) if missing and replacing a socket nobody listens on.
pub fn bind(path: &Path) -> Result<UnixListener, SocketError> {
    let len = path.as_os_str().as_bytes().len();
    if len == 0 {
        return Err(SocketError::Empty);
    }
    if len > MAX_PATH_LEN {
        return Err(SocketError::TooLong { path: path.to_owned(), len });
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o750)
                .create(parent)
                .map_err(io_error(parent, "creating the socket's folder"))?;
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => return Err(SocketError::InUse { path: path.to_owned() }),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::info!(path = %path.display(), "replacing a stale socket");
                std::fs::remove_file(path).map_err(io_error(path, "removing the stale socket"))?;
            }
            Err(e) => return Err(io_error(path, "checking whether the existing socket is in use")(e)),
        },
        Ok(_) => return Err(SocketError::NotASocket { path: path.to_owned() }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error(path, "looking at the socket path")(e)),
    }
    // Created 0660 by bind itself: a chmod after it would leave a moment in which anyone who
    // can search the folder connects (and kicks as root) under a loose umask. The umask is the
    // process's; nothing else creates files while the shim starts.
    let umask = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o117));
    let bound = UnixListener::bind(path);
    rustix::process::umask(umask);
    bound.map_err(io_error(path, "binding"))
}

/// The listening socket systemd passed, if it passed one to this process.
pub fn from_systemd() -> Result<Option<UnixListener>, SocketError> {
    listen_fds(std::env::var_os("LISTEN_PID").as_deref(), std::env::var_os("LISTEN_FDS").as_deref())
}

fn listen_fds(pid: Option<&OsStr>, fds: Option<&OsStr>) -> Result<Option<UnixListener>, SocketError> {
    let (Some(pid), Some(fds)) = (pid, fds) else { return Ok(None) };
    // Meant for another process (e.g. inherited from a parent that did not unset it).
    if pid.to_str().and_then(|p| p.parse::<i32>().ok()) != Some(rustix::process::getpid().as_raw_nonzero().get()) {
        return Ok(None);
    }
    let count = fds
        .to_str()
        .and_then(|n| n.parse::<u32>().ok())
        .ok_or_else(|| SocketError::Activation(format!("LISTEN_FDS={:?} is not a number", fds)))?;
    match count {
        0 => return Ok(None),
        1 => {}
        n => {
            return Err(SocketError::Activation(format!(
                "systemd passed {n} sockets; the .socket unit must have exactly one ListenStream="
            )))
        }
    }
    // SAFETY: by the socket activation protocol, descriptor 3 was passed to this process (LISTEN_PID
    // is ours) and nothing else in it has taken ownership of it.
    let fd = unsafe { OwnedFd::from_raw_fd(LISTEN_FDS_START) };
    let check = |what: &str, ok: io::Result<bool>| match ok {
        Ok(true) => Ok(()),
        Ok(false) => Err(SocketError::Activation(format!("the passed descriptor is not {what}"))),
        Err(e) => Err(SocketError::Activation(format!("the passed descriptor: {e}"))),
    };
    check("a Unix socket", sockopt::socket_domain(&fd).map(|d| d == AddressFamily::UNIX).map_err(io::Error::from))?;
    check("a stream socket", sockopt::socket_type(&fd).map(|t| t == SocketType::STREAM).map_err(io::Error::from))?;
    check("listening (ListenStream=, Accept=no)", sockopt::socket_acceptconn(&fd).map_err(io::Error::from))?;
    rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::CLOEXEC)
        .map_err(|e| SocketError::Activation(format!("setting close-on-exec: {e}")))?;
    Ok(Some(UnixListener::from(fd)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_socket_is_created_0660_whatever_the_umask() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ksm.sock");
        let before = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0));
        let bound = bind(&path);
        rustix::process::umask(before);
        let _listener = bound.expect("bind");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o660, "{mode:o}");
        assert_eq!(rustix::process::umask(before), before, "the umask is put back");
    }

    #[test]
    fn uris_are_paths_or_unix_urls() {
        assert_eq!(parse_uri("/run/x/ksm.sock").expect("path"), Path::new("/run/x/ksm.sock"));
        assert_eq!(parse_uri("unix:///run/x/ksm.sock").expect("url"), Path::new("/run/x/ksm.sock"));
        assert_eq!(parse_uri("unix:rel.sock").expect("url"), Path::new("rel.sock"));
        assert!(matches!(parse_uri("tcp://127.0.0.1:1"), Err(SocketError::NotUnix { .. })));
        assert!(matches!(parse_uri("unix://"), Err(SocketError::Empty)));
    }

    #[test]
    fn activation_variables_for_another_process_are_ignored() {
        let other = OsStr::new("1");
        assert!(matches!(listen_fds(Some(other), Some(OsStr::new("1"))), Ok(None)));
        assert!(matches!(listen_fds(None, None), Ok(None)));
        let me = rustix::process::getpid().as_raw_nonzero().get().to_string();
        let err = listen_fds(Some(OsStr::new(&me)), Some(OsStr::new("2"))).expect_err("two sockets");
        assert!(err.to_string().contains("exactly one ListenStream="), "{err}");
        let err = listen_fds(Some(OsStr::new(&me)), Some(OsStr::new("x"))).expect_err("not a number");
        assert!(err.to_string().contains("not a number"), "{err}");
    }
}
