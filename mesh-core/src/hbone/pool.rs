//! The HBONE client and its connection pool.
//!
//! A CONNECT stream is opened on a pooled HTTP/2-over-mTLS connection keyed
//! by (source identity, destination identity, destination address). A
//! connection carries at most `max_streams_per_connection` streams; when all
//! are full a new one is opened, one at a time per key, so a burst of
//! connections never opens a burst of handshakes. Connections that die are
//! dropped from the pool, idle ones are closed after `idle_timeout`, and
//! after a certificate rotation new streams go to connections made with the
//! new certificate while old ones drain.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use rustls::pki_types::ServerName;
use serde::Serialize;
use tokio::net::{TcpSocket, TcpStream};

use super::{H2Stream, HboneSettings};
use crate::identity::certs::CertError;
use crate::identity::{CertificateStore, SpiffeId};

/// Everything needed to open one tunnel.
#[derive(Debug, Clone)]
pub struct ConnectRequest {
    /// Identity the client presents.
    pub source: SpiffeId,
    /// Identity the server must prove.
    pub destination_identity: SpiffeId,
    /// Where HBONE is served (`pod-ip:15008`).
    pub hbone_addr: SocketAddr,
    /// The original destination, sent as `:authority`.
    pub authority: SocketAddr,
    /// Extra request headers (`forwarded`, `baggage`, `traceparent`).
    pub headers: HeaderMap,
    /// Where the TCP connection is made from (default: the proxy's own
    /// network namespace).
    pub origin: Option<Origin>,
}

/// Where a connection is dialled from when not the proxy's own network
/// namespace: a pod's, so the destination — and NetworkPolicies, and
/// anything else keyed on pod IPs — sees the pod, as with ztunnel's in-pod
/// mode. Tunnels are pooled per origin. Equal when the addresses are.
#[derive(Clone)]
pub struct Origin {
    /// The pod's address: what the destination sees.
    pub addr: IpAddr,
    /// Makes the (unconnected) socket inside the pod's namespace.
    pub socket: Arc<dyn Fn(SocketAddr) -> std::io::Result<TcpSocket> + Send + Sync>,
}

impl Origin {
    /// Connect to `to` from this origin.
    pub async fn connect(&self, to: SocketAddr) -> std::io::Result<TcpStream> {
        (self.socket)(to)?.connect(to).await
    }
}

/// Connect to `to` from `origin`, or from the proxy's own namespace.
pub async fn dial(origin: Option<&Origin>, to: SocketAddr) -> std::io::Result<TcpStream> {
    match origin {
        Some(o) => o.connect(to).await,
        None => TcpStream::connect(to).await,
    }
}

impl std::fmt::Debug for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Origin({})", self.addr)
    }
}

impl PartialEq for Origin {
    fn eq(&self, other: &Self) -> bool {
        self.addr == other.addr
    }
}

impl Eq for Origin {}

impl std::hash::Hash for Origin {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.addr.hash(h)
    }
}

/// Why a tunnel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("no certificate for {0}: {1}")]
    Certificate(SpiffeId, CertError),
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS handshake with {addr}: {source}")]
    Tls {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{addr} did not negotiate ALPN h2")]
    NoAlpn { addr: SocketAddr },
    #[error("HTTP/2 with {addr}: {source}")]
    H2 { addr: SocketAddr, source: h2::Error },
    #[error("timed out connecting to {addr}")]
    Timeout { addr: SocketAddr },
    #[error("tunnel refused with HTTP {0}")]
    Status(StatusCode),
    #[error("bad TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    source: SpiffeId,
    destination: SpiffeId,
    addr: SocketAddr,
    origin: Option<Origin>,
}

/// Shared state of one pooled connection.
struct ConnState {
    id: u64,
    active: AtomicUsize,
    closed: AtomicBool,
    /// Set when a newer certificate exists: take no new streams.
    superseded: AtomicBool,
    idle_since: Mutex<Instant>,
    cert_generation: u64,
}

struct PooledConn {
    state: Arc<ConnState>,
    sender: h2::client::SendRequest<Bytes>,
}

#[derive(Default)]
struct PoolEntry {
    conns: Vec<PooledConn>,
    /// Held while a new connection for this key is being established.
    connecting: Arc<tokio::sync::Mutex<()>>,
}

/// Counts one stream on a pooled connection until dropped.
pub(crate) struct StreamGuard(Arc<ConnState>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.0.idle_since.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        }
    }
}

