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
    let agent = node_agent::start(cfg, Arc::new(ExplicitMappings::default()))
        .await
        .unwrap();
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
    let _ = std::fs::remove_dir_all(&dir);
}
