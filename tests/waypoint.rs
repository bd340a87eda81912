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
use mesh_core::identity::CaSource;
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
  - {{name: authz, namespace: shop, serviceAccount: authz, node: node-b, ips: ["{az}"], labels: {{app: authz}}}}
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
  - {{name: authz, namespace: shop, ports: [{{port: 8000}}, {{port: 9000}}, {{port: 9999}}], selector: {{app: authz}}}}
extensionProviders:
  - name: http-authz
    envoyExtAuthzHttp: {{service: authz.shop.svc.cluster.local, port: 8000, pathPrefix: /check, includeRequestHeadersInCheck: [x-user], headersToUpstreamOnAllow: [x-authz-user], headersToDownstreamOnDeny: [x-authz-reason]}}
  - name: grpc-authz
    envoyExtAuthzGrpc: {{service: authz.shop, port: 9000}}
  - name: down-authz
    envoyExtAuthzHttp: {{service: authz.shop, port: 9999, timeout: 500ms}}
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
        - matches: [{{path: {{type: PathPrefix, value: /moved}}}}]
          filters: [{{type: RequestRedirect, requestRedirect: {{hostname: example.com, statusCode: 301}}}}]
        - backendRefs: [{{name: web-v1, port: 80}}]
authorizationPolicies:
  - apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {{name: no-admin, namespace: shop}}
    spec:
      targetRefs: [{{kind: Service, group: "", name: web}}]
      action: DENY
      rules: [{{to: [{{operation: {{paths: ["/admin*"]}}}}]}}]
  - metadata: {{name: ext-http, namespace: shop}}
    spec:
      targetRefs: [{{kind: Service, name: web}}]
      action: CUSTOM
      provider: {{name: http-authz}}
      rules: [{{to: [{{operation: {{paths: ["/ext/*"]}}}}]}}]
  - metadata: {{name: ext-grpc, namespace: shop}}
    spec:
      targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}]
      action: CUSTOM
      provider: {{name: grpc-authz}}
      rules: [{{to: [{{operation: {{paths: ["/grpc-ext/*"]}}}}]}}]
  - metadata: {{name: ext-down, namespace: shop}}
    spec:
      targetRefs: [{{kind: Service, name: web}}]
      action: CUSTOM
      provider: {{name: down-authz}}
      rules: [{{to: [{{operation: {{paths: ["/down/*"]}}}}]}}]
"#,
        c = ip(1),
        v1 = ip(2),
        v2 = ip(3),
        sh = ip(4),
        az = ip(5),
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

    /// GET `path`; `None` when the connection fails instead of answering.
    async fn try_get(&mut self, path: &str) -> Option<u16> {
        let req = Request::builder()
            .uri(path)
            .header("host", "web.shop.svc.cluster.local")
            .body(Full::new(Bytes::new()))
            .ok()?;
        self.send.ready().await.ok()?;
        let resp = tokio::time::timeout(T, self.send.send_request(req))
            .await
            .ok()?
            .ok()?;
        Some(resp.status().as_u16())
    }
}

struct Setup {
    mesh: Mesh,
    wp: waypoint::WaypointHandle,
    v1: Arc<AtomicUsize>,
    shadow: Arc<AtomicUsize>,
}

async fn setup(waypoint_for: &str) -> Setup {
    setup_with(waypoint_for, |_| {}).await
}

