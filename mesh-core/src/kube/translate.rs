//! Kubernetes objects → the mesh model. Pure: the watcher hands over what
//! its reflectors hold, this builds the same [`MeshFile`] the local mode
//! reads and validates it the same way.
//!
//! Each object is translated on its own. An object that cannot be
//! translated (a policy with an unknown field, a pod with a bad label) or
//! that the model's validation rejects (a duplicate IP, a route to a
//! missing service) is reported as a [`Rejected`] naming it, the field and
//! the reason, and everything else keeps being served. What takes its place
//! fails closed:
//! - an AuthorizationPolicy that cannot be read is replaced by a stand-in
//!   in the same scope (selector or targetRefs when those can be read, else
//!   the whole namespace): ALLOW becomes an ALLOW that matches nothing,
//!   DENY, CUSTOM or an unknown action a DENY of everything; an AUDIT one
//!   (which decides nothing) and a dry-run one (never enforced) are left
//!   out;
//! - a PeerAuthentication that cannot be read becomes STRICT in its scope,
//!   ahead of readable policies of the same scope;
//! - any other object is left out.
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
use crate::model::gateway::{DestinationRule, Gateway, HttpRoute, ReferenceGrant};
use crate::model::policy::{
    AuthorizationAction, AuthorizationPolicy, AuthorizationPolicySpec, MtlsMode, MutualTls,
    ObjectMeta, PeerAuthentication, PeerAuthenticationSpec, PolicyTargetReference, Rule,
    WorkloadSelector, DRY_RUN_ANNOTATION,
};
use crate::model::FieldError;
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
    pub reference_grants: Vec<DynamicObject>,
}

/// The model and what had to be left out of it.
pub struct Translation {
    pub model: MeshModel,
    /// One per object that could not be read as it is.
    pub problems: Vec<Rejected>,
}

/// An object that could not be read: left out of the model or replaced by
/// a stand-in that fails closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// The Kubernetes kind (`AuthorizationPolicy`, `Pod`, …).
    pub kind: &'static str,
    /// `namespace/name` (or the name of a cluster-scoped object).
    pub name: String,
    /// Where in the object (`spec.rules[0].from[0].source.principals[1]`),
    /// empty when the object as a whole is at fault.
    pub field: String,
    pub reason: String,
    /// What is served instead, in words.
    pub instead: &'static str,
}

impl std::fmt::Display for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: ", self.kind, self.name)?;
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        write!(f, "{} ({})", self.reason, self.instead)
    }
}

const LEFT_OUT: &str = "left out of the mesh model";

fn meta_of(m: &kube::core::ObjectMeta) -> ObjectMeta {
    // Only the annotations policy reads: the rest (last-applied
    // configurations, tooling notes) would bloat every model.
    let annotations = m
        .annotations
        .iter()
        .flatten()
        .filter(|(k, _)| k.as_str() == DRY_RUN_ANNOTATION)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    ObjectMeta {
        name: m.name.clone().unwrap_or_default(),
        namespace: m.namespace.clone().unwrap_or_else(|| "default".into()),
        labels: m.labels.clone().unwrap_or_default(),
        annotations,
        creation_timestamp: m
            .creation_timestamp
            .as_ref()
            .and_then(|t| serde_json::to_value(t).ok())
            .and_then(|v| v.as_str().map(str::to_string)),
    }
}

fn key_of(m: &kube::core::ObjectMeta) -> String {
    format!(
        "{}/{}",
        m.namespace.as_deref().unwrap_or("-"),
        m.name.as_deref().unwrap_or("-")
    )
}

/// A custom object's `spec` as one of the model's spec types; the error
/// names the field.
fn spec_of<S: DeserializeOwned>(o: &DynamicObject) -> Result<S, FieldError> {
    let spec = o.data.get("spec").cloned().unwrap_or(serde_json::json!({}));
    serde_path_to_error::deserialize(spec)
        .map_err(|e| FieldError::new(format!("spec.{}", e.path()), e.inner().to_string()))
}

/// One part of a custom object's `spec`, if it reads as `T`.
fn part_of<T: DeserializeOwned>(o: &DynamicObject, name: &str) -> Option<T> {
    serde_json::from_value(o.data.get("spec")?.get(name)?.clone()).ok()
}

