//! Test harness: a two-node mesh on loopback addresses. Each test gets its
//! own 127.x.y.0/24 block (so tests run in parallel without port clashes),
//! a temporary directory with a mesh file and a shared root CA, and two
//! in-process agents. Everything is removed when the harness is dropped,
//! also when the test fails.

pub mod cluster;
pub mod kube;
pub mod loadgen;
pub mod netns;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use node_agent::orig_dst::ExplicitMappings;
use node_agent::{AgentConfig, AgentHandle, CaSource};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

static NEXT_BLOCK: AtomicU8 = AtomicU8::new(1);

/// A unique /24 on loopback for one test.
pub fn ip_block() -> [u8; 3] {
    let second = 64 + (std::process::id() % 128) as u8;
    [127, second, NEXT_BLOCK.fetch_add(1, Ordering::Relaxed)]
}

/// The address `.host` in a block.
pub fn ip(block: [u8; 3], host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(block[0], block[1], block[2], host))
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A fresh directory, unique within this process and across processes.
    pub fn new(tag: &str) -> Self {
        static NEXT_DIR: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT_DIR.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("sluice-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Route test logs through the test harness's capture (RUST_LOG to see them).
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Two agents (node-a, node-b) on loopback with a mesh file they both read.
///
/// Addresses in the block: .1 `client` (node-a), .2 `server` (node-b),
/// .3 `server2` (node-b), .4 `client2` on node-a, .10 the `echo` service VIP,
/// .200 a host outside the mesh.
pub struct Mesh {
    pub block: [u8; 3],
    pub dir: TempDir,
    pub mesh_file: PathBuf,
    pub a: AgentHandle,
    pub b: AgentHandle,
    /// Agent A's capture records: tests register where a client connects.
    pub redirects: Arc<ExplicitMappings>,
}

pub const APP_PORT: u16 = 8080;

pub fn mesh_yaml(block: [u8; 3], extra_workloads: &str) -> String {
    let ip = |h| ip(block, h);
    format!(
        r#"
trustDomain: cluster.local
nodes:
  - name: node-a
  - name: node-b
workloads:
  - {{name: client, namespace: shop, serviceAccount: client, node: node-a, ips: ["{c}"], labels: {{app: client}}}}
  - {{name: server, namespace: shop, serviceAccount: server, node: node-b, ips: ["{s}"], labels: {{app: echo, version: v1}}}}
  - {{name: server2, namespace: shop, serviceAccount: server, node: node-b, ips: ["{s2}"], labels: {{app: other}}}}
{extra_workloads}
services:
  - name: echo
    namespace: shop
    vips: ["{vip}"]
    ports: [{{port: 80, targetPort: {APP_PORT}}}]
    selector: {{app: echo}}
"#,
        c = ip(1),
        s = ip(2),
        s2 = ip(3),
        vip = ip(10),
    )
}

impl Mesh {
    pub async fn start() -> Mesh {
        Self::start_with(|_| {}).await
    }

    /// Start with a hook to adjust both agents' configuration.
    pub async fn start_with(tune: impl Fn(&mut AgentConfig)) -> Mesh {
        init_logs();
        let block = ip_block();
        let dir = TempDir::new("mesh");
        let mesh_file = dir.0.join("mesh.yaml");
        std::fs::write(&mesh_file, mesh_yaml(block, "")).unwrap();
        let ca = CaSource::Files {
            cert: dir.0.join("root.pem"),
            key: dir.0.join("root-key.pem"),
            generate: true,
        };
        let cfg = |node: &str| {
            let mut c = AgentConfig::new(node, mesh_file.clone());
            c.ca = ca.clone();
            c.reload_interval = Duration::from_millis(100);
            let local: SocketAddr = "127.0.0.1:0".parse().unwrap();
            c.admin_addr = local;
            c.metrics_addr = local;
            c.readiness_addr = local;
            tune(&mut c);
            c
        };
        let redirects = Arc::new(ExplicitMappings::default());
        let a = node_agent::start(cfg("node-a"), redirects.clone())
            .await
            .expect("agent A starts");
        let b = node_agent::start(cfg("node-b"), Arc::new(ExplicitMappings::default()))
            .await
            .expect("agent B starts");
        tokio::time::timeout(Duration::from_secs(20), async {
            a.wait_ready().await;
            b.wait_ready().await;
        })
        .await
        .expect("agents ready");
        Mesh {
            block,
            dir,
            mesh_file,
            a,
            b,
            redirects,
        }
    }

    pub fn ip(&self, host: u8) -> IpAddr {
        ip(self.block, host)
    }

    /// Connect as workload `from` (a host number in the block, on node A) to
    /// `dst`, the way a captured application connection reaches agent A.
    pub async fn connect_from(&self, from: u8, dst: SocketAddr) -> std::io::Result<TcpStream> {
        let sock = TcpSocket::new_v4()?;
        sock.bind(SocketAddr::new(self.ip(from), 0))?;
        let me = sock.local_addr()?;
        self.redirects.insert(me, dst);
        let r = sock
            .connect(SocketAddr::new(self.ip(from), self.a.ctx.cfg.outbound_port))
            .await;
        if r.is_err() {
            self.redirects.remove(&me);
        }
        r
    }

    /// Connect as `client` (.1).
    pub async fn connect(&self, dst: SocketAddr) -> std::io::Result<TcpStream> {
        self.connect_from(1, dst).await
    }

    pub fn server_addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip(2), APP_PORT)
    }

    /// Rewrite the mesh file (agents pick it up within a reload interval).
    pub fn write_mesh(&self, yaml: &str) {
        write_atomic(&self.mesh_file, yaml);
    }
}

