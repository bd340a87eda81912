//! A waypoint's life: start (the model from its source, itself in it, its
//! certificate, its listeners, its admin endpoint on a runtime of its
//! own), the running handle, and the drain at shutdown.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_core::hbone::{HboneConnector, HBONE_PORT};
use mesh_core::identity::CertificateStore;
use mesh_core::model::MeshModel;
use mesh_core::source::Source;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::backend::MeshBackends;
use crate::balancer::Balancer;
use crate::proxy::forward::RetryBudget;
use crate::ratelimit::RateLimiter;
use crate::telemetry::WaypointMetrics;
use crate::upstream::Upstream;

use crate::config::{WaypointConfig, WaypointError};
use crate::context::{Ctx, RouteCache};
use crate::{admin, inbound, otlp, route_status};

/// A running waypoint; stops when dropped.
pub struct WaypointHandle {
    pub ctx: Arc<Ctx>,
    /// Where HBONE is served.
    pub hbone_addrs: Vec<SocketAddr>,
    pub admin_addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
    /// The HBONE accept loops (closed first when draining).
    listeners: std::sync::Mutex<Vec<JoinHandle<()>>>,
    /// The admin endpoint, on a runtime of its own.
    admin: Option<mesh_core::side_runtime::SideRuntime>,
}

impl WaypointHandle {
    pub fn stop(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
        self.close_listeners();
        if let Some(a) = self.admin.take() {
            a.stop();
        }
    }

    fn close_listeners(&self) {
        for t in self
            .listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            t.abort();
        }
    }

    /// Graceful shutdown (SIGTERM; a rolling update of the waypoint's
    /// Deployment): readiness turns false, the listeners close, HBONE peers
    /// get a GOAWAY (their agents open new tunnels to the other replicas),
    /// HTTP connections in the tunnels end after their current request
    /// (HTTP/1.1 `connection: close`, HTTP/2 GOAWAY), and requests in flight
    /// finish — for at most `period`. Returns how many connections and
    /// tunnels were still open at the deadline.
    pub async fn drain(&self, period: Duration) -> usize {
        self.ctx.shutdown.begin();
        self.close_listeners();
        self.ctx.slots.drain(period).await
    }
}