/// What stands in for an AuthorizationPolicy that cannot be read: the same
/// scope, denying (see the module documentation); `None` when nothing
/// should (AUDIT, dry run).
fn authorization_stand_in(
    metadata: ObjectMeta,
    action: Option<AuthorizationAction>,
    selector: Option<WorkloadSelector>,
    target_refs: Vec<PolicyTargetReference>,
    why: String,
) -> Option<AuthorizationPolicy> {
    let (action, rules) = match action {
        Some(AuthorizationAction::Audit) => return None,
        Some(AuthorizationAction::Allow) => (AuthorizationAction::Allow, None),
        _ => (AuthorizationAction::Deny, Some(vec![Rule::default()])),
    };
    let p = AuthorizationPolicy {
        api_version: None,
        kind: None,
        metadata,
        spec: AuthorizationPolicySpec {
            selector: if target_refs.is_empty() {
                selector
            } else {
                None
            },
            target_refs,
            action,
            rules,
            ..Default::default()
        },
        rejected: Some(why),
    };
    // A dry-run policy is never enforced, readable or not.
    (!matches!(p.dry_run_annotation(), Some(Ok(true)))).then_some(p)
}

/// What is served instead of an AuthorizationPolicy stand-in, in words.
fn authorization_instead(stand_in: &Option<AuthorizationPolicy>) -> &'static str {
    match stand_in {
        None => LEFT_OUT,
        Some(p) if p.spec.action == AuthorizationAction::Allow => {
            "fails closed: an ALLOW that matches nothing stands in its scope"
        }
        Some(_) => "fails closed: a DENY of everything stands in its scope",
    }
}

/// What stands in for a PeerAuthentication that cannot be read: STRICT in
/// the same scope.
fn peer_authentication_stand_in(
    metadata: ObjectMeta,
    selector: Option<WorkloadSelector>,
    why: String,
) -> PeerAuthentication {
    PeerAuthentication {
        api_version: None,
        kind: None,
        metadata,
        spec: PeerAuthenticationSpec {
            selector,
            mtls: Some(MutualTls {
                mode: MtlsMode::Strict,
            }),
            port_level_mtls: BTreeMap::new(),
        },
        rejected: Some(why),
    }
}

const STRICT_INSTEAD: &str = "fails closed: STRICT mutual TLS in its scope";

/// AuthorizationPolicies, with stand-ins for those that do not read.
fn authorization_policies(
    objects: &[DynamicObject],
    problems: &mut Vec<Rejected>,
) -> Vec<AuthorizationPolicy> {
    let mut out = vec![];
    for o in objects {
        let metadata = meta_of(&o.metadata);
        match spec_of::<AuthorizationPolicySpec>(o) {
            Ok(spec) => out.push(AuthorizationPolicy {
                api_version: None,
                kind: None,
                metadata,
                spec,
                rejected: None,
            }),
            Err(FieldError { field, reason }) => {
                let action = match o.data.get("spec").and_then(|s| s.get("action")) {
                    None => Some(AuthorizationAction::Allow),
                    Some(a) => serde_json::from_value(a.clone()).ok(),
                };
                let mut refs: Vec<PolicyTargetReference> =
                    part_of(o, "targetRefs").unwrap_or_default();
                refs.extend(part_of::<PolicyTargetReference>(o, "targetRef"));
                let stand_in = authorization_stand_in(
                    metadata,
                    action,
                    part_of(o, "selector"),
                    refs,
                    format!("{field}: {reason}"),
                );
                problems.push(Rejected {
                    kind: "AuthorizationPolicy",
                    name: key_of(&o.metadata),
                    field,
                    reason,
                    instead: authorization_instead(&stand_in),
                });
                out.extend(stand_in);
            }
        }
    }
    out
}

/// PeerAuthentications, with STRICT stand-ins for those that do not read.
fn peer_authentications(
    objects: &[DynamicObject],
    problems: &mut Vec<Rejected>,
) -> Vec<PeerAuthentication> {
    objects
        .iter()
        .map(|o| {
            let metadata = meta_of(&o.metadata);
            match spec_of::<PeerAuthenticationSpec>(o) {
                Ok(spec) => PeerAuthentication {
                    api_version: None,
                    kind: None,
                    metadata,
                    spec,
                    rejected: None,
                },
                Err(FieldError { field, reason }) => {
                    problems.push(Rejected {
                        kind: "PeerAuthentication",
                        name: key_of(&o.metadata),
                        field: field.clone(),
                        reason: reason.clone(),
                        instead: STRICT_INSTEAD,
                    });
                    peer_authentication_stand_in(
                        metadata,
                        part_of(o, "selector"),
                        format!("{field}: {reason}"),
                    )
                }
            }
        })
        .collect()
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

fn workload_of(p: &Pod, local: Option<LocalPod>) -> Option<Workload> {
    let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded") | Some("Failed")) {
        return None;
    }
    let spec = p.spec.as_ref()?;
    let node = spec.node_name.clone()?;
    let (netns, cni_ips) = match local {
        Some(l) => (Some(l.netns), l.ips),
        None => (None, vec![]),
    };
    let mut ips = pod_ips(p);
    if ips.is_empty() {
        // A sandbox being set up: the API learns the pod's address only
        // after the CNI plugins (ours among them) have run.
        ips = cni_ips;
    }
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
        netns,
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
                Err(FieldError { field, reason }) => {
                    $problems.push(Rejected {
                        kind: $kind,
                        name: key_of(&o.metadata),
                        field,
                        reason,
                        instead: LEFT_OUT,
                    });
                    None
                }
            })
            .collect()
    };
}

