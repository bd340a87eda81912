//! Kubernetes objects → the mesh model. Pure: the watcher hands over what
//! its reflectors hold, this builds the same [`MeshFile`] the local mode
//! reads and validates it the same way.
//!
//! Each object is translated on its own. An object that cannot be
//! translated (a policy with an unknown field, a pod with a bad label) is
//! left out with a problem naming it, and so is an object the model's
//! validation rejects (a duplicate IP, a route to a missing service):
//! everything else keeps being served.
//!
//! Mapping, as Istio ambient reads a cluster:
//! - Pods with a node and an IP (not finished) → workloads (service
//!   account, labels, `spec.nodeName`, `status.podIPs`).
//! - Nodes → nodes with `topology.kubernetes.io/zone|region`; a node a pod
//!   names but the agent cannot see is added bare.
//! - Services with a selector and cluster IPs → services; numeric target
//!   ports as given, named ones resolved per service from the first
//!   selected pod's container ports.
//! - Namespaces → namespace labels (enrollment, waypoint use).
//! - `security.istio.io` AuthorizationPolicy / PeerAuthentication,
//!   `gateway.networking.k8s.io` Gateway / HTTPRoute, `networking.istio.io`
//!   DestinationRule → the same objects in the model (their `spec`).

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{
    Namespace as K8sNamespace, Node as K8sNode, Pod, Service as K8sService,
};
use kube::core::DynamicObject;
use serde::de::DeserializeOwned;

use crate::model::file::MeshFile;
use crate::model::gateway::{DestinationRule, Gateway, HttpRoute};
use crate::model::policy::{AuthorizationPolicy, ObjectMeta, PeerAuthentication};
use crate::model::{MeshModel, Namespace, Node, Service, ServicePort, Workload};

/// What the watchers hold, one list per kind.
#[derive(Debug, Default, Clone)]
pub struct ClusterState {
    pub namespaces: Vec<K8sNamespace>,
    pub nodes: Vec<K8sNode>,
    pub pods: Vec<Pod>,
    pub services: Vec<K8sService>,
    pub authorization_policies: Vec<DynamicObject>,
    pub peer_authentications: Vec<DynamicObject>,
    pub gateways: Vec<DynamicObject>,
    pub http_routes: Vec<DynamicObject>,
    pub destination_rules: Vec<DynamicObject>,
}

/// The model and what had to be left out of it.
pub struct Translation {
    pub model: MeshModel,
    /// `Kind namespace/name: reason`, one per object left out.
    pub problems: Vec<String>,
}

fn meta_of(m: &kube::core::ObjectMeta) -> ObjectMeta {
    ObjectMeta {
        name: m.name.clone().unwrap_or_default(),
        namespace: m.namespace.clone().unwrap_or_else(|| "default".into()),
        labels: m.labels.clone().unwrap_or_default(),
        annotations: BTreeMap::new(),
    }
}

fn id(kind: &str, m: &kube::core::ObjectMeta) -> String {
    format!(
        "{kind} {}/{}",
        m.namespace.as_deref().unwrap_or("-"),
        m.name.as_deref().unwrap_or("-")
    )
}

/// A custom object's `spec` as one of the model's spec types.
fn spec_of<S: DeserializeOwned>(o: &DynamicObject) -> Result<S, String> {
    let spec = o.data.get("spec").cloned().unwrap_or(serde_json::json!({}));
    serde_path_to_error::deserialize(spec).map_err(|e| format!("spec.{}: {}", e.path(), e.inner()))
}

fn pod_ips(p: &Pod) -> Vec<IpAddr> {
    let status = p.status.as_ref();
    let mut ips: Vec<IpAddr> = status
        .and_then(|s| s.pod_ips.as_ref())
        .map(|l| l.iter().filter_map(|i| i.ip.parse().ok()).collect())
        .unwrap_or_default();
    if ips.is_empty() {
        if let Some(ip) = status
            .and_then(|s| s.pod_ip.as_ref())
            .and_then(|i| i.parse().ok())
        {
            ips.push(ip);
        }
    }
    ips
}

