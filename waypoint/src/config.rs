//! What a waypoint is told at start ([`WaypointConfig`]) and why it may
//! refuse to start ([`WaypointError`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use mesh_core::hbone::HboneSettings;
use mesh_core::identity::CaSource;
use mesh_core::model::ModelError;

/// Everything a waypoint needs to run.
#[derive(Debug, Clone)]
pub struct WaypointConfig {
    /// The Gateway this process serves.
    pub namespace: String,
    pub name: String,
    /// The waypoint pod this process is (its identity, addresses, node).
    pub workload: String,
    pub mesh_file: PathBuf,
    pub reload_interval: Duration,
    pub ca: CaSource,
    pub cert_ttl: Duration,
    /// Where HBONE is served; default: the pod's addresses on 15008.
    pub listen: Option<Vec<SocketAddr>>,
    /// Metrics (`/stats/prometheus`), readiness (`/healthz/ready`) and
    /// `/config_dump`.
    pub admin_addr: SocketAddr,
    pub hbone: HboneSettings,
    pub handshake_timeout: Duration,
    /// Time a client has to send a request's headers (slowloris guard).
    /// HTTP/1.1 counts the idle time before a keep-alive request too, so
    /// this is also how long an idle client connection is kept.
    pub header_timeout: Duration,
    /// Largest request header block accepted.
    pub max_header_bytes: usize,
    /// Bounds on connections, tunnels and pending handshakes.
    pub limits: mesh_core::limits::ConnectionLimits,
    /// OTLP/HTTP collector (`http://host:port`) for request spans.
    pub otlp_endpoint: Option<String>,
    /// Watch a Kubernetes API server instead of `mesh_file`.
    pub kube: Option<mesh_core::source::Cluster>,
    /// How long a graceful shutdown lets requests in flight finish.
    pub drain_period: Duration,
}

impl WaypointConfig {
    pub fn new(namespace: &str, name: &str, workload: &str, mesh_file: PathBuf) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            workload: workload.into(),
            mesh_file,
            reload_interval: Duration::from_secs(1),
            ca: CaSource::Ephemeral,
            cert_ttl: Duration::from_secs(24 * 3600),
            listen: None,
            admin_addr: "127.0.0.1:15020".parse().expect("static address"),
            hbone: HboneSettings::default(),
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(30),
            max_header_bytes: 64 * 1024,
            limits: Default::default(),
            otlp_endpoint: None,
            kube: None,
            drain_period: Duration::from_secs(20),
        }
    }
}

/// Why a waypoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum WaypointError {
    #[error("mesh file rejected: {0}")]
    Model(#[from] ModelError),
    #[error("waypoint {0} is not a Gateway of class istio-waypoint in the mesh file")]
    UnknownGateway(String),
    #[error(
        "workload {0} is not a pod of this waypoint (label gateway.networking.k8s.io/gateway-name)"
    )]
    UnknownWorkload(String),
    #[error("certificate authority: {0}")]
    Ca(#[from] mesh_core::identity::CaError),
    #[error("certificates: {0}")]
    Certs(#[from] mesh_core::identity::certs::CertError),
    #[error("Kubernetes: {0}")]
    Kube(#[from] mesh_core::kube::KubeError),
    #[error("tracing: {0}")]
    Otlp(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

impl From<mesh_core::source::SourceError> for WaypointError {
    fn from(e: mesh_core::source::SourceError) -> Self {
        match e {
            mesh_core::source::SourceError::Model(e) => WaypointError::Model(e),
            mesh_core::source::SourceError::Kube(e) => WaypointError::Kube(e),
        }
    }
}