impl Drop for WaypointHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// How long a waypoint on a cluster waits for its Gateway and its own pod
/// address before giving up.
const KUBE_START_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// Start the waypoint: load the model (waiting on a cluster until it shows
/// this waypoint), find itself in it, get its certificate, listen for HBONE
/// and follow the model's source.
pub async fn start(cfg: WaypointConfig) -> Result<WaypointHandle, WaypointError> {
    let mut registry = Registry::default();
    let metrics = WaypointMetrics::register(&mut registry);
    let (model_tx, model_rx) = watch::channel(Arc::new(MeshModel::empty("cluster.local")));
    // The model's source: the mesh file (every version must keep this
    // waypoint's Gateway), or the cluster.
    let report = Arc::new(mesh_core::source::Report {
        updates: metrics.config_updates.clone(),
        policy: metrics.policy.clone(),
    });
    let source = match &cfg.kube {
        None => {
            let (ns, name) = (cfg.namespace.clone(), cfg.name.clone());
            Source::File {
                path: cfg.mesh_file.clone(),
                interval: cfg.reload_interval,
                check: mesh_core::source::require(
                    "gateways",
                    format!("this waypoint {ns}/{name} is missing"),
                    move |next| {
                        next.gateways
                            .iter()
                            .any(|g| g.metadata.namespace == ns && g.metadata.name == name)
                    },
                ),
            }
        }
        Some(cluster) => Source::Cluster {
            cluster: cluster.clone(),
            // The waypoint serves no pods of its own.
            netns: Arc::new(|_: &k8s_openapi::api::core::v1::Pod| None),
            changed: Arc::new(tokio::sync::Notify::new()),
        },
    };
    let followed = mesh_core::source::follow(source, model_tx, report).await?;
    let mut tasks = followed.tasks;
    // On a cluster the pod may start before the API shows its IP (or the
    // Gateway): wait for both rather than exit and be restarted.
    if cfg.kube.is_some() {
        let mut rx = model_rx.clone();
        let present = |m: &MeshModel| {
            m.gateways.iter().any(|g| {
                g.is_waypoint()
                    && g.metadata.namespace == cfg.namespace
                    && g.metadata.name == cfg.name
                    && m.waypoint_workloads(g).any(|w| w.name == cfg.workload)
            })
        };
        if !present(&rx.borrow()) {
            tracing::info!(
                gateway = %format!("{}/{}", cfg.namespace, cfg.name),
                pod = %cfg.workload,
                "waiting for the Gateway and this pod's address to appear in the API"
            );
        }
        let _ = tokio::time::timeout(KUBE_START_WAIT, rx.wait_for(|m| present(m))).await;
    }
    if let Some(client) = followed.client {
        tasks.push(tokio::spawn(route_status::follow(
            client,
            model_rx.clone(),
            cfg.namespace.clone(),
            cfg.name.clone(),
        )));
    }
    let model = model_rx.borrow().clone();
    let gw = model
        .gateways
        .iter()
        .find(|g| {
            g.is_waypoint() && g.metadata.namespace == cfg.namespace && g.metadata.name == cfg.name
        })
        .ok_or_else(|| WaypointError::UnknownGateway(format!("{}/{}", cfg.namespace, cfg.name)))?;
    let me = model
        .waypoint_workloads(gw)
        .find(|w| w.name == cfg.workload)
        .ok_or_else(|| {
            WaypointError::UnknownWorkload(format!("{}/{}", cfg.namespace, cfg.workload))
        })?;
    let identity = model.identity(me);
    let node = Some(me.node.clone());
    let listen = cfg.listen.clone().unwrap_or_else(|| {
        me.ips
            .iter()
            .map(|ip| SocketAddr::new(*ip, HBONE_PORT))
            .collect()
    });
    let (signer, roots) = cfg.ca.signer(&model.trust_domain, cfg.cert_ttl)?;
    let certs = CertificateStore::new(signer, roots, &model.trust_domain)?;
    let _ = certs.ensure(&identity);
    let connector = HboneConnector::new(certs.clone(), cfg.hbone.clone());
    let upstream = Upstream::new(connector, identity.clone());

    let bind = |addr: SocketAddr| {
        std::net::TcpListener::bind(addr)
            .and_then(|l| {
                l.set_nonblocking(true)?;
                Ok(l)
            })
            .map_err(|source| WaypointError::Bind { addr, source })
    };
    let listeners = listen
        .iter()
        .map(|a| bind(*a))
        .collect::<Result<Vec<_>, _>>()?;
    let admin_l = bind(cfg.admin_addr)?;
    let hbone_addrs = listeners
        .iter()
        .map(|l| l.local_addr().expect("bound"))
        .collect();
    let admin_addr = admin_l.local_addr().expect("bound");
    let spans = match &cfg.otlp_endpoint {
        Some(e) => {
            let (exporter, task) =
                otlp::SpanExporter::start(e, format!("{}.{}", cfg.name, cfg.namespace))
                    .map_err(WaypointError::Otlp)?;
            tasks.push(task);
            Some(exporter)
        }
        None => None,
    };
    let limits = cfg.limits;
    let ctx = Arc::new(Ctx {
        cfg,
        model: model_rx,
        identity,
        certs,
        backends: Arc::new(MeshBackends {
            upstream,
            balancer: Arc::new(Balancer::default()),
            node,
        }),
        limiter: RateLimiter::default(),
        slots: mesh_core::limits::Limiter::new(limits),
        metrics,
        registry,
        routes: Mutex::new(RouteCache {
            model: 0,
            tables: HashMap::new(),
        }),
        retry_budget: RetryBudget::default(),
        spans,
        shutdown: Default::default(),
    });
    let mut accept_loops = Vec::new();
    for l in listeners {
        let l = tokio::net::TcpListener::from_std(l).map_err(|source| WaypointError::Bind {
            addr: "0.0.0.0:0".parse().expect("static"),
            source,
        })?;
        accept_loops.push(tokio::spawn(inbound::serve(l, ctx.clone())));
    }
    // Its own runtime: a slow scrape never competes with requests.
    let admin_ctx = ctx.clone();
    let admin = mesh_core::side_runtime::SideRuntime::start("sluice-admin", move || {
        admin::serve(admin_l, admin_ctx)
    })
    .map_err(|source| WaypointError::Bind {
        addr: admin_addr,
        source,
    })?;
    tracing::info!(waypoint = %format!("{}/{}", ctx.cfg.namespace, ctx.cfg.name), identity = %ctx.identity, addrs = ?hbone_addrs, "waypoint started");
    Ok(WaypointHandle {
        ctx,
        hbone_addrs,
        admin_addr,
        tasks,
        listeners: std::sync::Mutex::new(accept_loops),
        admin: Some(admin),
    })
}
