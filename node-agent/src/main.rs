//! `sluice-agent`: the node agent binary. Parses flags/environment into an
//! [`AgentConfig`], sets up logging, and runs until SIGINT/SIGTERM. Also
//! `ca init` (create a root for local mode), `ca serve` (the certificate
//! service on a cluster) and `check` (validate a mesh
//! file without running anything).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use node_agent::orig_dst::{Chain, SoOriginalDst};
use node_agent::{AgentConfig, CaSource};

#[derive(Parser)]
#[command(
    name = "sluice-agent",
    version,
    about = "Sluice node agent: sidecar-less mTLS for the pods of this node"
)]
struct Cli {
    /// Log format.
    #[arg(long, env = "SLUICE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent.
    Run(Box<RunArgs>),
    /// Certificate authority utilities.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Remove a node's eBPF capture (pinned programs, links and maps), as
    /// an agent does when its DaemonSet is deleted — for nodes where no
    /// agent could (Sluice removed while the node was down, say). Pods of
    /// the node talk directly again, in plaintext.
    Cleanup {
        /// The node whose capture to remove.
        #[arg(long, env = "SLUICE_NODE")]
        node: String,
        /// bpffs directory of the capture (default: /sys/fs/bpf/sluice/<node>).
        #[arg(long, env = "SLUICE_BPFFS_DIR")]
        bpffs_dir: Option<PathBuf>,
    },
    /// Mount bpffs at a directory unless one is there (the DaemonSet's
    /// init container: with the host's /sys/fs/bpf mounted Bidirectional,
    /// the pins then live on the host and outlive agent restarts).
    MountBpffs {
        #[arg(default_value = "/sys/fs/bpf")]
        dir: PathBuf,
    },
    /// Validate a mesh file and print what it contains.
    Check {
        /// The mesh file.
        #[arg(env = "SLUICE_MESH_FILE")]
        mesh_file: PathBuf,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Generate a root certificate and key for local mode.
    Init {
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        #[arg(long)]
        cert: PathBuf,
        #[arg(long)]
        key: PathBuf,
    },
    /// Run the certificate service on a cluster (the CA Deployment): signs
    /// workload certificates for callers authenticated by service-account
    /// tokens; node agents only for pods on their own node.
    Serve(Box<ServeArgs>),
}

#[derive(clap::Args)]
struct ServeArgs {
    #[arg(long, env = "SLUICE_CA_LISTEN", default_value = "0.0.0.0:15012")]
    listen: SocketAddr,
    /// The CA's namespace: its root Secret and ConfigMap live there.
    #[arg(long, env = "POD_NAMESPACE", default_value = "sluice-system")]
    namespace: String,
    #[arg(long, env = "SLUICE_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// Secret holding the root (`ca.crt`, `ca.key`); created if absent.
    #[arg(long, default_value = "sluice-ca")]
    secret: String,
    /// ConfigMap the root certificate is published in (`root-cert.pem`).
    #[arg(long, default_value = "sluice-ca-root")]
    root_configmap: String,
    /// DNS names of the service's TLS certificate (default:
    /// `sluice-ca.<namespace>.svc` and its `.cluster.local` form).
    #[arg(long = "dns-name")]
    dns_names: Vec<String>,
    /// Audience callers' tokens must carry.
    #[arg(long = "audience", default_value = "sluice-ca")]
    audiences: Vec<String>,
    /// Service accounts of node agents (`namespace/name`), which may
    /// obtain identities of pods on their own node.
    #[arg(long = "node-agent", default_value = "sluice-system/sluice-agent")]
    node_agents: Vec<String>,
    /// Longest certificate lifetime granted.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    max_cert_ttl: Duration,
    /// Kubeconfig (default: in-cluster, or $KUBECONFIG).
    #[arg(long, env = "SLUICE_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
}

#[derive(clap::Args)]
struct RunArgs {
    /// This node's name in the mesh file.
    #[arg(long, env = "SLUICE_NODE")]
    node: String,
    /// The mesh file or the cluster.
    #[command(flatten)]
    source: mesh_core::source::SourceArgs,
    /// The agent's own pod (`namespace/name`, from the downward API) in
    /// Kubernetes mode: when the DaemonSet owning it or its namespace is
    /// deleted, stopping removes the node's capture (an uninstall);
    /// otherwise the capture stays pinned (fail closed) for the next agent.
    #[arg(long, env = "SLUICE_POD")]
    pod: Option<String>,
    /// The host's /proc in Kubernetes mode (pod network namespaces are
    /// found there; e.g. `/host/proc` when mounted into the agent's pod).
    #[arg(long, env = "SLUICE_PROC_ROOT", default_value = "/proc")]
    proc_root: PathBuf,
    /// Root CA certificate (PEM). Without it an ephemeral root is used,
    /// which only this agent trusts.
    #[arg(
        long,
        env = "SLUICE_CA_CERT",
        requires = "ca_key",
        conflicts_with = "ca_address"
    )]
    ca_cert: Option<PathBuf>,
    /// Root CA key (PEM).
    #[arg(long, env = "SLUICE_CA_KEY", requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    #[command(flatten)]
    remote_ca: mesh_core::identity::caservice::RemoteCaArgs,
    /// Create the root CA files if they do not exist.
    #[arg(long, env = "SLUICE_CA_GENERATE")]
    ca_generate: bool,
    /// Lifetime of workload certificates.
    #[arg(long, env = "SLUICE_CERT_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    cert_ttl: Duration,
    #[arg(long, env = "SLUICE_OUTBOUND_PORT", default_value_t = 15001)]
    outbound_port: u16,
    #[arg(long, env = "SLUICE_HBONE_PORT", default_value_t = 15008)]
    hbone_port: u16,
    #[arg(long, env = "SLUICE_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,
    #[arg(long, env = "SLUICE_METRICS_ADDR", default_value = "0.0.0.0:15020")]
    metrics_addr: SocketAddr,
    #[arg(long, env = "SLUICE_READINESS_ADDR", default_value = "0.0.0.0:15021")]
    readiness_addr: SocketAddr,
    /// Connections and tunnels served at once; excess is refused (reset).
    #[arg(long, env = "SLUICE_MAX_CONNECTIONS", default_value_t = 50_000)]
    max_connections: usize,
    /// Inbound TLS handshakes in progress at once; excess is refused.
    #[arg(long, env = "SLUICE_MAX_PENDING_HANDSHAKES", default_value_t = 1_024)]
    max_pending_handshakes: usize,
    /// On SIGTERM, how long established connections may run on before the
    /// agent exits (keep it below the pod's terminationGracePeriodSeconds).
    #[arg(long, env = "SLUICE_DRAIN_PERIOD", default_value = "20s", value_parser = humantime::parse_duration)]
    drain_period: Duration,
    /// Unix socket for hot restart: a new agent takes the running agent's
    /// listening sockets through it, then the old one drains and exits
    /// (default: /run/sluice/<node>/handover.sock; `none` turns it off).
    #[arg(long, env = "SLUICE_HANDOVER_SOCKET")]
    handover_socket: Option<PathBuf>,
    /// Destinations outside the mesh: passed through (`allow-any`, Istio's
    /// default) or refused (`registry-only`).
    #[arg(long, env = "SLUICE_OUTBOUND_TRAFFIC_POLICY", value_enum, default_value_t = Egress::AllowAny)]
    outbound_traffic_policy: Egress,
    /// How pods' traffic is captured: `ebpf` loads the capture programs;
    /// `none` only serves (for tests and loopback demos).
    #[arg(long, env = "SLUICE_CAPTURE", value_enum, default_value_t = Capture::None)]
    capture: Capture,
    /// The compiled eBPF object (`cargo xtask build-ebpf` writes it).
    #[arg(long, env = "SLUICE_EBPF_OBJECT", default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/ebpf/sluice-ebpf.o"))]
    ebpf_object: PathBuf,
    /// bpffs directory for this agent's pinned maps and links
    /// (default: /sys/fs/bpf/sluice/<node>).
    #[arg(long, env = "SLUICE_BPFFS_DIR")]
    bpffs_dir: Option<PathBuf>,
    /// cgroup2 directory to attach the socket programs to (default: the
    /// cgroup2 root).
    #[arg(long, env = "SLUICE_CGROUP")]
    cgroup: Option<PathBuf>,
    /// The node's own network namespace. Its connections to pods — the
    /// kubelet's health probes, host-network pods — reach them directly,
    /// as in Istio, and it is never enrolled (default in Kubernetes mode:
    /// the kubelet's, found in `<proc-root>`, else PID 1's; `none`: capture
    /// them too).
    #[arg(long, env = "SLUICE_HOST_NETNS")]
    host_netns: Option<PathBuf>,
    /// Serve the chained CNI plugin on this Unix socket (a host path, the
    /// same inside the agent's container), so pods are captured before
    /// their containers start and wait while no agent runs (Kubernetes
    /// mode with eBPF capture).
    #[arg(long, env = "SLUICE_CNI_SOCKET")]
    cni_socket: Option<PathBuf>,
    /// Where the agent leaves what the plugin needs while the agent is
    /// away (default: next to the socket).
    #[arg(long, env = "SLUICE_CNI_CACHE")]
    cni_cache: Option<PathBuf>,
    /// The node's CNI binary directory: install the plugin there (with
    /// `--cni-conf-dir`) and remove it on uninstall.
    #[arg(long, env = "SLUICE_CNI_BIN_DIR", requires = "cni_conf_dir")]
    cni_bin_dir: Option<PathBuf>,
    /// The node's CNI configuration directory: the plugin is appended to
    /// its primary network configuration.
    #[arg(long, env = "SLUICE_CNI_CONF_DIR", requires = "cni_bin_dir")]
    cni_conf_dir: Option<PathBuf>,
    /// The plugin binary to install.
    #[arg(
        long,
        env = "SLUICE_CNI_PLUGIN",
        default_value = "/usr/lib/sluice/sluice-cni"
    )]
    cni_plugin: PathBuf,
    /// Namespaces whose pods never wait for the agent (the agent's own is
    /// always among them).
    #[arg(long = "cni-exclude-namespace", default_values = ["kube-system"])]
    cni_exclude_namespaces: Vec<String>,
    /// The host's `/proc/sys/net`, writable: the agent sets a pod's
    /// `net.ipv4.tcp_fwmark_accept` from inside its namespace, so
    /// applications see their clients' addresses (e.g. `/host/proc-sys-net`
    /// when mounted into the agent's pod; read-only, they see 127.0.0.6).
    #[arg(long, env = "SLUICE_NET_SYSCTL_DIR", default_value = "/proc/sys/net")]
    net_sysctl_dir: PathBuf,
    #[command(flatten)]
    runtime: mesh_core::runtime::RuntimeArgs,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Egress {
    AllowAny,
    RegistryOnly,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Capture {
    Ebpf,
    None,
}

/// Where a node's capture is pinned unless `--bpffs-dir` says otherwise.
fn default_pin_dir(node: &str) -> PathBuf {
    PathBuf::from("/sys/fs/bpf/sluice").join(node)
}

/// The cgroup2 mount: `/sys/fs/cgroup` on unified hosts, the `unified`
/// subdirectory on hybrid ones.
fn cgroup2_root() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
        })
        .min_by_key(|p| p.as_os_str().len())
        .unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup"))
}

