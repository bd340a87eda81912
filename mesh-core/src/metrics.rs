//! Istio-compatible TCP telemetry: the metric names and label sets Istio's
//! ztunnel exports (`istio_tcp_connections_opened_total`, …), so existing
//! Grafana dashboards and Kiali graphs work unchanged. The waypoint adds
//! Istio's HTTP request metrics (`istio_requests_total`,
//! `istio_request_duration_milliseconds`, `istio_request_bytes`,
//! `istio_response_bytes`) over the same labels plus the response codes.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::identity::SpiffeId;
use crate::model::{MeshModel, Service, Workload};

/// Which side reported a connection (Istio's `reporter` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reporter {
    Source,
    Destination,
    /// A waypoint between the two (Istio ambient reports `waypoint`).
    Waypoint,
}

/// Istio's TCP label set.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_cluster: String,
    pub destination_service: String,
    pub destination_service_namespace: String,
    pub destination_service_name: String,
    pub destination_workload: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_cluster: String,
    pub request_protocol: &'static str,
    pub response_flags: &'static str,
    pub connection_security_policy: &'static str,
}

const UNKNOWN: &str = "unknown";

/// One side of a connection as far as telemetry knows it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Peer<'a> {
    pub workload: Option<&'a Workload>,
    pub identity: Option<&'a SpiffeId>,
}

impl TcpLabels {
    /// Labels for a connection from `src` to `dst`, optionally via `service`.
    pub fn new(
        model: &MeshModel,
        reporter: Reporter,
        src: Peer<'_>,
        dst: Peer<'_>,
        service: Option<&Service>,
        mtls: bool,
    ) -> TcpLabels {
        let s = WorkloadLabels::of(src);
        let d = WorkloadLabels::of(dst);
        let (svc_host, svc_ns, svc_name) = match service {
            Some(svc) => (
                model.service_hostname(svc),
                svc.namespace.clone(),
                svc.name.clone(),
            ),
            None => match dst.workload.and_then(|w| model.services_of(w).next()) {
                Some(svc) => (
                    model.service_hostname(svc),
                    svc.namespace.clone(),
                    svc.name.clone(),
                ),
                None => (UNKNOWN.into(), UNKNOWN.into(), UNKNOWN.into()),
            },
        };
        TcpLabels {
            reporter: match reporter {
                Reporter::Source => "source",
                Reporter::Destination => "destination",
                Reporter::Waypoint => "waypoint",
            },
            source_workload: s.workload,
            source_canonical_service: s.canonical_service,
            source_canonical_revision: s.canonical_revision,
            source_workload_namespace: s.namespace,
            source_principal: s.principal,
            source_app: s.app,
            source_version: s.version,
            source_cluster: "Kubernetes".into(),
            destination_service: svc_host,
            destination_service_namespace: svc_ns,
            destination_service_name: svc_name,
            destination_workload: d.workload,
            destination_canonical_service: d.canonical_service,
            destination_canonical_revision: d.canonical_revision,
            destination_workload_namespace: d.namespace,
            destination_principal: d.principal,
            destination_app: d.app,
            destination_version: d.version,
            destination_cluster: "Kubernetes".into(),
            request_protocol: "tcp",
            response_flags: "-",
            connection_security_policy: if mtls { "mutual_tls" } else { "unknown" },
        }
    }
}

struct WorkloadLabels {
    workload: String,
    canonical_service: String,
    canonical_revision: String,
    namespace: String,
    principal: String,
    app: String,
    version: String,
}

