//! Where a captured outbound connection goes, decided from the mesh model
//! alone — no socket, no clock — so every rule is unit-tested (as ztunnel
//! tests its request builder). [`super`] carries the plan out.
//!
//! The rules, in order: a connection to the agent's own outbound port is a
//! loop; the source must be a known workload; a destination outside the
//! mesh passes through (or is refused under `REGISTRY_ONLY`); a
//! destination with a waypoint goes to one of the waypoint's pods, with
//! what the client dialled as the tunnel's authority — unless the source
//! is that waypoint; otherwise a service address resolves to an endpoint;
//! an endpoint outside the mesh gets plaintext, as with Istio; everything
//! else is an HBONE tunnel to the endpoint's agent.

use std::net::{IpAddr, SocketAddr};

use http::{HeaderMap, HeaderValue};
use mesh_core::hbone::forwarded;
use mesh_core::model::{Destination, Endpoint, MeshModel, Service, Workload};

use crate::OutboundTrafficPolicy;

/// The parts of the agent's configuration the decision reads.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// The capture listener's port: a destination on it is a loop.
    pub outbound_port: u16,
    /// The port peers' HBONE listeners use.
    pub hbone_port: u16,
    pub policy: OutboundTrafficPolicy,
}

/// A captured connection, as the agent accepted it.
#[derive(Debug, Clone, Copy)]
pub struct Captured {
    /// The workload the capture listener serves.
    pub src_ip: IpAddr,
    /// The accepted connection's peer (the pod's loopback in a pod).
    pub peer: SocketAddr,
    /// The capture listener's own address.
    pub listener: SocketAddr,
    /// The original destination, recorded by the capture.
    pub dst: SocketAddr,
}

/// What to do with the connection.
#[derive(Debug)]
pub enum Plan<'m> {
    Tunnel(Tunnel<'m>),
    /// Plaintext to `dst`, a destination outside the mesh (`workload`, when
    /// it is a workload that is not enrolled).
    Passthrough {
        source: &'m Workload,
        dst: SocketAddr,
        workload: Option<&'m Workload>,
    },
}

/// An HBONE tunnel.
#[derive(Debug)]
pub struct Tunnel<'m> {
    pub source: &'m Workload,
    /// The workload at the other end (the destination's or a waypoint's
    /// pod) and the address its tunnel names.
    pub endpoint: Endpoint<'m>,
    /// Whether `endpoint` is a waypoint of the destination.
    pub via_waypoint: bool,
    /// Where the tunnel is dialled: the endpoint's HBONE port.
    pub hbone_addr: SocketAddr,
    /// The CONNECT authority: the endpoint, or through a waypoint what the
    /// client dialled (the waypoint routes on it).
    pub authority: SocketAddr,
    /// `forwarded` (the client's address) and `baggage` (its workload).
    pub headers: HeaderMap,
}

/// Why a connection is refused (reset), with the reason label of
/// `sluice_refused_connections_total`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{0}: the agent's own capture port")]
    Loop(SocketAddr),
    #[error("{0}: no workload of the model has this address")]
    UnknownSource(IpAddr),
    #[error("{0}: outside the mesh, and the mesh is REGISTRY_ONLY")]
    EgressBlocked(SocketAddr),
    #[error("{0}: its waypoint does not exist")]
    WaypointMissing(SocketAddr),
    #[error("{dst}: waypoint {waypoint} has no pod to send to")]
    WaypointUnavailable { dst: SocketAddr, waypoint: String },
    #[error("{0}: no endpoint")]
    NoEndpoints(SocketAddr),
}

impl Refusal {
    /// The metric's `reason` label.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Loop(_) => "loop",
            Refusal::UnknownSource(_) => "unknown_source",
            Refusal::EgressBlocked(_) => "egress_blocked",
            Refusal::WaypointMissing(_) => "waypoint_missing",
            Refusal::WaypointUnavailable { .. } => "waypoint_unavailable",
            Refusal::NoEndpoints(_) => "no_endpoints",
        }
    }
}