fn workload_of(p: &Pod) -> Option<Workload> {
    let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded") | Some("Failed")) {
        return None;
    }
    let spec = p.spec.as_ref()?;
    let node = spec.node_name.clone()?;
    let ips = pod_ips(p);
    if ips.is_empty() || spec.host_network == Some(true) {
        return None;
    }
    Some(Workload {
        name: p.metadata.name.clone()?,
        namespace: p
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        service_account: spec
            .service_account_name
            .clone()
            .unwrap_or_else(|| "default".into()),
        node,
        ips,
        labels: p.metadata.labels.clone().unwrap_or_default(),
        netns: None,
        // Deleted but still running its grace period: dropping it would
        // un-enroll it, and its last connections would leave in clear.
        terminating: p.metadata.deletion_timestamp.is_some(),
    })
}

fn service_of(s: &K8sService, pods: &[Pod]) -> Result<Option<Service>, String> {
    let Some(spec) = &s.spec else { return Ok(None) };
    let selector = spec.selector.clone().unwrap_or_default();
    if selector.is_empty() || spec.type_.as_deref() == Some("ExternalName") {
        // Endpoints managed by hand or outside the cluster: not modelled.
        return Ok(None);
    }
    let ns = s
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let vips: Vec<IpAddr> = spec
        .cluster_ips
        .clone()
        .or_else(|| spec.cluster_ip.clone().map(|ip| vec![ip]))
        .unwrap_or_default()
        .iter()
        .filter(|ip| ip.as_str() != "None")
        .filter_map(|ip| ip.parse().ok())
        .collect();
    let selected = pods.iter().find(|p| {
        p.metadata.namespace.as_deref() == Some(&ns)
            && selector
                .iter()
                .all(|(k, v)| p.metadata.labels.as_ref().and_then(|l| l.get(k)) == Some(v))
    });
    let mut ports = vec![];
    for p in spec.ports.iter().flatten() {
        if p.protocol.as_deref().is_some_and(|x| x != "TCP") {
            continue;
        }
        let target = match &p.target_port {
            None => None,
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n)) => {
                Some(u16::try_from(*n).map_err(|_| format!("targetPort {n} out of range"))?)
            }
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(name)) => {
                // Named: the container port of that name on a selected pod.
                selected
                    .and_then(|pod| pod.spec.as_ref())
                    .and_then(|ps| {
                        ps.containers
                            .iter()
                            .flat_map(|c| c.ports.iter().flatten())
                            .find(|cp| cp.name.as_deref() == Some(name))
                    })
                    .and_then(|cp| u16::try_from(cp.container_port).ok())
            }
        };
        ports.push(ServicePort {
            name: p.name.clone(),
            port: u16::try_from(p.port).map_err(|_| format!("port {} out of range", p.port))?,
            target_port: target,
            protocol: "TCP".into(),
        });
    }
    if ports.is_empty() {
        return Ok(None);
    }
    Ok(Some(Service {
        name: s.metadata.name.clone().unwrap_or_default(),
        namespace: ns,
        vips,
        ports,
        selector,
        labels: s.metadata.labels.clone().unwrap_or_default(),
    }))
}

macro_rules! custom {
    ($list:expr, $kind:literal, $ty:ident, $problems:expr) => {
        $list
            .iter()
            .filter_map(|o| match spec_of(o) {
                Ok(spec) => Some($ty {
                    api_version: None,
                    kind: None,
                    metadata: meta_of(&o.metadata),
                    spec,
                }),
                Err(e) => {
                    $problems.push(format!("{}: {e}", id($kind, &o.metadata)));
                    None
                }
            })
            .collect()
    };
}

/// Where a pod's network namespace is (a path), when this node knows it.
pub type NetnsOf<'a> = &'a (dyn Fn(&Pod) -> Option<String> + Send + Sync);

