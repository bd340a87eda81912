//! Telling an uninstall from a restart. A stopping agent normally leaves
//! its eBPF capture pinned, so enrolled pods fail closed until the next
//! agent takes over; but when Sluice is being removed from the cluster,
//! the pins would black-hole every enrolled pod forever. The agent follows
//! the DaemonSet that owns its pod and its own namespace with watches
//! opened at start: once either is deleted, stopping also removes the
//! capture. The watches are established before the uninstall begins, so
//! they still report the deletion after the agent's RBAC objects are gone
//! (an open watch is not re-authorized). When in doubt (no owner found, the
//! API unreachable) the agent keeps the capture: fail closed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Api;

/// Whether this agent's DaemonSet or namespace is being deleted.
#[derive(Clone, Default)]
pub struct Removal(Arc<AtomicBool>);

impl Removal {
    /// True once the deletion of the DaemonSet or the namespace was seen.
    pub fn removing(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    fn set(&self, what: &str) {
        if !self.0.swap(true, Ordering::SeqCst) {
            tracing::info!(
                what,
                "Sluice is being removed from this cluster: the capture goes when the agent stops"
            );
        }
    }
}

/// Start following the DaemonSet that owns pod `namespace/pod` and the
/// namespace itself. Returns at once; the watches run in the background.
pub fn follow(client: kube::Client, namespace: String, pod: String) -> Removal {
    let removal = Removal::default();
    let r = removal.clone();
    tokio::spawn(async move {
        let owner = match Api::<Pod>::namespaced(client.clone(), &namespace)
            .get(&pod)
            .await
        {
            Ok(p) => p
                .metadata
                .owner_references
                .unwrap_or_default()
                .into_iter()
                .find(|o| o.kind == "DaemonSet")
                .map(|o| o.name),
            Err(e) => {
                tracing::warn!(error = %e, %namespace, %pod, "cannot read the agent's own pod: an uninstall will leave the capture pinned (`sluice-agent cleanup` removes it)");
                None
            }
        };
        let mut tasks = vec![tokio::spawn(watch_deletion::<Namespace>(
            Api::all(client.clone()),
            namespace.clone(),
            r.clone(),
        ))];
        match owner {
            Some(ds) => tasks.push(tokio::spawn(watch_deletion::<DaemonSet>(
                Api::namespaced(client, &namespace),
                ds,
                r,
            ))),
            None => {
                tracing::info!(%namespace, %pod, "the agent's pod has no DaemonSet owner; only its namespace's deletion removes the capture")
            }
        }
        for t in tasks {
            let _ = t.await;
        }
    });
    removal
}

/// Watch one object by name; mark `removal` when it is deleted or carries
/// a deletion timestamp.
async fn watch_deletion<K>(api: Api<K>, name: String, removal: Removal)
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + 'static,
{
    let kind = K::kind(&()).to_string();
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = watcher(api, cfg).default_backoff().boxed();
    while let Some(ev) = events.next().await {
        match ev {
            Ok(watcher::Event::Delete(_)) => removal.set(&format!("{kind} {name} deleted")),
            Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o))
                if o.meta().deletion_timestamp.is_some() =>
            {
                removal.set(&format!("{kind} {name} being deleted"))
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, %kind, %name, "watch interrupted; retrying"),
        }
    }
}