/// Decide where `conn` goes.
pub fn plan<'m>(
    model: &'m MeshModel,
    settings: &Settings,
    conn: &Captured,
) -> Result<Plan<'m>, Refusal> {
    let dst = conn.dst;
    if dst.port() == settings.outbound_port && dst.ip() == conn.listener.ip() {
        return Err(Refusal::Loop(dst));
    }
    let source = model
        .workload_by_ip(conn.src_ip)
        .ok_or(Refusal::UnknownSource(conn.src_ip))?;
    let (service, waypoint) = match model.destination(dst) {
        Destination::External if settings.policy == OutboundTrafficPolicy::RegistryOnly => {
            return Err(Refusal::EgressBlocked(dst))
        }
        Destination::External => {
            return Ok(Plan::Passthrough {
                source,
                dst,
                workload: None,
            })
        }
        Destination::Service(svc, _) => (Some(svc), model.service_waypoint(svc)),
        Destination::Workload(w) => (None, model.workload_waypoint(w)),
    };
    let endpoint = match waypoint {
        // Never through the waypoint twice: its own traffic goes on.
        Some(Some(gw))
            if !model
                .waypoint_workloads(gw)
                .any(|w| std::ptr::eq(w, source)) =>
        {
            let unavailable = || Refusal::WaypointUnavailable {
                dst,
                waypoint: format!("{}/{}", gw.metadata.namespace, gw.metadata.name),
            };
            let pod = model.pick_waypoint_workload(gw).ok_or_else(unavailable)?;
            Some(waypoint_endpoint(pod, dst, service).ok_or_else(unavailable)?)
        }
        // A waypoint is asked for but does not exist: refusing is safer
        // than skipping the L7 policy it would enforce.
        Some(None) => return Err(Refusal::WaypointMissing(dst)),
        _ => None,
    };
    let via_waypoint = endpoint.is_some();
    let endpoint = match endpoint {
        Some(ep) => ep,
        None => model.pick_endpoint(dst).ok_or(Refusal::NoEndpoints(dst))?,
    };
    if !via_waypoint && !model.is_enrolled(endpoint.workload) {
        // Istio sends plaintext to destinations that are not in the mesh.
        return Ok(Plan::Passthrough {
            source,
            dst: endpoint.addr,
            workload: Some(endpoint.workload),
        });
    }
    Ok(Plan::Tunnel(Tunnel {
        source,
        hbone_addr: SocketAddr::new(endpoint.addr.ip(), settings.hbone_port),
        authority: if via_waypoint { dst } else { endpoint.addr },
        headers: headers(source, client_addr(conn)),
        endpoint,
        via_waypoint,
    }))
}

/// The waypoint pod `w` as the endpoint for `dst`: its address of the
/// same family, the port the client dialled.
fn waypoint_endpoint<'m>(
    w: &'m Workload,
    dst: SocketAddr,
    service: Option<&'m Service>,
) -> Option<Endpoint<'m>> {
    Some(Endpoint {
        workload: w,
        addr: SocketAddr::new(w.ip_like(dst.ip())?, dst.port()),
        service,
    })
}

/// The client's address: its pod IP (a captured connection arrives from
/// the pod's loopback).
fn client_addr(conn: &Captured) -> SocketAddr {
    if conn.peer.ip().is_loopback() {
        SocketAddr::new(conn.src_ip, conn.peer.port())
    } else {
        conn.peer
    }
}

fn headers(source: &Workload, client: SocketAddr) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&forwarded::for_client(client.ip())) {
        headers.insert("forwarded", v);
    }
    if let Ok(v) = HeaderValue::from_str(&baggage(source)) {
        headers.insert("baggage", v);
    }
    headers
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

#[cfg(test)]
mod tests {
    use super::*;

    /// node-a: client, a waypoint pod, an opted-out pod; node-b: two
    /// echo pods behind a service, a pod of a namespace whose waypoint
    /// does not exist, and `lonely`, a service with no pods.
    const MESH: &str = r#"
nodes: [{name: node-a}, {name: node-b}]
namespaces:
  - {name: shop, labels: {istio.io/dataplane-mode: ambient}}
  - {name: ward, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}
  - {name: lost, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: ghost}}