/// Build the mesh model from the cluster's objects.
pub fn translate(
    state: &ClusterState,
    trust_domain: &str,
    root_namespace: &str,
    netns: NetnsOf<'_>,
) -> Translation {
    let mut problems = vec![];
    let mut workloads: Vec<Workload> = state
        .pods
        .iter()
        .filter_map(|p| {
            let mut w = workload_of(p)?;
            w.netns = netns(p);
            Some(w)
        })
        .collect();
    // When a new pod already has the address of one still terminating, the
    // new one keeps it (the first claim wins below).
    workloads.sort_by_key(|w| w.terminating);
    let mut nodes: Vec<Node> = state
        .nodes
        .iter()
        .filter_map(|n| {
            let labels = n.metadata.labels.clone().unwrap_or_default();
            Some(Node {
                name: n.metadata.name.clone()?,
                addresses: n
                    .status
                    .as_ref()
                    .and_then(|s| s.addresses.as_ref())
                    .map(|a| {
                        a.iter()
                            .filter(|x| x.type_ == "InternalIP")
                            .filter_map(|x| x.address.parse().ok())
                            .collect()
                    })
                    .unwrap_or_default(),
                zone: labels.get("topology.kubernetes.io/zone").cloned(),
                region: labels.get("topology.kubernetes.io/region").cloned(),
            })
        })
        .collect();
    let known: HashSet<String> = nodes.iter().map(|n| n.name.clone()).collect();
    let mut extra: Vec<String> = workloads
        .iter()
        .map(|w| w.node.clone())
        .filter(|n| !known.contains(n))
        .collect();
    extra.sort();
    extra.dedup();
    nodes.extend(extra.into_iter().map(|name| Node {
        name,
        addresses: vec![],
        zone: None,
        region: None,
    }));
    let mut services = vec![];
    for s in &state.services {
        match service_of(s, &state.pods) {
            Ok(Some(svc)) => services.push(svc),
            Ok(None) => {}
            Err(e) => problems.push(format!("{}: {e}", id("Service", &s.metadata))),
        }
    }
    let mut file = MeshFile {
        trust_domain: trust_domain.to_string(),
        root_namespace: root_namespace.to_string(),
        nodes,
        namespaces: state
            .namespaces
            .iter()
            .filter_map(|n| {
                Some(Namespace {
                    name: n.metadata.name.clone()?,
                    labels: n.metadata.labels.clone().unwrap_or_default(),
                })
            })
            .collect(),
        workloads,
        services,
        authorization_policies: custom!(
            state.authorization_policies,
            "AuthorizationPolicy",
            AuthorizationPolicy,
            problems
        ),
        peer_authentications: custom!(
            state.peer_authentications,
            "PeerAuthentication",
            PeerAuthentication,
            problems
        ),
        gateways: custom!(state.gateways, "Gateway", Gateway, problems),
        http_routes: custom!(state.http_routes, "HTTPRoute", HttpRoute, problems),
        destination_rules: custom!(
            state.destination_rules,
            "DestinationRule",
            DestinationRule,
            problems
        ),
        extension_providers: vec![],
    };
    // In the mesh file an unlisted namespace is in the mesh; in a cluster
    // a namespace not seen yet must not enroll its pods: list it bare.
    let seen: HashSet<String> = file.namespaces.iter().map(|n| n.name.clone()).collect();
    let mut unseen: Vec<String> = file
        .workloads
        .iter()
        .map(|w| w.namespace.clone())
        .filter(|n| !seen.contains(n))
        .collect();
    unseen.sort();
    unseen.dedup();
    file.namespaces
        .extend(unseen.into_iter().map(|name| Namespace {
            name,
            labels: BTreeMap::new(),
        }));
    // Validation problems: drop the object the error names and try again.
    let model = loop {
        match MeshModel::from_file(file.clone(), "kubernetes") {
            Ok(m) => break m,
            Err(e) => {
                let dropped = drop_named(&mut file, &e.field);
                problems.push(format!(
                    "{}: {}: {}",
                    dropped.as_deref().unwrap_or("?"),
                    e.field,
                    e.reason
                ));
                if dropped.is_none() {
                    // Nothing left to blame: serve an empty mesh rather
                    // than a guess (nothing passes without policy).
                    break MeshModel::empty(trust_domain);
                }
            }
        }
    };
    Translation { model, problems }
}

