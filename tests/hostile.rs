//! When things go wrong, on loopback: connection floods and handshakes that
//! never finish meet the agent's limits (refused at once, counted, and
//! service resumes), a graceful drain lets established connections finish
//! while new ones fail closed, and a successor takes an agent's listeners
//! over without refusing or cutting any connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use node_agent::limits::ConnectionLimits;
use sluice_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(60);

/// Write `msg` and read the echo of it back, leaving the connection open.
async fn ping(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    s.write_all(msg).await?;
    let mut back = vec![0; msg.len()];
    s.read_exact(&mut back).await?;
    assert_eq!(back, msg);
    Ok(())
}

/// Close our side of `s` and see the peer close its side, nothing unread.
async fn end_cleanly(s: &mut TcpStream) {
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
}

/// True when the peer refused the connection `s` (reset or closed it)
/// instead of serving it.
async fn refused(s: std::io::Result<TcpStream>) -> bool {
    let Ok(mut s) = s else { return true };
    let _ = s.write_all(b"hello?").await;
    let mut buf = [0u8; 16];
    match tokio::time::timeout(T, s.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) => false,
        Err(_) => panic!("neither served nor refused"),
    }
}

async fn refusals(metrics: SocketAddr, direction: &str, reason: &str) -> u64 {
    let (_, body) = http_get(metrics, "/metrics").await;
    metric(
        &body,
        "sluice_connections_refused_total",
        &[
            &format!(r#"direction="{direction}""#),
            &format!(r#"reason="{reason}""#),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_flood_is_refused_at_the_limit_and_service_resumes() {
    let mesh = Mesh::start_with(|c| {
        if c.node == "node-a" {
            c.limits = ConnectionLimits {
                max_connections: 3,
                ..Default::default()
            };
        }
    })
    .await;
    let _echo = echo_server(mesh.server_addr()).await;
    let mut held = Vec::new();
    for i in 0..3u8 {
        let mut s = mesh.connect(mesh.server_addr()).await.unwrap();
        ping(&mut s, &[i; 8]).await.unwrap();
        held.push(s);
    }
    // The flood: every connection beyond the limit is reset, none queued.
    for _ in 0..20 {
        let s = mesh.connect(mesh.server_addr()).await;
        assert!(refused(s).await, "a connection beyond the limit was served");
    }
    assert_eq!(
        refusals(mesh.a.metrics_addr, "outbound", "connection_limit").await,
        20
    );
    // Those held keep working throughout.
    for (i, s) in held.iter_mut().enumerate() {
        ping(s, &[i as u8 + 100; 4]).await.unwrap();
    }
    // One ends; its slot comes back and a new connection is served.
    drop(held.pop());
    assert!(eventually(T, || mesh.a.ctx.limiter.active() == 2).await);
    let s = mesh.connect(mesh.server_addr()).await.unwrap();
    assert_eq!(
        round_trip(s, Arc::new(b"after".to_vec())).await.unwrap(),
        b"after"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_that_never_finish_are_bounded_and_time_out() {
    let mesh = Mesh::start_with(|c| {
        if c.node == "node-b" {
            c.limits = ConnectionLimits {
                max_pending_handshakes: 2,
                ..Default::default()
            };
            c.handshake_timeout = Duration::from_secs(1);
        }
    })
    .await;
    let _echo = echo_server(mesh.server_addr()).await;
    let hbone = SocketAddr::new(mesh.ip(2), 15008);
    // Two slowloris peers connect and say nothing: they hold both slots.
    let quiet1 = TcpStream::connect(hbone).await.unwrap();
    let quiet2 = TcpStream::connect(hbone).await.unwrap();
    assert!(eventually(T, || mesh.b.ctx.limiter.pending_handshakes() == 2).await);
    // A third is refused at once.
    let third = TcpStream::connect(hbone).await;
    assert!(refused(third).await, "a third pending handshake was served");
    assert_eq!(
        refusals(mesh.b.metrics_addr, "inbound", "handshake_limit").await,
        1
    );
    // The quiet ones are cut at the handshake timeout…
    for mut quiet in [quiet1, quiet2] {
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(T, quiet.read_to_end(&mut buf))
            .await
            .expect("closed, not held open");
    }
    let mut timed_out = 0;
    for _ in 0..100 {
        timed_out = refusals(mesh.b.metrics_addr, "inbound", "tls_handshake_timeout").await;
        if timed_out >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(timed_out >= 2, "handshake timeouts counted: {timed_out}");
    // …and real traffic gets through again.
    let s = mesh.connect(mesh.server_addr()).await.unwrap();
    assert_eq!(
        round_trip(s, Arc::new(b"served".to_vec())).await.unwrap(),
        b"served"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_drain_lets_established_connections_finish_and_fails_new_ones_closed() {
    let mesh = Mesh::start().await;
    let _echo = echo_server(mesh.server_addr()).await;
    let mut live = mesh.connect(mesh.server_addr()).await.unwrap();
    ping(&mut live, b"before").await.unwrap();
    assert_eq!(
        http_get(mesh.b.readiness_addr, "/healthz/ready").await.0,
        200
    );

    let drain = mesh.b.drain(Duration::from_secs(600));
    let body = async {
        assert!(eventually(T, || mesh.b.ctx.is_shutting_down()).await);
        // Kubernetes stops sending it new pods' traffic…
        assert_eq!(
            http_get(mesh.b.readiness_addr, "/healthz/ready").await.0,
            503
        );
        // New connections to the draining node fail; none reaches the app
        // around the mesh.
        let s = mesh.connect(mesh.server_addr()).await;
        assert!(
            refused(s).await,
            "a new connection was served while draining"
        );
        // The established one still carries bytes both ways.
        ping(&mut live, b"during").await.unwrap();
        // When it ends, the drain is over (well before its 10-minute limit).
        end_cleanly(&mut live).await;
    };
    assert_eq!(drain_alongside(T, drain, body).await, 0);
}

/// Hot restart: a second agent for node B takes B's listening sockets over
/// while traffic flows. No new connection is refused at any point, the
/// established one runs on through the old agent until it ends, then the
/// old agent's drain is over and the successor serves alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_takes_the_listeners_over_and_no_connection_is_refused_or_cut() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let sockets = TempDir::new("handover");
    let socket_dir = sockets.0.clone();
    let mesh = Mesh::start_with(move |c| {
        c.handover_socket = Some(socket_dir.join(format!("{}.sock", c.node)));
    })
    .await;
    let _echo = echo_server(mesh.server_addr()).await;
    let mut live = mesh.connect(mesh.server_addr()).await.unwrap();
    ping(&mut live, b"before").await.unwrap();

    // New connections all along: each must be served, whichever agent of
    // node B takes it.
    let stop = Arc::new(AtomicBool::new(false));
    let (served, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let traffic = async {
        let data = Arc::new(payload(512, 7));
        while !stop.load(Ordering::SeqCst) {
            let ok = match mesh.connect(mesh.server_addr()).await {
                Ok(s) => round_trip(s, data.clone()).await.ok().as_ref() == Some(&*data),
                Err(_) => false,
            };
            let n = if ok { &served } else { &failed };
            n.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let upgrade = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let successor = node_agent::start(
            mesh.b.ctx.cfg.clone(),
            Arc::new(node_agent::orig_dst::ExplicitMappings::default()),
        )
        .await
        .expect("the successor starts while the old agent still listens");
        tokio::time::timeout(T, successor.wait_ready())
            .await
            .expect("successor ready");
        tokio::time::timeout(T, mesh.b.handed_over())
            .await
            .expect("the old agent learns it was replaced");
        let drain = mesh.b.drain(Duration::from_secs(600));
        let body = async {
            // Readiness of the old one turns false; the established
            // connection still carries bytes both ways through it.
            assert!(eventually(T, || mesh.b.ctx.is_shutting_down()).await);
            let before = served.load(Ordering::SeqCst);
            assert!(
                eventually(T, || served.load(Ordering::SeqCst) > before + 20).await,
                "traffic stalled after the hand-over"
            );
            ping(&mut live, b"during").await.unwrap();
            end_cleanly(&mut live).await;
        };
        assert_eq!(drain_alongside(T, drain, body).await, 0);
        // The old agent is gone for good: the successor serves alone.
        let after = served.load(Ordering::SeqCst);
        assert!(
            eventually(T, || served.load(Ordering::SeqCst) > after + 20).await,
            "the successor does not serve alone"
        );
        stop.store(true, Ordering::SeqCst);
        successor
    };
    let ((), _successor) = tokio::time::timeout(T * 2, async { tokio::join!(traffic, upgrade) })
        .await
        .expect("hand-over finished");
    assert_eq!(
        failed.load(Ordering::SeqCst),
        0,
        "connections failed during the hand-over ({} served)",
        served.load(Ordering::SeqCst)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_reports_what_is_left_at_its_deadline() {
    let mesh = Mesh::start().await;
    let _echo = echo_server(mesh.server_addr()).await;
    let mut live = mesh.connect(mesh.server_addr()).await.unwrap();
    ping(&mut live, b"before").await.unwrap();
    let left = mesh.b.drain(Duration::from_millis(300)).await;
    // The inbound tunnel on B (and the HBONE connection carrying it); the
    // binary exits here, which cuts them.
    assert!(left >= 1, "left {left}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_foreign_certificates_and_tunnels_to_loopback_are_refused() {
    use mesh_core::identity::{ca::new_key_and_csr, CertificateAuthority, SpiffeId};
    let mesh = Mesh::start().await;
    let _echo = echo_server(mesh.server_addr()).await;
    let hbone = SocketAddr::new(mesh.ip(2), 15008);
    let (root, root_key) = (mesh.dir.0.join("root.pem"), mesh.dir.0.join("root-key.pem"));
    let real_ca = CertificateAuthority::load("cluster.local", &root, &root_key).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(real_ca.root().clone()).unwrap();
    let roots = Arc::new(roots);
    let server_id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/server".parse().unwrap();
    let client_id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/client".parse().unwrap();
    let tunnel =
        |chain, key, target| raw_hbone(hbone, chain, key, roots.clone(), server_id.clone(), target);
    let failed = || refusals(mesh.b.metrics_addr, "inbound", "tls_handshake_failed");

    // Signed by the real root, but expired an hour ago.
    let (key, csr) = new_key_and_csr(&client_id).unwrap();
    let now = time::OffsetDateTime::now_utc();
    let expired = real_ca
        .sign_with_validity(
            &csr,
            &client_id,
            now - time::Duration::hours(2),
            now - time::Duration::hours(1),
        )
        .unwrap();
    let before = failed().await;
    let key = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
    let r = tunnel(vec![expired], key, mesh.server_addr()).await;
    assert!(r.is_err(), "expired certificate got {r:?}");
    assert_eq!(wait_for_count(T, before + 1, failed).await, before + 1);

    // Signed by the real root key, for another trust domain.
    let foreign_ca = CertificateAuthority::load("evil.example", &root, &root_key).unwrap();
    let foreign_id: SpiffeId = "spiffe://evil.example/ns/shop/sa/client".parse().unwrap();
    let (chain, key) = issue(&foreign_ca, &foreign_id);
    let r = tunnel(chain, key, mesh.server_addr()).await;
    assert!(r.is_err(), "foreign trust domain got {r:?}");
    assert_eq!(wait_for_count(T, before + 2, failed).await, before + 2);

    // A valid identity asking for the server pod's loopback (an admin
    // port there) or the agent's own admin endpoint gets 400.
    let (chain, key) = issue(&real_ca, &client_id);
    for target in [
        SocketAddr::from(([127, 0, 0, 1], 15000)),
        SocketAddr::from(([127, 0, 0, 1], APP_PORT)),
        mesh.b.admin_addr,
    ] {
        assert_eq!(
            tunnel(chain.clone(), key.clone_key(), target).await,
            Ok(http::StatusCode::BAD_REQUEST),
            "tunnel to {target}"
        );
    }
    assert_eq!(
        refusals(mesh.b.metrics_addr, "inbound", "wrong_destination").await,
        3
    );
    // The agent goes on serving.
    assert_eq!(
        tunnel(chain, key, mesh.server_addr()).await,
        Ok(http::StatusCode::OK)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_that_cannot_be_enrolled_is_reported_and_the_others_serve() {
    let mesh = Mesh::start().await;
    let _echo = echo_server(mesh.server_addr()).await;
    // A pod on node-b whose network namespace does not exist (as when the
    // eBPF maps or the pod's sandbox refuse it): enrollment fails.
    mesh.write_mesh(&mesh_yaml(
        mesh.block,
        &format!(
            "  - {{name: ghost, namespace: shop, node: node-b, ips: [\"{}\"], netns: sluice-no-such-netns}}",
            mesh.ip(20)
        ),
    ));
    let metrics = mesh.b.metrics_addr;
    let gauge = || async move {
        let (_, body) = http_get(metrics, "/metrics").await;
        let value = |name: &str| {
            body.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
                .unwrap_or(0.0) as u64
        };
        (
            value("sluice_workloads_not_enrolled"),
            value("sluice_enrollment_failures_total"),
        )
    };
    let deadline = tokio::time::Instant::now() + T;
    let mut seen = gauge().await;
    while seen.0 == 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        seen = gauge().await;
    }
    assert_eq!(seen.0, 1, "not-enrolled gauge");
    assert!(seen.1 >= 1, "failures counted");
    // It is retried, readiness says so, and everything else is served.
    assert_eq!(
        http_get(mesh.b.readiness_addr, "/healthz/ready").await.0,
        503
    );
    let s = mesh.connect(mesh.server_addr()).await.unwrap();
    assert_eq!(
        round_trip(s, Arc::new(b"still".to_vec())).await.unwrap(),
        b"still"
    );
}
