//! The local demo: two node agents and a few workloads, traffic between them
//! (cross node, same node, through a service VIP, and to a host outside the
//! mesh), and a report of what happened — identities, mTLS, bytes, metrics.
//! Run it with `cargo xtask demo`.

use std::net::SocketAddr;
use std::sync::Arc;

use sluice_tests::*;

#[tokio::main]
async fn main() {
    // Access-log lines (one per connection) go to stdout.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,access=info".into()),
        )
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    println!("== Sluice local demo: two node agents on loopback addresses ==");
    let mesh = Mesh::start().await;
    // A second workload on node A so that same-node traffic has a target.
    let web = mesh.ip(4);
    mesh.write_mesh(&mesh_yaml(
        mesh.block,
        &format!("  - {{name: web, namespace: shop, serviceAccount: web, node: node-a, ips: [\"{web}\"], labels: {{app: web}}}}"),
    ));
    let ready = eventually(std::time::Duration::from_secs(20), || {
        mesh.a.ctx.enrolled().iter().any(|w| w.name == "web") && mesh.a.ctx.is_ready()
    })
    .await;
    assert!(ready, "node A did not pick up the web workload");

    let server = mesh.server_addr();
    let web_app = SocketAddr::new(web, APP_PORT);
    let vip = SocketAddr::new(mesh.ip(10), 80);
    let outside = SocketAddr::new(mesh.ip(200), 7000);
    let _servers = [
        echo_server(server).await,
        echo_server(web_app).await,
        echo_server(outside).await,
    ];
    for (what, dst) in [
        ("cross node: client (node-a) -> server (node-b)", server),
        ("same node:  client (node-a) -> web (node-a)", web_app),
        ("service:    client -> echo VIP -> an endpoint", vip),
        ("outside:    client -> a host outside the mesh", outside),
    ] {
        let data = Arc::new(payload(256 * 1024, 7));
        let s = mesh.connect(dst).await.expect("connect");
        let back = round_trip(s, data.clone()).await.expect("round trip");
        let ok = if back == *data {
            "byte-exact"
        } else {
            "CORRUPTED"
        };
        println!(
            "\n-- {what} ({dst}): sent {} bytes, got {} back, {ok}",
            data.len(),
            back.len()
        );
        // Let the access-log lines of both agents print before the next flow.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    println!("\n== What the agents' metrics say (istio_tcp_connections_closed_total) ==");
    for (name, agent) in [("node-a", &mesh.a), ("node-b", &mesh.b)] {
        let (_, text) = http_get(agent.metrics_addr, "/metrics").await;
        for line in text
            .lines()
            .filter(|l| l.starts_with("istio_tcp_connections_closed_total{"))
        {
            let get = |k: &str| {
                line.split(&format!("{k}=\""))
                    .nth(1)
                    .and_then(|r| r.split('"').next())
                    .unwrap_or("?")
                    .to_string()
            };
            println!(
                "{name}: reporter={:<11} {} -> {} (service {}) security={} count={}",
                get("reporter"),
                get("source_principal"),
                get("destination_principal"),
                get("destination_service"),
                get("connection_security_policy"),
                line.rsplit(' ').next().unwrap_or("?"),
            );
        }
        let pool = agent.pool_stats();
        println!(
            "{name}: HBONE pool: {} connection(s) open, {} opened, {} streams opened",
            pool.connections, pool.connections_opened, pool.streams_opened
        );
    }
    println!(
        "\nAdmin: curl http://{}/config_dump (while running). Done; cleaning up.",
        mesh.a.admin_addr
    );
}
