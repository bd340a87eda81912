//! Where a proxy's mesh model comes from, for both binaries: the mesh file
//! (the embedded default; polled, a bad edit never replaces a good model)
//! or the Kubernetes API (watched; the first model is complete before
//! anything is served). One set of flags ([`SourceArgs`], with the `cli`
//! feature), one start-up ([`follow`]) and one report of applied, rejected
//! and partial updates ([`Report`]), so the node agent and the waypoint
//! cannot drift apart in how they learn the mesh.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use crate::kube::translate::Rejected;
use crate::kube::watch::{NetnsResolver, WatchReport};
use crate::kube::KubeError;
use crate::metrics::{PolicyMetrics, ResultLabels};
use crate::model::{FieldError, MeshModel, ModelError};

/// The cluster to watch, in Kubernetes mode.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// A kubeconfig file; `None`: the in-cluster service account (or
    /// `$KUBECONFIG`).
    pub kubeconfig: Option<PathBuf>,
    pub trust_domain: String,
    /// Istio's root namespace (mesh-wide policies).
    pub root_namespace: String,
}

/// The model source flags both binaries take.
#[cfg(feature = "cli")]
#[derive(Debug, Clone, clap::Args)]
pub struct SourceArgs {
    /// The local mesh file (the embedded default mode).
    #[arg(long, env = "SLUICE_MESH_FILE", required_unless_present = "kube")]
    pub mesh_file: Option<PathBuf>,
    /// Watch the Kubernetes API server instead of a mesh file.
    #[arg(long, env = "SLUICE_KUBE")]
    pub kube: bool,
    /// Kubeconfig for `--kube` (default: in-cluster, or $KUBECONFIG).
    #[arg(long, env = "SLUICE_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Trust domain of workload identities in Kubernetes mode.
    #[arg(long, env = "SLUICE_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// Istio's root namespace (mesh-wide policies) in Kubernetes mode.
    #[arg(long, env = "SLUICE_ROOT_NAMESPACE", default_value = "istio-system")]
    pub root_namespace: String,
    /// How often to check the mesh file for changes.
    #[arg(long, env = "SLUICE_RELOAD_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub reload_interval: Duration,
}

#[cfg(feature = "cli")]
impl SourceArgs {
    /// The cluster, with `--kube`.
    pub fn cluster(&self) -> Option<Cluster> {
        self.kube.then(|| Cluster {
            kubeconfig: self.kubeconfig.clone(),
            trust_domain: self.trust_domain.clone(),
            root_namespace: self.root_namespace.clone(),
        })
    }
}

/// Counts model updates in `sluice_config_updates_total{result}` —
/// `applied` and `rejected` mesh files, `applied` and `partial` cluster
/// models — and rejected cluster objects in
/// `sluice_config_rejected_objects{kind}`.
pub struct Report {
    pub updates: prometheus_client::metrics::family::Family<
        ResultLabels,
        prometheus_client::metrics::counter::Counter,
    >,
    pub policy: PolicyMetrics,
}

impl Report {
    fn count(&self, result: &'static str) {
        self.updates.get_or_create(&ResultLabels { result }).inc();
    }
}

impl WatchReport for Report {
    fn applied(&self, model: &MeshModel) {
        tracing::info!(
            workloads = model.workloads.len(),
            services = model.services.len(),
            routes = model.http_routes.len(),
            "mesh model updated from the cluster"
        );
        self.count("applied");
    }

    fn rejected(&self, now: &[Rejected]) {
        self.policy.set_rejected(now.iter().map(|r| r.kind));
        if !now.is_empty() {
            self.count("partial");
        }
    }
}

/// A caller's veto on a changed mesh file, naming the field.
pub type FileCheck = Box<dyn Fn(&MeshModel) -> Result<(), FieldError> + Send + Sync>;

/// A veto on mesh files in which `present` no longer holds: the file is
/// refused at `field`, saying `missing` (e.g. the proxy's own node).
pub fn require(
    field: &'static str,
    missing: String,
    present: impl Fn(&MeshModel) -> bool + Send + Sync + 'static,
) -> FileCheck {
    Box::new(move |next| {
        if present(next) {
            Ok(())
        } else {
            Err(FieldError::new(field, missing.clone()))
        }
    })
}

