//! Finding a pod's network namespace on this node without asking the
//! container runtime: every process of a pod sits in a cgroup whose path
//! carries the pod's UID, in the forms the kubelet's cgroup drivers write
//! (cgroupfs: `/kubepods/burstable/pod<uid>/…`; systemd:
//! `…/kubepods-burstable-pod<uid with _>.slice/…`), for containerd and
//! CRI-O alike. Any such process (the sandbox's pause process first) shares
//! the pod's network namespace, reachable as `/proc/<pid>/ns/net`. Needs
//! the host's `/proc` (`hostPID`).

use std::path::{Path, PathBuf};

/// Whether a `/proc/<pid>/cgroup` text puts the process in pod `uid`.
pub fn cgroup_mentions_pod(cgroup: &str, uid: &str) -> bool {
    let dashed = format!("pod{uid}");
    let underscored = format!("pod{}", uid.replace('-', "_"));
    cgroup.lines().any(|line| {
        let path = line.splitn(3, ':').nth(2).unwrap_or("");
        path.split('/').any(|part| {
            part == dashed
                || part.ends_with(&format!("-{underscored}.slice"))
                || part == format!("{underscored}.slice")
        })
    })
}

/// The PIDs under `proc_root`, lowest (oldest) first.
fn pids(proc_root: &Path) -> Option<Vec<u32>> {
    let mut pids: Vec<u32> = std::fs::read_dir(proc_root)
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    Some(pids)
}

/// The network namespace of pod `uid`: `<proc>/<pid>/ns/net` of the
/// oldest (lowest PID, normally the sandbox) process in the pod's cgroup
/// that is not in the node's namespace.
pub fn find_pod_netns(proc_root: &Path, uid: &str) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    if uid.is_empty() {
        return None;
    }
    let id = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let host = id(&proc_root.join("1/ns/net"));
    let pids = pids(proc_root)?;
    pids.into_iter().find_map(|pid| {
        let dir = proc_root.join(pid.to_string());
        let cgroup = std::fs::read_to_string(dir.join("cgroup")).ok()?;
        let ns = dir.join("ns/net");
        let own = cgroup_mentions_pod(&cgroup, uid) && id(&ns).is_some_and(|i| Some(i) != host);
        own.then_some(ns)
    })
}

/// The node's own network namespace, where the kubelet's probes come
/// from: the kubelet's (`comm` `kubelet`, or k3s's), else PID 1's — the
/// first whose `ns/net` this process may open.
pub fn find_node_netns(proc_root: &Path) -> Option<PathBuf> {
    let pids = pids(proc_root)?;
    let kubelet = pids.into_iter().filter(|pid| {
        let comm =
            std::fs::read_to_string(proc_root.join(format!("{pid}/comm"))).unwrap_or_default();
        matches!(comm.trim(), "kubelet" | "k3s-server" | "k3s-agent")
    });
    kubelet
        .chain(std::iter::once(1))
        .map(|pid| proc_root.join(format!("{pid}/ns/net")))
        .find(|ns| std::fs::File::open(ns).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "5b7c2a9e-1d3f-4c8a-9f00-0123456789ab";

    /// A fake /proc: pid → cgroup file (and an `ns/net` for each).
    fn fake_proc(procs: &[(u32, &str)]) -> PathBuf {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let root = std::env::temp_dir().join(format!("sluice-proc-{}-{n}", std::process::id()));
        for (pid, cgroup) in procs {
            let d = root.join(pid.to_string());
            std::fs::create_dir_all(d.join("ns")).unwrap();
            std::fs::write(d.join("cgroup"), cgroup).unwrap();
            std::fs::write(d.join("ns/net"), "").unwrap();
        }
        std::fs::write(root.join("uptime"), "1 1").unwrap();
        root
    }

    #[test]
    fn containerd_with_the_systemd_driver() {
        let u = UID.replace('-', "_");
        let root = fake_proc(&[
            (1, "0::/init.scope\n"),
            (4100, &format!("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-aaa.scope\n")),
            (4000, &format!("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-pause.scope\n")),
            (5000, "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-podffff.slice/x.scope\n"),
        ]);
        assert_eq!(
            find_pod_netns(&root, UID),
            Some(root.join("4000/ns/net")),
            "the sandbox (lowest pid) wins"
        );
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_process_of_the_pod_in_the_nodes_namespace_is_skipped() {
        let u = UID.replace('-', "_");
        let slice = format!("0::/kubepods.slice/kubepods-pod{u}.slice");
        let root = fake_proc(&[
            (1, "0::/init.scope\n"),
            (300, &format!("{slice}/crio-conmon-0123.scope\n")),
            (301, &format!("{slice}/crio-0123.scope\n")),
        ]);
        // conmon (300) shares the node's namespace.
        std::fs::remove_file(root.join("300/ns/net")).unwrap();
        std::fs::hard_link(root.join("1/ns/net"), root.join("300/ns/net")).unwrap();
        assert_eq!(find_pod_netns(&root, UID), Some(root.join("301/ns/net")));
        // With only conmon left, the pod has no namespace to capture yet.
        std::fs::remove_dir_all(root.join("301")).unwrap();
        assert_eq!(find_pod_netns(&root, UID), None);
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn the_node_is_where_the_kubelet_runs() {
        let root = fake_proc(&[
            (1, "0::/init.scope\n"),
            (812, "0::/system.slice/kubelet.service\n"),
        ]);
        std::fs::write(root.join("1/comm"), "systemd\n").unwrap();
        std::fs::write(root.join("812/comm"), "kubelet\n").unwrap();
        assert_eq!(find_node_netns(&root), Some(root.join("812/ns/net")));
        std::fs::remove_dir_all(root.join("812")).unwrap();
        assert_eq!(find_node_netns(&root), Some(root.join("1/ns/net")));
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn cri_o_guaranteed_pods_and_the_cgroupfs_driver_on_cgroup_v1() {
        let u = UID.replace('-', "_");
        let crio = format!("0::/kubepods.slice/kubepods-pod{u}.slice/crio-0123.scope\n");
        assert!(cgroup_mentions_pod(&crio, UID));
        let v1 = format!("12:pids:/kubepods/besteffort/pod{UID}/0123abcd\n11:memory:/kubepods/besteffort/pod{UID}/0123abcd\n");
        assert!(cgroup_mentions_pod(&v1, UID));
        let root = fake_proc(&[(77, &v1)]);
        assert_eq!(find_pod_netns(&root, UID), Some(root.join("77/ns/net")));
        // Another pod's UID, or a UID that is only a prefix, never matches.
        assert!(!cgroup_mentions_pod(&v1, "5b7c2a9e"));
        assert_eq!(
            find_pod_netns(&root, "00000000-0000-0000-0000-000000000000"),
            None
        );
        std::fs::remove_dir_all(root).unwrap();
    }
}
