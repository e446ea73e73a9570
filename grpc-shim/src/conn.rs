//! Accepted connections, bounded: at most `max_connections` at once (the rest wait in the listen
//! backlog), and a peer that has not sent the HTTP/2 preface within the handshake timeout is
//! dropped. Once the preface is in, HTTP/2 keep-alive and the connection age take over. What the
//! peer sends reaches h2 through the [`Rewriter`], for the authorities h2 would refuse.

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

use crate::authority_rewrite::{Bounds, Rewriter};

/// "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", what every HTTP/2 client sends first.
const PREFACE_LEN: usize = 24;

/// How long to wait before accepting again after accept(2) failed (e.g. out of descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Bytes read from the peer at a time.
const READ_SIZE: usize = 8 * 1024;

pub struct Conn {
    stream: UnixStream,
    _slot: OwnedSemaphorePermit,
    /// Bytes of the preface still due, and by when; `None` once it is in.
    preface: Option<(usize, Pin<Box<Sleep>>)>,
    rewriter: Rewriter,
    /// Rewritten bytes h2 has not read yet, from `pending_at` on.
    pending: Vec<u8>,
    pending_at: usize,
    eof: bool,
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
        loop {
            if this.pending_at < this.pending.len() {
                let n = buf.remaining().min(this.pending.len() - this.pending_at);
                buf.put_slice(&this.pending[this.pending_at..this.pending_at + n]);
                this.pending_at += n;
                if this.pending_at == this.pending.len() {
                    this.pending.clear();
                    this.pending_at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            let mut raw = [0u8; READ_SIZE];
            let mut raw_buf = ReadBuf::new(&mut raw);
            match Pin::new(&mut this.stream).poll_read(cx, &mut raw_buf) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    return match &mut this.preface {
                        Some((_, deadline)) => {
                            ready!(deadline.as_mut().poll(cx));
                            Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "no HTTP/2 preface in time")))
                        }
                        None => Poll::Pending,
                    }
                }
            }
            let read = raw_buf.filled();
            if let Some((due, _)) = &mut this.preface {
                *due = due.saturating_sub(read.len());
                if *due == 0 {
                    this.preface = None;
                }
            }
            if read.is_empty() {
                this.eof = true;
                this.rewriter.finish(&mut this.pending);
            } else if let Err(e) = this.rewriter.feed(read, &mut this.pending) {
                tracing::debug!("dropping a connection: {e}");
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
            }
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
    bounds: Bounds,
) -> impl Stream<Item = io::Result<Conn>> {
    let slots = Arc::new(Semaphore::new(max));
    futures_util::stream::unfold((listener, slots), move |(listener, slots)| async move {
        // The semaphore is never closed, so this only waits.
        let slot = slots.clone().acquire_owned().await.ok()?;
        let accepted = match listener.accept().await {
            Ok((stream, _)) => {
                let deadline = Box::pin(tokio::time::sleep(handshake_timeout));
                Ok(Conn {
                    stream,
                    _slot: slot,
                    preface: Some((PREFACE_LEN, deadline)),
                    rewriter: Rewriter::new(bounds),
                    pending: vec![],
                    pending_at: 0,
                    eof: false,
                })
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
