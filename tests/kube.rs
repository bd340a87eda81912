//! Node agents in Kubernetes mode against a real API server (etcd +
//! kube-apiserver v1.20 started by the harness): objects created, patched
//! and deleted through the API become the agents' mesh model, enrollment
//! and policy — including label flips, deletions, a policy with a typo and
//! an API server restart in the middle. Pods stand in with loopback
//! addresses (their status is patched in: no kubelet runs).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ::kube::api::{Api, Patch, PatchParams};
use k8s_openapi::api::core::v1::Pod;
use node_agent::orig_dst::ExplicitMappings;
use node_agent::{AgentConfig, AgentHandle, CaSource, KubeSource};
use sluice_tests::kube::{kube_available, KubeApi};
use sluice_tests::*;
use tokio::net::TcpSocket;

const T: Duration = Duration::from_secs(30);

async fn agent(
    api: &KubeApi,
    node: &str,
    dir: &TempDir,
    redirects: Arc<ExplicitMappings>,
) -> AgentHandle {
    let mut c = AgentConfig::new(node, Default::default());
    c.kube = Some(KubeSource {
        kubeconfig: Some(api.kubeconfig.clone()),
        trust_domain: "cluster.local".into(),
        root_namespace: "istio-system".into(),
        proc_root: "/proc".into(),
    });
    c.ca = CaSource::Files {
        cert: dir.0.join("root.pem"),
        key: dir.0.join("root-key.pem"),
        generate: true,
    };
    let local: SocketAddr = "127.0.0.1:0".parse().unwrap();
    c.admin_addr = local;
    c.metrics_addr = local;
    c.readiness_addr = local;
    let a = tokio::time::timeout(T, node_agent::start(c, redirects))
        .await
        .expect("agent starts in time")
        .expect("agent starts");
    tokio::time::timeout(T, a.wait_ready())
        .await
        .expect("agent ready");
    a
}

fn pod(name: &str, ns: &str, node: &str, labels: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{{labels}}}}}\nspec:\n  serviceAccountName: {name}\n  nodeName: {node}\n  containers: [{{name: app, image: example/app, ports: [{{name: http, containerPort: 8080}}]}}]\n"
    )
}

/// Give a pod the status a kubelet would.
async fn set_ip(client: &::kube::Client, ns: &str, name: &str, ip: std::net::IpAddr) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let status = serde_json::json!({"status": {"phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}]}});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
}

/// Connect as the workload at `from` through agent A's outbound listener.
async fn connect(
    a: &AgentHandle,
    redirects: &ExplicitMappings,
    from: std::net::IpAddr,
    dst: SocketAddr,
) -> std::io::Result<tokio::net::TcpStream> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(from, 0))?;
    let me = sock.local_addr()?;
    redirects.insert(me, dst);
    sock.connect(SocketAddr::new(from, a.ctx.cfg.outbound_port))
        .await
}

