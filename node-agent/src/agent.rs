//! The agent's lifecycle: start-up (model source, certificates, capture,
//! listeners, the hand-over from a predecessor), the tasks that follow the
//! mesh file and keep the CNI plugin installed, and the handle through
//! which the binary drains and stops it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use mesh_core::hbone::{HboneConnector, PoolStats};
use mesh_core::identity::CertificateStore;
use mesh_core::model::MeshModel;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::AgentConfig;
use crate::context::{AgentError, Ctx};
use crate::enrollment::{follow_model, reconcile};
use crate::orig_dst::OriginalDestination;
use crate::telemetry::AgentMetrics;
use crate::{admin, authz, capture, cni, handover, limits, lock, orig_dst, podns};
use mesh_core::source::Source;

/// A running agent.
pub struct AgentHandle {
    pub ctx: Arc<Ctx>,
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub readiness_addr: SocketAddr,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    admin: Mutex<Option<admin::AdminServer>>,
}

impl AgentHandle {
    pub fn pool_stats(&self) -> PoolStats {
        self.ctx.connector.stats()
    }

    /// Wait until the agent reports ready.
    pub async fn wait_ready(&self) {
        self.ctx.wait_ready().await
    }

    /// Stop accepting and drop all listeners; established connections end
    /// with the runtime.
    pub fn shutdown(self) {
        self.stop();
    }

    /// Completes when a successor has taken over this agent's listeners
    /// and serves (hot restart); the caller then drains and exits.
    pub async fn handed_over(&self) {
        let mut rx = self.ctx.handed_over.subscribe();
        let _ = rx.wait_for(|h| *h).await;
    }

    /// Graceful shutdown: readiness turns false, every listener closes (with
    /// eBPF capture still in place, so new connections of enrolled pods
    /// fail closed rather than bypass the mesh), HBONE peers get a GOAWAY,
    /// and established connections run on until they end or `period` is
    /// over. Returns how many were still open at the deadline (and are cut
    /// when the caller exits).
    pub async fn drain(&self, period: std::time::Duration) -> usize {
        self.ctx.shutdown.begin();
        if let Some(h) = lock(&self.ctx.handover_server).take() {
            h.stop();
        }
        // Model followers first, so nothing re-creates listeners.
        for t in lock(&self.tasks).drain(..) {
            t.abort();
        }
        lock(&self.ctx.local).clear();
        lock(&self.ctx.draining).clear();
        let left = self.ctx.limiter.drain(period).await;
        self.stop();
        left
    }

    fn stop(&self) {
        for t in lock(&self.tasks).drain(..) {
            t.abort();
        }
        lock(&self.ctx.local).clear();
        lock(&self.ctx.draining).clear();
        if let Some(h) = lock(&self.ctx.handover_server).take() {
            h.stop();
        }
        if let Some(a) = lock(&self.admin).take() {
            a.stop();
        }
    }
}

