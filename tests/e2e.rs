//! End to end on the real kernel: nodes and pods are network namespaces,
//! agents are real `sluice-agent` processes with eBPF capture. Needs root
//! (`cargo xtask test` runs these as root and requires them).

use std::net::SocketAddr;
use std::time::Duration;

use sluice_tests::netns::*;
use sluice_tests::{metric, write_atomic};

const MARKER: &[u8] = b"SLUICE-PLAINTEXT-MARKER-7f3a";

/// node-a: client (.1), web (.2), outsider (.3, opted out); node-b: server (.1).
fn cluster() -> Topology {
    let mut t = Topology::new();
    t.add_node("node-a");
    t.add_node("node-b");
    t.add_pod("node-a", "client", 1);
    t.add_pod("node-a", "web", 2);
    t.add_pod("node-a", "outsider", 3);
    t.add_pod("node-b", "server", 1);
    write_mesh(&t, true);
    for p in ["web", "outsider", "server"] {
        echo_in(t.pod(p), 8080);
    }
    t.start_agent("node-a");
    t.start_agent("node-b");
    t
}

/// The mesh file; `client_enrolled` toggles the client's opt-out label.
fn write_mesh(t: &Topology, client_enrolled: bool) {
    write_mesh_with(t, client_enrolled, "");
}

/// The mesh file with `extra` (policies) appended.
fn write_mesh_with(t: &Topology, client_enrolled: bool, extra: &str) {
    let mut y = String::from("nodes: [{name: node-a}, {name: node-b}]\nworkloads:\n");
    for p in &t.pods {
        let mut labels = format!("app: {}", p.name);
        if p.name == "outsider" || (p.name == "client" && !client_enrolled) {
            labels.push_str(", istio.io/dataplane-mode: none");
        }
        y.push_str(&format!(
            "  - {{name: {n}, namespace: shop, serviceAccount: {n}, node: {node}, ips: [\"{ip}\", \"{ip6}\"], netns: {ns}, labels: {{{labels}}}}}\n",
            n = p.name,
            node = p.node,
            ip = p.ip,
            ip6 = p.ip6,
            ns = p.ns
        ));
    }
    y.push_str("services:\n  - {name: server, namespace: shop, vips: [\"10.96.0.10\"], ports: [{port: 80, targetPort: 8080}], selector: {app: server}}\n");
    y.push_str(extra);
    write_atomic(&t.mesh_file(), &y);
}

fn addr(t: &Topology, pod: &str, port: u16) -> SocketAddr {
    SocketAddr::new(t.pod(pod).ip, port)
}

/// A connection from `pod` to `dst` kept open by the test; reads time out
/// after 30 s, so a hang shows as a timeout error, told apart from a reset.
fn open_from(pod: &Pod, dst: SocketAddr) -> std::net::TcpStream {
    in_ns(&pod.ns, move || {
        let s = std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok::<_, std::io::Error>(s)
    })
    .expect("connect")
}

/// Write `m` and read the echo of it back, leaving the connection open.
fn ping(s: &mut std::net::TcpStream, m: &[u8]) -> std::io::Result<()> {
    use std::io::{Read, Write};
    s.write_all(m)?;
    let mut back = vec![0; m.len()];
    s.read_exact(&mut back)?;
    assert_eq!(back, m);
    Ok(())
}

fn payload() -> Vec<u8> {
    let mut v = MARKER.to_vec();
    v.extend(std::iter::repeat_n(b'x', 20000));
    v.extend_from_slice(MARKER);
    v
}

