//! The Sluice node agent: one per node. It keeps the mesh model current,
//! holds a certificate for every identity running on its node, and for each
//! local enrolled workload runs an outbound capture listener (15001) and an
//! HBONE listener (15008). Outbound connections are tunnelled over HBONE to
//! the destination's agent; inbound tunnels are terminated and connected to
//! the application. Admin, metrics and readiness run on their own small
//! runtime so a slow scrape never stalls the data path.

pub mod admin;
pub mod authz;
pub mod capture;
pub mod cni;
pub mod config;
pub mod delivery;
pub mod fdpass;
pub mod handover;
pub mod inbound;
pub mod limits;
pub mod orig_dst;
pub mod outbound;
pub mod podnet;
pub mod podns;
pub mod telemetry;
pub mod uninstall;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use mesh_core::hbone::{HboneConnector, PoolStats};
use mesh_core::identity::{CertificateStore, SpiffeId};
use mesh_core::model::{MeshModel, ModelError};
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use config::{AgentConfig, CaSource, KubeSource, OutboundTrafficPolicy};
use orig_dst::OriginalDestination;
use telemetry::{AgentMetrics, ResultLabels};

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("mesh file rejected: {0}")]
    Model(#[from] ModelError),
    #[error("node {0:?} is not in the mesh file's nodes")]
    UnknownNode(String),
    #[error("certificate authority: {0}")]
    Ca(#[from] mesh_core::identity::CaError),
    #[error("certificates: {0}")]
    Certs(#[from] mesh_core::identity::certs::CertError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("Kubernetes: {0}")]
    Kube(#[from] mesh_core::kube::KubeError),
    #[error("starting the admin endpoints' thread: {0}")]
    Admin(#[source] std::io::Error),
    #[error("eBPF capture: {0}")]
    Capture(#[from] capture::CaptureError),
    #[error("network namespace {name}: {source}")]
    Netns {
        name: String,
        source: std::io::Error,
    },
    #[error("the pod's network namespace is not found on this node (yet)")]
    NoNetns,
    #[error("CNI plugin: {0}")]
    Cni(String),
}

/// State shared by every task of the agent.
pub struct Ctx {
    pub cfg: AgentConfig,
    model: watch::Receiver<Arc<MeshModel>>,
    pub certs: Arc<CertificateStore>,
    pub connector: HboneConnector,
    pub orig_dst: Arc<dyn OriginalDestination>,
    /// The eBPF capture, when enabled.
    pub capture: Option<Arc<capture::Capture>>,
    /// Namespaces the CNI plugin handed over (always there; empty without
    /// the plugin).
    pub cni: Arc<cni::server::Registry>,
    pub metrics: AgentMetrics,
    pub registry: Registry,
    local: Mutex<HashMap<(String, String), LocalWorkload>>,
    /// Live inbound connections, re-checked against policy on model changes.
    pub live: authz::LiveConnections,
    /// Workloads no longer enrolled whose listeners stay open until the
    /// deadline, so connections redirected just before un-enrollment are
    /// still served (and a quick re-enrollment reuses them).
    draining: Mutex<HashMap<(String, String), (LocalWorkload, std::time::Instant)>>,
    /// Connection and handshake slots (see [`limits`]).
    pub limiter: limits::Limiter,
    /// Set when the agent drains for shutdown: HBONE connections send a
    /// GOAWAY and readiness turns false.
    shutting_down: watch::Sender<bool>,
    /// Set when a successor took this agent's listeners over (hot restart):
    /// it drains too, but serves whatever still reaches it, because the
    /// successor is there to take the rest.
    handed_over: watch::Sender<bool>,
    /// Listening sockets received from the previous agent, until adopted.
    inherited: handover::Inherited,
    /// Duplicates of the agent's own listeners (admin, metrics, readiness)
    /// for a successor.
    host_listeners: Vec<std::os::fd::OwnedFd>,
    /// Where a successor asks for this agent's sockets.
    handover_server: Mutex<Option<handover::HandoverServer>>,
}

impl Ctx {
    /// Sluice is being removed: take the CNI plugin off the node (pods
    /// created from now on start directly) and its cache with it.
    pub fn remove_cni(&self) {
        let Some(c) = &self.cfg.cni else { return };
        if let Some((dirs, _)) = &c.install {
            match self.cni.remove(dirs) {
                Ok(()) => tracing::info!("CNI plugin removed from the node"),
                Err(e) => tracing::error!(error = %e, "cannot remove the CNI plugin"),
            }
        }
        let _ = std::fs::remove_file(&c.plugin.cache);
    }

    /// The namespaces of the pods prepared for transparent delivery
    /// ([`delivery`]), to clean up once an uninstall has drained (the
    /// drain stops serving them).
    pub fn delivery_namespaces(&self) -> Vec<Arc<capture::netns::Netns>> {
        let local = lock(&self.local);
        let draining = lock(&self.draining);
        local
            .values()
            .chain(draining.values().map(|(l, _)| l))
            .filter_map(|l| match &l.net {
                podnet::PodNet::Netns {
                    ns,
                    transparent: true,
                } => Some(ns.clone()),
                _ => None,
            })
            .collect()
    }

    /// The current mesh model.
    pub fn model(&self) -> Arc<MeshModel> {
        self.model.borrow().clone()
    }

    /// Local workloads whose listeners are up, with their identities.
    pub fn enrolled(&self) -> Vec<EnrolledWorkload> {
        let local = self.local.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<_> = local
            .iter()
            .map(|((ns, name), l)| EnrolledWorkload {
                namespace: ns.clone(),
                name: name.clone(),
                identity: l.identity.to_string(),
                ips: l.ips.clone(),
            })
            .collect();
        out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        out
    }

    /// Where the local workload owning `ip` has its sockets.
    pub fn pod_net(&self, ip: IpAddr) -> Option<podnet::PodNet> {
        let local = self.local.lock().unwrap_or_else(|p| p.into_inner());
        local
            .values()
            .find(|l| l.ips.contains(&ip))
            .map(|l| l.net.clone())
    }

    /// Ready when the listeners of every local workload are up and every
    /// local identity has a certificate.
    pub fn is_ready(&self) -> bool {
        if self.is_shutting_down() {
            return false;
        }
        let model = self.model();
        let local = self.local.lock().unwrap_or_else(|p| p.into_inner());
        let want = model
            .workloads_on_node(&self.cfg.node)
            .filter(|w| model.is_enrolled(w))
            .count();
        want == local.len() && self.certs.all_ready()
    }

    /// Wait until the agent reports ready.
    pub async fn wait_ready(&self) {
        while !self.is_ready() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

impl Ctx {
    /// True once a graceful shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        *self.shutting_down.borrow()
    }

    /// Completes when a graceful shutdown begins.
    pub fn shutdown_begun(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.shutting_down.subscribe();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    }

    /// Whether work that reaches the agent now is refused: during a drain
    /// for shutdown, yes (nobody else serves the node: fail closed, and the
    /// drain ends sooner); after a hand-over, no — it is served here, as the
    /// successor serves what it takes from the same sockets.
    pub fn refuses_new_work(&self) -> bool {
        self.is_shutting_down() && !*self.handed_over.borrow()
    }

    /// Duplicates of every listener this agent serves, for a successor.
    fn listeners_for_successor(&self) -> Vec<std::os::fd::OwnedFd> {
        let local = lock(&self.local);
        self.host_listeners
            .iter()
            .chain(local.values().flat_map(|l| l.listeners.iter()))
            .filter_map(|fd| fd.try_clone().ok())
            .collect()
    }
}

/// A local workload as the agent serves it (for the dump and tests).
#[derive(Debug, Clone, serde::Serialize, PartialEq, Eq)]
pub struct EnrolledWorkload {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    pub ips: Vec<IpAddr>,
}

struct LocalWorkload {
    ips: Vec<IpAddr>,
    identity: SpiffeId,
    netns: Option<String>,
    net: podnet::PodNet,
    /// Each captured IP with its inbound plaintext listener (duplicate fds),
    /// to register again when a draining workload is re-enrolled.
    inbound_fds: Vec<(IpAddr, std::os::fd::OwnedFd)>,
    /// Every listener of the workload (duplicate fds), for a successor.
    listeners: Vec<std::os::fd::OwnedFd>,
    /// Its listeners' accept loops, stopped when it is dropped (held for
    /// that alone).
    _tasks: AbortOnDrop,
}

impl LocalWorkload {
    fn same(&self, ips: &[IpAddr], identity: &SpiffeId, netns: &Option<String>) -> bool {
        self.ips == ips && &self.identity == identity && &self.netns == netns
    }
}

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
        self.ctx.shutting_down.send_replace(true);
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
    // The model's source: the mesh file, or the cluster (then the first
    // model is complete before anything is served).
    let (loaded, mut tasks) = match &cfg.kube {
        None => {
            let (model, loaded) = MeshModel::load_with_bytes(&cfg.mesh_file)?;
            if !model.nodes.iter().any(|n| n.name == cfg.node) {
                return Err(AgentError::UnknownNode(cfg.node.clone()));
            }
            model_tx.send_replace(Arc::new(model));
            (Some(loaded), vec![])
        }
        Some(k) => {
            let client = kube_client(k.kubeconfig.as_deref()).await?;
            let report = Arc::new(mesh_core::kube::watch::ClusterReport {
                updates: metrics.config_updates.clone(),
                policy: metrics.policy.clone(),
            });
            // This node's pods are served inside their own network
            // namespaces, found through the host's /proc.
            // (Those the CNI plugin handed over first: a sandbox being set
            // up has no process yet.)
            let node = cfg.node.clone();
            let proc_root = k.proc_root.clone();
            let registry = cni_registry.clone();
            let netns = Arc::new(move |pod: &k8s_openapi::api::core::v1::Pod| {
                let on_this_node =
                    pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node.as_str());
                if !on_this_node {
                    return None;
                }
                if let Some(local) = registry.local_pod(pod) {
                    return Some(local);
                }
                let uid = pod.metadata.uid.as_deref()?;
                podns::find_pod_netns(&proc_root, uid).map(|p| {
                    mesh_core::kube::translate::LocalPod {
                        netns: p.display().to_string(),
                        ips: vec![],
                    }
                })
            });
            let tasks = mesh_core::kube::watch::follow_cluster(
                client,
                k.trust_domain.clone(),
                k.root_namespace.clone(),
                netns,
                model_tx.clone(),
                report,
                cni_registry.changed.clone(),
            )
            .await;
            (None, tasks)
        }
    };
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
        shutting_down: watch::channel(false).0,
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
    if let Some(loaded) = loaded {
        tasks.push(tokio::spawn(watch_mesh_file(ctx.clone(), loaded, model_tx)));
    }
    tasks.push(tokio::spawn(follow_model(ctx.clone())));
    if let Some(c) = &ctx.cfg.cni {
        cni::server::serve(&c.plugin.socket, ctx.clone()).map_err(|source| {
            AgentError::Cni(format!("socket {}: {source}", c.plugin.socket.display()))
        })?;
        tasks.push(tokio::spawn(keep_cni(ctx.clone())));
    }
    tasks.push(tokio::spawn(complete_handover(ctx.clone())));
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

/// Follow the mesh file; besides validation, an update must keep this
/// agent's node.
async fn watch_mesh_file(ctx: Arc<Ctx>, loaded: Vec<u8>, tx: watch::Sender<Arc<MeshModel>>) {
    let node = ctx.cfg.node.clone();
    mesh_core::model::watch::follow_mesh_file(
        ctx.cfg.mesh_file.clone(),
        loaded,
        ctx.cfg.reload_interval,
        tx,
        |_, next| {
            if next.nodes.iter().any(|n| n.name == node) {
                Ok(())
            } else {
                Err((
                    "nodes".into(),
                    format!("this agent's node {node:?} is missing"),
                ))
            }
        },
        |applied| {
            let result = if applied { "applied" } else { "rejected" };
            ctx.metrics
                .config_updates
                .get_or_create(&ResultLabels { result })
                .inc();
        },
    )
    .await
}

/// Say loudly which policies have rules a node agent never matches (DENY or
/// AUDIT rules with an L7-only clause: no effect at L4, as in Istio): a
/// warning when such a policy appears or changes, and the
/// `sluice_policies_ineffective_at_l4` gauge.
fn report_policy_effect(ctx: &Ctx, seen: &mut std::collections::HashSet<String>) {
    let model = ctx.model();
    let mut now = std::collections::HashSet::new();
    for p in model
        .authorization_policies
        .iter()
        .filter(|p| p.spec.target_ref.is_none() && p.spec.target_refs.is_empty())
    {
        let clauses = mesh_core::policy::ineffective_at_l4(p);
        if clauses.is_empty() {
            continue;
        }
        let key = format!("{}: {}", p.key(), clauses.join(", "));
        if !seen.contains(&key) {
            tracing::warn!(
                policy = %p.key(),
                action = ?p.spec.action,
                clauses = %clauses.join(", "),
                "policy has rules that never match at the node agent: they hold only L7 attributes, so they have no effect here (as in Istio); attach the policy to a waypoint to enforce them"
            );
        }
        now.insert(key);
    }
    ctx.metrics.policies_ineffective_at_l4.set(now.len() as i64);
    *seen = now;
}

/// Re-reconcile local workloads whenever the model changes.
async fn follow_model(ctx: Arc<Ctx>) {
    let mut rx = ctx.model.clone();
    let mut policy_effect = std::collections::HashSet::new();
    report_policy_effect(&ctx, &mut policy_effect);
    // Also on a timer: retries enrollments that failed (a namespace not
    // there yet, a port still busy) and ends drain periods.
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        let changed = tokio::select! {
            r = rx.changed() => if r.is_err() { return } else { true },
            _ = tick.tick() => false,
        };
        reconcile(&ctx).await;
        if changed {
            report_policy_effect(&ctx, &mut policy_effect);
            let closed = ctx.live.revalidate(&ctx.model(), &ctx.metrics);
            if closed > 0 {
                tracing::info!(closed, "policy change closed existing connections");
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Make the set of running per-workload listeners match the model.
async fn reconcile(ctx: &Arc<Ctx>) {
    let model = ctx.model();
    type Want = (Vec<IpAddr>, SpiffeId, Option<String>);
    let mut want: HashMap<(String, String), Want> = HashMap::new();
    for w in model
        .workloads_on_node(&ctx.cfg.node)
        .filter(|w| model.is_enrolled(w))
    {
        want.insert(
            (w.namespace.clone(), w.name.clone()),
            (w.ips.clone(), model.identity(w), w.netns.clone()),
        );
    }
    let wanted = want.len();
    let now = std::time::Instant::now();
    let mut to_start = Vec::new();
    {
        let mut local = lock(&ctx.local);
        let mut draining = lock(&ctx.draining);
        draining.retain(|k, (_, deadline)| {
            let keep = *deadline > now;
            if !keep {
                tracing::info!(namespace = %k.0, workload = %k.1, "drain period over; listeners closed");
            }
            keep
        });
        let gone: Vec<_> = local
            .iter()
            .filter(|(k, l)| {
                !want
                    .get(*k)
                    .is_some_and(|(ips, id, ns)| l.same(ips, id, ns))
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            let l = local.remove(&k).expect("listed above");
            // Stop capturing first: the pod's new connections flow directly
            // from now on, while those already redirected are still served.
            if let (Some(c), Some(ns)) = (&ctx.capture, l.net.netns()) {
                c.unenroll(ns.cookie(), &l.ips);
            }
            tracing::info!(namespace = %k.0, workload = %k.1, grace_ms = ctx.cfg.unenroll_grace.as_millis() as u64, "workload left this node's mesh; capture removed, listeners draining");
            draining.insert(k, (l, now + ctx.cfg.unenroll_grace));
        }
        for (k, (ips, id, ns)) in want {
            if !local.contains_key(&k) {
                to_start.push((k, ips, id, ns));
            }
        }
        let still: std::collections::HashSet<SpiffeId> = local
            .values()
            .chain(draining.values().map(|(l, _)| l))
            .map(|l| l.identity.clone())
            .collect();
        let starting: std::collections::HashSet<&SpiffeId> =
            to_start.iter().map(|(_, _, id, _)| id).collect();
        for id in ctx.certs.identities() {
            if !still.contains(&id) && !starting.contains(&id) {
                ctx.certs.forget(&id);
            }
        }
    }
    for (key, ips, identity, netns) in to_start {
        ctx.certs.ensure(&identity);
        let revived = match lock(&ctx.draining).remove(&key) {
            Some((l, _)) if l.same(&ips, &identity, &netns) => Some(l),
            _ => None, // a changed workload: the old listeners close now
        };
        let result = match revived {
            Some(l) => revive(ctx, l),
            None => start_workload(ctx, &ips, &identity, netns.as_deref()),
        };
        let (ns, name) = &key;
        match result {
            Ok(l) => {
                tracing::info!(namespace = %ns, workload = %name, identity = %identity, ?ips, netns = netns.as_deref().unwrap_or("-"), "workload enrolled");
                lock(&ctx.local).insert(key, l);
            }
            Err(e) => {
                ctx.metrics.enrollment_failures.inc();
                tracing::error!(namespace = %ns, workload = %name, error = %e, "cannot enroll workload (will retry); other workloads are unaffected");
            }
        }
    }
    let n = lock(&ctx.local).len();
    ctx.metrics.enrolled_workloads.set(n as i64);
    ctx.metrics
        .unenrollable_workloads
        .set(wanted.saturating_sub(n) as i64);
}

/// Enroll a draining workload again, reusing its open listeners.
fn revive(ctx: &Arc<Ctx>, l: LocalWorkload) -> Result<LocalWorkload, AgentError> {
    if let (Some(c), Some(ns)) = (&ctx.capture, l.net.netns()) {
        use std::os::fd::AsFd;
        let inbound: Vec<_> = l
            .inbound_fds
            .iter()
            .map(|(ip, fd)| (*ip, fd.as_fd()))
            .collect();
        c.enroll(ns, &inbound)?;
    }
    Ok(l)
}

/// Start serving a local workload: listeners in its namespace (or on its
/// IPs in the agent's namespace), then — for a pod namespace with capture
/// enabled — redirection into them.
fn start_workload(
    ctx: &Arc<Ctx>,
    ips: &[IpAddr],
    identity: &SpiffeId,
    netns: Option<&str>,
) -> Result<LocalWorkload, AgentError> {
    use podnet::PodNet;
    let net = match netns {
        // A captured pod is served in its own namespace, never the
        // agent's: not found yet (sandbox starting), it waits for the next
        // round. (Without capture — loopback tests — workloads live on
        // the agent's addresses.)
        None if ctx.cfg.kube.is_some() && ctx.capture.is_some() => return Err(AgentError::NoNetns),
        None => PodNet::Host,
        // Handed over by the CNI plugin, else opened by path.
        Some(name) => {
            let ns = match ctx.cni.netns(name) {
                Some(ns) => ns,
                None => Arc::new(capture::netns::Netns::open(name).map_err(|source| {
                    AgentError::Netns {
                        name: name.to_string(),
                        source,
                    }
                })?),
            };
            let ipv6 = ips.iter().any(IpAddr::is_ipv6);
            let transparent = match delivery::prepare(
                &ns,
                &ctx.cfg.net_sysctl_dir,
                ctx.cfg.mark,
                ipv6,
            ) {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(netns = name, error = %e, "cannot prepare transparent delivery: this pod's applications see the agent (127.0.0.6), not their clients");
                    false
                }
            };
            PodNet::Netns { ns, transparent }
        }
    };
    // A listener handed over by the previous agent, else a fresh one.
    let mut listeners = Vec::new();
    let mut listen_or_inherit = |addr: SocketAddr| -> std::io::Result<tokio::net::TcpListener> {
        let l = match ctx.inherited.take(net.netns().map(|n| n.cookie()), addr) {
            Some(l) => tokio::net::TcpListener::from_std(l)?,
            None => net.listen(addr)?,
        };
        listeners.push(std::os::fd::AsFd::as_fd(&l).try_clone_to_owned()?);
        Ok(l)
    };
    let mut listen = |addr: SocketAddr| {
        listen_or_inherit(addr).map_err(|source| AgentError::Bind { addr, source })
    };
    let src_ip = ips[0];
    // Aborted if enrollment fails half-way: a listener task left running
    // would keep its port and make every retry fail.
    let mut tasks = AbortOnDrop(Vec::new());
    let mut inbound_fds = Vec::new();
    match &net {
        PodNet::Host => {
            for &ip in ips {
                let out = listen(SocketAddr::new(ip, ctx.cfg.outbound_port))?;
                let hbone = listen(SocketAddr::new(ip, ctx.cfg.hbone_port))?;
                tasks.spawn(outbound::serve(out, ctx.clone(), ip, None));
                tasks.spawn(inbound::serve(hbone, ctx.clone()));
            }
        }
        PodNet::Netns { ns, .. } => {
            use std::os::fd::AsFd;
            // Outbound capture listeners on both loopbacks: a pod may dial
            // IPv6 even when the model lists only its IPv4 address (the
            // IPv6 one is skipped when the namespace has no IPv6).
            let v4_lo = SocketAddr::new(IpAddr::from([127, 0, 0, 1]), ctx.cfg.outbound_port);
            let v6_lo = SocketAddr::new(
                IpAddr::from([0, 0, 0, 0, 0, 0, 0, 1u16]),
                ctx.cfg.outbound_port,
            );
            let origin = |ip| net.origin(ip, ctx.cfg.mark);
            tasks.spawn(outbound::serve(
                listen(v4_lo)?,
                ctx.clone(),
                src_ip,
                origin(src_ip),
            ));
            match listen(v6_lo) {
                Ok(out6) => {
                    let src6 = ips.iter().copied().find(IpAddr::is_ipv6).unwrap_or(src_ip);
                    tasks.spawn(outbound::serve(out6, ctx.clone(), src6, origin(src6)));
                }
                Err(e) => tracing::debug!(error = %e, "no IPv6 outbound listener in this pod"),
            }
            // HBONE and inbound plaintext per address family in use; the
            // IPv6 sockets are v6-only so both families share a port.
            for v4 in [true, false] {
                if !ips.iter().any(|ip| ip.is_ipv4() == v4) {
                    continue;
                }
                let any: IpAddr = if v4 {
                    IpAddr::from([0, 0, 0, 0])
                } else {
                    IpAddr::from([0u16; 8])
                };
                let hbone = listen(SocketAddr::new(any, ctx.cfg.hbone_port))?;
                let plain_addr = SocketAddr::new(any, ctx.cfg.inbound_port);
                let plain = listen(plain_addr)?;
                for ip in ips.iter().filter(|ip| ip.is_ipv4() == v4) {
                    let fd =
                        plain
                            .as_fd()
                            .try_clone_to_owned()
                            .map_err(|source| AgentError::Bind {
                                addr: plain_addr,
                                source,
                            })?;
                    inbound_fds.push((*ip, fd));
                }
                tasks.spawn(inbound::serve(hbone, ctx.clone()));
                tasks.spawn(inbound::serve_plaintext(plain, ctx.clone()));
            }
            // Redirect only once every listener is up.
            if let Some(c) = &ctx.capture {
                let inbound: Vec<_> = inbound_fds
                    .iter()
                    .map(|(ip, fd)| (*ip, fd.as_fd()))
                    .collect();
                c.enroll(ns, &inbound)?;
            }
        }
    }
    Ok(LocalWorkload {
        ips: ips.to_vec(),
        identity: identity.clone(),
        netns: netns.map(str::to_string),
        net,
        inbound_fds,
        listeners,
        _tasks: tasks,
    })
}

/// Tasks aborted when dropped.
struct AbortOnDrop(Vec<JoinHandle<()>>);

impl AbortOnDrop {
    fn spawn(&mut self, f: impl std::future::Future<Output = ()> + Send + 'static) {
        self.0.push(tokio::spawn(f));
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}