impl Drop for AgentHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Start the agent: load the mesh file, set up certificates, bind the admin
/// endpoints and the per-workload listeners, and watch the file for changes.
pub async fn start(
    cfg: AgentConfig,
    orig_dst: Arc<dyn OriginalDestination>,
) -> Result<AgentHandle, AgentError> {
    let mut registry = Registry::default();
    let metrics = AgentMetrics::register(&mut registry);
    // A previous agent still serving this node hands its listeners over.
    let inherited = match cfg.handover_socket.clone() {
        Some(path) => tokio::task::spawn_blocking(move || handover::take_over(&path))
            .await
            .unwrap_or_else(|e| {
                Err(handover::HandoverError::Protocol(format!(
                    "hand-over task failed: {e}"
                )))
            })
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "no hand-over; binding fresh listeners");
                handover::Inherited::none()
            }),
        None => handover::Inherited::none(),
    };
    let (model_tx, model_rx) = watch::channel(Arc::new(MeshModel::empty("cluster.local")));
    let cni_registry = Arc::new(cni::server::Registry::default());
    // The model's source: the mesh file (every version must keep this
    // node), or the cluster (then the first model is complete before
    // anything is served).
    let report = Arc::new(mesh_core::source::Report {
        updates: metrics.config_updates.clone(),
        policy: metrics.policy.clone(),
    });
    let source = match &cfg.kube {
        None => {
            let node = cfg.node.clone();
            Source::File {
                path: cfg.mesh_file.clone(),
                interval: cfg.reload_interval,
                check: mesh_core::source::require(
                    "nodes",
                    format!("this agent's node {node:?} is missing"),
                    move |next| next.nodes.iter().any(|n| n.name == node),
                ),
            }
        }
        Some(k) => Source::Cluster {
            cluster: k.cluster.clone(),
            netns: pod_netns(&cfg.node, k.proc_root.clone(), cni_registry.clone()),
            changed: cni_registry.changed.clone(),
        },
    };
    let followed = mesh_core::source::follow(source, model_tx, report).await?;
    let mut tasks = followed.tasks;
    if cfg.kube.is_none() && !model_rx.borrow().nodes.iter().any(|n| n.name == cfg.node) {
        for t in tasks {
            t.abort();
        }
        return Err(AgentError::UnknownNode(cfg.node.clone()));
    }
    let model = model_rx.borrow().clone();
    let (signer, roots) = cfg.ca.signer(&model.trust_domain, cfg.cert_ttl)?;
    let certs = CertificateStore::new(signer, roots, &model.trust_domain)?;
    let connector = HboneConnector::new(certs.clone(), cfg.hbone.clone());
    let capture = match &cfg.capture {
        // After a hand-over the previous agent still claims its
        // connections' records: keep them.
        Some(c) => Some(Arc::new(capture::Capture::load(
            c.clone(),
            !inherited.took_over(),
        )?)),
        None => None,
    };
    let orig_dst: Arc<dyn OriginalDestination> = match &capture {
        Some(c) => Arc::new(orig_dst::Chain(vec![
            Box::new(c.clone()),
            Box::new(orig_dst),
        ])),
        None => orig_dst,
    };

    let bind = |addr: SocketAddr| match inherited.take(None, addr) {
        Some(l) => Ok(l),
        None => {
            std::net::TcpListener::bind(addr).map_err(|source| AgentError::Bind { addr, source })
        }
    };
    let (admin_l, metrics_l, ready_l) = (
        bind(cfg.admin_addr)?,
        bind(cfg.metrics_addr)?,
        bind(cfg.readiness_addr)?,
    );
    let local_addr =
        |l: &std::net::TcpListener| l.local_addr().expect("bound listener has an address");
    let (admin_addr, metrics_addr, readiness_addr) = (
        local_addr(&admin_l),
        local_addr(&metrics_l),
        local_addr(&ready_l),
    );

    let host_listeners = [&admin_l, &metrics_l, &ready_l]
        .iter()
        .filter_map(|l| std::os::fd::AsFd::as_fd(*l).try_clone_to_owned().ok())
        .collect();
    let cfg_limits = cfg.limits;
    let ctx = Arc::new(Ctx {
        cfg,
        model: model_rx,
        certs,
        connector,
        orig_dst,
        capture,
        cni: cni_registry,
        metrics,
        registry,
        local: Mutex::new(HashMap::new()),
        draining: Mutex::new(HashMap::new()),
        live: authz::LiveConnections::default(),
        limiter: limits::Limiter::new(cfg_limits),
        shutdown: Default::default(),
        handed_over: watch::channel(false).0,
        inherited,
        host_listeners,
        handover_server: Mutex::new(None),
    });
    let admin = admin::AdminServer::start(ctx.clone(), admin_l, metrics_l, ready_l)
        .map_err(AgentError::Admin)?;
    reconcile(&ctx).await;
    if let Some(c) = &ctx.capture {
        // Enrollments left by a previous run for pods that are gone.
        let local = ctx.local.lock().unwrap_or_else(|p| p.into_inner());
        let keep_ns = local
            .values()
            .filter_map(|l| l.net.netns().map(|n| n.cookie()))
            .collect();
        let keep_ips = local
            .values()
            .filter(|l| l.net.netns().is_some())
            .flat_map(|l| l.ips.clone())
            .collect();
        c.prune(&keep_ns, &keep_ips);
    }
    tasks.push(tokio::spawn(follow_model(ctx.clone())));
    if let Some(c) = &ctx.cfg.cni {
        cni::server::serve(&c.plugin.socket, ctx.clone()).map_err(|source| {
            AgentError::Cni(format!("socket {}: {source}", c.plugin.socket.display()))
        })?;
        tasks.push(tokio::spawn(keep_cni(ctx.clone())));
    }
    tasks.push(tokio::spawn(complete_handover(ctx.clone())));
    tasks.push(tokio::spawn(crate::memory::give_back(ctx.clone())));
    Ok(AgentHandle {
        ctx,
        admin_addr,
        metrics_addr,
        readiness_addr,
        tasks: Mutex::new(tasks),
        admin: Mutex::new(Some(admin)),
    })
}

