//! The waypoint's metrics: Istio's HTTP request metrics (reporter
//! `waypoint`) plus its own health — policy denials, refused tunnels,
//! configuration updates, certificate state.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use mesh_core::metrics::{PolicyMetrics, RequestMetrics};

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct PolicyLabels {
    pub policy: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

pub use mesh_core::metrics::ResultLabels;

/// Everything the waypoint counts.
pub struct WaypointMetrics {
    pub requests: RequestMetrics,
    pub denials: Family<PolicyLabels, Counter>,
    pub refused: Family<ReasonLabels, Counter>,
    pub config_updates: Family<ResultLabels, Counter>,
    /// Dry-run outcomes and rejected configuration objects.
    pub policy: PolicyMetrics,
}

impl WaypointMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            requests: RequestMetrics::register(registry),
            denials: Family::default(),
            refused: Family::default(),
            config_updates: Family::default(),
            policy: PolicyMetrics::register(registry),
        };
        registry.register(
            "sluice_waypoint_policy_denials",
            "Requests denied by AuthorizationPolicy",
            m.denials.clone(),
        );
        registry.register(
            "sluice_waypoint_refused_tunnels",
            "HBONE tunnels or connections the waypoint refused, by reason",
            m.refused.clone(),
        );
        registry.register(
            "sluice_config_updates",
            "Mesh configuration updates, applied or rejected",
            m.config_updates.clone(),
        );
        m
    }

    /// Count a refused connection or tunnel.
    pub fn refuse(&self, reason: &'static str) {
        self.refused.get_or_create(&ReasonLabels { reason }).inc();
    }
}
