//! The listening socket: passed by systemd (`LISTEN_FDS`), or made here as the original made it:
//! parent folder created 0750, a stale socket replaced, the socket 0660, over-long paths refused.
//! Its permissions are the only gate: the gRPC face offers nothing but Kick.

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use rustix::net::AddressFamily;

use ksm_throttler_contract::activation::{self, ActivationError};

/// `sun_path` holds 108 bytes, the last of which is the terminating NUL.
pub const MAX_PATH_LEN: usize = 107;

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
    #[error(transparent)]
    Activation(#[from] ActivationError),
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
    // process's: callers bind before they start anything else that creates files.
    let umask = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o117));
    let bound = UnixListener::bind(path);
    rustix::process::umask(umask);
    bound.map_err(io_error(path, "binding"))
}

/// Hands a listener (bound here or passed by systemd) to the tokio runtime this is called in.
pub fn register(listener: UnixListener) -> io::Result<tokio::net::UnixListener> {
    listener.set_nonblocking(true)?;
    tokio::net::UnixListener::from_std(listener)
}

/// Removes, at exit, a socket [`bind`] made (one systemd made is systemd's); a failure is logged.
pub fn remove(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        tracing::warn!(path = %path.display(), "removing the socket: {e}");
    }
}

/// The `FileDescriptorName=` of the gRPC socket unit (`kata-ksm-throttler-grpc.socket`), by which
/// the daemon finds it among the descriptors systemd passes.
pub const FD_NAME: &str = "grpc";

/// The gRPC socket systemd passed the daemon (named [`FD_NAME`]), if it passed one.
pub fn named_from_systemd() -> Result<Option<UnixListener>, SocketError> {
    Ok(activation::passed_named(FD_NAME, &[AddressFamily::UNIX], "a Unix socket")?.map(UnixListener::from))
}

/// The listening socket systemd passed, if it passed one to this process.
pub fn from_systemd() -> Result<Option<UnixListener>, SocketError> {
    Ok(activation::passed(&[AddressFamily::UNIX], "a Unix socket")?.map(UnixListener::from))
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
}