async fn works(
    a: &AgentHandle,
    redirects: &ExplicitMappings,
    from: std::net::IpAddr,
    dst: SocketAddr,
) -> bool {
    let Ok(s) = connect(a, redirects, from, dst).await else {
        return false;
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(5), round_trip(s, Arc::new(b"ping".to_vec()))).await,
        Ok(Ok(back)) if back == b"ping"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_follow_the_cluster_through_changes_and_an_api_server_restart() {
    if !kube_available() {
        return;
    }
    init_logs();
    let mut api = tokio::task::spawn_blocking(KubeApi::start).await.unwrap();
    let client = node_agent::kube_client(Some(&api.kubeconfig))
        .await
        .unwrap();
    let block = ip_block();
    let (c_ip, s_ip) = (ip(block, 1), ip(block, 2));
    api.apply(&format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop, labels: {{istio.io/dataplane-mode: ambient}}}}\n---\n{}---\n{}---\napiVersion: v1\nkind: Service\nmetadata: {{name: echo, namespace: shop}}\nspec:\n  clusterIP: 10.96.0.50\n  selector: {{app: echo}}\n  ports: [{{name: http, port: 80, targetPort: http}}]\n",
        pod("client", "shop", "node-a", "app: client"),
        pod("server", "shop", "node-b", "app: echo"),
    ));
    set_ip(&client, "shop", "client", c_ip).await;
    set_ip(&client, "shop", "server", s_ip).await;
    let _echo = echo_server(SocketAddr::new(s_ip, 8080)).await;

    let dir = TempDir::new("kube-agents");
    let redirects = Arc::new(ExplicitMappings::default());
    let a = agent(&api, "node-a", &dir, redirects.clone()).await;
    let b = agent(&api, "node-b", &dir, Arc::new(ExplicitMappings::default())).await;

    // The model: both pods, the service with its named target port.
    let m = a.ctx.model();
    assert_eq!(m.workloads.len(), 2, "{:?}", m.workloads);
    let svc = m.service("shop", "echo").expect("service in the model");
    assert_eq!(svc.ports[0].target(), 8080);
    let enrolled = |h: &AgentHandle| {
        h.ctx
            .enrolled()
            .iter()
            .map(|e| e.name.clone())
            .collect::<Vec<_>>()
    };
    assert!(
        eventually(T, || enrolled(&b) == ["server"]).await,
        "{:?}",
        enrolled(&b)
    );
    // Traffic through the VIP, over HBONE between the agents.
    let vip: SocketAddr = "10.96.0.50:80".parse().unwrap();
    assert!(
        works(&a, &redirects, c_ip, vip).await,
        "client → echo through the mesh"
    );

    // A DENY policy from the API stops it; deleting it lets it through.
    api.apply("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-client, namespace: shop}\nspec:\n  selector: {matchLabels: {app: echo}}\n  action: DENY\n  rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}]}]\n");
    assert!(eventually(T, || b.ctx.model().authorization_policies.len() == 1).await);
    assert!(
        !works(&a, &redirects, c_ip, vip).await,
        "the DENY policy must stop it"
    );
    // A policy with a typo is left out (and said so); the rest stays.
    api.apply("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: typo, namespace: shop}\nspec:\n  acton: DENY\n");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(b.ctx.model().authorization_policies.len(), 1);
    let (_, metrics) = http_get(b.metrics_addr, "/metrics").await;
    assert!(
        metric(
            &metrics,
            "sluice_config_updates_total",
            &[r#"result="partial""#]
        ) >= 1,
        "{metrics}"
    );
    api.kubectl(&[
        "delete",
        "authorizationpolicy",
        "-n",
        "shop",
        "deny-client",
        "typo",
    ]);
    assert!(eventually(T, || b.ctx.model().authorization_policies.is_empty()).await);
    assert!(works(&a, &redirects, c_ip, vip).await);

    // A label flip un-enrolls the server pod on node B, and back.
    api.kubectl(&[
        "label",
        "pod",
        "-n",
        "shop",
        "server",
        "istio.io/dataplane-mode=none",
    ]);
    assert!(
        eventually(T, || enrolled(&b).is_empty()).await,
        "{:?}",
        enrolled(&b)
    );
    api.kubectl(&[
        "label",
        "pod",
        "-n",
        "shop",
        "server",
        "istio.io/dataplane-mode-",
    ]);
    assert!(eventually(T, || enrolled(&b) == ["server"]).await);

    // The API server goes away and comes back: the agents keep their model
    // meanwhile, then pick up what changed, with nothing duplicated.
    api.stop_apiserver();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(a.ctx.model().workloads.len(), 2);
    assert!(
        works(&a, &redirects, c_ip, vip).await,
        "traffic continues without the API server"
    );
    tokio::task::block_in_place(|| api.start_apiserver());
    let client = node_agent::kube_client(Some(&api.kubeconfig))
        .await
        .unwrap();
    api.apply(&pod("late", "shop", "node-b", "app: late"));
    set_ip(&client, "shop", "late", ip(block, 3)).await;
    assert!(
        eventually(T, || a.ctx.model().workloads.len() == 3).await,
        "watches did not resume: {:?}",
        a.ctx
            .model()
            .workloads
            .iter()
            .map(|w| &w.name)
            .collect::<Vec<_>>()
    );
    // Deleting a pod removes it.
    api.kubectl(&["delete", "pod", "-n", "shop", "client", "--wait=false"]);
    assert!(eventually(T, || a.ctx.model().workloads.len() == 2).await);
    assert!(a.ctx.model().workloads.iter().all(|w| w.name != "client"));
}

