//! The certificate service on Kubernetes: who may obtain which identity, and
//! where the root lives.
//!
//! A caller proves who it is with a service-account token, checked by the
//! API server (TokenReview, with the service's audience). A workload gets
//! its own identity. A node agent (one of the configured service accounts)
//! may obtain the identity of a pod only if such a pod is scheduled on the
//! agent's own node — the node is that of the pod its projected token is
//! bound to — so a compromised node cannot mint identities of workloads
//! elsewhere. The root certificate and key live in a Secret (created on the
//! first start); the root certificate is published in a ConfigMap in every
//! namespace, which agents and waypoints mount.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use k8s_openapi::ByteString;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};

use crate::identity::caservice::{AuthorizeFuture, CaService, CallerAuthorizer, Refusal};
use crate::identity::{CertificateAuthority, SpiffeId};
use crate::kube::KubeError;

/// TokenReview `extra` keys of a pod-bound token.
const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";
/// Keys of the root Secret and ConfigMap.
pub const SECRET_CERT: &str = "ca.crt";
pub const SECRET_KEY: &str = "ca.key";
pub const CONFIGMAP_ROOT: &str = "root-cert.pem";

/// Decides with the API server (see the module comment).
pub struct KubeAuthorizer {
    client: kube::Client,
    trust_domain: String,
    audiences: Vec<String>,
    /// `namespace/serviceaccount` of node agents.
    node_agents: Vec<String>,
}

impl KubeAuthorizer {
    pub fn new(
        client: kube::Client,
        trust_domain: &str,
        audiences: Vec<String>,
        node_agents: Vec<String>,
    ) -> Self {
        Self {
            client,
            trust_domain: trust_domain.to_string(),
            audiences,
            node_agents,
        }
    }

    async fn decide(
        &self,
        token: Option<&str>,
        requested: Option<&SpiffeId>,
    ) -> Result<SpiffeId, Refusal> {
        let token = token.ok_or_else(|| {
            Refusal::Unauthenticated("no bearer token (send a service-account token)".into())
        })?;
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: (!self.audiences.is_empty()).then(|| self.audiences.clone()),
            },
            ..Default::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| Refusal::Unavailable(format!("TokenReview failed: {e}")))?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(Refusal::Unauthenticated(format!(
                "the API server did not accept the token: {}",
                status.error.as_deref().unwrap_or("not authenticated")
            )));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let (ns, sa) = username
            .strip_prefix("system:serviceaccount:")
            .and_then(|r| r.split_once(':'))
            .ok_or_else(|| {
                Refusal::PermissionDenied(format!("{username} is not a service account"))
            })?;
        let own = SpiffeId::new(&self.trust_domain, ns, sa);
        let requested = match requested {
            None => return Ok(own),
            Some(r) if *r == own => return Ok(own),
            Some(r) => r,
        };
        if requested.trust_domain() != self.trust_domain {
            return Err(Refusal::PermissionDenied(format!(
                "{requested} is outside the trust domain {}",
                self.trust_domain
            )));
        }
        if !self.node_agents.iter().any(|a| *a == format!("{ns}/{sa}")) {
            return Err(Refusal::PermissionDenied(format!(
                "{username} is not a node agent: it may obtain only its own identity {own}, not {requested}"
            )));
        }
        let extra = user.extra.unwrap_or_default();
        let first = |k: &str| extra.get(k).and_then(|v| v.first()).cloned();
        let (Some(pod_name), Some(pod_uid)) = (first(POD_NAME), first(POD_UID)) else {
            return Err(Refusal::PermissionDenied(format!(
                "the token of {username} is not bound to a pod (use a projected service-account token)"
            )));
        };
        let caller = Api::<Pod>::namespaced(self.client.clone(), ns)
            .get_opt(&pod_name)
            .await
            .map_err(|e| Refusal::Unavailable(format!("reading pod {ns}/{pod_name}: {e}")))?
            .filter(|p| p.metadata.uid.as_deref() == Some(pod_uid.as_str()))
            .ok_or_else(|| {
                Refusal::PermissionDenied(format!(
                    "the caller's pod {ns}/{pod_name} (uid {pod_uid}) no longer exists"
                ))
            })?;
        let node = caller.spec.and_then(|s| s.node_name).ok_or_else(|| {
            Refusal::PermissionDenied(format!(
                "the caller's pod {ns}/{pod_name} is not scheduled on a node"
            ))
        })?;
        let on_node = Api::<Pod>::namespaced(self.client.clone(), requested.namespace())
            .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
            .await
            .map_err(|e| Refusal::Unavailable(format!("listing pods on node {node}: {e}")))?;
        let runs_there = on_node.items.iter().any(|p| {
            let live = !matches!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            );
            let sa = p
                .spec
                .as_ref()
                .and_then(|s| s.service_account_name.as_deref())
                .unwrap_or("default");
            live && sa == requested.service_account()
        });
        if !runs_there {
            return Err(Refusal::PermissionDenied(format!(
                "no pod of service account {}/{} runs on node {node}, the node of the caller {ns}/{pod_name}",
                requested.namespace(),
                requested.service_account()
            )));
        }
        Ok(requested.clone())
    }
}

