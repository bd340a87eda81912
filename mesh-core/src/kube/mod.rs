//! The mesh model from a Kubernetes cluster: [`translate`] turns objects
//! into the model; [`watch`] keeps reflectors of every kind the model needs
//! and publishes a new model when any of them changes; [`ca`] is the
//! certificate service's Kubernetes side (TokenReview, node check, root
//! Secret).

pub mod ca;
pub mod translate;
pub mod watch;

pub use translate::{translate, ClusterState, Translation};

/// A client from a kubeconfig file, or inferred (in-cluster service
/// account, `$KUBECONFIG`). Errors name the file.
pub async fn client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client, String> {
    // rustls needs one process-wide crypto provider when several are built in.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| format!("{}: {e}", path.display()))?
        }
        None => kube::Config::infer().await.map_err(|e| e.to_string())?,
    };
    kube::Client::try_from(config).map_err(|e| e.to_string())
}
