//! Per-connection telemetry: Istio's TCP metrics, the agent's own health
//! metrics, and one structured access-log line when a connection closes.

use std::net::SocketAddr;
use std::time::Instant;

use mesh_core::hbone::Transferred;
use mesh_core::metrics::{TcpLabels, TcpMetrics};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Label set of refusals.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RefusedLabels {
    pub direction: &'static str,
    pub reason: &'static str,
}

/// Label set of per-identity certificate gauges.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct IdentityLabels {
    pub identity: String,
}

/// Label set of policy denials.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DenialLabels {
    /// `authorization` or `peer_authentication`.
    pub kind: &'static str,
    /// The deciding policy (`namespace/name`), or `-`.
    pub policy: String,
    /// `new` for refused connections, `existing` for ones closed after a
    /// policy change.
    pub connection: &'static str,
}

pub use mesh_core::metrics::ResultLabels;

/// Every metric the agent exports.
pub struct AgentMetrics {
    pub tcp: TcpMetrics,
    /// Connections the agent refused, by direction and reason.
    pub refused: Family<RefusedLabels, Counter>,
    /// Connections denied by policy.
    pub denials: Family<DenialLabels, Counter>,
    /// Mesh model updates applied or rejected.
    pub config_updates: Family<ResultLabels, Counter>,
    /// Dry-run outcomes and rejected configuration objects.
    pub policy: mesh_core::metrics::PolicyMetrics,
    /// Applicable DENY/AUDIT policies with rules that can never match at a
    /// node agent (L7-only clauses: they need a waypoint).
    pub policies_ineffective_at_l4: Gauge,
    /// Workloads of this node whose traffic is captured.
    pub enrolled_workloads: Gauge,
    /// Workloads of this node the model enrolls but the agent could not
    /// (their traffic is not captured yet; retried every second).
    pub unenrollable_workloads: Gauge,
    /// Failed enrollment attempts.
    pub enrollment_failures: Counter,
    /// Expiry time of each identity's current certificate (Unix seconds).
    pub cert_expiry: Family<IdentityLabels, Gauge>,
    pub cert_rotations: Gauge,
    pub cert_request_failures: Gauge,
    pub certs_overdue: Gauge,
    pub pool_connections: Gauge,
    pub pool_streams: Gauge,
    pub active_connections: Gauge,
    /// Entries in each eBPF map, by map name.
    pub ebpf_map_entries: Family<MapLabels, Gauge>,
    /// Recent access-log records, for `sluicectl logs`.
    pub access_log: AccessLog,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct MapLabels {
    pub map: &'static str,
}

/// The last access-log records, and a feed of new ones, so operators can
/// tail them from the admin endpoint without access to the agent's stderr.
pub struct AccessLog {
    recent: std::sync::Mutex<std::collections::VecDeque<String>>,
    feed: tokio::sync::broadcast::Sender<String>,
}

/// How many records the admin endpoint keeps.
const ACCESS_LOG_KEEP: usize = 1000;

impl Default for AccessLog {
    fn default() -> Self {
        Self {
            recent: Default::default(),
            feed: tokio::sync::broadcast::channel(1024).0,
        }
    }
}

impl AccessLog {
    /// Add a record (one JSON object, with a timestamp).
    pub fn record(&self, mut v: serde_json::Value) {
        if let Some(o) = v.as_object_mut() {
            o.insert(
                "time".into(),
                humantime::format_rfc3339_millis(std::time::SystemTime::now())
                    .to_string()
                    .into(),
            );
        }
        let line = v.to_string();
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() == ACCESS_LOG_KEEP {
            recent.pop_front();
        }
        recent.push_back(line.clone());
        let _ = self.feed.send(line);
    }