/// Keep the CNI plugin's cache current (on every model change) and the
/// plugin installed (re-checked every few seconds: the network plugin may
/// rewrite its configuration).
async fn keep_cni(ctx: Arc<Ctx>) {
    let Some(c) = ctx.cfg.cni.clone() else {
        return;
    };
    let mut rx = ctx.model.clone();
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
    let mut last_cache = None;
    let mut last_error = String::new();
    loop {
        let cache = cni::Cache::of(&ctx.model());
        if last_cache.as_ref() != Some(&cache) {
            match cache.write(&c.plugin.cache) {
                Ok(()) => last_cache = Some(cache),
                Err(e) => {
                    tracing::error!(path = %c.plugin.cache.display(), error = %e, "cannot write the CNI plugin's cache");
                }
            }
        }
        if let (Some((dirs, binary)), Some(_)) = (&c.install, &last_cache) {
            let (ctx2, dirs, binary, plugin) =
                (ctx.clone(), dirs.clone(), binary.clone(), c.plugin.clone());
            let outcome =
                tokio::task::spawn_blocking(move || ctx2.cni.ensure(&dirs, &binary, &plugin)).await;
            match outcome {
                Ok(Ok(true)) => {
                    last_error.clear();
                    tracing::info!(conf_dir = %c.install.as_ref().map(|i| i.0.conf.display().to_string()).unwrap_or_default(), "CNI plugin installed: new pods are captured before they start");
                }
                Ok(Ok(false)) => last_error.clear(),
                Ok(Err(e)) => {
                    let e = e.to_string();
                    if e != last_error {
                        tracing::error!(error = %e, "cannot install the CNI plugin (will retry): pods starting while no agent runs would not wait for it");
                        last_error = e;
                    }
                }
                Err(_) => return,
            }
        }
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            _ = tick.tick() => {}
        }
    }
}

/// Once serving: release the previous agent (if any), then wait for a
/// successor of our own.
async fn complete_handover(ctx: Arc<Ctx>) {
    if ctx.inherited.took_over() {
        // Let the previous agent serve until this one is ready (or clearly
        // stuck: then it serves what it can and the old one drains anyway,
        // rather than both running forever).
        if tokio::time::timeout(HANDOVER_READY_WAIT, ctx.wait_ready())
            .await
            .is_err()
        {
            tracing::warn!(
                "not ready after {HANDOVER_READY_WAIT:?}; releasing the previous agent anyway"
            );
        }
        ctx.inherited.finish();
    }
    let Some(path) = ctx.cfg.handover_socket.clone() else {
        return;
    };
    let weak = Arc::downgrade(&ctx);
    let for_ready = Arc::downgrade(&ctx);
    let server = handover::HandoverServer::start(
        &path,
        move || {
            weak.upgrade()
                .map(|c| c.listeners_for_successor())
                .unwrap_or_default()
        },
        move || {
            if let Some(c) = for_ready.upgrade() {
                c.handed_over.send_replace(true);
            }
        },
    );
    match server {
        Ok(s) if !ctx.is_shutting_down() => *lock(&ctx.handover_server) = Some(s),
        Ok(_) => {}
        Err(e) => {
            tracing::error!(error = %e, "hot restart unavailable: a successor will have to bind fresh listeners")
        }
    }
}

/// How long a successor waits to be ready before it releases its
/// predecessor regardless.
const HANDOVER_READY_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// A Kubernetes client from a kubeconfig file, or inferred (in-cluster
/// service account, `$KUBECONFIG`).
pub async fn kube_client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client, AgentError> {
    mesh_core::kube::client(kubeconfig)
        .await
        .map_err(AgentError::Kube)
}

/// Finds the network namespaces of this node's pods in Kubernetes mode:
/// those the CNI plugin handed over first (a sandbox being set up has no
/// process yet), else through the host's /proc.
fn pod_netns(
    node: &str,
    proc_root: std::path::PathBuf,
    registry: Arc<cni::server::Registry>,
) -> Arc<mesh_core::kube::watch::NetnsResolver> {
    let node = node.to_string();
    Arc::new(move |pod: &k8s_openapi::api::core::v1::Pod| {
        let on_this_node =
            pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node.as_str());
        if !on_this_node {
            return None;
        }
        if let Some(local) = registry.local_pod(pod) {
            return Some(local);
        }
        let uid = pod.metadata.uid.as_deref()?;
        podns::find_pod_netns(&proc_root, uid).map(|p| mesh_core::kube::translate::LocalPod {
            netns: p.display().to_string(),
            ips: vec![],
        })
    })
}
