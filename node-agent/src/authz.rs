//! Policy at the destination: authorize each inbound connection with the
//! current model, log and count denials (and what dry-run policies would
//! have decided), and keep a register of live inbound connections so that a
//! policy change closes those that no longer pass (the client sees a
//! reset).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use mesh_core::identity::SpiffeId;
use mesh_core::model::policy::MtlsMode;
use mesh_core::model::MeshModel;
use mesh_core::policy::{authorize, mtls_mode, ConnInfo, DryRun};
use tokio::sync::Notify;

use crate::telemetry::{AgentMetrics, DenialLabels};

/// Why a connection may not proceed.
#[derive(Debug, Clone)]
pub struct Denial {
    pub kind: &'static str,
    pub policy: Option<String>,
    pub reason: String,
}

/// What is checked again when policy changes.
#[derive(Debug, Clone)]
pub struct Checked {
    pub source_identity: Option<SpiffeId>,
    pub source: SocketAddr,
    pub destination: SocketAddr,
}

impl std::fmt::Display for Checked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.source_identity {
            Some(id) => write!(f, "{} ({id}) -> {}", self.source, self.destination),
            None => write!(f, "{} (plaintext) -> {}", self.source, self.destination),
        }
    }
}

/// Admit a new inbound connection: [`check`] it, count what dry-run
/// policies would have decided, and report a denial.
pub fn admit(metrics: &AgentMetrics, model: &MeshModel, c: &Checked) -> Result<String, Denial> {
    let mut dry_run = vec![];
    let verdict = check_with_dry_run(model, c, &mut dry_run);
    metrics.policy.record_dry_run(&dry_run, c);
    if let Err(d) = &verdict {
        report(metrics, c, d, "new");
    }
    verdict
}

/// Check a connection to `c.destination` (a local workload) against
/// PeerAuthentication (plaintext only) and AuthorizationPolicy. On success,
/// the outcome in words (for the access log), including AUDIT matches.
pub fn check(model: &MeshModel, c: &Checked) -> Result<String, Denial> {
    check_with_dry_run(model, c, &mut vec![])
}

/// [`check`], also saying what dry-run policies would have decided.
fn check_with_dry_run(
    model: &MeshModel,
    c: &Checked,
    dry_run: &mut Vec<DryRun>,
) -> Result<String, Denial> {
    let Some(dst) = model.workload_by_ip(c.destination.ip()) else {
        return Err(Denial {
            kind: "authorization",
            policy: None,
            reason: "destination is no longer a workload".into(),
        });
    };
    if c.source_identity.is_none() {
        let (mode, policy) = mtls_mode(model, dst, c.destination.port());
        if mode == MtlsMode::Strict {
            return Err(Denial {
                kind: "peer_authentication",
                reason: format!(
                    "STRICT mutual TLS ({}): plaintext refused",
                    policy.as_deref().unwrap_or("mesh default")
                ),
                policy,
            });
        }
    }
    let d = authorize(
        model,
        &ConnInfo {
            source_identity: c.source_identity.as_ref(),
            source_ip: c.source.ip(),
            destination: dst,
            destination_ip: c.destination.ip(),
            destination_port: c.destination.port(),
        },
    );
    *dry_run = d.dry_run;
    if d.allowed {
        let mut outcome = d.reason;
        if !d.audited.is_empty() {
            outcome.push_str(&format!("; audited by {}", d.audited.join(", ")));
        }
        Ok(outcome)
    } else {
        Err(Denial {
            kind: "authorization",
            policy: d.policy,
            reason: d.reason,
        })
    }
}

/// Record a denial: one access-log line and the counters.
pub fn report(metrics: &AgentMetrics, c: &Checked, d: &Denial, connection: &'static str) {
    let outcome = if connection == "new" {
        "denied"
    } else {
        "closed_by_policy"
    };
    metrics.access_log.record(serde_json::json!({
        "direction": "inbound",
        "src.addr": c.source.to_string(),
        "dst.addr": c.destination.to_string(),
        "src.identity": c.source_identity.as_ref().map(|i| i.to_string()),
        "outcome": outcome,
        "policy": d.policy,
        "reason": d.reason,
    }));
    metrics
        .denials
        .get_or_create(&DenialLabels {
            kind: d.kind,
            policy: d.policy.clone().unwrap_or_else(|| "-".into()),
            connection,
        })
        .inc();
    tracing::warn!(
        target: "access",
        direction = "inbound",
        src.addr = %c.source,
        dst.addr = %c.destination,
        src.identity = c.source_identity.as_ref().map(|i| i.to_string()).as_deref().unwrap_or("-"),
        outcome,
        policy = d.policy.as_deref().unwrap_or("-"),
        reason = %d.reason,
        "connection denied"
    );
}

struct Tracked {
    checked: Checked,
    revoke: Arc<Notify>,
}

/// Live inbound connections, re-checked when the model changes.
#[derive(Default)]
pub struct LiveConnections {
    next: AtomicU64,
    conns: Mutex<HashMap<u64, Tracked>>,
}

/// Removes the connection from the register when dropped.
pub struct Registration<'a> {
    live: &'a LiveConnections,
    id: u64,
    /// Notified when policy revokes the connection.
    pub revoked: Arc<Notify>,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.live
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

impl LiveConnections {
    pub fn register(&self, checked: Checked) -> Registration<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let revoke = Arc::new(Notify::new());
        self.conns.lock().unwrap_or_else(|p| p.into_inner()).insert(
            id,
            Tracked {
                checked,
                revoke: revoke.clone(),
            },
        );
        Registration {
            live: self,
            id,
            revoked: revoke,
        }
    }

    /// Check every live connection against `model`; close those denied now.
    pub fn revalidate(&self, model: &MeshModel, metrics: &AgentMetrics) -> usize {
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let mut closed = 0;
        for t in conns.values() {
            if let Err(d) = check(model, &t.checked) {
                report(metrics, &t.checked, &d, "existing");
                t.revoke.notify_one();
                closed += 1;
            }
        }
        closed
    }

    pub fn len(&self) -> usize {
        self.conns.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
