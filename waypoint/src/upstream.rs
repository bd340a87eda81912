//! HTTP to the chosen endpoint over HBONE: each upstream HTTP connection is
//! one CONNECT stream (on the waypoint's pooled mTLS connections to the
//! endpoint's node agent), with the waypoint's own identity as client and
//! the endpoint's identity checked as server. HTTP/1.1 connections are
//! kept alive and reused one request at a time; HTTP/2 connections (used
//! when the client spoke HTTP/2, e.g. gRPC) are shared by concurrent
//! requests. Connections idle for [`IDLE_TIMEOUT`] are closed, so an
//! endpoint's draining agent sees its tunnels end within its drain period.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, Version};
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_core::hbone::pool::HboneError;
use mesh_core::hbone::{ConnectRequest, H2Io, HboneConnector, HBONE_PORT};
use mesh_core::identity::SpiffeId;

/// Request bodies the waypoint sends upstream.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// Why an upstream request failed before a response arrived.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: HboneError,
    },
    #[error("HTTP handshake with {addr}: {source}")]
    Handshake {
        addr: SocketAddr,
        source: hyper::Error,
    },
    #[error("request to {addr} failed: {source}")]
    Reset {
        addr: SocketAddr,
        source: hyper::Error,
    },
}

impl UpstreamError {
    /// True when nothing reached the endpoint (safe to retry anything).
    pub fn is_connect_failure(&self) -> bool {
        !matches!(self, UpstreamError::Reset { .. })
    }
}

/// One endpoint to send to.
pub struct Target<'a> {
    pub addr: SocketAddr,
    pub identity: &'a SpiffeId,
    /// Extra CONNECT headers (`forwarded`, `baggage`).
    pub connect_headers: HeaderMap,
    /// Retire an HTTP/1.1 connection after this many requests.
    pub max_requests_per_connection: Option<u32>,
}

/// A kept-alive HTTP/1.1 connection, the requests it has carried, and
/// when it was last used.
type IdleConnection = (http1::SendRequest<Body>, u32, Instant);

/// Idle HTTP/1.1 connections kept per endpoint.
const MAX_IDLE_PER_ENDPOINT: usize = 64;

/// How long an upstream connection may sit unused before it is closed:
/// below the agents' default drain period (20 s), so an agent that drains
/// (SIGTERM, hot restart) is not held up by tunnels nobody uses.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Pools {
    http1: HashMap<SocketAddr, Vec<IdleConnection>>,
    /// Shared HTTP/2 connections and when each was last used.
    h2: HashMap<SocketAddr, (http2::SendRequest<Body>, Instant)>,
}

impl Pools {
    /// Drop connections unused since `cutoff` (and closed ones). Dropping
    /// the last sender closes the connection once its requests are done.
    fn prune(&mut self, cutoff: Instant) {
        for list in self.http1.values_mut() {
            list.retain(|(s, _, used)| !s.is_closed() && *used > cutoff);
        }
        self.http1.retain(|_, l| !l.is_empty());
        self.h2
            .retain(|_, (s, used)| !s.is_closed() && *used > cutoff);
    }
}

/// Upstream HTTP connections of a waypoint.
pub struct Upstream {
    connector: HboneConnector,
    source: SpiffeId,
    pools: Arc<Mutex<Pools>>,
    hbone_port: u16,
}

fn lock(p: &Mutex<Pools>) -> std::sync::MutexGuard<'_, Pools> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

