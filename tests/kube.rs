//! Node agents in Kubernetes mode against a real API server (etcd +
//! kube-apiserver v1.20 started by the harness): objects created, patched
//! and deleted through the API become the agents' mesh model, enrollment
//! and policy — including label flips, deletions, a policy with a typo
//! (which fails closed) and an API server restart in the middle. Pods stand in with loopback
//! addresses (their status is patched in: no kubelet runs).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ::kube::api::{Api, Patch, PatchParams};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, ServiceAccount};
use mesh_core::identity::caservice::RemoteCa;
use node_agent::orig_dst::ExplicitMappings;
use node_agent::{AgentConfig, AgentHandle, CaSource, KubeSource};
use sluice_tests::kube::{for_api_server_1_20, helm, kube_available, KubeApi};
use sluice_tests::*;
use tokio::net::TcpSocket;

const T: Duration = Duration::from_secs(30);

/// The test API server, as both proxies watch it.
fn cluster(api: &KubeApi) -> mesh_core::source::Cluster {
    mesh_core::source::Cluster {
        kubeconfig: Some(api.kubeconfig.clone()),
        trust_domain: "cluster.local".into(),
        root_namespace: "istio-system".into(),
    }
}

async fn agent(
    api: &KubeApi,
    node: &str,
    ca: CaSource,
    redirects: Arc<ExplicitMappings>,
) -> AgentHandle {
    let mut c = AgentConfig::new(node, Default::default());
    c.kube = Some(KubeSource {
        cluster: cluster(api),
        proc_root: "/proc".into(),
    });
    c.ca = ca;
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
        .expect("agent ready (its certificates issued)");
    a
}

/// The certificate service on the test cluster, as `deploy/` installs it:
/// root in a Secret, published in a ConfigMap, callers authenticated by
/// pod-bound service-account tokens through TokenReview.
struct ClusterCa {
    server: mesh_core::kube::ca::CaServer,
    root: std::path::PathBuf,
    dir: std::path::PathBuf,
}

impl ClusterCa {
    async fn start(api: &KubeApi, client: &::kube::Client, dir: &TempDir) -> ClusterCa {
        api.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: sluice-system}\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {name: sluice-agent, namespace: sluice-system}\n");
        let cfg = mesh_core::kube::ca::CaServerConfig {
            namespace: "sluice-system".into(),
            trust_domain: "cluster.local".into(),
            listen: "127.0.0.1:0".parse().unwrap(),
            secret: "sluice-ca".into(),
            root_configmap: "sluice-ca-root".into(),
            dns_names: vec!["sluice-ca.sluice-system.svc".into()],
            audiences: vec!["sluice-ca".into()],
            node_agents: vec!["sluice-system/sluice-agent".into()],
            max_ttl: Duration::from_secs(3600),
        };
        let server = mesh_core::kube::ca::start(client.clone(), &cfg)
            .await
            .expect("certificate service starts");
        // Agents trust the root the service published, as a mounted
        // ConfigMap would give it to them.
        let cm = Api::<ConfigMap>::namespaced(client.clone(), "sluice-system")
            .get("sluice-ca-root")
            .await
            .expect("root published");
        let pem = cm.data.unwrap()["root-cert.pem"].clone();
        assert_eq!(pem, server.service.root_pem());
        let root = dir.0.join("mesh-root.pem");
        std::fs::write(&root, pem).unwrap();
        ClusterCa {
            server,
            root,
            dir: dir.0.clone(),
        }
    }

    /// How a proxy reaches the service with `token`.
    fn source(&self, token: &str, impersonate: bool) -> CaSource {
        let file = self.dir.join(format!("token-{}", rand::random::<u64>()));
        std::fs::write(&file, token).unwrap();
        CaSource::Remote(RemoteCa {
            address: self.server.addr.to_string(),
            server_name: Some("sluice-ca.sluice-system.svc".into()),
            root_cert: self.root.clone(),
            token_file: Some(file),
            impersonate,
        })
    }

    /// A node agent's pod on `node` and the CA source its projected token
    /// gives it.
    async fn node_agent(&self, api: &KubeApi, client: &::kube::Client, node: &str) -> CaSource {
        let name = format!("sluice-agent-{node}");
        api.apply(&format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: sluice-system}}\nspec:\n  serviceAccountName: sluice-agent\n  hostNetwork: true\n  nodeName: {node}\n  containers: [{{name: agent, image: example/agent}}]\n"));
        let token = token(
            client,
            "sluice-system",
            "sluice-agent",
            Some(&name),
            "sluice-ca",
        )
        .await;
        self.source(&token, true)
    }
}

