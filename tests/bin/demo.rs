//! The local demo (`cargo xtask demo`, as root): two "nodes" and five
//! "pods" as network namespaces, one real `sluice-agent` per node with eBPF
//! capture, traffic between pods (cross node, same node, through a service
//! VIP, and from a pod that opted out), HTTP through a waypoint (header
//! routing, a 80/20 split, an L7 deny) with `curl`, a hot restart of one
//! agent under traffic, then a report from the agents' own access logs and
//! metrics and the waypoint's request metrics.
//! Everything is removed on exit and on Ctrl-C.

use std::net::SocketAddr;
use std::sync::Mutex;

use sluice_tests::netns::{e2e_available, echo_in, exchange, http_in, Topology, Traffic};
use sluice_tests::write_atomic;

static TOPOLOGY: Mutex<Option<Topology>> = Mutex::new(None);

/// Service `web` (two versions) behind waypoint `shop/waypoint`, an
/// HTTPRoute and an L7 policy; the other services stay L4-only.
const WAYPOINT_OBJECTS: &str = r#"services:
  - {name: reviews, namespace: shop, vips: ["10.96.0.20"], ports: [{port: 80, targetPort: 8080}], selector: {app: reviews}}
  - name: web
    namespace: shop
    vips: ["10.96.0.30"]
    ports: [{port: 80, targetPort: 8080}]
    selector: {app: web}
    labels: {istio.io/use-waypoint: waypoint}
  - {name: web-v1, namespace: shop, ports: [{port: 80, targetPort: 8080}], selector: {app: web, version: v1}}
  - {name: web-v2, namespace: shop, ports: [{port: 80, targetPort: 8080}], selector: {app: web, version: v2}}
gateways:
  - metadata: {name: waypoint, namespace: shop}
    spec: {gatewayClassName: istio-waypoint}
httpRoutes:
  - metadata: {name: web, namespace: shop}
    spec:
      parentRefs: [{kind: Service, name: web}]
      rules:
        - matches: [{headers: [{name: x-version, value: v2}]}]
          backendRefs: [{name: web-v2, port: 80}]
        - backendRefs: [{name: web-v1, port: 80, weight: 80}, {name: web-v2, port: 80, weight: 20}]
authorizationPolicies:
  - metadata: {name: no-admin, namespace: shop}
    spec:
      targetRefs: [{kind: Service, name: web}]
      action: DENY
      rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
"#;

