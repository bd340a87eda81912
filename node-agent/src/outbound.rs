//! What happens to an outbound connection: a captured TCP connection from a
//! local workload is matched to its original destination, resolved in the
//! mesh model (workload IP or service VIP → endpoint), and tunnelled over
//! HBONE to the destination's agent — or to the destination's waypoint
//! when it has one, or, for destinations outside the mesh, passed through. A connection the agent cannot place is reset, never sent
//! somewhere guessed.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::{HeaderMap, HeaderValue};
use mesh_core::hbone::splice::reset_tcp;
use mesh_core::hbone::{ConnectRequest, Origin};
use mesh_core::metrics::{Peer, Reporter, TcpLabels};
use mesh_core::model::{Destination, MeshModel, Workload};
use tokio::net::{TcpListener, TcpStream};

use crate::telemetry::{ConnLog, ConnTelemetry};
use crate::Ctx;

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
    let Ok(listener_addr) = tcp.local_addr() else {
        return;
    };
    if dst.port() == ctx.cfg.outbound_port && dst.ip() == listener_addr.ip() {
        return refuse(tcp, "loop", &dst);
    }
    let model = ctx.model();
    let Some(src) = model.workload_by_ip(src_ip) else {
        return refuse(tcp, "unknown_source", &src_ip);
    };
    let (service, waypoint) = match model.destination(dst) {
        Destination::External
            if ctx.cfg.outbound_traffic_policy == crate::OutboundTrafficPolicy::RegistryOnly =>
        {
            return refuse(tcp, "egress_blocked", &dst)
        }
        Destination::External => {
            return passthrough(
                tcp,
                peer,
                dst,
                &model,
                Client {
                    workload: src,
                    origin: origin.as_ref(),
                },
                None,
                &ctx,
            )
            .await
        }
        Destination::Service(svc, _) => (Some(svc), model.service_waypoint(svc)),
        Destination::Workload(w) => (None, model.workload_waypoint(w)),
    };
    // Traffic for a destination with a waypoint goes to the waypoint, with
    // the original destination as the tunnel's authority — unless it comes
    // from that waypoint (never loop through it twice).
    let waypoint = match waypoint {
        Some(Some(gw)) if !model.waypoint_workloads(gw).any(|w| std::ptr::eq(w, src)) => {
            match model.pick_waypoint_workload(gw) {
                Some(w) => Some(w),
                None => {
                    return refuse(
                        tcp,
                        "waypoint_unavailable",
                        &format!(
                            "waypoint {}/{} has no pods",
                            gw.metadata.namespace, gw.metadata.name
                        ),
                    )
                }
            }
        }
        // A waypoint is asked for but does not exist: refusing is safer
        // than skipping the L7 policy it would enforce.
        Some(None) => return refuse(tcp, "waypoint_missing", &dst),
        _ => None,
    };
    let ep = match waypoint {
        Some(w) => {
            let ip = w
                .ips
                .iter()
                .find(|ip| ip.is_ipv4() == dst.is_ipv4())
                .or_else(|| w.ips.first())
                .copied();
            let Some(ip) = ip else {
                return refuse(tcp, "waypoint_unavailable", &dst);
            };
            mesh_core::model::Endpoint {
                workload: w,
                // The HBONE address is the waypoint's; the authority stays
                // what the client dialled.
                addr: SocketAddr::new(ip, dst.port()),
                service,
            }
        }
        None => match model.pick_endpoint(dst) {
            Some(ep) => ep,
            None => return refuse(tcp, "no_endpoints", &dst),
        },
    };
    if waypoint.is_none() && !model.is_enrolled(ep.workload) {
        // Istio sends plaintext to destinations that are not in the mesh.
        return passthrough(
            tcp,
            peer,
            ep.addr,
            &model,
            Client {
                workload: src,
                origin: origin.as_ref(),
            },
            Some(ep.workload),
            &ctx,
        )
        .await;
    }
    let authority = if waypoint.is_some() { dst } else { ep.addr };
    let src_id = model.identity(src);
    let dst_id = model.identity(ep.workload);
    let mut headers = HeaderMap::new();
    // The client's address: its pod IP (a captured connection arrives from
    // the pod's loopback).
    let client = if peer.ip().is_loopback() {
        SocketAddr::new(src_ip, peer.port())
    } else {
        peer
    };
    if let Ok(v) = HeaderValue::from_str(&format!("for={}", forwarded_ip(client))) {
        headers.insert("forwarded", v);
    }
    if let Ok(v) = HeaderValue::from_str(&baggage(src)) {
        headers.insert("baggage", v);
    }
    let req = ConnectRequest {
        source: src_id.clone(),
        destination_identity: dst_id.clone(),
        hbone_addr: SocketAddr::new(ep.addr.ip(), ctx.cfg.hbone_port),
        authority,
        headers,
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
        service,
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
        policy: if waypoint.is_some() {
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

/// RFC 7239 wants IPv6 addresses quoted and bracketed.
fn forwarded_ip(peer: SocketAddr) -> String {
    match peer {
        SocketAddr::V4(a) => a.ip().to_string(),
        SocketAddr::V6(a) => format!("\"[{}]\"", a.ip()),
    }
}

/// W3C baggage describing the source workload, as ztunnel sends it.
fn baggage(w: &Workload) -> String {
    let mut parts = vec![
        "k8s.cluster.name=Kubernetes".to_string(),
        format!("k8s.namespace.name={}", w.namespace),
        format!("k8s.pod.name={}", w.name),
        format!("service.name={}", w.canonical_name()),
    ];
    if let Some(v) = w.labels.get("version") {
        parts.push(format!("service.version={v}"));
    }
    parts.join(",")
}
