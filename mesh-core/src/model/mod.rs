//! The mesh model: nodes, workloads, services and policies as plain data, plus
//! the indices the data path needs (workload by IP, service by VIP:port).
//!
//! The same model is fed by the local mesh file (see [`file`]) and, later, by
//! the Kubernetes API. A model is immutable once built; updates replace the
//! whole model, so a reader never sees half an update.

pub mod file;
pub mod gateway;
pub mod policy;
pub mod route_status;
pub mod watch;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};

use serde::{Deserialize, Serialize};

use crate::identity::SpiffeId;
pub use file::{FieldError, ModelError};
pub use gateway::{DestinationRule, Gateway, HttpRoute, ReferenceGrant};
pub use policy::{AuthorizationPolicy, PeerAuthentication};

/// Istio's label for enrollment: `ambient` enrolls a namespace, `none` opts
/// a pod out.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// Istio's label naming the waypoint a namespace or service uses.
pub const USE_WAYPOINT_LABEL: &str = "istio.io/use-waypoint";
/// Istio's label naming the namespace of that waypoint (default: the same).
pub const USE_WAYPOINT_NAMESPACE_LABEL: &str = "istio.io/use-waypoint-namespace";

/// A machine running one node agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Node {
    pub name: String,
    /// Addresses of the node itself (informational; HBONE goes to pod IPs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
}

/// A namespace and its labels (enrollment and waypoint use are namespace
/// labels in Istio).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Namespace {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// A pod (or VM): the unit that has an identity and addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Workload {
    pub name: String,
    #[serde(default = "policy::default_namespace")]
    pub namespace: String,
    #[serde(default = "default_service_account")]
    pub service_account: String,
    pub node: String,
    pub ips: Vec<IpAddr>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The pod's network namespace (a name under `/var/run/netns` or a
    /// path), for agents that capture with eBPF. Without it the agent serves
    /// the workload from its own namespace, on the workload's IPs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    /// Shutting down (a pod with a deletion timestamp): it is no longer an
    /// endpoint of its services nor a waypoint to pick, but stays enrolled
    /// — its own connections are captured until it is gone — and its
    /// established connections are served.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub terminating: bool,
}

fn default_service_account() -> String {
    "default".to_string()
}

impl Workload {
    /// The address to reach it at for a destination like `like`: one of
    /// the same family, else its first (a dual-stack pod answers on both;
    /// a single-stack one only on its own).
    pub fn ip_like(&self, like: IpAddr) -> Option<IpAddr> {
        self.ips
            .iter()
            .find(|ip| ip.is_ipv4() == like.is_ipv4())
            .or_else(|| self.ips.first())
            .copied()
    }

    /// The Istio "workload name": the `app.kubernetes.io/name` / `app`
    /// label when present, otherwise the pod name.
    pub fn canonical_name(&self) -> &str {
        self.labels
            .get("service.istio.io/canonical-name")
            .or_else(|| self.labels.get("app.kubernetes.io/name"))
            .or_else(|| self.labels.get("app"))
            .map(String::as_str)
            .unwrap_or(&self.name)
    }
}

/// One port of a service: what clients dial and where it lands on the pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServicePort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub port: u16,
    /// Defaults to `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u16>,
    #[serde(default = "default_protocol")]
    pub protocol: String,
}

fn default_protocol() -> String {
    "TCP".to_string()
}

impl ServicePort {
    pub fn target(&self) -> u16 {
        self.target_port.unwrap_or(self.port)
    }
}

/// A Kubernetes-style service: virtual IPs in front of the workloads its
/// selector picks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Service {
    pub name: String,
    #[serde(default = "policy::default_namespace")]
    pub namespace: String,
    #[serde(default)]
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    pub selector: BTreeMap<String, String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// Index of a workload inside [`MeshModel::workloads`].
pub type WorkloadIdx = usize;

/// The validated mesh. Build it with [`MeshModel::from_yaml`] /
/// [`MeshModel::load`]; the indices are derived and always consistent with
/// the data.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshModel {
    pub trust_domain: String,
    pub root_namespace: String,
    pub nodes: Vec<Node>,
    pub namespaces: Vec<Namespace>,
    pub workloads: Vec<Workload>,
    pub services: Vec<Service>,
    pub authorization_policies: Vec<AuthorizationPolicy>,
    pub peer_authentications: Vec<PeerAuthentication>,
    pub gateways: Vec<Gateway>,
    pub http_routes: Vec<HttpRoute>,
    pub destination_rules: Vec<DestinationRule>,
    pub reference_grants: Vec<ReferenceGrant>,
    pub extension_providers: Vec<gateway::ExtensionProviderConfig>,
    /// Where the model came from (file path or "inline").
    pub source: String,
    #[serde(skip)]
    by_ip: HashMap<IpAddr, WorkloadIdx>,
    #[serde(skip)]
    by_vip: HashMap<SocketAddr, (usize, usize)>,
    /// Endpoints (workload indices) of each service, in model order.
    #[serde(skip)]
    endpoints: Vec<Vec<WorkloadIdx>>,
    /// Round-robin cursor per service.
    #[serde(skip)]
    cursors: Vec<AtomicUsize>,
    /// Round-robin cursor over waypoint pods.
    #[serde(skip)]
    waypoint_cursor: AtomicUsize,
}

