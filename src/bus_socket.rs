//! The daemon's bus connection, on a unix socket that the runtime watches for reading only.
//!
//! zbus registers the sockets it opens for reading and for writing, edge-triggered. The kernel
//! then reports write space each time the bus reads what the daemon sent, so every signal the
//! daemon sends on its own (a step's `PropertiesChanged`) woke its thread a second time, for
//! nothing (docs/performance.md). Here a write goes straight to the socket, and only a full
//! socket buffer is waited for, on a registration made for that wait alone. Reads are buffered
//! as zbus's own are: one `read` brings in as many messages as have arrived.
//!
//! File descriptors are not passed on this connection (the throttler takes and gives none), so
//! the handshake does not offer to.

use std::io::{self, Read, Write};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use zbus::address::transport::{Transport, UnixSocket};
use zbus::connection::socket::{ReadHalf, Socket, Split, WriteHalf};

/// What one read takes from the socket at most; a larger message is read straight into its own
/// buffer.
const READ_AHEAD: usize = 4 * 1024;

fn watch(stream: UnixStream, interest: Interest) -> io::Result<AsyncFd<UnixStream>> {
    // SAFETY: the stream owns its descriptor, so it stays open, and is the one `as_raw_fd`
    // returns, for as long as the `AsyncFd` holds the stream.
    Ok(unsafe { AsyncFd::register_with_interest(stream, interest) }?)
}

/// How long a bus whose listen backlog stays full is tried again for (the D-Bus default call
/// timeout): at boot, many clients connect to the system bus at once.
const BACKLOG_FULL_FOR: std::time::Duration = std::time::Duration::from_secs(25);

/// Tokio's connect never blocks: on Linux a listener whose backlog is full turns it away at once
/// (`EAGAIN`) where a blocking connect would wait for room. So it is tried again every 20 ms, as
/// zbus does with its own sockets.
async fn connect_unix(path: &std::path::Path) -> io::Result<tokio::net::UnixStream> {
    let start = tokio::time::Instant::now();
    loop {
        match tokio::net::UnixStream::connect(path).await {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && start.elapsed() < BACKLOG_FULL_FOR => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            result => return result,
        }
    }
}

#[derive(Debug)]
pub struct BusSocket {
    fd: Arc<AsyncFd<UnixStream>>,
}

impl BusSocket {
    /// Connects to `address` if it is a unix socket path; `None` for any other transport (zbus's
    /// own is used for those).
    pub async fn connect(address: &zbus::Address) -> Option<io::Result<Self>> {
        let Transport::Unix(unix) = address.transport() else { return None };
        let UnixSocket::File(path) = unix.path() else { return None };
        Some(async { Self::new(connect_unix(path).await?.into_std()?) }.await)
    }

    /// Takes over a connected stream.
    pub fn new(stream: UnixStream) -> io::Result<Self> {
        stream.set_nonblocking(true)?;
        Ok(BusSocket { fd: Arc::new(watch(stream, Interest::READABLE)?) })
    }
}

impl Socket for BusSocket {
    type ReadHalf = Reader;
    type WriteHalf = Writer;

    fn split(self) -> Split<Reader, Writer> {
        let reader = Reader { fd: Arc::clone(&self.fd), buffer: Box::new([0; READ_AHEAD]), start: 0, end: 0 };
        Split::new(reader, Writer { fd: self.fd })
    }
}

#[derive(Debug)]
pub struct Reader {
    fd: Arc<AsyncFd<UnixStream>>,
    buffer: Box<[u8; READ_AHEAD]>,
    /// `buffer[start..end]` was read from the socket and not handed out yet.
    start: usize,
    end: usize,
}

/// One `read` that did not block: bytes, or 0 at the end of the stream.
async fn read_into(fd: &AsyncFd<UnixStream>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        let mut ready = fd.readable().await?;
        if let Ok(result) = ready.try_io(|fd| fd.get_ref().read(buf)) {
            return result;
        }
    }
}

#[zbus::export::async_trait::async_trait]
impl ReadHalf for Reader {
    async fn recvmsg(&mut self, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
        if self.start == self.end {
            if buf.len() >= READ_AHEAD {
                return Ok((read_into(&self.fd, buf).await?, Vec::new()));
            }
            self.end = read_into(&self.fd, &mut self.buffer[..]).await?;
            self.start = 0;
        }
        let n = buf.len().min(self.end - self.start);
        buf[..n].copy_from_slice(&self.buffer[self.start..self.start + n]);
        self.start += n;
        Ok((n, Vec::new()))
    }
}

#[derive(Debug)]
pub struct Writer {
    fd: Arc<AsyncFd<UnixStream>>,
}

#[zbus::export::async_trait::async_trait]
impl WriteHalf for Writer {
    /// The whole message, without the default's detour through `sendmsg` and `flush` (a boxed
    /// future each, per message).
    async fn send_message(&mut self, msg: &zbus::Message) -> zbus::Result<()> {
        let data = msg.data();
        if !data.fds().is_empty() {
            return Err(zbus::Error::Unsupported);
        }
        let mut sent = 0;
        while sent < data.len() {
            match self.write(&data[sent..]).await? {
                0 => return Err(io::Error::from(io::ErrorKind::WriteZero).into()),
                n => sent += n,
            }
        }
        Ok(())
    }

