//! What happens to an inbound HBONE connection: the agent presents the
//! certificate of the workload the client dialled (chosen by the local
//! address — there is no SNI), requires a client certificate of the trust
//! domain, and for each CONNECT stream has [`plan`] place it (is the target
//! that workload, who is the source), asks policy, connects to the
//! application and splices the bytes. Plaintext steered to the inbound
//! listener takes the same path without the tunnel.

use std::net::SocketAddr;
use std::sync::Arc;

use http::StatusCode;
use mesh_core::hbone::listener::{self, Tunnel};
use mesh_core::hbone::splice::reset_tcp;
use mesh_core::metrics::{Peer, Reporter, TcpLabels};
use tokio::net::{TcpListener, TcpStream};

use crate::authz;
use crate::telemetry::{ConnLog, ConnTelemetry};
use crate::Ctx;

pub mod plan;

/// Accept HBONE connections for one workload until aborted.
pub async fn serve(listener: TcpListener, ctx: Arc<Ctx>) {
    let c = ctx.clone();
    listener::serve(listener, ctx, move |t| handle_stream(t, c.clone())).await
}

/// The agent behind its HBONE listeners: the certificate of the workload
/// that was dialled (there is no SNI: the local address chooses).
impl listener::Host for Ctx {
    fn limiter(&self) -> &crate::limits::Limiter {
        &self.limiter
    }

    fn hbone_settings(&self) -> &mesh_core::hbone::HboneSettings {
        &self.cfg.hbone
    }

    fn handshake_timeout(&self) -> std::time::Duration {
        self.cfg.handshake_timeout
    }

    fn refuse(&self, reason: &'static str) {
        self.metrics.refuse("inbound", reason);
    }

    fn refuses_new_work(&self) -> bool {
        Ctx::refuses_new_work(self)
    }

    fn shutdown_begun(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        Ctx::shutdown_begun(self)
    }

    async fn server_config(&self, local: SocketAddr) -> Option<Arc<rustls::ServerConfig>> {
        let identity = {
            let model = self.model();
            let Some(w) = model.workload_by_ip(local.ip()) else {
                self.metrics.refuse("inbound", "unknown_destination");
                return None;
            };
            model.identity(w)
        };
        let cert = self.certs.get(&identity).await.ok()?;
        Some(cert.server_config())
    }
}

async fn handle_stream(tunnel: Tunnel, ctx: Arc<Ctx>) {
    let Tunnel {
        stream,
        peer,
        local,
        peer_id,
    } = tunnel;
    let model = ctx.model();
    let target = stream.target;
    let tunnelled = plan::Tunnelled {
        peer,
        local,
        peer_id: &peer_id,
        target,
        forwarded: stream.header("forwarded"),
    };
    let plan = match plan::tunnelled(&model, &tunnelled) {
        Ok(p) => p,
        Err(refusal) => {
            tracing::warn!(src = %peer, src.identity = %peer_id, %target, reason = refusal.reason(), "{refusal}");
            ctx.metrics.refuse("inbound", refusal.reason());
            return stream.reject(refusal.status());
        }
    };
    let (dst, src, checked) = (plan.destination, plan.source, plan.checked);
    let dst_id = model.identity(dst);
    let trace = (
        stream.header("traceparent").map(str::to_string),
        stream.header("baggage").map(str::to_string),
    );
    let Ok(outcome) = authz::admit(&ctx.metrics, &model, &checked) else {
        return stream.reject(StatusCode::UNAUTHORIZED);
    };
    let net = ctx
        .pod_net(target.ip())
        .unwrap_or(crate::podnet::PodNet::Host);
    // The application sees the client as policy did.
    let app = match tokio::time::timeout(
        ctx.cfg.connect_timeout,
        net.connect_app(target, checked.source.ip(), ctx.cfg.mark),
    )
    .await
    {
        Ok(Ok(app)) => app,
        Ok(Err(e)) => {
            tracing::info!(src.identity = %peer_id, %target, error = %e, "application refused the connection");
            ctx.metrics.refuse("inbound", "app_connect_failed");
            return stream.reject(StatusCode::SERVICE_UNAVAILABLE);
        }
        Err(_) => {
            ctx.metrics.refuse("inbound", "app_connect_timeout");
            return stream.reject(StatusCode::SERVICE_UNAVAILABLE);
        }
    };
    let _ = app.set_nodelay(true);
    let h2 = match stream.accept() {
        Ok(h2) => h2,
        Err(e) => {
            tracing::debug!(error = %e, "HBONE stream went away before it opened");
            return reset_tcp(&app);
        }
    };
    let labels = TcpLabels::new(
        &model,
        Reporter::Destination,
        Peer {
            workload: src,
            identity: Some(&peer_id),
        },
        Peer {
            workload: Some(dst),
            identity: Some(&dst_id),
        },
        None,
        true,
    );
    let log = ConnLog {
        direction: "inbound",
        src: plan.client,
        dst: target,
        src_identity: Some(peer_id.to_string()),
        dst_identity: Some(dst_id.to_string()),
        src_workload: src.map(|w| format!("{}/{}", w.namespace, w.name)),
        dst_workload: Some(format!("{}/{}", dst.namespace, dst.name)),
        mtls: true,
        policy: outcome,
        traceparent: trace.0,
        baggage: trace.1,
    };
    let t = ConnTelemetry::open(&ctx.metrics, labels, log);
    let live = ctx.live.register(checked);
    // A policy change that denies this connection closes it: the stream is
    // reset, so the client's agent resets the client.
    let result = tokio::select! {
        r = h2.splice(app, &t.bytes) => r.map_err(|e| e.to_string()),
        _ = live.revoked.notified() => Err("closed by policy".to_string()),
    };
    t.close(result.as_ref().err().map(|e| e as &dyn std::fmt::Display));
}

