//! Sluice on real nodes: a control plane and two kubelets with containerd
//! and CNI on this machine ([`sluice_tests::cluster`]), Sluice installed as
//! a user would (`kubectl apply -f deploy/manifests`, then `helm install`
//! of `deploy/helm/sluice`), workloads created by the kubelet.

use std::path::Path;
use std::time::{Duration, Instant};

use sluice_tests::cluster::{
    build_sluice_image, cluster_available, Cluster, CNI_BIN_DIR, CNI_CONF_DIR,
};
use sluice_tests::kube::{for_api_server_1_20, helm};

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");
/// How long Sluice may take to become Ready after an install.
const READY: Duration = Duration::from_secs(60);
/// How long the agent pods may take to go from the API once deleted (the
/// kubelet reclaims them first).
const GONE: Duration = Duration::from_secs(150);
/// The CA's Service IP in the Helm install (in the cluster's 10.96.0.0/24).
const HELM_CA_IP: &str = "10.96.0.53";

/// `deploy/manifests/<file>` as this cluster takes it: rendered for the
/// v1.20 API server (no DaemonSet surge), and with the CA addressed by its
/// Service IP, its certificate still checked for its DNS name (the test
/// cluster runs no DNS server).
fn manifest(file: &str, ca: Option<&str>) -> String {
    let text = std::fs::read_to_string(format!("{DEPLOY}/manifests/{file}")).unwrap();
    let text = for_api_server_1_20(&text)
        .replace("path: /opt/cni/bin,", &format!("path: {CNI_BIN_DIR},"))
        .replace("path: /etc/cni/net.d,", &format!("path: {CNI_CONF_DIR},"));
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
    let out = get(c, kind, ns, name, field);
    let (a, b) = out.split_once('/').unwrap_or(("", "x"));
    !a.is_empty() && a == b && a != "0"
}

/// `kubectl get <kind> <name> -n <ns>`, one JSONPath of it ("" on failure).
fn get(c: &Cluster, kind: &str, ns: &str, name: &str, jsonpath: &str) -> String {
    c.kubectl_out(&[
        "get",
        kind,
        name,
        "-n",
        ns,
        "-o",
        &format!("jsonpath={jsonpath}"),
    ])
}

/// A JSONPath over the agent pods.
fn agent_pods(c: &Cluster, jsonpath: &str) -> String {
    c.kubectl_out(&[
        "get",
        "pods",
        "-n",
        "sluice-system",
        "-l",
        "app.kubernetes.io/name=sluice-agent",
        "-o",
        &format!("jsonpath={jsonpath}"),
    ])
}

fn no_agents(c: &Cluster) -> bool {
    agent_pods(c, "{.items[*].metadata.name}").trim().is_empty()
}

/// A command in the shop's client pod: its standard output ("" on failure).
fn in_client(c: &Cluster, args: &[&str]) -> String {
    let mut all = vec!["exec", "-n", "shop", "client", "--"];
    all.extend_from_slice(args);
    c.kubectl_out(&all)
}

/// What the test looks at when something fails.
fn dump(c: &Cluster) -> String {
    // What each kubelet last said about Sluice's pods.
    let kubelets: String = ["node-a", "node-b"]
        .iter()
        .map(|node| {
            let log = c.component_log(&format!("kubelet-{node}"));
            let lines: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("sluice") || l.contains("waypoint"))
                .collect();
            let tail = lines[lines.len().saturating_sub(15)..].join("\n");
            format!("--- kubelet {node}\n{tail}\n")
        })
        .collect();
    format!(
        "{}\n{}\n{}\n{}",
        c.kubectl_out(&["get", "pods", "-A", "-o", "wide"]),
        kubelets,
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
}

