//! Tunnels into the waypoint: the shared HBONE listener
//! ([`mesh_core::hbone::listener`]) with the waypoint's certificate (client
//! certificates of the trust domain required — the client's identity is the
//! source pod's, presented by its node agent).
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
use mesh_core::hbone::listener::{self, Tunnel};
use mesh_core::hbone::{H2Io, InboundStream};
use mesh_core::identity::SpiffeId;
use mesh_core::model::Destination;
use tokio::net::TcpListener;

use crate::proxy::{self, ConnCtx};
use crate::Ctx;

/// Accept HBONE connections until aborted.
pub async fn serve(listener: TcpListener, ctx: Arc<Ctx>) {
    let c = ctx.clone();
    listener::serve(listener, ctx, move |t| handle_stream(t, c.clone())).await
}

/// The waypoint behind its HBONE listener: its own certificate whatever
/// was dialled.
impl listener::Host for Ctx {
    fn limiter(&self) -> &mesh_core::limits::Limiter {
        &self.slots
    }

    fn hbone_settings(&self) -> &mesh_core::hbone::HboneSettings {
        &self.cfg.hbone
    }

    fn handshake_timeout(&self) -> Duration {
        self.cfg.handshake_timeout
    }

    fn refuse(&self, reason: &'static str) {
        self.metrics.refuse(reason);
    }

    fn refuses_new_work(&self) -> bool {
        self.is_shutting_down()
    }

    fn shutdown_begun(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        Ctx::shutdown_begun(self)
    }

    async fn server_config(&self, _local: SocketAddr) -> Option<Arc<rustls::ServerConfig>> {
        let cert = self.certs.get(&self.identity).await.ok()?;
        Some(cert.server_config())
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
        .and_then(mesh_core::hbone::forwarded::client)
        .filter(|ip| {
            model
                .workload_by_ip(*ip)
                .is_some_and(|w| &model.identity(w) == id)
        })
        .unwrap_or(peer.ip())
}

async fn handle_stream(tunnel: Tunnel, ctx: Arc<Ctx>) {
    let Tunnel {
        stream,
        peer,
        peer_id,
        ..
    } = tunnel;
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
