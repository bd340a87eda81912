//! Follow a cluster: one `kube-runtime` watcher + reflector per kind the
//! model needs (watchers re-list after disconnects and `410 Gone`, and the
//! reflectors replace their contents on a re-list, so nothing is lost or
//! duplicated), and a loop that rebuilds the model when any of them
//! changes (debounced) and publishes it.
//!
//! A model equal to the last one is not published again; the model is also
//! rebuilt every 10 s without events (pod network namespaces are looked up
//! anew then).
//!
//! The first model is published only when every kind has been listed once:
//! a model with pods but without their policies would let through what a
//! policy denies. Custom resources whose CRD is not installed count as
//! empty (and are looked for again every 30 s).

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use kube::api::{Api, ListParams};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::reflector::{store::Writer, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::{watch, Notify};

use super::translate::{translate, ClusterState, Rejected};
use crate::model::MeshModel;

/// The custom resources the model reads: (group, version, kind, plural).
pub const CUSTOM_KINDS: [(&str, &str, &str, &str); 6] = [
    (
        "security.istio.io",
        "v1",
        "AuthorizationPolicy",
        "authorizationpolicies",
    ),
    (
        "security.istio.io",
        "v1",
        "PeerAuthentication",
        "peerauthentications",
    ),
    ("gateway.networking.k8s.io", "v1", "Gateway", "gateways"),
    ("gateway.networking.k8s.io", "v1", "HTTPRoute", "httproutes"),
    (
        "networking.istio.io",
        "v1",
        "DestinationRule",
        "destinationrules",
    ),
    (
        "gateway.networking.k8s.io",
        "v1beta1",
        "ReferenceGrant",
        "referencegrants",
    ),
];

/// Stores of every kind.
#[derive(Clone)]
struct Stores {
    namespaces: Store<Namespace>,
    nodes: Store<Node>,
    pods: Store<Pod>,
    services: Store<Service>,
    custom: Vec<Store<DynamicObject>>,
}

fn cloned<K>(s: &Store<K>) -> Vec<K>
where
    K: Resource + Clone + 'static,
    K::DynamicType: std::hash::Hash + Eq + Clone,
{
    s.state().iter().map(|o| (**o).clone()).collect()
}

impl Stores {
    fn snapshot(&self) -> ClusterState {
        let c = |i: usize| cloned(&self.custom[i]);
        ClusterState {
            namespaces: cloned(&self.namespaces),
            nodes: cloned(&self.nodes),
            pods: cloned(&self.pods),
            services: cloned(&self.services),
            authorization_policies: c(0),
            peer_authentications: c(1),
            gateways: c(2),
            http_routes: c(3),
            destination_rules: c(4),
            reference_grants: c(5),
        }
    }
}

/// Finds a pod's network namespace (see [`super::translate::NetnsOf`]).
pub type NetnsResolver = dyn Fn(&Pod) -> Option<super::translate::LocalPod> + Send + Sync;

/// Counters the caller exports (`sluice_config_updates_total` and
/// friends).
pub trait WatchReport: Send + Sync + 'static {
    /// A new model was published.
    fn applied(&self, model: &MeshModel);
    /// The objects that cannot be read changed (each newly rejected one has
    /// been logged already); `now` may be empty.
    fn rejected(&self, now: &[Rejected]);
}

/// Run one watcher feeding `writer`, waking `changed` on every event.
fn drive<K>(
    stream: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    writer: Writer<K>,
    changed: Arc<Notify>,
    what: String,
) -> tokio::task::JoinHandle<()>
where
    K: Resource + Clone + Debug + Send + Sync + 'static,
    K::DynamicType: std::hash::Hash + Eq + Clone + Send + Sync,
{
    tokio::spawn(async move {
        let mut s = std::pin::pin!(stream.default_backoff().reflect(writer));
        let mut failing = false;
        while let Some(ev) = s.next().await {
            match ev {
                Ok(_) => {
                    if failing {
                        tracing::info!(kind = %what, "watch resumed");
                        failing = false;
                    }
                    changed.notify_one();
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(kind = %what, error = %e, "watch failed; retrying with backoff (the last state is kept)");
                        failing = true;
                    }
                }
            }
        }
    })
}