/// How to follow the model.
pub enum Source {
    /// Poll a mesh file every `interval`; `check` may refuse a new file
    /// (e.g. one that no longer names this proxy).
    File {
        path: PathBuf,
        interval: Duration,
        check: FileCheck,
    },
    /// Watch a cluster. `netns` finds the network namespace of this node's
    /// pods (the agent serves them there; the waypoint has none);
    /// `changed` is woken to rebuild the model early (the CNI plugin's
    /// news).
    Cluster {
        cluster: Cluster,
        netns: Arc<NetnsResolver>,
        changed: Arc<Notify>,
    },
}

/// Why the model cannot be followed.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Kube(#[from] KubeError),
}

/// A followed source: the tasks that keep the model current, and the
/// cluster client (for the callers' own watches and status writes).
pub struct Followed {
    pub tasks: Vec<JoinHandle<()>>,
    pub client: Option<kube::Client>,
}

/// Load the first model into `tx` (a mesh file's, or a complete one from
/// the cluster) and keep it current until `tx` has no receivers.
pub async fn follow(
    source: Source,
    tx: watch::Sender<Arc<MeshModel>>,
    report: Arc<Report>,
) -> Result<Followed, SourceError> {
    match source {
        Source::File {
            path,
            interval,
            check,
        } => {
            let (model, loaded) = MeshModel::load_with_bytes(&path)?;
            tx.send_replace(Arc::new(model));
            let task = tokio::spawn(async move {
                crate::model::watch::follow_mesh_file(
                    path,
                    loaded,
                    interval,
                    tx,
                    |_, next| check(next),
                    |applied| report.count(if applied { "applied" } else { "rejected" }),
                )
                .await
            });
            Ok(Followed {
                tasks: vec![task],
                client: None,
            })
        }
        Source::Cluster {
            cluster,
            netns,
            changed,
        } => {
            let client = crate::kube::client(cluster.kubeconfig.as_deref()).await?;
            let tasks = crate::kube::watch::follow_cluster(
                client.clone(),
                cluster.trust_domain,
                cluster.root_namespace,
                netns,
                tx,
                report,
                changed,
            )
            .await;
            Ok(Followed {
                tasks,
                client: Some(client),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;

    const MESH: &str = "nodes: [{name: a}]\n";

    fn report() -> Arc<Report> {
        let mut registry = Registry::default();
        Arc::new(Report {
            updates: Default::default(),
            policy: PolicyMetrics::register(&mut registry),
        })
    }

    fn count(r: &Report, result: &'static str) -> u64 {
        r.updates.get_or_create(&ResultLabels { result }).get()
    }

    /// A mesh file is loaded at once; a change the caller's check refuses
    /// is counted `rejected` and keeps the model; a good change is applied.
    #[tokio::test]
    async fn a_mesh_file_is_followed_and_a_vetoed_change_is_not_applied() {
        let dir = std::env::temp_dir().join(format!("sluice-source-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("mesh.yaml");
        std::fs::write(&path, MESH).unwrap();
        let (tx, mut rx) = watch::channel(Arc::new(MeshModel::empty("cluster.local")));
        let report = report();
        let source = Source::File {
            path: path.clone(),
            interval: Duration::from_millis(20),
            check: require("nodes", "node a is missing".into(), |m| {
                m.nodes.iter().any(|n| n.name == "a")
            }),
        };
        let followed = follow(source, tx, report.clone()).await.unwrap();
        assert!(followed.client.is_none());
        assert_eq!(rx.borrow_and_update().nodes.len(), 1);

        std::fs::write(&path, "nodes: [{name: b}]\n").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while count(&report, "rejected") == 0 {
            assert!(std::time::Instant::now() < deadline, "never rejected");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(rx.borrow().nodes[0].name, "a");

        std::fs::write(&path, "nodes: [{name: a}, {name: c}]\n").unwrap();
        tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|m| m.nodes.len() == 2))
            .await
            .expect("the good change is applied")
            .unwrap();
        assert_eq!(count(&report, "applied"), 1);
        drop(rx);
        for t in followed.tasks {
            t.abort();
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A mesh file that does not load is an error naming it.
    #[tokio::test]
    async fn a_missing_mesh_file_is_an_error() {
        let (tx, _rx) = watch::channel(Arc::new(MeshModel::empty("cluster.local")));
        let source = Source::File {
            path: "/nonexistent/mesh.yaml".into(),
            interval: Duration::from_secs(1),
            check: Box::new(|_| Ok(())),
        };
        let err = follow(source, tx, report()).await.err().unwrap();
        assert!(err.to_string().contains("/nonexistent/mesh.yaml"), "{err}");
    }
}