fn init_logging(format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Run(args) => run(*args),
        Command::Ca {
            command:
                CaCommand::Init {
                    trust_domain,
                    cert,
                    key,
                },
        } => {
            let ca = mesh_core::identity::CertificateAuthority::generate(&trust_domain)?;
            ca.save(&cert, &key)?;
            println!("wrote {} and {}", cert.display(), key.display());
            Ok(())
        }
        Command::Ca {
            command: CaCommand::Serve(a),
        } => serve_ca(*a),
        Command::MountBpffs { dir } => {
            if node_agent::capture::mount_bpffs(&dir)? {
                println!("mounted bpffs at {}", dir.display());
            } else {
                println!("bpffs already mounted at {}", dir.display());
            }
            Ok(())
        }
        Command::Cleanup { node, bpffs_dir } => {
            let dir = bpffs_dir.unwrap_or_else(|| default_pin_dir(&node));
            let n = node_agent::capture::remove_pins(&dir)
                .with_context(|| format!("removing {}", dir.display()))?;
            println!(
                "{}: {n} pins removed; capture is off on node {node}",
                dir.display()
            );
            Ok(())
        }
        Command::Check { mesh_file } => {
            let m = mesh_core::model::MeshModel::load(&mesh_file)?;
            println!(
                "{}: ok — trust domain {}, {} nodes, {} workloads, {} services, {} authorization policies, {} peer authentications",
                mesh_file.display(),
                m.trust_domain,
                m.nodes.len(),
                m.workloads.len(),
                m.services.len(),
                m.authorization_policies.len(),
                m.peer_authentications.len()
            );
            Ok(())
        }
    }
}

