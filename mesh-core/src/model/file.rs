//! The local mesh file: YAML describing nodes, namespaces, workloads,
//! services and Istio policies, used when no Kubernetes API server is
//! configured. Loading validates everything and names the file, the field and
//! the reason for the first problem found, so an operator can fix it without
//! guessing; a model is only ever built from a file that passed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::AtomicUsize;

use ipnet::IpNet;
use serde::Deserialize;

use super::gateway::{
    self, DestinationRule, ExtensionProviderConfig, Gateway, HttpRoute, ReferenceGrant,
};
use super::policy::{AuthorizationAction, AuthorizationPolicy, PeerAuthentication, Rule};
use super::{MeshModel, Namespace, Node, Service, Workload};

/// Why a mesh file (or another model source) was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{source_name}: {field}: {reason}")]
pub struct ModelError {
    /// The file (or other source) the model came from.
    pub source_name: String,
    /// Path of the offending field, e.g. `workloads[2].ips[0]`.
    pub field: String,
    pub reason: String,
}

/// A problem in one object: the path of the field inside it (e.g.
/// `spec.rules[0].to`) and why; a [`ModelError`] once the source and the
/// object are named.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{field}: {reason}")]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The same problem with the field's path rewritten (prefixed with
    /// the enclosing object's, say).
    pub fn map_field(self, f: impl FnOnce(&str) -> String) -> Self {
        FieldError {
            field: f(&self.field),
            reason: self.reason,
        }
    }

    /// The error of a whole model from `source_name`.
    pub fn in_source(self, source_name: impl Into<String>) -> ModelError {
        ModelError {
            source_name: source_name.into(),
            field: self.field,
            reason: self.reason,
        }
    }
}

/// The file format. Field names are camelCase like Kubernetes objects.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MeshFile {
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    /// Policies in this namespace apply mesh-wide (Istio's root namespace).
    #[serde(default = "default_root_namespace")]
    pub root_namespace: String,
    #[serde(default)]
    pub nodes: Vec<Node>,
    #[serde(default)]
    pub namespaces: Vec<Namespace>,
    #[serde(default)]
    pub workloads: Vec<Workload>,
    #[serde(default)]
    pub services: Vec<Service>,
    #[serde(default)]
    pub authorization_policies: Vec<AuthorizationPolicy>,
    #[serde(default)]
    pub peer_authentications: Vec<PeerAuthentication>,
    /// Waypoints (Gateway API `Gateway`, class `istio-waypoint`).
    #[serde(default)]
    pub gateways: Vec<Gateway>,
    #[serde(default)]
    pub http_routes: Vec<HttpRoute>,
    #[serde(default)]
    pub destination_rules: Vec<DestinationRule>,
    /// Gateway API ReferenceGrants: which routes may send to Services of
    /// another namespace.
    #[serde(default)]
    pub reference_grants: Vec<ReferenceGrant>,
    /// External authorizers for `CUSTOM` policies (Istio MeshConfig).
    #[serde(default)]
    pub extension_providers: Vec<ExtensionProviderConfig>,
}

fn default_trust_domain() -> String {
    "cluster.local".to_string()
}

fn default_root_namespace() -> String {
    "istio-system".to_string()
}

impl MeshModel {
    /// Read and validate a mesh file.
    pub fn load(path: &Path) -> Result<MeshModel, ModelError> {
        Self::load_with_bytes(path).map(|(m, _)| m)
    }

