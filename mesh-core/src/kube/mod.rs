//! The mesh model from a Kubernetes cluster: [`translate`] turns objects
//! into the model; [`watch`] keeps reflectors of every kind the model needs
//! and publishes a new model when any of them changes; [`ca`] is the
//! certificate service's Kubernetes side (TokenReview, node check, root
//! Secret).

pub mod ca;
pub mod translate;
pub mod watch;

pub use translate::{translate, ClusterState, Translation};

/// Why talking to the cluster, or acting on what it holds, failed.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig {
        path: std::path::PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("no cluster configuration (in-cluster or $KUBECONFIG): {0}")]
    Infer(#[source] kube::config::InferConfigError),
    /// A request to the API server (`what` names the object).
    #[error("{what}: {source}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
    /// An object holds something unusable (`what` names it).
    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl KubeError {
    /// A failed API request about `what`.
    pub fn api(what: impl Into<String>) -> impl FnOnce(kube::Error) -> KubeError {
        let what = what.into();
        move |source| KubeError::Api { what, source }
    }
}

/// A client from a kubeconfig file, or inferred (in-cluster service
/// account, `$KUBECONFIG`). Errors name the file.
pub async fn client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client, KubeError> {
    // rustls needs one process-wide crypto provider when several are built in.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = match kubeconfig {
        Some(path) => {
            let bad = |source| KubeError::Kubeconfig {
                path: path.to_path_buf(),
                source,
            };
            let kc = kube::config::Kubeconfig::read_from(path).map_err(bad)?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(bad)?
        }
        None => kube::Config::infer().await.map_err(KubeError::Infer)?,
    };
    kube::Client::try_from(config).map_err(KubeError::api("building the client"))
}
