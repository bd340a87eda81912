//! The waypoint on loopback, with real agents on both sides: a client on
//! node A → agent A → waypoint → agent B → two versions of a service on
//! node B. Routing (headers, weighted split), faults, retries, timeouts,
//! mirroring, L7 deny and rate limiting, each checked through the whole
//! path; plus the destination refusing tunnels that bypass a waypoint.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use mesh_core::identity::ca::CaSource;
use sluice_tests::*;
use tokio::net::TcpListener;

const T: Duration = Duration::from_secs(20);

/// The mesh: `.1` client (node A), `.2` web-v1 and `.3` web-v2 (node B),
/// `.4` shadow (node B), `.20` the waypoint pod (node A, not captured).
/// Service `web` (.10) and the per-version services use waypoint
/// `shop/waypoint` through the namespace label.
fn mesh_yaml(m: &Mesh, waypoint_for: &str) -> String {
    let ip = |h| m.ip(h);
    format!(
        r#"
trustDomain: cluster.local
nodes: [{{name: node-a}}, {{name: node-b}}]
namespaces:
  - name: shop
    labels: {{istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}
workloads:
  - {{name: client, namespace: shop, serviceAccount: client, node: node-a, ips: ["{c}"], labels: {{app: client}}}}
  - {{name: web-v1, namespace: shop, serviceAccount: web, node: node-b, ips: ["{v1}"], labels: {{app: web, version: v1}}}}
  - {{name: web-v2, namespace: shop, serviceAccount: web, node: node-b, ips: ["{v2}"], labels: {{app: web, version: v2}}}}
  - {{name: shadow, namespace: shop, serviceAccount: shadow, node: node-b, ips: ["{sh}"], labels: {{app: shadow}}}}
  - name: waypoint
    namespace: shop
    serviceAccount: waypoint
    node: node-a
    ips: ["{wp}"]
    labels: {{gateway.networking.k8s.io/gateway-name: waypoint, istio.io/dataplane-mode: none}}
services:
  - {{name: web, namespace: shop, vips: ["{vip}"], ports: [{{port: 80, targetPort: 8080}}], selector: {{app: web}}}}
  - {{name: web-v1, namespace: shop, ports: [{{port: 80, targetPort: 8080}}], selector: {{app: web, version: v1}}}}
  - {{name: web-v2, namespace: shop, ports: [{{port: 80, targetPort: 8080}}], selector: {{app: web, version: v2}}}}
  - {{name: shadow, namespace: shop, ports: [{{port: 80, targetPort: 8080}}], selector: {{app: shadow}}}}
gateways:
  - apiVersion: gateway.networking.k8s.io/v1
    kind: Gateway
    metadata: {{name: waypoint, namespace: shop, labels: {{istio.io/waypoint-for: {waypoint_for}}}}}
    spec:
      gatewayClassName: istio-waypoint
      listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]
httpRoutes:
  - apiVersion: gateway.networking.k8s.io/v1
    kind: HTTPRoute
    metadata: {{name: web, namespace: shop}}
    spec:
      parentRefs: [{{group: "", kind: Service, name: web, port: 80}}]
      rules:
        - matches: [{{headers: [{{name: x-version, value: v2}}]}}]
          backendRefs: [{{name: web-v2, port: 80}}]
        - matches: [{{path: {{type: PathPrefix, value: /canary}}}}]
          backendRefs: [{{name: web-v1, port: 80, weight: 90}}, {{name: web-v2, port: 80, weight: 10}}]
        - matches: [{{path: {{type: PathPrefix, value: /fault}}}}]
          fault: {{abort: {{httpStatus: 418}}}}
        - matches: [{{path: {{type: PathPrefix, value: /flaky}}}}]
          backendRefs: [{{name: web-v1, port: 80}}]
          retry: {{attempts: 2, backoff: 5ms, retryOn: [5xx]}}
        - matches: [{{path: {{type: PathPrefix, value: /slow}}}}]
          backendRefs: [{{name: web-v1, port: 80}}]
          timeouts: {{request: 200ms}}
        - matches: [{{path: {{type: PathPrefix, value: /mirror}}}}]
          backendRefs: [{{name: web-v1, port: 80}}]
          filters: [{{type: RequestMirror, requestMirror: {{backendRef: {{name: shadow, port: 80}}}}}}]
        - matches: [{{path: {{type: PathPrefix, value: /limited}}}}]
          backendRefs: [{{name: web-v1, port: 80}}]
          rateLimit: {{requests: 2, interval: 1m}}
        - matches: [{{path: {{type: PathPrefix, value: /old}}}}]
          filters: [{{type: URLRewrite, urlRewrite: {{path: {{type: ReplacePrefixMatch, replacePrefixMatch: /new}}}}}}, {{type: RequestHeaderModifier, requestHeaderModifier: {{set: [{{name: x-added, value: "yes"}}]}}}}]
          backendRefs: [{{name: web-v1, port: 80}}]
        - backendRefs: [{{name: web-v1, port: 80}}]
authorizationPolicies:
  - apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {{name: no-admin, namespace: shop}}
    spec:
      targetRefs: [{{kind: Service, group: "", name: web}}]
      action: DENY
      rules: [{{to: [{{operation: {{paths: ["/admin*"]}}}}]}}]
"#,
        c = ip(1),
        v1 = ip(2),
        v2 = ip(3),
        sh = ip(4),
        wp = ip(20),
        vip = ip(10),
    )
}