    /// Read and validate a mesh file; also returns the bytes the model was
    /// built from (what a watcher compares later reads against).
    pub fn load_with_bytes(path: &Path) -> Result<(MeshModel, Vec<u8>), ModelError> {
        let name = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| ModelError {
            source_name: name.clone(),
            field: "(file)".into(),
            reason: format!("cannot read: {e}"),
        })?;
        let text = String::from_utf8(bytes.clone()).map_err(|e| ModelError {
            source_name: name.clone(),
            field: "(file)".into(),
            reason: format!("not UTF-8: {e}"),
        })?;
        Ok((Self::from_yaml(&text, &name)?, bytes))
    }

    /// Parse and validate mesh YAML; `source_name` names it in errors.
    pub fn from_yaml(text: &str, source_name: &str) -> Result<MeshModel, ModelError> {
        let de = serde_yaml::Deserializer::from_str(text);
        let file: MeshFile = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let at = inner
                .location()
                .map(|l| format!(" (line {}, column {})", l.line(), l.column()))
                .unwrap_or_default();
            ModelError {
                source_name: source_name.to_string(),
                field: if path == "." {
                    "(document)".into()
                } else {
                    path
                },
                reason: format!("{inner}{at}"),
            }
        })?;
        Self::from_file(file, source_name)
    }

    /// Validate an already-deserialized file and build the indices.
    pub fn from_file(f: MeshFile, source_name: &str) -> Result<MeshModel, ModelError> {
        let err = |field: String, reason: String| ModelError {
            source_name: source_name.to_string(),
            field,
            reason,
        };
        check_dns_label(&f.trust_domain, true).map_err(|r| err("trustDomain".into(), r))?;
        check_dns_label(&f.root_namespace, false).map_err(|r| err("rootNamespace".into(), r))?;

        let mut node_names = HashSet::new();
        for (i, n) in f.nodes.iter().enumerate() {
            check_dns_label(&n.name, true).map_err(|r| err(format!("nodes[{i}].name"), r))?;
            if !node_names.insert(n.name.as_str()) {
                return Err(err(
                    format!("nodes[{i}].name"),
                    format!("duplicate node {:?}", n.name),
                ));
            }
        }
        let mut ns_names = HashSet::new();
        for (i, n) in f.namespaces.iter().enumerate() {
            check_dns_label(&n.name, false).map_err(|r| err(format!("namespaces[{i}].name"), r))?;
            if !ns_names.insert(n.name.as_str()) {
                return Err(err(
                    format!("namespaces[{i}].name"),
                    format!("duplicate namespace {:?}", n.name),
                ));
            }
        }

        let mut by_ip: HashMap<IpAddr, usize> = HashMap::new();
        let mut wl_names = HashSet::new();
        for (i, w) in f.workloads.iter().enumerate() {
            let at = |field: &str| format!("workloads[{i}].{field}");
            check_dns_label(&w.name, true).map_err(|r| err(at("name"), r))?;
            check_dns_label(&w.namespace, false).map_err(|r| err(at("namespace"), r))?;
            check_dns_label(&w.service_account, true).map_err(|r| err(at("serviceAccount"), r))?;
            if !wl_names.insert((w.namespace.as_str(), w.name.as_str())) {
                return Err(err(
                    at("name"),
                    format!("duplicate workload {}/{}", w.namespace, w.name),
                ));
            }
            if !node_names.contains(w.node.as_str()) {
                return Err(err(
                    at("node"),
                    format!("unknown node {:?} (not in nodes)", w.node),
                ));
            }
            if let Some(ns) = &w.netns {
                if ns.is_empty()
                    || ns.chars().any(|c| c.is_whitespace() || c == '\0')
                    || (!ns.contains('/') && ns.starts_with('.'))
                {
                    return Err(err(
                        at("netns"),
                        format!("{ns:?} is not a namespace name or path"),
                    ));
                }
            }
            if w.ips.is_empty() {
                return Err(err(at("ips"), "a workload needs at least one IP".into()));
            }
            for (j, ip) in w.ips.iter().enumerate() {
                check_unicast(*ip).map_err(|r| err(at(&format!("ips[{j}]")), r))?;
                if let Some(other) = by_ip.insert(*ip, i) {
                    let o = &f.workloads[other];
                    return Err(err(
                        at(&format!("ips[{j}]")),
                        format!(
                            "duplicate IP {ip}: already used by workload {}/{}",
                            o.namespace, o.name
                        ),
                    ));
                }
            }
        }

        let mut by_vip: HashMap<SocketAddr, (usize, usize)> = HashMap::new();
        let mut endpoints = Vec::with_capacity(f.services.len());
        let mut svc_names = HashSet::new();
        for (i, s) in f.services.iter().enumerate() {
            let at = |field: &str| format!("services[{i}].{field}");
            check_dns_label(&s.name, false).map_err(|r| err(at("name"), r))?;
            check_dns_label(&s.namespace, false).map_err(|r| err(at("namespace"), r))?;
            if !svc_names.insert((s.namespace.as_str(), s.name.as_str())) {
                return Err(err(
                    at("name"),
                    format!("duplicate service {}/{}", s.namespace, s.name),
                ));
            }
            if s.ports.is_empty() {
                return Err(err(at("ports"), "a service needs at least one port".into()));
            }
            let mut seen_ports = HashSet::new();
            for (j, p) in s.ports.iter().enumerate() {
                if p.port == 0 {
                    return Err(err(
                        at(&format!("ports[{j}].port")),
                        "port 0 is not a valid port".into(),
                    ));
                }
                if p.target_port == Some(0) {
                    return Err(err(
                        at(&format!("ports[{j}].targetPort")),
                        "port 0 is not a valid port".into(),
                    ));
                }
                if !p.protocol.eq_ignore_ascii_case("TCP") {
                    return Err(err(
                        at(&format!("ports[{j}].protocol")),
                        format!(
                            "unsupported protocol {:?} (only TCP is proxied)",
                            p.protocol
                        ),
                    ));
                }
                if !seen_ports.insert(p.port) {
                    return Err(err(
                        at(&format!("ports[{j}].port")),
                        format!("duplicate port {}", p.port),
                    ));
                }
            }
            for (j, vip) in s.vips.iter().enumerate() {
                check_unicast(*vip).map_err(|r| err(at(&format!("vips[{j}]")), r))?;
                if let Some(&w) = by_ip.get(vip) {
                    let o = &f.workloads[w];
                    return Err(err(
                        at(&format!("vips[{j}]")),
                        format!(
                            "duplicate IP {vip}: already used by workload {}/{}",
                            o.namespace, o.name
                        ),
                    ));
                }
                for (k, p) in s.ports.iter().enumerate() {
                    if let Some((other, _)) = by_vip.insert(SocketAddr::new(*vip, p.port), (i, k)) {
                        let o = &f.services[other];
                        return Err(err(
                            at(&format!("vips[{j}]")),
                            format!(
                                "duplicate VIP {vip}: already used by service {}/{}",
                                o.namespace, o.name
                            ),
                        ));
                    }
                }
            }
            if s.selector.is_empty() {
                return Err(err(
                    at("selector"),
                    "an empty selector would select every pod; name labels".into(),
                ));
            }
            endpoints.push(
                f.workloads
                    .iter()
                    .enumerate()
                    .filter(|(_, w)| {
                        w.namespace == s.namespace
                            && !w.terminating
                            && s.selector.iter().all(|(k, v)| w.labels.get(k) == Some(v))
                    })
                    .map(|(i, _)| i)
                    .collect::<Vec<_>>(),
            );
        }

        let mut pol_names = HashSet::new();
        for (i, p) in f.authorization_policies.iter().enumerate() {
            let at = |field: &str| format!("authorizationPolicies[{i}].{field}");
            check_kind(&p.api_version, &p.kind, "AuthorizationPolicy")
                .map_err(|(f, r)| err(at(f), r))?;
            check_dns_label(&p.metadata.name, true).map_err(|r| err(at("metadata.name"), r))?;
            check_dns_label(&p.metadata.namespace, false)
                .map_err(|r| err(at("metadata.namespace"), r))?;
            if !pol_names.insert((p.metadata.namespace.as_str(), p.metadata.name.as_str())) {
                return Err(err(
                    at("metadata.name"),
                    format!(
                        "duplicate AuthorizationPolicy {}/{}",
                        p.metadata.namespace, p.metadata.name
                    ),
                ));
            }
            if p.spec.action == AuthorizationAction::Custom && p.spec.provider.is_none() {
                return Err(err(
                    at("spec.provider"),
                    "action CUSTOM needs a provider".into(),
                ));
            }
            if p.spec.action != AuthorizationAction::Custom && p.spec.provider.is_some() {
                return Err(err(
                    at("spec.provider"),
                    "provider is only valid with action CUSTOM".into(),
                ));
            }
            if p.spec.selector.is_some()
                && (p.spec.target_ref.is_some() || !p.spec.target_refs.is_empty())
            {
                return Err(err(
                    at("spec.selector"),
                    "selector and targetRef(s) are mutually exclusive".into(),
                ));
            }
            if matches!(
                p.spec.action,
                AuthorizationAction::Deny | AuthorizationAction::Custom
            ) && p.spec.rules.is_none()
            {
                return Err(err(
                    at("spec.rules"),
                    "a DENY or CUSTOM policy without rules never matches: add an empty rule `{}` to match every request (as Istio requires)".into(),
                ));
            }
            if let Some(s) = &p.spec.selector {
                check_selector(s).map_err(|r| err(at("spec.selector.matchLabels"), r))?;
            }
            for (j, rule) in p.spec.rules.iter().flatten().enumerate() {
                check_rule(rule, p.spec.action).map_err(
                    |FieldError {
                         field: f,
                         reason: r,
                     }| err(at(&format!("spec.rules[{j}].{f}")), r),
                )?;
            }
        }
        let mut pa_names = HashSet::new();
        for (i, p) in f.peer_authentications.iter().enumerate() {
            let at = |field: &str| format!("peerAuthentications[{i}].{field}");
            check_kind(&p.api_version, &p.kind, "PeerAuthentication")
                .map_err(|(f, r)| err(at(f), r))?;
            check_dns_label(&p.metadata.name, true).map_err(|r| err(at("metadata.name"), r))?;
            check_dns_label(&p.metadata.namespace, false)
                .map_err(|r| err(at("metadata.namespace"), r))?;
            if !pa_names.insert((p.metadata.namespace.as_str(), p.metadata.name.as_str())) {
                return Err(err(
                    at("metadata.name"),
                    format!(
                        "duplicate PeerAuthentication {}/{}",
                        p.metadata.namespace, p.metadata.name
                    ),
                ));
            }
            for port in p.spec.port_level_mtls.keys() {
                parse_port(port).map_err(|r| err(at(&format!("spec.portLevelMtls[{port}]")), r))?;
            }
            if !p.spec.port_level_mtls.is_empty() && !p.selects_workloads() {
                return Err(err(
                    at("spec.portLevelMtls"),
                    "portLevelMtls needs a workload selector with labels: a mesh- or namespace-wide policy cannot have port-level mTLS (as in Istio)".into(),
                ));
            }
            if let Some(s) = &p.spec.selector {
                check_selector(s).map_err(|r| err(at("spec.selector.matchLabels"), r))?;
            }
        }

        check_l7_objects(&f).map_err(|e| err(e.field, e.reason))?;

        let cursors = f.services.iter().map(|_| AtomicUsize::new(0)).collect();
        Ok(MeshModel {
            trust_domain: f.trust_domain,
            root_namespace: f.root_namespace,
            nodes: f.nodes,
            namespaces: f.namespaces,
            workloads: f.workloads,
            services: f.services,
            authorization_policies: f.authorization_policies,
            peer_authentications: f.peer_authentications,
            gateways: f.gateways,
            http_routes: f.http_routes,
            destination_rules: f.destination_rules,
            reference_grants: f.reference_grants,
            extension_providers: f.extension_providers,
            source: source_name.to_string(),
            by_ip,
            by_vip,
            endpoints,
            cursors,
            waypoint_cursor: AtomicUsize::new(0),
        })
    }

    /// An empty model (no workloads): what an agent serves before its first
    /// good configuration.
    pub fn empty(trust_domain: &str) -> MeshModel {
        Self::from_file(
            MeshFile {
                trust_domain: trust_domain.to_string(),
                root_namespace: default_root_namespace(),
                ..Default::default()
            },
            "(empty)",
        )
        .expect("an empty mesh is valid")
    }
}

