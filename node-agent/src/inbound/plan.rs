//! Whom an inbound connection is for and from, decided from the mesh model
//! alone, so every rule is unit-tested; [`super`] does the TLS, the policy
//! check, the connection to the application and the splicing.
//!
//! A tunnel may only reach the workload whose identity the agent presented
//! (the one the client dialled); a workload behind a waypoint takes tunnels
//! only from that waypoint, and no plaintext at all (either would skip its
//! L7 policy). The source policy sees — and the application is shown — is
//! the client pod's address when the `forwarded` header names a workload
//! with the identity the client proved, else the tunnel's own peer.

use std::net::SocketAddr;

use http::StatusCode;
use mesh_core::identity::SpiffeId;
use mesh_core::model::{MeshModel, Workload};

use crate::authz::Checked;

/// An HBONE stream, as the agent received it.
#[derive(Debug, Clone, Copy)]
pub struct Tunnelled<'a> {
    /// The TLS connection's peer (a client's agent dialling from its pod,
    /// or a waypoint).
    pub peer: SocketAddr,
    /// The address the peer dialled (which certificate was presented).
    pub local: SocketAddr,
    /// The identity the peer proved.
    pub peer_id: &'a SpiffeId,
    /// The CONNECT target.
    pub target: SocketAddr,
    /// The `forwarded` header, if any.
    pub forwarded: Option<&'a str>,
}

/// Who the connection is between, and what policy is asked about.
#[derive(Debug)]
pub struct Plan<'m> {
    pub destination: &'m Workload,
    /// The source workload, when the model knows it.
    pub source: Option<&'m Workload>,
    /// The policy question; its `source` is also the address the
    /// application sees.
    pub checked: Checked,
    /// The client as the tunnel names it (its `forwarded` address, else
    /// the peer), for the access log.
    pub client: SocketAddr,
}

/// Why an inbound connection is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{0}: not the workload that was dialled")]
    WrongDestination(SocketAddr),
    #[error("{0}: no workload of the model has this address")]
    UnknownDestination(SocketAddr),
    #[error("{0}: behind a waypoint, and this does not come from it")]
    WaypointBypassed(SocketAddr),
}

impl Refusal {
    /// The `reason` label of `sluice_refused_connections_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::WrongDestination(_) => "wrong_destination",
            Refusal::UnknownDestination(_) => "unknown_destination",
            Refusal::WaypointBypassed(_) => "waypoint_bypassed",
        }
    }

    /// The HBONE response that refuses a stream.
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::WrongDestination(_) | Refusal::UnknownDestination(_) => {
                StatusCode::BAD_REQUEST
            }
            Refusal::WaypointBypassed(_) => StatusCode::UNAUTHORIZED,
        }
    }
}

/// Place an HBONE stream.
pub fn tunnelled<'m>(model: &'m MeshModel, t: &Tunnelled) -> Result<Plan<'m>, Refusal> {
    let destination = match (
        model.workload_by_ip(t.target.ip()),
        model.workload_by_ip(t.local.ip()),
    ) {
        (Some(d), Some(l)) if std::ptr::eq(d, l) => d,
        _ => return Err(Refusal::WrongDestination(t.target)),
    };
    let proven = |w: &&Workload| model.identity(w) == *t.peer_id;
    let forwarded_ip = t.forwarded.and_then(mesh_core::hbone::forwarded::client);
    let forwarded = forwarded_ip
        .and_then(|ip| model.workload_by_ip(ip))
        .filter(proven);
    // For telemetry, a proxy in between (a waypoint) is the source when the
    // forwarded client is not the identity that connected.
    let source = forwarded.or_else(|| model.workload_by_ip(t.peer.ip()).filter(proven));
    if let Some(waypoint) = model.workload_waypoint(destination) {
        if !waypoint.is_some_and(|g| model.is_waypoint_identity(g, t.peer_id)) {
            return Err(Refusal::WaypointBypassed(t.target));
        }
    }
    let checked = Checked {
        source_identity: Some(t.peer_id.clone()),
        source: match (forwarded, forwarded_ip) {
            (Some(_), Some(ip)) => SocketAddr::new(ip, 0),
            _ => t.peer,
        },
        destination: t.target,
    };
    Ok(Plan {
        destination,
        source,
        checked,
        client: forwarded_ip.map_or(t.peer, |ip| SocketAddr::new(ip, 0)),
    })
}

