//! The agent's side of the plugin: a Unix socket that takes a new pod's
//! network namespace, makes the pod a workload of the model at once (with
//! the CNI result's addresses, before the API has them), and answers once
//! the reconcile has enrolled it — or found it outside the mesh. Runs on
//! plain threads: a call blocks its sandbox, never the data path.

use std::collections::HashMap;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use mesh_core::kube::translate::LocalPod;
use nix::sys::socket::{accept4, SockFlag};
use tokio::sync::Notify;

use super::{PodAdded, Reply, Request, MAX_REQUEST};
use crate::capture::netns::Netns;
use crate::{fdpass, lock, Ctx};

/// How long an `ADD` waits for the pod's enrollment before the plugin is
/// told to fail (the kubelet then retries the sandbox).
const ENROLL_WAIT: Duration = Duration::from_secs(20);

struct CniPod {
    uid: String,
    path: String,
    netns: Arc<Netns>,
    ips: Vec<IpAddr>,
}

/// The namespaces the plugin handed over, by pod, until the sandbox goes.
#[derive(Default)]
pub struct Registry {
    pods: Mutex<HashMap<(String, String), CniPod>>,
    /// Wakes the model's translation (see `follow_cluster`).
    pub changed: Arc<Notify>,
    /// The plugin's installation on this node.
    plugin: Mutex<PluginState>,
}

/// Whether the plugin is kept installed, and what the last check found.
enum PluginState {
    /// Kept installed; the installed binary as last verified.
    Kept(super::install::Verified),
    /// Taken off the node for good (an uninstall): it stays off.
    Removed,
}

impl Default for PluginState {
    fn default() -> Self {
        PluginState::Kept(None)
    }
}

impl Registry {
    /// What the plugin told of `pod`, if it is this pod (same UID).
    pub fn local_pod(&self, pod: &Pod) -> Option<LocalPod> {
        let key = (pod.metadata.namespace.clone()?, pod.metadata.name.clone()?);
        let pods = lock(&self.pods);
        let p = pods.get(&key)?;
        let uid = pod.metadata.uid.as_deref().unwrap_or_default();
        (p.uid.is_empty() || p.uid == uid).then(|| LocalPod {
            netns: p.path.clone(),
            ips: p.ips.clone(),
        })
    }

    /// The open namespace handed over under `path`.
    pub fn netns(&self, path: &str) -> Option<Arc<Netns>> {
        lock(&self.pods)
            .values()
            .find(|p| p.path == path)
            .map(|p| p.netns.clone())
    }

    /// Install or re-check the plugin, unless it was removed for good.
    pub fn ensure(
        &self,
        dirs: &super::install::Dirs,
        binary: &Path,
        plugin: &super::PluginConfig,
    ) -> Result<bool, super::install::InstallError> {
        match &mut *lock(&self.plugin) {
            PluginState::Removed => Ok(false),
            PluginState::Kept(verified) => super::install::ensure(dirs, binary, plugin, verified),
        }
    }

    /// Take the plugin off the node for good.
    pub fn remove(&self, dirs: &super::install::Dirs) -> Result<(), super::install::InstallError> {
        *lock(&self.plugin) = PluginState::Removed;
        super::install::remove(dirs)
    }

    fn forget(&self, ns: &str, name: &str) {
        if lock(&self.pods)
            .remove(&(ns.to_string(), name.to_string()))
            .is_some()
        {
            self.changed.notify_one();
        }
    }
}

