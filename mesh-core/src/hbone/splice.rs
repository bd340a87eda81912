//! The copy loop between a TCP socket and an HTTP/2 CONNECT stream.
//!
//! Semantics (RFC 9113 §8.5, as ztunnel does it):
//! - EOF from TCP becomes END_STREAM; END_STREAM becomes a TCP write
//!   shutdown (FIN). Each direction ends on its own: half-close works.
//! - A TCP error (e.g. the peer reset) becomes RST_STREAM(CONNECT_ERROR); a
//!   stream reset or HTTP/2 error becomes a TCP RST (linger 0).
//! - Backpressure: TCP is read only when the stream has send capacity, and
//!   HTTP/2 flow-control credit is returned only after the bytes were
//!   written to TCP, so a slow reader stalls the writer at the other end
//!   instead of filling memory.

use std::future::poll_fn;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;

/// Reads once a connection has shown it moves bulk data.
const READ_CHUNK: usize = 64 * 1024;

/// Reads until then: a request or a response head fits.
const READ_SMALL: usize = 4 * 1024;

/// The buffer one direction reads into. It holds nothing while its socket
/// is idle (ten thousand idle tunnels keep no read buffers), reads 4 KiB at
/// a time for request-sized traffic, and 64 KiB once a read fills it. Each
/// read's bytes are split off and handed on without a copy.
struct ReadBuffer {
    buf: BytesMut,
    size: usize,
}

impl ReadBuffer {
    fn new() -> Self {
        Self {
            buf: BytesMut::new(),
            size: READ_SMALL,
        }
    }

    /// The next bytes from `rd`; empty at end of stream.
    async fn read(&mut self, rd: &mut ReadHalf<'_>) -> std::io::Result<Bytes> {
        let ready = poll_fn(|cx| Poll::Ready(rd.as_ref().poll_read_ready(cx).is_ready())).await;
        if !ready {
            // Idle: give the buffer back while waiting.
            self.buf = BytesMut::new();
            rd.as_ref().readable().await?;
        }
        if self.buf.capacity() < self.size / 4 {
            self.buf = BytesMut::with_capacity(self.size);
        }
        let room = self.buf.capacity();
        let n = rd.read_buf(&mut self.buf).await?;
        if n == room {
            self.size = READ_CHUNK;
        }
        Ok(self.buf.split().freeze())
    }
}

/// Bytes moved so far, readable while the splice runs.
#[derive(Debug, Default)]
pub struct Transferred {
    /// TCP → stream (what the local TCP peer sent).
    pub tcp_to_stream: AtomicU64,
    /// Stream → TCP (what the local TCP peer received).
    pub stream_to_tcp: AtomicU64,
}

impl Transferred {
    pub fn sent(&self) -> u64 {
        self.tcp_to_stream.load(Ordering::Relaxed)
    }
    pub fn received(&self) -> u64 {
        self.stream_to_tcp.load(Ordering::Relaxed)
    }
}

/// How a splice ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum SpliceError {
    #[error("reading from TCP: {0}")]
    TcpRead(std::io::Error),
    #[error("writing to TCP: {0}")]
    TcpWrite(std::io::Error),
    #[error("HTTP/2 stream: {0}")]
    Stream(#[from] h2::Error),
    #[error("HTTP/2 stream closed while sending")]
    StreamClosed,
}

impl SpliceError {
    /// True when the failure came from the TCP side.
    pub fn is_tcp(&self) -> bool {
        matches!(self, SpliceError::TcpRead(_) | SpliceError::TcpWrite(_))
    }
}