workloads:
  - {name: client, namespace: shop, serviceAccount: client, node: node-a, ips: [10.0.1.1, "fd00::1:1"], labels: {app: client, version: v2}}
  - {name: plain, namespace: shop, node: node-a, ips: [10.0.1.3], labels: {app: plain, istio.io/dataplane-mode: none}}
  - {name: echo-1, namespace: shop, node: node-b, ips: [10.0.2.1], labels: {app: echo}}
  - {name: echo-2, namespace: shop, node: node-b, ips: [10.0.2.2], labels: {app: echo}}
  - {name: waypoint-1, namespace: ward, serviceAccount: waypoint, node: node-a, ips: [10.0.1.9], labels: {gateway.networking.k8s.io/gateway-name: waypoint}}
  - {name: guarded, namespace: ward, node: node-b, ips: [10.0.2.5], labels: {app: guarded}}
  - {name: stray, namespace: lost, node: node-b, ips: [10.0.2.7], labels: {app: stray}}
services:
  - {name: echo, namespace: shop, vips: [10.96.0.10], ports: [{port: 80, targetPort: 8080}], selector: {app: echo}}
  - {name: guarded, namespace: ward, vips: [10.96.0.20], ports: [{port: 80, targetPort: 8080}], selector: {app: guarded}}
  - {name: stray, namespace: lost, vips: [10.96.0.30], ports: [{port: 80, targetPort: 8080}], selector: {app: stray}}
  - {name: lonely, namespace: shop, vips: [10.96.0.40], ports: [{port: 80, targetPort: 8080}], selector: {app: nobody}}
gateways:
  - metadata: {name: waypoint, namespace: ward}
    spec: {gatewayClassName: istio-waypoint}
