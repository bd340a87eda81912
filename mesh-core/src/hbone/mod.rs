//! HBONE: TCP connections tunnelled as HTTP/2 `CONNECT` streams inside
//! mutual TLS, wire-compatible with Istio's ztunnel.
//!
//! - [`splice`] copies bytes between a TCP socket and one CONNECT stream,
//!   carrying half-close, resets and backpressure faithfully.
//! - [`server`] terminates HBONE connections and hands each CONNECT stream
//!   to the caller.
//! - [`io`] turns a stream into a byte stream for protocols inside it.
//! - [`pool`] opens CONNECT streams, multiplexing many over one TLS
//!   connection per (source identity, destination identity, address).

pub mod forwarded;
pub mod io;
pub mod listener;
pub mod pool;
pub mod server;
pub mod splice;

use std::time::Duration;

use bytes::Bytes;
use h2::{RecvStream, SendStream};

pub use io::H2Io;
pub use pool::{dial, ConnectRequest, HboneConnector, Origin, PoolStats};
pub use server::InboundStream;
pub use splice::{splice, SpliceError, Transferred};

/// The port HBONE listens on (same as Istio ambient).
pub const HBONE_PORT: u16 = 15008;

/// HTTP/2 and pooling parameters. Defaults follow ztunnel's.
#[derive(Debug, Clone)]
pub struct HboneSettings {
    /// Streams a client puts on one TLS connection before opening another.
    pub max_streams_per_connection: u32,
    /// Streams a server accepts concurrently on one connection.
    pub server_max_concurrent_streams: u32,
    /// A pooled connection without streams for this long is closed.
    pub idle_timeout: Duration,
    pub stream_window: u32,
    pub connection_window: u32,
    pub max_frame_size: u32,
    /// Largest header block accepted (CONNECT requests are small).
    pub max_header_list_size: u32,
    /// Time allowed for TCP connect plus TLS and HTTP/2 handshakes.
    pub connect_timeout: Duration,
}

impl Default for HboneSettings {
    fn default() -> Self {
        Self {
            max_streams_per_connection: 100,
            server_max_concurrent_streams: 1000,
            idle_timeout: Duration::from_secs(300),
            stream_window: 4 * 1024 * 1024,
            connection_window: 16 * 1024 * 1024,
            max_frame_size: 1024 * 1024,
            max_header_list_size: 16 * 1024,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// One open CONNECT stream, ready to carry a TCP connection's bytes.
pub struct H2Stream {
    pub send: SendStream<Bytes>,
    pub recv: RecvStream,
    /// Keeps the pooled connection's stream count until the stream ends.
    _guard: Option<pool::StreamGuard>,
}

impl H2Stream {
    pub(crate) fn new(
        send: SendStream<Bytes>,
        recv: RecvStream,
        guard: Option<pool::StreamGuard>,
    ) -> Self {
        Self {
            send,
            recv,
            _guard: guard,
        }
    }

    /// Copy bytes between `tcp` and this stream until both directions end.
    pub async fn splice(
        mut self,
        tcp: tokio::net::TcpStream,
        counters: &Transferred,
    ) -> Result<(), SpliceError> {
        splice(tcp, &mut self.send, &mut self.recv, counters).await
    }
}