fn run(a: RunArgs) -> anyhow::Result<()> {
    let own_pod = match (&a.pod, a.source.kube) {
        (Some(p), true) => Some(
            p.split_once('/')
                .map(|(ns, n)| (ns.to_string(), n.to_string()))
                .with_context(|| format!("--pod {p:?}: expected namespace/name"))?,
        ),
        _ => None,
    };
    let kubeconfig = a.source.kubeconfig.clone();
    let mut cfg = AgentConfig::new(&a.node, a.source.mesh_file.clone().unwrap_or_default());
    cfg.kube = a.source.cluster().map(|cluster| node_agent::KubeSource {
        cluster,
        proc_root: a.proc_root,
    });
    cfg.reload_interval = a.source.reload_interval;
    cfg.net_sysctl_dir = a.net_sysctl_dir;
    let root = a.remote_ca.ca_root_cert.clone();
    // The agent asks for each local workload's identity on its behalf.
    cfg.ca = match (a.remote_ca.remote(true), a.ca_cert, a.ca_key) {
        (Some(remote), _, _) => CaSource::Remote(remote),
        (None, Some(cert), Some(key)) => CaSource::Files {
            cert,
            key,
            generate: a.ca_generate,
        },
        _ => CaSource::Ephemeral,
    };
    cfg.cert_ttl = a.cert_ttl;
    cfg.outbound_port = a.outbound_port;
    cfg.hbone_port = a.hbone_port;
    cfg.admin_addr = a.admin_addr;
    cfg.metrics_addr = a.metrics_addr;
    cfg.readiness_addr = a.readiness_addr;
    cfg.limits = node_agent::limits::ConnectionLimits {
        max_connections: a.max_connections,
        max_pending_handshakes: a.max_pending_handshakes,
    };
    cfg.drain_period = a.drain_period;
    cfg.outbound_traffic_policy = match a.outbound_traffic_policy {
        Egress::AllowAny => node_agent::OutboundTrafficPolicy::AllowAny,
        Egress::RegistryOnly => node_agent::OutboundTrafficPolicy::RegistryOnly,
    };
    cfg.handover_socket = match a.handover_socket {
        Some(p) if p.as_os_str() == "none" => None,
        Some(p) => Some(p),
        None => Some(
            PathBuf::from("/run/sluice")
                .join(&a.node)
                .join("handover.sock"),
        ),
    };
    if let Some(socket) = a.cni_socket {
        anyhow::ensure!(
            a.source.kube && a.capture == Capture::Ebpf,
            "--cni-socket needs --kube and --capture=ebpf"
        );
        let mut exclude = a.cni_exclude_namespaces;
        if let Some((ns, _)) = &own_pod {
            exclude.push(ns.clone());
        }
        exclude.sort();
        exclude.dedup();
        cfg.cni = Some(node_agent::config::CniSettings {
            plugin: node_agent::cni::PluginConfig {
                cache: a
                    .cni_cache
                    .unwrap_or_else(|| socket.with_file_name("cni-cache.json")),
                socket,
                exclude_namespaces: exclude,
            },
            install: match (a.cni_bin_dir, a.cni_conf_dir) {
                (Some(bin), Some(conf)) => {
                    Some((node_agent::cni::install::Dirs { bin, conf }, a.cni_plugin))
                }
                _ => None,
            },
        });
    }
    if a.capture == Capture::Ebpf {
        cfg.capture = Some(node_agent::capture::CaptureConfig {
            object: a.ebpf_object,
            pin_dir: a.bpffs_dir.unwrap_or_else(|| default_pin_dir(&a.node)),
            cgroup: a.cgroup.unwrap_or_else(cgroup2_root),
            mark: cfg.mark,
            outbound_port: cfg.outbound_port,
            inbound_port: cfg.inbound_port,
            hbone_port: cfg.hbone_port,
            host_netns: match a.host_netns {
                Some(p) if p.as_os_str() == "none" => None,
                Some(p) => Some(p),
                None => cfg.kube.as_ref().and_then(|k| {
                    let found = node_agent::podns::find_node_netns(&k.proc_root);
                    if found.is_none() {
                        tracing::warn!(proc_root = %k.proc_root.display(), "the node's network namespace (the kubelet's, or PID 1's) cannot be opened: the kubelet's probes of enrolled pods are captured like any plaintext (STRICT mTLS refuses them)");
                    }
                    found
                }),
            },
        });
    }
    let rt = a.runtime.build().context("starting the runtime")?;
    rt.block_on(async move {
        let orig_dst = Arc::new(Chain(vec![Box::new(SoOriginalDst)]));
        let agent = node_agent::start(cfg, orig_dst).await?;
        tracing::info!(
            node = %agent.ctx.cfg.node,
            admin = %agent.admin_addr,
            metrics = %agent.metrics_addr,
            readiness = %agent.readiness_addr,
            "agent started"
        );
        let removal = match own_pod {
            Some((ns, pod)) => Some(node_agent::uninstall::follow(
                node_agent::kube_client(kubeconfig.as_deref()).await?,
                ns,
                pod,
            )),
            None => None,
        };
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        use mesh_core::identity::caservice::{root_changed, ROOT_POLL};
        let root_changed = root_changed(root, ROOT_POLL);
        let mut restart = false;
        let handed_over = tokio::select! {
            _ = tokio::signal::ctrl_c() => false,
            _ = term.recv() => false,
            _ = root_changed => {
                restart = true;
                false
            }
            _ = agent.handed_over() => {
                tracing::info!("a successor took over; draining");
                true
            }
        };
        // Stopping for good: new connections go direct at once, the
        // established ones drain through this agent.
        let removing = !handed_over && removal.is_some_and(|r| r.removing());
        // The pods whose routing goes once their connections have drained.
        let delivered = if removing {
            agent.ctx.delivery_namespaces()
        } else {
            Vec::new()
        };
        if removing {
            // The plugin first: pods created from now on start directly.
            agent.ctx.remove_cni();
            if let Some(c) = &agent.ctx.capture {
                c.uninstall();
            }
        }
        // Drain. A signal during it cuts it short — except, after a
        // hand-over, the first one: that is the old pod being deleted, which
        // only means "exit once drained".
        let period = agent.ctx.cfg.drain_period;
        let drain = agent.drain(period);
        tokio::pin!(drain);
        let mut patience = if handed_over { 2 } else { 1 };
        let mut terminated = false;
        loop {
            tokio::select! {
                left = &mut drain => {
                    if left > 0 {
                        tracing::warn!(left, "drain period over; cutting the remaining connections");
                    }
                    break;
                }
                _ = async { tokio::select! { _ = tokio::signal::ctrl_c() => {}, _ = term.recv() => {} } } => {
                    patience -= 1;
                    if patience == 0 {
                        tracing::warn!("signal during the drain: exiting without draining");
                        node_agent::delivery::remove_all(&delivered);
                        return Ok(());
                    }
                    terminated = true;
                    tracing::info!("terminating once drained");
                }
            }
        }
        // The drained connections needed the pods' delivery routing.
        node_agent::delivery::remove_all(&delivered);
        // A handed-over agent that exits on its own would be restarted in
        // its old pod and take the sockets back: it idles until the pod is
        // deleted.
        if handed_over && !terminated {
            tracing::info!("handed over and drained; idle until terminated");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        if restart {
            // Capture stays pinned: pods fail closed until the restart.
            anyhow::bail!("the mesh root changed");
        }
        Ok(())
    })
}

fn serve_ca(a: ServeArgs) -> anyhow::Result<()> {
    let dns_names = if a.dns_names.is_empty() {
        vec![
            format!("sluice-ca.{}.svc", a.namespace),
            format!("sluice-ca.{}.svc.cluster.local", a.namespace),
        ]
    } else {
        a.dns_names
    };
    let cfg = mesh_core::kube::ca::CaServerConfig {
        namespace: a.namespace,
        trust_domain: a.trust_domain,
        listen: a.listen,
        secret: a.secret,
        root_configmap: a.root_configmap,
        dns_names,
        audiences: a.audiences,
        node_agents: a.node_agents,
        max_ttl: a.max_cert_ttl,
    };
    let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
    rt.block_on(async move {
        let client = mesh_core::kube::client(a.kubeconfig.as_deref()).await?;
        let server = mesh_core::kube::ca::start(client, &cfg).await?;
        tracing::info!(addr = %server.addr, "certificate service ready");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        Ok(())
    })
}