/// Remove the object a validation error's field path points at
/// (`workloads[3].ips[0]` → workload 3); returns what was removed.
fn drop_named(f: &mut MeshFile, field: &str) -> Option<String> {
    let (list, rest) = field.split_once('[')?;
    let idx: usize = rest.split(']').next()?.parse().ok()?;
    macro_rules! take {
        ($v:expr, $kind:literal, $name:expr) => {{
            if idx >= $v.len() {
                return None;
            }
            let o = $v.remove(idx);
            Some(format!("{} {}", $kind, $name(&o)))
        }};
    }
    match list {
        "nodes" => take!(f.nodes, "Node", |n: &Node| n.name.clone()),
        "namespaces" => take!(f.namespaces, "Namespace", |n: &Namespace| n.name.clone()),
        "workloads" => take!(f.workloads, "Pod", |w: &Workload| format!(
            "{}/{}",
            w.namespace, w.name
        )),
        "services" => take!(f.services, "Service", |s: &Service| format!(
            "{}/{}",
            s.namespace, s.name
        )),
        "authorizationPolicies" => take!(
            f.authorization_policies,
            "AuthorizationPolicy",
            |p: &AuthorizationPolicy| format!("{}/{}", p.metadata.namespace, p.metadata.name)
        ),
        "peerAuthentications" => take!(
            f.peer_authentications,
            "PeerAuthentication",
            |p: &PeerAuthentication| format!("{}/{}", p.metadata.namespace, p.metadata.name)
        ),
        "gateways" => take!(f.gateways, "Gateway", |p: &Gateway| format!(
            "{}/{}",
            p.metadata.namespace, p.metadata.name
        )),
        "httpRoutes" => take!(f.http_routes, "HTTPRoute", |p: &HttpRoute| format!(
            "{}/{}",
            p.metadata.namespace, p.metadata.name
        )),
        "destinationRules" => take!(
            f.destination_rules,
            "DestinationRule",
            |p: &DestinationRule| format!("{}/{}", p.metadata.namespace, p.metadata.name)
        ),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    //! Realistic manifests (as `kubectl get -o yaml` prints them, status
    //! included) through the translation.
    use super::*;

    fn parse<T: DeserializeOwned>(docs: &str) -> Vec<T> {
        docs.split("\n---\n")
            .filter(|d| !d.trim().is_empty())
            .map(|d| serde_yaml::from_str(d).unwrap_or_else(|e| panic!("{e}: {d}")))
            .collect()
    }

    const NAMESPACES: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: bookinfo, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
"#;

    const PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: reviews-v1-5b4f7c9d8-abcde
  namespace: bookinfo
  uid: 0e4c1c4e-1111-2222-3333-444455556666
  resourceVersion: "1234"
  labels: {app: reviews, version: v1, pod-template-hash: 5b4f7c9d8}
spec:
  serviceAccountName: bookinfo-reviews
  nodeName: worker-1
  containers:
    - name: reviews
      image: docker.io/istio/examples-bookinfo-reviews-v1:1.20.1
      ports: [{name: http, containerPort: 9080, protocol: TCP}]
status:
  phase: Running
  podIP: 10.244.1.7
  podIPs: [{ip: 10.244.1.7}, {ip: "fd00:10:244:1::7"}]
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v2-xyz, namespace: bookinfo, labels: {app: reviews, version: v2}}
spec:
  serviceAccountName: bookinfo-reviews
  nodeName: worker-2
  containers: [{name: reviews, image: reviews:v2}]
status: {phase: Running, podIP: 10.244.2.9}
---
apiVersion: v1
kind: Pod
metadata: {name: pending, namespace: bookinfo, labels: {app: reviews}}
spec: {containers: [{name: c, image: i}]}
status: {phase: Pending}
---
apiVersion: v1
kind: Pod
metadata: {name: done, namespace: bookinfo, labels: {app: reviews}}
spec: {nodeName: worker-1, containers: [{name: c, image: i}]}
status: {phase: Succeeded, podIP: 10.244.1.99}
---
apiVersion: v1
kind: Pod
metadata: {name: old-app, namespace: legacy, labels: {app: old}}
spec: {nodeName: worker-1, containers: [{name: c, image: i}]}
status: {phase: Running, podIP: 10.244.1.50}
---
apiVersion: v1
kind: Pod
metadata: {name: stray, namespace: unseen, labels: {app: stray}}
spec: {nodeName: worker-1, containers: [{name: c, image: i}]}
status: {phase: Running, podIP: 10.244.1.51}
"#;

    const SERVICES: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: bookinfo, labels: {app: reviews}}
spec:
  type: ClusterIP
  clusterIP: 10.96.12.34
  clusterIPs: [10.96.12.34]
  selector: {app: reviews}
  ports: [{name: http, port: 9080, targetPort: http, protocol: TCP}]
---
apiVersion: v1
kind: Service
metadata: {name: kubernetes, namespace: default}
spec: {clusterIP: 10.96.0.1, ports: [{name: https, port: 443, targetPort: 6443}]}
"#;

    const POLICIES: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-viewer, namespace: bookinfo, resourceVersion: "7", generation: 1}