/// A point-in-time view of the pool, for metrics, the admin dump and tests.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PoolStats {
    /// Open pooled connections.
    pub connections: usize,
    /// Streams currently open across them.
    pub active_streams: usize,
    /// Connections opened since start.
    pub connections_opened: u64,
    /// Streams opened since start.
    pub streams_opened: u64,
}

struct Inner {
    certs: Arc<CertificateStore>,
    settings: HboneSettings,
    entries: Mutex<HashMap<PoolKey, PoolEntry>>,
    next_id: AtomicU64,
    connections_opened: AtomicU64,
    streams_opened: AtomicU64,
}

/// Opens HBONE tunnels over pooled connections.
#[derive(Clone)]
pub struct HboneConnector {
    inner: Arc<Inner>,
}

impl HboneConnector {
    pub fn new(certs: Arc<CertificateStore>, settings: HboneSettings) -> Self {
        Self {
            inner: Arc::new(Inner {
                certs,
                settings,
                entries: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
                connections_opened: AtomicU64::new(0),
                streams_opened: AtomicU64::new(0),
            }),
        }
    }

    pub fn stats(&self) -> PoolStats {
        let entries = self.inner.entries.lock().unwrap_or_else(|p| p.into_inner());
        let mut s = PoolStats {
            connections_opened: self.inner.connections_opened.load(Ordering::Relaxed),
            streams_opened: self.inner.streams_opened.load(Ordering::Relaxed),
            ..Default::default()
        };
        for e in entries.values() {
            for c in &e.conns {
                s.connections += 1;
                s.active_streams += c.state.active.load(Ordering::Relaxed);
            }
        }
        s
    }

    /// Open a CONNECT tunnel; returns once the server answered 200.
    pub async fn connect(&self, req: &ConnectRequest) -> Result<H2Stream, HboneError> {
        let cert = self
            .inner
            .certs
            .get(&req.source)
            .await
            .map_err(|e| HboneError::Certificate(req.source.clone(), e))?;
        let key = PoolKey {
            source: req.source.clone(),
            destination: req.destination_identity.clone(),
            addr: req.hbone_addr,
            origin: req.origin.clone(),
        };
        // A pooled connection may be going away (its agent drains or hands
        // over to a successor): a stream it refuses never reached the
        // server, so it is retried on another connection. Twice at most: a
        // connection opened in the instant the old agent still accepted is
        // refused too, and the next one reaches the successor.
        let mut retries = 0;
        loop {
            let (sender, guard) = match self.checkout(&key, cert.generation) {
                Some(found) => found,
                // Boxed: the handshakes' state is large, and inline it
                // would stay in every tunnel's task for its whole life.
                None => Box::pin(self.checkout_or_connect(&key, &cert)).await?,
            };
            self.inner.streams_opened.fetch_add(1, Ordering::Relaxed);
            match open_stream(sender, req).await {
                Ok((send, body)) => return Ok(H2Stream::new(send, body, Some(guard))),
                Err(StreamError::Refused(source)) if retries < MAX_REFUSED_RETRIES => {
                    tracing::debug!(addr = %req.hbone_addr, error = %source, "stream refused by a connection going away; retrying on another");
                    guard.0.superseded.store(true, Ordering::Release);
                    retries += 1;
                }
                Err(StreamError::Refused(source) | StreamError::Other(source)) => {
                    return Err(HboneError::H2 {
                        addr: req.hbone_addr,
                        source,
                    })
                }
                Err(StreamError::Status(s)) => return Err(HboneError::Status(s)),
            }
        }
    }