/// What this node knows of one of its pods' network: where its namespace
/// is, and (while the sandbox is being set up, before the API has them) the
/// addresses the CNI plugins gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalPod {
    /// The namespace's path, or another stable name the agent resolves.
    pub netns: String,
    /// Addresses from the CNI result; empty when found otherwise.
    pub ips: Vec<IpAddr>,
}

/// Where a pod's network namespace is, when this node knows it.
pub type NetnsOf<'a> = &'a (dyn Fn(&Pod) -> Option<LocalPod> + Send + Sync);

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
        .filter_map(|p| workload_of(p, netns(p)))
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
            Err(reason) => problems.push(Rejected {
                kind: "Service",
                name: key_of(&s.metadata),
                field: String::new(),
                reason,
                instead: LEFT_OUT,
            }),
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
        authorization_policies: authorization_policies(
            &state.authorization_policies,
            &mut problems,
        ),
        peer_authentications: peer_authentications(&state.peer_authentications, &mut problems),
        gateways: custom!(state.gateways, "Gateway", Gateway, problems),
        http_routes: custom!(state.http_routes, "HTTPRoute", HttpRoute, problems),
        destination_rules: custom!(
            state.destination_rules,
            "DestinationRule",
            DestinationRule,
            problems
        ),
        reference_grants: custom!(
            state.reference_grants,
            "ReferenceGrant",
            ReferenceGrant,
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
    // Validation problems: replace or drop the object the error names and
    // try again.
    let model = loop {
        match MeshModel::from_file(file.clone(), "kubernetes") {
            Ok(m) => break m,
            Err(e) => match set_aside(&mut file, &e.field, &e.reason) {
                Some((kind, name, instead)) => problems.push(Rejected {
                    kind,
                    name,
                    // The object's own path: after `kind[i].`.
                    field: e
                        .field
                        .split_once("].")
                        .map(|(_, f)| f.to_string())
                        .unwrap_or_default(),
                    reason: e.reason,
                    instead,
                }),
                None => {
                    // Nothing left to blame: serve an empty mesh rather
                    // than a guess (nothing passes without policy).
                    problems.push(Rejected {
                        kind: "MeshModel",
                        name: "-".into(),
                        field: e.field,
                        reason: e.reason,
                        instead: "an empty mesh is served",
                    });
                    break MeshModel::empty(trust_domain);
                }
            },
        }
    };
    Translation { model, problems }
}