async fn setup_with(waypoint_for: &str, tune: impl FnOnce(&mut waypoint::WaypointConfig)) -> Setup {
    let mesh = Mesh::start().await;
    let yaml = mesh_yaml(&mesh, waypoint_for);
    mesh.write_mesh(&yaml);
    let v1 = http_server(SocketAddr::new(mesh.ip(2), APP_PORT), "v1").await;
    let _v2 = http_server(SocketAddr::new(mesh.ip(3), APP_PORT), "v2").await;
    let shadow = http_server(SocketAddr::new(mesh.ip(4), APP_PORT), "shadow").await;
    authz_servers(&mesh).await;
    let mut cfg =
        waypoint::WaypointConfig::new("shop", "waypoint", "waypoint", mesh.mesh_file.clone());
    cfg.ca = CaSource::Files {
        cert: mesh.dir.0.join("root.pem"),
        key: mesh.dir.0.join("root-key.pem"),
        generate: false,
    };
    cfg.admin_addr = "127.0.0.1:0".parse().unwrap();
    cfg.reload_interval = Duration::from_millis(100);
    cfg.header_timeout = Duration::from_secs(1);
    tune(&mut cfg);
    let wp = waypoint::start(cfg).await.expect("waypoint starts");
    // Both agents must have picked up the new file (agent B now serves
    // web-v1/v2 and shadow).
    let ready = eventually(T, || {
        let a = mesh.a.ctx.model();
        let b = mesh.b.ctx.model();
        a.gateways.len() == 1 && b.workloads.len() == 6
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

    // Redirect, answered by the waypoint itself.
    let (st, _, h) = c.get("/moved/x?a=1", &[]).await;
    assert_eq!(st, 301);
    assert_eq!(h["location"], "http://example.com/moved/x?a=1");

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

/// The external authorizers on `.5`: HTTP on 8000 and Envoy's gRPC Check on
/// 9000. Both allow `x-user: alice` (adding `x-authz-user`) and deny
/// anyone else with 401 and a reason header.
async fn authz_servers(mesh: &Mesh) {
    use hyper::body::Frame;
    use waypoint::extauthz::proto;
    let http_l = TcpListener::bind(SocketAddr::new(mesh.ip(5), 8000))
        .await
        .unwrap();
    let grpc_l = TcpListener::bind(SocketAddr::new(mesh.ip(5), 9000))
        .await
        .unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = http_l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                        let user = req
                            .headers()
                            .get("x-user")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("");
                        assert!(req.uri().path().starts_with("/check/ext/"), "{}", req.uri());
                        let r = if user == "alice" {
                            http::Response::builder()
                                .header("x-authz-user", "alice")
                                .body(Full::new(Bytes::new()))
                        } else {
                            http::Response::builder()
                                .status(401)
                                .header("x-authz-reason", "not alice")
                                .body(Full::new(Bytes::from("who are you?")))
                        };
                        Ok::<_, std::convert::Infallible>(r.unwrap())
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = grpc_l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                        assert_eq!(req.uri().path(), proto::CHECK_PATH);
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let check: proto::CheckRequest =
                            waypoint::extauthz::grpc_unframe(&body).unwrap();
                        let attrs = check.attributes.unwrap();
                        let http_req = attrs.request.unwrap().http.unwrap();
                        let principal = attrs.source.unwrap().principal;
                        let allow = http_req.headers.get("x-user").map(String::as_str)
                            == Some("alice")
                            && principal == "spiffe://cluster.local/ns/shop/sa/client";
                        let answer = if allow {
                            proto::CheckResponse {
                                status: Some(proto::RpcStatus {
                                    code: 0,
                                    message: String::new(),
                                }),
                                ok_response: Some(proto::OkHttpResponse {
                                    headers: vec![proto::HeaderValueOption {
                                        header: Some(proto::HeaderValue {
                                            key: "x-authz-user".into(),
                                            value: "alice-grpc".into(),
                                        }),
                                    }],
                                }),
                                denied_response: None,
                            }
                        } else {
                            proto::CheckResponse {
                                status: Some(proto::RpcStatus {
                                    code: 7,
                                    message: "permission denied".into(),
                                }),
                                denied_response: Some(proto::DeniedHttpResponse {
                                    status: Some(proto::HttpStatus { code: 401 }),
                                    headers: vec![],
                                    body: "grpc says no".into(),
                                }),
                                ok_response: None,
                            }
                        };
                        use prost::Message;
                        let mut framed = vec![0u8];
                        framed.extend_from_slice(&(answer.encoded_len() as u32).to_be_bytes());
                        answer.encode(&mut framed).unwrap();
                        let mut trailers = http::HeaderMap::new();
                        trailers.insert("grpc-status", "0".parse().unwrap());
                        let frames = vec![
                            Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(framed))),
                            Ok(Frame::trailers(trailers)),
                        ];
                        let body = http_body_util::StreamBody::new(futures::stream::iter(frames));
                        let r = http::Response::builder()
                            .header("content-type", "application/grpc")
                            .body(body)
                            .unwrap();
                        Ok::<_, std::convert::Infallible>(r)
                    });
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
            });
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_policies_ask_external_authorizers_and_fail_closed() {
    let s = setup("service").await;
    let mut c = Client::new(&s.mesh).await;
    // HTTP authorizer: alice passes, with the authorizer's header upstream.
    let (st, body, _) = c.get("/ext/page", &[("x-user", "alice")]).await;
    assert_eq!((st, body.trim()), (200, "v1 GET /ext/page -"));
    let (st, body, h) = c.get("/ext/page", &[("x-user", "mallory")]).await;
    assert_eq!((st, body.as_str()), (401, "who are you?"));
    assert_eq!(h["x-authz-reason"], "not alice");
    // gRPC authorizer (Envoy's Check API), attached to the waypoint.
    let (st, _, _) = c.get("/grpc-ext/x", &[("x-user", "alice")]).await;
    assert_eq!(st, 200);
    let (st, body, _) = c.get("/grpc-ext/x", &[("x-user", "bob")]).await;
    assert_eq!((st, body.as_str()), (401, "grpc says no"));
    // Nobody listens behind the third provider: denied, not let through.
    let (st, _, _) = c.get("/down/x", &[("x-user", "alice")]).await;
    assert_eq!(st, 403);
    // Paths no CUSTOM policy covers never reach an authorizer.
    assert_eq!(c.get("/free", &[]).await.0, 200);
    let (_, text) = http_get(s.wp.admin_addr, "/stats/prometheus").await;
    assert_eq!(
        metric(&text, "istio_requests_total", &[r#"response_flags="UAEX""#]),
        3,
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_clients_and_upstreams_get_a_status_and_others_are_served() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = setup("service").await;
    let vip = SocketAddr::new(s.mesh.ip(10), 80);
    let read_all = |mut tcp: tokio::net::TcpStream| async move {
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(T, tcp.read_to_end(&mut buf)).await;
        String::from_utf8_lossy(&buf).to_string()
    };

    // Oversized headers: 431.
    let mut big = s.mesh.connect(vip).await.unwrap();
    let huge = "x".repeat(100 * 1024);
    big.write_all(format!("GET / HTTP/1.1\r\nhost: web\r\nx-big: {huge}\r\n\r\n").as_bytes())
        .await
        .ok();
    let answer = read_all(big).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:.80}");

    // Slowloris: headers that never end are cut off after the header timeout.
    let mut slow = s.mesh.connect(vip).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nhost: web\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    // Meanwhile a well-behaved client is served.
    let mut c = Client::new(&s.mesh).await;
    assert_eq!(c.get("/ok", &[]).await.0, 200);
    let _ = read_all(slow).await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "slow client held on for {:?}",
        started.elapsed()
    );

    // A malformed frame after the HTTP/2 preface (SETTINGS whose length is
    // not a multiple of 6): the connection is closed.
    let mut junk = s.mesh.connect(vip).await.unwrap();
    junk.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x05\x04\x00\x00\x00\x00\x00junk!")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let _ = read_all(junk).await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "malformed HTTP/2 held on for {:?}",
        started.elapsed()
    );

    // An upstream that drops the connection: 503 with flag UC, not a hang.
    // (A fresh client: the header timeout also ends idle keep-alives.)
    let mut c = Client::new(&s.mesh).await;
    let (st, _, _) = c.get("/reset", &[]).await;
    assert_eq!(st, 503);
    assert_eq!(c.get("/ok", &[]).await.0, 200);
    let (_, text) = http_get(s.wp.admin_addr, "/stats/prometheus").await;
    assert_eq!(
        metric(
            &text,
            "istio_requests_total",
            &[r#"response_code="503""#, r#"response_flags="UC""#]
        ),
        1,
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_spans_are_exported_over_otlp_in_the_callers_trace() {
    // A collector: stores every OTLP/HTTP JSON body it is sent.
    let collector = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", collector.local_addr().unwrap());
    let bodies = Arc::new(std::sync::Mutex::new(Vec::<serde_json::Value>::new()));
    let store = bodies.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = collector.accept().await else {
                return;
            };
            let store = store.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let store = store.clone();
                    async move {
                        assert_eq!(req.uri().path(), "/v1/traces");
                        let b = req.into_body().collect().await.unwrap().to_bytes();
                        store
                            .lock()
                            .unwrap()
                            .push(serde_json::from_slice(&b).unwrap());
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            Bytes::new(),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    let s = setup_with("service", |c| c.otlp_endpoint = Some(endpoint)).await;
    let mut c = Client::new(&s.mesh).await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    let (st, _, _) = c
        .get(
            "/traced",
            &[("traceparent", &format!("00-{trace}-{parent}-01"))],
        )
        .await;
    assert_eq!(st, 200);
    let found = eventually(T, || {
        bodies
            .lock()
            .unwrap()
            .iter()
            .any(|b| b.to_string().contains(trace))
    })
    .await;
    assert!(found, "no span exported");
    let all = bodies.lock().unwrap().clone();
    let span = all
        .iter()
        .flat_map(|b| {
            b["resourceSpans"][0]["scopeSpans"][0]["spans"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .find(|sp| sp["traceId"] == trace)
        .unwrap();
    assert_eq!(span["parentSpanId"], parent);
    assert_eq!(span["spanId"].as_str().unwrap().len(), 16);
    assert_ne!(span["spanId"], parent);
    assert!(span.to_string().contains("\"url.path\""), "{span}");
    assert_eq!(
        all[0]["resourceSpans"][0]["resource"]["attributes"][0]["value"]["stringValue"],
        "waypoint.shop"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_http2_keeps_its_status_and_is_counted_as_grpc() {
    let s = setup("service").await;
    let tcp = s
        .mesh
        .connect(SocketAddr::new(s.mesh.ip(10), 80))
        .await
        .unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    for (method, want) in [("Say", "0"), ("Fail", "14")] {
        let req = Request::post(format!(
            "http://web.shop.svc.cluster.local/echo.Echo/{method}"
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
        .unwrap();
        let resp = tokio::time::timeout(T, send.send_request(req))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap();
        let trailers = body.trailers().cloned().unwrap_or_default();
        assert_eq!(trailers["grpc-status"], want, "{method}");
    }
    let (_, text) = http_get(s.wp.admin_addr, "/stats/prometheus").await;
    for code in ["0", "14"] {
        let label = format!("grpc_response_status=\"{code}\"");
        assert_eq!(
            metric(
                &text,
                "istio_requests_total",
                &[r#"request_protocol="grpc""#, &label]
            ),
            1,
            "{text}"
        );
    }
}

/// Graceful shutdown of the waypoint (a rolling update of its Deployment):
/// readiness turns 503, the request in flight gets its answer, then its
/// HTTP connection ends (`connection: close`) instead of being cut, and the
/// drain is over as soon as the last tunnel is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_waypoint_answers_requests_in_flight_then_closes() {
    let s = setup("service").await;
    let mut client = Client::new(&s.mesh).await;
    assert_eq!(client.get("/ok", &[]).await.0, 200);
    assert_eq!(http_get(s.wp.admin_addr, "/healthz/ready").await.0, 200);
    let in_flight = tokio::spawn(async move {
        let answer = client.get("/linger", &[]).await;
        (answer, client)
    });
    // The request has reached the backend (which takes 2 s).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let drain = s.wp.drain(Duration::from_secs(600));
    let body = async {
        assert!(eventually(T, || s.wp.ctx.is_shutting_down()).await);
        assert_eq!(http_get(s.wp.admin_addr, "/healthz/ready").await.0, 503);
        let ((status, body, headers), mut client) = in_flight.await.unwrap();
        assert_eq!(status, 200);
        assert!(body.starts_with("v1 GET /linger"), "{body}");
        assert_eq!(
            headers.get("connection").and_then(|v| v.to_str().ok()),
            Some("close")
        );
        assert_eq!(client.try_get("/ok").await, None, "the connection lived on");
    };
    assert_eq!(drain_alongside(T, drain, body).await, 0);
}

/// The waypoint's kept-alive upstream connections (each a tunnel through
/// the endpoint's agent) close once unused for the idle timeout, so a
/// draining agent is not held up by tunnels nobody uses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_upstream_connections_are_closed() {
    let s = setup("service").await;
    let mut client = Client::new(&s.mesh).await;
    assert_eq!(client.get("/ok", &[]).await.0, 200);
    drop(client);
    let (b, name) = (s.mesh.b.metrics_addr, "istio_tcp_connections_closed_total");
    let from_waypoint = [r#"source_principal="spiffe://cluster.local/ns/shop/sa/waypoint""#];
    // Kept for reuse at first…
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(scrape(b, name, &from_waypoint).await, 0);
    // …closed after the idle timeout.
    let limit = waypoint::upstream::IDLE_TIMEOUT + Duration::from_secs(10);
    let n = wait_for_metric(limit, b, name, &from_waypoint, 1).await;
    let (_, text) = http_get(s.mesh.b.metrics_addr, "/metrics").await;
    assert_eq!(n, 1, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_beyond_the_waypoints_limit_are_refused_and_service_resumes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // One HBONE connection from agent A plus two tunnels.
    let s = setup_with("service", |c| {
        c.limits = mesh_core::limits::ConnectionLimits {
            max_connections: 3,
            ..Default::default()
        };
    })
    .await;
    let mut first = Client::new(&s.mesh).await;
    assert_eq!(first.get("/ok", &[]).await.0, 200);
    let mut second = Client::new(&s.mesh).await;
    assert_eq!(second.get("/ok", &[]).await.0, 200);
    // A third tunnel is refused (503 to agent A, which resets the client).
    let refused = match s.mesh.connect(SocketAddr::new(s.mesh.ip(10), 80)).await {
        Err(_) => true,
        Ok(mut tcp) => {
            let _ = tcp
                .write_all(b"GET /ok HTTP/1.1\r\nhost: web\r\n\r\n")
                .await;
            let mut buf = Vec::new();
            let r = tokio::time::timeout(T, tcp.read_to_end(&mut buf))
                .await
                .expect("closed, not hung");
            r.is_err() || buf.is_empty()
        }
    };
    assert!(refused, "a tunnel beyond the limit was served");
    let (_, text) = http_get(s.wp.admin_addr, "/stats/prometheus").await;
    assert_eq!(
        metric(
            &text,
            "sluice_waypoint_refused_tunnels_total",
            &[r#"reason="connection_limit""#]
        ),
        1,
        "{text}"
    );
    // The two served go on; when one ends its slot comes back.
    assert_eq!(second.get("/ok", &[]).await.0, 200);
    drop(first);
    let vip = SocketAddr::new(s.mesh.ip(10), 80);
    let ok = async {
        loop {
            // Until the slot is back, agent A's connection is reset (maybe
            // before connect() returns).
            if let Ok(tcp) = s.mesh.connect(vip).await {
                if let Ok((send, conn)) =
                    hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await
                {
                    tokio::spawn(conn);
                    if (Client { send }).try_get("/ok").await == Some(200) {
                        return;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(T, ok).await.expect("served again");
}
