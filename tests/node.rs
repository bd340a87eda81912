//! Sluice on real nodes: a control plane and two kubelets with containerd
//! and CNI on this machine ([`sluice_tests::cluster`]), Sluice installed as
//! a user would (`deploy/`), workloads created by the kubelet.

use std::time::Duration;

use sluice_tests::cluster::{build_sluice_image, cluster_available, Cluster};
use sluice_tests::kube::for_api_server_1_20;

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");

/// `deploy/manifests/<file>` as this cluster takes it: rendered for the
/// v1.20 API server (no DaemonSet surge), and with the CA addressed by its
/// Service IP, its certificate still checked for its DNS name (the test
/// cluster runs no DNS server).
fn manifest(file: &str, ca: Option<&str>) -> String {
    let text = std::fs::read_to_string(format!("{DEPLOY}/manifests/{file}")).unwrap();
    let text = for_api_server_1_20(&text);
    match ca {
        Some(ip) => {
            let mut out = String::new();
            for line in text.lines() {
                if let Some(indent) =
                    line.strip_suffix("- --ca-address=sluice-ca.sluice-system.svc:15012")
                {
                    out.push_str(&format!("{indent}- --ca-address={ip}:15012\n{indent}- --ca-server-name=sluice-ca.sluice-system.svc\n"));
                } else {
                    out.push_str(line);
                    out.push('\n');
                }
            }
            assert!(
                out.contains("--ca-server-name"),
                "{file}: no CA address to rewrite"
            );
            out
        }
        None => text,
    }
}

fn ready(c: &Cluster, kind: &str, ns: &str, name: &str) -> bool {
    let field = match kind {
        "daemonset" => "{.status.numberReady}/{.status.desiredNumberScheduled}",
        _ => "{.status.readyReplicas}/{.spec.replicas}",
    };
    let out = c.kubectl_out(&[
        "get",
        kind,
        name,
        "-n",
        ns,
        "-o",
        &format!("jsonpath={field}"),
    ]);
    let (a, b) = out.split_once('/').unwrap_or(("", "x"));
    !a.is_empty() && a == b && a != "0"
}