/// Replace a file atomically so a reader never sees half of it.
pub fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// An echo server: sends back everything it reads, then closes its write
/// side when the client closes its own.
pub async fn echo_server(addr: SocketAddr) -> tokio::task::JoinHandle<()> {
    let l = TcpListener::bind(addr)
        .await
        .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    })
}

/// Send `data`, half-close, and read everything back, concurrently (so large
/// payloads do not deadlock on flow control).
pub async fn round_trip(s: TcpStream, data: Arc<Vec<u8>>) -> std::io::Result<Vec<u8>> {
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        w.write_all(&data).await?;
        w.shutdown().await?;
        Ok::<_, std::io::Error>(w)
    });
    let mut back = Vec::new();
    r.read_to_end(&mut back).await?;
    let _w = writer.await.expect("writer task")?;
    Ok(back)
}

/// Deterministic pseudo-random bytes.
pub fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407)
        | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// GET a path over HTTP/1.1 and return (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The value of the first metric line starting with `name{` whose labels
/// contain all of `labels`, or 0.
pub fn metric(text: &str, name: &str, labels: &[&str]) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// Poll an async counter until it reaches `want` or `limit` passes; its
/// last value. (Agents count a connection just after its client saw the
/// end of it.)
pub async fn wait_for_count<F, Fut>(limit: Duration, want: u64, mut count: F) -> u64
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = u64>,
{
    let deadline = tokio::time::Instant::now() + limit;
    let mut got = count().await;
    while got < want && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(25)).await;
        got = count().await;
    }
    got
}

/// The sum of metric `name` (with `labels`) scraped from `addr`.
pub async fn scrape(addr: SocketAddr, name: &str, labels: &[&str]) -> u64 {
    let (_, body) = http_get(addr, "/metrics").await;
    metric(&body, name, labels)
}

/// Poll metric `name` (with `labels`) at `addr` until it reaches `want`
/// or `limit` passes; its last value.
pub async fn wait_for_metric(
    limit: Duration,
    addr: SocketAddr,
    name: &str,
    labels: &[&str],
    want: u64,
) -> u64 {
    wait_for_count(limit, want, || scrape(addr, name, labels)).await
}

/// Run a graceful `drain` alongside `body` (which ends the connections the
/// drain waits for); what the drain left open. Panics unless both finish
/// within `limit`.
pub async fn drain_alongside(
    limit: Duration,
    drain: impl std::future::Future<Output = usize>,
    body: impl std::future::Future<Output = ()>,
) -> usize {
    let (left, ()) = tokio::time::timeout(limit, async { tokio::join!(drain, body) })
        .await
        .expect("the drain ends when its last connection does");
    left
}

/// Poll `f` until it returns true or `limit` passes.
pub async fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    f()
}

/// A raw HBONE client with whatever certificate the test gives it.
pub async fn raw_hbone(
    addr: SocketAddr,
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
    roots: Arc<rustls::RootCertStore>,
    expect: mesh_core::identity::SpiffeId,
    authority: SocketAddr,
) -> Result<http::StatusCode, String> {
    let cfg = mesh_core::identity::verify::client_config(chain, key, roots, expect)
        .map_err(|e| e.to_string())?;
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(
            rustls::pki_types::ServerName::IpAddress(addr.ip().into()),
            tcp,
        )
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, conn) = h2::client::handshake(tls)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method("CONNECT")
        .uri(authority.to_string())
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .body(())
        .unwrap();
    let (resp, _stream) = send.send_request(req, false).map_err(|e| e.to_string())?;
    let resp = resp.await.map_err(|e| e.to_string())?;
    Ok(resp.status())
}