/// Replace node-b's agent by a new process while frontend keeps opening
/// connections to reviews on node-b; report what the clients saw.
fn hot_restart() {
    use std::time::Duration;
    let mut guard = TOPOLOGY.lock().unwrap();
    let Some(t) = guard.as_mut() else { return };
    println!("\n== Hot restart: a new agent takes node-b over while frontend keeps connecting to reviews ==");
    let (from, dst) = (
        t.pod("frontend").clone(),
        SocketAddr::new(t.pod("reviews").ip, 8080),
    );
    let traffic = Traffic::start(&from, dst, vec![b'h'; 10_000], Duration::from_millis(10));
    std::thread::sleep(Duration::from_millis(500));
    let started = std::time::Instant::now();
    let old = t.upgrade_agent("node-b");
    let took = started.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let (served, failed) = (traffic.served(), traffic.failed());
    traffic.stop();
    // The old agent drained and idles until its pod would be deleted.
    t.terminate(old);
    // It finishes its drain once the tunnels it still carries end (the
    // waypoint's idle upstream connections close after 10 s).
    let exit = match t.wait_child_exit(old, Duration::from_secs(30)) {
        Some(s) => s.to_string(),
        None => "STILL RUNNING".into(),
    };
    println!(
        "new agent started and took over in {} ms (process start, sockets, eBPF, certificates)",
        took.as_millis()
    );
    println!(
        "old agent (pid {old}) handed its listening sockets over, drained, and on SIGTERM exited ({exit})"
    );
    println!(
        "connections from frontend during the upgrade: {} served, {} failed",
        served, failed
    );
}

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
    t.add_pod("node-b", "web-v1", 3);
    t.add_pod("node-b", "web-v2", 4);
    t.add_pod("node-a", "waypoint", 5);
    let mut y = String::from("nodes: [{name: node-a}, {name: node-b}]\nworkloads:\n");
    for p in &t.pods {
        let labels = match p.name.as_str() {
            "legacy" => "app: legacy, istio.io/dataplane-mode: none".to_string(),
            "waypoint" => {
                "gateway.networking.k8s.io/gateway-name: waypoint, istio.io/dataplane-mode: none"
                    .to_string()
            }
            n if n.starts_with("web-") => format!("app: web, version: {}", &n[4..]),
            n => format!("app: {n}"),
        };
        y.push_str(&format!(
            "  - {{name: {n}, namespace: shop, serviceAccount: {n}, node: {node}, ips: [\"{ip}\", \"{ip6}\"], netns: {ns}, labels: {{{labels}}}}}\n",
            n = p.name, node = p.node, ip = p.ip, ip6 = p.ip6, ns = p.ns
        ));
    }
    y.push_str(WAYPOINT_OBJECTS);
    write_atomic(&t.mesh_file(), &y);
    for p in ["cart", "reviews", "ratings"] {
        echo_in(t.pod(p), 8080);
    }
    http_in(t.pod("web-v1"), 8080, "web-v1");
    http_in(t.pod("web-v2"), 8080, "web-v2");
    println!("topology:");
    for p in &t.pods {
        println!(
            "  {:<9} {:<10} {:<13} on {}  (netns {})",
            p.name, p.ip, p.ip6, p.node, p.ns
        );
    }
    t.start_agent("node-a");
    t.start_agent("node-b");
    t.start_waypoint("waypoint", "shop/waypoint");
    println!("agents and waypoint ready (eBPF attached, certificates issued)\n");
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
    {
        let t = TOPOLOGY.lock().unwrap();
        let Some(t) = t.as_ref() else { return };
        println!("\n== HTTP through the waypoint of service web (10.96.0.30), with curl from frontend ==");
        let curl = |args: &[&str]| {
            let mut all = vec![
                "curl",
                "-sS",
                "--max-time",
                "10",
                "-w",
                " -> HTTP %{http_code}\n",
            ];
            all.extend_from_slice(args);
            String::from_utf8_lossy(&t.run_in("frontend", &all).stdout)
                .trim()
                .to_string()
        };
        println!("GET /            {}", curl(&["http://10.96.0.30/"]));
        println!(
            "x-version: v2    {}",
            curl(&["-H", "x-version: v2", "http://10.96.0.30/"])
        );
        println!("GET /admin       {}", curl(&["http://10.96.0.30/admin"]));
        let split = curl(&["http://10.96.0.30/split?n=[1-100]"]);
        println!(
            "100 x GET /split web-v1: {}, web-v2: {} (route weights 80/20)",
            split.matches("web-v1 GET").count(),
            split.matches("web-v2 GET").count()
        );
    }
    hot_restart();
    std::thread::sleep(std::time::Duration::from_millis(300));

    let guard = TOPOLOGY.lock().unwrap();
    let Some(t) = guard.as_ref() else { return };
    println!(
        "\n== What the agents logged (one access-log line per connection; repeats counted) =="
    );
    for node in ["node-a", "node-b"] {
        let mut seen: Vec<(String, usize)> = Vec::new();
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
            let entry = format!(
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
            match seen.iter_mut().find(|(e, _)| *e == entry) {
                Some((_, n)) => *n += 1,
                None => seen.push((entry, 1)),
            }
        }
        for (entry, n) in seen {
            match n {
                1 => println!("{entry}"),
                n => println!("{entry}  x{n}"),
            }
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
    println!("\n== Waypoint metrics (istio_requests_total, reporter=waypoint) ==");
    let out = t.run_in(
        "waypoint",
        &["curl", "-sS", "http://127.0.0.1:15020/stats/prometheus"],
    );
    for l in String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{"))
    {
        let get = |k: &str| {
            l.split(&format!("{k}=\""))
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or("?")
        };
        println!(
            "{} -> {} code={} flags={} count={}",
            get("source_workload"),
            get("destination_workload"),
            get("response_code"),
            get("response_flags"),
            l.rsplit(' ').next().unwrap_or("?")
        );
    }
    drop(guard);
    drop(TOPOLOGY.lock().unwrap().take());
    println!("\ncleaned up: agents stopped, namespaces and eBPF pins removed");
}
