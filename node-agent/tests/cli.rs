//! `sluicectl` against a real agent (in-process, on loopback) and real mesh
//! files: tables for people, JSON for scripts, exit codes for CI.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use node_agent::orig_dst::ExplicitMappings;
use node_agent::AgentConfig;

fn sluicectl(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sluicectl"))
        .args(args)
        .output()
        .expect("run sluicectl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("sluicectl-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

const MESH: &str = r#"
nodes: [{name: node-a}]
workloads:
  - {name: client, namespace: shop, serviceAccount: client, node: node-a, ips: ["127.231.7.1"], labels: {app: client}}
  - {name: server, namespace: shop, serviceAccount: server, node: node-a, ips: ["127.231.7.2"], labels: {app: server}}
authorizationPolicies:
  - metadata: {name: server-from-client, namespace: shop}
    spec:
      selector: {matchLabels: {app: server}}
      rules: [{from: [{source: {principals: ["cluster.local/ns/shop/sa/client"]}}]}]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspects_a_running_agent() {
    let dir = temp_dir("agent");
    let mesh = dir.join("mesh.yaml");
    std::fs::write(&mesh, MESH).unwrap();
    let mut cfg = AgentConfig::new("node-a", mesh.clone());
    let local: SocketAddr = "127.0.0.1:0".parse().unwrap();
    (cfg.admin_addr, cfg.metrics_addr, cfg.readiness_addr) = (local, local, local);
    let redirects = Arc::new(ExplicitMappings::default());
    let agent = node_agent::start(cfg, redirects.clone()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(20), agent.wait_ready())
        .await
        .unwrap();
    let admin = agent.admin_addr.to_string();

    let a = admin.clone();
    let (code, table, err) =
        tokio::task::spawn_blocking(move || sluicectl(&["workloads", "--admin", &a]))
            .await
            .unwrap();
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("NAMESPACE") && lines[0].contains("IDENTITY"),
        "{table}"
    );
    assert!(lines.iter().any(|l| l.contains("client") && l.contains("spiffe://cluster.local/ns/shop/sa/client")), "{table}");

    let a = admin.clone();
    let (code, json, _) =
        tokio::task::spawn_blocking(move || sluicectl(&["certs", "--admin", &a, "-o", "json"]))
            .await
            .unwrap();
    assert_eq!(code, 0);
    let certs: serde_json::Value = serde_json::from_str(&json).unwrap();
    let ids: Vec<&str> = certs
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["identity"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            "spiffe://cluster.local/ns/shop/sa/client",
            "spiffe://cluster.local/ns/shop/sa/server"
        ]
    );
    assert!(!json.contains("PRIVATE KEY"));

    // One connection client -> server through the agent, then the log.
    let echo = tokio::net::TcpListener::bind("127.231.7.2:9090")
        .await
        .unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = echo.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let connect = || async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.231.7.1:0".parse().unwrap()).unwrap();
        redirects.insert(
            sock.local_addr().unwrap(),
            "127.231.7.2:9090".parse().unwrap(),
        );
        let mut s = sock
            .connect("127.231.7.1:15001".parse().unwrap())
            .await
            .unwrap();
        s.write_all(b"ping").await.unwrap();
        s.shutdown().await.unwrap();
        let mut back = Vec::new();
        s.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"ping");
    };
    connect().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let a = admin.clone();
    let (code, lines, err) =
        tokio::task::spawn_blocking(move || sluicectl(&["logs", "--admin", &a, "-o", "json"]))
            .await
            .unwrap();
    assert_eq!(code, 0, "{err}");
    let records: Vec<serde_json::Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let inbound = records
        .iter()
        .find(|r| r["direction"] == "inbound")
        .expect("inbound record");
    assert_eq!(
        inbound["src.identity"],
        "spiffe://cluster.local/ns/shop/sa/client"
    );
    assert_eq!(
        inbound["policy"],
        "allowed by ALLOW policy shop/server-from-client"
    );
    assert_eq!(inbound["bytes_recv"], 4);
    // The source agent's W3C baggage arrives with the tunnel.
    assert!(
        inbound["baggage"]
            .as_str()
            .unwrap()
            .contains("k8s.namespace.name=shop"),
        "{inbound}"
    );
    assert!(records
        .iter()
        .any(|r| r["direction"] == "outbound" && r["outcome"] == "complete"));
    let a = admin.clone();
    let (_, table, _) = tokio::task::spawn_blocking(move || sluicectl(&["logs", "--admin", &a]))
        .await
        .unwrap();
    assert!(
        table.starts_with("TIME") && table.contains("shop/server-from-client"),
        "{table}"
    );

    // Follow: a new connection shows up while sluicectl is running.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sluicectl"))
        .args(["logs", "-f", "-o", "json", "--admin", &admin])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                return;
            }
        }
    });
    // The kept records arrive first.
    let seen_before = records.len();
    for _ in 0..seen_before {
        rx.recv_timeout(Duration::from_secs(10))
            .expect("kept records");
    }
    connect().await;
    let fresh = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("a followed record");
    assert!(fresh.contains("\"direction\""), "{fresh}");
    let _ = child.kill();
    let _ = child.wait();

    let a = admin.clone();
    let (code, yaml, _) = tokio::task::spawn_blocking(move || {
        sluicectl(&["config-dump", "--admin", &a, "-o", "yaml"])
    })
    .await
    .unwrap();
    assert_eq!(code, 0);
    assert!(yaml.contains("node: node-a"), "{yaml}");
    agent.shutdown();

    // An agent that is not there: a clear error, not a hang.
    let (code, _, err) = sluicectl(&["workloads", "--admin", "127.0.0.1:1"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("cannot reach the agent's admin endpoint"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn analyze_and_check_mesh_files() {
    let dir = temp_dir("files");
    let good = dir.join("good.yaml");
    std::fs::write(&good, MESH).unwrap();
    let (code, out, _) = sluicectl(&["analyze", good.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("no problems found"), "{out}");

    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, MESH.replace("\"127.231.7.2\"", "\"127.231.7.1\"")).unwrap();
    let (code, out, _) = sluicectl(&["analyze", bad.to_str().unwrap(), "-o", "json"]);
    assert_eq!(code, 1);
    let findings: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(findings[0]["level"], "error");
    assert_eq!(findings[0]["object"], "workloads[1].ips[0]");

    let warn = dir.join("warn.yaml");
    std::fs::write(
        &warn,
        MESH.replace("app: server}}\n      rules", "app: srever}}\n      rules"),
    )
    .unwrap();
    let (code, out, _) = sluicectl(&["analyze", warn.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(out.contains("selects no workload"), "{out}");
    let (code, _, _) = sluicectl(&["analyze", warn.to_str().unwrap(), "--fail-on-warning"]);
    assert_eq!(code, 1);

    let g = good.to_str().unwrap();
    let (code, out, _) = sluicectl(&[
        "check",
        "--mesh-file",
        g,
        "--from",
        "shop/client",
        "--to",
        "127.231.7.2:8080",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("VERDICT")
            && out.contains("ALLOW: allowed by ALLOW policy shop/server-from-client"),
        "{out}"
    );
    let (code, out, _) = sluicectl(&[
        "check",
        "--mesh-file",
        g,
        "--from",
        "shop/client",
        "--plaintext",
        "--to",
        "127.231.7.2:8080",
        "-o",
        "json",
    ]);
    assert_eq!(code, 3);
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["allowed"], false);
    assert_eq!(
        report["applicablePolicies"][0],
        "ALLOW shop/server-from-client"
    );

    // A DENY whose only clause is L7 (no effect at L4, as in Istio) is
    // named with the clause; a dry-run one shows what it would decide.
    let l7 = dir.join("l7.yaml");
    std::fs::write(
        &l7,
        format!(
            "{MESH}  - metadata: {{name: no-posts, namespace: shop}}\n    spec: {{action: DENY, rules: [{{to: [{{operation: {{methods: [POST]}}}}]}}]}}\n  - metadata: {{name: trial, namespace: shop, annotations: {{istio.io/dry-run: \"true\"}}}}\n    spec: {{action: DENY, rules: [{{}}]}}\n"
        ),
    )
    .unwrap();
    let (code, out, _) = sluicectl(&["analyze", l7.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("shop/no-posts") && out.contains("rules[0] (to: methods)"),
        "{out}"
    );
    let (code, out, _) = sluicectl(&[
        "check",
        "--mesh-file",
        l7.to_str().unwrap(),
        "--from",
        "shop/client",
        "--to",
        "127.231.7.2:8080",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("shop/trial would deny"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}
