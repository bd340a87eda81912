//! An HBONE listener, as the node agent and the waypoint both serve one:
//! every accepted connection takes a connection slot (or is reset at once),
//! the TLS handshake takes a handshake slot and is bounded in time, the
//! peer must present a SPIFFE identity, and every CONNECT stream is a
//! tunnel of its own for the limits. Once a drain has begun, connections
//! and tunnels that arrive are refused (peers get a GOAWAY and go
//! elsewhere); established ones run on.
//!
//! What differs between the two proxies — which certificate answers, how
//! refusals are counted, when new work is refused — is the [`Host`].

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use tokio::net::{TcpListener, TcpStream};

use super::server::{self, InboundStream};
use super::splice::reset_tcp;
use super::HboneSettings;
use crate::identity::verify::spiffe_id_of;
use crate::identity::SpiffeId;
use crate::limits::Limiter;

/// The proxy behind a listener.
pub trait Host: Send + Sync + 'static {
    /// The slots connections, tunnels and handshakes take.
    fn limiter(&self) -> &Limiter;
    fn hbone_settings(&self) -> &HboneSettings;
    fn handshake_timeout(&self) -> Duration;
    /// Count a refusal under `reason` (the `inbound` direction).
    fn refuse(&self, reason: &'static str);
    /// Whether what arrives now is refused (a drain has begun).
    fn refuses_new_work(&self) -> bool;
    /// Resolves once shutdown begins: peers then get a GOAWAY.
    fn shutdown_begun(&self) -> impl Future<Output = ()> + Send + 'static;
    /// The TLS configuration answering connections to `local` (its
    /// certificate), once there is one; `None`: drop the connection.
    fn server_config(
        &self,
        local: SocketAddr,
    ) -> impl Future<Output = Option<Arc<rustls::ServerConfig>>> + Send;
}

/// One CONNECT stream, from a peer whose identity was verified.
pub struct Tunnel {
    pub stream: InboundStream,
    /// The TLS connection's peer.
    pub peer: SocketAddr,
    /// The address the peer dialled.
    pub local: SocketAddr,
    /// The identity the peer's certificate carries.
    pub peer_id: SpiffeId,
}

/// Serve HBONE on `listener` until aborted, handing each tunnel to
/// `on_tunnel` on a task of its own.
pub async fn serve<H, F, Fut>(listener: TcpListener, host: Arc<H>, on_tunnel: F)
where
    H: Host,
    F: Fn(Tunnel) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let local = listener.local_addr().ok();
    loop {
        match listener.accept().await {
            // Listeners close when a drain begins; one accepted in that
            // instant is refused like the ones after it.
            Ok((tcp, _)) if host.refuses_new_work() => {
                host.refuse("draining");
                reset_tcp(&tcp);
            }
            Ok((tcp, peer)) => match host.limiter().connection() {
                Some(slot) => {
                    let (host, on_tunnel) = (host.clone(), on_tunnel.clone());
                    tokio::spawn(async move {
                        connection(tcp, peer, host, on_tunnel).await;
                        drop(slot);
                    });
                }
                None => {
                    at_limit(&*host, "connection_limit");
                    reset_tcp(&tcp);
                }
            },
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(listener = ?local, error = %e, "HBONE accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Count and log (at most once a second) a refusal at a limit.
fn at_limit(host: &impl Host, reason: &'static str) {
    host.refuse(reason);
    host.limiter().log_refusal("inbound", reason);
}

async fn connection<H, F, Fut>(tcp: TcpStream, peer: SocketAddr, host: Arc<H>, on_tunnel: F)
where
    H: Host,
    F: Fn(Tunnel) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let _ = tcp.set_nodelay(true);
    let Ok(local) = tcp.local_addr() else { return };
    // Held (not refused) until the certificate exists.
    let Some(config) = host.server_config(local).await else {
        return;
    };
    // Handshakes in progress are bounded apart from connections: they are
    // what a peer that never finishes (slowloris) or a flood holds.
    let Some(handshake) = host.limiter().handshake() else {
        at_limit(&*host, "handshake_limit");
        return reset_tcp(&tcp);
    };
    let accept = tokio_rustls::TlsAcceptor::from(config).accept(tcp);
    let tls = tokio::time::timeout(host.handshake_timeout(), accept).await;
    drop(handshake);
    let tls = match tls {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::warn!(direction = "inbound", src = %peer, dst = %local, error = %e, "TLS handshake refused");
            host.refuse("tls_handshake_failed");
            return;
        }
        Err(_) => {
            tracing::warn!(direction = "inbound", src = %peer, dst = %local, "TLS handshake timed out");
            host.refuse("tls_handshake_timeout");
            return;
        }
    };
    let Some(Ok(peer_id)) = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(spiffe_id_of)
    else {
        host.refuse("no_peer_identity");
        return;
    };
    let settings = host.hbone_settings().clone();
    let shutdown = host.shutdown_begun();
    let result = server::serve_connection_until(tls, &settings, shutdown, move |stream| {
        // Each tunnel is a connection of its own for the limits.
        let slot = host.limiter().connection();
        let host = host.clone();
        let tunnel = Tunnel {
            stream,
            peer,
            local,
            peer_id: peer_id.clone(),
        };
        let on_tunnel = on_tunnel.clone();
        async move {
            // Tunnels opened after a drain began (before the peer saw the
            // GOAWAY) are refused; established ones run on.
            if host.refuses_new_work() {
                host.refuse("draining");
                return tunnel.stream.reject(StatusCode::SERVICE_UNAVAILABLE);
            }
            let Some(slot) = slot else {
                at_limit(&*host, "connection_limit");
                return tunnel.stream.reject(StatusCode::SERVICE_UNAVAILABLE);
            };
            on_tunnel(tunnel).await;
            drop(slot);
        }
    })
    .await;
    if let Err(e) = result {
        tracing::debug!(src = %peer, error = %e, "HBONE connection ended with an error");
    }
}
