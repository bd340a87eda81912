//! Tunnels into the waypoint: mutual TLS with the waypoint's certificate
//! (client certificates of the trust domain required — the client's
//! identity is the source pod's, presented by its node agent), then HBONE.
//! Each CONNECT must name a service that uses this waypoint; the stream is
//! then served as HTTP/1.1 or HTTP/2 (detected from the preface) with
//! header-size and header-time limits, one task per tunnel.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use mesh_core::hbone::splice::reset_tcp;
use mesh_core::hbone::{server, H2Io, InboundStream};
use mesh_core::identity::verify::spiffe_id_of;
use mesh_core::identity::SpiffeId;
use mesh_core::model::Destination;
use tokio::net::{TcpListener, TcpStream};

use crate::proxy::{self, ConnCtx};
use crate::Ctx;

/// Accept HBONE connections until aborted; each takes a connection slot or
/// is reset at once.
pub async fn serve(listener: TcpListener, ctx: Arc<Ctx>) {
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => match ctx.slots.connection() {
                Some(slot) => {
                    let ctx = ctx.clone();
                    tokio::spawn(async move {
                        handle_connection(tcp, peer, ctx).await;
                        drop(slot);
                    });
                }
                None => {
                    refused(&ctx, "connection_limit");
                    reset_tcp(&tcp);
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "waypoint accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Count and log (at most once a second) a refusal at a limit.
fn refused(ctx: &Ctx, reason: &'static str) {
    ctx.metrics.refuse(reason);
    ctx.slots.log_refusal("inbound", reason);
}

async fn handle_connection(tcp: TcpStream, peer: SocketAddr, ctx: Arc<Ctx>) {
    let _ = tcp.set_nodelay(true);
    let Ok(cert) = ctx.certs.get(&ctx.identity).await else {
        return;
    };
    let Some(handshake) = ctx.slots.handshake() else {
        refused(&ctx, "handshake_limit");
        return reset_tcp(&tcp);
    };
    let accept = tokio_rustls::TlsAcceptor::from(cert.server_config()).accept(tcp);
    let tls = tokio::time::timeout(ctx.cfg.handshake_timeout, accept).await;
    drop(handshake);
    let tls = match tls {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::warn!(src = %peer, error = %e, "waypoint: TLS handshake refused");
            ctx.metrics.refuse("tls_handshake_failed");
            return;
        }
        Err(_) => {
            ctx.metrics.refuse("tls_handshake_timeout");
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
        ctx.metrics.refuse("no_peer_identity");
        return;
    };
    let settings = ctx.cfg.hbone.clone();
    let ctx2 = ctx.clone();
    let shutdown = ctx.shutdown_begun();
    let result = server::serve_connection_until(tls, &settings, shutdown, move |stream| {
        // Each tunnel is a connection of its own for the limits.
        let slot = ctx2.slots.connection();
        let ctx = ctx2.clone();
        let peer_id = peer_id.clone();
        async move {
            let Some(slot) = slot else {
                refused(&ctx, "connection_limit");
                return stream.reject(StatusCode::SERVICE_UNAVAILABLE);
            };
            handle_stream(stream, ctx, peer, peer_id).await;
            drop(slot);
        }
    })
    .await;
    if let Err(e) = result {
        tracing::debug!(src = %peer, error = %e, "waypoint HBONE connection ended with an error");
    }
}

/// The client's address: the `forwarded` header when it names a workload
/// with the identity the client proved, otherwise the tunnel's peer.
fn source_ip(
    stream: &InboundStream,
    model: &mesh_core::model::MeshModel,
    peer: SocketAddr,
    id: &SpiffeId,
) -> IpAddr {
    stream
        .header("forwarded")
        .and_then(|f| f.strip_prefix("for="))
        .map(|ip| {
            ip.trim_matches('"')
                .trim_start_matches('[')
                .trim_end_matches(']')
        })
        .and_then(|ip| ip.parse::<IpAddr>().ok())
        .filter(|ip| {
            model
                .workload_by_ip(*ip)
                .is_some_and(|w| &model.identity(w) == id)
        })
        .unwrap_or(peer.ip())
}

async fn handle_stream(stream: InboundStream, ctx: Arc<Ctx>, peer: SocketAddr, peer_id: SpiffeId) {
    let model = ctx.model();
    let target = stream.target;
    let (svc, port) = match model.destination(target) {
        Destination::Service(svc, port)
            if model
                .service_waypoint(svc)
                .flatten()
                .is_some_and(|g| ctx.is_me(g)) =>
        {
            (svc, port.port)
        }
        _ => {
            tracing::warn!(src = %peer, src.identity = %peer_id, %target, "waypoint: tunnel to a destination this waypoint does not serve");
            ctx.metrics.refuse("not_served_here");
            return stream.reject(StatusCode::BAD_REQUEST);
        }
    };
    let conn = Arc::new(ConnCtx {
        source_ip: source_ip(&stream, &model, peer, &peer_id),
        source_identity: peer_id,
        target,
        service_namespace: svc.namespace.clone(),
        service_name: svc.name.clone(),
        port,
    });
    drop(model);
    let h2 = match stream.accept() {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(error = %e, "waypoint: client went away before the tunnel opened");
            return;
        }
    };
    let io = TokioIo::new(H2Io::new(h2));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(ctx.cfg.header_timeout)
        .max_buf_size(ctx.cfg.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(ctx.cfg.max_header_bytes as u32)
        .max_concurrent_streams(1000)
        // A peer that stops answering PINGs (or never speaks) is dropped.
        .keep_alive_interval(ctx.cfg.header_timeout)
        .keep_alive_timeout(Duration::from_secs(10));
    let svc_ctx = ctx.clone();
    let service = service_fn(move |req| proxy::handle(svc_ctx.clone(), conn.clone(), req));
    let http = builder.serve_connection(io, service);
    tokio::pin!(http);
    // A drain ends the connection after the request in flight.
    let shutdown = ctx.shutdown_begun();
    let result = tokio::select! {
        r = http.as_mut() => r,
        () = shutdown => {
            http.as_mut().graceful_shutdown();
            http.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(src = %peer, error = %e, "waypoint: HTTP connection ended with an error");
    }
}