impl Upstream {
    /// Call within a Tokio runtime: a task closes idle connections.
    pub fn new(connector: HboneConnector, source: SpiffeId) -> Self {
        let pools = Arc::new(Mutex::new(Pools::default()));
        let weak = Arc::downgrade(&pools);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(IDLE_TIMEOUT / 4);
            loop {
                tick.tick().await;
                let Some(p) = weak.upgrade() else { return };
                if let Some(cutoff) = Instant::now().checked_sub(IDLE_TIMEOUT) {
                    lock(&p).prune(cutoff);
                }
            }
        });
        Self {
            connector,
            source,
            pools,
            hbone_port: HBONE_PORT,
        }
    }

    /// Use another HBONE port on endpoints (tests on loopback).
    pub fn with_hbone_port(mut self, port: u16) -> Self {
        self.hbone_port = port;
        self
    }

    async fn tunnel(&self, t: &Target<'_>) -> Result<TokioIo<H2Io>, UpstreamError> {
        let req = ConnectRequest {
            source: self.source.clone(),
            destination_identity: t.identity.clone(),
            hbone_addr: SocketAddr::new(t.addr.ip(), self.hbone_port),
            authority: t.addr,
            headers: t.connect_headers.clone(),
            // The waypoint is a pod of its own: it dials from there.
            origin: None,
        };
        let stream =
            self.connector
                .connect(&req)
                .await
                .map_err(|source| UpstreamError::Connect {
                    addr: t.addr,
                    source,
                })?;
        Ok(TokioIo::new(H2Io::new(stream)))
    }

    /// Send `req` (origin-form URI, `host` set) to the endpoint, in the
    /// HTTP version the client used.
    pub async fn send(
        &self,
        t: &Target<'_>,
        mut req: Request<Body>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let addr = t.addr;
        if req.version() == Version::HTTP_2 {
            let existing = {
                let mut pools = lock(&self.pools);
                pools
                    .h2
                    .get_mut(&addr)
                    .filter(|(s, _)| !s.is_closed())
                    .map(|(s, used)| {
                        *used = Instant::now();
                        s.clone()
                    })
            };
            let mut sender = match existing {
                Some(s) => s,
                None => {
                    let io = self.tunnel(t).await?;
                    let (sender, conn) = http2::handshake(TokioExecutor::new(), io)
                        .await
                        .map_err(|source| UpstreamError::Handshake { addr, source })?;
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            tracing::debug!(%addr, error = %e, "upstream HTTP/2 connection ended");
                        }
                    });
                    lock(&self.pools)
                        .h2
                        .insert(addr, (sender.clone(), Instant::now()));
                    sender
                }
            };
            // HTTP/2 wants the authority in the URI, not a Host header.
            let host = req.headers_mut().remove(http::header::HOST);
            if req.uri().authority().is_none() {
                let authority = host
                    .as_ref()
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_string)
                    .unwrap_or_else(|| addr.to_string());
                let pq = req
                    .uri()
                    .path_and_query()
                    .map(|p| p.as_str())
                    .unwrap_or("/")
                    .to_string();
                if let Ok(uri) = format!("http://{authority}{pq}").parse() {
                    *req.uri_mut() = uri;
                }
            }
            return sender
                .send_request(req)
                .await
                .map_err(|source| UpstreamError::Reset { addr, source });
        }

        let reused = {
            let mut pools = lock(&self.pools);
            let list = pools.http1.entry(addr).or_default();
            list.retain(|(s, _, _)| !s.is_closed());
            list.iter()
                .position(|(s, _, _)| s.is_ready())
                .map(|i| list.swap_remove(i))
        };
        let (mut sender, used) = match reused {
            Some((s, used, _)) => (s, used),
            None => {
                let io = self.tunnel(t).await?;
                let (sender, conn) = http1::handshake(io)
                    .await
                    .map_err(|source| UpstreamError::Handshake { addr, source })?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(%addr, error = %e, "upstream HTTP/1.1 connection ended");
                    }
                });
                (sender, 0)
            }
        };
        let used = used + 1;
        // HTTP/1.1 upstream: origin-form URI, the authority in Host.
        if let Some(authority) = req.uri().authority().cloned() {
            req.headers_mut().entry(http::header::HOST).or_insert(
                HeaderValue::from_str(authority.as_str())
                    .unwrap_or(HeaderValue::from_static("localhost")),
            );
            let pq = req.uri().path_and_query().cloned();
            *req.uri_mut() = pq
                .map(http::Uri::from)
                .unwrap_or_else(|| http::Uri::from_static("/"));
        }
        *req.version_mut() = Version::HTTP_11;
        let result = sender.send_request(req).await;
        let retire = t.max_requests_per_connection.is_some_and(|max| used >= max);
        if result.is_ok() && !sender.is_closed() && !retire {
            // Back to the pool: ready again once this response's body is
            // read to the end.
            let mut pools = lock(&self.pools);
            let list = pools.http1.entry(addr).or_default();
            if list.len() < MAX_IDLE_PER_ENDPOINT {
                list.push((sender, used, Instant::now()));
            }
        }
        result.map_err(|source| UpstreamError::Reset { addr, source })
    }
}