spec:
  targetRefs: [{kind: Service, group: "", name: reviews}]
  action: ALLOW
  rules:
    - from: [{source: {principals: ["cluster.local/ns/bookinfo/sa/bookinfo-productpage"]}}]
      to: [{operation: {methods: ["GET"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: typo, namespace: bookinfo}
spec:
  action: DENY
  rules: [{form: [{source: {namespaces: [x]}}]}]
"#;

    fn state() -> ClusterState {
        ClusterState {
            namespaces: parse(NAMESPACES),
            pods: parse(PODS),
            services: parse(SERVICES),
            authorization_policies: parse(POLICIES),
            ..Default::default()
        }
    }

    #[test]
    fn pods_services_and_policies_become_the_model() {
        let t = translate(&state(), "cluster.local", "istio-system", &|_| None);
        let m = &t.model;
        let names: Vec<_> = m.workloads.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "reviews-v1-5b4f7c9d8-abcde",
                "reviews-v2-xyz",
                "old-app",
                "stray"
            ]
        );
        let r1 = &m.workloads[0];
        assert_eq!(r1.ips.len(), 2, "dual stack from podIPs");
        assert_eq!(
            m.identity(r1).to_string(),
            "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews"
        );
        assert!(m.is_enrolled(r1));
        // No enrollment label, or a namespace not seen yet: not enrolled.
        assert!(!m.is_enrolled(&m.workloads[2]));
        assert!(!m.is_enrolled(&m.workloads[3]));
        // Nodes the pods name exist.
        assert!(m.nodes.iter().any(|n| n.name == "worker-2"));
        // The named target port resolved from the pod's container port.
        let svc = m.service("bookinfo", "reviews").unwrap();
        assert_eq!(svc.ports[0].target(), 9080);
        assert_eq!(m.service_endpoints(svc).count(), 2);
        // Selector-less services are not modelled.
        assert!(m.service("default", "kubernetes").is_none());
        // The good policy is in, the misspelt one is left out with a reason.
        assert_eq!(m.authorization_policies.len(), 1);
        assert!(
            t.problems
                .iter()
                .any(|p| p.contains("AuthorizationPolicy bookinfo/typo") && p.contains("form")),
            "{:?}",
            t.problems
        );
    }

    /// A deleted pod in its grace period stays enrolled (its connections
    /// are still captured) but is no endpoint any more; should a new pod
    /// get its address meanwhile, the running pod has it.
    #[test]
    fn a_terminating_pod_stays_enrolled_but_is_no_endpoint() {
        let mut s = state();
        s.pods[0].metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                "2026-12-01T10:00:00Z".parse().unwrap(),
            ));
        let mut successor: Pod = parse::<Pod>(PODS).remove(0);
        successor.metadata.name = Some("reviews-v1-new".into());
        let status = successor.status.as_mut().unwrap();
        status.pod_ips = None;
        status.pod_ip = Some("10.244.1.8".into());
        s.pods.push(successor.clone());
        let t = translate(&s, "cluster.local", "istio-system", &|_| None);
        let m = &t.model;
        let old = m
            .workloads
            .iter()
            .find(|w| w.name == "reviews-v1-5b4f7c9d8-abcde")
            .expect("still in the model");
        assert!(old.terminating);
        assert!(m.is_enrolled(old));
        let svc = m.service("bookinfo", "reviews").unwrap();
        let mut eps: Vec<&str> = m.service_endpoints(svc).map(|w| w.name.as_str()).collect();
        eps.sort();
        assert_eq!(eps, ["reviews-v1-new", "reviews-v2-xyz"]);

        // The address reused by a new pod while the old one terminates.
        s.pods.pop();
        successor.status.as_mut().unwrap().pod_ip = Some("10.244.1.7".into());
        s.pods.insert(0, successor);
        let t = translate(&s, "cluster.local", "istio-system", &|_| None);
        assert_eq!(
            t.model
                .workload_by_ip("10.244.1.7".parse().unwrap())
                .unwrap()
                .name,
            "reviews-v1-new"
        );
    }

    #[test]
    fn an_object_validation_rejects_is_left_out_and_the_rest_served() {
        let mut s = state();
        // A second pod claiming reviews-v1's IP.
        let mut dup: Vec<Pod> = parse(PODS);
        let mut clash = dup.remove(1);
        clash.metadata.name = Some("impostor".into());
        clash.status.as_mut().unwrap().pod_ip = Some("10.244.1.7".into());
        s.pods.push(clash);
        let t = translate(&s, "cluster.local", "istio-system", &|_| None);
        assert!(t.model.workloads.iter().all(|w| w.name != "impostor"));
        assert_eq!(t.model.workloads.len(), 4);
        assert!(
            t.problems
                .iter()
                .any(|p| p.contains("Pod bookinfo/impostor") && p.contains("duplicate IP")),
            "{:?}",
            t.problems
        );
    }
}
