//! The agent's shared state ([`Ctx`]), what every stage reads, and why the
//! agent could not start ([`AgentError`]).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use mesh_core::hbone::HboneConnector;
use mesh_core::identity::CertificateStore;
use mesh_core::model::{MeshModel, ModelError};
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::config::AgentConfig;
use crate::enrollment::LocalWorkload;
use crate::orig_dst::OriginalDestination;
use crate::telemetry::AgentMetrics;
use crate::{authz, capture, cni, handover, limits, lock, podnet};

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

impl From<mesh_core::source::SourceError> for AgentError {
    fn from(e: mesh_core::source::SourceError) -> Self {
        match e {
            mesh_core::source::SourceError::Model(e) => AgentError::Model(e),
            mesh_core::source::SourceError::Kube(e) => AgentError::Kube(e),
        }
    }
}

/// State shared by every task of the agent.
pub struct Ctx {
    pub cfg: AgentConfig,
    pub(crate) model: watch::Receiver<Arc<MeshModel>>,
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
    pub(crate) local: Mutex<HashMap<(String, String), LocalWorkload>>,
    /// Live inbound connections, re-checked against policy on model changes.
    pub live: authz::LiveConnections,
    /// Workloads no longer enrolled whose listeners stay open until the
    /// deadline, so connections redirected just before un-enrollment are
    /// still served (and a quick re-enrollment reuses them).
    pub(crate) draining: Mutex<HashMap<(String, String), (LocalWorkload, std::time::Instant)>>,
    /// Connection and handshake slots (see [`limits`]).
    pub limiter: limits::Limiter,
    /// Set when the agent drains for shutdown: HBONE connections send a
    /// GOAWAY and readiness turns false.
    pub(crate) shutdown: mesh_core::shutdown::Shutdown,
    /// Set when a successor took this agent's listeners over (hot restart):
    /// it drains too, but serves whatever still reaches it, because the
    /// successor is there to take the rest.
    pub(crate) handed_over: watch::Sender<bool>,
    /// Listening sockets received from the previous agent, until adopted.
    pub(crate) inherited: handover::Inherited,
    /// Duplicates of the agent's own listeners (admin, metrics, readiness)
    /// for a successor.
    pub(crate) host_listeners: Vec<std::os::fd::OwnedFd>,
    /// Where a successor asks for this agent's sockets.
    pub(crate) handover_server: Mutex<Option<handover::HandoverServer>>,
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
    /// ([`crate::delivery`]), to clean up once an uninstall has drained (the
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
        self.shutdown.has_begun()
    }

    /// Completes when a graceful shutdown begins.
    pub fn shutdown_begun(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.shutdown.begun()
    }

    /// Whether work that reaches the agent now is refused: during a drain
    /// for shutdown, yes (nobody else serves the node: fail closed, and the
    /// drain ends sooner); after a hand-over, no — it is served here, as the
    /// successor serves what it takes from the same sockets.
    pub fn refuses_new_work(&self) -> bool {
        self.is_shutting_down() && !*self.handed_over.borrow()
    }

    /// Duplicates of every listener this agent serves, for a successor.
    pub(crate) fn listeners_for_successor(&self) -> Vec<std::os::fd::OwnedFd> {
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
