//! `sluice-waypoint`: the waypoint binary. Parses flags/environment into a
//! [`WaypointConfig`], sets up logging, and runs until SIGINT/SIGTERM.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use mesh_core::identity::CaSource;
use waypoint::WaypointConfig;

#[derive(Parser)]
#[command(
    name = "sluice-waypoint",
    version,
    about = "Sluice waypoint: L7 routing, resilience and policy for the services that use it"
)]
struct Cli {
    /// The waypoint's Gateway, as `namespace/name`.
    #[arg(long, env = "SLUICE_WAYPOINT")]
    waypoint: String,
    /// This waypoint pod's workload name (in the Gateway's namespace).
    #[arg(long, env = "SLUICE_WORKLOAD")]
    workload: String,
    /// The mesh file or the cluster.
    #[command(flatten)]
    source: mesh_core::source::SourceArgs,
    /// Root CA certificate and key (PEM), shared with the node agents.
    #[arg(
        long,
        env = "SLUICE_CA_CERT",
        requires = "ca_key",
        conflicts_with = "ca_address"
    )]
    ca_cert: Option<PathBuf>,
    #[arg(long, env = "SLUICE_CA_KEY", requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    #[command(flatten)]
    remote_ca: mesh_core::identity::caservice::RemoteCaArgs,
    /// HBONE listen addresses (default: the pod's IPs, port 15008).
    #[arg(long, env = "SLUICE_LISTEN", value_delimiter = ',')]
    listen: Vec<SocketAddr>,
    /// Metrics, readiness and config dump.
    #[arg(long, env = "SLUICE_ADMIN_ADDR", default_value = "127.0.0.1:15020")]
    admin_addr: SocketAddr,
    /// Connections and tunnels served at once; excess is refused.
    #[arg(long, env = "SLUICE_MAX_CONNECTIONS", default_value_t = 50_000)]
    max_connections: usize,
    /// TLS handshakes in progress at once; excess is refused.
    #[arg(long, env = "SLUICE_MAX_PENDING_HANDSHAKES", default_value_t = 1_024)]
    max_pending_handshakes: usize,
    /// On SIGTERM, how long requests in flight may finish before the
    /// waypoint exits (keep it below terminationGracePeriodSeconds).
    #[arg(long, env = "SLUICE_DRAIN_PERIOD", default_value = "20s", value_parser = humantime::parse_duration)]
    drain_period: std::time::Duration,
    /// OTLP/HTTP collector for request spans (`http://host:port`).
    #[arg(long, env = "SLUICE_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    #[arg(long, env = "SLUICE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(flatten)]
    runtime: mesh_core::runtime::RuntimeArgs,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if cli.log_format == LogFormat::Json {
        builder.json().init();
    } else {
        builder.init();
    }
    let (namespace, name) = cli
        .waypoint
        .split_once('/')
        .context("--waypoint must be namespace/name")?;
    let mut cfg = WaypointConfig::new(
        namespace,
        name,
        &cli.workload,
        cli.source.mesh_file.clone().unwrap_or_default(),
    );
    cfg.kube = cli.source.cluster();
    cfg.reload_interval = cli.source.reload_interval;
    let root = cli.remote_ca.ca_root_cert.clone();
    // A waypoint obtains its own identity (no impersonation).
    if let Some(remote) = cli.remote_ca.remote(false) {
        cfg.ca = CaSource::Remote(remote);
    } else if let (Some(cert), Some(key)) = (cli.ca_cert, cli.ca_key) {
        cfg.ca = CaSource::Files {
            cert,
            key,
            generate: false,
        };
    }
    if !cli.listen.is_empty() {
        cfg.listen = Some(cli.listen);
    }
    cfg.admin_addr = cli.admin_addr;
    cfg.otlp_endpoint = cli.otlp_endpoint;
    cfg.limits = mesh_core::limits::ConnectionLimits {
        max_connections: cli.max_connections,
        max_pending_handshakes: cli.max_pending_handshakes,
    };
    cfg.drain_period = cli.drain_period;
    let drain_period = cfg.drain_period;
    let rt = cli.runtime.build().context("starting the runtime")?;
    rt.block_on(async move {
        let wp = waypoint::start(cfg).await?;
        tracing::info!(hbone = ?wp.hbone_addrs, admin = %wp.admin_addr, "waypoint ready");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        use mesh_core::identity::caservice::{root_changed, ROOT_POLL};
        let root_changed = root_changed(root, ROOT_POLL);
        let restart = tokio::select! {
            _ = tokio::signal::ctrl_c() => false,
            _ = term.recv() => false,
            _ = root_changed => true,
        };
        // Drain; a second signal cuts it short.
        tokio::select! {
            left = wp.drain(drain_period) => {
                if left > 0 {
                    tracing::warn!(left, "drain period over; cutting the remaining connections");
                }
            }
            _ = tokio::signal::ctrl_c() => tracing::warn!("second signal: exiting without draining"),
            _ = term.recv() => tracing::warn!("second signal: exiting without draining"),
        }
        drop(wp);
        if restart {
            anyhow::bail!("the mesh root changed");
        }
        Ok(())
    })
}