    /// Find a live connection with room for a stream and reserve it.
    fn checkout(
        &self,
        key: &PoolKey,
        generation: u64,
    ) -> Option<(h2::client::SendRequest<Bytes>, StreamGuard)> {
        let max = self.inner.settings.max_streams_per_connection as usize;
        let entries = self.inner.entries.lock().unwrap_or_else(|p| p.into_inner());
        let entry = entries.get(key)?;
        for c in &entry.conns {
            if c.state.closed.load(Ordering::Acquire) || c.state.superseded.load(Ordering::Acquire)
            {
                continue;
            }
            if c.state.cert_generation < generation {
                c.state.superseded.store(true, Ordering::Release);
                continue;
            }
            // Reserve a slot without exceeding the limit.
            let reserved = c
                .state
                .active
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < max).then_some(n + 1)
                })
                .is_ok();
            if reserved {
                return Some((c.sender.clone(), StreamGuard(c.state.clone())));
            }
        }
        None
    }

    async fn checkout_or_connect(
        &self,
        key: &PoolKey,
        cert: &Arc<crate::identity::WorkloadCert>,
    ) -> Result<(h2::client::SendRequest<Bytes>, StreamGuard), HboneError> {
        let lock = {
            let mut entries = self.inner.entries.lock().unwrap_or_else(|p| p.into_inner());
            entries.entry(key.clone()).or_default().connecting.clone()
        };
        let _connecting = lock.lock().await;
        // Somebody may have opened a connection while we waited.
        if let Some(found) = self.checkout(key, cert.generation) {
            return Ok(found);
        }
        let addr = key.addr;
        let state = Arc::new(ConnState {
            id: self.inner.next_id.fetch_add(1, Ordering::Relaxed),
            active: AtomicUsize::new(1),
            closed: AtomicBool::new(false),
            superseded: AtomicBool::new(false),
            idle_since: Mutex::new(Instant::now()),
            cert_generation: cert.generation,
        });
        let sender = tokio::time::timeout(
            self.inner.settings.connect_timeout,
            self.open(key, cert, state.clone()),
        )
        .await
        .map_err(|_| HboneError::Timeout { addr })??;
        Ok((sender, StreamGuard(state)))
    }

    /// TCP connect, TLS handshake, HTTP/2 handshake; spawns the task that
    /// drives the connection and retires it when idle or dead.
    async fn open(
        &self,
        key: &PoolKey,
        cert: &Arc<crate::identity::WorkloadCert>,
        state: Arc<ConnState>,
    ) -> Result<h2::client::SendRequest<Bytes>, HboneError> {
        let addr = key.addr;
        let tcp = dial(key.origin.as_ref(), addr)
            .await
            .map_err(|source| HboneError::Connect { addr, source })?;
        let _ = tcp.set_nodelay(true);
        let config = cert.client_config(self.inner.certs.roots(), key.destination.clone())?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(ServerName::IpAddress(addr.ip().into()), tcp)
            .await
            .map_err(|source| HboneError::Tls { addr, source })?;
        if tls.get_ref().1.alpn_protocol() != Some(crate::identity::verify::ALPN_H2) {
            return Err(HboneError::NoAlpn { addr });
        }
        let s = &self.inner.settings;
        let (sender, connection) = h2::client::Builder::new()
            .initial_window_size(s.stream_window)
            .initial_connection_window_size(s.connection_window)
            .max_frame_size(s.max_frame_size)
            .max_header_list_size(s.max_header_list_size)
            .enable_push(false)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|source| HboneError::H2 { addr, source })?;
        self.inner
            .connections_opened
            .fetch_add(1, Ordering::Relaxed);
        tracing::debug!(conn = state.id, src = %key.source, dst = %key.destination, %addr, "HBONE connection opened");
        let id = state.id;
        self.inner
            .entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .conns
            .push(PooledConn {
                state,
                sender: sender.clone(),
            });
        tokio::spawn(drive(
            connection,
            Arc::downgrade(&self.inner),
            key.clone(),
            id,
        ));
        Ok(sender)
    }
}

/// How many times a stream refused by a connection going away is retried
/// on another.
const MAX_REFUSED_RETRIES: u32 = 2;

/// Why a stream could not be opened on a connection.
enum StreamError {
    /// The server did not take the stream (GOAWAY, REFUSED_STREAM, or the
    /// connection closed before the request went out): safe to retry.
    Refused(h2::Error),
    Other(h2::Error),
    Status(StatusCode),
}

/// Send the CONNECT on `sender` and wait for the answer.
async fn open_stream(
    sender: h2::client::SendRequest<Bytes>,
    req: &ConnectRequest,
) -> Result<(h2::SendStream<Bytes>, h2::RecvStream), StreamError> {
    let mut request = Request::builder()
        .method(Method::CONNECT)
        .uri(req.authority.to_string())
        .body(())
        .expect("an ip:port is a valid authority");
    *request.headers_mut() = req.headers.clone();
    // Nothing has reached the server until send_request succeeded.
    let mut sender = sender.ready().await.map_err(StreamError::Refused)?;
    let (response, send) = sender
        .send_request(request, false)
        .map_err(StreamError::Refused)?;
    let response = response.await.map_err(|e| {
        if e.is_go_away() || e.reason() == Some(h2::Reason::REFUSED_STREAM) {
            StreamError::Refused(e)
        } else {
            StreamError::Other(e)
        }
    })?;
    if response.status() != StatusCode::OK {
        return Err(StreamError::Status(response.status()));
    }
    Ok((send, response.into_body()))
}

