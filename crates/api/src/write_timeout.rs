//! Connections whose writes make no progress for a while are cut.
//!
//! A client that stops reading leaves the server's writes pending forever: hyper stops
//! polling the response body, so whatever the live tail had queued for it (up to its byte
//! budget) and its place among the live tails stay taken for as long as the connection lives.
//! A handful of tokens could so hold the whole budget with idle sockets. Wrapping every
//! accepted connection in [`WriteTimeoutIo`] turns a write that makes no progress for
//! `AUDITBRIDGE_API_WRITE_TIMEOUT` into an I/O error: hyper drops the connection, and with it
//! the response, its queued events and its slot. A slow reader that takes *some* bytes within
//! the timeout is unaffected; the timer restarts with every byte written.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;

/// A listener whose connections time out writes that make no progress.
pub(crate) struct WriteTimeoutListener {
    inner: TcpListener,
    timeout: Duration,
}

impl WriteTimeoutListener {
    pub(crate) fn new(inner: TcpListener, timeout: Duration) -> WriteTimeoutListener {
        WriteTimeoutListener { inner, timeout }
    }
}

impl axum::serve::Listener for WriteTimeoutListener {
    type Io = WriteTimeoutIo<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (io, addr) = axum::serve::Listener::accept(&mut self.inner).await;
        (WriteTimeoutIo::new(io, self.timeout), addr)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// `io` whose writes (and flushes, and shutdown) fail with `TimedOut` once they have made no
/// progress for `timeout`.
pub(crate) struct WriteTimeoutIo<T> {
    io: T,
    timeout: Duration,
    /// Running while a write is pending; cleared whenever one completes.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<T> WriteTimeoutIo<T> {
    pub(crate) fn new(io: T, timeout: Duration) -> WriteTimeoutIo<T> {
        WriteTimeoutIo {
            io,
            timeout,
            stalled: None,
        }
    }

    /// Passes a ready result through (and restarts the timer); turns a pending one into an
    /// error once the timer has run out.
    fn watch<R>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        match polled {
            Poll::Ready(r) => {
                self.stalled = None;
                Poll::Ready(r)
            }
            Poll::Pending => {
                let timeout = self.timeout;
                let timer = self
                    .stalled
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        self.stalled = None;
                        Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("the client took no bytes for {timeout:?}"),
                        )))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteTimeoutIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteTimeoutIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.watch(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.watch(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.watch(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_shutdown(cx);
        self.watch(cx, polled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt as _;

    #[tokio::test]
    async fn a_write_the_peer_never_takes_fails_after_the_timeout_and_a_taken_one_does_not() {
        // A pipe of 64 bytes whose reader never reads.
        let (near, _far) = tokio::io::duplex(64);
        let mut io = WriteTimeoutIo::new(near, Duration::from_millis(200));
        io.write_all(&[0u8; 64]).await.unwrap();
        let started = std::time::Instant::now();
        let err = io.write_all(&[0u8; 1]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert!(started.elapsed() < Duration::from_secs(5));

        // A reader that keeps taking bytes, more slowly than the timeout in all, never trips it.
        let (near, mut far) = tokio::io::duplex(16);
        let mut io = WriteTimeoutIo::new(near, Duration::from_millis(200));
        let reader = tokio::spawn(async move {
            use tokio::io::AsyncReadExt as _;
            let mut got = 0;
            let mut buf = [0u8; 8];
            while got < 256 {
                tokio::time::sleep(Duration::from_millis(20)).await;
                got += far.read(&mut buf).await.unwrap();
            }
        });
        io.write_all(&[1u8; 256]).await.unwrap();
        reader.await.unwrap();
    }
}
