//! Test fixtures of the request phases: a small mesh with a service and
//! its waypoint, a plain rule, and [`FakeBackends`] — a scripted upstream
//! that notes every request it is sent.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::BodyExt;
use mesh_core::identity::SpiffeId;
use mesh_core::model::MeshModel;
use prometheus_client::registry::Registry;

use crate::backend::{Backends, Failure, FailureKind, Sent};
use crate::proxy::answer::full;
use crate::proxy::ConnCtx;
use crate::routes::{Backend, RouteTable, Rule};
use crate::telemetry::WaypointMetrics;
use crate::upstream;

const MESH: &str = r#"
trustDomain: cluster.local
nodes: [{name: n}]
namespaces:
  - name: shop
    labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}
workloads:
  - {name: client, namespace: shop, serviceAccount: client, node: n, ips: [10.0.0.9], labels: {app: client}}
  - {name: r1, namespace: shop, node: n, ips: [10.0.0.1], labels: {app: reviews}}
  - name: waypoint
    namespace: shop
    serviceAccount: waypoint
    node: n
    ips: [10.0.0.20]
    labels: {gateway.networking.k8s.io/gateway-name: waypoint, istio.io/dataplane-mode: none}
services:
  - {name: reviews, namespace: shop, vips: [10.96.0.1], ports: [{port: 80, targetPort: 8080}], selector: {app: reviews}}
  - {name: authz, namespace: shop, ports: [{port: 8000}], selector: {app: authz}}
gateways:
  - metadata: {name: waypoint, namespace: shop, labels: {istio.io/waypoint-for: service}}
    spec:
      gatewayClassName: istio-waypoint
      listeners: [{name: mesh, port: 15008, protocol: HBONE}]
"#;

/// The test mesh plus `extra` (top-level YAML sections).
pub fn model(extra: &str) -> MeshModel {
    MeshModel::from_yaml(&format!("{MESH}{extra}"), "test").unwrap()
}

/// The routes of `reviews:80` for callers in `shop`.
pub fn table(model: &MeshModel) -> RouteTable {
    let svc = model.service("shop", "reviews").unwrap();
    RouteTable::build(model, svc, 80, "shop").unwrap()
}

/// A backend `name.shop:80`.
pub fn backend(name: &str) -> Backend {
    Backend {
        namespace: "shop".into(),
        name: name.into(),
        port: 80,
        weight: 1,
        problem: None,
    }
}

/// A rule that only forwards to `reviews`.
pub fn rule() -> Rule {
    Rule::forwarding("shop/r#0", backend("reviews"))
}

/// The tunnel of `client` calling `reviews:80`.
pub fn conn() -> ConnCtx {
    ConnCtx {
        source_identity: SpiffeId::new("cluster.local", "shop", "client"),
        source_ip: "10.0.0.9".parse().unwrap(),
        target: "10.96.0.1:80".parse().unwrap(),
        service_namespace: "shop".into(),
        service_name: "reviews".into(),
        port: 80,
    }
}

/// Metrics registered in a throw-away registry.
pub fn metrics() -> WaypointMetrics {
    WaypointMetrics::register(&mut Registry::default())
}

/// What a fake backend answers to one request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// A response with this status (body `ok`).
    Status(u16),
    /// A failure before any response.
    Fail(FailureKind),
    /// Never answer.
    Hang,
}

/// A request a fake backend received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub backend: String,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub tried: Vec<SocketAddr>,
    /// The endpoint the request went to (`10.1.0.<n>:8080`, n = call).
    pub endpoint: SocketAddr,
}

/// Scripted backends: replies in order (then `200`), requests noted.
#[derive(Default)]
pub struct FakeBackends {
    replies: Mutex<VecDeque<Reply>>,
    seen: Mutex<Vec<Seen>>,
    arrived: tokio::sync::Notify,
}

impl FakeBackends {
    pub fn replying(replies: Vec<Reply>) -> Self {
        FakeBackends {
            replies: Mutex::new(replies.into()),
            ..Default::default()
        }
    }

    /// The requests so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// The requests, once there are at least `n` (background senders).
    pub async fn wait_for(&self, n: usize) -> Vec<Seen> {
        loop {
            let arrived = self.arrived.notified();
            let seen = self.seen();
            if seen.len() >= n {
                return seen;
            }
            tokio::time::timeout(Duration::from_secs(30), arrived)
                .await
                .expect("requests never arrived");
        }
    }
}

impl Backends for FakeBackends {
    async fn send(
        &self,
        _model: &MeshModel,
        _source_ip: IpAddr,
        backend: &Backend,
        req: Request<upstream::Body>,
        tried: &[SocketAddr],
    ) -> Result<Sent, Failure> {
        let (parts, body) = req.into_parts();
        let body = body
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let endpoint = {
            let mut seen = self.seen.lock().unwrap();
            let n = seen.len() as u8 + 1;
            let endpoint = SocketAddr::from(([10, 1, 0, n], 8080));
            seen.push(Seen {
                backend: backend.name.clone(),
                path: parts.uri.path().to_string(),
                headers: parts.headers,
                body,
                tried: tried.to_vec(),
                endpoint,
            });
            endpoint
        };
        self.arrived.notify_waiters();
        let reply = self.replies.lock().unwrap().pop_front();
        match reply.unwrap_or(Reply::Status(200)) {
            Reply::Status(s) => {
                let mut response = Response::new(full("ok"));
                *response.status_mut() = http::StatusCode::from_u16(s).unwrap();
                Ok(Sent {
                    response,
                    endpoint,
                    workload: 1,
                })
            }
            Reply::Fail(kind) => Err(Failure {
                kind,
                reason: format!("fake {kind:?}"),
            }),
            Reply::Hang => std::future::pending().await,
        }
    }
}
