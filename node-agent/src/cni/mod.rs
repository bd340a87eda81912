//! Capture from a pod's first packet: a chained CNI plugin, as istio-cni
//! does for ztunnel. Without it a pod that starts while the node's agent is
//! away (a restart, a rollout, a crash) runs uncaptured — reachable in
//! plaintext and talking in plaintext — until an agent finds it.
//!
//! The agent installs `sluice-cni` into the node's CNI binary directory and
//! appends it to the node's primary network configuration (the first
//! `.conflist`/`.conf` by name). On `ADD` the container runtime runs it
//! after the network plugins: it passes the pod's namespace, name, UID,
//! addresses and an open descriptor of its network namespace to the agent
//! over a Unix socket ([`server`]); the agent enrolls the pod if it belongs
//! in the mesh and answers only then, so no container of the pod starts
//! before its capture is in place. When the agent cannot be reached the
//! plugin fails the `ADD` (the kubelet retries the sandbox) for any pod
//! that could belong in the mesh, judged from what the agent last wrote
//! ([`Cache`]): no cache, no pod starts but those of the excluded
//! namespaces (Sluice's own, the system's). The agent removes the plugin
//! when Sluice is uninstalled.

pub mod install;
pub mod plugin;
pub mod server;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The plugin's `type` in the network configuration (and its file name).
pub const PLUGIN_TYPE: &str = "sluice-cni";

/// Where the plugin finds the agent and its cache, and whom it never
/// holds up: the plugin's entry in the node's network configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PluginConfig {
    /// The agent's socket (a host path).
    pub socket: PathBuf,
    /// The agent's [`Cache`] (a host path).
    pub cache: PathBuf,
    /// Namespaces whose pods never wait for the agent (its own among them,
    /// or it could never start).
    #[serde(default)]
    pub exclude_namespaces: Vec<String>,
}

impl PluginConfig {
    /// The entry as it goes into a configuration list's `plugins`.
    pub fn entry(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("plain data");
        v["type"] = PLUGIN_TYPE.into();
        v
    }
}

/// What the plugin asks the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "UPPERCASE")]
pub enum Request {
    /// A pod's sandbox got its network; the message carries the open
    /// network namespace.
    Add(PodAdded),
    /// The sandbox is being torn down.
    Del { namespace: String, name: String },
}

/// What the plugin tells of a pod whose sandbox got its network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodAdded {
    pub namespace: String,
    pub name: String,
    /// Empty when the runtime does not pass `K8S_POD_UID`.
    pub uid: String,
    /// The namespace's path on the host (`CNI_NETNS`), a stable name.
    pub netns: String,
    pub ips: Vec<IpAddr>,
}

/// The agent's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "lowercase")]
pub enum Reply {
    /// Enrolled: its capture is in place.
    Captured,
    /// Not in the mesh: it goes on uncaptured.
    Skipped,
    /// Not yet: the plugin fails, the kubelet retries.
    Error { message: String },
}

/// The largest request the agent reads.
pub const MAX_REQUEST: usize = 4096;

/// What the plugin knows when the agent is away: the namespaces where a
/// new pod may belong in the mesh (labelled for it, or holding a pod that
/// is). Written by the agent whenever that set changes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cache {
    pub namespaces: BTreeSet<String>,
}

impl Cache {
    /// The cache at `path`; `None` when there is none or it does not parse
    /// (the plugin then holds every pod up).
    pub fn read(path: &Path) -> Option<Cache> {
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    }

    /// Replace the cache at `path` atomically.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(self).expect("plain data"))?;
        std::fs::rename(&tmp, path)
    }

    /// The namespaces of `model` where capture may apply to a new pod.
    pub fn of(model: &mesh_core::model::MeshModel) -> Cache {
        use mesh_core::model::DATAPLANE_MODE_LABEL;
        let mut namespaces: BTreeSet<String> = model
            .namespaces
            .iter()
            .filter(|n| n.labels.get(DATAPLANE_MODE_LABEL).map(String::as_str) == Some("ambient"))
            .map(|n| n.name.clone())
            .collect();
        namespaces.extend(
            model
                .workloads
                .iter()
                .filter(|w| {
                    w.labels
                        .get(DATAPLANE_MODE_LABEL)
                        .is_some_and(|m| m != "none")
                })
                .map(|w| w.namespace.clone()),
        );
        Cache { namespaces }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_replies_read_back() {
        let r = Request::Add(PodAdded {
            namespace: "shop".into(),
            name: "late".into(),
            uid: "u-1".into(),
            netns: "/var/run/netns/cni-1".into(),
            ips: vec!["10.244.1.9".parse().unwrap()],
        });
        let text = serde_json::to_string(&r).unwrap();
        assert!(text.contains("\"command\":\"ADD\""), "{text}");
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), r);
        for reply in [
            Reply::Captured,
            Reply::Skipped,
            Reply::Error {
                message: "x".into(),
            },
        ] {
            let text = serde_json::to_string(&reply).unwrap();
            assert_eq!(serde_json::from_str::<Reply>(&text).unwrap(), reply);
        }
    }

    #[test]
    fn the_cache_names_labelled_namespaces_and_those_with_opted_in_pods() {
        let model = mesh_core::model::MeshModel::from_yaml(
            r#"
nodes: [{name: n1}]
namespaces:
  - {name: shop, labels: {istio.io/dataplane-mode: ambient}}
  - {name: plain}
  - {name: mixed}
  - {name: optout, labels: {istio.io/dataplane-mode: ambient}}
workloads:
  - {name: a, namespace: mixed, node: n1, ips: [10.0.0.1], labels: {istio.io/dataplane-mode: ambient}}
  - {name: b, namespace: plain, node: n1, ips: [10.0.0.2]}
  - {name: c, namespace: plain, node: n1, ips: [10.0.0.3], labels: {istio.io/dataplane-mode: none}}
"#,
            "test",
        )
        .unwrap();
        let cache = Cache::of(&model);
        let names: Vec<&str> = cache.namespaces.iter().map(String::as_str).collect();
        assert_eq!(names, ["mixed", "optout", "shop"]);

        let dir = std::env::temp_dir().join(format!("sluice-cni-cache-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cache.json");
        assert_eq!(Cache::read(&path), None);
        cache.write(&path).unwrap();
        assert_eq!(Cache::read(&path), Some(cache));
        std::fs::write(&path, "{not json").unwrap();
        assert_eq!(Cache::read(&path), None, "a broken cache holds pods up");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
