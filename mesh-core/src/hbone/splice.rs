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
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const READ_CHUNK: usize = 64 * 1024;

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
            let mut buf = BytesMut::with_capacity(READ_CHUNK);
            loop {
                buf.reserve(READ_CHUNK);
                let n = rd.read_buf(&mut buf).await.map_err(SpliceError::TcpRead)?;
                if n == 0 {
                    send.send_data(Bytes::new(), true)?;
                    return Ok::<(), SpliceError>(());
                }
                let mut data = buf.split().freeze();
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
    async fn pump<R, W>(mut r: R, mut w: W, counter: &AtomicU64) -> std::io::Result<()>
    where
        R: tokio::io::AsyncRead + Unpin,
        W: tokio::io::AsyncWrite + Unpin,
    {
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            let n = r.read(&mut buf).await?;
            if n == 0 {
                return w.shutdown().await;
            }
            w.write_all(&buf[..n]).await?;
            counter.fetch_add(n as u64, Ordering::Relaxed);
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