/// What every object of the L7 kinds is checked for: its API group and
/// kind, a DNS name, and no other object of the kind with the same name.
fn check_object<'a>(
    at: &dyn Fn(&str) -> String,
    (api_version, kind): (&Option<String>, &Option<String>),
    group: &str,
    want: &str,
    meta: &'a super::policy::ObjectMeta,
    names: &mut HashSet<(&'a str, &'a str)>,
) -> Result<(), FieldError> {
    gateway::check_api(api_version, kind, &[group], want).map_err(|e| e.map_field(at))?;
    check_dns_label(&meta.name, true).map_err(|r| FieldError::new(at("metadata.name"), r))?;
    if !names.insert((&meta.namespace, &meta.name)) {
        return Err(FieldError::new(
            at("metadata.name"),
            format!("duplicate {want} {}/{}", meta.namespace, meta.name),
        ));
    }
    Ok(())
}

/// Gateways, HTTPRoutes and DestinationRules: shapes, names, and that
/// every reference names something in the file.
fn check_l7_objects(f: &MeshFile) -> Result<(), FieldError> {
    let service = |ns: &str, name: &str| {
        f.services
            .iter()
            .find(|s| s.namespace == ns && s.name == name)
    };
    let mut names = HashSet::new();
    for (i, g) in f.gateways.iter().enumerate() {
        let at = |field: &str| format!("gateways[{i}].{field}");
        check_object(
            &at,
            (&g.api_version, &g.kind),
            "gateway.networking.k8s.io",
            "Gateway",
            &g.metadata,
            &mut names,
        )?;
        if !g.is_waypoint() {
            return Err(FieldError::new(
                at("spec.gatewayClassName"),
                format!(
                    "{:?}: only waypoints (class {}) are served by Sluice",
                    g.spec.gateway_class_name,
                    gateway::WAYPOINT_CLASS
                ),
            ));
        }
    }
    let mut names = HashSet::new();
    for (i, r) in f.http_routes.iter().enumerate() {
        let at = |field: &str| format!("httpRoutes[{i}].{field}");
        check_object(
            &at,
            (&r.api_version, &r.kind),
            "gateway.networking.k8s.io",
            "HTTPRoute",
            &r.metadata,
            &mut names,
        )?;
        if r.spec.parent_refs.is_empty() {
            return Err(FieldError::new(
                at("spec.parentRefs"),
                "a route needs a parent service",
            ));
        }
        for (j, p) in r.spec.parent_refs.iter().enumerate() {
            let ns = p.namespace.as_deref().unwrap_or(&r.metadata.namespace);
            if !p.is_service() {
                return Err(FieldError::new(
                    at(&format!("spec.parentRefs[{j}]")),
                    "mesh routes attach to a Service (group \"\", kind Service)",
                ));
            }
            let Some(svc) = service(ns, &p.name) else {
                return Err(FieldError::new(
                    at(&format!("spec.parentRefs[{j}].name")),
                    format!("unknown service {ns}/{}", p.name),
                ));
            };
            if let Some(port) = p.port {
                if !svc.ports.iter().any(|sp| sp.port == port) {
                    return Err(FieldError::new(
                        at(&format!("spec.parentRefs[{j}].port")),
                        format!("service {ns}/{} has no port {port}", p.name),
                    ));
                }
            }
        }
        for (j, rule) in r.spec.rules.iter().enumerate() {
            let at_rule = |field: &str| at(&format!("spec.rules[{j}].{field}"));
            gateway::check_rule(rule).map_err(|e| e.map_field(at_rule))?;
            // Backends that cannot be used (missing, not a Service, in
            // another namespace without a ReferenceGrant) are not errors:
            // Gateway API answers 500 for their share of the traffic, and
            // `analyze` and the route's status say why.
        }
    }
    let mut names = HashSet::new();
    for (i, g) in f.reference_grants.iter().enumerate() {
        let at = |field: &str| format!("referenceGrants[{i}].{field}");
        check_object(
            &at,
            (&g.api_version, &g.kind),
            "gateway.networking.k8s.io",
            "ReferenceGrant",
            &g.metadata,
            &mut names,
        )?;
        if g.spec.from.is_empty() || g.spec.to.is_empty() {
            return Err(FieldError::new(at("spec"), "from and to must not be empty"));
        }
    }
    let mut names = HashSet::new();
    for (i, d) in f.destination_rules.iter().enumerate() {
        let at = |field: &str| format!("destinationRules[{i}].{field}");
        check_object(
            &at,
            (&d.api_version, &d.kind),
            "networking.istio.io",
            "DestinationRule",
            &d.metadata,
            &mut names,
        )?;
        let (name, ns) = super::split_host(&d.spec.host, &d.metadata.namespace);
        if service(ns, name).is_none() {
            return Err(FieldError::new(
                at("spec.host"),
                format!("{:?} names no service in the mesh", d.spec.host),
            ));
        }
        gateway::check_traffic_policy(&d.spec.traffic_policy)
            .map_err(|e| e.map_field(|f| at(&format!("spec.{f}"))))?;
    }
    let mut names = HashSet::new();
    for (i, p) in f.extension_providers.iter().enumerate() {
        let at = |field: &str| format!("extensionProviders[{i}].{field}");
        check_dns_label(&p.name, true).map_err(|r| FieldError::new(at("name"), r))?;
        if !names.insert(p.name.as_str()) {
            return Err(FieldError::new(
                at("name"),
                format!("duplicate provider {:?}", p.name),
            ));
        }
        let Some((svc, port, timeout)) = p.endpoint() else {
            return Err(FieldError::new(
                at("name"),
                "set exactly one of envoyExtAuthzHttp, envoyExtAuthzGrpc",
            ));
        };
        let kind = if p.envoy_ext_authz_http.is_some() {
            "envoyExtAuthzHttp"
        } else {
            "envoyExtAuthzGrpc"
        };
        let (name, ns) = super::split_host(svc, "default");
        let found = service(ns, name);
        match found {
            None => {
                return Err(FieldError::new(
                    at(&format!("{kind}.service")),
                    format!("{svc:?} names no service in the mesh (use name.namespace)"),
                ))
            }
            Some(s) if !s.ports.iter().any(|sp| sp.port == port) => {
                return Err(FieldError::new(
                    at(&format!("{kind}.port")),
                    format!("service {ns}/{name} has no port {port}"),
                ))
            }
            _ => {}
        }
        if let Some(t) = timeout {
            gateway::parse_duration(t)
                .map_err(|r| FieldError::new(at(&format!("{kind}.timeout")), r))?;
        }
    }
    for (i, p) in f.authorization_policies.iter().enumerate() {
        if let Some(provider) = &p.spec.provider {
            if !names.contains(provider.name.as_str()) {
                return Err(FieldError::new(
                    format!("authorizationPolicies[{i}].spec.provider.name"),
                    format!(
                        "unknown extension provider {:?} (not in extensionProviders)",
                        provider.name
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn check_kind(
    api_version: &Option<String>,
    kind: &Option<String>,
    want: &str,
) -> Result<(), (&'static str, String)> {
    if let Some(v) = api_version {
        if !matches!(
            v.as_str(),
            "security.istio.io/v1" | "security.istio.io/v1beta1"
        ) {
            return Err((
                "apiVersion",
                format!("expected security.istio.io/v1, got {v:?}"),
            ));
        }
    }
    if let Some(k) = kind {
        if k != want {
            return Err(("kind", format!("expected {want}, got {k:?}")));
        }
    }
    Ok(())
}

/// One rule of an AuthorizationPolicy, checked as Istio's validation checks
/// it (so what Istio refuses is refused here too, with the field named).
fn check_rule(rule: &Rule, action: AuthorizationAction) -> Result<(), FieldError> {
    let custom = action == AuthorizationAction::Custom;
    for (i, from) in rule.from.iter().enumerate() {
        let s = &from.source;
        let at = |f: &str| format!("from[{i}].source{f}");
        let lists: [(&str, &Vec<String>); 12] = [
            ("principals", &s.principals),
            ("notPrincipals", &s.not_principals),
            ("requestPrincipals", &s.request_principals),
            ("notRequestPrincipals", &s.not_request_principals),
            ("namespaces", &s.namespaces),
            ("notNamespaces", &s.not_namespaces),
            ("serviceAccounts", &s.service_accounts),
            ("notServiceAccounts", &s.not_service_accounts),
            ("ipBlocks", &s.ip_blocks),
            ("notIpBlocks", &s.not_ip_blocks),
            ("remoteIpBlocks", &s.remote_ip_blocks),
            ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
        ];
        if lists.iter().all(|(_, l)| l.is_empty()) {
            return Err(FieldError::new(
                at(""),
                "a source must not be empty (leave `from` out to match any source)",
            ));
        }
        for (name, list) in lists {
            check_values(list)
                .map_err(|(j, r)| FieldError::new(at(&format!(".{name}[{j}]")), r))?;
        }
        let by_account = !s.service_accounts.is_empty() || !s.not_service_accounts.is_empty();
        let by_principal = !s.principals.is_empty()
            || !s.not_principals.is_empty()
            || !s.namespaces.is_empty()
            || !s.not_namespaces.is_empty();
        if by_account && by_principal {
            return Err(FieldError::new(
                at(".serviceAccounts"),
                "serviceAccounts cannot be set with principals or namespaces",
            ));
        }
        for (name, list) in [
            ("serviceAccounts", &s.service_accounts),
            ("notServiceAccounts", &s.not_service_accounts),
        ] {
            check_service_accounts(list)
                .map_err(|r| FieldError::new(at(&format!(".{name}")), r))?;
        }
        for (name, list) in [
            ("ipBlocks", &s.ip_blocks),
            ("notIpBlocks", &s.not_ip_blocks),
            ("remoteIpBlocks", &s.remote_ip_blocks),
            ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
        ] {
            for (j, b) in list.iter().enumerate() {
                parse_ip_block(b).map_err(|r| FieldError::new(at(&format!(".{name}[{j}]")), r))?;
            }
        }
        if custom {
            for (name, list) in [
                ("principals", &s.principals),
                ("notPrincipals", &s.not_principals),
                ("requestPrincipals", &s.request_principals),
                ("notRequestPrincipals", &s.not_request_principals),
                ("namespaces", &s.namespaces),
                ("notNamespaces", &s.not_namespaces),
                ("serviceAccounts", &s.service_accounts),
                ("notServiceAccounts", &s.not_service_accounts),
            ] {
                if !list.is_empty() {
                    return Err(FieldError::new(
                        at(&format!(".{name}")),
                        "not supported with action CUSTOM (as in Istio)",
                    ));
                }
            }
        }
    }
    for (i, to) in rule.to.iter().enumerate() {
        let o = &to.operation;
        let at = |f: &str| format!("to[{i}].operation{f}");
        let lists: [(&str, &Vec<String>); 8] = [
            ("hosts", &o.hosts),
            ("notHosts", &o.not_hosts),
            ("ports", &o.ports),
            ("notPorts", &o.not_ports),
            ("methods", &o.methods),
            ("notMethods", &o.not_methods),
            ("paths", &o.paths),
            ("notPaths", &o.not_paths),
        ];
        if lists.iter().all(|(_, l)| l.is_empty()) {
            return Err(FieldError::new(
                at(""),
                "an operation must not be empty (leave `to` out to match any operation)",
            ));
        }
        for (name, list) in lists {
            check_values(list)
                .map_err(|(j, r)| FieldError::new(at(&format!(".{name}[{j}]")), r))?;
        }
        for (name, list) in [("ports", &o.ports), ("notPorts", &o.not_ports)] {
            for (j, p) in list.iter().enumerate() {
                parse_port(p).map_err(|r| FieldError::new(at(&format!(".{name}[{j}]")), r))?;
            }
        }
        for (name, list) in [("paths", &o.paths), ("notPaths", &o.not_paths)] {
            // A template Sluice read as a literal would never match: a DENY
            // would let through what Istio denies.
            if let Some(j) = list
                .iter()
                .position(|p| p.contains("{*}") || p.contains("{**}"))
            {
                return Err(FieldError::new(
                    at(&format!(".{name}[{j}]")),
                    "path templates ({*}, {**}) are not supported by Sluice",
                ));
            }
        }
    }
    for (i, c) in rule.when.iter().enumerate() {
        let at = |f: &str| format!("when[{i}]{f}");
        if c.key.is_empty() {
            return Err(FieldError::new(at(".key"), "empty condition key"));
        }
        if c.values.is_empty() && c.not_values.is_empty() {
            return Err(FieldError::new(
                at(""),
                "a condition needs values or notValues",
            ));
        }
        check_condition_key(&c.key).map_err(|r| FieldError::new(at(".key"), r))?;
        if custom
            && (matches!(
                c.key.as_str(),
                "source.namespace" | "source.serviceAccount" | "source.principal"
            ) || c.key.starts_with("request.auth."))
        {
            return Err(FieldError::new(
                at(".key"),
                format!(
                    "{} is not supported with action CUSTOM (as in Istio)",
                    c.key
                ),
            ));
        }
        for (name, list) in [("values", &c.values), ("notValues", &c.not_values)] {
            check_values(list)
                .map_err(|(j, r)| FieldError::new(at(&format!(".{name}[{j}]")), r))?;
            for (j, v) in list.iter().enumerate() {
                let bad = |r: String| FieldError::new(at(&format!(".{name}[{j}]")), r);
                match c.key.as_str() {
                    "source.ip" | "remote.ip" | "destination.ip" => {
                        parse_ip_block(v).map_err(bad)?;
                    }
                    "destination.port" => {
                        parse_port(v).map_err(bad)?;
                    }
                    _ => {}
                }
            }
            if c.key == "source.serviceAccount" {
                check_service_accounts(list)
                    .map_err(|r| FieldError::new(at(&format!(".{name}")), r))?;
            }
        }
    }
    Ok(())
}

/// Istio refuses empty strings in policy lists; the index of the first one.
fn check_values(list: &[String]) -> Result<(), (usize, String)> {
    match list.iter().position(|v| v.is_empty()) {
        Some(j) => Err((j, "empty value not allowed".into())),
        None => Ok(()),
    }
}

/// `serviceAccounts` entries as Istio accepts them: `name` or
/// `namespace/name`, no wildcard, at most 16 of at most 320 characters.
fn check_service_accounts(list: &[String]) -> Result<(), String> {
    if list.len() > 16 {
        return Err(format!("{} values: at most 16 are allowed", list.len()));
    }
    for v in list {
        if v.contains('*') {
            return Err(format!("{v:?}: wildcards are not allowed"));
        }
        if v.len() > 320 {
            return Err(format!("{v:?}: longer than 320 characters"));
        }
        let parts: Vec<&str> = v.split('/').collect();
        if parts.len() > 2 || parts.iter().any(|p| p.is_empty()) {
            return Err(format!(
                "{v:?}: expected \"serviceAccount\" or \"namespace/serviceAccount\""
            ));
        }
    }
    Ok(())
}

/// The condition keys Istio knows (`request.headers[name]` and other map
/// keys need their name); the retired ones get Istio's explanation.
fn check_condition_key(k: &str) -> Result<(), String> {
    let map_key = |prefix: &str| {
        k.strip_prefix(prefix)
            .and_then(|r| r.strip_prefix('['))
            .and_then(|r| r.strip_suffix(']'))
            .map(|name| {
                if name.is_empty() {
                    Err(format!("{k:?}: expected {prefix}[name]"))
                } else {
                    Ok(())
                }
            })
    };
    match k {
        "source.ip"
        | "remote.ip"
        | "source.namespace"
        | "source.principal"
        | "source.serviceAccount"
        | "request.auth.principal"
        | "request.auth.audiences"
        | "request.auth.presenter"
        | "destination.ip"
        | "destination.port"
        | "connection.sni" => Ok(()),
        "destination.namespace" => Err(format!(
            "{k}: replaced by the policy's metadata.namespace (as in Istio)"
        )),
        "destination.name" | "destination.user" => Err(format!(
            "{k}: deprecated attribute, only in Istio's v1alpha1 policies"
        )),
        _ if k.starts_with("destination.labels") => Err(format!(
            "{k}: replaced by the workload selector (as in Istio)"
        )),
        _ => map_key("request.headers")
            .or_else(|| map_key("request.auth.claims"))
            .or_else(|| {
                k.strip_prefix("experimental.envoy.filters.")
                    .map(|_| map_key(k.split('[').next().unwrap_or(k)).unwrap_or(Ok(())))
            })
            .unwrap_or_else(|| Err(format!("unknown condition key {k:?}"))),
    }
}

/// A workload selector as Istio accepts it: no empty keys, no wildcards.
fn check_selector(s: &super::policy::WorkloadSelector) -> Result<(), String> {
    for (k, v) in &s.match_labels {
        if k.is_empty() {
            return Err(format!("empty label key (\"={v}\")"));
        }
        if k.contains('*') || v.contains('*') {
            return Err(format!("{k}={v}: wildcards are not supported in selectors"));
        }
    }
    Ok(())
}

/// Parse an Istio IP block: a single address or a CIDR. As in Istio, host
/// bits are allowed and only the prefix counts (`10.0.1.7/24` is
/// `10.0.1.0/24`).
pub fn parse_ip_block(s: &str) -> Result<IpNet, String> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    let net: IpNet = s
        .parse()
        .map_err(|_| format!("bad CIDR {s:?}: expected an IP address or address/prefix"))?;
    Ok(net.trunc())
}

/// Parse a port given as a string (Istio writes ports as strings).
pub fn parse_port(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("bad port {s:?}: expected a number from 1 to 65535")),
        Ok(p) => Ok(p),
    }
}

fn check_unicast(ip: IpAddr) -> Result<(), String> {
    if ip.is_unspecified() || ip.is_multicast() || ip == IpAddr::from([255, 255, 255, 255]) {
        return Err(format!("{ip} is not a unicast address"));
    }
    Ok(())
}

/// Names become parts of SPIFFE IDs, metric labels and file names: keep them
/// to Kubernetes' DNS-1123 rules (`dots` allowed for subdomain-style names).
fn check_dns_label(s: &str, dots: bool) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.len() > 253 {
        return Err(format!("{s:?} is longer than 253 characters"));
    }
    let ok_char =
        |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || (dots && c == '.');
    if let Some(c) = s.chars().find(|&c| !ok_char(c)) {
        return Err(format!(
            "{s:?} contains {c:?}: use lowercase letters, digits, '-'{}",
            if dots { " and '.'" } else { "" }
        ));
    }
    if s.starts_with(['-', '.']) || s.ends_with(['-', '.']) {
        return Err(format!("{s:?} must start and end with a letter or digit"));
    }
    Ok(())
}

/// Labels of a workload merged with its namespace's: handy for selectors that
/// look at both.
pub fn merged_labels(model: &MeshModel, w: &Workload) -> BTreeMap<String, String> {
    let mut out = model
        .namespace_labels(&w.namespace)
        .cloned()
        .unwrap_or_default();
    out.extend(w.labels.clone());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Destination;

    const GOOD: &str = r#"
trustDomain: example.org
nodes:
  - name: node-a
  - name: node-b
workloads:
  - name: client
    namespace: shop
    serviceAccount: client-sa
    node: node-a
    ips: [10.0.1.1]
    labels: {app: client}
  - name: echo-1
    namespace: shop
    node: node-b
    ips: [10.0.2.1, "fd00::2:1"]
    labels: {app: echo}
  - name: echo-2
    namespace: shop
    node: node-b
    ips: [10.0.2.2]
    labels: {app: echo}
services:
  - name: echo
    namespace: shop
    vips: [10.96.0.10]
    ports: [{port: 80, targetPort: 8080}]
    selector: {app: echo}
authorizationPolicies:
  - apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: allow-client, namespace: shop}
    spec:
      selector: {matchLabels: {app: echo}}
      action: ALLOW
      rules:
        - from: [{source: {principals: ["example.org/ns/shop/sa/client-sa"], ipBlocks: ["10.0.0.0/16"]}}]
          to: [{operation: {ports: ["8080"]}}]
peerAuthentications:
  - metadata: {name: default, namespace: istio-system}
    spec: {mtls: {mode: STRICT}}
"#;

    fn err_of(yaml: &str) -> ModelError {
        MeshModel::from_yaml(yaml, "mesh.yaml").expect_err("should be rejected")
    }

    #[test]
    fn good_file_builds_indices() {
        let m = MeshModel::from_yaml(GOOD, "mesh.yaml").unwrap();
        assert_eq!(m.workloads.len(), 3);
        let client = m.workload_by_ip("10.0.1.1".parse().unwrap()).unwrap();
        assert_eq!(
            m.identity(client).to_string(),
            "spiffe://example.org/ns/shop/sa/client-sa"
        );
        let echo = m.workload_by_ip("fd00::2:1".parse().unwrap()).unwrap();
        assert_eq!(echo.name, "echo-1");
        assert_eq!(
            m.identity(echo).to_string(),
            "spiffe://example.org/ns/shop/sa/default"
        );
        match m.destination("10.96.0.10:80".parse().unwrap()) {
            Destination::Service(s, p) => {
                assert_eq!(s.name, "echo");
                assert_eq!(p.target(), 8080);
            }
            other => panic!("expected service, got {other:?}"),
        }
        assert!(matches!(
            m.destination("10.96.0.10:81".parse().unwrap()),
            Destination::External
        ));
        assert!(matches!(
            m.destination("192.0.2.1:80".parse().unwrap()),
            Destination::External
        ));
        assert_eq!(m.service_endpoints(&m.services[0]).count(), 2);
        assert_eq!(m.services_of(echo).next().unwrap().name, "echo");
        assert_eq!(
            m.authorization_policies[0]
                .spec
                .rules
                .as_ref()
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn vip_endpoints_rotate_and_map_target_port() {
        let m = MeshModel::from_yaml(GOOD, "mesh.yaml").unwrap();
        let vip = "10.96.0.10:80".parse().unwrap();
        let picks: HashSet<SocketAddr> =
            (0..4).map(|_| m.pick_endpoint(vip).unwrap().addr).collect();
        let want: HashSet<SocketAddr> = ["10.0.2.1:8080", "10.0.2.2:8080"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(picks, want);
        let direct = m.pick_endpoint("10.0.2.2:9000".parse().unwrap()).unwrap();
        assert_eq!(direct.workload.name, "echo-2");
        assert!(direct.service.is_none());
        assert!(m.pick_endpoint("192.0.2.1:80".parse().unwrap()).is_none());
    }

    /// A terminating workload is no service endpoint and no waypoint to
    /// pick, while it stays addressable (its connections are served).
    #[test]
    fn terminating_workloads_take_no_new_traffic() {
        let yaml = GOOD.replace(
            "    ips: [10.0.2.2]\n",
            "    ips: [10.0.2.2]\n    terminating: true\n",
        ) + r#"gateways:
  - metadata: {name: waypoint, namespace: shop}
    spec: {gatewayClassName: istio-waypoint}
"#;
        let yaml = yaml.replace(
            "workloads:\n",
            "workloads:\n  - {name: wp-old, namespace: shop, node: node-a, ips: [10.0.1.8], terminating: true, labels: {gateway.networking.k8s.io/gateway-name: waypoint}}\n  - {name: wp-new, namespace: shop, node: node-a, ips: [10.0.1.9], labels: {gateway.networking.k8s.io/gateway-name: waypoint}}\n",
        );
        let m = MeshModel::from_yaml(&yaml, "mesh.yaml").unwrap();
        let vip = "10.96.0.10:80".parse().unwrap();
        for _ in 0..4 {
            assert_eq!(m.pick_endpoint(vip).unwrap().workload.name, "echo-1");
        }
        assert_eq!(
            m.workload_by_ip("10.0.2.2".parse().unwrap()).unwrap().name,
            "echo-2"
        );
        let gw = &m.gateways[0];
        assert_eq!(m.waypoint_workloads(gw).count(), 2);
        for _ in 0..4 {
            assert_eq!(m.pick_waypoint_workload(gw).unwrap().name, "wp-new");
        }
    }

    #[test]
    fn syntax_error_names_file_and_line() {
        let e = err_of("workloads: [\n  {name: a");
        assert_eq!(e.source_name, "mesh.yaml");
        assert!(e.reason.contains("line"), "{e}");
    }

    #[test]
    fn bad_ip_names_the_field() {
        let e = err_of("nodes: [{name: n}]\nworkloads: [{name: a, node: n, ips: [10.0.0.300]}]");
        assert_eq!(e.field, "workloads[0].ips[0]");
        assert!(
            e.to_string()
                .starts_with("mesh.yaml: workloads[0].ips[0]: "),
            "{e}"
        );
    }

    #[test]
    fn unknown_field_is_rejected() {
        let e = err_of("nodes: [{name: n, adress: 1.2.3.4}]");
        assert_eq!(e.field, "nodes[0].adress");
        assert!(e.reason.contains("unknown field `adress`"), "{e}");
    }

    #[test]
    fn duplicate_ips_are_rejected() {
        let e = err_of(
            "nodes: [{name: n}]\nworkloads:\n - {name: a, node: n, ips: [10.0.0.1]}\n - {name: b, node: n, ips: [10.0.0.1]}",
        );
        assert_eq!(e.field, "workloads[1].ips[0]");
        assert!(
            e.reason.contains("duplicate IP 10.0.0.1") && e.reason.contains("default/a"),
            "{e}"
        );
        let e = err_of(
            "nodes: [{name: n}]\nworkloads: [{name: a, node: n, ips: [10.0.0.1], labels: {app: a}}]\nservices: [{name: s, vips: [10.0.0.1], ports: [{port: 80}], selector: {app: a}}]",
        );
        assert_eq!(e.field, "services[0].vips[0]");
    }

    #[test]
    fn bad_netns_is_rejected() {
        let e = err_of(
            "nodes: [{name: n}]\nworkloads: [{name: a, node: n, ips: [10.0.0.1], netns: \"a b\"}]",
        );
        assert_eq!(e.field, "workloads[0].netns");
        let e = err_of(
            "nodes: [{name: n}]\nworkloads: [{name: a, node: n, ips: [10.0.0.1], netns: ..}]",
        );
        assert_eq!(e.field, "workloads[0].netns");
    }

    #[test]
    fn unknown_node_is_rejected() {
        let e = err_of("nodes: [{name: n}]\nworkloads: [{name: a, node: m, ips: [10.0.0.1]}]");
        assert_eq!(e.field, "workloads[0].node");
        assert!(e.reason.contains("unknown node \"m\""), "{e}");
    }

    #[test]
    fn bad_cidr_is_rejected() {
        let yaml = r#"
authorizationPolicies:
  - metadata: {name: p}
    spec:
      rules: [{from: [{source: {ipBlocks: ["10.0.0.0/33"]}}]}]
"#;
        let e = err_of(yaml);
        assert_eq!(
            e.field,
            "authorizationPolicies[0].spec.rules[0].from[0].source.ipBlocks[0]"
        );
        assert!(e.reason.contains("bad CIDR"), "{e}");
        // Istio rule: host bits are allowed, the prefix is what counts.
        let m = MeshModel::from_yaml(&yaml.replace("10.0.0.0/33", "10.0.0.1/24"), "m").unwrap();
        assert_eq!(m.authorization_policies.len(), 1);
        assert_eq!(
            parse_ip_block("10.0.1.7/24").unwrap(),
            "10.0.1.0/24".parse::<IpNet>().unwrap()
        );
    }

    #[test]
    fn bad_policy_fields_are_rejected() {
        let e = err_of("authorizationPolicies: [{metadata: {name: p}, spec: {action: PERMIT}}]");
        assert!(
            e.field.starts_with("authorizationPolicies[0].spec.action"),
            "{e}"
        );
        let e = err_of("authorizationPolicies: [{metadata: {name: p}, spec: {rules: [{to: [{operation: {ports: [\"http\"]}}]}]}}]");
        assert_eq!(
            e.field,
            "authorizationPolicies[0].spec.rules[0].to[0].operation.ports[0]"
        );
        let e =
            err_of("authorizationPolicies: [{metadata: {name: p}, spec: {rules: [{frm: []}]}}]");
        assert!(e.reason.contains("unknown field `frm`"), "{e}");
        let e =
            err_of("peerAuthentications: [{metadata: {name: p}, spec: {mtls: {mode: STRIKT}}}]");
        assert!(
            e.field.starts_with("peerAuthentications[0].spec.mtls.mode"),
            "{e}"
        );
    }

    /// What Istio's validation refuses is refused here, naming the field
    /// (`ValidateAuthorizationPolicy`, `ValidatePeerAuthentication`,
    /// `security.ValidateAttribute`, `CheckServiceAccount`).
    #[test]
    fn policies_istio_refuses_are_refused_with_the_field() {
        let ap = |spec: &str| {
            format!("authorizationPolicies: [{{metadata: {{name: p}}, spec: {spec}}}]")
        };
        let cases: &[(&str, &str, &str)] = &[
            (
                "{rules: [{from: [{source: {}}]}]}",
                "spec.rules[0].from[0].source",
                "must not be empty",
            ),
            (
                "{rules: [{to: [{operation: {}}]}]}",
                "spec.rules[0].to[0].operation",
                "must not be empty",
            ),
            (
                "{rules: [{from: []}]}",
                "spec.rules[0].from",
                "must not be empty",
            ),
            ("{action: DENY}", "spec.rules", "without rules"),
            (
                "{rules: [{from: [{source: {principals: [\"\"]}}]}]}",
                "spec.rules[0].from[0].source.principals[0]",
                "empty value",
            ),
            (
                "{rules: [{from: [{source: {serviceAccounts: [a], namespaces: [b]}}]}]}",
                "spec.rules[0].from[0].source.serviceAccounts",
                "cannot be set with",
            ),
            (
                "{rules: [{from: [{source: {serviceAccounts: [\"ns/*\"]}}]}]}",
                "spec.rules[0].from[0].source.serviceAccounts",
                "wildcard",
            ),
            (
                "{rules: [{from: [{source: {notServiceAccounts: [a/b/c]}}]}]}",
                "spec.rules[0].from[0].source.notServiceAccounts",
                "expected",
            ),
            (
                "{rules: [{when: [{key: \"request.hedaers[x]\", values: [a]}]}]}",
                "spec.rules[0].when[0].key",
                "unknown condition key",
            ),
            (
                "{rules: [{when: [{key: \"request.headers[]\", values: [a]}]}]}",
                "spec.rules[0].when[0].key",
                "expected request.headers[name]",
            ),
            (
                "{rules: [{when: [{key: \"destination.labels[app]\", values: [a]}]}]}",
                "spec.rules[0].when[0].key",
                "workload selector",
            ),
            (
                "{rules: [{when: [{key: remote.ip, notValues: [nope]}]}]}",
                "spec.rules[0].when[0].notValues[0]",
                "bad CIDR",
            ),
            (
                "{selector: {matchLabels: {app: \"web*\"}}}",
                "spec.selector.matchLabels",
                "wildcard",
            ),
        ];
        for (spec, field, reason) in cases {
            let e = err_of(&ap(spec));
            assert_eq!(
                e.field,
                format!("authorizationPolicies[0].{field}"),
                "{spec}: {e}"
            );
            assert!(e.reason.contains(reason), "{spec}: {e}");
        }
        let e = err_of(
            "peerAuthentications: [{metadata: {name: p}, spec: {selector: {}, portLevelMtls: {\"80\": {mode: DISABLE}}}}]",
        );
        assert_eq!(e.field, "peerAuthentications[0].spec.portLevelMtls");
        // And what Istio accepts is accepted.
        for spec in [
            "{rules: [{from: [{source: {serviceAccounts: [sleep, bar/sleep]}}]}]}",
            "{rules: [{when: [{key: source.serviceAccount, values: [bar/sleep]}, {key: \"request.auth.claims[iss]\", values: [x]}, {key: connection.sni, values: [a.example]}]}]}",
            "{action: DENY, rules: [{}]}",
        ] {
            MeshModel::from_yaml(&ap(spec), "m").unwrap_or_else(|e| panic!("{spec}: {e}"));
        }
    }

    #[test]
    fn bad_names_are_rejected() {
        let e = err_of(
            "nodes: [{name: n}]\nworkloads: [{name: a, namespace: Shop, node: n, ips: [10.0.0.1]}]",
        );
        assert_eq!(e.field, "workloads[0].namespace");
        let e = err_of("trustDomain: 'a/b'");
        assert_eq!(e.field, "trustDomain");
    }

    #[test]
    fn enrollment_follows_istio_labels() {
        let m = MeshModel::from_yaml(
            r#"
nodes: [{name: n}]
namespaces:
  - {name: in, labels: {istio.io/dataplane-mode: ambient}}
  - {name: out}
workloads:
  - {name: a, namespace: in, node: n, ips: [10.0.0.1]}
  - {name: b, namespace: in, node: n, ips: [10.0.0.2], labels: {istio.io/dataplane-mode: none}}
  - {name: c, namespace: out, node: n, ips: [10.0.0.3]}
  - {name: d, namespace: unlisted, node: n, ips: [10.0.0.4]}
"#,
            "m",
        )
        .unwrap();
        let enrolled: Vec<_> = m
            .workloads
            .iter()
            .filter(|w| m.is_enrolled(w))
            .map(|w| w.name.as_str())
            .collect();
        assert_eq!(enrolled, ["a", "d"]);
    }

    /// GOOD plus L7 objects; `route` is appended inside `httpRoutes`.
    fn with_route(rule: &str) -> String {
        format!(
            "{GOOD}gateways:\n  - metadata: {{name: waypoint, namespace: shop}}\n    spec: {{gatewayClassName: istio-waypoint}}\nhttpRoutes:\n  - metadata: {{name: r, namespace: shop}}\n    spec:\n      parentRefs: [{{name: echo}}]\n      rules: [{rule}]\n"
        )
    }

    #[test]
    fn l7_objects_are_validated_with_field_paths() {
        assert!(
            MeshModel::from_yaml(&with_route("{backendRefs: [{name: echo, port: 80}]}"), "m")
                .is_ok()
        );
        // Gateway API: a backend that cannot be used does not make the route
        // invalid; its share of requests gets a 500 and the route's status
        // (and analyze) say why.
        for (rule, reason) in [
            ("{backendRefs: [{name: nope, port: 80}]}", "BackendNotFound"),
            ("{backendRefs: [{name: echo, port: 81}]}", "BackendNotFound"),
            (
                "{backendRefs: [{name: echo, kind: Pod, port: 80}]}",
                "InvalidKind",
            ),
        ] {
            let m = MeshModel::from_yaml(&with_route(rule), "m").unwrap();
            let st = super::super::route_status::conditions(&m, &m.http_routes[0]);
            assert_eq!(st[0].conditions[1].reason, reason, "{rule}");
        }
        let cases = [
            (
                "{matches: [{path: {type: RegularExpression, value: \"([\"}}]}",
                "spec.rules[0].matches[0].path.value",
                "regular expression",
            ),
            (
                "{timeouts: {request: soon}}",
                "spec.rules[0].timeouts.request",
                "not a duration",
            ),
            (
                "{retry: {retryOn: [sometimes]}}",
                "spec.rules[0].retry.retryOn[0]",
                "unknown condition",
            ),
            (
                "{fault: {abort: {httpStatus: 503, percentage: 150}}}",
                "spec.rules[0].fault.abort.percentage",
                "percentage",
            ),
            (
                "{filters: [{type: RequestRedirect, requestRedirect: {statusCode: 304}}]}",
                "spec.rules[0].filters[0].requestRedirect.statusCode",
                "301, 302, 303, 307 or 308",
            ),
            (
                "{filters: [{type: URLRewrite}]}",
                "spec.rules[0].filters[0].type",
                "exactly its own field",
            ),
            (
                "{rateLimit: {requests: 0}}",
                "spec.rules[0].rateLimit.requests",
                "at least 1",
            ),
        ];
        for (rule, field, reason) in cases {
            let e = err_of(&with_route(rule));
            assert_eq!(e.field, format!("httpRoutes[0].{field}"), "{rule}: {e}");
            assert!(e.reason.contains(reason), "{rule}: {e}");
        }
        let e = err_of(&format!(
            "{GOOD}gateways:\n  - metadata: {{name: gw, namespace: shop}}\n    spec: {{gatewayClassName: nginx}}\n"
        ));
        assert_eq!(e.field, "gateways[0].spec.gatewayClassName");
        let e = err_of(&format!(
            "{GOOD}destinationRules:\n  - metadata: {{name: d, namespace: shop}}\n    spec: {{host: nope}}\n"
        ));
        assert_eq!(e.field, "destinationRules[0].spec.host");
        let custom = GOOD.replace(
            "peerAuthentications:",
            "  - metadata: {name: c, namespace: shop}\n    spec: {action: CUSTOM, provider: {name: opa}, rules: [{}]}\npeerAuthentications:",
        );
        let e = err_of(&custom);
        assert_eq!(e.field, "authorizationPolicies[1].spec.provider.name");
        assert!(e.reason.contains("unknown extension provider"), "{e}");
        let with_provider = custom.replace(
            "peerAuthentications:",
            "extensionProviders:\n  - {name: opa, envoyExtAuthzGrpc: {service: echo.shop, port: 81}}\npeerAuthentications:",
        );
        let e = err_of(&with_provider);
        assert_eq!(e.field, "extensionProviders[0].envoyExtAuthzGrpc.port");
        assert!(MeshModel::from_yaml(&with_provider.replace("port: 81", "port: 80"), "m").is_ok());
    }

    #[test]
    fn waypoint_use_follows_istio_labels() {
        let yaml = GOOD.replace(
            "services:",
            "namespaces:\n  - {name: shop, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}\nservices:",
        );
        let base = format!(
            "{yaml}gateways:\n  - metadata: {{name: waypoint, namespace: shop}}\n    spec: {{gatewayClassName: istio-waypoint}}\n"
        );
        let m = MeshModel::from_yaml(&base, "m").unwrap();
        let echo = m.service("shop", "echo").unwrap();
        assert_eq!(
            m.service_waypoint(echo)
                .flatten()
                .map(|g| g.metadata.name.as_str()),
            Some("waypoint")
        );
        // Service traffic only by default: pods addressed directly do not.
        assert!(m.workload_waypoint(&m.workloads[1]).is_none());
        // A service opts out with `none`; a missing waypoint is reported.
        let opt_out = base.replace(
            "selector: {app: echo}",
            "selector: {app: echo}\n    labels: {istio.io/use-waypoint: none}",
        );
        let m = MeshModel::from_yaml(&opt_out, "m").unwrap();
        assert!(m
            .service_waypoint(m.service("shop", "echo").unwrap())
            .is_none());
        let missing = base.replace(
            "istio.io/use-waypoint: waypoint",
            "istio.io/use-waypoint: ghost",
        );
        let m = MeshModel::from_yaml(&missing, "m").unwrap();
        assert!(matches!(
            m.service_waypoint(m.service("shop", "echo").unwrap()),
            Some(None)
        ));
    }
}