/// For debugging a failure on the live cluster: with
/// `SLUICE_TEST_HOLD=<file>`, a failed wait creates the file and keeps the
/// cluster up (at most 30 minutes) until the file is removed.
fn hold(c: &Cluster, what: &str) {
    let Ok(file) = std::env::var("SLUICE_TEST_HOLD") else {
        return;
    };
    std::fs::write(&file, format!("{what}\n")).unwrap();
    eprintln!(
        "{what}: failed; cluster held until {file} is removed (KUBECONFIG={})",
        c.kubeconfig.display()
    );
    let until = Instant::now() + Duration::from_secs(1800);
    while Path::new(&file).exists() && Instant::now() < until {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Poll `ok` every half second until it holds; fail with the cluster's
/// state after `limit`.
fn wait(c: &Cluster, what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ok() {
        if Instant::now() >= deadline {
            hold(c, what);
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {limit:?}\n{}",
            dump(c)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn sluice_ready(c: &Cluster) {
    wait(c, "CA ready", READY, || {
        ready(c, "deployment", "sluice-system", "sluice-ca")
    });
    wait(c, "agents ready", READY, || {
        ready(c, "daemonset", "sluice-system", "sluice-agent")
    });
}

fn agent_logs(c: &Cluster) -> String {
    c.kubectl_out(&[
        "logs",
        "-n",
        "sluice-system",
        "-l",
        "app.kubernetes.io/name=sluice-agent",
        "--tail=-1",
    ])
}

fn pod_ip(c: &Cluster, ns: &str, pod: &str) -> String {
    get(c, "pod", ns, pod, "{.status.podIP}")
}

/// `wget` from `ns/from` to shop's pod `to`, port 8080: the body, or ""
/// on failure.
fn fetch(c: &Cluster, ns: &str, from: &str, to: &str) -> String {
    fetch_ip(c, ns, from, &pod_ip(c, "shop", to))
}

fn fetch_ip(c: &Cluster, ns: &str, from: &str, ip: &str) -> String {
    let url = format!("http://{ip}:8080/");
    // (busybox's `wget -T` crashes: `timeout` bounds it instead.)
    c.kubectl_out(&[
        "exec", "-n", ns, from, "--", "timeout", "5", "wget", "-qO-", &url,
    ])
}

const HELLO: &str = "hello from busybox httpd\n";

/// Restart counts of every container in `ns`.
fn restarts(c: &Cluster, ns: &str) -> Vec<String> {
    c.kubectl_out(&[
        "get",
        "pods",
        "-n",
        ns,
        "-o",
        "jsonpath={.items[*].status.containerStatuses[*].restartCount}",
    ])
    .split_whitespace()
    .map(str::to_string)
    .collect()
}

/// Whether every container of the shop's servers is Ready.
fn servers_ready(c: &Cluster) -> bool {
    ["server-a", "server-b"].iter().all(|p| {
        get(c, "pod", "shop", p, "{.status.containerStatuses[*].ready}")
            .split_whitespace()
            .all(|r| r == "true")
    })
}

/// Whether the application of pod `ns/pod` (busybox httpd, `-vv`) logged
/// a request from `ip`: what the application itself saw.
fn app_saw(c: &Cluster, ns: &str, pod: &str, ip: &str) -> bool {
    // (httpd logs `[::ffff:a.b.c.d]:port: ...` for IPv4 peers)
    c.kubectl_out(&["logs", "-n", ns, pod, "-c", "c"])
        .lines()
        .any(|l| l.starts_with(&format!("[::ffff:{ip}]:")) || l.starts_with(&format!("{ip}:")))
}

/// The delivery routing Sluice sets in a pod so that its application sees
/// its clients' addresses (`ip rule` inside the pod).
fn delivery_rule(c: &Cluster, ns: &str, pod: &str) -> bool {
    c.kubectl_out(&["exec", "-n", ns, pod, "-c", "c", "--", "ip", "rule", "show"])
        .contains("lookup 133")
}

/// Traffic from `client` to `server` crosses the agents as HBONE, with
/// both SPIFFE identities in the source agent's log, and the client pod's
/// address at the destination's and at the server application itself.
fn tunnelled(c: &Cluster, server: &str) -> bool {
    let logs = agent_logs(c);
    let client_ip = pod_ip(c, "shop", "client");
    let out = logs.lines().any(|l| {
        l.contains("\"direction\":\"outbound\"")
            && l.contains(&format!("\"dst.workload\":\"shop/{server}\""))
            && l.contains("\"src.identity\":\"spiffe://cluster.local/ns/shop/sa/client\"")
            && l.contains("\"dst.identity\":\"spiffe://cluster.local/ns/shop/sa/server\"")
            && l.contains("\"mtls\":true")
    });
    let inbound = logs.lines().any(|l| {
        l.contains("\"direction\":\"inbound\"")
            && l.contains(&format!("\"dst.workload\":\"shop/{server}\""))
            && l.contains(&format!("\"src.addr\":\"{client_ip}:"))
            && l.contains("\"mtls\":true")
    });
    out && inbound && app_saw(c, "shop", server, &client_ip)
}

/// The shop's pods reach each other over HBONE, same-node and cross-node.
fn shop_over_hbone(c: &Cluster) {
    for server in ["server-b", "server-a"] {
        wait(c, &format!("{server} over HBONE"), READY, || {
            fetch(c, "shop", "client", server) == HELLO && tunnelled(c, server)
        });
    }
}

/// The node's pins: present while Sluice is installed, even with its
/// agents away; gone after an uninstall.
fn pins(node: &str) -> bool {
    Path::new("/sys/fs/bpf/sluice").join(node).exists()
}

/// After an uninstall that began at `start`: within 30 s no agent process
/// is left on the machine, no pin on either node, and the shop's pods talk
/// directly — with no agent on the node, a capture left behind would
/// black-hole them. Then the agent pods go from the API, the CNI plugin
/// from the nodes and the delivery routing from the pods.
fn uninstalled(c: &Cluster, how: &str, start: Instant) {
    let direct = Duration::from_secs(30);
    wait(c, &format!("{how}: pods talk directly"), direct, || {
        agent_processes() == 0
            && !pins("node-a")
            && !pins("node-b")
            && fetch(c, "shop", "client", "server-b") == HELLO
            && fetch(c, "shop", "client", "server-a") == HELLO
    });
    let talk = start.elapsed();
    // The kubelet deletes a pod's API object only once it has reclaimed
    // it (volumes, cgroup; its status sync runs every 10 s): on a busy
    // machine that has taken over 60 s after the agent had exited.
    wait(c, &format!("{how}: agent pods gone"), GONE, || no_agents(c));
    eprintln!(
        "{how}: agents stopped and pods talk directly after {talk:?}; agent pods gone from the API after {:?}",
        start.elapsed()
    );
    for node in ["node-a", "node-b"] {
        assert!(
            !cni_plugin_installed(c, node),
            "{how}: the CNI plugin was left on {node}"
        );
    }
    for pod in ["server-a", "server-b"] {
        assert!(
            !delivery_rule(c, "shop", pod),
            "{how}: the delivery routing was left in {pod}"
        );
    }
}

/// Agent processes running on this machine (the nodes' containers are its
/// processes too).
fn agent_processes() -> usize {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
                .filter(|cmd| cmd.starts_with(b"/usr/bin/sluice-agent\0run\0--kube\0"))
                .count()
        })
        .unwrap_or(0)
}

/// Whether `node`'s CNI configuration chains Sluice's plugin, checked
/// against its binary being there too.
fn cni_plugin_installed(c: &Cluster, node: &str) -> bool {
    let dir = c.node_path(node, CNI_CONF_DIR);
    let conf = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .any(|t| t.contains("\"sluice-cni\""));
    let bin = c
        .node_path(node, &format!("{CNI_BIN_DIR}/sluice-cni"))
        .exists();
    assert_eq!(conf, bin, "{node}: configuration and binary disagree");
    conf
}

/// Point 4: the chart's waypoint for the shop, a pod with its own identity from
/// the CA (kubelet-projected token): a Service using it and an HTTPRoute
/// applied with kubectl, which only the waypoint can apply (a path
/// rewrite: without it the server answers 404).
fn waypoint_routes(c: &Cluster) {
    // The shop still holds the first install's mesh root (the CA
    // publishes the new one there, but the kubelet refreshes a mounted
    // ConfigMap only every minute or so): a waypoint that started with the
    // stale copy restarts once the new one shows up.
    wait(c, "waypoint ready", Duration::from_secs(180), || {
        ready(c, "deployment", "shop", "waypoint")
    });
    c.apply(
        r#"apiVersion: v1
kind: Service
metadata: {name: server, namespace: shop, labels: {istio.io/use-waypoint: waypoint}}
spec:
  selector: {app: server}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: server, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: server, port: 80}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /via-waypoint}}]
      filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}}]
      backendRefs: [{name: server, port: 80}]
