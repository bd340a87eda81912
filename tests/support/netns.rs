//! Network-namespace topologies for end-to-end tests and the demo: each
//! node and each pod is a namespace, pods hang off their node by a veth pair
//! (Calico-style: a /32 on the pod, `169.254.1.1` as the gateway on the node
//! side), nodes are linked by one veth pair. Agents run as real
//! `sluice-agent` processes inside the node namespaces with eBPF capture.
//! Everything (processes, namespaces, pinned eBPF objects, files) is removed
//! when the [`Topology`] is dropped, also when a test panics.

use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::sched::{setns, CloneFlags};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Run `ip` with `args`; panic with its error output on failure.
pub fn ip_cmd(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("running ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ns_exec(ns: &str, args: &[&str]) {
    let mut full = vec!["netns", "exec", ns];
    full.extend_from_slice(args);
    let out = Command::new("ip")
        .args(&full)
        .output()
        .expect("running ip netns exec");
    assert!(
        out.status.success(),
        "ip {}: {}",
        full.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Run `f` on a fresh thread inside namespace `ns`; sockets it creates stay
/// in that namespace.
pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        setns(file.as_fd(), CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("thread in namespace panicked")
}

/// Whether this process may build namespaces and load eBPF, and the agent
/// and eBPF object exist. When `SLUICE_E2E_REQUIRED=1` (set by `cargo xtask
/// test`) a missing prerequisite is a failure; otherwise the test is
/// skipped with the reason printed.
pub fn e2e_available() -> bool {
    let problem = if !nix::unistd::Uid::effective().is_root() {
        Some("not root".to_string())
    } else if !agent_binary().exists() {
        Some(format!(
            "{} missing (cargo build -p node-agent)",
            agent_binary().display()
        ))
    } else if !ebpf_object().exists() {
        Some(format!(
            "{} missing (cargo xtask build-ebpf)",
            ebpf_object().display()
        ))
    } else {
        None
    };
    match problem {
        None => true,
        Some(p) if std::env::var("SLUICE_E2E_REQUIRED").as_deref() == Ok("1") => {
            panic!("end-to-end prerequisites: {p}")
        }
        Some(p) => {
            eprintln!("skipping end-to-end test: {p}");
            false
        }
    }
}

/// `target/<profile>`: test binaries live in its `deps/`, other binaries
/// (the demo) directly in it.
pub fn workspace_target() -> PathBuf {
    let exe = std::env::current_exe().expect("own binary path");
    let dir = exe.parent().expect("binary directory");
    if dir.ends_with("deps") {
        dir.parent().expect("target/<profile>").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// The `sluice-agent` binary of the same build profile.
pub fn agent_binary() -> PathBuf {
    std::env::var("SLUICE_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace_target().join("sluice-agent"))
}

pub fn ebpf_object() -> PathBuf {
    std::env::var("SLUICE_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            workspace_target()
                .parent()
                .expect("target dir")
                .join("ebpf/sluice-ebpf.o")
        })
}

/// A node: its namespace and its agent.
pub struct Node {
    pub name: String,
    pub ns: String,
    /// Pod subnet index: pods are 10.1.<index>.<n>.
    pub index: u8,
    agent: Option<Child>,
}

/// A pod: a namespace with one IPv4 and one IPv6 address.
#[derive(Clone)]
pub struct Pod {
    pub name: String,
    pub ns: String,
    pub ip: IpAddr,
    pub ip6: IpAddr,
    pub node: String,
}

/// The whole test cluster.
pub struct Topology {
    pub tag: String,
    pub dir: crate::TempDir,
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    namespaces: Vec<String>,
    pin_root: PathBuf,
    veth: u32,
    /// Agents log JSON (for tools that read the access log).
    pub json_logs: bool,
    /// Other processes started in the topology (waypoints).
    children: Vec<Child>,
    /// How often agents and waypoints poll the mesh file.
    pub reload_interval: &'static str,
}

impl Topology {
    pub fn new() -> Topology {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{:x}{}", std::process::id() % 0xfff, n);
        Topology {
            dir: crate::TempDir::new(&format!("ns-{tag}")),
            pin_root: PathBuf::from(format!("/sys/fs/bpf/sluice-test-{tag}")),
            tag,
            nodes: Vec::new(),
            pods: Vec::new(),
            namespaces: Vec::new(),
            veth: 0,
            json_logs: false,
            children: Vec::new(),
            reload_interval: "200ms",
        }
    }

    fn new_ns(&mut self, name: &str) -> String {
        let ns = format!("sl{}-{name}", self.tag);
        ip_cmd(&["netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        // Static test addresses: skip duplicate address detection so IPv6
        // is usable at once.
        ns_exec(&ns, &["sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0"]);
        ns_exec(
            &ns,
            &["sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0"],
        );
        ns_exec(&ns, &["ip", "link", "set", "lo", "up"]);
        ns
    }

    fn veth_names(&mut self) -> (String, String) {
        self.veth += 1;
        (
            format!("sl{}a{}", self.tag, self.veth),
            format!("sl{}b{}", self.tag, self.veth),
        )
    }

    /// Add a node namespace; the first two nodes are linked.
    pub fn add_node(&mut self, name: &str) {
        let ns = self.new_ns(name);
        ns_exec(&ns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        ns_exec(&ns, &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
        let index = self.nodes.len() as u8 + 1;
        self.nodes.push(Node {
            name: name.to_string(),
            ns,
            index,
            agent: None,
        });
        if self.nodes.len() == 2 {
            let (a, b) = self.veth_names();
            let (na, nb) = (self.nodes[0].ns.clone(), self.nodes[1].ns.clone());
            ip_cmd(&[
                "link", "add", &a, "netns", &na, "type", "veth", "peer", "name", &b, "netns", &nb,
            ]);
            for (ns, dev, me, other_index) in
                [(&na, &a, "10.1.255.1", 2), (&nb, &b, "10.1.255.2", 1)]
            {
                let (me6, via6) = if me.ends_with(".1") {
                    ("fd00:1:ff::1", "fd00:1:ff::2")
                } else {
                    ("fd00:1:ff::2", "fd00:1:ff::1")
                };
                ns_exec(ns, &["ip", "addr", "add", &format!("{me}/24"), "dev", dev]);
                ns_exec(
                    ns,
                    &[
                        "ip",
                        "-6",
                        "addr",
                        "add",
                        &format!("{me6}/64"),
                        "dev",
                        dev,
                        "nodad",
                    ],
                );
                ns_exec(ns, &["ip", "link", "set", dev, "up"]);
                let via = if me.ends_with(".1") {
                    "10.1.255.2"
                } else {
                    "10.1.255.1"
                };
                ns_exec(
                    ns,
                    &[
                        "ip",
                        "route",
                        "add",
                        &format!("10.1.{other_index}.0/24"),
                        "via",
                        via,
                    ],
                );
                ns_exec(
                    ns,
                    &[
                        "ip",
                        "-6",
                        "route",
                        "add",
                        &format!("fd00:1:{other_index}::/64"),
                        "via",
                        via6,
                    ],
                );
            }
        }
    }

    /// Add a pod on `node` with host number `host` (IP 10.1.<node>.<host>).
    pub fn add_pod(&mut self, node: &str, name: &str, host: u8) -> Pod {
        let index = self
            .nodes
            .iter()
            .find(|n| n.name == node)
            .expect("known node")
            .index;
        let node_ns = self
            .nodes
            .iter()
            .find(|n| n.name == node)
            .expect("known node")
            .ns
            .clone();
        let ns = self.new_ns(name);
        let ip = format!("10.1.{index}.{host}");
        let (pod_dev, node_dev) = self.veth_names();
        ip_cmd(&[
            "link", "add", &pod_dev, "netns", &ns, "type", "veth", "peer", "name", &node_dev,
            "netns", &node_ns,
        ]);
        ns_exec(
            &ns,
            &["ip", "addr", "add", &format!("{ip}/32"), "dev", &pod_dev],
        );
        ns_exec(&ns, &["ip", "link", "set", &pod_dev, "up"]);
        ns_exec(&ns, &["ip", "route", "add", "169.254.1.1", "dev", &pod_dev]);
        ns_exec(
            &ns,
            &[
                "ip",
                "route",
                "add",
                "default",
                "via",
                "169.254.1.1",
                "dev",
                &pod_dev,
            ],
        );
        ns_exec(
            &node_ns,
            &["ip", "addr", "add", "169.254.1.1/32", "dev", &node_dev],
        );
        ns_exec(&node_ns, &["ip", "link", "set", &node_dev, "up"]);
        ns_exec(
            &node_ns,
            &["ip", "route", "add", &format!("{ip}/32"), "dev", &node_dev],
        );
        // IPv6: the node side answers as fe80::1 on every pod link.
        let ip6 = format!("fd00:1:{index}::{host}");
        ns_exec(
            &ns,
            &[
                "ip",
                "-6",
                "addr",
                "add",
                &format!("{ip6}/128"),
                "dev",
                &pod_dev,
                "nodad",
            ],
        );
        ns_exec(
            &node_ns,
            &[
                "ip",
                "-6",
                "addr",
                "add",
                "fe80::1/64",
                "dev",
                &node_dev,
                "nodad",
            ],
        );
        ns_exec(
            &ns,
            &[
                "ip", "-6", "route", "add", "default", "via", "fe80::1", "dev", &pod_dev,
            ],
        );
        ns_exec(
            &node_ns,
            &[
                "ip",
                "-6",
                "route",
                "add",
                &format!("{ip6}/128"),
                "dev",
                &node_dev,
            ],
        );
        let pod = Pod {
            name: name.to_string(),
            ns,
            ip: ip.parse().unwrap(),
            ip6: ip6.parse().unwrap(),
            node: node.to_string(),
        };
        self.pods.push(pod.clone());
        pod
    }

    /// A pod that is only a namespace with its address on loopback: enough
    /// for an agent to enroll it (scale measurements), not reachable from
    /// other pods. Its `ip6` repeats `ip` (it has no IPv6 address).
    pub fn add_bare_pod(&mut self, node: &str, name: &str, ip: IpAddr) -> Pod {
        let ns = format!("sl{}-{name}", self.tag);
        ip_cmd(&["netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        ip_cmd(&["-n", &ns, "link", "set", "lo", "up"]);
        ip_cmd(&["-n", &ns, "addr", "add", &format!("{ip}/32"), "dev", "lo"]);
        let pod = Pod {
            name: name.to_string(),
            ns,
            ip,
            ip6: ip,
            node: node.to_string(),
        };
        self.pods.push(pod.clone());
        pod
    }

    /// Process ID of the agent of `node` (CPU and memory accounting).
    pub fn agent_pid(&self, node: &str) -> Option<u32> {
        self.node(node).agent.as_ref().map(|c| c.id())
    }

    /// Process IDs of the waypoints started in this topology.
    pub fn waypoint_pids(&self) -> Vec<u32> {
        self.children.iter().map(|c| c.id()).collect()
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    pub fn mesh_file(&self) -> PathBuf {
        self.dir.0.join("mesh.yaml")
    }

    /// The bpffs directory of `node`'s pinned maps and links.
    pub fn pin_dir(&self, node: &str) -> PathBuf {
        self.pin_root.join(node)
    }

    pub fn log_file(&self, node: &str) -> PathBuf {
        self.dir.0.join(format!("agent-{node}.log"))
    }

    /// Start an agent process for `node` (logging to the node's log).
    fn spawn_agent(&self, node: &str) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_file(node))
            .unwrap();
        let ns = self.node(node).ns.clone();
        let mut cmd = Command::new(agent_binary());
        spawn_in_ns(
            &ns,
            cmd.args(["run", "--node", node, "--capture", "ebpf", "--ca-generate"])
                .arg("--mesh-file")
                .arg(self.mesh_file())
                .arg("--ca-cert")
                .arg(self.dir.0.join("root.pem"))
                .arg("--ca-key")
                .arg(self.dir.0.join("root-key.pem"))
                .arg("--ebpf-object")
                .arg(ebpf_object())
                .arg("--bpffs-dir")
                .arg(self.pin_root.join(node))
                .args(["--reload-interval", self.reload_interval])
                .arg("--handover-socket")
                .arg(self.dir.0.join(format!("handover-{node}.sock")))
                .env("RUST_LOG", "info,sluice_ebpf=debug")
                .env(
                    "SLUICE_LOG_FORMAT",
                    if self.json_logs { "json" } else { "text" },
                )
                .stdout(log.try_clone().unwrap())
                .stderr(log),
        )
    }

    /// Start (or restart) the agent of `node` and wait until it is ready.
    pub fn start_agent(&mut self, node: &str) {
        let child = self.spawn_agent(node);
        let idx = self.nodes.iter().position(|n| n.name == node).unwrap();
        self.nodes[idx].agent = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some((200, _)) = self.http(node, 15021, "/healthz/ready") {
                return;
            }
            if let Some(Ok(Some(status))) = self.nodes[idx].agent.as_mut().map(|c| c.try_wait()) {
                panic!("agent {node} exited ({status}):\n{}", self.agent_log(node));
            }
            assert!(
                Instant::now() < deadline,
                "agent {node} not ready:\n{}",
                self.agent_log(node)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Hot restart: start a second agent for `node` while the first runs,
    /// and wait until it has taken the first one's sockets over and serves.
    /// It becomes the node's agent; the old one (draining) stays a child of
    /// the topology. Returns the old one's process ID.
    pub fn upgrade_agent(&mut self, node: &str) -> u32 {
        const TOOK_OVER: &str = "took over from the previous agent";
        let before = self.agent_log(node).matches(TOOK_OVER).count();
        let child = self.spawn_agent(node);
        let idx = self.nodes.iter().position(|n| n.name == node).unwrap();
        let old = self.nodes[idx]
            .agent
            .replace(child)
            .expect("an agent to upgrade");
        let pid = old.id();
        self.children.push(old);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.agent_log(node).matches(TOOK_OVER).count() == before {
            if let Some(Ok(Some(status))) = self.nodes[idx].agent.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "new agent {node} exited ({status}):\n{}",
                    self.agent_log(node)
                );
            }
            assert!(
                Instant::now() < deadline,
                "agent {node} did not take over:\n{}",
                self.agent_log(node)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        pid
    }

    /// Wait up to `limit` for a process started by the topology (not a
    /// node's current agent) to exit; its status, or `None`.
    pub fn wait_child_exit(
        &mut self,
        pid: u32,
        limit: Duration,
    ) -> Option<std::process::ExitStatus> {
        let i = self.children.iter().position(|c| c.id() == pid)?;
        let status = wait_exit(&mut self.children[i], limit)?;
        // Reaped by the wait above.
        let _ = self.children.remove(i).wait();
        Some(status)
    }

    /// Kill the agent of `node` (SIGKILL: no cleanup of its own).
    pub fn kill_agent(&mut self, node: &str) {
        let idx = self.nodes.iter().position(|n| n.name == node).unwrap();
        if let Some(mut c) = self.nodes[idx].agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Send SIGTERM to the agent of `node` (it drains, then exits).
    pub fn terminate_agent(&self, node: &str) {
        self.terminate(self.agent_pid(node).expect("agent running"));
    }

    /// Send SIGTERM to `pid`, a process this topology started.
    pub fn terminate(&self, pid: u32) {
        assert!(
            self.children.iter().any(|c| c.id() == pid)
                || self
                    .nodes
                    .iter()
                    .any(|n| n.agent.as_ref().map(Child::id) == Some(pid)),
            "{pid} was not started by this topology"
        );
        // SAFETY: kill(2) on a child process this topology started.
        let r = unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        assert_eq!(r, 0, "SIGTERM to {pid}");
    }

    /// Wait up to `limit` for the agent of `node` to exit by itself; its
    /// exit status, or `None` if it is still running.
    pub fn wait_agent_exit(
        &mut self,
        node: &str,
        limit: Duration,
    ) -> Option<std::process::ExitStatus> {
        let idx = self.nodes.iter().position(|n| n.name == node).unwrap();
        let status = wait_exit(self.nodes[idx].agent.as_mut()?, limit);
        if status.is_some() {
            self.nodes[idx].agent = None;
        }
        status
    }

    pub fn agent_log(&self, node: &str) -> String {
        std::fs::read_to_string(self.log_file(node)).unwrap_or_default()
    }

    /// GET `path` from the agent of `node` on `port` (inside its namespace).
    pub fn http(&self, node: &str, port: u16, path: &str) -> Option<(u16, String)> {
        let ns = self.node(node).ns.clone();
        let path = path.to_string();
        in_ns(&ns, move || {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
            s.write_all(
                format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
            )
            .ok()?;
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).ok()?;
            let text = String::from_utf8_lossy(&buf).to_string();
            let status = text.split(' ').nth(1)?.parse().ok()?;
            Some((
                status,
                text.split_once("\r\n\r\n")
                    .map(|(_, b)| b.to_string())
                    .unwrap_or_default(),
            ))
        })
    }

    pub fn metrics(&self, node: &str) -> String {
        self.http(node, 15020, "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default()
    }

    pub fn config_dump(&self, node: &str) -> serde_json::Value {
        let (_, body) = self.http(node, 15000, "/config_dump").expect("config dump");
        serde_json::from_str(&body).expect("config dump is JSON")
    }
}

impl Topology {
    /// Start `sluice-waypoint` inside `pod` for Gateway `namespace/name`;
    /// returns once it is ready (admin on the pod's 127.0.0.1:15020).
    pub fn start_waypoint(&mut self, pod: &str, gateway: &str) {
        let pod = self.pod(pod).clone();
        let log_path = self.dir.0.join(format!("waypoint-{}.log", pod.name));
        let log = File::create(&log_path).unwrap();
        let mut cmd = Command::new(waypoint_binary());
        cmd.args(["--waypoint", gateway, "--workload", &pod.name])
            .arg("--mesh-file")
            .arg(self.mesh_file())
            .arg("--ca-cert")
            .arg(self.dir.0.join("root.pem"))
            .arg("--ca-key")
            .arg(self.dir.0.join("root-key.pem"))
            .args(["--reload-interval", self.reload_interval])
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        self.children.push(spawn_in_ns(&pod.ns, &mut cmd));
        let deadline = Instant::now() + Duration::from_secs(30);
        let ns = pod.ns.clone();
        loop {
            let ready = in_ns(&ns, || {
                use std::io::{Read, Write};
                let mut s = std::net::TcpStream::connect(("127.0.0.1", 15020)).ok()?;
                s.write_all(b"GET /healthz/ready HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                    .ok()?;
                let mut buf = String::new();
                s.read_to_string(&mut buf).ok()?;
                Some(buf.starts_with("HTTP/1.1 200"))
            });
            if ready == Some(true) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "waypoint not ready:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Run a command inside `pod` (`ip netns exec`) and return its output.
    pub fn run_in(&self, pod: &str, args: &[&str]) -> std::process::Output {
        let ns = &self.pod(pod).ns;
        Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("running {args:?} in {pod}: {e}"))
    }
}

/// Spawn `cmd` with only its network namespace set to `ns` (unlike `ip
/// netns exec`, which also gives the process a private /sys without
/// cgroup2 and bpffs).
fn spawn_in_ns(ns: &str, cmd: &mut Command) -> Child {
    let ns_file = File::open(format!("/var/run/netns/{ns}")).expect("namespace");
    // SAFETY: setns is async-signal-safe; the fd stays open until spawn returns.
    unsafe {
        use std::os::unix::process::CommandExt;
        let fd = std::os::fd::AsRawFd::as_raw_fd(&ns_file);
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"))
}

/// The `sluice-waypoint` binary of the same build profile.
pub fn waypoint_binary() -> PathBuf {
    std::env::var("SLUICE_WAYPOINT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace_target().join("sluice-waypoint"))
}

/// The test HTTP server ([`crate::serve_http`]) inside `pod` on `port`
/// (both addresses), on a runtime of its own. Returns its request counter.
pub fn http_in(
    pod: &Pod,
    port: u16,
    name: &'static str,
) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
    let listeners: Vec<std::net::TcpListener> = [pod.ip, pod.ip6]
        .into_iter()
        .map(|ip| {
            let addr = SocketAddr::new(ip, port);
            in_ns(&pod.ns, move || {
                let l = std::net::TcpListener::bind(addr)
                    .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
                l.set_nonblocking(true).unwrap();
                l
            })
        })
        .collect();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut counters = vec![];
            for l in listeners {
                let l = tokio::net::TcpListener::from_std(l).unwrap();
                counters.push(crate::serve_http(l, name));
            }
            let total = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
            tx.send(total.clone()).unwrap();
            loop {
                let n = counters.iter().map(|c| c.load(Ordering::SeqCst)).sum();
                total.store(n, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
    });
    rx.recv().unwrap()
}

/// Wait up to `limit` for `child` to exit; its status, or `None`.
fn wait_exit(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Default for Topology {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for mut c in self.children.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
        for n in &mut self.nodes {
            if let Some(mut c) = n.agent.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        // Unpinning the links detaches the programs; unpinning the maps frees them.
        let _ = std::fs::remove_dir_all(&self.pin_root);
        for ns in self.namespaces.drain(..).rev() {
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        }
    }
}

/// A TCP echo server inside `pod` on `port`, on both its addresses, each
/// on its own thread.
pub fn echo_in(pod: &Pod, port: u16) {
    for ip in [pod.ip, pod.ip6] {
        let addr = SocketAddr::new(ip, port);
        let l = in_ns(&pod.ns, move || {
            std::net::TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"))
        });
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else { return };
                std::thread::spawn(move || {
                    let mut r = s.try_clone().unwrap();
                    let mut w = s;
                    let _ = std::io::copy(&mut r, &mut w);
                    let _ = w.shutdown(std::net::Shutdown::Write);
                });
            }
        });
    }
}

/// A server inside `pod` on `port` (both its addresses) that answers each
/// connection with the address it came from, as the application sees it.
pub fn peer_in(pod: &Pod, port: u16) {
    for ip in [pod.ip, pod.ip6] {
        let addr = SocketAddr::new(ip, port);
        let l = in_ns(&pod.ns, move || {
            std::net::TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"))
        });
        std::thread::spawn(move || {
            use std::io::Write;
            for (mut s, peer) in std::iter::from_fn(|| l.accept().ok()) {
                let _ = s.write_all(peer.ip().to_string().as_bytes());
            }
        });
    }
}

/// From inside `pod`, connect to `dst`, send `data`, half-close and read the
/// answer. Errors are returned, not panicked on.
pub fn exchange(pod: &Pod, dst: SocketAddr, data: Vec<u8>) -> std::io::Result<Vec<u8>> {
    in_ns(&pod.ns, move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut w = s.try_clone()?;
        let writer = std::thread::spawn(move || -> std::io::Result<()> {
            w.write_all(&data)?;
            w.shutdown(std::net::Shutdown::Write)
        });
        let mut back = Vec::new();
        s.read_to_end(&mut back)?;
        writer.join().expect("writer")?;
        Ok(back)
    })
}

/// New connections from `pod` to `dst`, one after another (each sends
/// `data` and must get it back), on a thread until stopped: what a client
/// sees while agents restart or are replaced.
pub struct Traffic {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    served: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    failed: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    thread: std::thread::JoinHandle<Vec<String>>,
}

impl Traffic {
    /// Start, pausing `pause` between connections.
    pub fn start(pod: &Pod, dst: SocketAddr, data: Vec<u8>, pause: Duration) -> Traffic {
        use std::sync::atomic::{AtomicBool, AtomicUsize};
        use std::sync::Arc;
        let stop = Arc::new(AtomicBool::new(false));
        let (served, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (s, ok, bad, pod) = (stop.clone(), served.clone(), failed.clone(), pod.clone());
        let thread = std::thread::spawn(move || {
            let mut errors = Vec::new();
            while !s.load(Ordering::SeqCst) {
                match exchange(&pod, dst, data.clone()) {
                    Ok(back) if back == data => ok.fetch_add(1, Ordering::SeqCst),
                    other => {
                        errors.push(format!("{:?}", other.map(|b| b.len())));
                        bad.fetch_add(1, Ordering::SeqCst)
                    }
                };
                std::thread::sleep(pause);
            }
            errors
        });
        Traffic {
            stop,
            served,
            failed,
            thread,
        }
    }

    /// Connections served so far.
    pub fn served(&self) -> usize {
        self.served.load(Ordering::SeqCst)
    }

    /// Connections that failed so far.
    pub fn failed(&self) -> usize {
        self.failed.load(Ordering::SeqCst)
    }

    /// Wait (up to 30 s, else panic) until `more` connections beyond those
    /// served so far are served.
    pub fn wait_for_more(&self, more: usize) {
        let want = self.served() + more;
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.served() < want {
            assert!(Instant::now() < deadline, "traffic stalled");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stop; the errors of the failed connections.
    pub fn stop(self) -> Vec<String> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("traffic thread")
    }
}

/// Sniff every packet seen in namespace `ns` (all interfaces) until
/// `stop` is set; returns whether `needle` appeared in any of them.
pub struct Sniffer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<bool>>,
}

impl Sniffer {
    pub fn start(ns: &str, needle: &'static [u8]) -> Sniffer {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s2 = stop.clone();
        let sock = in_ns(ns, || {
            // ETH_P_ALL in network order.
            let proto = socket2::Protocol::from((libc::ETH_P_ALL as u16).to_be() as i32);
            let s = socket2::Socket::new(socket2::Domain::PACKET, socket2::Type::RAW, Some(proto))
                .expect("AF_PACKET socket");
            s.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            s
        });
        let handle = std::thread::spawn(move || {
            let mut buf = vec![std::mem::MaybeUninit::<u8>::uninit(); 65536];
            let mut seen = false;
            while !s2.load(Ordering::Relaxed) {
                if let Ok(n) = sock.recv(&mut buf) {
                    // SAFETY: recv initialised the first n bytes.
                    let pkt: &[u8] = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast(), n) };
                    if pkt.windows(needle.len()).any(|w| w == needle) {
                        seen = true;
                    }
                }
            }
            seen
        });
        std::thread::sleep(Duration::from_millis(50));
        Sniffer {
            stop,
            handle: Some(handle),
        }
    }

    /// Stop and report whether the needle was seen.
    pub fn finish(mut self) -> bool {
        std::thread::sleep(Duration::from_millis(100));
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().unwrap().join().unwrap()
    }
}