/// Where a destination address lands in the mesh.
#[derive(Debug, Clone, Copy)]
pub enum Destination<'a> {
    /// A workload's own address.
    Workload(&'a Workload),
    /// A service VIP and port.
    Service(&'a Service, &'a ServicePort),
    /// Not part of the mesh.
    External,
}

/// A concrete workload endpoint picked for a connection.
#[derive(Debug, Clone)]
pub struct Endpoint<'a> {
    pub workload: &'a Workload,
    /// The address on the workload to reach (pod IP and target port).
    pub addr: SocketAddr,
    /// The service that was dialled, when the client used a VIP.
    pub service: Option<&'a Service>,
}

impl MeshModel {
    /// The SPIFFE identity of a workload.
    pub fn identity(&self, w: &Workload) -> SpiffeId {
        SpiffeId::new(&self.trust_domain, &w.namespace, &w.service_account)
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Workload> {
        self.by_ip.get(&ip).map(|&i| &self.workloads[i])
    }

    pub fn workloads_on_node<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Workload> {
        self.workloads.iter().filter(move |w| w.node == node)
    }

    pub fn namespace_labels(&self, ns: &str) -> Option<&BTreeMap<String, String>> {
        self.namespaces
            .iter()
            .find(|n| n.name == ns)
            .map(|n| &n.labels)
    }

    /// Whether the workload's traffic is captured by the mesh. Istio's rules:
    /// a pod label `istio.io/dataplane-mode=none` opts out; otherwise a
    /// namespace listed in the mesh file decides by its label. Workloads of
    /// namespaces the file does not list are in the mesh (the file describes
    /// the mesh).
    pub fn is_enrolled(&self, w: &Workload) -> bool {
        if let Some(mode) = w.labels.get(DATAPLANE_MODE_LABEL) {
            return mode != "none";
        }
        match self.namespace_labels(&w.namespace) {
            Some(labels) => labels.get(DATAPLANE_MODE_LABEL).map(String::as_str) == Some("ambient"),
            None => true,
        }
    }

    /// Classify a destination address.
    pub fn destination(&self, addr: SocketAddr) -> Destination<'_> {
        if let Some(&(s, p)) = self.by_vip.get(&addr) {
            let svc = &self.services[s];
            return Destination::Service(svc, &svc.ports[p]);
        }
        match self.workload_by_ip(addr.ip()) {
            Some(w) => Destination::Workload(w),
            None => Destination::External,
        }
    }

    /// Workloads behind a service.
    pub fn service_endpoints(&self, svc: &Service) -> impl Iterator<Item = &Workload> {
        let idx = self.service_index(svc);
        idx.into_iter()
            .flat_map(move |i| self.endpoints[i].iter().map(|&w| &self.workloads[w]))
    }

    /// Services that select a workload (for telemetry's `destination_service`).
    pub fn services_of<'a>(&'a self, w: &'a Workload) -> impl Iterator<Item = &'a Service> {
        self.services.iter().enumerate().filter_map(move |(i, s)| {
            self.endpoints[i]
                .iter()
                .any(|&e| std::ptr::eq(&self.workloads[e], w))
                .then_some(s)
        })
    }

    fn service_index(&self, svc: &Service) -> Option<usize> {
        self.services.iter().position(|s| std::ptr::eq(s, svc))
    }