"#,
    );
    let vip = get(c, "service", "shop", "server", "{.spec.clusterIP}");
    let url = format!("http://{vip}/via-waypoint");
    wait(c, "routed by the waypoint", READY, || {
        in_client(c, &["timeout", "5", "wget", "-qO-", &url]) == HELLO
    });
    let logs = agent_logs(c);
    assert!(
        logs.lines()
            .any(|l| l.contains("\"direction\":\"outbound\"")
                && l.contains("\"src.identity\":\"spiffe://cluster.local/ns/shop/sa/client\"")
                && l.contains("\"dst.identity\":\"spiffe://cluster.local/ns/shop/sa/waypoint\"")),
        "no tunnel to the waypoint's identity:\n{logs}"
    );
}

/// `helm upgrade` to a new image tag under traffic; see the caller.
fn rollout(c: &Cluster, helm: &dyn Fn(&[&str])) {
    c.tag_image(
        "ghcr.io/sluice-mesh/sluice:0.1.0",
        "ghcr.io/sluice-mesh/sluice:0.1.1",
    );
    let url = format!("http://{}:8080/", pod_ip(c, "shop", "server-b"));
    // New connections from the client, one every 0.2 s, each line the
    // outcome and the pod's uptime.
    // (In the foreground of an exec of its own: a process left in the
    // background of an exec does not outlive it.)
    let probe = format!(
        "rm -f /tmp/stop /tmp/probe.log; while [ ! -e /tmp/stop ]; do \
         if timeout 2 wget -qO- {url} >/dev/null 2>&1; then r=ok; else r=fail; fi; \
         echo \"$r $(cut -d' ' -f1 /proc/uptime)\" >> /tmp/probe.log; sleep 0.2; done"
    );
    let kubeconfig = c.kubeconfig.clone();
    let prober = std::thread::spawn(move || {
        std::process::Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["exec", "-n", "shop", "client", "--", "sh", "-c", &probe])
            .output()
    });
    wait(c, "new connections measured", READY, || {
        in_client(c, &["cat", "/tmp/probe.log"])
            .lines()
            .filter(|l| l.starts_with("ok "))
            .count()
            >= 3
    });
    // An established connection (an echo on server-b) spanning the
    // client-side agent's replacement.
    let echo_ip = pod_ip(c, "shop", "server-b");
    let kubeconfig = c.kubeconfig.clone();
    let established = std::thread::spawn(move || {
        let out = std::process::Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["exec", "-n", "shop", "client", "--", "sh", "-c"])
            .arg(format!(
                "(echo first; sleep 10; echo second; sleep 2) | timeout 20 nc {echo_ip} 9000"
            ))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    });
    std::thread::sleep(Duration::from_secs(2));
    let began = Instant::now();
    helm(&[
        "upgrade",
        "sluice",
        &format!("{DEPLOY}/helm/sluice"),
        "-n",
        "sluice-system",
        "--reuse-values",
        "--set",
        "image.tag=0.1.1",
    ]);
    wait(c, "rollout done", Duration::from_secs(180), || {
        let images = agent_pods(c, "{.items[*].spec.containers[0].image}");
        images.split_whitespace().count() == 2
            && images.split_whitespace().all(|i| i.ends_with(":0.1.1"))
            && ready(c, "daemonset", "sluice-system", "sluice-agent")
    });
    let took = began.elapsed();
    assert_eq!(
        established.join().unwrap(),
        "first\nsecond\n",
        "an established connection was cut by the rollout"
    );
    wait(c, "new connections after the rollout", READY, || {
        in_client(c, &["tail", "-n", "1", "/tmp/probe.log"]).starts_with("ok ")
    });
    in_client(c, &["touch", "/tmp/stop"]);
    let _ = prober.join();
    let log = in_client(c, &["cat", "/tmp/probe.log"]);
    let (windows, fails) = refusal_windows(&log);
    eprintln!(
        "rollout: {took:?} for both nodes; {fails} new connections failed; windows without a new connection (s): {windows:?}"
    );
}

