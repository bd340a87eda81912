//! The agent's configuration: one struct, built once from flags and
//! environment variables (see `main.rs`) or directly by tests.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use mesh_core::hbone::HboneSettings;

pub use mesh_core::identity::CaSource;

/// Everything the agent needs to run.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// This node's name in the mesh model.
    pub node: String,
    /// The local mesh file (embedded default mode).
    pub mesh_file: PathBuf,
    /// How often the mesh file is checked for changes.
    pub reload_interval: Duration,
    pub ca: CaSource,
    /// Lifetime of workload certificates.
    pub cert_ttl: Duration,
    /// Port of the per-pod outbound capture listener.
    pub outbound_port: u16,
    /// Port of the per-pod HBONE listener (and the port peers dial).
    pub hbone_port: u16,
    /// Port of the per-pod inbound plaintext listener (pods in their own
    /// network namespace only).
    pub inbound_port: u16,
    /// SO_MARK on the agent's sockets inside pods (never captured). Must
    /// not have [`sluice_ebpf_common::DELIVERY_MARK_BIT`] set.
    pub mark: u32,
    /// Where the host's `/proc/sys/net` is mounted: the agent sets
    /// `ipv4/tcp_fwmark_accept` there from inside each pod's namespace
    /// (transparent delivery, [`crate::delivery`]).
    pub net_sysctl_dir: PathBuf,
    /// How long an un-enrolled workload's listeners keep serving
    /// connections that were redirected just before.
    pub unenroll_grace: Duration,
    /// eBPF capture; `None` serves workloads without redirection.
    pub capture: Option<crate::capture::CaptureConfig>,
    /// Admin endpoint (config dump); keep it on localhost.
    pub admin_addr: SocketAddr,
    /// Prometheus metrics endpoint.
    pub metrics_addr: SocketAddr,
    /// Readiness endpoint.
    pub readiness_addr: SocketAddr,
    /// Timeout for connecting to an application or passthrough destination.
    pub connect_timeout: Duration,
    /// Time allowed for an inbound TLS handshake.
    pub handshake_timeout: Duration,
    pub hbone: HboneSettings,
    /// Bounds on connections and handshakes held at once.
    pub limits: crate::limits::ConnectionLimits,
    /// How long a graceful shutdown (SIGTERM) lets established connections
    /// finish before it cuts them.
    pub drain_period: Duration,
    /// Unix socket through which a successor takes this agent's listening
    /// sockets over (hot restart); `None`: no hand-over.
    pub handover_socket: Option<PathBuf>,
    /// What happens to connections to destinations outside the mesh
    /// (Istio's `outboundTrafficPolicy`).
    pub outbound_traffic_policy: OutboundTrafficPolicy,
    /// Watch a Kubernetes API server instead of reading `mesh_file`.
    pub kube: Option<KubeSource>,
    /// The chained CNI plugin that captures pods before they start (Kubernetes
    /// mode with capture).
    pub cni: Option<CniSettings>,
}

/// The chained CNI plugin (see [`crate::cni`]). Its paths are host paths,
/// mounted at the same places in the agent's container.
#[derive(Debug, Clone)]
pub struct CniSettings {
    /// The plugin's configuration: the agent's socket and cache, the
    /// namespaces never held up.
    pub plugin: crate::cni::PluginConfig,
    /// Where to install the plugin, and the binary to install; `None`:
    /// serve the socket only.
    pub install: Option<(crate::cni::install::Dirs, PathBuf)>,
}

/// Istio's `meshConfig.outboundTrafficPolicy.mode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OutboundTrafficPolicy {
    /// Destinations outside the mesh are passed through (Istio's default).
    #[default]
    AllowAny,
    /// Only destinations the mesh knows (workloads and service addresses)
    /// are reachable; anything else is refused (reset), counted as
    /// `reason="egress_blocked"` and logged.
    RegistryOnly,
}

/// Where the cluster is, in Kubernetes mode.
#[derive(Debug, Clone)]
pub struct KubeSource {
    pub cluster: mesh_core::source::Cluster,
    /// The host's /proc (pod network namespaces are found there).
    pub proc_root: PathBuf,
}

impl AgentConfig {
    /// Defaults for `node` reading `mesh_file`, with Istio's ports.
    pub fn new(node: &str, mesh_file: PathBuf) -> Self {
        Self {
            node: node.to_string(),
            mesh_file,
            reload_interval: Duration::from_secs(1),
            ca: CaSource::Ephemeral,
            cert_ttl: mesh_core::identity::ca::DEFAULT_WORKLOAD_TTL,
            outbound_port: 15001,
            hbone_port: mesh_core::hbone::HBONE_PORT,
            inbound_port: 15006,
            mark: 0x539,
            net_sysctl_dir: PathBuf::from("/proc/sys/net"),
            unenroll_grace: Duration::from_secs(2),
            capture: None,
            admin_addr: ([127, 0, 0, 1], 15000).into(),
            metrics_addr: ([0, 0, 0, 0], 15020).into(),
            readiness_addr: ([0, 0, 0, 0], 15021).into(),
            connect_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            hbone: HboneSettings::default(),
            limits: Default::default(),
            drain_period: Duration::from_secs(20),
            handover_socket: None,
            outbound_traffic_policy: OutboundTrafficPolicy::AllowAny,
            kube: None,
            cni: None,
        }
    }
}