/// A service-account token with `audience`, bound to pod `pod` of the same
/// namespace when given (what the kubelet projects into a pod).
async fn token(
    client: &::kube::Client,
    ns: &str,
    sa: &str,
    pod: Option<&str>,
    audience: &str,
) -> String {
    use k8s_openapi::api::authentication::v1::{
        BoundObjectReference, TokenRequest, TokenRequestSpec,
    };
    let bound = match pod {
        Some(name) => {
            let p = Api::<Pod>::namespaced(client.clone(), ns)
                .get(name)
                .await
                .unwrap();
            Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: p.metadata.name,
                uid: p.metadata.uid,
            })
        }
        None => None,
    };
    let req = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![audience.into()],
            bound_object_ref: bound,
            expiration_seconds: Some(3600),
        },
        ..Default::default()
    };
    Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create_token_request(sa, &Default::default(), &req)
        .await
        .expect("token request")
        .status
        .expect("token issued")
        .token
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

    // Identities come from the cluster's certificate service.
    let dir = TempDir::new("kube-agents");
    let ca = ClusterCa::start(&api, &client, &dir).await;
    let redirects = Arc::new(ExplicitMappings::default());
    let src_a = ca.node_agent(&api, &client, "node-a").await;
    let src_b = ca.node_agent(&api, &client, "node-b").await;
    let a = agent(&api, "node-a", src_a, redirects.clone()).await;
    let b = agent(&api, "node-b", src_b, Arc::new(ExplicitMappings::default())).await;
    assert_eq!(
        ca.server
            .service
            .issued
            .load(std::sync::atomic::Ordering::Relaxed),
        2,
        "one certificate per local workload identity"
    );

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
    api.kubectl(&["delete", "authorizationpolicy", "-n", "shop", "deny-client"]);
    assert!(eventually(T, || b.ctx.model().authorization_policies.is_empty()).await);
    assert!(works(&a, &redirects, c_ip, vip).await);

    // The only ALLOW policy of the server, with a typo in a rule: it cannot
    // be read, and it must not open the server to everyone. Its stand-in
    // allows nothing; it is logged and counted.
    let only = |field: &str| {
        format!("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: only-admin, namespace: shop}}\nspec:\n  selector: {{matchLabels: {{app: echo}}}}\n  action: ALLOW\n  rules: [{{from: [{{source: {{{field}: [cluster.local/ns/shop/sa/admin]}}}}]}}]\n")
    };
    api.apply(&only("principal"));
    assert!(
        eventually(T, || b.ctx.model().authorization_policies.iter().any(|p| p
            .metadata
            .name
            == "only-admin"
            && p.rejected.is_some()))
        .await
    );
    assert!(
        !works(&a, &redirects, c_ip, vip).await,
        "an unreadable ALLOW policy opened the server"
    );
    let rejected = |m: &str| {
        metric(
            m,
            "sluice_config_rejected_objects",
            &[r#"kind="AuthorizationPolicy""#],
        )
    };
    let (_, metrics) = http_get(b.metrics_addr, "/metrics").await;
    assert_eq!(rejected(&metrics), 1, "{metrics}");
    assert!(
        metric(
            &metrics,
            "sluice_config_updates_total",
            &[r#"result="partial""#]
        ) >= 1,
        "{metrics}"
    );
    let denied = metric(
        &metrics,
        "sluice_policy_denials_total",
        &[r#"policy="shop/only-admin""#],
    );
    assert!(denied >= 1, "{metrics}");
    // Fixed, it is read as written (still not the client), and the gauge
    // goes back to 0; deleted, the server is open again.
    api.apply(&only("principals"));
    assert!(
        eventually(T, || b.ctx.model().authorization_policies.iter().any(|p| p
            .metadata
            .name
            == "only-admin"
            && p.rejected.is_none()))
        .await
    );
    assert!(!works(&a, &redirects, c_ip, vip).await);
    let (_, metrics) = http_get(b.metrics_addr, "/metrics").await;
    assert_eq!(rejected(&metrics), 0, "{metrics}");
    api.kubectl(&["delete", "authorizationpolicy", "-n", "shop", "only-admin"]);
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
    // A deleted pod terminates first: it stays in the model (still
    // enrolled, so its last connections are captured) but takes no new
    // traffic as an endpoint…
    api.kubectl(&["delete", "pod", "-n", "shop", "client", "--wait=false"]);
    assert!(
        eventually(T, || a
            .ctx
            .model()
            .workloads
            .iter()
            .any(|w| w.name == "client" && w.terminating))
        .await
    );
    // …and is removed once it is gone (the kubelet's confirmation; forced
    // here, as no kubelet runs).
    api.kubectl(&[
        "delete",
        "pod",
        "-n",
        "shop",
        "client",
        "--grace-period=0",
        "--force",
    ]);
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
    let validated = api.dir.0.join("manifests");
    std::fs::create_dir_all(&validated).unwrap();
    for f in std::fs::read_dir(dir).unwrap() {
        let f = f.unwrap().path();
        let text = std::fs::read_to_string(&f).unwrap();
        std::fs::write(
            validated.join(f.file_name().unwrap()),
            for_api_server_1_20(&text),
        )
        .unwrap();
    }
    api.kubectl(&[
        "apply",
        "--server-side",
        "--dry-run=server",
        "-f",
        validated.to_str().unwrap(),
    ]);
    for f in ["10-rbac.yaml", "15-ca.yaml"] {
        api.kubectl(&["apply", "--server-side", "-f", &format!("{dir}/{f}")]);
    }
    let may = |who: &str, verb: &str, what: &str, ns: &str| {
        let out = std::process::Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&api.kubeconfig)
            .args(["auth", "can-i", verb, what, "-n", ns])
            .arg(format!("--as=system:serviceaccount:sluice-system:{who}"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim() == "yes"
    };
    let can = |verb: &str, what: &str| may("sluice-agent", verb, what, "default");
    // The CA: token reviews and pod reads cluster-wide, the root only in
    // its own namespace, nothing else.
    for (verb, what, ns) in [
        ("create", "tokenreviews.authentication.k8s.io", "default"),
        ("list", "pods", "shop"),
        ("get", "secrets", "sluice-system"),
        ("create", "secrets", "sluice-system"),
        ("patch", "configmaps", "shop"),
        ("watch", "namespaces", "default"),
    ] {
        assert!(
            may("sluice-ca", verb, what, ns),
            "the CA cannot {verb} {what} in {ns}"
        );
    }
    for (verb, what, ns) in [
        ("get", "secrets", "default"),
        ("list", "secrets", "sluice-system"),
        ("delete", "secrets", "sluice-system"),
        ("create", "pods", "shop"),
        ("create", "serviceaccounts/token", "shop"),
    ] {
        assert!(
            !may("sluice-ca", verb, what, ns),
            "the CA may {verb} {what} in {ns}: more than it needs"
        );
    }
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
    // Its own DaemonSet (to tell an uninstall from a restart), only there.
    assert!(may("sluice-agent", "watch", "daemonsets", "sluice-system"));
    assert!(!may("sluice-agent", "watch", "daemonsets", "default"));
    for (verb, what) in [
        ("get", "secrets"),
        ("create", "pods"),
        ("delete", "pods"),
        ("update", "authorizationpolicies.security.istio.io"),
        ("list", "configmaps"),
        ("delete", "daemonsets"),
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
    // Alive is not ready: a CA outage must not restart the agent.
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz/live");
    assert_eq!(pod["nodeSelector"]["kubernetes.io/os"], "linux");
    // Only the init container that mounts the host's bpffs is privileged.
    let init = &pod["initContainers"][0];
    assert_eq!(init["securityContext"]["privileged"], true);
    assert_eq!(
        init["volumeMounts"][0]["mountPropagation"], "Bidirectional",
        "bpffs must be mounted where the host sees it"
    );
    assert!(c["resources"]["requests"]["cpu"].is_string());
    let caps = &c["securityContext"]["capabilities"];
    assert_eq!(caps["drop"], serde_json::json!(["ALL"]));
    assert_eq!(
        caps["add"],
        serde_json::json!(["BPF", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"])
    );
    assert_eq!(c["securityContext"]["privileged"], false);
    assert_eq!(ds["spec"]["updateStrategy"]["type"], "RollingUpdate");
    // Hot restart: the new agent starts beside the old one and takes its
    // sockets over through a directory both see.
    assert_eq!(
        ds["spec"]["updateStrategy"]["rollingUpdate"],
        serde_json::json!({"maxSurge": 1, "maxUnavailable": 0})
    );
    let mounted = |name: &str, path: &str| {
        c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == name && m["mountPath"] == path)
            && pod["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|v| v["name"] == name && v["hostPath"]["path"] == path)
    };
    assert!(mounted("handover", "/run/sluice"));
    // No key material on nodes: a projected token for the CA's audience
    // and the published root, nothing from a Secret.
    let volumes = pod["volumes"].as_array().unwrap();
    assert!(
        volumes.iter().all(|v| v.get("secret").is_none()),
        "{volumes:?}"
    );
    let token = volumes
        .iter()
        .find_map(|v| v["projected"]["sources"][0].get("serviceAccountToken"))
        .expect("a projected service-account token");
    assert_eq!(token["audience"], "sluice-ca");
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    assert!(
        args.iter()
            .any(|a| a.starts_with("--ca-address=sluice-ca.sluice-system.svc:15012")),
        "{args:?}"
    );
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
    for (name, h) in [("client", 1), ("web-v1", 2), ("web-v2", 3)] {
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
    let ca = ClusterCa::start(&api, &client, &dir).await;
    let redirects = Arc::new(ExplicitMappings::default());
    let src_a = ca.node_agent(&api, &client, "node-a").await;
    let src_b = ca.node_agent(&api, &client, "node-b").await;
    let a = agent(&api, "node-a", src_a, redirects.clone()).await;
    let b = agent(&api, "node-b", src_b, Arc::new(ExplicitMappings::default())).await;
    let mut cfg = waypoint::WaypointConfig::new("web", "waypoint", "waypoint", Default::default());
    cfg.kube = Some(cluster(&api));
    // The waypoint obtains its own identity with its own pod's token.
    api.apply("apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: waypoint, namespace: web}\n");
    cfg.ca = ca.source(
        &token(&client, "web", "waypoint", Some("waypoint"), "sluice-ca").await,
        false,
    );
    cfg.admin_addr = "127.0.0.1:0".parse().unwrap();
    // The waypoint starts before the API shows its pod's address (as on a
    // real node), waits for it, then serves.
    let starting = tokio::spawn(waypoint::start(cfg));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !starting.is_finished(),
        "the waypoint must wait for its address"
    );
    set_ip(&client, "web", "waypoint", ipn(20)).await;
    let _wp = tokio::time::timeout(T, starting)
        .await
        .unwrap()
        .unwrap()
        .expect("waypoint starts");
    // The agents learn the waypoint's address from their own watches, which
    // may trail the waypoint's: until then its traffic is (rightly) refused.
    let knows_waypoint = |ctx: &node_agent::Ctx| {
        let model = ctx.model();
        model.gateways.iter().any(|g| {
            model
                .waypoint_workloads(g)
                .any(|w| w.ips.contains(&ipn(20)))
        })
    };
    assert!(
        eventually(T, || knows_waypoint(&a.ctx) && knows_waypoint(&b.ctx)).await,
        "the agents never learned the waypoint's address"
    );

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

    // The route's status says it was accepted and its references resolve,
    // in the waypoint's own entry (Gateway API route status).
    let routes = ::kube::api::Api::<::kube::api::DynamicObject>::namespaced_with(
        client.clone(),
        "web",
        &::kube::api::ApiResource::from_gvk_with_plural(
            &::kube::api::GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "HTTPRoute"),
            "httproutes",
        ),
    );
    let condition = |name: &'static str, kind: &'static str| {
        let routes = routes.clone();
        async move {
            let r = routes.get(name).await.ok()?;
            let parents = r.data.get("status")?.get("parents")?.as_array()?.clone();
            let ours = parents
                .iter()
                .find(|p| p["controllerName"] == "sluice.dev/waypoint")?;
            let c = ours["conditions"]
                .as_array()?
                .iter()
                .find(|c| c["type"] == kind)?
                .clone();
            Some((
                c["status"].as_str()?.to_string(),
                c["reason"].as_str()?.to_string(),
            ))
        }
    };
    let wait_condition =
        |name: &'static str, kind: &'static str, want: (&'static str, &'static str)| async move {
            let deadline = tokio::time::Instant::now() + T;
            loop {
                let got = condition(name, kind).await;
                if got.as_ref().map(|(s, r)| (s.as_str(), r.as_str())) == Some(want) {
                    return;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{name} {kind}: {got:?}, wanted {want:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
    wait_condition("web", "Accepted", ("True", "Accepted")).await;
    wait_condition("web", "ResolvedRefs", ("True", "ResolvedRefs")).await;

    // A backend in another namespace needs a ReferenceGrant there: without
    // it the rule answers 500 and the status says RefNotPermitted; with it
    // the request is served.
    api.apply(&format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: other, labels: {{istio.io/dataplane-mode: ambient}}}}\n---\n{}---\napiVersion: v1\nkind: Service\nmetadata: {{name: elsewhere, namespace: other}}\nspec: {{selector: {{app: elsewhere}}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: web, namespace: web}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: web, port: 80}}]\n  rules:\n    - matches: [{{headers: [{{name: x-version, value: other}}]}}]\n      backendRefs: [{{name: elsewhere, namespace: other, port: 80}}]\n    - backendRefs: [{{name: web-v1, port: 80}}]\n",
        pod("elsewhere", "other", "node-b", "app: elsewhere"),
    ));
    set_ip(&client, "other", "elsewhere", ipn(4)).await;
    let _v3 = serve_http(
        tokio::net::TcpListener::bind(SocketAddr::new(ipn(4), 8080))
            .await
            .unwrap(),
        "v3",
    );
    wait_condition("web", "ResolvedRefs", ("False", "RefNotPermitted")).await;
    assert_eq!(get(Some("other")).await, "invalid backend");
    api.apply("apiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata: {name: from-web, namespace: other}\nspec:\n  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: web}]\n  to: [{group: \"\", kind: Service, name: elsewhere}]\n");
    wait_condition("web", "ResolvedRefs", ("True", "ResolvedRefs")).await;
    let mut served = String::new();
    for _ in 0..100 {
        served = get(Some("other")).await;
        if served == "v3 GET / -" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(served, "v3 GET / -");
}

/// The certificate service against the API server: a node agent obtains the
/// identity of a pod on its own node and is refused one on another node;
/// workloads get only their own identity; unbound, foreign-audience, forged
/// and stale tokens are refused; the root survives a restart of the service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_certificate_service_issues_identities_only_for_pods_on_the_callers_node() {
    use mesh_core::identity::ca::new_key_and_csr;
    use mesh_core::identity::{CertificateSigner, SpiffeId};
    if !kube_available() {
        return;
    }
    init_logs();
    let api = tokio::task::spawn_blocking(KubeApi::start).await.unwrap();
    let client = node_agent::kube_client(Some(&api.kubeconfig))
        .await
        .unwrap();
    let dir = TempDir::new("kube-ca");
    let ca = ClusterCa::start(&api, &client, &dir).await;
    api.apply(&format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop}}\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: web, namespace: shop}}\n---\n{}",
        pod("web", "shop", "node-a", "app: web")
    ));
    let at_a = ca.node_agent(&api, &client, "node-a").await;
    let at_b = ca.node_agent(&api, &client, "node-b").await;
    let web = SpiffeId::new("cluster.local", "shop", "web");
    // The root reaches a namespace created after the CA started.
    let published = async {
        let cms = Api::<ConfigMap>::namespaced(client.clone(), "shop");
        loop {
            if let Ok(Some(cm)) = cms.get_opt("sluice-ca-root").await {
                return cm.data.unwrap()["root-cert.pem"].clone();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let root_in_shop = tokio::time::timeout(T, published)
        .await
        .expect("root published into a new namespace");
    assert_eq!(root_in_shop, ca.server.service.root_pem());
    let ask = |src: CaSource, id: SpiffeId| async move {
        let CaSource::Remote(r) = src else {
            unreachable!()
        };
        let signer =
            mesh_core::identity::caservice::RemoteSigner::new(r, Duration::from_secs(600)).unwrap();
        let (_key, csr) = new_key_and_csr(&id).unwrap();
        signer.sign(&id, csr).await.map_err(|e| e.to_string())
    };

    // The agent on web's node gets web's identity, chained to the root.
    let chain = ask(at_a.clone(), web.clone())
        .await
        .expect("agent on node-a may");
    assert_eq!(
        mesh_core::identity::verify::spiffe_id_of(&chain[0]).unwrap(),
        web
    );
    // The agent on another node is refused, and told why.
    let e = ask(at_b.clone(), web.clone()).await.unwrap_err();
    assert!(e.contains("status 7") && e.contains("node-b"), "{e}");
    // Nor may it ask for an identity with no pod at all.
    let ghost = SpiffeId::new("cluster.local", "shop", "ghost");
    assert!(ask(at_a.clone(), ghost)
        .await
        .unwrap_err()
        .contains("status 7"));

    // A workload gets its own identity, and nobody else's.
    let web_token = token(&client, "shop", "web", Some("web"), "sluice-ca").await;
    assert!(ask(ca.source(&web_token, false), web.clone()).await.is_ok());
    let db = SpiffeId::new("cluster.local", "shop", "db");
    let e = ask(ca.source(&web_token, true), db).await.unwrap_err();
    assert!(e.contains("not a node agent"), "{e}");

    // Tokens that must not work: not bound to a pod, another audience,
    // forged, absent.
    let unbound = token(&client, "sluice-system", "sluice-agent", None, "sluice-ca").await;
    let e = ask(ca.source(&unbound, true), web.clone())
        .await
        .unwrap_err();
    assert!(e.contains("not bound to a pod"), "{e}");
    let other_audience = token(
        &client,
        "sluice-system",
        "sluice-agent",
        Some("sluice-agent-node-a"),
        "elsewhere",
    )
    .await;
    let e = ask(ca.source(&other_audience, true), web.clone())
        .await
        .unwrap_err();
    assert!(e.contains("status 16"), "{e}");
    let e = ask(ca.source("not.a.token", true), web.clone())
        .await
        .unwrap_err();
    assert!(e.contains("status 16"), "{e}");

    // The agent's pod is deleted (forced: no kubelet confirms): its token
    // dies with it.
    api.kubectl(&[
        "delete",
        "pod",
        "-n",
        "sluice-system",
        "sluice-agent-node-a",
        "--grace-period=0",
        "--force",
    ]);
    let mut refused = false;
    for _ in 0..50 {
        if let Err(e) = ask(at_a.clone(), web.clone()).await {
            assert!(
                e.contains("status 16") || e.contains("no longer exists"),
                "{e}"
            );
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(refused, "a token of a deleted pod still works");

    // A restarted service keeps the root from its Secret.
    let root = ca.server.service.root_pem().to_string();
    drop(ca);
    let dir2 = TempDir::new("kube-ca-again");
    let again = ClusterCa::start(&api, &client, &dir2).await;
    assert_eq!(again.server.service.root_pem(), root);
    // A new agent pod on node-a is served again.
    let at_a = again.node_agent(&api, &client, "node-a").await;
    assert!(ask(at_a, web).await.is_ok());
}

/// The Helm chart: lints, renders, and what it renders is accepted by the
/// API server (server-side dry run) and keeps the plain manifests'
/// promises; its values switch what they say (an external CA, waypoints).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_helm_chart_renders_what_the_manifests_promise() {
    if !kube_available() {
        return;
    }
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let chart = format!("{root}/deploy/helm/sluice");
    let helm = |args: &[&str]| helm(None, args);
    helm(&["lint", "--strict", &chart]);
    let render = |extra: &[&str]| {
        let mut args = vec!["template", "sluice", chart.as_str(), "-n", "sluice-system"];
        args.extend_from_slice(extra);
        let text = helm(&args);
        let docs: Vec<serde_json::Value> = text
            .split("\n---")
            .map(|d| serde_yaml::from_str::<serde_json::Value>(d).unwrap())
            .filter(|d| !d.is_null())
            .collect();
        (text, docs)
    };
    let find = |docs: &[serde_json::Value], kind: &str, name: &str| {
        docs.iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .cloned()
    };

    // The default install, with a waypoint, applies to the API server.
    let (text, docs) = render(&["--set", "waypoints[0].namespace=shop"]);
    let api = tokio::task::spawn_blocking(KubeApi::start).await.unwrap();
    api.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: sluice-system}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n");
    let rendered = api.dir.0.join("chart.yaml");
    std::fs::write(&rendered, for_api_server_1_20(&text)).unwrap();
    api.kubectl(&[
        "apply",
        "--server-side",
        "--dry-run=server",
        "-f",
        rendered.to_str().unwrap(),
    ]);

    // The same DaemonSet promises as deploy/manifests.
    let plain: serde_json::Value = serde_yaml::from_str(
        &std::fs::read_to_string(format!("{root}/deploy/manifests/20-agent-daemonset.yaml"))
            .unwrap(),
    )
    .unwrap();
    let ds = find(&docs, "DaemonSet", "sluice-agent").expect("the agent DaemonSet");
    let (pod, plain_pod) = (
        &ds["spec"]["template"]["spec"],
        &plain["spec"]["template"]["spec"],
    );
    for key in [
        "hostPID",
        "tolerations",
        "volumes",
        "serviceAccountName",
        "nodeSelector",
    ] {
        assert_eq!(
            pod[key], plain_pod[key],
            "{key} differs from the plain manifest"
        );
    }
    assert_eq!(
        ds["spec"]["updateStrategy"], plain["spec"]["updateStrategy"],
        "the update strategy differs from the plain manifest"
    );
    let (i, pi) = (&pod["initContainers"][0], &plain_pod["initContainers"][0]);
    for key in ["name", "args", "securityContext", "volumeMounts"] {
        assert_eq!(
            i[key], pi[key],
            "init container {key} differs from the plain manifest"
        );
    }
    let (c, pc) = (&pod["containers"][0], &plain_pod["containers"][0]);
    for key in [
        "securityContext",
        "readinessProbe",
        "livenessProbe",
        "volumeMounts",
        "resources",
    ] {
        assert_eq!(
            c[key], pc[key],
            "container {key} differs from the plain manifest"
        );
    }
    let args = |c: &serde_json::Value| -> Vec<String> {
        c["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect()
    };
    assert!(args(c).contains(&"--ca-address=sluice-ca.sluice-system.svc:15012".to_string()));
    assert!(find(&docs, "Deployment", "sluice-ca").is_some());
    let wp = find(&docs, "Deployment", "waypoint").expect("the waypoint");
    assert_eq!(wp["metadata"]["namespace"], "shop");
    assert!(args(&wp["spec"]["template"]["spec"]["containers"][0])
        .contains(&"--waypoint=shop/waypoint".to_string()));
    assert!(find(&docs, "PodMonitor", "sluice").is_none());

    // An external CA (istiod): no CA Deployment, agents point there.
    let (_, docs) = render(&[
        "--set",
        "ca.enabled=false",
        "--set",
        "ca.address=istiod.istio-system.svc:15012",
        "--set",
        "monitoring.podMonitor=true",
    ]);
    assert!(find(&docs, "Deployment", "sluice-ca").is_none());
    let ds = find(&docs, "DaemonSet", "sluice-agent").unwrap();
    assert!(args(&ds["spec"]["template"]["spec"]["containers"][0])
        .contains(&"--ca-address=istiod.istio-system.svc:15012".to_string()));
    assert!(find(&docs, "PodMonitor", "sluice").is_some());
}