pub fn issue(
    ca: &mesh_core::identity::CertificateAuthority,
    id: &mesh_core::identity::SpiffeId,
) -> (
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
) {
    let (key, csr) = mesh_core::identity::ca::new_key_and_csr(id).unwrap();
    let cert = ca.sign(&csr, id, Duration::from_secs(3600)).unwrap();
    (
        vec![cert],
        rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
    )
}

/// A test HTTP server (HTTP/1.1 and HTTP/2 prior knowledge) answering
/// `<name> <method> <path> <x-added header>` — or, asked with
/// `x-echo: json`, a JSON object of the request as it arrived (`name`,
/// `method`, `path` with the query, `host`, `headers` by lowercase name),
/// what the Gateway API conformance suite's echo server tells; `/flaky` fails every other
/// request with 503, `/slow` and `/linger` take 2 s, `/reset` drops the
/// connection;
/// gRPC requests get an empty message and status 0 (14 for `…/Fail`).
/// Returns its request counter.
pub fn serve_http(l: TcpListener, name: &'static str) -> Arc<std::sync::atomic::AtomicUsize> {
    use http_body_util::{BodyExt, Full};
    use hyper::body::Frame;
    use std::convert::Infallible;
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c = count.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                return;
            };
            let c = c.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: http::Request<hyper::body::Incoming>| {
                        let n = c.fetch_add(1, Ordering::SeqCst);
                        async move {
                            let path = req.uri().path().to_string();
                            let added = req
                                .headers()
                                .get("x-added")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("-")
                                .to_string();
                            let mut status = http::StatusCode::OK;
                            if path.starts_with("/flaky") && n.is_multiple_of(2) {
                                status = http::StatusCode::SERVICE_UNAVAILABLE;
                            }
                            if path.starts_with("/slow") || path.starts_with("/linger") {
                                tokio::time::sleep(Duration::from_secs(2)).await;
                            }
                            if path.starts_with("/reset") {
                                // Fails the connection without an answer.
                                return Err(std::io::Error::other("reset as asked"));
                            }
                            let grpc = req
                                .headers()
                                .get("content-type")
                                .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
                            if grpc {
                                // A unary gRPC answer: an empty message, the
                                // status in the trailers (14 for `/Fail`).
                                let code = if path.ends_with("/Fail") { "14" } else { "0" };
                                let mut trailers = http::HeaderMap::new();
                                trailers.insert("grpc-status", code.parse().unwrap());
                                let frames = vec![
                                    Ok::<_, Infallible>(Frame::data(bytes::Bytes::from_static(&[
                                        0, 0, 0, 0, 0,
                                    ]))),
                                    Ok(Frame::trailers(trailers)),
                                ];
                                let body =
                                    http_body_util::StreamBody::new(futures::stream::iter(frames));
                                let mut r = http::Response::new(body.boxed());
                                r.headers_mut()
                                    .insert("content-type", "application/grpc".parse().unwrap());
                                return Ok(r);
                            }
                            let body = if req.headers().get("x-echo").is_some_and(|v| v == "json") {
                                let mut headers: std::collections::BTreeMap<String, Vec<String>> =
                                    Default::default();
                                for (k, v) in req.headers() {
                                    headers
                                        .entry(k.as_str().to_string())
                                        .or_default()
                                        .push(String::from_utf8_lossy(v.as_bytes()).into());
                                }
                                let host = req
                                    .headers()
                                    .get("host")
                                    .map(|h| String::from_utf8_lossy(h.as_bytes()).to_string())
                                    .or_else(|| req.uri().authority().map(|a| a.to_string()))
                                    .unwrap_or_default();
                                serde_json::json!({
                                    "name": name,
                                    "method": req.method().as_str(),
                                    "path": req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/"),
                                    "host": host,
                                    "headers": headers,
                                })
                                .to_string()
                                    + "\n"
                            } else {
                                format!("{name} {} {path} {added}\n", req.method())
                            };
                            let mut r =
                                http::Response::new(Full::new(bytes::Bytes::from(body)).boxed());
                            *r.status_mut() = status;
                            Ok::<_, std::io::Error>(r)
                        }
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                .await;
            });
        }
    });
    count
}