/// From the probe log (`ok|fail <uptime>` lines): each stretch of failures
/// as the time from the last success before it to the first after it, and
/// how many attempts failed.
fn refusal_windows(log: &str) -> (Vec<f64>, usize) {
    let mut windows = vec![];
    let mut last_ok: Option<f64> = None;
    let mut failing = false;
    let mut fails = 0;
    for line in log.lines() {
        let Some((r, t)) = line.split_once(' ') else {
            continue;
        };
        let Ok(t) = t.trim().parse::<f64>() else {
            continue;
        };
        match r {
            "ok" => {
                if failing {
                    if let Some(ok) = last_ok {
                        windows.push(((t - ok) * 10.0).round() / 10.0);
                    }
                    failing = false;
                }
                last_ok = Some(t);
            }
            _ => {
                fails += 1;
                failing = true;
            }
        }
    }
    (windows, fails)
}

const SHOP: &str = r#"apiVersion: v1
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
kind: ServiceAccount
metadata: {name: other, namespace: shop}
---
apiVersion: v1
kind: Pod
metadata: {name: other, namespace: shop, labels: {app: other}}
spec:
  nodeName: node-a
  serviceAccountName: other
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
    - name: c
      image: localhost/busybox:1
      imagePullPolicy: Never
      command: [httpd, -f, -vv, -p, "8080", -h, /www]
      readinessProbe: {httpGet: {path: /healthz, port: 8080}, periodSeconds: 2}
      livenessProbe: {httpGet: {path: /healthz, port: 8080}, periodSeconds: 2, failureThreshold: 3}
    - name: echo
      image: localhost/busybox:1
      imagePullPolicy: Never
      command: [nc, -ll, -p, "9000", -e, cat]