impl WorkloadLabels {
    fn of(p: Peer<'_>) -> Self {
        let label = |w: &Workload, k: &str| w.labels.get(k).cloned();
        let principal = p
            .identity
            .map(|i| i.to_string())
            .unwrap_or_else(|| UNKNOWN.into());
        match p.workload {
            Some(w) => WorkloadLabels {
                workload: w.name.clone(),
                canonical_service: w.canonical_name().to_string(),
                canonical_revision: label(w, "service.istio.io/canonical-revision")
                    .or_else(|| label(w, "app.kubernetes.io/version"))
                    .or_else(|| label(w, "version"))
                    .unwrap_or_else(|| "latest".into()),
                namespace: w.namespace.clone(),
                principal,
                app: label(w, "app").unwrap_or_else(|| UNKNOWN.into()),
                version: label(w, "version").unwrap_or_else(|| UNKNOWN.into()),
            },
            None => WorkloadLabels {
                workload: UNKNOWN.into(),
                canonical_service: UNKNOWN.into(),
                canonical_revision: UNKNOWN.into(),
                namespace: p
                    .identity
                    .map(|i| i.namespace().to_string())
                    .unwrap_or_else(|| UNKNOWN.into()),
                principal,
                app: UNKNOWN.into(),
                version: UNKNOWN.into(),
            },
        }
    }
}

/// The four TCP metrics Istio defines.
#[derive(Clone, Default)]
pub struct TcpMetrics {
    pub opened: Family<TcpLabels, Counter>,
    pub closed: Family<TcpLabels, Counter>,
    pub sent_bytes: Family<TcpLabels, Counter>,
    pub received_bytes: Family<TcpLabels, Counter>,
}

impl TcpMetrics {
    /// Create the metrics and register them under Istio's names.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "istio_tcp_connections_opened",
            "Total number of TCP connections opened",
            m.opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "Total number of TCP connections closed",
            m.closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent during a response on a TCP connection",
            m.sent_bytes.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received during a request on a TCP connection",
            m.received_bytes.clone(),
        );
        m
    }
}

/// Istio's HTTP label set: the TCP one plus the outcome.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    #[prometheus(flatten)]
    pub peers: TcpLabels,
    pub response_code: u16,
    /// The gRPC status for gRPC requests, otherwise empty.
    pub grpc_response_status: String,
}

/// Istio's four HTTP metrics.
#[derive(Clone)]
pub struct RequestMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub duration_ms: Family<RequestLabels, Histogram>,
    pub request_bytes: Family<RequestLabels, Histogram>,
    pub response_bytes: Family<RequestLabels, Histogram>,
}

/// Istio's default duration buckets (milliseconds).
const DURATION_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

impl RequestMetrics {
    /// Create the metrics and register them under Istio's names.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            requests: Family::default(),
            duration_ms: Family::new_with_constructor(|| {
                Histogram::new(DURATION_BUCKETS.iter().copied())
            }),
            request_bytes: Family::new_with_constructor(|| {
                Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                    1.0, 10.0, 9,
                ))
            }),
            response_bytes: Family::new_with_constructor(|| {
                Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                    1.0, 10.0, 9,
                ))
            }),
        };
        registry.register("istio_requests", "Requests processed", m.requests.clone());
        registry.register(
            "istio_request_duration_milliseconds",
            "Request duration",
            m.duration_ms.clone(),
        );
        registry.register(
            "istio_request_bytes",
            "Request body and header size",
            m.request_bytes.clone(),
        );
        registry.register(
            "istio_response_bytes",
            "Response body and header size",
            m.response_bytes.clone(),
        );
        m
    }
}

/// Label set of configuration updates (`applied`, `rejected`, `partial`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

/// Label set of dry-run outcomes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DryRunLabels {
    /// `namespace/name` of the dry-run policy.
    pub policy: String,
    /// `allow` or `deny`: what it would have decided.
    pub decision: &'static str,
}

/// Label set of rejected configuration objects.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

/// Policy and configuration health, the same in the node agent and the
/// waypoint: what dry-run policies would have decided, and how many
/// objects could not be read (alert when above 0: each one fails closed or
/// is left out).
#[derive(Clone, Default)]
pub struct PolicyMetrics {
    pub dry_run: Family<DryRunLabels, Counter>,
    pub rejected_objects: Family<KindLabels, prometheus_client::metrics::gauge::Gauge>,
    /// Kinds the gauge has a series for (set back to 0 when fixed).
    kinds: std::sync::Arc<std::sync::Mutex<std::collections::BTreeSet<&'static str>>>,
}