#[test]
fn captured_traffic_crosses_nodes_over_mtls_and_never_in_clear() {
    if !e2e_available() {
        return;
    }
    let t = cluster();
    let client = t.pod("client").clone();
    let sniff_a = Sniffer::start(&t.node("node-a").ns, MARKER);
    let sniff_b = Sniffer::start(&t.node("node-b").ns, MARKER);

    // Cross node, same node, and through the service VIP.
    for dst in [
        addr(&t, "server", 8080),
        addr(&t, "web", 8080),
        "10.96.0.10:80".parse().unwrap(),
    ] {
        let back = exchange(&client, dst, payload())
            .unwrap_or_else(|e| panic!("{dst}: {e}\n{}", t.agent_log("node-a")));
        assert_eq!(back, payload(), "{dst}");
    }
    assert!(
        !sniff_a.finish(),
        "plaintext seen in node-a's namespace\n{}\n{}",
        t.agent_log("node-a"),
        t.metrics("node-a")
    );
    assert!(!sniff_b.finish(), "plaintext seen in node-b's namespace");

    // The destination agents saw the client's verified identity.
    let src = r#"source_principal="spiffe://cluster.local/ns/shop/sa/client""#;
    let mtls = r#"connection_security_policy="mutual_tls""#;
    let dst_b = r#"destination_principal="spiffe://cluster.local/ns/shop/sa/server""#;
    let b = t.metrics("node-b");
    assert_eq!(
        metric(
            &b,
            "istio_tcp_connections_opened_total",
            &[r#"reporter="destination""#, src, dst_b, mtls]
        ),
        2,
        "{b}"
    );
    let a = t.metrics("node-a");
    let dst_web = r#"destination_principal="spiffe://cluster.local/ns/shop/sa/web""#;
    assert_eq!(
        metric(
            &a,
            "istio_tcp_connections_opened_total",
            &[r#"reporter="destination""#, src, dst_web, mtls]
        ),
        1,
        "{a}"
    );
    assert_eq!(
        metric(
            &a,
            "istio_tcp_connections_opened_total",
            &[r#"reporter="source""#, src]
        ),
        3,
        "{a}"
    );

    // Map fill is exported: two enrolled pods, no records left over.
    assert_eq!(
        metric(&a, "sluice_ebpf_map_entries", &[r#"map="SLUICE_ENROLLED""#]),
        2,
        "{a}"
    );
    assert_eq!(
        metric(&a, "sluice_ebpf_map_entries", &[r#"map="SLUICE_ORIG_DST""#]),
        0,
        "{a}"
    );
    // Records were claimed: nothing left in the connection maps.
    let dump = t.config_dump("node-a");
    assert_eq!(dump["capture"]["trackedConnections"], 0, "{dump}");
    // aya-log records from the eBPF programs reach the agent's log.
    assert!(
        t.agent_log("node-a")
            .contains("captured connect to 10.1.2.1:8080"),
        "{}",
        t.agent_log("node-a")
    );

    // Control: the sniffer does see plaintext from a pod outside the mesh.
    let sniff = Sniffer::start(&t.node("node-b").ns, MARKER);
    let back = exchange(t.pod("outsider"), addr(&t, "server", 8080), payload()).unwrap();
    assert_eq!(back, payload());
    assert!(
        sniff.finish(),
        "the sniffer must see an uncaptured pod's plaintext"
    );
}

#[test]
fn pods_that_opt_out_are_not_captured_but_their_destination_still_is() {
    if !e2e_available() {
        return;
    }
    let t = cluster();
    let back = exchange(t.pod("outsider"), addr(&t, "server", 8080), payload()).unwrap();
    assert_eq!(back, payload());
    // Not captured on node-a: no outbound connection was reported there.
    let a = t.metrics("node-a");
    assert_eq!(
        metric(
            &a,
            "istio_tcp_connections_opened_total",
            &[r#"reporter="source""#]
        ),
        0,
        "{a}"
    );
    // Captured inbound on node-b (sk_lookup → 15006), in plaintext: PERMISSIVE.
    let b = t.metrics("node-b");
    assert_eq!(
        metric(
            &b,
            "istio_tcp_connections_opened_total",
            &[
                r#"reporter="destination""#,
                r#"connection_security_policy="unknown""#
            ]
        ),
        1,
        "{b}"
    );
}

#[test]
fn enrollment_follows_the_model_at_run_time_while_traffic_runs() {
    if !e2e_available() {
        return;
    }
    let t = cluster();
    let client = t.pod("client").clone();
    let server = addr(&t, "server", 8080);
    let outbound = |t: &Topology| {
        metric(
            &t.metrics("node-a"),
            "istio_tcp_connections_opened_total",
            &[r#"reporter="source""#],
        )
    };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (c2, s2) = (client.clone(), stop.clone());
    // Traffic keeps flowing through every toggle; no connection may fail.
    let traffic = std::thread::spawn(move || {
        let mut n = 0;
        while !s2.load(std::sync::atomic::Ordering::Relaxed) {
            let back =
                exchange(&c2, server, b"ping".to_vec()).expect("connection failed during a toggle");
            assert_eq!(back, b"ping");
            n += 1;
        }
        n
    });
    std::thread::sleep(Duration::from_millis(500));
    let before = outbound(&t);
    assert!(before > 0, "captured while enrolled");

    write_mesh(&t, false);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while t.config_dump("node-a")["enrolled"]
        .as_array()
        .unwrap()
        .iter()
        .any(|w| w["name"] == "client")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "client not un-enrolled"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let off = outbound(&t);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(outbound(&t), off, "captured after un-enrollment");

    write_mesh(&t, true);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while outbound(&t) == off {
        assert!(
            std::time::Instant::now() < deadline,
            "not captured again after re-enrollment"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let n = traffic.join().expect("traffic thread");
    assert!(n > 10, "only {n} connections");
}

#[test]
fn agent_down_fails_closed_and_a_restart_recovers_without_stale_state() {
    if !e2e_available() {
        return;
    }
    let mut t = cluster();
    let client = t.pod("client").clone();
    let server = addr(&t, "server", 8080);
    assert_eq!(exchange(&client, server, b"up".to_vec()).unwrap(), b"up");
    let enrolled_before = t.config_dump("node-a")["capture"]["enrolledNamespaces"]
        .as_array()
        .unwrap()
        .len();

    t.kill_agent("node-a");
    // Capture stays pinned: the enrolled pod's connection is redirected to a
    // listener that is gone, and fails — it does not go out in clear text.
    let sniff = Sniffer::start(&t.node("node-a").ns, MARKER);
    let r = exchange(&client, server, payload());
    assert!(
        r.is_err(),
        "an enrolled pod reached {server} with its agent down: {r:?}"
    );
    assert!(
        !sniff.finish(),
        "plaintext left the pod while the agent was down"
    );
    // A pod outside the mesh is unaffected.
    assert_eq!(
        exchange(t.pod("outsider"), server, b"still".to_vec()).unwrap(),
        b"still"
    );

    t.start_agent("node-a");
    assert_eq!(
        exchange(&client, server, b"back".to_vec()).unwrap(),
        b"back"
    );
    let dump = t.config_dump("node-a");
    assert_eq!(
        dump["capture"]["enrolledNamespaces"]
            .as_array()
            .unwrap()
            .len(),
        enrolled_before,
        "{dump}"
    );
    assert_eq!(
        dump["capture"]["trackedConnections"], 0,
        "stale records after restart: {dump}"
    );
}

#[test]
fn sigterm_drains_established_tunnels_and_a_killed_destination_agent_resets_them() {
    use std::io::Read;
    if !e2e_available() {
        return;
    }
    let mut t = cluster();
    let client = t.pod("client").clone();
    let server = addr(&t, "server", 8080);
    let open = || open_from(&client, server);

    // SIGTERM: the destination agent drains. The established tunnel goes
    // on; a new connection fails (closed, never around the mesh); when the
    // last tunnel ends the agent exits by itself.
    let mut live = open();
    ping(&mut live, b"before").unwrap();
    t.terminate_agent("node-b");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !t.agent_log("node-b").contains("draining") && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        t.agent_log("node-b").contains("draining"),
        "{}",
        t.agent_log("node-b")
    );
    ping(&mut live, b"during the drain").unwrap();
    let sniff = Sniffer::start(&t.node("node-a").ns, MARKER);
    assert!(exchange(&client, server, payload()).is_err());
    assert!(!sniff.finish(), "plaintext left the pod during the drain");
    live.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    live.read_to_end(&mut rest).unwrap();
    let status = t
        .wait_agent_exit("node-b", Duration::from_secs(15))
        .expect("the agent exits once its last connection is done");
    assert!(status.success(), "{status}");
    assert!(t.agent_log("node-b").contains("drain over"));

    // Restarted, then killed mid-stream: the client sees its connection
    // end (reset), not a hang.
    t.start_agent("node-b");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while exchange(&client, server, b"up".to_vec()).ok().as_deref() != Some(b"up")
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut live = open();
    ping(&mut live, b"before").unwrap();
    t.kill_agent("node-b");
    let e = ping(&mut live, b"after the kill").expect_err("the tunnel outlived its agent");
    assert!(
        !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "the client hung instead of seeing a reset: {e}"
    );
}

/// Hot restart of both agents while a client keeps opening connections
/// across the nodes: every connection is served, none leaves in clear, the
/// connection open since before the upgrades survives both, the old agents
/// drain when it ends and then wait for their pods' deletion (SIGTERM),
/// which they meet with a clean exit.
#[test]
fn agents_hand_over_to_successors_under_traffic_and_lose_no_connection() {
    use std::io::Read;
    if !e2e_available() {
        return;
    }
    let mut t = cluster();
    let client = t.pod("client").clone();
    let server = addr(&t, "server", 8080);
    let mut live = open_from(&client, server);
    ping(&mut live, b"before").unwrap();

    let traffic = Traffic::start(&client, server, payload(), Duration::from_millis(10));
    let sniff = Sniffer::start(&t.node("node-a").ns, MARKER);
    traffic.wait_for_more(20);
    // The destination node first, then the client's node (its agent holds
    // the pod's outbound capture listeners and the connection records).
    let old_b = t.upgrade_agent("node-b");
    traffic.wait_for_more(20);
    let old_a = t.upgrade_agent("node-a");
    traffic.wait_for_more(20);
    ping(&mut live, b"after both upgrades").unwrap();
    let (served, failed) = (traffic.served(), traffic.failed());
    let errors = traffic.stop();
    assert!(
        errors.is_empty(),
        "{} of {} connections failed during the upgrades: {errors:?}\n{}\n{}",
        failed,
        served + failed,
        t.agent_log("node-a"),
        t.agent_log("node-b")
    );
    assert!(
        !sniff.finish(),
        "plaintext left the pod during the upgrades"
    );

    // The old agents still carry the connection from before; when it ends
    // their drains are over, and they idle until their pods are deleted.
    live.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    live.read_to_end(&mut rest).unwrap();
    for node in ["node-a", "node-b"] {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !t.agent_log(node).contains("handed over and drained") {
            assert!(
                std::time::Instant::now() < deadline,
                "old agent of {node} did not finish its drain:\n{}",
                t.agent_log(node)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    for pid in [old_a, old_b] {
        assert!(
            t.wait_child_exit(pid, Duration::from_millis(500)).is_none(),
            "a handed-over agent must not exit by itself (its pod would restart it)"
        );
        t.terminate(pid);
        let status = t
            .wait_child_exit(pid, Duration::from_secs(10))
            .expect("the old agent exits on SIGTERM");
        assert!(status.success(), "{status}");
    }
    // The successors serve alone.
    assert_eq!(exchange(&client, server, payload()).unwrap(), payload());
}

/// A full eBPF map: with the enrollment map filled to its limit (as by
/// thousands of pods), a new pod is not enrolled and the agent says why — an
/// error naming the full map, `sluice_workloads_not_enrolled` 1, readiness
/// 503 — while the pods it has keep working. Once there is room it enrolls
/// the pod by itself, and the pod's traffic is captured (nothing in clear).
#[test]
fn a_full_enrollment_map_is_reported_and_the_pod_enrolled_once_there_is_room() {
    use aya::maps::{HashMap as BpfHashMap, Map, MapData};
    use sluice_ebpf_common::{maps, Enrolled};
    if !e2e_available() {
        return;
    }
    let mut t = cluster();
    let pinned = MapData::from_pin(t.pin_dir("node-b").join(maps::ENROLLED)).unwrap();
    let mut enrolled: BpfHashMap<MapData, u64, Enrolled> =
        BpfHashMap::try_from(Map::HashMap(pinned)).unwrap();
    // Namespace cookies that no namespace has, until the kernel says full.
    let mut fillers = Vec::new();
    for cookie in (1u64 << 62).. {
        match enrolled.insert(cookie, Enrolled { flags: 0, _pad: 0 }, 0) {
            Ok(()) => fillers.push(cookie),
            Err(_) => break,
        }
    }
    assert_eq!(
        fillers.len() + 1,
        sluice_ebpf_common::POD_MAP_SIZE as usize,
        "the agent's own pod is the rest"
    );
    let late = t.add_pod("node-b", "late", 2);
    echo_in(&late, 8080);
    write_mesh(&t, true);
    let not_enrolled = |t: &Topology| {
        t.metrics("node-b")
            .lines()
            .find_map(|l| l.strip_prefix("sluice_workloads_not_enrolled "))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while not_enrolled(&t) != Some(1) || !t.agent_log("node-b").contains("SLUICE_ENROLLED is full")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the full map was not reported:\n{}",
            t.agent_log("node-b")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        t.http("node-b", 15021, "/healthz/ready").map(|r| r.0),
        Some(503)
    );
    // The pods already enrolled are served as before.
    let client = t.pod("client").clone();
    assert_eq!(
        exchange(&client, addr(&t, "server", 8080), payload()).unwrap(),
        payload()
    );

    // Room again (pods elsewhere left): the retry enrolls the new pod.
    for cookie in &fillers[..8] {
        enrolled.remove(cookie).unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while not_enrolled(&t) != Some(0) {
        assert!(
            std::time::Instant::now() < deadline,
            "not enrolled once there was room:\n{}",
            t.agent_log("node-b")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        t.http("node-b", 15021, "/healthz/ready").map(|r| r.0),
        Some(200)
    );
    let sniff = Sniffer::start(&t.node("node-b").ns, MARKER);
    assert_eq!(
        exchange(&late, addr(&t, "server", 8080), payload()).unwrap(),
        payload()
    );
    assert_eq!(
        exchange(&client, SocketAddr::new(late.ip, 8080), payload()).unwrap(),
        payload()
    );
    assert!(!sniff.finish(), "the late pod's traffic left in clear");
}

/// The application behind an agent sees its real client — over HBONE
/// (cross-node, same-node, IPv4 and IPv6, through a service address) and
/// as plaintext from outside the mesh — as ztunnel shows it, not the agent
/// or 127.0.0.6.
#[test]
fn applications_see_their_clients_addresses_not_the_agents() {
    if !e2e_available() {
        return;
    }
    let t = cluster();
    for p in ["web", "server"] {
        peer_in(t.pod(p), 9090);
    }
    let seen = |from: &str, dst: SocketAddr| {
        let back = exchange(t.pod(from), dst, Vec::new())
            .unwrap_or_else(|e| panic!("{from} → {dst}: {e}\n{}", t.agent_log("node-a")));
        String::from_utf8(back).expect("an address")
    };
    let client = t.pod("client");
    for dst in ["server", "web"] {
        assert_eq!(
            seen("client", addr(&t, dst, 9090)),
            client.ip.to_string(),
            "{dst}"
        );
        let v6 = SocketAddr::new(t.pod(dst).ip6, 9090);
        assert_eq!(
            seen("client", v6),
            client.ip6.to_string(),
            "{dst} over IPv6"
        );
    }
    // Plaintext from outside the mesh (PERMISSIVE), through the inbound
    // listener.
    let outsider = t.pod("outsider");
    assert_eq!(
        seen("outsider", addr(&t, "server", 9090)),
        outsider.ip.to_string()
    );
    // None of them went direct: node-b's agent served two over mTLS and
    // the plaintext one.
    let b = t.metrics("node-b");
    let opened = |security: &str| {
        metric(
            &b,
            "istio_tcp_connections_opened_total",
            &[r#"reporter="destination""#, security],
        )
    };
    assert_eq!(
        opened(r#"connection_security_policy="mutual_tls""#),
        2,
        "{b}"
    );
    assert_eq!(opened(r#"connection_security_policy="unknown""#), 1, "{b}");
    // The applications' replies reach the agents through the delivery
    // routing set in each pod (only the agent's mark selects it).
    let rules = t.run_in("server", &["ip", "rule", "show"]);
    let rules = String::from_utf8_lossy(&rules.stdout);
    assert!(rules.contains("fwmark 0x1539 lookup 133"), "{rules}");
}

#[test]
fn ipv6_traffic_is_captured_and_tunnelled_too() {
    if !e2e_available() {
        return;
    }
    let t = cluster();
    let client = t.pod("client").clone();
    let sniff_a = Sniffer::start(&t.node("node-a").ns, MARKER);
    let sniff_b = Sniffer::start(&t.node("node-b").ns, MARKER);
    for dst in [
        SocketAddr::new(t.pod("server").ip6, 8080),
        SocketAddr::new(t.pod("web").ip6, 8080),
    ] {
        let back = exchange(&client, dst, payload())
            .unwrap_or_else(|e| panic!("{dst}: {e}\n{}", t.agent_log("node-a")));
        assert_eq!(back, payload(), "{dst}");
    }
    assert!(!sniff_a.finish(), "plaintext seen in node-a's namespace");
    assert!(!sniff_b.finish(), "plaintext seen in node-b's namespace");
    let src = r#"source_principal="spiffe://cluster.local/ns/shop/sa/client""#;
    let mtls = r#"connection_security_policy="mutual_tls""#;
    let b = t.metrics("node-b");
    assert_eq!(
        metric(
            &b,
            "istio_tcp_connections_opened_total",
            &[r#"reporter="destination""#, src, mtls]
        ),
        1,
        "{b}"
    );
    let a = t.metrics("node-a");
    assert_eq!(
        metric(
            &a,
            "istio_tcp_connections_opened_total",
            &[r#"reporter="source""#, src, mtls]
        ),
        2,
        "{a}"
    );
    assert_eq!(t.config_dump("node-a")["capture"]["trackedConnections"], 0);
    // An opted-out pod reaches the server's IPv6 address directly; the
    // server's inbound capture still sees it.
    let back = exchange(
        t.pod("outsider"),
        SocketAddr::new(t.pod("server").ip6, 8080),
        payload(),
    )
    .unwrap();
    assert_eq!(back, payload());
}

/// Wait until node-b's agent has applied the current mesh file.
fn wait_applied(t: &Topology, updates_before: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while metric(
        &t.metrics("node-b"),
        "sluice_config_updates_total",
        &[r#"result="applied""#],
    ) <= updates_before
    {
        assert!(
            std::time::Instant::now() < deadline,
            "mesh update not applied:\n{}",
            t.agent_log("node-b")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn applied(t: &Topology) -> u64 {
    metric(
        &t.metrics("node-b"),
        "sluice_config_updates_total",
        &[r#"result="applied""#],
    )
}

const ALLOW_CLIENT_ONLY: &str = r#"authorizationPolicies:
  - apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: server-from-client, namespace: shop}
    spec:
      selector: {matchLabels: {app: server}}
      action: ALLOW
      rules: [{from: [{source: {principals: ["cluster.local/ns/shop/sa/client"]}}], to: [{operation: {ports: ["8080"]}}]}]
"#;

#[test]
fn authorization_policy_lets_allowed_pairs_through_and_stops_the_rest() {
    if !e2e_available() {
        return;
    }
    let t = cluster();
    let before = applied(&t);
    write_mesh_with(&t, true, ALLOW_CLIENT_ONLY);
    wait_applied(&t, before);
    let server = addr(&t, "server", 8080);
    // Allowed: the client's proven identity matches.
    assert_eq!(
        exchange(t.pod("client"), server, b"allowed".to_vec()).unwrap(),
        b"allowed"
    );
    // Denied: another mesh identity (web), and a plaintext pod (no identity).
    for pod in ["web", "outsider"] {
        let r = exchange(t.pod(pod), server, b"denied".to_vec());
        assert!(
            r.as_ref().map(|b| b.is_empty()).unwrap_or(true),
            "{pod} got through: {r:?}"
        );
    }
    let b = t.metrics("node-b");
    assert_eq!(
        metric(
            &b,
            "sluice_policy_denials_total",
            &[r#"kind="authorization""#, r#"connection="new""#]
        ),
        2,
        "{b}"
    );
    let log = t.agent_log("node-b");
    assert!(
        log.contains("connection denied") && log.contains("shop/server-from-client"),
        "{log}"
    );
}

/// A gauge without labels from a metrics page.
fn gauge(text: &str, name: &str) -> Option<i64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// Poll `f` until it holds, or fail with `what` and node-b's log.
fn eventually(t: &Topology, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}:\n{}",
            t.agent_log("node-b")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Istio parity at run time, with real agents and eBPF capture: DENY rules
/// whose clauses hold only L7 attributes (methods; remoteIpBlocks, which
/// come from X-Forwarded-For) have no effect at the node agent — said in a
/// warning and a gauge —, and a dry-run DENY that matches is counted and
/// logged but lets the connection through, until the annotation goes.
#[test]
fn l7_only_deny_rules_and_dry_run_policies_never_refuse_at_l4() {
    if !e2e_available() {
        return;
    }
    let t = cluster();
    let server = addr(&t, "server", 8080);
    let l7_only = r#"authorizationPolicies:
  - metadata: {name: no-posts, namespace: shop}
    spec:
      selector: {matchLabels: {app: server}}
      action: DENY
      rules: [{from: [{source: {principals: ["cluster.local/ns/shop/sa/client"]}}], to: [{operation: {methods: [POST]}}]}]
  - metadata: {name: no-remote, namespace: shop}
    spec:
      action: DENY
      rules: [{from: [{source: {remoteIpBlocks: ["0.0.0.0/0"]}}]}]
"#;
    let before = applied(&t);
    write_mesh_with(&t, true, l7_only);
    wait_applied(&t, before);
    eventually(&t, "no gauge of policies without effect", || {
        gauge(&t.metrics("node-b"), "sluice_policies_ineffective_at_l4") == Some(2)
    });
    assert_eq!(
        exchange(t.pod("client"), server, b"not refused".to_vec()).unwrap(),
        b"not refused"
    );
    eventually(&t, "no warning naming the policy and the clause", || {
        let log = t.agent_log("node-b");
        log.contains("never match at the node agent")
            && log.contains("shop/no-posts")
            && log.contains("rules[0] (to: methods)")
    });

    let dry_run = |annotated: bool| {
        let annotations = if annotated {
            ", annotations: {istio.io/dry-run: \"true\"}"
        } else {
            ""
        };
        format!(
            "authorizationPolicies:\n  - metadata: {{name: trial, namespace: shop{annotations}}}\n    spec: {{action: DENY, rules: [{{from: [{{source: {{principals: [\"cluster.local/ns/shop/sa/client\"]}}}}]}}]}}\n"
        )
    };
    let before = applied(&t);
    write_mesh_with(&t, true, &dry_run(true));
    wait_applied(&t, before);
    for i in 0..3 {
        let m = format!("dry run {i}").into_bytes();
        assert_eq!(exchange(t.pod("client"), server, m.clone()).unwrap(), m);
    }
    let b = t.metrics("node-b");
    let counted = |decision: &str| {
        metric(
            &b,
            "sluice_policy_dry_run_total",
            &[
                r#"policy="shop/trial""#,
                &format!("decision=\"{decision}\""),
            ],
        )
    };
    assert_eq!((counted("deny"), counted("allow")), (3, 0), "{b}");
    assert_eq!(
        metric(
            &b,
            "sluice_policy_denials_total",
            &[r#"policy="shop/trial""#]
        ),
        0
    );
    assert!(
        t.agent_log("node-b")
            .contains("dry-run policy would deny (not enforced)"),
        "{}",
        t.agent_log("node-b")
    );
    // The same policy enforced refuses.
    let before = applied(&t);
    write_mesh_with(&t, true, &dry_run(false));
    wait_applied(&t, before);
    let r = exchange(t.pod("client"), server, b"denied".to_vec());
    assert!(r.as_ref().map(|b| b.is_empty()).unwrap_or(true), "{r:?}");
}

#[test]
fn strict_peer_authentication_rejects_plaintext_and_permissive_accepts_it() {
    if !e2e_available() {
        return;
    }
    let t = cluster();
    let server = addr(&t, "server", 8080);
    let pa = |mode: &str| {
        format!("peerAuthentications:\n  - metadata: {{name: default, namespace: shop}}\n    spec: {{mtls: {{mode: {mode}}}}}\n")
    };
    let before = applied(&t);
    write_mesh_with(&t, true, &pa("STRICT"));
    wait_applied(&t, before);
    let r = exchange(t.pod("outsider"), server, b"plain".to_vec());
    assert!(
        r.as_ref().map(|b| b.is_empty()).unwrap_or(true),
        "plaintext got through STRICT: {r:?}"
    );
    assert_eq!(
        exchange(t.pod("client"), server, b"mtls".to_vec()).unwrap(),
        b"mtls"
    );
    let b = t.metrics("node-b");
    assert_eq!(
        metric(
            &b,
            "sluice_policy_denials_total",
            &[r#"kind="peer_authentication""#, r#"policy="shop/default""#]
        ),
        1,
        "{b}"
    );

    let before = applied(&t);
    write_mesh_with(&t, true, &pa("PERMISSIVE"));
    wait_applied(&t, before);
    assert_eq!(
        exchange(t.pod("outsider"), server, b"plain".to_vec()).unwrap(),
        b"plain"
    );
}

#[test]
fn a_policy_change_closes_connections_that_no_longer_pass() {
    if !e2e_available() {
        return;
    }
    let t = cluster();
    let server = addr(&t, "server", 8080);
    // A long-lived connection from the client, echoing as it goes.
    let (tx, rx) = std::sync::mpsc::channel::<std::io::Result<()>>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let client_ns = t.pod("client").ns.clone();
    let conn = std::thread::spawn(move || {
        in_ns(&client_ns, move || {
            use std::io::{Read, Write};
            let mut s =
                std::net::TcpStream::connect_timeout(&server, Duration::from_secs(5)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut buf = [0u8; 5];
            s.write_all(b"hello").unwrap();
            s.read_exact(&mut buf).unwrap();
            tx.send(Ok(())).unwrap();
            go_rx.recv().unwrap();
            // After the policy change the connection must be gone.
            let _ = s.write_all(b"again");
            let r = s.read(&mut buf);
            tx.send(match r {
                Ok(0) => Err(std::io::Error::other("closed")),
                Ok(_) => Ok(()),
                Err(e) => Err(e),
            })
            .unwrap();
        })
    });
    rx.recv()
        .unwrap()
        .expect("connection open before the change");
    let deny = r#"authorizationPolicies:
  - metadata: {name: cut-client, namespace: shop}
    spec: {action: DENY, rules: [{from: [{source: {principals: ["cluster.local/ns/shop/sa/client"]}}]}]}
"#;
    let before = applied(&t);
    write_mesh_with(&t, true, deny);
    wait_applied(&t, before);
    go_tx.send(()).unwrap();
    let after = rx.recv().unwrap();
    assert!(
        after.is_err(),
        "the existing connection survived a DENY policy"
    );
    conn.join().unwrap();
    let b = t.metrics("node-b");
    assert_eq!(
        metric(
            &b,
            "sluice_policy_denials_total",
            &[r#"policy="shop/cut-client""#, r#"connection="existing""#]
        ),
        1,
        "{b}"
    );
    // New connections are refused too.
    let r = exchange(t.pod("client"), server, b"new".to_vec());
    assert!(r.as_ref().map(|b| b.is_empty()).unwrap_or(true), "{r:?}");
}

/// node-a: client (.1), waypoint (.5, not captured); node-b: web-v1 (.1),
/// web-v2 (.2), shadow (.3). Service `web` (10.96.0.20:80) uses waypoint
/// `shop/waypoint` through its namespace's label.
fn waypoint_cluster() -> Topology {
    let mut t = Topology::new();
    t.add_node("node-a");
    t.add_node("node-b");
    t.add_pod("node-a", "client", 1);
    t.add_pod("node-a", "waypoint", 5);
    t.add_pod("node-b", "web-v1", 1);
    t.add_pod("node-b", "web-v2", 2);
    t.add_pod("node-b", "shadow", 3);
    let mut y = String::from(
        "nodes: [{name: node-a}, {name: node-b}]\nnamespaces:\n  - {name: shop, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}\nworkloads:\n",
    );
    for p in &t.pods {
        let (sa, labels) = match p.name.as_str() {
            "waypoint" => (
                "waypoint",
                "gateway.networking.k8s.io/gateway-name: waypoint, istio.io/dataplane-mode: none"
                    .to_string(),
            ),
            n if n.starts_with("web-") => ("web", format!("app: web, version: {}", &n[4..])),
            n => (n, format!("app: {n}")),
        };
        y.push_str(&format!(
            "  - {{name: {n}, namespace: shop, serviceAccount: {sa}, node: {node}, ips: [\"{ip}\", \"{ip6}\"], netns: {ns}, labels: {{{labels}}}}}\n",
            n = p.name,
            node = p.node,
            ip = p.ip,
            ip6 = p.ip6,
            ns = p.ns
        ));
    }
    y.push_str(
        r#"services:
  - {name: web, namespace: shop, vips: ["10.96.0.20"], ports: [{port: 80, targetPort: 8080}], selector: {app: web}}
  - {name: web-v1, namespace: shop, ports: [{port: 80, targetPort: 8080}], selector: {app: web, version: v1}}
  - {name: web-v2, namespace: shop, ports: [{port: 80, targetPort: 8080}], selector: {app: web, version: v2}}
  - {name: shadow, namespace: shop, ports: [{port: 80, targetPort: 8080}], selector: {app: shadow}}
gateways:
  - metadata: {name: waypoint, namespace: shop}
    spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
httpRoutes:
  - metadata: {name: web, namespace: shop}
    spec:
      parentRefs: [{kind: Service, name: web, port: 80}]
      rules:
        - matches: [{headers: [{name: x-version, value: v2}]}]
          backendRefs: [{name: web-v2, port: 80}]
        - matches: [{path: {value: /canary}}]
          backendRefs: [{name: web-v1, port: 80, weight: 90}, {name: web-v2, port: 80, weight: 10}]
        - matches: [{path: {value: /fault}}]
          fault: {abort: {httpStatus: 503, percentage: 100}}
        - matches: [{path: {value: /flaky}}]
          backendRefs: [{name: web-v1, port: 80}]
          retry: {attempts: 2, backoff: 5ms}
        - matches: [{path: {value: /slow}}]
          backendRefs: [{name: web-v1, port: 80}]
          timeouts: {request: 300ms}
        - matches: [{path: {value: /mirror}}]
          backendRefs: [{name: web-v1, port: 80}]
          filters: [{type: RequestMirror, requestMirror: {backendRef: {name: shadow, port: 80}}}]
        - matches: [{path: {value: /limited}}]
          backendRefs: [{name: web-v1, port: 80}]
          rateLimit: {requests: 3, interval: 1m}
        - backendRefs: [{name: web-v1, port: 80}]
authorizationPolicies:
  - metadata: {name: no-admin, namespace: shop}
    spec:
      targetRefs: [{kind: Service, name: web}]
      action: DENY
      rules: [{to: [{operation: {paths: ["/admin*"], methods: ["GET", "POST"]}}]}]
"#,
    );
    write_atomic(&t.mesh_file(), &y);
    t
}

/// `curl` from the client pod: (status, body).
fn curl(t: &Topology, args: &[&str]) -> (u16, String) {
    let mut all = vec!["curl", "-sS", "--max-time", "10", "-w", "\n%{http_code}"];
    all.extend_from_slice(args);
    let out = t.run_in("client", &all);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (
        code.trim().parse().unwrap_or(0),
        body.to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn a_waypoint_routes_and_polices_real_http_clients_through_ebpf_capture() {
    if !e2e_available() {
        return;
    }
    let mut t = waypoint_cluster();
    let _v1 = http_in(t.pod("web-v1"), 8080, "v1");
    let _v2 = http_in(t.pod("web-v2"), 8080, "v2");
    let shadow = http_in(t.pod("shadow"), 8080, "shadow");
    t.start_agent("node-a");
    t.start_agent("node-b");
    // The agents create the root CA; the waypoint shares it.
    t.start_waypoint("waypoint", "shop/waypoint");
    let url = |p: &str| format!("http://10.96.0.20{p}");

    // Header routing, default route.
    let (st, body) = curl(&t, &[&url("/hello")]);
    assert_eq!(
        (st, body.trim()),
        (200, "v1 GET /hello -"),
        "{}",
        t.agent_log("node-a")
    );
    let (st, body) = curl(&t, &["-H", "x-version: v2", &url("/hello")]);
    assert_eq!((st, body.trim()), (200, "v2 GET /hello -"));
    // Weighted split: 1000 requests on one keep-alive connection.
    let (st, body) = curl(&t, &[&url("/canary?n=[1-1000]")]);
    assert_eq!(st, 200);
    let (v1, v2) = (
        body.matches("v1 GET").count(),
        body.matches("v2 GET").count(),
    );
    assert_eq!(v1 + v2, 1000, "{body}");
    // Binomial(1000, 0.1): σ ≈ 9.5; ±5σ.
    assert!((52..=148).contains(&v2), "v2 got {v2} of 1000");
    // Fault, retry, timeout, mirror, deny, rate limit.
    assert_eq!(curl(&t, &[&url("/fault")]).0, 503);
    for _ in 0..3 {
        let (st, body) = curl(&t, &[&url("/flaky")]);
        assert_eq!((st, body.trim()), (200, "v1 GET /flaky -"));
    }
    assert_eq!(curl(&t, &[&url("/slow")]).0, 504);
    assert_eq!(curl(&t, &[&url("/mirror")]).0, 200);
    let mut mirrored = false;
    for _ in 0..200 {
        if shadow.load(std::sync::atomic::Ordering::SeqCst) == 1 {
            mirrored = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    assert!(mirrored, "the shadow backend got no copy");
    let (st, body) = curl(&t, &[&url("/admin")]);
    assert_eq!(st, 403, "{body}");
    let codes: Vec<u16> = (0..4).map(|_| curl(&t, &[&url("/limited")]).0).collect();
    assert_eq!(codes, [200, 200, 200, 429]);

    // HTTP/2 (prior knowledge) with h2load: 2000 requests, 4 clients, 10
    // streams each, all answered.
    let out = t.run_in(
        "client",
        &["h2load", "-n", "2000", "-c", "4", "-m", "10", &url("/h2")],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("2000 succeeded, 0 failed") && text.contains("2000 2xx"),
        "h2load:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Run `sluice-bench` with `args`, its output in a new directory; fails
/// the test unless it succeeds. Returns the directory and its stderr.
fn run_bench(name: &str, args: &[&str]) -> (sluice_tests::TempDir, String) {
    let out = sluice_tests::TempDir::new(name);
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_sluice-bench"))
        .args(args)
        .arg("--out")
        .arg(&out.0)
        .output()
        .expect("sluice-bench runs");
    let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
    assert!(
        run.status.success(),
        "sluice-bench {} failed:\n{stderr}",
        args.join(" ")
    );
    (out, stderr)
}

/// `sluice-bench --profile` (issue 17's starting picture): for the L4 and
/// L7 paths, per-request counters from `perf stat` and a flame graph per
/// proxy whose stacks resolve to Sluice's own code. Only that the picture
/// is there and readable is judged, not what it shows.
#[test]
fn the_profile_mode_draws_flame_graphs_of_each_proxy() {
    if !e2e_available() {
        return;
    }
    let (out, stderr) = run_bench(
        "profile",
        &["--profile", "--duration", "2s", "--rate", "200"],
    );
    let md = std::fs::read_to_string(out.0.join("profile.md")).unwrap();
    for (path, who) in [
        ("l4", "agent-node-a"),
        ("l4", "agent-node-b"),
        ("l7", "agent-node-a"),
        ("l7", "waypoint"),
    ] {
        let svg = std::fs::read_to_string(out.0.join(format!("profile-{path}-{who}.svg")))
            .unwrap_or_else(|e| panic!("{path} {who}: {e}\n{stderr}"));
        assert!(svg.contains("<svg"), "{path} {who}: not an SVG");
        let folded =
            std::fs::read_to_string(out.0.join(format!("profile-{path}-{who}.folded"))).unwrap();
        let own = if who == "waypoint" {
            "waypoint::"
        } else {
            "node_agent::"
        };
        assert!(
            folded.contains(own) || folded.contains("mesh_core::"),
            "{path} {who}: no frame of Sluice's code resolved:\n{}",
            &folded[..folded.len().min(2000)]
        );
    }
    // The counters: each proxy made system calls for the requests.
    let row = md
        .lines()
        .find(|l| l.starts_with("| L4: agents + HBONE | agent node-a |"))
        .unwrap_or_else(|| panic!("no L4 row:\n{md}"));
    let cells: Vec<&str> = row.split('|').map(str::trim).collect();
    let syscalls: f64 = cells[7].parse().unwrap_or_else(|_| panic!("{row}"));
    assert!(syscalls > 0.0, "{row}");
    assert!(md.contains("### L7: + waypoint: waypoint"), "{md}");
    // Where the time goes: the share in system calls, and the functions
    // by total time, under which Sluice's own layers appear.
    assert!(md.contains("% in system calls"), "{md}");
    assert!(md.contains("| total % | function |"), "{md}");
}

/// `sluice-bench` (what `cargo xtask bench` runs) end to end with tiny
/// durations: every scenario runs without errors and the report has every
/// section. The numbers themselves are not judged here (debug build, a
/// busy machine): that is the benchmark's job, not a test's.
#[test]
fn the_benchmark_runs_every_scenario_and_writes_its_report() {
    if !e2e_available() {
        return;
    }
    let (out, stderr) = run_bench(
        "bench",
        &[
            "--duration",
            "1s",
            "--repeats",
            "1",
            "--rate",
            "200",
            "--throughput-duration",
            "1s",
            "--idle-connections",
            "200",
            "--scale-pods",
            "1,5",
        ],
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.0.join("report.json")).unwrap()).unwrap();
    for path in ["direct", "l4", "l7"] {
        let l = &report["latency_us"][path];
        assert_eq!(l["errors"], 0, "{path}: {l}\n{stderr}");
        assert!(l["p50"]["median"].as_f64().unwrap() > 0.0, "{path}: {l}");
    }
    for path in ["direct", "l4"] {
        let t = &report["throughput"][path];
        assert!(
            t["single_stream_gbps"]["median"].as_f64().unwrap() > 0.0,
            "{t}"
        );
        assert!(
            t["new_connections_per_s"]["median"].as_f64().unwrap() > 0.0,
            "{t}"
        );
    }
    assert_eq!(report["idle_connections"]["opened"], 200);
    for a in report["idle_connections"]["agents"].as_array().unwrap() {
        assert!(a["rss_closed_mb"].as_f64().unwrap() > 0.0, "{a}");
    }
    assert_eq!(report["enrollment"]["rows"].as_array().unwrap().len(), 2);
    assert_eq!(report["targets"].as_array().unwrap().len(), 12);
    let md = std::fs::read_to_string(out.0.join("report.md")).unwrap();
    assert!(md.contains("## Added latency vs direct"), "{md}");
    let svg = std::fs::read_to_string(out.0.join("latency.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("L4: agents + HBONE"));
}