#[test]
fn sluice_runs_on_real_kubelets() {
    if !cluster_available() {
        return;
    }
    let c = Cluster::start();
    let ebpf = std::env::var("SLUICE_EBPF_OBJECT")
        .unwrap_or_else(|_| format!("{DEPLOY}/../target/ebpf/sluice-ebpf.o"));
    let image = build_sluice_image(&c.dir.0, std::path::Path::new(&ebpf));
    c.import_image(&image);
    c.kubectl(&["apply", "-f", &format!("{DEPLOY}/crds")]);
    for f in ["00-namespace.yaml", "10-rbac.yaml", "15-ca.yaml"] {
        c.apply(&manifest(f, None));
    }
    let ca_ip = c.kubectl_out(&[
        "get",
        "service",
        "sluice-ca",
        "-n",
        "sluice-system",
        "-o",
        "jsonpath={.spec.clusterIP}",
    ]);
    let dump = |c: &Cluster| {
        format!(
            "{}\n{}\n{}",
            c.kubectl_out(&["get", "pods", "-A", "-o", "wide"]),
            c.kubectl_out(&["describe", "pods", "-n", "sluice-system"]),
            c.kubectl_out(&[
                "logs",
                "-n",
                "sluice-system",
                "-l",
                "app.kubernetes.io/part-of=sluice",
                "--tail=30",
                "--all-containers"
            ])
        )
    };
    let limit = Duration::from_secs(60);
    let deadline = std::time::Instant::now() + limit;
    while !ready(&c, "deployment", "sluice-system", "sluice-ca") {
        assert!(
            std::time::Instant::now() < deadline,
            "CA not ready:\n{}",
            dump(&c)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    c.apply(&manifest("20-agent-daemonset.yaml", Some(&ca_ip)));
    let deadline = std::time::Instant::now() + limit;
    while !ready(&c, "daemonset", "sluice-system", "sluice-agent") {
        assert!(
            std::time::Instant::now() < deadline,
            "agents not ready:\n{}",
            dump(&c)
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // A namespace enrolled by label: its pods, created by the kubelet, are
    // captured; traffic between them goes over HBONE.
    c.apply(
        r#"apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: client, namespace: shop}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: server, namespace: shop}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop, labels: {app: client}}
spec:
  nodeName: node-a
  serviceAccountName: client
  terminationGracePeriodSeconds: 1
  containers: [{name: c, image: localhost/busybox:1, imagePullPolicy: Never, command: [sleep, "3600"]}]
---
apiVersion: v1
kind: Pod
metadata: {name: server-b, namespace: shop, labels: {app: server}}
spec:
  nodeName: node-b
  serviceAccountName: server
  terminationGracePeriodSeconds: 1
  containers:
    - {name: c, image: localhost/busybox:1, imagePullPolicy: Never, readinessProbe: {httpGet: {path: /healthz, port: 8080}, periodSeconds: 2}}
---
apiVersion: v1
kind: Pod
metadata: {name: server-a, namespace: shop, labels: {app: server}}
spec:
  nodeName: node-a
  serviceAccountName: server
  terminationGracePeriodSeconds: 1
  containers:
    - {name: c, image: localhost/busybox:1, imagePullPolicy: Never, readinessProbe: {httpGet: {path: /healthz, port: 8080}, periodSeconds: 2}}
"#,
    );
    for pod in ["client", "server-a", "server-b"] {
        let deadline = std::time::Instant::now() + limit;
        while c.kubectl_out(&[
            "get",
            "pod",
            pod,
            "-n",
            "shop",
            "-o",
            "jsonpath={.status.phase}",
        ]) != "Running"
        {
            assert!(
                std::time::Instant::now() < deadline,
                "{pod} not running:\n{}",
                dump(&c)
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    let ip = |pod: &str| {
        c.kubectl_out(&[
            "get",
            "pod",
            pod,
            "-n",
            "shop",
            "-o",
            "jsonpath={.status.podIP}",
        ])
    };
    let agent_logs = |c: &Cluster| {
        c.kubectl_out(&[
            "logs",
            "-n",
            "sluice-system",
            "-l",
            "app.kubernetes.io/name=sluice-agent",
            "--tail=-1",
        ])
    };
    let fetch = |server: &str| {
        let url = format!("http://{}:8080/", ip(server));
        c.kubectl_out(&["exec", "-n", "shop", "client", "--", "wget", "-qO-", &url])
    };
    // Cross-node (server-b) and same-node (server-a), over HBONE with
    // both identities, once the agents have enrolled the pods and hold
    // their certificates.
    for server in ["server-b", "server-a"] {
        let deadline = std::time::Instant::now() + limit;
        while fetch(server) != "hello from busybox httpd\n" {
            assert!(
                std::time::Instant::now() < deadline,
                "{server} unreachable:\n{}",
                dump(&c)
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        let logs = agent_logs(&c);
        let tunnelled = logs.lines().any(|l| {
            l.contains("\"direction\":\"outbound\"")
                && l.contains(&format!("\"dst.workload\":\"shop/{server}\""))
                && l.contains("\"src.identity\":\"spiffe://cluster.local/ns/shop/sa/client\"")
                && l.contains("\"dst.identity\":\"spiffe://cluster.local/ns/shop/sa/server\"")
                && l.contains("\"mtls\":true")
        });
        let received = logs.lines().any(|l| {
            l.contains("\"direction\":\"inbound\"")
                && l.contains(&format!("\"dst.workload\":\"shop/{server}\""))
                && l.contains(&format!("\"src.addr\":\"{}:", ip("client")))
                && l.contains("\"mtls\":true")
        });
        assert!(
            tunnelled && received,
            "{server}: no HBONE in the agents' access logs:\n{logs}"
        );
    }
    // Removing the label stops capture, without restarting any pod.
    let outbound = |c: &Cluster| {
        agent_logs(c)
            .lines()
            .filter(|l| l.contains("\"direction\":\"outbound\""))
            .count()
    };
    c.kubectl(&["label", "namespace", "shop", "istio.io/dataplane-mode-"]);
    // Un-enrolled, then past the grace in which its listeners still serve
    // what was redirected just before: connections go direct.
    let deadline = std::time::Instant::now() + limit;
    while agent_logs(&c)
        .matches("drain period over; listeners closed")
        .count()
        < 3
    {
        assert!(
            std::time::Instant::now() < deadline,
            "never un-enrolled:\n{}",
            dump(&c)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let before = outbound(&c);
    assert_eq!(fetch("server-b"), "hello from busybox httpd\n");
    assert_eq!(outbound(&c), before, "still captured after the label went");
    let restarts = c.kubectl_out(&[
        "get",
        "pods",
        "-n",
        "shop",
        "-o",
        "jsonpath={.items[*].status.containerStatuses[*].restartCount}",
    ]);
    assert!(
        restarts.split_whitespace().all(|r| r == "0"),
        "restarts: {restarts}"
    );
    let restarts = c.kubectl_out(&[
        "get",
        "pods",
        "-n",
        "sluice-system",
        "-o",
        "jsonpath={.items[*].status.containerStatuses[*].restartCount}",
    ]);
    assert!(
        restarts.split_whitespace().all(|r| r == "0"),
        "Sluice restarted: {restarts}\n{}",
        dump(&c)
    );
}