/// Accept plaintext connections steered to a pod's inbound listener (15006)
/// by the `sk_lookup` program: the local address is the original
/// destination. Istio's default (PERMISSIVE) accepts them; the peer has no
/// verified identity.
pub async fn serve_plaintext(listener: TcpListener, ctx: Arc<Ctx>) {
    crate::limits::accept_loop(
        listener,
        ctx,
        "inbound",
        crate::limits::nothing,
        handle_plaintext,
    )
    .await
}

async fn handle_plaintext(tcp: TcpStream, peer: SocketAddr, ctx: Arc<Ctx>) {
    let _ = tcp.set_nodelay(true);
    let Ok(target) = tcp.local_addr() else { return };
    let model = ctx.model();
    let placed = plan::plaintext(&model, peer, target).and_then(|p| {
        let net = ctx
            .pod_net(target.ip())
            .ok_or(plan::Refusal::UnknownDestination(target))?;
        Ok((p, net))
    });
    let (plan, net) = match placed {
        Ok(placed) => placed,
        Err(refusal) => {
            if let plan::Refusal::WaypointBypassed(_) = refusal {
                tracing::warn!(src = %peer, %target, "plaintext bypasses the destination's waypoint");
            }
            ctx.metrics.refuse("inbound", refusal.reason());
            return reset_tcp(&tcp);
        }
    };
    let (dst, src, checked) = (plan.destination, plan.source, plan.checked);
    let Ok(outcome) = authz::admit(&ctx.metrics, &model, &checked) else {
        return reset_tcp(&tcp);
    };
    let app = match tokio::time::timeout(
        ctx.cfg.connect_timeout,
        net.connect_app(target, peer.ip(), ctx.cfg.mark),
    )
    .await
    {
        Ok(Ok(app)) => app,
        _ => {
            ctx.metrics.refuse("inbound", "app_connect_failed");
            return reset_tcp(&tcp);
        }
    };
    let _ = app.set_nodelay(true);
    let dst_id = model.identity(dst);
    let labels = TcpLabels::new(
        &model,
        Reporter::Destination,
        Peer {
            workload: src,
            identity: None,
        },
        Peer {
            workload: Some(dst),
            identity: Some(&dst_id),
        },
        None,
        false,
    );
    let log = ConnLog {
        direction: "inbound_plaintext",
        src: peer,
        dst: target,
        src_identity: None,
        dst_identity: Some(dst_id.to_string()),
        src_workload: src.map(|w| format!("{}/{}", w.namespace, w.name)),
        dst_workload: Some(format!("{}/{}", dst.namespace, dst.name)),
        mtls: false,
        policy: outcome,
        traceparent: None,
        baggage: None,
    };
    let t = ConnTelemetry::open(&ctx.metrics, labels, log);
    let live = ctx.live.register(checked);
    let result = tokio::select! {
        r = mesh_core::hbone::splice::copy_tcp(tcp, app, &t.bytes) => r.map_err(|e| e.to_string()),
        _ = live.revoked.notified() => Err("closed by policy".to_string()),
    };
    t.close(result.as_ref().err().map(|e| e as &dyn std::fmt::Display));
}