    async fn sendmsg(&mut self, buffer: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
        if !fds.is_empty() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "this connection passes no file descriptors"));
        }
        self.write(buffer).await
    }

    async fn close(&mut self) -> io::Result<()> {
        self.fd.get_ref().shutdown(std::net::Shutdown::Both)
    }
}

impl Writer {
    /// Waits for room in the socket buffer, watching a duplicate of the socket for writing for
    /// as long as the wait lasts (one descriptor cannot be registered twice).
    async fn room(&self) -> io::Result<()> {
        let writable = watch(self.fd.get_ref().try_clone()?, Interest::WRITABLE)?;
        let _ready = writable.writable().await?;
        Ok(())
    }

    /// One `write` that took at least a byte, waiting for room if the socket buffer is full.
    async fn write(&self, buffer: &[u8]) -> io::Result<usize> {
        loop {
            // Rust ignores SIGPIPE, so a bus gone away is an EPIPE here, not a signal.
            match self.fd.get_ref().write(buffer) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.room().await?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                result => return result,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn pair() -> (Reader, Writer, UnixStream) {
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        let (reader, writer) = BusSocket::new(ours).expect("register").split().take();
        (reader, writer, theirs)
    }

    async fn recv(reader: &mut Reader, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        let (n, fds) = reader.recvmsg(&mut buf).await.expect("recvmsg");
        assert!(fds.is_empty());
        buf.truncate(n);
        buf
    }

    #[tokio::test]
    async fn what_one_read_brings_in_is_handed_out_in_order_then_the_end() {
        let (mut reader, _writer, mut theirs) = pair();
        theirs.write_all(b"0123456789").expect("write");
        assert_eq!(recv(&mut reader, 4).await, b"0123");
        assert_eq!(recv(&mut reader, 4).await, b"4567");
        assert_eq!(recv(&mut reader, 4).await, b"89", "no more than was read ahead");
        // A read of READ_AHEAD or more goes straight into the caller's buffer.
        let big: Vec<u8> = (0..READ_AHEAD * 2).map(|i| i as u8).collect();
        theirs.write_all(&big).expect("write");
        let mut got = Vec::new();
        while got.len() < big.len() {
            got.extend(recv(&mut reader, READ_AHEAD * 2 - got.len()).await);
        }
        assert_eq!(got, big);
        drop(theirs);
        assert_eq!(recv(&mut reader, 4).await, b"", "end of stream");
    }

    #[tokio::test]
    async fn a_full_socket_buffer_is_waited_for_not_an_error() {
        let (_reader, mut writer, mut theirs) = pair();
        let chunk = vec![7u8; 64 * 1024];
        // Fill the socket until a write waits; the peer reads nothing meanwhile.
        let mut sent = 0;
        let waiting = loop {
            let send = writer.sendmsg(&chunk, &[]);
            tokio::pin!(send);
            match tokio::time::timeout(Duration::from_millis(200), &mut send).await {
                Ok(n) => sent += n.expect("sendmsg"),
                Err(_) => break sent,
            }
            assert!(sent < 64 * 1024 * 1024, "the socket never filled");
        };
        assert!(waiting > 0);
        // The peer drains it in the background; the next write goes through.
        let drain = std::thread::spawn(move || {
            let mut buf = vec![0; 1024 * 1024];
            let mut total = 0;
            while let Ok(n) = theirs.read(&mut buf) {
                if n == 0 {
                    break;
                }
                total += n;
            }
            total
        });
        let n = tokio::time::timeout(Duration::from_secs(10), writer.sendmsg(&chunk, &[]))
            .await
            .expect("the write went through once the peer read")
            .expect("sendmsg");
        assert!(n > 0);
        writer.close().await.expect("close");
        assert_eq!(drain.join().expect("drain thread"), waiting + n, "every byte arrived, once");
    }

    #[tokio::test]
    async fn a_message_goes_out_whole() {
        let (_reader, mut writer, mut theirs) = pair();
        let msg = zbus::Message::method_call("/org/kata/KsmThrottler", "Kick")
            .destination("org.kata.KsmThrottler")
            .build(&())
            .expect("message");
        writer.send_message(&msg).await.expect("send");
        let mut got = vec![0; msg.data().len()];
        theirs.read_exact(&mut got).expect("read");
        assert_eq!(&got[..], &msg.data()[..]);
    }

    #[tokio::test]
    async fn a_bus_whose_backlog_is_full_is_tried_again_until_it_has_room() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bus");
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        // Fill the listen backlog: connects that nobody accepts, until one is turned away.
        let mut pending = Vec::new();
        loop {
            match tokio::net::UnixStream::connect(&path).await {
                Ok(s) => pending.push(s),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("connect: {e}"),
            }
            assert!(pending.len() < 10_000, "the backlog never filled");
        }
        let connecting = tokio::spawn(async move { connect_unix(&path).await });
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert!(!connecting.is_finished(), "a full backlog is waited out, not an error");
        let _accepted = listener.accept().expect("accept");
        let stream = tokio::time::timeout(std::time::Duration::from_secs(5), connecting)
            .await
            .expect("connected once there was room")
            .expect("task");
        assert!(stream.is_ok(), "{stream:?}");
    }

    #[tokio::test]
    async fn file_descriptors_are_refused_with_a_clear_error() {
        let (_reader, mut writer, theirs) = pair();
        let fd = std::os::fd::AsFd::as_fd(&theirs);
        let err = writer.sendmsg(b"x", &[fd]).await.expect_err("no fd passing");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