/// Copy both ways until both directions have ended; see the module doc for
/// how ends and errors are mapped.
pub async fn splice(
    mut tcp: TcpStream,
    send: &mut SendStream<Bytes>,
    recv: &mut RecvStream,
    counters: &Transferred,
) -> Result<(), SpliceError> {
    let result = {
        let (mut rd, mut wr) = tcp.split();
        let up = async {
            let mut buf = ReadBuffer::new();
            loop {
                let mut data = buf.read(&mut rd).await.map_err(SpliceError::TcpRead)?;
                if data.is_empty() {
                    send.send_data(Bytes::new(), true)?;
                    return Ok::<(), SpliceError>(());
                }
                while !data.is_empty() {
                    send.reserve_capacity(data.len());
                    let cap = match poll_fn(|cx| send.poll_capacity(cx)).await {
                        Some(Ok(c)) => c,
                        Some(Err(e)) => return Err(e.into()),
                        None => return Err(SpliceError::StreamClosed),
                    };
                    if cap == 0 {
                        continue;
                    }
                    let chunk = data.split_to(cap.min(data.len()));
                    counters
                        .tcp_to_stream
                        .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    send.send_data(chunk, false)?;
                }
            }
        };
        let down = async {
            while let Some(chunk) = recv.data().await {
                let chunk = chunk?;
                let n = chunk.len();
                wr.write_all(&chunk).await.map_err(SpliceError::TcpWrite)?;
                counters
                    .stream_to_tcp
                    .fetch_add(n as u64, Ordering::Relaxed);
                recv.flow_control().release_capacity(n)?;
            }
            // END_STREAM: pass the half-close on. A peer that already went
            // away makes this fail; the other direction will report it.
            let _ = wr.shutdown().await;
            Ok::<(), SpliceError>(())
        };
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            tokio::select! {
                r = &mut up, if !up_done => {
                    up_done = true;
                    if let Err(e) = r { break Err(e) }
                }
                r = &mut down, if !down_done => {
                    down_done = true;
                    if let Err(e) = r { break Err(e) }
                }
            }
            if up_done && down_done {
                break Ok(());
            }
        }
    };
    if let Err(e) = &result {
        // Both sides learn of the failure: the stream is reset and the TCP
        // peer gets an RST rather than a clean FIN.
        send.send_reset(Reason::CONNECT_ERROR);
        reset_tcp(&tcp);
        tracing::debug!(error = %e, "tunnelled connection aborted");
    }
    result
}

/// Make the next close of `tcp` send an RST instead of a FIN.
pub fn reset_tcp(tcp: &TcpStream) {
    let _ = socket2::SockRef::from(tcp).set_linger(Some(Duration::ZERO));
}

/// Copy between two TCP sockets (`client` and `upstream`) with half-close,
/// counting bytes as they move (`tcp_to_stream` is client → upstream). An
/// error on either side resets both.
pub async fn copy_tcp(
    mut client: TcpStream,
    mut upstream: TcpStream,
    counters: &Transferred,
) -> std::io::Result<()> {
    async fn pump(
        mut r: ReadHalf<'_>,
        mut w: WriteHalf<'_>,
        counter: &AtomicU64,
    ) -> std::io::Result<()> {
        let mut buf = ReadBuffer::new();
        loop {
            let data = buf.read(&mut r).await?;
            if data.is_empty() {
                return w.shutdown().await;
            }
            w.write_all(&data).await?;
            counter.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
    }
    let result = {
        let (cr, cw) = client.split();
        let (ur, uw) = upstream.split();
        tokio::try_join!(
            pump(cr, uw, &counters.tcp_to_stream),
            pump(ur, cw, &counters.stream_to_tcp)
        )
        .map(|_| ())
    };
    if result.is_err() {
        reset_tcp(&client);
        reset_tcp(&upstream);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    #[tokio::test]
    async fn an_idle_socket_holds_no_read_buffer() {
        let (mut a, mut b) = pair().await;
        let (mut rd, _wr) = b.split();
        let mut rb = ReadBuffer::new();
        a.write_all(b"request").await.unwrap();
        assert_eq!(&rb.read(&mut rd).await.unwrap()[..], b"request");
        assert_eq!(rb.size, READ_SMALL, "a small read stays small");
        // Nothing more to read: waiting holds no buffer.
        assert!(rb.read(&mut rd).now_or_never().is_none());
        assert_eq!(rb.buf.capacity(), 0);
        // And the next request is read whole.
        a.write_all(b"next").await.unwrap();
        assert_eq!(&rb.read(&mut rd).await.unwrap()[..], b"next");
        drop(a);
        assert!(rb.read(&mut rd).await.unwrap().is_empty(), "EOF");
    }

    #[tokio::test]
    async fn a_read_that_fills_the_buffer_switches_to_bulk_reads() {
        let (mut a, mut b) = pair().await;
        let (mut rd, _wr) = b.split();
        let mut rb = ReadBuffer::new();
        let sent = vec![9u8; 256 * 1024];
        let writer = tokio::spawn(async move {
            a.write_all(&sent).await.unwrap();
        });
        let first = rb.read(&mut rd).await.unwrap();
        assert!(first.len() <= READ_SMALL);
        let mut got = first.len();
        let mut largest = 0;
        while got < 256 * 1024 {
            let chunk = rb.read(&mut rd).await.unwrap();
            assert!(!chunk.is_empty());
            largest = largest.max(chunk.len());
            got += chunk.len();
        }
        writer.await.unwrap();
        assert_eq!(rb.size, READ_CHUNK);
        assert!(largest > READ_SMALL, "bulk reads are larger: {largest}");
    }
}
