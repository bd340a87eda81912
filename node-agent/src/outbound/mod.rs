//! What happens to an outbound connection: a captured TCP connection from a
//! local workload is matched to its original destination, placed by
//! [`plan`] (HBONE to the destination's agent or its waypoint, or plaintext
//! for destinations outside the mesh), and carried out here: dialled,
//! spliced, counted and logged. A connection the agent cannot place is
//! reset, never sent somewhere guessed.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use mesh_core::hbone::splice::reset_tcp;
use mesh_core::hbone::{ConnectRequest, Origin};
use mesh_core::metrics::{Peer, Reporter, TcpLabels};
use mesh_core::model::{MeshModel, Workload};
use tokio::net::{TcpListener, TcpStream};

use crate::telemetry::{ConnLog, ConnTelemetry};
use crate::Ctx;

pub mod plan;

use plan::Plan;

/// Accept captured connections of the workload with IP `src_ip` until
/// aborted. Its tunnels and passthrough connections are dialled from
/// `origin` (inside the pod's namespace, so the destination sees the pod,
/// as with ztunnel's in-pod mode), or from the agent's own namespace.
pub async fn serve(listener: TcpListener, ctx: Arc<Ctx>, src_ip: IpAddr, origin: Option<Origin>) {
    // A refused connection's capture record is taken, not left behind.
    let forget = |ctx: &Ctx, tcp: &TcpStream| {
        let _ = ctx.orig_dst.take(tcp);
    };
    crate::limits::accept_loop(listener, ctx, "outbound", forget, move |tcp, peer, ctx| {
        handle(tcp, peer, ctx, src_ip, origin.clone())
    })
    .await
}

async fn handle(
    tcp: TcpStream,
    peer: SocketAddr,
    ctx: Arc<Ctx>,
    src_ip: IpAddr,
    origin: Option<Origin>,
) {
    let _ = tcp.set_nodelay(true);
    let refuse = |tcp: TcpStream, reason: &'static str, detail: &dyn std::fmt::Display| {
        tracing::warn!(direction = "outbound", src = %peer, reason, %detail, "connection refused");
        ctx.metrics.refuse("outbound", reason);
        reset_tcp(&tcp);
    };
    let Some(dst) = ctx.orig_dst.take(&tcp) else {
        return refuse(
            tcp,
            "no_original_destination",
            &"destination not recorded by capture",
        );
    };
    let Ok(listener) = tcp.local_addr() else {
        return;
    };
    let model = ctx.model();
    let settings = plan::Settings {
        outbound_port: ctx.cfg.outbound_port,
        hbone_port: ctx.cfg.hbone_port,
        policy: ctx.cfg.outbound_traffic_policy,
    };
    let captured = plan::Captured {
        src_ip,
        peer,
        listener,
        dst,
    };
    let tunnel = match plan::plan(&model, &settings, &captured) {
        Err(refusal) => return refuse(tcp, refusal.reason(), &refusal),
        Ok(Plan::Passthrough {
            source,
            dst,
            workload,
        }) => {
            let client = Client {
                workload: source,
                origin: origin.as_ref(),
            };
            return passthrough(tcp, peer, dst, &model, client, workload, &ctx).await;
        }
        Ok(Plan::Tunnel(t)) => t,
    };
    let (src, ep) = (tunnel.source, &tunnel.endpoint);
    let src_id = model.identity(src);
    let dst_id = model.identity(ep.workload);
    let req = ConnectRequest {
        source: src_id.clone(),
        destination_identity: dst_id.clone(),
        hbone_addr: tunnel.hbone_addr,
        authority: tunnel.authority,
        headers: tunnel.headers.clone(),
        origin: origin.clone(),
    };
    let stream = match ctx.connector.connect(&req).await {
        Ok(s) => s,
        Err(e) => return refuse(tcp, "hbone_connect_failed", &e),
    };
    let labels = TcpLabels::new(
        &model,
        Reporter::Source,
        Peer {
            workload: Some(src),
            identity: Some(&src_id),
        },
        Peer {
            workload: Some(ep.workload),
            identity: Some(&dst_id),
        },
        ep.service,
        true,
    );
    let log = ConnLog {
        direction: "outbound",
        src: peer,
        dst: ep.addr,
        src_identity: Some(src_id.to_string()),
        dst_identity: Some(dst_id.to_string()),
        src_workload: Some(format!("{}/{}", src.namespace, src.name)),
        dst_workload: Some(format!("{}/{}", ep.workload.namespace, ep.workload.name)),
        mtls: true,
        policy: if tunnel.via_waypoint {
            "via waypoint; enforced there and at the destination".into()
        } else {
            "enforced at the destination".into()
        },
        traceparent: None,
        baggage: None,
    };
    let t = ConnTelemetry::open(&ctx.metrics, labels, log);
    let result = stream.splice(tcp, &t.bytes).await;
    t.close(result.as_ref().err().map(|e| e as &dyn std::fmt::Display));
}

/// The captured client: its workload, and where its connections are
/// dialled from (see [`serve`]).
struct Client<'a> {
    workload: &'a Workload,
    origin: Option<&'a Origin>,
}

/// Forward in plaintext to a destination outside the mesh.
async fn passthrough(
    tcp: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    model: &MeshModel,
    client: Client<'_>,
    dst_workload: Option<&Workload>,
    ctx: &Ctx,
) {
    let upstream = match tokio::time::timeout(
        ctx.cfg.connect_timeout,
        mesh_core::hbone::dial(client.origin, dst),
    )
    .await
    {
        Ok(Ok(u)) => u,
        Ok(Err(e)) => {
            tracing::info!(src = %peer, %dst, error = %e, "passthrough destination refused");
            ctx.metrics.refuse("outbound", "passthrough_connect_failed");
            return reset_tcp(&tcp);
        }
        Err(_) => {
            ctx.metrics
                .refuse("outbound", "passthrough_connect_timeout");
            return reset_tcp(&tcp);
        }
    };
    let _ = upstream.set_nodelay(true);
    let src = client.workload;
    let src_id = model.identity(src);
    let labels = TcpLabels::new(
        model,
        Reporter::Source,
        Peer {
            workload: Some(src),
            identity: Some(&src_id),
        },
        Peer {
            workload: dst_workload,
            identity: None,
        },
        None,
        false,
    );
    let log = ConnLog {
        direction: "passthrough",
        src: peer,
        dst,
        src_identity: Some(src_id.to_string()),
        dst_identity: None,
        src_workload: Some(format!("{}/{}", src.namespace, src.name)),
        dst_workload: dst_workload.map(|w| format!("{}/{}", w.namespace, w.name)),
        mtls: false,
        policy: "passthrough: outside the mesh".into(),
        traceparent: None,
        baggage: None,
    };
    let t = ConnTelemetry::open(&ctx.metrics, labels, log);
    let result = mesh_core::hbone::splice::copy_tcp(tcp, upstream, &t.bytes).await;
    t.close(result.as_ref().err().map(|e| e as &dyn std::fmt::Display));
}
