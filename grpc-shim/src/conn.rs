//! Accepted connections, bounded: at most `max_connections` at once (the rest wait in the listen
//! backlog), and a peer that has not sent the HTTP/2 preface within the handshake timeout is
//! dropped. Once the preface is in, HTTP/2 keep-alive and the connection age take over.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tonic::transport::server::Connected;

/// "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", what every HTTP/2 client sends first.
const PREFACE_LEN: usize = 24;

/// How long to wait before accepting again after accept(2) failed (e.g. out of descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

pub struct Conn {
    stream: UnixStream,
    _slot: OwnedSemaphorePermit,
    /// Bytes of the preface still due, and by when; `None` once it is in.
    preface: Option<(usize, Pin<Box<Sleep>>)>,
}

impl Connected for Conn {
    type ConnectInfo = <UnixStream as Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Conn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if let Some((due, _)) = &mut this.preface {
                    *due = due.saturating_sub(buf.filled().len() - before);
                    if *due == 0 {
                        this.preface = None;
                    }
                }
                Poll::Ready(result)
            }
            Poll::Pending => match &mut this.preface {
                Some((_, deadline)) => {
                    ready!(deadline.as_mut().poll(cx));
                    Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "no HTTP/2 preface in time")))
                }
                None => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The accepted connections of `listener`, never more than `max` open at once.
pub fn incoming(
    listener: tokio::net::UnixListener,
    max: usize,
    handshake_timeout: Duration,
) -> impl Stream<Item = io::Result<Conn>> {
    let slots = Arc::new(Semaphore::new(max));
    futures_util::stream::unfold((listener, slots), move |(listener, slots)| async move {
        // The semaphore is never closed, so this only waits.
        let slot = slots.clone().acquire_owned().await.ok()?;
        let accepted = match listener.accept().await {
            Ok((stream, _)) => {
                let deadline = Box::pin(tokio::time::sleep(handshake_timeout));
                Ok(Conn { stream, _slot: slot, preface: Some((PREFACE_LEN, deadline)) })
            }
            Err(e) => {
                tracing::warn!("accepting a connection: {e}");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                Err(e)
            }
        };
        Some((accepted, (listener, slots)))
    })
}