"#;

    const SETTINGS: Settings = Settings {
        outbound_port: 15001,
        hbone_port: 15008,
        policy: OutboundTrafficPolicy::AllowAny,
    };

    fn model() -> MeshModel {
        MeshModel::from_yaml(MESH, "test").unwrap()
    }

    /// A connection of the pod at `src` (captured on its loopback) to `dst`.
    fn from(src: &str, dst: &str) -> Captured {
        Captured {
            src_ip: src.parse().unwrap(),
            peer: "127.0.0.1:40000".parse().unwrap(),
            listener: "127.0.0.1:15001".parse().unwrap(),
            dst: dst.parse().unwrap(),
        }
    }

    fn tunnel<'m>(p: Result<Plan<'m>, Refusal>) -> Tunnel<'m> {
        match p {
            Ok(Plan::Tunnel(t)) => t,
            other => panic!("not a tunnel: {other:?}"),
        }
    }

    fn header<'a>(t: &'a Tunnel, name: &str) -> &'a str {
        t.headers.get(name).unwrap().to_str().unwrap()
    }

    #[test]
    fn a_service_address_is_tunnelled_to_its_endpoints_in_turn() {
        let m = model();
        let mut seen = Vec::new();
        for _ in 0..2 {
            let t = tunnel(plan(&m, &SETTINGS, &from("10.0.1.1", "10.96.0.10:80")));
            assert_eq!(t.source.name, "client");
            assert!(!t.via_waypoint);
            assert_eq!(t.endpoint.service.unwrap().name, "echo");
            assert_eq!(t.authority, t.endpoint.addr);
            assert_eq!(t.authority.port(), 8080);
            assert_eq!(t.hbone_addr, SocketAddr::new(t.authority.ip(), 15008));
            seen.push(t.endpoint.workload.name.clone());
        }
        seen.sort();
        assert_eq!(seen, ["echo-1", "echo-2"]);
    }

    #[test]
    fn a_pod_address_is_tunnelled_as_dialled_with_the_clients_headers() {
        let m = model();
        let t = tunnel(plan(&m, &SETTINGS, &from("10.0.1.1", "10.0.2.1:9000")));
        assert_eq!(t.endpoint.workload.name, "echo-1");
        assert!(t.endpoint.service.is_none());
        assert_eq!(t.authority, "10.0.2.1:9000".parse().unwrap());
        // The client's pod address, not the loopback it was captured on.
        assert_eq!(header(&t, "forwarded"), "for=10.0.1.1");
        assert_eq!(
            header(&t, "baggage"),
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=shop,k8s.pod.name=client,service.name=client,service.version=v2"
        );
        // IPv6, quoted and bracketed (RFC 7239).
        let mut v6 = from("fd00::1:1", "10.0.2.1:9000");
        v6.peer = "[::1]:40000".parse().unwrap();
        let t = tunnel(plan(&m, &SETTINGS, &v6));
        assert_eq!(header(&t, "forwarded"), "for=\"[fd00::1:1]\"");
    }

    #[test]
    fn destinations_outside_the_mesh_pass_through_unless_registry_only() {
        let m = model();
        match plan(&m, &SETTINGS, &from("10.0.1.1", "192.0.2.7:443")) {
            Ok(Plan::Passthrough {
                source,
                dst,
                workload: None,
            }) => {
                assert_eq!(source.name, "client");
                assert_eq!(dst, "192.0.2.7:443".parse().unwrap());
            }
            other => panic!("{other:?}"),
        }
        // A workload that is not enrolled gets plaintext too, as in Istio.
        match plan(&m, &SETTINGS, &from("10.0.1.1", "10.0.1.3:8080")) {
            Ok(Plan::Passthrough {
                workload: Some(w), ..
            }) => assert_eq!(w.name, "plain"),
            other => panic!("{other:?}"),
        }
        let strict = Settings {
            policy: OutboundTrafficPolicy::RegistryOnly,
            ..SETTINGS
        };
        let r = plan(&m, &strict, &from("10.0.1.1", "192.0.2.7:443")).unwrap_err();
        assert_eq!(r.reason(), "egress_blocked");
        // Known destinations are not affected.
        tunnel(plan(&m, &strict, &from("10.0.1.1", "10.96.0.10:80")));
    }

    #[test]
    fn a_waypoint_gets_the_traffic_with_what_the_client_dialled() {
        let m = model();
        let t = tunnel(plan(&m, &SETTINGS, &from("10.0.1.1", "10.96.0.20:80")));
        assert!(t.via_waypoint);
        assert_eq!(t.endpoint.workload.name, "waypoint-1");
        assert_eq!(t.endpoint.service.unwrap().name, "guarded");
        assert_eq!(t.authority, "10.96.0.20:80".parse().unwrap());
        assert_eq!(t.hbone_addr, "10.0.1.9:15008".parse().unwrap());
        // The waypoint's own connection goes on to the endpoint.
        let t = tunnel(plan(&m, &SETTINGS, &from("10.0.1.9", "10.96.0.20:80")));
        assert!(!t.via_waypoint);
        assert_eq!(t.endpoint.workload.name, "guarded");
        assert_eq!(t.authority, "10.0.2.5:8080".parse().unwrap());
        // Only services use the waypoint by default (Istio's `service`).
        let t = tunnel(plan(&m, &SETTINGS, &from("10.0.1.1", "10.0.2.5:8080")));
        assert!(!t.via_waypoint);
    }

    #[test]
    fn what_cannot_be_placed_is_refused_with_its_reason() {
        let m = model();
        let cases = [
            (from("10.0.1.1", "127.0.0.1:15001"), "loop"),
            (from("10.9.9.9", "10.96.0.10:80"), "unknown_source"),
            (from("10.0.1.1", "10.96.0.30:80"), "waypoint_missing"),
            (from("10.0.1.1", "10.96.0.40:80"), "no_endpoints"),
        ];
        for (conn, reason) in cases {
            let r = plan(&m, &SETTINGS, &conn).unwrap_err();
            assert_eq!(r.reason(), reason, "{conn:?}: {r}");
        }
        // A waypoint with no pod (or only terminating ones).
        let gone = MESH.replace(
            "gateway.networking.k8s.io/gateway-name: waypoint",
            "app: was-a-waypoint",
        );
        let m = MeshModel::from_yaml(&gone, "test").unwrap();
        let r = plan(&m, &SETTINGS, &from("10.0.1.1", "10.96.0.20:80")).unwrap_err();
        assert_eq!(
            r,
            Refusal::WaypointUnavailable {
                dst: "10.96.0.20:80".parse().unwrap(),
                waypoint: "ward/waypoint".into()
            }
        );
        assert_eq!(r.reason(), "waypoint_unavailable");
    }
}
