//! Criterion micro-benchmarks of the data path's hot spots: policy
//! evaluation, service endpoint selection, opening a CONNECT stream on a
//! warm HBONE pool, and bulk transfer through a tunnel (mutual TLS 1.3 +
//! HTTP/2 on loopback). Run with `cargo xtask bench`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use mesh_core::hbone::{server::serve_connection, ConnectRequest, HboneConnector, HboneSettings};
use mesh_core::identity::{CertificateAuthority, CertificateStore, LocalSigner, SpiffeId};
use mesh_core::model::MeshModel;
use mesh_core::policy::{authorize, ConnInfo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A model with `n` namespaces of workloads and a realistic policy mix.
fn model(n: usize) -> MeshModel {
    let mut y = String::from("nodes: [{name: n}]\nworkloads:\n");
    for i in 0..n {
        y.push_str(&format!(
            "  - {{name: w{i}, namespace: ns{i}, serviceAccount: sa{i}, node: n, ips: [\"10.{}.{}.1\"], labels: {{app: a{i}}}}}\n",
            i / 256,
            i % 256
        ));
    }
    y.push_str("services:\n  - {name: s, namespace: ns0, vips: [\"10.96.0.1\"], ports: [{port: 80, targetPort: 8080}], selector: {app: a0}}\n");
    y.push_str("authorizationPolicies:\n");
    y.push_str("  - metadata: {name: deny-bad, namespace: istio-system}\n    spec: {action: DENY, rules: [{from: [{source: {ipBlocks: [\"192.168.0.0/16\"]}}]}]}\n");
    for i in 0..n.min(20) {
        y.push_str(&format!(
            "  - metadata: {{name: allow-{i}, namespace: ns0}}\n    spec:\n      selector: {{matchLabels: {{app: a0}}}}\n      rules: [{{from: [{{source: {{principals: [\"cluster.local/ns/ns{i}/sa/*\"], namespaces: [ns{i}]}}}}], to: [{{operation: {{ports: [\"8080\"]}}}}]}}]\n"
        ));
    }
    MeshModel::from_yaml(&y, "bench").expect("bench model")
}

fn policy(c: &mut Criterion) {
    let m = model(100);
    let dst = m.workloads.iter().find(|w| w.name == "w0").unwrap();
    // The last ALLOW policy matches: the worst case for a permitted connection.
    let src = SpiffeId::new("cluster.local", "ns19", "sa19");
    let conn = ConnInfo {
        source_identity: Some(&src),
        source_ip: "10.0.19.1".parse().unwrap(),
        destination: dst,
        destination_ip: dst.ips[0],
        destination_port: 8080,
    };
    assert!(authorize(&m, &conn).allowed);
    c.bench_function("policy/authorize 21 policies, last ALLOW matches", |b| {
        b.iter(|| authorize(std::hint::black_box(&m), std::hint::black_box(&conn)))
    });
    let vip: SocketAddr = "10.96.0.1:80".parse().unwrap();
    c.bench_function("model/pick_endpoint VIP", |b| {
        b.iter(|| m.pick_endpoint(std::hint::black_box(vip)).map(|e| e.addr))
    });
}

/// An HBONE server on loopback that echoes each stream's bytes (an
/// in-process stand-in for the destination agent + application).
async fn hbone_setup() -> (HboneConnector, ConnectRequest) {
    let ca = Arc::new(CertificateAuthority::generate("cluster.local").unwrap());
    let root = ca.root().clone();
    let certs = CertificateStore::new(
        Arc::new(LocalSigner {
            ca,
            ttl: Duration::from_secs(3600),
        }),
        vec![root],
        "cluster.local",
    )
    .unwrap();
    let (src, dst) = (
        SpiffeId::new("cluster.local", "a", "client"),
        SpiffeId::new("cluster.local", "b", "server"),
    );
    let server_cert = certs.get(&dst).await.unwrap();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let settings = HboneSettings::default();
    let s2 = settings.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = l.accept().await.unwrap();
            // As the agents do: Nagle would hold small frames for an ACK.
            tcp.set_nodelay(true).unwrap();
            let cfg = server_cert.server_config();
            let s = s2.clone();
            tokio::spawn(async move {
                let tls = tokio_rustls::TlsAcceptor::from(cfg)
                    .accept(tcp)
                    .await
                    .unwrap();
                let _ = serve_connection(tls, &s, |stream| async move {
                    let Ok(mut h2) = stream.accept() else { return };
                    while let Some(Ok(chunk)) = h2.recv.data().await {
                        let n = chunk.len();
                        if n == 0 {
                            // Never echo an empty (final) frame as a
                            // non-final one: h2 treats those as abuse.
                            continue;
                        }
                        let _ = h2.recv.flow_control().release_capacity(n);
                        h2.send.reserve_capacity(n);
                        if h2.send.send_data(chunk, false).is_err() {
                            return;
                        }
                    }
                    let _ = h2.send.send_data(bytes::Bytes::new(), true);
                })
                .await;
            });
        }
    });
    let connector = HboneConnector::new(certs, settings);
    let req = ConnectRequest {
        source: src,
        destination_identity: dst,
        hbone_addr: addr,
        authority: "10.0.0.2:8080".parse().unwrap(),
        headers: http::HeaderMap::new(),
        origin: None,
    };
    (connector, req)
}