    /// The records kept, oldest first.
    pub fn recent(&self) -> Vec<String> {
        self.recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// New records from now on.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.feed.subscribe()
    }
}

impl AgentMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = AgentMetrics {
            tcp: TcpMetrics::register(registry),
            refused: Family::default(),
            denials: Family::default(),
            config_updates: Family::default(),
            policy: mesh_core::metrics::PolicyMetrics::register(registry),
            policies_ineffective_at_l4: Gauge::default(),
            enrolled_workloads: Gauge::default(),
            unenrollable_workloads: Gauge::default(),
            enrollment_failures: Counter::default(),
            cert_expiry: Family::default(),
            cert_rotations: Gauge::default(),
            cert_request_failures: Gauge::default(),
            certs_overdue: Gauge::default(),
            pool_connections: Gauge::default(),
            pool_streams: Gauge::default(),
            active_connections: Gauge::default(),
            ebpf_map_entries: Family::default(),
            access_log: AccessLog::default(),
        };
        let r = registry.sub_registry_with_prefix("sluice");
        r.register(
            "connections_refused",
            "Connections refused by the agent",
            m.refused.clone(),
        );
        r.register(
            "ebpf_map_entries",
            "Entries in the eBPF capture maps",
            m.ebpf_map_entries.clone(),
        );
        r.register(
            "policy_denials",
            "Connections denied (new) or closed (existing) by policy",
            m.denials.clone(),
        );
        r.register(
            "config_updates",
            "Mesh model updates by result (applied, rejected)",
            m.config_updates.clone(),
        );
        r.register(
            "policies_ineffective_at_l4",
            "DENY or AUDIT AuthorizationPolicies with rules that never match at a node agent because a clause holds only L7 attributes (as in Istio; enforce them with a waypoint)",
            m.policies_ineffective_at_l4.clone(),
        );
        r.register(
            "enrolled_workloads",
            "Workloads on this node whose traffic is captured",
            m.enrolled_workloads.clone(),
        );
        r.register(
            "workloads_not_enrolled",
            "Workloads of this node that should be captured but could not be enrolled (alert when above 0)",
            m.unenrollable_workloads.clone(),
        );
        r.register(
            "enrollment_failures",
            "Failed enrollment attempts (listeners, network namespace or eBPF maps)",
            m.enrollment_failures.clone(),
        );
        r.register(
            "certificate_expiry_timestamp_seconds",
            "Expiry of the current certificate of each identity",
            m.cert_expiry.clone(),
        );
        r.register(
            "certificate_rotations",
            "Certificates replaced by rotation since start",
            m.cert_rotations.clone(),
        );
        r.register(
            "certificate_request_failures",
            "Certificate requests to the CA that failed since start",
            m.cert_request_failures.clone(),
        );
        r.register(
            "certificates_overdue",
            "Identities whose certificate is past its renewal point because the CA did not renew it (alert when above 0; they work until expiry)",
            m.certs_overdue.clone(),
        );
        r.register(
            "hbone_pool_connections",
            "Open pooled HBONE connections",
            m.pool_connections.clone(),
        );
        r.register(
            "hbone_pool_streams",
            "Open streams on pooled HBONE connections",
            m.pool_streams.clone(),
        );
        r.register(
            "active_connections",
            "Proxied connections currently open",
            m.active_connections.clone(),
        );
        m
    }

    pub fn refuse(&self, direction: &'static str, reason: &'static str) {
        self.refused
            .get_or_create(&RefusedLabels { direction, reason })
            .inc();
    }
}

/// What the access log says about one connection.
pub struct ConnLog {
    pub direction: &'static str,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub src_identity: Option<String>,
    pub dst_identity: Option<String>,
    pub src_workload: Option<String>,
    pub dst_workload: Option<String>,
    pub mtls: bool,
    /// The policy outcome.
    pub policy: String,
    /// W3C trace context an HBONE client sent (`traceparent`, `baggage`),
    /// so tunnelled connections correlate with the caller's trace.
    pub traceparent: Option<String>,
    pub baggage: Option<String>,
}

