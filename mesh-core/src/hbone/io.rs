//! A CONNECT stream as a byte stream (`AsyncRead` + `AsyncWrite`), for
//! proxies that run a protocol inside the tunnel — the waypoint speaks
//! HTTP/1.1 or HTTP/2 over HBONE streams in both directions. Flow-control
//! credit is returned as the reader consumes bytes, so a slow reader slows
//! the sender instead of growing a buffer; `shutdown` sends END_STREAM.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::H2Stream;

/// An [`H2Stream`] seen as a byte stream.
pub struct H2Io {
    stream: H2Stream,
    /// Received bytes not yet handed to the reader.
    pending: Bytes,
    read_closed: bool,
}

impl H2Io {
    pub fn new(stream: H2Stream) -> Self {
        Self {
            stream,
            pending: Bytes::new(),
            read_closed: false,
        }
    }
}

fn to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| io::Error::other("HTTP/2 I/O error"))
    } else {
        io::Error::new(io::ErrorKind::ConnectionReset, e)
    }
}

impl AsyncRead for H2Io {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                buf.put_slice(&self.pending[..n]);
                self.pending.advance(n);
                self.stream
                    .recv
                    .flow_control()
                    .release_capacity(n)
                    .map_err(to_io)?;
                return Poll::Ready(Ok(()));
            }
            if self.read_closed {
                return Poll::Ready(Ok(()));
            }
            match ready!(self.stream.recv.poll_data(cx)) {
                None => self.read_closed = true,
                Some(Ok(data)) => self.pending = data,
                Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
            }
        }
    }
}

impl AsyncWrite for H2Io {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let send = &mut self.stream.send;
        send.reserve_capacity(buf.len());
        match ready!(send.poll_capacity(cx)) {
            None => Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            Some(Err(e)) => Poll::Ready(Err(to_io(e))),
            Some(Ok(0)) => {
                // Capacity was assigned and taken back; ask again.
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Some(Ok(n)) => {
                let n = n.min(buf.len());
                send.send_data(Bytes::copy_from_slice(&buf[..n]), false)
                    .map_err(to_io)?;
                Poll::Ready(Ok(n))
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2 flushes frames on its connection task.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.stream.send.send_data(Bytes::new(), true) {
            Ok(()) => Poll::Ready(Ok(())),
            // Already ended or reset: nothing more to send either way.
            Err(e) if e.is_reset() || e.is_go_away() => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(to_io(e))),
        }
    }
}