/// Drive one pooled connection; take it out of the pool when it dies, when
/// it has been idle too long, or when it was superseded and has drained.
async fn drive<T>(
    connection: h2::client::Connection<T, Bytes>,
    pool: Weak<Inner>,
    key: PoolKey,
    id: u64,
) where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tokio::pin!(connection);
    let tick = pool.upgrade().map(|p| {
        (p.settings.idle_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(5))
    });
    let Some(tick) = tick else { return };
    let mut retired = false;
    loop {
        tokio::select! {
            r = &mut connection => {
                if let Err(e) = r {
                    tracing::debug!(addr = %key.addr, error = %e, "HBONE connection ended");
                }
                if let Some(p) = pool.upgrade() { remove(&p, &key, id); }
                return;
            }
            _ = tokio::time::sleep(tick), if !retired => {
                let Some(p) = pool.upgrade() else { return };
                if remove_if_idle(&p, &key, id) {
                    // Dropping the pool's sender lets the connection close
                    // gracefully once no stream uses it.
                    retired = true;
                }
            }
        }
    }
}

/// Take a dead connection out of the pool.
fn remove(p: &Inner, key: &PoolKey, id: u64) {
    let mut entries = p.entries.lock().unwrap_or_else(|x| x.into_inner());
    if let Some(e) = entries.get_mut(key) {
        e.conns.retain(|c| {
            let hit = c.state.id == id;
            if hit {
                c.state.closed.store(true, Ordering::Release);
            }
            !hit
        });
        if e.conns.is_empty() && Arc::strong_count(&e.connecting) == 1 {
            entries.remove(key);
        }
    }
}

fn remove_if_idle(p: &Inner, key: &PoolKey, id: u64) -> bool {
    let mut entries = p.entries.lock().unwrap_or_else(|x| x.into_inner());
    let Some(e) = entries.get_mut(key) else {
        return true;
    };
    let Some(pos) = e.conns.iter().position(|c| c.state.id == id) else {
        // Not registered (yet, or any more).
        return false;
    };
    let c = &e.conns[pos].state;
    let idle = c.active.load(Ordering::Acquire) == 0
        && (c.superseded.load(Ordering::Acquire)
            || c.idle_since
                .lock()
                .unwrap_or_else(|x| x.into_inner())
                .elapsed()
                >= p.settings.idle_timeout);
    if idle {
        tracing::debug!(addr = %key.addr, conn = id, "HBONE connection idle, closing");
        e.conns.remove(pos);
        if e.conns.is_empty() && Arc::strong_count(&e.connecting) == 1 {
            entries.remove(key);
        }
    }
    idle
}

#[cfg(test)]
mod tests {
    //! The pool against a real HBONE server on loopback.
    use super::*;
    use crate::hbone::server::serve_connection;
    use crate::identity::{CertificateAuthority, LocalSigner};
    use tokio::net::TcpListener;

    struct Setup {
        connector: HboneConnector,
        req: ConnectRequest,
        accepted: Arc<AtomicUsize>,
        /// Where each accepted connection came from.
        peers: Arc<Mutex<Vec<SocketAddr>>>,
    }

    /// A server that answers every CONNECT with 200 and echoes; after
    /// `streams_per_conn` streams it drops the TLS connection, or with
    /// `goaway` sends a graceful GOAWAY and keeps serving the open streams
    /// (as a draining agent does).
    async fn setup(settings: HboneSettings, streams_per_conn: usize) -> Setup {
        setup_server(settings, streams_per_conn, false).await
    }