/// Tracks one proxied connection from open to close.
pub struct ConnTelemetry<'a> {
    metrics: &'a AgentMetrics,
    labels: TcpLabels,
    log: ConnLog,
    start: Instant,
    pub bytes: Transferred,
}

impl<'a> ConnTelemetry<'a> {
    /// Count the connection as opened.
    pub fn open(metrics: &'a AgentMetrics, labels: TcpLabels, log: ConnLog) -> Self {
        metrics.tcp.opened.get_or_create(&labels).inc();
        metrics.active_connections.inc();
        Self {
            metrics,
            labels,
            log,
            start: Instant::now(),
            bytes: Transferred::default(),
        }
    }

    /// Count the close and write the access-log line. `error` is why the
    /// connection ended abnormally, if it did.
    pub fn close(self, error: Option<&dyn std::fmt::Display>) {
        // From the reporter's point of view: "received" is what the client
        // sent, "sent" what it got back (Istio's request/response sense).
        let (client_sent, client_got) = match self.labels.reporter {
            "source" => (self.bytes.sent(), self.bytes.received()),
            _ => (self.bytes.received(), self.bytes.sent()),
        };
        let m = &self.metrics.tcp;
        m.closed.get_or_create(&self.labels).inc();
        m.received_bytes
            .get_or_create(&self.labels)
            .inc_by(client_sent);
        m.sent_bytes.get_or_create(&self.labels).inc_by(client_got);
        self.metrics.active_connections.dec();
        let l = &self.log;
        tracing::info!(
            target: "access",
            direction = l.direction,
            src.addr = %l.src,
            dst.addr = %l.dst,
            src.identity = l.src_identity.as_deref().unwrap_or("-"),
            dst.identity = l.dst_identity.as_deref().unwrap_or("-"),
            src.workload = l.src_workload.as_deref().unwrap_or("-"),
            dst.workload = l.dst_workload.as_deref().unwrap_or("-"),
            mtls = l.mtls,
            bytes_sent = client_sent,
            bytes_recv = client_got,
            duration_ms = self.start.elapsed().as_millis() as u64,
            policy = %l.policy,
            traceparent = l.traceparent.as_deref().unwrap_or("-"),
            error = error.map(|e| e.to_string()).as_deref().unwrap_or("-"),
            "connection complete"
        );
        self.metrics.access_log.record(serde_json::json!({
            "direction": l.direction,
            "src.addr": l.src.to_string(),
            "dst.addr": l.dst.to_string(),
            "src.identity": l.src_identity,
            "dst.identity": l.dst_identity,
            "src.workload": l.src_workload,
            "dst.workload": l.dst_workload,
            "mtls": l.mtls,
            "bytes_sent": client_sent,
            "bytes_recv": client_got,
            "duration_ms": self.start.elapsed().as_millis() as u64,
            "outcome": if error.is_some() { "error" } else { "complete" },
            "policy": l.policy,
            "traceparent": l.traceparent,
            "baggage": l.baggage,
            "error": error.map(|e| e.to_string()),
        }));
    }
}

/// Refresh the gauges that are read from live state at scrape time.
pub fn refresh_gauges(ctx: &crate::Ctx) {
    let m = &ctx.metrics;
    let pool = ctx.connector.stats();
    m.pool_connections.set(pool.connections as i64);
    m.pool_streams.set(pool.active_streams as i64);
    m.cert_rotations.set(ctx.certs.rotations() as i64);
    m.cert_request_failures
        .set(ctx.certs.request_failures() as i64);
    m.certs_overdue.set(ctx.certs.overdue() as i64);
    if let Some(c) = &ctx.capture {
        for (map, n) in c.map_fill() {
            m.ebpf_map_entries
                .get_or_create(&MapLabels { map })
                .set(n as i64);
        }
    }
    m.cert_expiry.clear();
    for c in ctx.certs.summaries() {
        m.cert_expiry
            .get_or_create(&IdentityLabels {
                identity: c.identity,
            })
            .set(c.not_after as i64);
    }
}