impl CallerAuthorizer for KubeAuthorizer {
    fn authorize<'a>(
        &'a self,
        token: Option<&'a str>,
        requested: Option<&'a SpiffeId>,
    ) -> AuthorizeFuture<'a> {
        Box::pin(self.decide(token, requested))
    }
}

/// The root from Secret `namespace/name`, or a new root stored there when
/// the Secret does not exist. Several replicas starting at once agree: the
/// one whose create loses re-reads the winner's root.
pub async fn load_or_create_root(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    trust_domain: &str,
) -> Result<CertificateAuthority, KubeError> {
    let api = Api::<Secret>::namespaced(client.clone(), namespace);
    let invalid = |reason: String| KubeError::Invalid {
        what: format!("Secret {namespace}/{name}"),
        reason,
    };
    let from_secret = |s: Secret| -> Result<CertificateAuthority, KubeError> {
        let data = s.data.unwrap_or_default();
        let text = |k: &str| {
            data.get(k)
                .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                .ok_or_else(|| invalid(format!("no key {k:?}")))
        };
        CertificateAuthority::from_pem(trust_domain, &text(SECRET_CERT)?, &text(SECRET_KEY)?)
            .map_err(|e| invalid(e.to_string()))
    };
    let read_err = || KubeError::api(format!("reading Secret {namespace}/{name}"));
    if let Some(s) = api.get_opt(name).await.map_err(read_err())? {
        return from_secret(s);
    }
    let ca = CertificateAuthority::generate(trust_domain).map_err(|e| KubeError::Invalid {
        what: "a new root".into(),
        reason: e.to_string(),
    })?;
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some([("app.kubernetes.io/part-of".into(), "sluice".into())].into()),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(
            [
                (
                    SECRET_CERT.to_string(),
                    ByteString(ca.root_pem().as_bytes().to_vec()),
                ),
                (
                    SECRET_KEY.to_string(),
                    ByteString(ca.key_pem().as_bytes().to_vec()),
                ),
            ]
            .into(),
        ),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            tracing::info!(secret = %format!("{namespace}/{name}"), "generated a new root CA and stored it");
            Ok(ca)
        }
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let s = api.get(name).await.map_err(read_err())?;
            from_secret(s)
        }
        Err(e) => Err(KubeError::api(format!(
            "creating Secret {namespace}/{name}"
        ))(e)),
    }
}