    /// Resolve a destination to the workload endpoint to connect to. For a
    /// service VIP, endpoints are chosen round-robin, preferring the same
    /// address family as the VIP. Returns `None` for external destinations
    /// and for services without endpoints.
    pub fn pick_endpoint(&self, addr: SocketAddr) -> Option<Endpoint<'_>> {
        match self.destination(addr) {
            Destination::External => None,
            Destination::Workload(w) => Some(Endpoint {
                workload: w,
                addr,
                service: None,
            }),
            Destination::Service(svc, port) => {
                let i = self.service_index(svc)?;
                let eps = &self.endpoints[i];
                if eps.is_empty() {
                    return None;
                }
                let start = self.cursors[i].fetch_add(1, Ordering::Relaxed);
                (0..eps.len()).find_map(|k| {
                    let w = &self.workloads[eps[(start + k) % eps.len()]];
                    Some(Endpoint {
                        workload: w,
                        addr: SocketAddr::new(w.ip_like(addr.ip())?, port.target()),
                        service: Some(svc),
                    })
                })
            }
        }
    }

    /// The service's cluster-local host name, as Istio reports it.
    pub fn service_hostname(&self, svc: &Service) -> String {
        format!("{}.{}.svc.cluster.local", svc.name, svc.namespace)
    }

    /// Find a service by namespace and name.
    pub fn service(&self, namespace: &str, name: &str) -> Option<&Service> {
        self.services
            .iter()
            .find(|s| s.namespace == namespace && s.name == name)
    }

    /// The waypoint Gateway named by `labels` (`istio.io/use-waypoint`,
    /// optionally `istio.io/use-waypoint-namespace`), looked up from
    /// `namespace`. `Some(None)` means the label names a waypoint that does
    /// not exist; `None` means no waypoint is asked for (absent or `none`).
    fn waypoint_named<'a>(
        &'a self,
        labels: &BTreeMap<String, String>,
        namespace: &str,
    ) -> Option<Option<&'a Gateway>> {
        let name = labels.get(USE_WAYPOINT_LABEL)?;
        if name == "none" || name.is_empty() {
            return None;
        }
        let ns = labels
            .get(USE_WAYPOINT_NAMESPACE_LABEL)
            .map(String::as_str)
            .unwrap_or(namespace);
        Some(
            self.gateways.iter().find(|g| {
                g.is_waypoint() && &g.metadata.name == name && g.metadata.namespace == ns
            }),
        )
    }

    /// The waypoint that service traffic to `svc` goes through: the
    /// service's label wins (`none` opts it out), then its namespace's.
    /// `Some(None)`: a waypoint is asked for but missing (callers refuse the
    /// traffic rather than skip the L7 policy it may carry).
    pub fn service_waypoint(&self, svc: &Service) -> Option<Option<&Gateway>> {
        let waypoint = if svc.labels.contains_key(USE_WAYPOINT_LABEL) {
            self.waypoint_named(&svc.labels, &svc.namespace)
        } else {
            self.waypoint_named(self.namespace_labels(&svc.namespace)?, &svc.namespace)
        };
        waypoint.filter(|g| {
            g.is_none_or(|g| {
                matches!(
                    g.waypoint_for(),
                    gateway::WaypointFor::Service | gateway::WaypointFor::All
                )
            })
        })
    }

    /// The waypoint that traffic addressed to the workload itself goes
    /// through (only waypoints for `workload` or `all` traffic).
    pub fn workload_waypoint(&self, w: &Workload) -> Option<Option<&Gateway>> {
        let waypoint = if w.labels.contains_key(USE_WAYPOINT_LABEL) {
            self.waypoint_named(&w.labels, &w.namespace)
        } else {
            self.waypoint_named(self.namespace_labels(&w.namespace)?, &w.namespace)
        };
        waypoint.filter(|g| {
            g.is_none_or(|g| {
                matches!(
                    g.waypoint_for(),
                    gateway::WaypointFor::Workload | gateway::WaypointFor::All
                )
            })
        })
    }

    /// The pods running a waypoint.
    pub fn waypoint_workloads<'a>(&'a self, g: &'a Gateway) -> impl Iterator<Item = &'a Workload> {
        self.workloads.iter().filter(move |w| {
            w.namespace == g.metadata.namespace
                && w.labels.get(gateway::GATEWAY_NAME_LABEL) == Some(&g.metadata.name)
        })
    }

    /// A pod of the waypoint to send to (round robin by a shared cursor).
    pub fn pick_waypoint_workload<'a>(&'a self, g: &'a Gateway) -> Option<&'a Workload> {
        let pods: Vec<&Workload> = self
            .waypoint_workloads(g)
            .filter(|w| !w.terminating)
            .collect();
        if pods.is_empty() {
            return None;
        }
        let n = self.waypoint_cursor.fetch_add(1, Ordering::Relaxed);
        Some(pods[n % pods.len()])
    }

    /// Whether `id` is the identity of one of the waypoint's pods.
    pub fn is_waypoint_identity(&self, g: &Gateway, id: &SpiffeId) -> bool {
        self.waypoint_workloads(g).any(|w| &self.identity(w) == id)
    }

    /// The HTTPRoutes that apply to a request from a client in
    /// `caller_ns` to a service port, as GAMMA defines them: the caller's
    /// own routes for the service (consumer routes) when the caller is in
    /// another namespace and has any, otherwise the routes in the service's
    /// namespace (producer routes). A route in a third namespace never
    /// applies. Ordered for tie-breaks: the oldest first
    /// (`creationTimestamp`), then by `namespace/name` — never by the order
    /// in which objects were listed. Also the namespace the routes are from.
    pub fn routes_for_caller<'a>(
        &'a self,
        svc: &'a Service,
        port: u16,
        caller_ns: &str,
    ) -> (&'a str, Vec<&'a HttpRoute>) {
        let of = |ns: &str| -> Vec<&'a HttpRoute> {
            let mut v: Vec<&HttpRoute> = self
                .routes_for(svc, port)
                .filter(|r| r.metadata.namespace == ns)
                .collect();
            v.sort_by(|a, b| {
                (
                    a.metadata.creation_timestamp.as_deref(),
                    &a.metadata.namespace,
                    &a.metadata.name,
                )
                    .cmp(&(
                        b.metadata.creation_timestamp.as_deref(),
                        &b.metadata.namespace,
                        &b.metadata.name,
                    ))
            });
            v
        };
        if caller_ns != svc.namespace {
            let consumer = of(caller_ns);
            if !consumer.is_empty() {
                let ns = consumer[0].metadata.namespace.as_str();
                return (ns, consumer);
            }
        }
        (svc.namespace.as_str(), of(&svc.namespace))
    }

    /// Why a route in `route_ns` cannot send to backend `b` (port `port`
    /// when the reference names none; no port check without either), if it
    /// cannot. A route may always send to the Service it is attached to
    /// (`parent`), in any namespace: a consumer route refines its own use of
    /// that Service.
    pub fn backend_problem(
        &self,
        route_ns: &str,
        parent: Option<&Service>,
        b: &gateway::BackendObjectReference,
        port: Option<u16>,
    ) -> Option<gateway::BackendProblem> {
        use gateway::BackendProblem as P;
        let group = b.group.as_deref().unwrap_or("");
        let kind = b.kind.as_deref().unwrap_or("Service");
        if !(group.is_empty() || group == "core") || kind != "Service" {
            return Some(P::InvalidKind(format!(
                "backend {}/{kind} {:?} is not a Service",
                if group.is_empty() { "core" } else { group },
                b.name
            )));
        }
        let ns = b.namespace.as_deref().unwrap_or(route_ns);
        let Some(svc) = self.service(ns, &b.name) else {
            return Some(P::NotFound(format!("no service {ns}/{}", b.name)));
        };
        if let Some(port) = b.port.or(port) {
            if !svc.ports.iter().any(|p| p.port == port) {
                return Some(P::NotFound(format!(
                    "service {ns}/{} has no port {port}",
                    b.name
                )));
            }
        }
        let is_parent = parent.is_some_and(|p| p.namespace == svc.namespace && p.name == svc.name);
        if ns != route_ns
            && !is_parent
            && !self.reference_grants.iter().any(|g| {
                g.metadata.namespace == ns && g.permits_route_to_service(route_ns, &b.name)
            })
        {
            return Some(P::NotPermitted(format!(
                "service {ns}/{} is in another namespace and no ReferenceGrant there allows routes from {route_ns}",
                b.name
            )));
        }
        None
    }

    /// The HTTPRoutes attached to a service port.
    pub fn routes_for<'a>(
        &'a self,
        svc: &'a Service,
        port: u16,
    ) -> impl Iterator<Item = &'a HttpRoute> {
        self.http_routes.iter().filter(move |r| {
            r.spec.parent_refs.iter().any(|p| {
                p.is_service()
                    && p.name == svc.name
                    && p.namespace.as_deref().unwrap_or(&r.metadata.namespace) == svc.namespace
                    && p.port.is_none_or(|pp| pp == port)
            })
        })
    }

    /// The DestinationRule for a service (the first one, in file order).
    pub fn destination_rule(&self, svc: &Service) -> Option<&DestinationRule> {
        self.destination_rules.iter().find(|d| {
            let (name, ns) = split_host(&d.spec.host, &d.metadata.namespace);
            name == svc.name && ns == svc.namespace
        })
    }
}

/// Split a service host as DestinationRules write it (`name`,
/// `name.namespace`, `name.namespace.svc[.cluster.local]`) into name and
/// namespace; a bare name is in `default_ns`.
pub fn split_host<'a>(host: &'a str, default_ns: &'a str) -> (&'a str, &'a str) {
    let mut parts = host.split('.');
    let name = parts.next().unwrap_or(host);
    (name, parts.next().unwrap_or(default_ns))
}