async fn http_server(addr: SocketAddr, name: &'static str) -> Arc<AtomicUsize> {
    let l = TcpListener::bind(addr)
        .await
        .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    serve_http(l, name)
}

/// An HTTP/1.1 client on one captured connection from the client pod.
struct Client {
    send: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl Client {
    async fn new(mesh: &Mesh) -> Client {
        let tcp = mesh
            .connect(SocketAddr::new(mesh.ip(10), 80))
            .await
            .unwrap();
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        Client { send }
    }

    async fn get(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (u16, String, http::HeaderMap) {
        let mut req = Request::builder()
            .uri(path)
            .header("host", "web.shop.svc.cluster.local");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(Bytes::new())).unwrap();
        self.send.ready().await.unwrap();
        let resp = tokio::time::timeout(T, self.send.send_request(req))
            .await
            .expect("response in time")
            .unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).to_string(), headers)
    }
}

struct Setup {
    mesh: Mesh,
    wp: waypoint::WaypointHandle,
    v1: Arc<AtomicUsize>,
    shadow: Arc<AtomicUsize>,
}

async fn setup(waypoint_for: &str) -> Setup {
    let mesh = Mesh::start().await;
    let yaml = mesh_yaml(&mesh, waypoint_for);
    mesh.write_mesh(&yaml);
    let v1 = http_server(SocketAddr::new(mesh.ip(2), APP_PORT), "v1").await;
    let _v2 = http_server(SocketAddr::new(mesh.ip(3), APP_PORT), "v2").await;
    let shadow = http_server(SocketAddr::new(mesh.ip(4), APP_PORT), "shadow").await;
    let mut cfg =
        waypoint::WaypointConfig::new("shop", "waypoint", "waypoint", mesh.mesh_file.clone());
    cfg.ca = CaSource::Files {
        cert: mesh.dir.0.join("root.pem"),
        key: mesh.dir.0.join("root-key.pem"),
        generate: false,
    };
    cfg.admin_addr = "127.0.0.1:0".parse().unwrap();
    cfg.reload_interval = Duration::from_millis(100);
    let wp = waypoint::start(cfg).await.expect("waypoint starts");
    // Both agents must have picked up the new file (agent B now serves
    // web-v1/v2 and shadow).
    let ready = eventually(T, || {
        let a = mesh.a.ctx.model();
        let b = mesh.b.ctx.model();
        a.gateways.len() == 1 && b.workloads.len() == 5
    })
    .await;
    assert!(
        ready,
        "agents did not load the waypoint mesh file: A has {} gateways, B {} workloads",
        mesh.a.ctx.model().gateways.len(),
        mesh.b.ctx.model().workloads.len()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    Setup {
        mesh,
        wp,
        v1,
        shadow,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_faults_retries_timeouts_mirror_deny_and_rate_limit() {
    let s = setup("service").await;
    let mut c = Client::new(&s.mesh).await;

    // Default rule and header routing.
    let (st, body, _) = c.get("/hello", &[]).await;
    assert_eq!((st, body.trim()), (200, "v1 GET /hello -"));
    let (st, body, _) = c.get("/hello", &[("x-version", "v2")]).await;
    assert_eq!((st, body.trim()), (200, "v2 GET /hello -"));

    // Rewrite and header modifier.
    let (st, body, _) = c.get("/old/page", &[]).await;
    assert_eq!((st, body.trim()), (200, "v1 GET /new/page yes"));

    // Injected abort.
    let (st, _, _) = c.get("/fault", &[]).await;
    assert_eq!(st, 418);

    // The server fails every other /flaky request: a retry hides it.
    for _ in 0..4 {
        let (st, body, _) = c.get("/flaky", &[]).await;
        assert_eq!((st, body.trim()), (200, "v1 GET /flaky -"));
    }

    // Timeout: the server takes 2 s, the route allows 200 ms.
    let started = std::time::Instant::now();
    let (st, _, _) = c.get("/slow", &[]).await;
    assert_eq!(st, 504);
    assert!(started.elapsed() < Duration::from_secs(2));

    // Mirror: the shadow gets a copy, the caller the primary's answer.
    let (st, body, _) = c.get("/mirror", &[]).await;
    assert_eq!((st, body.trim()), (200, "v1 GET /mirror -"));
    assert!(eventually(T, || s.shadow.load(Ordering::SeqCst) == 1).await);

    // L7 deny.
    let (st, body, _) = c.get("/admin/users", &[]).await;
    assert_eq!(st, 403, "{body}");
    assert!(body.contains("RBAC: access denied"));

    // Rate limit: 2 per minute.
    assert_eq!(c.get("/limited", &[]).await.0, 200);
    assert_eq!(c.get("/limited", &[]).await.0, 200);
    let (st, _, h) = c.get("/limited", &[]).await;
    assert_eq!(st, 429);
    let retry_after: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=30).contains(&retry_after), "{retry_after}");

    // Istio's request metrics, reported by the waypoint.
    let (_, text) = http_get(s.wp.admin_addr, "/stats/prometheus").await;
    let svc = r#"destination_service="web.shop.svc.cluster.local""#;
    assert!(
        metric(
            &text,
            "istio_requests_total",
            &[
                svc,
                r#"response_code="200""#,
                r#"reporter="waypoint""#,
                r#"source_workload="client""#
            ]
        ) >= 8,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "istio_requests_total",
            &[svc, r#"response_code="403""#]
        ),
        1
    );
    assert_eq!(
        metric(
            &text,
            "istio_requests_total",
            &[svc, r#"response_code="429""#, r#"response_flags="RL""#]
        ),
        1
    );
    assert_eq!(
        metric(
            &text,
            "istio_requests_total",
            &[svc, r#"response_code="504""#, r#"response_flags="UT""#]
        ),
        1
    );
    assert!(
        text.contains("istio_request_duration_milliseconds_bucket"),
        "{text}"
    );
    assert!(s.v1.load(Ordering::SeqCst) >= 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ninety_ten_canary_split_holds_over_ten_thousand_requests() {
    let s = setup("service").await;
    let mut c = Client::new(&s.mesh).await;
    let n = 10_000;
    let mut v2 = 0;
    for _ in 0..n {
        let (st, body, _) = c.get("/canary", &[]).await;
        assert_eq!(st, 200);
        if body.starts_with("v2") {
            v2 += 1;
        }
    }
    // Binomial(10 000, 0.1): σ = 30; ±5σ.
    assert!((850..=1150).contains(&v2), "v2 got {v2} of {n}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_that_bypass_a_workload_waypoint_are_refused() {
    let s = setup("all").await;
    let ca = CaSource::Files {
        cert: s.mesh.dir.0.join("root.pem"),
        key: s.mesh.dir.0.join("root-key.pem"),
        generate: false,
    }
    .load("cluster.local")
    .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.root().clone()).unwrap();
    let roots = Arc::new(roots);
    let server_id = mesh_core::identity::SpiffeId::new("cluster.local", "shop", "web");
    let target = SocketAddr::new(s.mesh.ip(2), APP_PORT);
    let hbone = SocketAddr::new(s.mesh.ip(2), 15008);
    // The client's own identity, straight to the pod: refused.
    let client = mesh_core::identity::SpiffeId::new("cluster.local", "shop", "client");
    let (chain, key) = issue(&ca, &client);
    let st = raw_hbone(hbone, chain, key, roots.clone(), server_id.clone(), target)
        .await
        .unwrap();
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    // The waypoint's identity: accepted.
    let wp = mesh_core::identity::SpiffeId::new("cluster.local", "shop", "waypoint");
    let (chain, key) = issue(&ca, &wp);
    let st = raw_hbone(hbone, chain, key, roots, server_id, target)
        .await
        .unwrap();
    assert_eq!(st, StatusCode::OK);
    let (_, text) = http_get(s.mesh.b.metrics_addr, "/metrics").await;
    assert!(
        metric(
            &text,
            "sluice_connections_refused_total",
            &[r#"reason="waypoint_bypassed""#]
        ) >= 1,
        "{text}"
    );
    drop(s.wp);
}