/// A TCP pair whose other end splices into a fresh tunnel; returns the
/// client end.
async fn tunnelled(connector: &HboneConnector, req: &ConnectRequest) -> TcpStream {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (accepted, _) = l.accept().await.unwrap();
    client.set_nodelay(true).unwrap();
    accepted.set_nodelay(true).unwrap();
    let stream = connector.connect(req).await.unwrap();
    tokio::spawn(async move {
        let counters = mesh_core::hbone::Transferred::default();
        let _ = stream.splice(accepted, &counters).await;
    });
    client
}

fn hbone(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (connector, req) = rt.block_on(hbone_setup());
    // Warm the pool.
    rt.block_on(async { drop(connector.connect(&req).await.unwrap()) });

    c.bench_function("hbone/open stream on warm pool + 1 KiB round trip", |b| {
        b.to_async(&rt).iter(|| async {
            let mut s = tunnelled(&connector, &req).await;
            let msg = [7u8; 1024];
            s.write_all(&msg).await.unwrap();
            let mut back = [0u8; 1024];
            s.read_exact(&mut back).await.unwrap();
        })
    });

    let mut g = c.benchmark_group("hbone/bulk through one tunnel");
    for size in [1usize << 20, 8 << 20] {
        g.throughput(Throughput::Bytes(2 * size as u64));
        g.sample_size(10);
        g.bench_with_input(
            BenchmarkId::from_parameter(format!("{} MiB each way", size >> 20)),
            &size,
            |b, &size| {
                b.to_async(&rt).iter(|| async {
                    let s = tunnelled(&connector, &req).await;
                    let (mut r, mut w) = s.into_split();
                    let writer = tokio::spawn(async move {
                        let chunk = vec![1u8; 64 * 1024];
                        for _ in 0..size / chunk.len() {
                            w.write_all(&chunk).await.unwrap();
                        }
                        w.shutdown().await.unwrap();
                    });
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut got = 0;
                    loop {
                        let n = r.read(&mut buf).await.unwrap();
                        if n == 0 {
                            break;
                        }
                        got += n;
                    }
                    writer.await.unwrap();
                    assert_eq!(got, size);
                })
            },
        );
    }
    g.finish();
}

/// A request on a tunnel that stays open (the benchmark's keep-alive
/// traffic): 1 KiB out and back through the splice, the pooled HTTP/2
/// connection and TLS, on each runtime flavour `--worker-threads` offers.
/// The client runs as a task of the same runtime, as a pod's traffic is
/// one more socket to the agent.
fn keep_alive(c: &mut Criterion) {
    let mut g = c.benchmark_group("hbone/1 KiB round trip on an open tunnel");
    for (name, workers) in [("single-threaded", 1), ("2 workers", 2)] {
        let rt = mesh_core::runtime::build(workers).unwrap();
        let (connector, req) = rt.block_on(hbone_setup());
        let mut client = Some(rt.block_on(tunnelled(&connector, &req)));
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut s = client.take().unwrap();
                let (s, took) = rt.block_on(async {
                    rt.spawn(async move {
                        let start = std::time::Instant::now();
                        for _ in 0..iters {
                            s.write_all(&[7u8; 1024]).await.unwrap();
                            let mut back = [0u8; 1024];
                            s.read_exact(&mut back).await.unwrap();
                        }
                        (s, start.elapsed())
                    })
                    .await
                    .unwrap()
                });
                client = Some(s);
                took
            })
        });
    }
    g.finish();
}

criterion_group!(benches, policy, hbone, keep_alive);
criterion_main!(benches);