/// Deal with the object a validation error's field path points at
/// (`workloads[3].ips[0]` → workload 3): a policy is replaced by its
/// stand-in (a stand-in that fails again loses its selector or targetRefs,
/// then is dropped); anything else is removed. Returns the object's kind,
/// name and what is served instead.
fn set_aside(
    f: &mut MeshFile,
    field: &str,
    reason: &str,
) -> Option<(&'static str, String, &'static str)> {
    let (list, rest) = field.split_once('[')?;
    let idx: usize = rest.split(']').next()?.parse().ok()?;
    let within = rest.split_once("].").map_or("", |(_, f)| f);
    macro_rules! take {
        ($v:expr, $kind:literal, $name:expr) => {{
            if idx >= $v.len() {
                return None;
            }
            let o = $v.remove(idx);
            Some(($kind, $name(&o), LEFT_OUT))
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
        "authorizationPolicies" => {
            let p = f.authorization_policies.get(idx)?.clone();
            let name = p.key();
            // A stand-in failing too is at fault in its scope: widen it to
            // the namespace; failing again, there is nothing left to try.
            let scoped = p.rejected.is_none()
                && !within.starts_with("spec.selector")
                && !within.starts_with("spec.targetRef");
            let stand_in = if p.rejected.is_some()
                && p.spec.selector.is_none()
                && p.spec.target_refs.is_empty()
            {
                None
            } else {
                let mut refs = p.spec.target_refs.clone();
                refs.extend(p.spec.target_ref.clone());
                authorization_stand_in(
                    p.metadata.clone(),
                    Some(p.spec.action),
                    p.spec.selector.clone().filter(|_| scoped),
                    if scoped { refs } else { vec![] },
                    p.rejected
                        .clone()
                        .unwrap_or_else(|| format!("{within}: {reason}")),
                )
            };
            let instead = authorization_instead(&stand_in);
            match stand_in {
                Some(s) => f.authorization_policies[idx] = s,
                None => {
                    f.authorization_policies.remove(idx);
                }
            }
            Some(("AuthorizationPolicy", name, instead))
        }
        "peerAuthentications" => {
            let p = f.peer_authentications.get(idx)?.clone();
            let name = p.key();
            if p.rejected.is_some() && p.spec.selector.is_none() {
                f.peer_authentications.remove(idx);
                return Some(("PeerAuthentication", name, LEFT_OUT));
            }
            let scoped = p.rejected.is_none() && !within.starts_with("spec.selector");
            f.peer_authentications[idx] = peer_authentication_stand_in(
                p.metadata.clone(),
                p.spec.selector.clone().filter(|_| scoped),
                p.rejected
                    .clone()
                    .unwrap_or_else(|| format!("{within}: {reason}")),
            );
            Some(("PeerAuthentication", name, STRICT_INSTEAD))
        }
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
        "referenceGrants" => take!(
            f.reference_grants,
            "ReferenceGrant",
            |p: &ReferenceGrant| format!("{}/{}", p.metadata.namespace, p.metadata.name)
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
        // The good policy is in; the misspelt DENY is replaced by a DENY of
        // everything in its namespace, with the reason.
        assert_eq!(m.authorization_policies.len(), 2);
        let typo = &m.authorization_policies[1];
        assert_eq!(typo.key(), "bookinfo/typo");
        assert_eq!(typo.spec.action, AuthorizationAction::Deny);
        assert_eq!(typo.spec.rules, Some(vec![Rule::default()]));
        assert!(typo.rejected.as_deref().unwrap().contains("form"));
        let p = t
            .problems
            .iter()
            .find(|p| p.name == "bookinfo/typo")
            .unwrap();
        assert_eq!(p.kind, "AuthorizationPolicy");
        assert_eq!(p.field, "spec.rules[0].form");
        assert!(p.reason.contains("form"), "{p}");
        assert!(p.to_string().contains("DENY of everything"), "{p}");
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

    /// A pod whose sandbox the CNI plugins are still setting up has no
    /// address in the API yet: the node's own knowledge (the namespace and
    /// the CNI result) makes it a workload, so it can be captured before
    /// its first container starts. The API's addresses win once known.
    #[test]
    fn a_pod_being_set_up_takes_its_addresses_from_the_node() {
        let mut s = state();
        let mut fresh: Pod = parse::<Pod>(PODS).remove(0);
        fresh.metadata.name = Some("starting".into());
        fresh.metadata.uid = Some("uid-starting".into());
        fresh.status = None;
        s.pods.push(fresh.clone());
        let local = |p: &Pod| {
            (p.metadata.uid.as_deref() == Some("uid-starting")).then(|| LocalPod {
                netns: "/var/run/netns/cni-1".into(),
                ips: vec!["10.244.1.42".parse().unwrap()],
            })
        };
        let find = |t: &Translation| {
            t.model
                .workloads
                .iter()
                .find(|w| w.name == "starting")
                .cloned()
        };
        let t = translate(&s, "cluster.local", "istio-system", &local);
        let w = find(&t).expect("a workload");
        assert_eq!(w.ips, ["10.244.1.42".parse::<IpAddr>().unwrap()]);
        assert_eq!(w.netns.as_deref(), Some("/var/run/netns/cni-1"));
        // Without the node's knowledge it is not a workload yet.
        let t = translate(&s, "cluster.local", "istio-system", &|_| None);
        assert!(find(&t).is_none());

        s.pods.last_mut().unwrap().status = Some(k8s_openapi::api::core::v1::PodStatus {
            pod_ip: Some("10.244.1.43".into()),
            ..Default::default()
        });
        let t = translate(&s, "cluster.local", "istio-system", &local);
        let w = find(&t).unwrap();
        assert_eq!(w.ips, ["10.244.1.43".parse::<IpAddr>().unwrap()]);
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
                .any(|p| p.to_string().contains("Pod bookinfo/impostor")
                    && p.reason.contains("duplicate IP")),
            "{:?}",
            t.problems
        );
    }

    /// Fail closed: a policy that cannot be read never opens access. An
    /// ALLOW stands in as an ALLOW that matches nothing (in its selector's
    /// scope when the selector reads), a DENY or an unknown action as a
    /// DENY of everything, a PeerAuthentication as STRICT; AUDIT and
    /// dry-run policies are left out. Unreadable at translation (an
    /// unknown field) or at validation (a bad CIDR) alike.
    #[test]
    fn policies_that_cannot_be_read_fail_closed_in_their_scope() {
        const BROKEN: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-productpage, namespace: bookinfo}
spec:
  selector: {matchLabels: {app: reviews}}
  rules: [{from: [{source: {principal: ["cluster.local/ns/bookinfo/sa/productpage"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: bad-cidr, namespace: legacy}
spec:
  action: DENY
  rules: [{from: [{source: {ipBlocks: ["10.0.0.0/33"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: permit, namespace: legacy}
spec: {action: PERMIT, rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit, namespace: legacy}
spec: {action: AUDIT, rules: [{frm: []}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: trial, namespace: legacy, annotations: {istio.io/dry-run: "true"}}
spec: {action: DENY, rules: [{frm: []}]}
"#;
        const BROKEN_PA: &str = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: typo, namespace: legacy}
spec: {mtls: {mode: STRIC}}
"#;
        let mut s = state();
        s.authorization_policies = parse(BROKEN);
        s.peer_authentications = parse(BROKEN_PA);
        let t = translate(&s, "cluster.local", "istio-system", &|_| None);
        let m = &t.model;
        let get = |name: &str| {
            m.authorization_policies
                .iter()
                .find(|p| p.metadata.name == name)
        };
        let allow = get("only-productpage").unwrap();
        assert_eq!(allow.spec.action, AuthorizationAction::Allow);
        assert_eq!(allow.spec.rules, None, "matches nothing");
        assert_eq!(
            allow.spec.selector.as_ref().unwrap().match_labels["app"],
            "reviews",
            "the readable selector keeps the scope"
        );
        for name in ["bad-cidr", "permit"] {
            let p = get(name).unwrap();
            assert_eq!(p.spec.action, AuthorizationAction::Deny, "{name}");
            assert_eq!(p.spec.rules, Some(vec![Rule::default()]), "{name}");
            assert!(p.spec.selector.is_none(), "{name}");
        }
        assert!(get("audit").is_none() && get("trial").is_none());
        let pa = &m.peer_authentications[0];
        assert_eq!(pa.spec.mtls.unwrap().mode, MtlsMode::Strict);
        assert!(pa.rejected.is_some());
        // Every one is reported, with the field at fault.
        let fields: Vec<(String, String)> = t
            .problems
            .iter()
            .map(|p| (p.name.clone(), p.field.clone()))
            .collect();
        for want in [
            (
                "bookinfo/only-productpage",
                "spec.rules[0].from[0].source.principal",
            ),
            (
                "legacy/bad-cidr",
                "spec.rules[0].from[0].source.ipBlocks[0]",
            ),
            ("legacy/permit", "spec.action"),
            ("legacy/audit", "spec.rules[0].frm"),
            ("legacy/trial", "spec.rules[0].frm"),
            ("legacy/typo", "spec.mtls.mode"),
        ] {
            assert!(
                fields.contains(&(want.0.into(), want.1.into())),
                "{want:?} not in {fields:?}"
            );
        }
        // The effect: reviews refuses even its allowed caller; legacy
        // refuses everyone, plaintext first of all.
        let reviews = m.workload_by_ip("10.244.1.7".parse().unwrap()).unwrap();
        let productpage =
            crate::identity::SpiffeId::new("cluster.local", "bookinfo", "productpage");
        let d = crate::policy::authorize(
            m,
            &crate::policy::ConnInfo {
                source_identity: Some(&productpage),
                source_ip: "10.244.2.1".parse().unwrap(),
                destination: reviews,
                destination_ip: reviews.ips[0],
                destination_port: 9080,
            },
        );
        assert!(!d.allowed);
        assert!(d.reason.contains("could not be read"), "{}", d.reason);
        let old = m.workload_by_ip("10.244.1.50".parse().unwrap()).unwrap();
        assert_eq!(crate::policy::mtls_mode(m, old, 80).0, MtlsMode::Strict);
    }
}