/// `deploy/manifests` applies to a real API server, and the properties the
/// operator relies on hold: read-only RBAC, a DaemonSet on every node with
/// exactly the capabilities it needs and readiness on 15021.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_manifests_apply_and_grant_only_what_is_needed() {
    if !kube_available() {
        return;
    }
    let api = tokio::task::spawn_blocking(KubeApi::start).await.unwrap();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/manifests");
    // The namespace for real (namespaced objects cannot be dry-run into a
    // namespace that does not exist), everything else validated by the
    // server, then RBAC for real to ask what the agent may do.
    api.kubectl(&[
        "apply",
        "--server-side",
        "-f",
        &format!("{dir}/00-namespace.yaml"),
    ]);
    api.kubectl(&["apply", "--server-side", "--dry-run=server", "-f", dir]);
    api.kubectl(&[
        "apply",
        "--server-side",
        "-f",
        &format!("{dir}/10-rbac.yaml"),
    ]);
    let can = |verb: &str, what: &str| {
        let out = std::process::Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&api.kubeconfig)
            .args([
                "auth",
                "can-i",
                verb,
                what,
                "--as=system:serviceaccount:sluice-system:sluice-agent",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim() == "yes"
    };
    for what in [
        "pods",
        "services",
        "namespaces",
        "nodes",
        "authorizationpolicies.security.istio.io",
        "httproutes.gateway.networking.k8s.io",
    ] {
        assert!(can("watch", what), "agent cannot watch {what}");
    }
    for (verb, what) in [
        ("get", "secrets"),
        ("create", "pods"),
        ("delete", "pods"),
        ("update", "authorizationpolicies.security.istio.io"),
        ("list", "configmaps"),
    ] {
        assert!(
            !can(verb, what),
            "agent may {verb} {what}: more than it needs"
        );
    }
    // The DaemonSet's promises.
    let ds: serde_json::Value = serde_yaml::from_str(
        &std::fs::read_to_string(format!("{dir}/20-agent-daemonset.yaml")).unwrap(),
    )
    .unwrap();
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["tolerations"][0]["operator"], "Exists");
    assert_eq!(pod["hostPID"], true);
    let c = &pod["containers"][0];
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], 15021);
    assert_eq!(c["livenessProbe"]["httpGet"]["port"], 15021);
    assert!(c["resources"]["requests"]["cpu"].is_string());
    let caps = &c["securityContext"]["capabilities"];
    assert_eq!(caps["drop"], serde_json::json!(["ALL"]));
    assert_eq!(
        caps["add"],
        serde_json::json!(["BPF", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"])
    );
    assert_eq!(c["securityContext"]["privileged"], false);
    assert_eq!(ds["spec"]["updateStrategy"]["type"], "RollingUpdate");
}

/// Agents and a waypoint, all in Kubernetes mode: an HTTPRoute created
/// through the API routes real requests, and an edit to it takes effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waypoint_routes_by_httproutes_from_the_api() {
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::TokioIo;
    if !kube_available() {
        return;
    }
    init_logs();
    let api = tokio::task::spawn_blocking(KubeApi::start).await.unwrap();
    let client = node_agent::kube_client(Some(&api.kubeconfig))
        .await
        .unwrap();
    let block = ip_block();
    let ipn = |h| ip(block, h);
    api.apply(&format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: web, labels: {{istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}}}\n---\n{}---\n{}---\n{}---\n{}---\n{}",
        pod("client", "web", "node-a", "app: client"),
        pod("web-v1", "web", "node-b", "app: web, version: v1"),
        pod("web-v2", "web", "node-b", "app: web, version: v2"),
        pod("waypoint", "web", "node-a", "gateway.networking.k8s.io/gateway-name: waypoint, istio.io/dataplane-mode: none"),
        r#"apiVersion: v1
kind: Service
metadata: {name: web, namespace: web}
spec: {clusterIP: 10.96.0.60, selector: {app: web}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: web-v2, namespace: web}
spec: {selector: {app: web, version: v2}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: web-v1, namespace: web}
spec: {selector: {app: web, version: v1}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: web}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
"#
    ));
    let route = |header: &str| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: web, namespace: web}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: web, port: 80}}]\n  rules:\n    - matches: [{{headers: [{{name: x-version, value: {header}}}]}}]\n      backendRefs: [{{name: web-v2, port: 80}}]\n    - backendRefs: [{{name: web-v1, port: 80}}]\n"
        )
    };
    api.apply(&route("v2"));
    for (name, h) in [
        ("client", 1),
        ("web-v1", 2),
        ("web-v2", 3),
        ("waypoint", 20),
    ] {
        set_ip(&client, "web", name, ipn(h)).await;
    }
    let _v1 = serve_http(
        tokio::net::TcpListener::bind(SocketAddr::new(ipn(2), 8080))
            .await
            .unwrap(),
        "v1",
    );
    let _v2 = serve_http(
        tokio::net::TcpListener::bind(SocketAddr::new(ipn(3), 8080))
            .await
            .unwrap(),
        "v2",
    );

    let dir = TempDir::new("kube-waypoint");
    let redirects = Arc::new(ExplicitMappings::default());
    let a = agent(&api, "node-a", &dir, redirects.clone()).await;
    let _b = agent(&api, "node-b", &dir, Arc::new(ExplicitMappings::default())).await;
    let mut cfg = waypoint::WaypointConfig::new("web", "waypoint", "waypoint", Default::default());
    cfg.kube = Some(waypoint::KubeMode {
        kubeconfig: Some(api.kubeconfig.clone()),
        trust_domain: "cluster.local".into(),
        root_namespace: "istio-system".into(),
    });
    cfg.ca = CaSource::Files {
        cert: dir.0.join("root.pem"),
        key: dir.0.join("root-key.pem"),
        generate: false,
    };
    cfg.admin_addr = "127.0.0.1:0".parse().unwrap();
    let _wp = tokio::time::timeout(T, waypoint::start(cfg))
        .await
        .unwrap()
        .expect("waypoint starts");

    let get = |hdr: Option<&'static str>| {
        let (a, redirects) = (&a, redirects.clone());
        async move {
            let tcp = connect(a, &redirects, ipn(1), "10.96.0.60:80".parse().unwrap())
                .await
                .unwrap();
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .unwrap();
            tokio::spawn(conn);
            let mut req = http::Request::get("/").header("host", "web.web.svc.cluster.local");
            if let Some(v) = hdr {
                req = req.header("x-version", v);
            }
            let resp = send
                .send_request(req.body(Full::new(bytes::Bytes::new())).unwrap())
                .await
                .unwrap();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            String::from_utf8_lossy(&body).trim().to_string()
        }
    };
    assert_eq!(get(None).await, "v1 GET / -");
    assert_eq!(get(Some("v2")).await, "v2 GET / -");
    // Edit the route through the API: the waypoint follows.
    api.apply(&route("canary"));
    let mut followed = false;
    for _ in 0..100 {
        if get(Some("canary")).await == "v2 GET / -" {
            followed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        followed,
        "the waypoint did not pick up the edited HTTPRoute"
    );
    assert_eq!(get(Some("v2")).await, "v1 GET / -");
}