impl PolicyMetrics {
    /// Create the metrics and register them (`sluice_` prefix).
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("sluice");
        r.register(
            "policy_dry_run",
            "What AuthorizationPolicies annotated istio.io/dry-run would have decided, had they been enforced",
            m.dry_run.clone(),
        );
        r.register(
            "config_rejected_objects",
            "Configuration objects that could not be read, by kind (a policy among them fails closed in its scope; alert when above 0)",
            m.rejected_objects.clone(),
        );
        // The policy kinds have a series from the start, for alerts.
        m.set_rejected(std::iter::empty());
        m
    }

    /// Count what each dry-run policy would have decided for one
    /// connection or request, and log the would-be denials.
    pub fn record_dry_run(&self, outcomes: &[crate::policy::DryRun], what: &dyn std::fmt::Display) {
        for o in outcomes {
            let decision = if o.allowed { "allow" } else { "deny" };
            self.dry_run
                .get_or_create(&DryRunLabels {
                    policy: o.policy.clone(),
                    decision,
                })
                .inc();
            if o.allowed {
                tracing::debug!(policy = %o.policy, %what, "dry-run policy would allow");
            } else {
                tracing::info!(policy = %o.policy, %what, "dry-run policy would deny (not enforced)");
            }
        }
    }

    /// Set the number of rejected objects per kind to what `kinds` holds
    /// (one item per object); kinds no longer listed go back to 0.
    pub fn set_rejected(&self, kinds: impl IntoIterator<Item = &'static str>) {
        let mut counts: std::collections::BTreeMap<&'static str, i64> = Default::default();
        for k in kinds {
            *counts.entry(k).or_default() += 1;
        }
        let mut known = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        known.extend(["AuthorizationPolicy", "PeerAuthentication"]);
        known.extend(counts.keys());
        for k in known.iter() {
            self.rejected_objects
                .get_or_create(&KindLabels { kind: k })
                .set(counts.get(k).copied().unwrap_or(0));
        }
    }
}

/// Render a registry in the Prometheus text format.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_labels_are_istios() {
        let model = MeshModel::from_yaml(
            r#"
nodes: [{name: n}]
workloads:
  - {name: productpage-v1-abc, namespace: bookinfo, serviceAccount: productpage, node: n, ips: [10.0.0.1], labels: {app: productpage, version: v1}}
  - {name: reviews-v2-xyz, namespace: bookinfo, serviceAccount: reviews, node: n, ips: [10.0.0.2], labels: {app: reviews, version: v2}}
services:
  - {name: reviews, namespace: bookinfo, vips: [10.96.0.2], ports: [{port: 9080}], selector: {app: reviews}}
"#,
            "m",
        )
        .unwrap();
        let mut reg = Registry::default();
        let m = TcpMetrics::register(&mut reg);
        let (src, dst) = (&model.workloads[0], &model.workloads[1]);
        let (sid, did) = (model.identity(src), model.identity(dst));
        let labels = TcpLabels::new(
            &model,
            Reporter::Source,
            Peer {
                workload: Some(src),
                identity: Some(&sid),
            },
            Peer {
                workload: Some(dst),
                identity: Some(&did),
            },
            None,
            true,
        );
        m.opened.get_or_create(&labels).inc();
        m.sent_bytes.get_or_create(&labels).inc_by(42);
        let text = encode(&reg);
        assert!(
            text.contains("# TYPE istio_tcp_connections_opened counter"),
            "{text}"
        );
        let line = text
            .lines()
            .find(|l| l.starts_with("istio_tcp_sent_bytes_total{"))
            .unwrap();
        for want in [
            r#"reporter="source""#,
            r#"source_workload="productpage-v1-abc""#,
            r#"source_canonical_service="productpage""#,
            r#"source_principal="spiffe://cluster.local/ns/bookinfo/sa/productpage""#,
            r#"destination_service="reviews.bookinfo.svc.cluster.local""#,
            r#"destination_version="v2""#,
            r#"connection_security_policy="mutual_tls""#,
        ] {
            assert!(line.contains(want), "{want} missing in {line}");
        }
        assert!(line.ends_with(" 42"), "{line}");
    }
}