/// Listen on `path` (replacing a stale socket) and serve the plugin,
/// registering what it hands over in `ctx.cni`.
pub fn serve(path: &Path, ctx: Arc<Ctx>) -> std::io::Result<()> {
    let sock = fdpass::listen_at(path, 64)?;
    let path = path.to_path_buf();
    std::thread::Builder::new()
        .name("cni-server".into())
        .spawn(move || loop {
            match accept4(sock.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
                Ok(raw) => {
                    // SAFETY: accept4 just returned this descriptor.
                    let conn = unsafe { OwnedFd::from_raw_fd(raw) };
                    let ctx = ctx.clone();
                    let _ = std::thread::Builder::new()
                        .name("cni-call".into())
                        .spawn(move || call(conn, &ctx, &ctx.cni));
                }
                Err(e) => {
                    tracing::error!(socket = %path.display(), error = %e, "CNI socket: accept failed");
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        })?;
    Ok(())
}

fn call(conn: OwnedFd, ctx: &Ctx, registry: &Registry) {
    let _ = fdpass::set_timeout(&conn, Duration::from_secs(5));
    let reply = match fdpass::recv(&conn, MAX_REQUEST) {
        Err(e) => Reply::Error {
            message: format!("cannot read the request: {e}"),
        },
        Ok((bytes, fds)) => match serde_json::from_slice::<Request>(&bytes) {
            Err(e) => {
                tracing::warn!(error = %e, "CNI socket: a request that does not parse; refused");
                Reply::Error {
                    message: format!("a request that does not parse: {e}"),
                }
            }
            Ok(Request::Del { namespace, name }) => {
                registry.forget(&namespace, &name);
                Reply::Skipped
            }
            Ok(Request::Add(pod)) => match fds.into_iter().next() {
                None => Reply::Error {
                    message: "no network namespace descriptor".into(),
                },
                Some(fd) => add(ctx, registry, pod, fd),
            },
        },
    };
    if let Err(e) = fdpass::send(&conn, &serde_json::to_vec(&reply).expect("plain data"), &[]) {
        tracing::warn!(error = %e, "CNI socket: the plugin left before the answer");
    }
}

/// Register the pod's namespace (open at `fd`) and answer once the pod is
/// enrolled, found outside the mesh, or the wait is over.
fn add(ctx: &Ctx, registry: &Registry, pod: PodAdded, fd: OwnedFd) -> Reply {
    let PodAdded {
        namespace,
        name,
        uid,
        netns: path,
        ips,
    } = pod;
    let netns = match Netns::from_file(std::fs::File::from(fd), &path) {
        Ok(n) => Arc::new(n),
        Err(e) => {
            return Reply::Error {
                message: format!("not a network namespace: {e}"),
            }
        }
    };
    let cookie = netns.cookie();
    lock(&registry.pods).insert(
        (namespace.clone(), name.clone()),
        CniPod {
            uid,
            path,
            netns,
            ips,
        },
    );
    registry.changed.notify_one();
    let started = Instant::now();
    let deadline = started + ENROLL_WAIT;
    loop {
        let model = ctx.model();
        let w = model
            .workloads
            .iter()
            .find(|w| w.namespace == namespace && w.name == name && w.node == ctx.cfg.node);
        match w {
            Some(w) if !model.is_enrolled(w) => {
                // Outside the mesh: nothing of it to keep open.
                registry.forget(&namespace, &name);
                tracing::debug!(%namespace, pod = %name, "CNI: pod outside the mesh");
                return Reply::Skipped;
            }
            Some(_) => {
                let enrolled = lock(&ctx.local)
                    .get(&(namespace.clone(), name.clone()))
                    .and_then(|l| l.net.netns().map(|n| n.cookie()))
                    == Some(cookie);
                if enrolled {
                    tracing::info!(%namespace, pod = %name, waited_ms = started.elapsed().as_millis() as u64, "CNI: pod captured before its containers start");
                    return Reply::Captured;
                }
            }
            None => {}
        }
        if Instant::now() >= deadline {
            registry.forget(&namespace, &name);
            let why = if w.is_some() {
                "its enrollment has not succeeded (see the agent's errors)"
            } else {
                "the pod is not in the agent's view of the cluster yet"
            };
            tracing::warn!(%namespace, pod = %name, reason = why, "CNI: pod held back; the kubelet will retry");
            return Reply::Error {
                message: format!("not enrolled within {ENROLL_WAIT:?}: {why}"),
            };
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