---
apiVersion: v1
kind: Pod
metadata: {name: server-a, namespace: shop, labels: {app: server}}
spec:
  nodeName: node-a
  serviceAccountName: server
  terminationGracePeriodSeconds: 1
  containers:
    - name: c
      image: localhost/busybox:1
      imagePullPolicy: Never
      command: [httpd, -f, -vv, -p, "8080", -h, /www]
      readinessProbe: {httpGet: {path: /healthz, port: 8080}, periodSeconds: 2}
      livenessProbe: {httpGet: {path: /healthz, port: 8080}, periodSeconds: 2, failureThreshold: 3}
---
apiVersion: v1
kind: Namespace
metadata: {name: outside}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: outside}
spec:
  nodeName: node-b
  terminationGracePeriodSeconds: 1
  containers:
    - {name: c, image: localhost/busybox:1, imagePullPolicy: Never, command: [httpd, -f, -vv, -p, "8080", -h, /www]}
---
apiVersion: v1
kind: Pod
metadata: {name: outsider, namespace: outside}
spec:
  nodeName: node-a
  terminationGracePeriodSeconds: 1
  containers: [{name: c, image: localhost/busybox:1, imagePullPolicy: Never, command: [sleep, "3600"]}]
"#;

/// Only mTLS, and only the client's identity, may reach the servers.
/// A pod of the mesh created while no agent runs on its node.
const LATE: &str = r#"apiVersion: v1
kind: Pod
metadata: {name: late, namespace: shop, labels: {app: late}}
spec:
  nodeName: node-a
  serviceAccountName: server
  terminationGracePeriodSeconds: 1
  containers: [{name: c, image: localhost/busybox:1, imagePullPolicy: Never}]
