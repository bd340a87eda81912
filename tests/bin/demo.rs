//! The local demo (`cargo xtask demo`, as root): two "nodes" and five
//! "pods" as network namespaces, one real `sluice-agent` per node with eBPF
//! capture, traffic between pods (cross node, same node, through a service
//! VIP, and from a pod that opted out), then a report from the agents' own
//! access logs and metrics. Everything is removed on exit and on Ctrl-C.

use std::net::SocketAddr;
use std::sync::Mutex;

use sluice_tests::netns::{e2e_available, echo_in, exchange, Topology};
use sluice_tests::write_atomic;

static TOPOLOGY: Mutex<Option<Topology>> = Mutex::new(None);

fn main() {
    if !e2e_available() {
        eprintln!("the demo needs root, the agent binary and the eBPF object: run `cargo xtask demo` as root");
        std::process::exit(2);
    }
    ctrlc::set_handler(|| {
        eprintln!("\ninterrupted: cleaning up");
        // Dropping the topology stops the agents and removes namespaces and pins.
        drop(TOPOLOGY.lock().unwrap_or_else(|p| p.into_inner()).take());
        std::process::exit(130);
    })
    .expect("Ctrl-C handler");

    println!("== Sluice demo: 2 nodes, 5 pods, eBPF capture, HBONE/mTLS between node agents ==");
    let mut t = Topology::new();
    t.json_logs = true;
    t.add_node("node-a");
    t.add_node("node-b");
    t.add_pod("node-a", "frontend", 1);
    t.add_pod("node-a", "cart", 2);
    t.add_pod("node-a", "legacy", 3);
    t.add_pod("node-b", "reviews", 1);
    t.add_pod("node-b", "ratings", 2);
    let mut y = String::from("nodes: [{name: node-a}, {name: node-b}]\nworkloads:\n");
    for p in &t.pods {
        let optout = if p.name == "legacy" {
            ", istio.io/dataplane-mode: none"
        } else {
            ""
        };
        y.push_str(&format!(
            "  - {{name: {n}, namespace: shop, serviceAccount: {n}, node: {node}, ips: [\"{ip}\", \"{ip6}\"], netns: {ns}, labels: {{app: {n}{optout}}}}}\n",
            n = p.name, node = p.node, ip = p.ip, ip6 = p.ip6, ns = p.ns
        ));
    }
    y.push_str("services:\n  - {name: reviews, namespace: shop, vips: [\"10.96.0.20\"], ports: [{port: 80, targetPort: 8080}], selector: {app: reviews}}\n");
    write_atomic(&t.mesh_file(), &y);
    for p in ["cart", "reviews", "ratings"] {
        echo_in(t.pod(p), 8080);
    }
    println!("topology:");
    for p in &t.pods {
        println!(
            "  {:<9} {:<10} {:<13} on {}  (netns {})",
            p.name, p.ip, p.ip6, p.node, p.ns
        );
    }
    t.start_agent("node-a");
    t.start_agent("node-b");
    println!("agents ready (eBPF attached, certificates issued)\n");
    let (ip, pod) = (
        |t: &Topology, n: &str| t.pod(n).ip,
        |t: &Topology, n: &str| t.pod(n).clone(),
    );
    let flows: Vec<(&str, &str, SocketAddr)> = vec![
        (
            "cross node",
            "frontend",
            SocketAddr::new(ip(&t, "reviews"), 8080),
        ),
        (
            "IPv6",
            "frontend",
            SocketAddr::new(t.pod("reviews").ip6, 8080),
        ),
        (
            "same node",
            "frontend",
            SocketAddr::new(ip(&t, "cart"), 8080),
        ),
        ("service VIP", "frontend", "10.96.0.20:80".parse().unwrap()),
        (
            "opted-out pod",
            "legacy",
            SocketAddr::new(ip(&t, "ratings"), 8080),
        ),
    ];
    *TOPOLOGY.lock().unwrap() = Some(t);
    for (what, from, dst) in flows {
        let t = TOPOLOGY.lock().unwrap();
        let Some(t) = t.as_ref() else { return };
        let data = vec![b'z'; 100_000];
        let result = exchange(&pod(t, from), dst, data.clone());
        let verdict = match &result {
            Ok(back) if *back == data => "echoed byte-exact".to_string(),
            Ok(back) => format!("CORRUPTED ({} bytes back)", back.len()),
            Err(e) => format!("FAILED: {e}"),
        };
        println!(
            "{what:<14} {from} -> {dst}: sent {} bytes, {verdict}",
            data.len()
        );
    }
    std::thread::sleep(std::time::Duration::from_millis(300));

    let guard = TOPOLOGY.lock().unwrap();
    let Some(t) = guard.as_ref() else { return };
    println!("\n== What the agents logged (one access-log line per connection) ==");
    for node in ["node-a", "node-b"] {
        for line in t.agent_log(node).lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            if v["target"] != "access" {
                continue;
            }
            let f = |k: &str| {
                v[k].as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v[k].to_string())
            };
            println!(
                "{node} {:<17} {} ({}) -> {} ({})  mtls={} bytes out/in={}/{}",
                f("direction"),
                f("src.workload"),
                f("src.identity"),
                f("dst.workload"),
                f("dst.identity"),
                f("mtls"),
                f("bytes_sent"),
                f("bytes_recv"),
            );
        }
    }
    println!("\n== Metrics (istio_tcp_connections_opened_total) ==");
    for node in ["node-a", "node-b"] {
        for l in t
            .metrics(node)
            .lines()
            .filter(|l| l.starts_with("istio_tcp_connections_opened_total{"))
        {
            let get = |k: &str| {
                l.split(&format!("{k}=\""))
                    .nth(1)
                    .and_then(|r| r.split('"').next())
                    .unwrap_or("?")
            };
            println!(
                "{node} reporter={:<11} {} -> {} security={} count={}",
                get("reporter"),
                get("source_workload"),
                get("destination_workload"),
                get("connection_security_policy"),
                l.rsplit(' ').next().unwrap_or("?")
            );
        }
        let dump = t.config_dump(node);
        println!(
            "{node} enrolled pods: {}, HBONE pool: {}",
            dump["enrolled"].as_array().map(|a| a.len()).unwrap_or(0),
            dump["pool"]
        );
    }
    drop(guard);
    drop(TOPOLOGY.lock().unwrap().take());
    println!("\ncleaned up: agents stopped, namespaces and eBPF pins removed");
}