fn typed<K>(
    client: &Client,
    changed: &Arc<Notify>,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
    K::Scope: Send,
{
    let writer = Writer::<K>::new(());
    let store = writer.as_reader();
    let api: Api<K> = Api::all(client.clone());
    tasks.push(drive(
        watcher(api, watcher::Config::default()),
        writer,
        changed.clone(),
        K::kind(&()).to_string(),
    ));
    store
}

/// Watch the cluster and publish models on `tx` until the task is aborted.
/// Returns once the first complete model is published. Notifying `changed`
/// translates again (what `netns` tells changed).
pub async fn follow_cluster(
    client: Client,
    trust_domain: String,
    root_namespace: String,
    netns: Arc<NetnsResolver>,
    tx: watch::Sender<Arc<MeshModel>>,
    report: Arc<dyn WatchReport>,
    changed: Arc<Notify>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = vec![];
    let namespaces = typed::<Namespace>(&client, &changed, &mut tasks);
    let nodes = typed::<Node>(&client, &changed, &mut tasks);
    let pods = typed::<Pod>(&client, &changed, &mut tasks);
    let services = typed::<Service>(&client, &changed, &mut tasks);
    let mut custom = vec![];
    let mut custom_ready = vec![];
    for (group, version, kind, plural) in CUSTOM_KINDS {
        let ar =
            ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural);
        let writer = Writer::<DynamicObject>::new(ar.clone());
        custom.push(writer.as_reader());
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
        let (client_changed, what) = (changed.clone(), format!("{kind}.{group}"));
        let installed = Arc::new(Notify::new());
        custom_ready.push(installed.clone());
        tasks.push(tokio::spawn(async move {
            // Wait for the CRD: a missing kind is an empty list, not an error
            // that holds everything else back.
            let mut announced = false;
            loop {
                match api.list(&ListParams::default().limit(1)).await {
                    Ok(_) => break,
                    Err(kube::Error::Api(e)) if e.code == 404 => {
                        if !announced {
                            tracing::info!(kind = %what, "CRD not installed: treated as no objects");
                            announced = true;
                        }
                        installed.notify_one();
                        tokio::time::sleep(Duration::from_secs(30)).await;
                    }
                    Err(e) => {
                        tracing::warn!(kind = %what, error = %e, "cannot list; retrying");
                        tokio::time::sleep(Duration::from_secs(2)).await;
                    }
                }
            }
            let handle = drive(watcher(api, watcher::Config::default()), writer, client_changed, what);
            let _ = handle.await;
        }));
    }
    let stores = Stores {
        namespaces,
        nodes,
        pods,
        services,
        custom,
    };
    // Everything listed once (or known to be absent) before the first model.
    let _ = stores.namespaces.wait_until_ready().await;
    let _ = stores.nodes.wait_until_ready().await;
    let _ = stores.pods.wait_until_ready().await;
    let _ = stores.services.wait_until_ready().await;
    for (store, absent) in stores.custom.iter().zip(&custom_ready) {
        tokio::select! {
            _ = store.wait_until_ready() => {}
            _ = absent.notified() => {}
        }
    }
    let mut last: Option<String> = None;
    let mut last_problems: Vec<Rejected> = vec![];
    let mut publish = {
        let stores = stores.clone();
        let report = report.clone();
        move || {
            let t = translate(
                &stores.snapshot(),
                &trust_domain,
                &root_namespace,
                netns.as_ref(),
            );
            // Events that change nothing the model holds (pod status
            // heartbeats, resource versions) publish nothing: a new model
            // makes every agent re-check its live connections.
            // New problems are reported even when the model stays the same
            // (a bad object left out changes nothing else).
            if t.problems != last_problems {
                for p in t.problems.iter().filter(|p| !last_problems.contains(p)) {
                    tracing::error!(
                        kind = p.kind,
                        object = %p.name,
                        field = %p.field,
                        reason = %p.reason,
                        instead = p.instead,
                        "{p}"
                    );
                }
                report.rejected(&t.problems);
            }
            last_problems = t.problems;
            let fingerprint = serde_json::to_string(&t.model).unwrap_or_default();
            if last.as_deref() == Some(fingerprint.as_str()) {
                return;
            }
            last = Some(fingerprint);
            report.applied(&t.model);
            tx.send_replace(Arc::new(t.model));
        }
    };
    publish();
    tasks.push(tokio::spawn(async move {
        // Also rebuild now and then without an event: a pod's sandbox (and
        // with it the network namespace found in /proc) can be recreated
        // without any change to the pod object.
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        tick.tick().await;
        loop {
            tokio::select! {
                _ = changed.notified() => {
                    // Coalesce a burst of events into one rebuild.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                _ = tick.tick() => {}
            }
            publish();
        }
    }));
    tasks
}