/// Place a plaintext connection steered to the inbound listener: `target`
/// is its original destination.
pub fn plaintext(
    model: &MeshModel,
    peer: SocketAddr,
    target: SocketAddr,
) -> Result<Plan<'_>, Refusal> {
    let destination = model
        .workload_by_ip(target.ip())
        .ok_or(Refusal::UnknownDestination(target))?;
    if model.workload_waypoint(destination).is_some() {
        return Err(Refusal::WaypointBypassed(target));
    }
    Ok(Plan {
        destination,
        source: model.workload_by_ip(peer.ip()),
        // No identity: STRICT PeerAuthentication refuses it, then
        // AuthorizationPolicy decides as for any unauthenticated source.
        checked: Checked {
            source_identity: None,
            source: peer,
            destination: target,
        },
        client: peer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// client (shop/client) and server in shop; guarded behind the
    /// waypoint of `ward`, which serves workload addresses too.
    const MESH: &str = r#"
nodes: [{name: node-a}, {name: node-b}]
namespaces:
  - {name: shop, labels: {istio.io/dataplane-mode: ambient}}
  - {name: ward, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}
workloads:
  - {name: client, namespace: shop, serviceAccount: client, node: node-a, ips: [10.0.1.1, "fd00::1:1"], labels: {app: client}}
  - {name: server, namespace: shop, serviceAccount: server, node: node-b, ips: [10.0.2.1], labels: {app: server}}
  - {name: waypoint-1, namespace: ward, serviceAccount: waypoint, node: node-a, ips: [10.0.1.9], labels: {gateway.networking.k8s.io/gateway-name: waypoint}}
  - {name: guarded, namespace: ward, node: node-b, ips: [10.0.2.5], labels: {app: guarded}}
gateways:
  - metadata: {name: waypoint, namespace: ward, labels: {istio.io/waypoint-for: all}}
    spec: {gatewayClassName: istio-waypoint}
"#;

    fn model() -> MeshModel {
        MeshModel::from_yaml(MESH, "test").unwrap()
    }

    fn id(ns: &str, sa: &str) -> SpiffeId {
        format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")
            .parse()
            .unwrap()
    }

    fn stream<'a>(peer: &str, peer_id: &'a SpiffeId, target: &str) -> Tunnelled<'a> {
        let target: SocketAddr = target.parse().unwrap();
        Tunnelled {
            peer: peer.parse().unwrap(),
            local: SocketAddr::new(target.ip(), 15008),
            peer_id,
            target,
            forwarded: None,
        }
    }

    #[test]
    fn a_tunnel_from_a_pod_is_checked_as_that_pod() {
        let m = model();
        let client = id("shop", "client");
        let p = tunnelled(&m, &stream("10.0.1.1:41000", &client, "10.0.2.1:8080")).unwrap();
        assert_eq!(p.destination.name, "server");
        assert_eq!(p.source.unwrap().name, "client");
        assert_eq!(p.checked.source, "10.0.1.1:41000".parse().unwrap());
        assert_eq!(p.checked.source_identity, Some(client.clone()));
        assert_eq!(p.checked.destination, "10.0.2.1:8080".parse().unwrap());
        assert_eq!(p.client, p.checked.source);
        // The forwarded address counts when it is a pod with the identity
        // the client proved (IPv6 as RFC 7239 writes it).
        let mut t = stream("10.0.1.1:41000", &client, "10.0.2.1:8080");
        t.forwarded = Some("for=\"[fd00::1:1]\"");
        let p = tunnelled(&m, &t).unwrap();
        assert_eq!(p.checked.source, "[fd00::1:1]:0".parse().unwrap());
        assert_eq!(p.source.unwrap().name, "client");
    }

    #[test]
    fn a_forwarded_address_of_another_identity_is_not_believed() {
        let m = model();
        let client = id("shop", "client");
        // The client claims to be the server.
        let mut t = stream("10.0.1.1:41000", &client, "10.0.2.1:8080");
        t.forwarded = Some("for=10.0.2.1");
        let p = tunnelled(&m, &t).unwrap();
        assert_eq!(p.checked.source, t.peer, "policy sees the real peer");
        assert_eq!(p.source.unwrap().name, "client");
        // The log still says what the tunnel claimed.
        assert_eq!(p.client, "10.0.2.1:0".parse().unwrap());
        // An identity no workload at the peer's address has: no source.
        let stranger = id("elsewhere", "x");
        let p = tunnelled(&m, &stream("10.0.1.1:41000", &stranger, "10.0.2.1:8080")).unwrap();
        assert!(p.source.is_none());
        // Garbage in the header is ignored.
        t.forwarded = Some("for=not-an-address");
        assert_eq!(tunnelled(&m, &t).unwrap().client, t.peer);
    }

    #[test]
    fn a_tunnel_may_only_reach_the_workload_that_was_dialled() {
        let m = model();
        let client = id("shop", "client");
        let mut t = stream("10.0.1.1:41000", &client, "10.0.2.1:8080");
        t.local = "10.0.2.5:15008".parse().unwrap();
        let r = tunnelled(&m, &t).unwrap_err();
        assert_eq!(r, Refusal::WrongDestination(t.target));
        assert_eq!(
            (r.reason(), r.status()),
            ("wrong_destination", StatusCode::BAD_REQUEST)
        );
        let t = stream("10.0.1.1:41000", &client, "10.9.9.9:80");
        assert!(matches!(
            tunnelled(&m, &t),
            Err(Refusal::WrongDestination(_))
        ));
    }

    #[test]
    fn a_workload_behind_a_waypoint_takes_only_the_waypoints_traffic() {
        let m = model();
        let client = id("shop", "client");
        let r = tunnelled(&m, &stream("10.0.1.1:41000", &client, "10.0.2.5:8080")).unwrap_err();
        assert_eq!(
            (r.reason(), r.status()),
            ("waypoint_bypassed", StatusCode::UNAUTHORIZED)
        );
        let waypoint = id("ward", "waypoint");
        let mut t = stream("10.0.1.9:41000", &waypoint, "10.0.2.5:8080");
        t.forwarded = Some("for=10.0.1.1");
        let p = tunnelled(&m, &t).unwrap();
        // The client is not the identity that connected: the waypoint is
        // the source, as in ztunnel.
        assert_eq!(p.source.unwrap().name, "waypoint-1");
        assert_eq!(p.checked.source, t.peer);
        assert_eq!(p.client, "10.0.1.1:0".parse().unwrap());
        // No plaintext either.
        let r = plaintext(&m, "10.0.1.1:41000".parse().unwrap(), t.target).unwrap_err();
        assert_eq!(r.reason(), "waypoint_bypassed");
    }

    #[test]
    fn plaintext_is_checked_without_an_identity() {
        let m = model();
        let peer: SocketAddr = "10.0.1.1:41000".parse().unwrap();
        let p = plaintext(&m, peer, "10.0.2.1:8080".parse().unwrap()).unwrap();
        assert_eq!(p.destination.name, "server");
        assert_eq!(p.source.unwrap().name, "client");
        assert_eq!(p.checked.source_identity, None);
        assert_eq!((p.checked.source, p.client), (peer, peer));
        let r = plaintext(&m, peer, "10.9.9.9:80".parse().unwrap()).unwrap_err();
        assert_eq!(r.reason(), "unknown_destination");
    }
}