    async fn setup_server(settings: HboneSettings, streams_per_conn: usize, goaway: bool) -> Setup {
        let ca = Arc::new(CertificateAuthority::generate("cluster.local").unwrap());
        let root = ca.root().clone();
        let certs = CertificateStore::new(
            Arc::new(LocalSigner {
                ca,
                ttl: Duration::from_secs(3600),
            }),
            vec![root],
            "cluster.local",
        )
        .unwrap();
        let (src, dst) = (
            SpiffeId::new("cluster.local", "a", "client"),
            SpiffeId::new("cluster.local", "b", "server"),
        );
        let server_cert = certs.get(&dst).await.unwrap();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let acc = accepted.clone();
        let peers = Arc::new(Mutex::new(Vec::new()));
        let seen = peers.clone();
        let s = settings.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = l.accept().await.unwrap();
                seen.lock().unwrap().push(peer);
                acc.fetch_add(1, Ordering::SeqCst);
                let cfg = server_cert.server_config();
                let s = s.clone();
                tokio::spawn(async move {
                    let tls = tokio_rustls::TlsAcceptor::from(cfg)
                        .accept(tcp)
                        .await
                        .unwrap();
                    let served = Arc::new(AtomicUsize::new(0));
                    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<()>(1);
                    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
                    let go_tx = std::sync::Mutex::new(Some(go_tx));
                    if goaway {
                        let served = served.clone();
                        let conn = crate::hbone::server::serve_connection_until(
                            tls,
                            &s,
                            async move {
                                let _ = go_rx.await;
                            },
                            move |stream| {
                                let served = served.clone();
                                let go = go_tx.lock().unwrap().take();
                                async move {
                                    if let Ok(mut h2) = stream.accept() {
                                        tokio::spawn(async move { echo(&mut h2).await });
                                    }
                                    if served.fetch_add(1, Ordering::SeqCst) + 1 == streams_per_conn
                                    {
                                        if let Some(go) = go {
                                            let _ = go.send(());
                                        }
                                    }
                                }
                            },
                        );
                        let _ = conn.await;
                        return;
                    }
                    drop((go_tx, go_rx));
                    let conn = serve_connection(tls, &s, move |stream| {
                        let (served, done) = (served.clone(), done_tx.clone());
                        async move {
                            if let Ok(mut h2) = stream.accept() {
                                tokio::spawn(async move { echo(&mut h2).await });
                            }
                            if served.fetch_add(1, Ordering::SeqCst) + 1 == streams_per_conn {
                                // Let the 200 reach the client first.
                                tokio::time::sleep(Duration::from_millis(100)).await;
                                let _ = done.send(()).await;
                            }
                        }
                    });
                    // Drop the whole connection (TCP close) after the quota.
                    tokio::select! { _ = conn => {}, _ = done_rx.recv() => {} }
                });
            }
        });
        let connector = HboneConnector::new(certs, settings);
        let req = ConnectRequest {
            source: src,
            destination_identity: dst,
            hbone_addr: addr,
            authority: "10.0.0.2:8080".parse().unwrap(),
            headers: HeaderMap::new(),
            origin: None,
        };
        Setup {
            connector,
            req,
            accepted,
            peers,
        }
    }

    /// Send back what arrives on the stream, then end it.
    async fn echo(h2: &mut H2Stream) {
        while let Some(Ok(chunk)) = h2.recv.data().await {
            let n = chunk.len();
            let _ = h2.recv.flow_control().release_capacity(n);
            // The final DATA frame may be empty: echoing it would send an
            // empty non-final frame, which h2 rightly counts as abuse.
            if n > 0 && h2.send.send_data(chunk, false).is_err() {
                return;
            }
        }
        let _ = h2.send.send_data(Bytes::new(), true);
    }

    /// Many short request/response tunnels, one after the other, share one
    /// pooled connection for its whole life: nothing about small frames or
    /// stream churn may make either side give up on it.
    #[tokio::test]
    async fn tunnels_are_dialled_from_their_origin_and_pooled_per_origin() {
        let s = setup(HboneSettings::default(), usize::MAX).await;
        // A stand-in for a pod's namespace: a socket bound to its address.
        let from = |ip: &str| {
            let ip: IpAddr = ip.parse().unwrap();
            Origin {
                addr: ip,
                socket: Arc::new(move |_to: SocketAddr| {
                    let sock = TcpSocket::new_v4()?;
                    sock.bind(SocketAddr::new(ip, 0))?;
                    Ok(sock)
                }),
            }
        };
        let (mut a, mut b) = (s.req.clone(), s.req.clone());
        a.origin = Some(from("127.0.0.2"));
        b.origin = Some(from("127.0.0.3"));
        let _t1 = s.connector.connect(&a).await.unwrap();
        let _t2 = s.connector.connect(&a).await.unwrap();
        let _t3 = s.connector.connect(&b).await.unwrap();
        let peers: Vec<IpAddr> = s.peers.lock().unwrap().iter().map(|p| p.ip()).collect();
        assert_eq!(
            peers,
            [
                "127.0.0.2".parse::<IpAddr>().unwrap(),
                "127.0.0.3".parse().unwrap()
            ],
            "one connection per origin, each from the origin's address"
        );
    }

    #[tokio::test]
    async fn a_long_lived_connection_carries_many_small_tunnels() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let s = setup(HboneSettings::default(), usize::MAX).await;
        for i in 0..500 {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let mut client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
            let (accepted, _) = l.accept().await.unwrap();
            let stream = s.connector.connect(&s.req).await.unwrap();
            let splice = tokio::spawn(async move {
                let counters = crate::hbone::Transferred::default();
                stream.splice(accepted, &counters).await
            });
            client.write_all(b"ping").await.unwrap();
            let mut back = [0u8; 4];
            client
                .read_exact(&mut back)
                .await
                .unwrap_or_else(|e| panic!("tunnel {i}: {e}"));
            assert_eq!(&back, b"ping");
            drop(client);
            splice
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("tunnel {i}: {e}"));
        }
        assert_eq!(s.connector.stats().connections_opened, 1);
    }

    #[tokio::test]
    async fn a_connection_that_goes_away_is_replaced() {
        let s = setup(HboneSettings::default(), 1).await;
        let first = s.connector.connect(&s.req).await.unwrap();
        drop(first);
        // The server closed the connection after one stream; wait until the
        // pool noticed, then the next tunnel needs a new connection.
        let deadline = Instant::now() + Duration::from_secs(10);
        while s.connector.stats().connections > 0 {
            assert!(
                Instant::now() < deadline,
                "dead connection still pooled: {:?}",
                s.connector.stats()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _second = s.connector.connect(&s.req).await.unwrap();
        assert_eq!(s.accepted.load(Ordering::SeqCst), 2);
        assert_eq!(s.connector.stats().connections_opened, 2);
    }

    /// A pooled connection whose server sent a graceful GOAWAY (its agent
    /// drains or hands over) must not fail the next tunnel: the stream is
    /// refused there and opened on a new connection.
    #[tokio::test]
    async fn a_tunnel_refused_by_a_connection_going_away_is_retried() {
        let s = setup_server(HboneSettings::default(), 1, true).await;
        let first = s.connector.connect(&s.req).await.unwrap();
        // The GOAWAY reaches the client; the first tunnel stays open, so the
        // connection is still pooled.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(s.connector.stats().connections, 1);
        let _second = s.connector.connect(&s.req).await.expect("retried");
        assert_eq!(s.accepted.load(Ordering::SeqCst), 2);
        drop(first);
    }

    #[tokio::test]
    async fn a_full_connection_makes_the_pool_open_another() {
        let settings = HboneSettings {
            max_streams_per_connection: 2,
            ..Default::default()
        };
        let s = setup(settings, usize::MAX).await;
        let mut open = Vec::new();
        for _ in 0..5 {
            open.push(s.connector.connect(&s.req).await.unwrap());
        }
        let st = s.connector.stats();
        assert_eq!(
            (st.connections, st.active_streams, st.connections_opened),
            (3, 5, 3),
            "{st:?}"
        );
        drop(open);
        let st = s.connector.stats();
        assert_eq!(st.active_streams, 0, "{st:?}");
        // Freed slots are reused.
        let _again = s.connector.connect(&s.req).await.unwrap();
        assert_eq!(s.connector.stats().connections_opened, 3);
    }

    #[tokio::test]
    async fn wrong_server_identity_fails_the_tunnel() {
        let s = setup(HboneSettings::default(), usize::MAX).await;
        let mut req = s.req.clone();
        req.destination_identity = SpiffeId::new("cluster.local", "b", "somebody-else");
        match s.connector.connect(&req).await {
            Err(HboneError::Tls { .. }) => {}
            Err(e) => panic!("expected a TLS failure, got {e}"),
            Ok(_) => panic!("expected a TLS failure, got a tunnel"),
        }
        assert_eq!(s.connector.stats().connections, 0);
    }

    /// A tunnel's task keeps its connect future's space for life (the
    /// state machine is as large as its largest await): the handshakes of
    /// a new pooled connection are boxed so that an idle tunnel does not
    /// carry their ~4 KB.
    #[tokio::test]
    async fn opening_a_stream_does_not_carry_the_handshakes_state() {
        let s = setup(HboneSettings::default(), 100).await;
        let connect = s.connector.connect(&s.req);
        let size = std::mem::size_of_val(&connect);
        assert!(size < 2048, "connect future is {size} bytes");
        drop(connect.await.unwrap());
    }
}