/// Publish the root certificate in ConfigMap `namespace/name` (key
/// [`CONFIGMAP_ROOT`]), where agents and waypoints mount it.
pub async fn publish_root(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    root_pem: &str,
) -> Result<(), KubeError> {
    let cm = serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {"app.kubernetes.io/part-of": "sluice"}},
        "data": {CONFIGMAP_ROOT: root_pem},
    });
    Api::<ConfigMap>::namespaced(client.clone(), namespace)
        .patch(
            name,
            &PatchParams::apply("sluice-ca").force(),
            &Patch::Apply(&cm),
        )
        .await
        .map_err(KubeError::api(format!(
            "publishing ConfigMap {namespace}/{name}"
        )))?;
    Ok(())
}

/// Keep the root ConfigMap in every namespace (as istiod does with
/// `istio-ca-root-cert`), so waypoints and other callers anywhere can mount
/// it: published when a namespace appears, re-published after a re-list.
pub async fn publish_root_everywhere(client: kube::Client, name: String, root_pem: String) {
    use futures::StreamExt;
    use k8s_openapi::api::core::v1::Namespace;
    use kube::runtime::{watcher, WatchStreamExt};
    let namespaces = Api::<Namespace>::all(client.clone());
    let mut events = std::pin::pin!(watcher(namespaces, watcher::Config::default())
        .default_backoff()
        .applied_objects());
    while let Some(event) = events.next().await {
        match event {
            Ok(ns) => {
                let Some(ns_name) = ns.metadata.name else {
                    continue;
                };
                if ns.metadata.deletion_timestamp.is_some() {
                    continue;
                }
                if let Err(e) = publish_root(&client, &ns_name, &name, &root_pem).await {
                    tracing::warn!("{e}");
                }
            }
            Err(e) => tracing::warn!("watching namespaces to publish the root: {e}"),
        }
    }
}

/// How to run the certificate service on a cluster.
#[derive(Debug, Clone)]
pub struct CaServerConfig {
    /// The namespace of the root Secret and ConfigMap (the CA's own).
    pub namespace: String,
    pub trust_domain: String,
    pub listen: SocketAddr,
    pub secret: String,
    pub root_configmap: String,
    /// Names in the service's TLS certificate.
    pub dns_names: Vec<String>,
    /// Audiences a token must carry.
    pub audiences: Vec<String>,
    /// `namespace/serviceaccount` of node agents.
    pub node_agents: Vec<String>,
    pub max_ttl: Duration,
}

/// A running certificate service; stops when dropped.
pub struct CaServer {
    pub addr: SocketAddr,
    pub service: Arc<CaService>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for CaServer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Load (or create) the root, publish it, and serve.
pub async fn start(client: kube::Client, cfg: &CaServerConfig) -> Result<CaServer, KubeError> {
    let ca = load_or_create_root(&client, &cfg.namespace, &cfg.secret, &cfg.trust_domain).await?;
    publish_root(&client, &cfg.namespace, &cfg.root_configmap, ca.root_pem()).await?;
    let everywhere = tokio::spawn(publish_root_everywhere(
        client.clone(),
        cfg.root_configmap.clone(),
        ca.root_pem().to_string(),
    ));
    let authorizer = KubeAuthorizer::new(
        client,
        &cfg.trust_domain,
        cfg.audiences.clone(),
        cfg.node_agents.clone(),
    );
    let service = CaService::new(Arc::new(ca), Arc::new(authorizer), cfg.max_ttl);
    let tls = service
        .tls_config(cfg.dns_names.clone())
        .map_err(|e| KubeError::Invalid {
            what: "the service's TLS certificate".into(),
            reason: e.to_string(),
        })?;
    let bind_err = |source| KubeError::Io {
        what: format!("binding {}", cfg.listen),
        source,
    };
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(bind_err)?;
    let addr = listener.local_addr().map_err(bind_err)?;
    let task = tokio::spawn(service.clone().serve(listener, tls));
    tracing::info!(%addr, "certificate service listening");
    Ok(CaServer {
        addr,
        service,
        tasks: vec![task, everywhere],
    })
}