"#;

const LOCKED_DOWN: &str = r#"apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: shop}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: servers, namespace: shop}
spec:
  selector: {matchLabels: {app: server}}
  action: ALLOW
  # The waypoint (below) forwards with its own identity, as in Istio.
  rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/client, cluster.local/ns/shop/sa/waypoint]}}]}]
"#;

#[test]
fn sluice_runs_on_real_kubelets() {
    if !cluster_available() {
        return;
    }
    let c = Cluster::start();
    let ebpf = std::env::var("SLUICE_EBPF_OBJECT")
        .unwrap_or_else(|_| format!("{DEPLOY}/../target/ebpf/sluice-ebpf.o"));
    let image = build_sluice_image(&c.dir.0, Path::new(&ebpf));
    c.import_image(&image);

    // 1. `kubectl apply -f deploy/manifests`: Ready within 60 s.
    c.kubectl(&["apply", "-f", &format!("{DEPLOY}/crds")]);
    for f in ["00-namespace.yaml", "10-rbac.yaml", "15-ca.yaml"] {
        c.apply(&manifest(f, None));
    }
    let ca_ip = get(
        &c,
        "service",
        "sluice-system",
        "sluice-ca",
        "{.spec.clusterIP}",
    );
    let agent_manifest = manifest("20-agent-daemonset.yaml", Some(&ca_ip));
    c.apply(&agent_manifest);
    sluice_ready(&c);
    for node in ["node-a", "node-b"] {
        wait(&c, &format!("CNI plugin on {node}"), READY, || {
            cni_plugin_installed(&c, node)
        });
    }

    // 2. A namespace enrolled by label: its pods, created by the kubelet,
    // are captured; traffic between them goes over HBONE.
    c.apply(SHOP);
    for (ns, pod) in [
        ("shop", "client"),
        ("shop", "server-a"),
        ("shop", "server-b"),
        ("shop", "other"),
        ("outside", "outsider"),
        ("outside", "web"),
    ] {
        wait(&c, &format!("{pod} running"), READY, || {
            get(&c, "pod", ns, pod, "{.status.phase}") == "Running"
        });
    }
    shop_over_hbone(&c);
    // A destination outside the mesh gets plaintext (passthrough), dialled
    // from inside the client pod's namespace: it sees the pod, not the
    // agent.
    let web = pod_ip(&c, "outside", "web");
    assert_eq!(fetch_ip(&c, "shop", "client", &web), HELLO);
    let client_ip = pod_ip(&c, "shop", "client");
    assert!(
        app_saw(&c, "outside", "web", &client_ip),
        "the passthrough destination did not see the client pod ({client_ip}):\n{}",
        c.kubectl_out(&["logs", "-n", "outside", "web"])
    );
    assert!(
        agent_logs(&c).contains("\"direction\":\"passthrough\""),
        "not a passthrough"
    );
    assert_eq!(
        fetch(&c, "outside", "outsider", "server-b"),
        HELLO,
        "plaintext from outside the mesh is accepted (PERMISSIVE)"
    );

    // 3. STRICT mTLS and a principal-only ALLOW: the client still gets
    // through, plaintext from outside the mesh does not, and the kubelet's
    // probes — from the node itself — reach the servers directly: they
    // stay Ready, nothing restarts, and no probe shows up at an agent.
    c.apply(LOCKED_DOWN);
    wait(&c, "STRICT enforced", Duration::from_secs(20), || {
        fetch(&c, "outside", "outsider", "server-b").is_empty()
    });
    assert_eq!(fetch(&c, "shop", "client", "server-b"), HELLO);
    // 4. Another identity of the same namespace, over mTLS too, is denied
    // by the policy applied with kubectl.
    assert!(
        fetch(&c, "shop", "other", "server-b").is_empty(),
        "the ALLOW policy let another identity through"
    );
    let until = Instant::now() + Duration::from_secs(12);
    while Instant::now() < until {
        assert!(servers_ready(&c), "probes fail under STRICT\n{}", dump(&c));
        std::thread::sleep(Duration::from_secs(1));
    }
    let logs = agent_logs(&c);
    for gateway in ["10.244.1.1", "10.244.2.1"] {
        assert!(
            !logs.contains(&format!("\"src.addr\":\"{gateway}:")),
            "a probe from the node ({gateway}) went through an agent:\n{logs}"
        );
    }

    // The agents away for 90 s (a nodeSelector no node matches): enrolled
    // pods fail closed, the capture stays pinned, probes still pass and no
    // app container restarts.
    c.kubectl(&[
        "patch",
        "daemonset",
        "sluice-agent",
        "-n",
        "sluice-system",
        "-p",
        r#"{"spec":{"template":{"spec":{"nodeSelector":{"sluice.dev/test-no-agent":"true"}}}}}"#,
    ]);
    // Gone from the nodes, that is; their API objects may linger while the
    // kubelet reclaims them (see `uninstalled`).
    wait(&c, "agents stopped", READY, || agent_processes() == 0);
    let away = Instant::now();
    assert!(
        fetch(&c, "shop", "client", "server-b").is_empty(),
        "traffic left an enrolled pod with no agent on the node"
    );
    assert!(
        pins("node-a") && pins("node-b"),
        "capture removed on a mere restart"
    );
    // 5. A pod of the mesh created now waits for its agent (the CNI
    // plugin holds its sandbox back): never up, so never reachable in
    // plaintext.
    c.apply(LATE);
    while away.elapsed() < Duration::from_secs(90) {
        assert!(
            servers_ready(&c),
            "probes fail with the agents away\n{}",
            dump(&c)
        );
        assert_eq!(
            get(&c, "pod", "shop", "late", "{.status.podIP}"),
            "",
            "a pod of the mesh got a network with no agent on its node"
        );
        std::thread::sleep(Duration::from_secs(2));
    }
    let held = c.kubectl_out(&[
        "get",
        "events",
        "-n",
        "shop",
        "--field-selector",
        "involvedObject.name=late",
    ]);
    assert!(
        held.contains("sluice-cni"),
        "the late pod was not held back by the plugin:\n{held}"
    );
    assert!(
        restarts(&c, "shop").iter().all(|r| r == "0"),
        "app containers restarted with the agents away: {:?}",
        restarts(&c, "shop")
    );
    c.kubectl(&[
        "patch",
        "daemonset",
        "sluice-agent",
        "-n",
        "sluice-system",
        "--type=json",
        "-p",
        r#"[{"op":"remove","path":"/spec/template/spec/nodeSelector/sluice.dev~1test-no-agent"}]"#,
    ]);
    // (The DaemonSet controller waits for the old pods' API objects.)
    wait(&c, "agents back", GONE, || {
        ready(&c, "daemonset", "sluice-system", "sluice-agent")
    });
    wait(&c, "traffic back", READY, || {
        fetch(&c, "shop", "client", "server-b") == HELLO
    });
    // The late pod starts once its agent is back (the kubelet retries the
    // sandbox with a back-off), captured before its first container: the
    // agent enrolled it from the namespace the plugin handed over, and
    // plaintext from outside the mesh is refused from the start.
    wait(&c, "late pod running", Duration::from_secs(150), || {
        get(&c, "pod", "shop", "late", "{.status.phase}") == "Running"
    });
    assert!(
        agent_logs(&c)
            .lines()
            .any(|l| l.contains("captured before its containers start")
                && l.contains("\"pod\":\"late\"")),
        "the late pod was not captured through the CNI plugin"
    );
    wait(&c, "late pod over HBONE", READY, || {
        fetch(&c, "shop", "client", "late") == HELLO
    });
    assert!(
        fetch(&c, "outside", "outsider", "late").is_empty(),
        "the late pod answered plaintext from outside the mesh"
    );

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
    wait(&c, "un-enrolled", READY, || {
        agent_logs(&c)
            .matches("drain period over; listeners closed")
            .count()
            >= 3
    });
    let before = outbound(&c);
    assert_eq!(fetch(&c, "shop", "client", "server-b"), HELLO);
    assert_eq!(outbound(&c), before, "still captured after the label went");
    c.kubectl(&[
        "label",
        "namespace",
        "shop",
        "istio.io/dataplane-mode=ambient",
    ]);
    wait(&c, "enrolled again", READY, || {
        fetch(&c, "shop", "client", "server-b") == HELLO && outbound(&c) > before
    });
    assert!(
        restarts(&c, "shop").iter().all(|r| r == "0"),
        "restarts: {:?}",
        restarts(&c, "shop")
    );
    assert!(
        restarts(&c, "sluice-system").iter().all(|r| r == "0"),
        "Sluice restarted: {:?}\n{}",
        restarts(&c, "sluice-system"),
        dump(&c)
    );

    // 6. `kubectl delete -f deploy/manifests` removes the capture from
    // every node; the pods talk directly again.
    let rendered = c.dir.0.join("uninstall");
    std::fs::create_dir_all(&rendered).unwrap();
    for f in ["00-namespace.yaml", "10-rbac.yaml", "15-ca.yaml"] {
        std::fs::write(rendered.join(f), manifest(f, None)).unwrap();
    }
    std::fs::write(rendered.join("20-agent-daemonset.yaml"), &agent_manifest).unwrap();
    let start = Instant::now();
    c.kubectl(&["delete", "--wait=false", "-f", rendered.to_str().unwrap()]);
    uninstalled(&c, "kubectl delete", start);
    wait(
        &c,
        "sluice-system deleted",
        Duration::from_secs(120),
        || !c.kubectl_ok(&["get", "namespace", "sluice-system"]),
    );

    // The same with `helm install` / `helm uninstall` of the chart.
    let helm = |args: &[&str]| {
        helm(Some(&c.kubeconfig), args);
    };
    let ca = format!("ca.address={HELM_CA_IP}:15012");
    let ca_ip = format!("ca.clusterIP={HELM_CA_IP}");
    let (cni_bin, cni_conf) = (
        format!("cni.binDir={CNI_BIN_DIR}"),
        format!("cni.confDir={CNI_CONF_DIR}"),
    );
    helm(&[
        "install",
        "sluice",
        &format!("{DEPLOY}/helm/sluice"),
        "-n",
        "sluice-system",
        "--create-namespace",
        // The v1.20 API server has no DaemonSet surge.
        "--set",
        "agent.maxSurge=0",
        "--set",
        "agent.maxUnavailable=1",
        "--set",
        &ca,
        "--set",
        &ca_ip,
        "--set",
        "ca.serverName=sluice-ca.sluice-system.svc",
        "--set",
        "waypoints[0].namespace=shop",
        "--set",
        "waypoints[0].replicas=1",
        "--set",
        &cni_bin,
        "--set",
        &cni_conf,
    ]);
    sluice_ready(&c);
    waypoint_routes(&c);
    let before = outbound(&c);
    wait(&c, "HBONE after helm install", READY, || {
        fetch(&c, "shop", "client", "server-b") == HELLO && outbound(&c) > before
    });
    assert!(servers_ready(&c));

    // 5. A rollout (a new image tag) under traffic: a connection
    // established before it runs on through the draining agent, and the
    // window in which new connections fail is measured (the v1.20 API
    // server has no DaemonSet surge, so the new agent starts only after
    // the old one is gone; with surge, the hand-over has no window).
    rollout(&c, &helm);

    let start = Instant::now();
    helm(&["uninstall", "sluice", "-n", "sluice-system"]);
    uninstalled(&c, "helm uninstall", start);
}
