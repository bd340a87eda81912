//! The state every task of a waypoint shares ([`Ctx`]): its configuration
//! and identity, the current model and its compiled routes, the backends,
//! limits, metrics and the shutdown latch.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use mesh_core::identity::{CertificateStore, SpiffeId};
use mesh_core::model::{MeshModel, Service};
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::backend::MeshBackends;
use crate::config::WaypointConfig;
use crate::otlp;
use crate::proxy::forward::RetryBudget;
use crate::ratelimit::RateLimiter;
use crate::routes::{RouteError, RouteTable};
use crate::telemetry::WaypointMetrics;

/// Compiled route tables of the current model.
pub(crate) struct RouteCache {
    pub(crate) model: usize,
    /// Per service, port and the namespace whose routes apply.
    pub(crate) tables: HashMap<(String, String, u16, String), Arc<RouteTable>>,
}

/// State shared by every task of the waypoint.
pub struct Ctx {
    pub cfg: WaypointConfig,
    pub(crate) model: watch::Receiver<Arc<MeshModel>>,
    pub identity: SpiffeId,
    pub certs: Arc<CertificateStore>,
    /// The mesh's endpoints, for forwarding, mirroring and authorizers.
    pub backends: Arc<MeshBackends>,
    pub limiter: RateLimiter,
    /// Connection, tunnel and handshake slots.
    pub slots: mesh_core::limits::Limiter,
    pub metrics: WaypointMetrics,
    pub registry: Registry,
    pub(crate) routes: Mutex<RouteCache>,
    pub retry_budget: RetryBudget,
    /// Span export, when a collector is configured.
    pub spans: Option<otlp::SpanExporter>,
    /// Set when the waypoint drains for shutdown.
    pub(crate) shutdown: mesh_core::shutdown::Shutdown,
}

impl Ctx {
    /// True once a graceful shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.shutdown.has_begun()
    }

    /// Completes when a graceful shutdown begins.
    pub fn shutdown_begun(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.shutdown.begun()
    }

    /// The current mesh model.
    pub fn model(&self) -> Arc<MeshModel> {
        self.model.borrow().clone()
    }

    /// The compiled routes of a service port for callers in `caller_ns`
    /// (cached per model version, and shared by the callers the same
    /// routes apply to).
    pub fn routes(
        &self,
        model: &Arc<MeshModel>,
        svc: &Service,
        port: u16,
        caller_ns: &str,
    ) -> Result<Arc<RouteTable>, RouteError> {
        let version = Arc::as_ptr(model) as usize;
        let (route_ns, _) = model.routes_for_caller(svc, port, caller_ns);
        let key = (
            svc.namespace.clone(),
            svc.name.clone(),
            port,
            route_ns.to_string(),
        );
        {
            let cache = self.routes.lock().unwrap_or_else(|p| p.into_inner());
            if cache.model == version {
                if let Some(t) = cache.tables.get(&key) {
                    return Ok(t.clone());
                }
            }
        }
        let table = Arc::new(RouteTable::build(model, svc, port, caller_ns)?);
        let mut cache = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        if cache.model != version {
            cache.model = version;
            cache.tables.clear();
        }
        cache.tables.insert(key, table.clone());
        Ok(table)
    }

    /// Whether this process serves the waypoint `gw`.
    pub fn is_me(&self, gw: &mesh_core::model::Gateway) -> bool {
        gw.metadata.namespace == self.cfg.namespace && gw.metadata.name == self.cfg.name
    }
}
