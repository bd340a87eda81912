//! A real Kubernetes cluster on this machine, for the tests that need
//! kubelets: etcd, kube-apiserver, kube-controller-manager, kube-scheduler
//! and kube-proxy (v1.20, built from Debian's source package by
//! `xtask/scripts/kube-apiserver.sh` and `kube-node.sh`), and two nodes,
//! each a containerd and a kubelet of its own in a private mount namespace
//! (a tmpfs `/run` and its own `/var/log`, so the two kubelets' garbage
//! collectors never see each other's pods), its own cgroup root and its own
//! CNI bridge (`bridge` + `host-local` plugins). Images come from the cache
//! the scripts fill (`pause`, `busybox`) and from [`Cluster::import_image`].
//!
//! Both nodes share the host's network namespace: node IPs 10.99.0.1 and
//! 10.99.0.2 sit on an empty bridge, pod subnets are 10.244.1.0/24 and
//! 10.244.2.0/24, and the host routes between them. The API server listens
//! on 10.99.0.1:46443, which pods reach through the `kubernetes` Service.
//!
//! Everything is undone when the cluster is dropped, also on failure:
//! processes are stopped by PID, links, cgroups, kube-proxy's rules, the
//! sysctls the kubelet and the bridge plugin change, and the host paths the
//! node software creates are put back as they were.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::TempDir;

/// Where the scripts cache binaries and images.
pub fn cache() -> PathBuf {
    std::env::var("SLUICE_KUBE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from("/var/cache/sluice-kube"))
}

/// Whether the real-node tests can run (or, with `SLUICE_E2E_REQUIRED=1`, a
/// panic naming what is missing).
pub fn cluster_available() -> bool {
    let c = cache();
    let needed = [
        c.join("bin/kube-apiserver"),
        c.join("bin/kubelet"),
        c.join("bin/kube-scheduler"),
        c.join("bin/kube-controller-manager"),
        c.join("bin/kube-proxy"),
        c.join("images/pause.tar"),
        c.join("images/busybox.tar"),
        PathBuf::from("/usr/bin/containerd"),
        PathBuf::from("/usr/bin/buildah"),
        PathBuf::from("/usr/lib/cni/bridge"),
        PathBuf::from("/usr/bin/etcd"),
        PathBuf::from("/usr/bin/kubectl"),
    ];
    let missing = needed.into_iter().find(|p| !p.exists());
    let root = nix::unistd::Uid::effective().is_root();
    match (missing, root) {
        (None, true) => true,
        (m, _) if std::env::var("SLUICE_E2E_REQUIRED").as_deref() == Ok("1") => panic!(
            "the real-node tests need {} (cargo xtask test installs it)",
            m.map(|p| p.display().to_string())
                .unwrap_or_else(|| "root".into())
        ),
        (m, _) => {
            eprintln!(
                "skipping real-node test: {} missing",
                m.map(|p| p.display().to_string())
                    .unwrap_or_else(|| "root".into())
            );
            false
        }
    }
}

/// The nodes: name, index (bridge and pod subnet), node IP, kubelet port,
/// kubelet healthz port.
pub const NODES: [(&str, u8, &str, u16, u16); 2] = [
    ("node-a", 1, "10.99.0.1", 10250, 10248),
    ("node-b", 2, "10.99.0.2", 10251, 10247),
];
/// Where the API server listens (and advertises itself).
pub const APISERVER: &str = "10.99.0.1:46443";
/// Every node's CNI binary directory (in the node's own `/run`).
pub const CNI_BIN_DIR: &str = "/run/cni/bin";
/// Every node's CNI configuration directory (in the node's own `/run`).
pub const CNI_CONF_DIR: &str = "/run/cni/net.d";

const ETCD_CLIENT: &str = "127.0.0.1:42379";
const NODE_IP_LINK: &str = "sluice-nodeip";
/// Sysctls the kubelet (`vm.overcommit_memory`, `kernel.panic*`), the bridge
/// plugin (`ip_forward`) and kube-proxy (`route_localnet`) change.
const SYSCTLS: &[&str] = &[
    "vm.overcommit_memory",
    "kernel.panic",
    "kernel.panic_on_oops",
    "net.ipv4.ip_forward",
    "net.ipv4.conf.all.route_localnet",
];
/// Host paths the node software creates (removed again if they were not
/// there before).
const HOST_PATHS: &[&str] = &[
    "/var/lib/cni",
    "/var/log/pods",
    "/var/log/containers",
    "/run/containerd",
    "/run/mount",
    "/run/containers",
];

struct Node {
    name: &'static str,
    dir: PathBuf,
    sock: PathBuf,
    containerd: Option<Child>,
    kubelet: Option<Child>,
}

/// A running two-node cluster.
pub struct Cluster {
    pub dir: TempDir,
    /// The admin kubeconfig.
    pub kubeconfig: PathBuf,
    control: Vec<(&'static str, Child)>,
    proxy: Option<Child>,
    nodes: Vec<Node>,
    sysctls: BTreeMap<String, String>,
    created_paths: Vec<PathBuf>,
    nft_tables_before: String,
}

fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn sh(script: &str) -> std::process::Output {
    run(Command::new("sh").args(["-ec", script]))
}

fn wait_until(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ok() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

impl Cluster {
    /// Bring the control plane and both nodes up (about a minute).
    pub fn start() -> Cluster {
        let dir = TempDir::new("cluster");
        let d = dir.0.clone();
        let mut c = Cluster {
            kubeconfig: d.join("pki/admin.kubeconfig"),
            dir,
            control: vec![],
            proxy: None,
            nodes: vec![],
            sysctls: BTreeMap::new(),
            created_paths: vec![],
            nft_tables_before: String::new(),
        };
        for k in SYSCTLS {
            let v = std::fs::read_to_string(format!("/proc/sys/{}", k.replace('.', "/")))
                .unwrap_or_default();
            c.sysctls.insert(k.to_string(), v.trim().to_string());
        }
        c.created_paths = HOST_PATHS
            .iter()
            .map(PathBuf::from)
            .filter(|p| !p.exists())
            .collect();
        c.nft_tables_before = String::from_utf8_lossy(
            &Command::new("nft")
                .args(["list", "tables"])
                .output()
                .map(|o| o.stdout)
                .unwrap_or_default(),
        )
        .to_string();
        c.pki();
        // bpffs at /sys/fs/bpf, as systemd mounts it on every host: the
        // agents' pins must live in the host's bpffs (a node's own mount
        // would not reach the host, and the test checks the pins there).
        // Left mounted, like systemd's.
        sh("[ \"$(stat -f -c %T /sys/fs/bpf)\" = bpf_fs ] || mount -t bpf bpffs /sys/fs/bpf");
        // No `dummy` links on these kernels: an empty bridge holds the node IPs.
        sh(&format!(
            "ip link add {NODE_IP_LINK} type bridge && ip addr add 10.99.0.1/32 dev {NODE_IP_LINK} && ip addr add 10.99.0.2/32 dev {NODE_IP_LINK} && ip link set {NODE_IP_LINK} up"
        ));
        c.control_plane();
        for (name, idx, ip, port, healthz) in NODES {
            c.node(name, idx, ip, port, healthz);
        }
        c.kube_proxy();
        c
    }

    fn log(&self, name: &str) -> std::fs::File {
        std::fs::create_dir_all(self.dir.0.join("logs")).unwrap();
        std::fs::File::create(self.dir.0.join(format!("logs/{name}.log"))).unwrap()
    }

    /// A component's log (`kubelet-node-a`, `kube-apiserver`, …).
    pub fn component_log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.0.join(format!("logs/{name}.log"))).unwrap_or_default()
    }

    fn pki(&self) {
        let p = self.dir.0.join("pki");
        std::fs::create_dir_all(&p).unwrap();
        sh(&format!(
            r#"cd {p}
openssl genrsa -out ca.key 2048 2>/dev/null
openssl req -x509 -new -key ca.key -sha256 -days 30 -subj /CN=sluice-test-cluster -out ca.crt 2>/dev/null
printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,IP:10.96.0.1,IP:10.99.0.1,IP:10.99.0.2,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n' > server.ext
openssl genrsa -out apiserver.key 2048 2>/dev/null
openssl req -new -key apiserver.key -subj /CN=kube-apiserver -out apiserver.csr
openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 -sha256 -extfile server.ext -out apiserver.crt 2>/dev/null
printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n' > client.ext
openssl genrsa -out kubelet-client.key 2048 2>/dev/null
openssl req -new -key kubelet-client.key -subj /O=system:masters/CN=kube-apiserver-kubelet-client -out kubelet-client.csr
openssl x509 -req -in kubelet-client.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 -sha256 -extfile client.ext -out kubelet-client.crt 2>/dev/null
openssl genrsa -out sa.key 2048 2>/dev/null
openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
"#,
            p = p.display()
        ));
        let users = [
            ("admin", "admin", "admin", "system:masters"),
            ("kcm", "system:kube-controller-manager", "kcm", ""),
            ("sched", "system:kube-scheduler", "sched", ""),
            ("node-a", "system:node:node-a", "node-a", "system:nodes"),
            ("node-b", "system:node:node-b", "node-b", "system:nodes"),
            ("kube-proxy", "system:kube-proxy", "kube-proxy", ""),
        ];
        let mut tokens = String::new();
        for (file, user, uid, group) in users {
            let token = format!("{file}-{:016x}", rand::random::<u64>());
            tokens.push_str(&format!("{token},{user},{uid}"));
            if !group.is_empty() {
                tokens.push_str(&format!(",{group}"));
            }
            tokens.push('\n');
            std::fs::write(
                p.join(format!("{file}.kubeconfig")),
                format!(
                    "apiVersion: v1\nkind: Config\nclusters:\n- cluster: {{server: \"https://{APISERVER}\", certificate-authority: \"{}\"}}\n  name: test\nusers:\n- name: u\n  user: {{token: {token}}}\ncontexts:\n- context: {{cluster: test, user: u}}\n  name: test\ncurrent-context: test\n",
                    p.join("ca.crt").display()
                ),
            )
            .unwrap();
        }
        std::fs::write(p.join("tokens.csv"), tokens).unwrap();
    }

    fn control_plane(&mut self) {
        let d = self.dir.0.clone();
        let p = d.join("pki");
        let bin = cache().join("bin");
        let etcd = Command::new("etcd")
            .args(["--name", "t", "--data-dir"])
            .arg(d.join("etcd"))
            .args([
                "--listen-client-urls",
                &format!("http://{ETCD_CLIENT}"),
                "--advertise-client-urls",
                &format!("http://{ETCD_CLIENT}"),
                "--listen-peer-urls",
                "http://127.0.0.1:42380",
                "--initial-advertise-peer-urls",
                "http://127.0.0.1:42380",
                "--initial-cluster",
                "t=http://127.0.0.1:42380",
                "--listen-metrics-urls",
                "http://127.0.0.1:42381",
            ])
            .stdout(self.log("etcd"))
            .stderr(self.log("etcd"))
            .spawn()
            .expect("etcd");
        self.control.push(("etcd", etcd));
        wait_until("etcd healthy", Duration::from_secs(30), || {
            Command::new("curl")
                .args(["-sf", &format!("http://{ETCD_CLIENT}/health")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
        let f = |n: &str| p.join(n).display().to_string();
        let apiserver = Command::new(bin.join("kube-apiserver"))
            .args([
                &format!("--etcd-servers=http://{ETCD_CLIENT}"),
                "--bind-address=10.99.0.1",
                "--advertise-address=10.99.0.1",
                "--secure-port=46443",
                "--insecure-port=0",
                &format!("--tls-cert-file={}", f("apiserver.crt")),
                &format!("--tls-private-key-file={}", f("apiserver.key")),
                &format!("--client-ca-file={}", f("ca.crt")),
                &format!("--token-auth-file={}", f("tokens.csv")),
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NodeRestriction",
                "--allow-privileged=true",
                &format!("--kubelet-client-certificate={}", f("kubelet-client.crt")),
                &format!("--kubelet-client-key={}", f("kubelet-client.key")),
                "--kubelet-preferred-address-types=InternalIP,Hostname",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                &format!("--service-account-key-file={}", f("sa.pub")),
                &format!("--service-account-signing-key-file={}", f("sa.key")),
                "--api-audiences=https://kubernetes.default.svc.cluster.local",
                "--service-cluster-ip-range=10.96.0.0/24",
                "--enable-priority-and-fairness=false",
            ])
            .stdout(self.log("kube-apiserver"))
            .stderr(self.log("kube-apiserver"))
            .spawn()
            .expect("kube-apiserver");
        self.control.push(("kube-apiserver", apiserver));
        let ca = f("ca.crt");
        wait_until("kube-apiserver ready", Duration::from_secs(60), || {
            Command::new("curl")
                .args([
                    "-sf",
                    "--cacert",
                    &ca,
                    &format!("https://{APISERVER}/readyz"),
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
        let kcm = Command::new(bin.join("kube-controller-manager"))
            .args([
                &format!("--kubeconfig={}", f("kcm.kubeconfig")),
                &format!("--authentication-kubeconfig={}", f("kcm.kubeconfig")),
                &format!("--authorization-kubeconfig={}", f("kcm.kubeconfig")),
                "--bind-address=127.0.0.1",
                "--secure-port=10257",
                "--port=0",
                "--leader-elect=false",
                &format!("--service-account-private-key-file={}", f("sa.key")),
                &format!("--root-ca-file={}", f("ca.crt")),
                &format!("--cluster-signing-cert-file={}", f("ca.crt")),
                &format!("--cluster-signing-key-file={}", f("ca.key")),
                "--use-service-account-credentials=true",
                "--controllers=*",
            ])
            .stdout(self.log("kube-controller-manager"))
            .stderr(self.log("kube-controller-manager"))
            .spawn()
            .expect("kube-controller-manager");
        self.control.push(("kube-controller-manager", kcm));
        let sched = Command::new(bin.join("kube-scheduler"))
            .args([
                &format!("--kubeconfig={}", f("sched.kubeconfig")),
                &format!("--authentication-kubeconfig={}", f("sched.kubeconfig")),
                &format!("--authorization-kubeconfig={}", f("sched.kubeconfig")),
                "--bind-address=127.0.0.1",
                "--secure-port=10259",
                "--port=0",
                "--leader-elect=false",
            ])
            .stdout(self.log("kube-scheduler"))
            .stderr(self.log("kube-scheduler"))
            .spawn()
            .expect("kube-scheduler");
        self.control.push(("kube-scheduler", sched));
        wait_until(
            "the default service account",
            Duration::from_secs(60),
            || self.kubectl_ok(&["get", "serviceaccount", "default", "-n", "default"]),
        );
    }

    fn node(&mut self, name: &'static str, idx: u8, ip: &str, port: u16, healthz: u16) {
        let d = self.dir.0.join(name);
        for sub in [
            "containerd/root",
            "containerd/state",
            "cni",
            "cni-ipam",
            "kubelet",
            "volume-plugins",
            "runc",
            "varlog",
        ] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        let sock = d.join("containerd/containerd.sock");
        let dd = d.display();
        std::fs::write(
            d.join("containerd/config.toml"),
            format!(
                r#"version = 2
root = "{dd}/containerd/root"
state = "{dd}/containerd/state"
oom_score = 0
[grpc]
  address = "{sock}"
[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "{dd}/containerd/opt"
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "localhost/pause:3.4"
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    netns_mounts_under_state_dir = true
    disable_apparmor = true
    restrict_oom_score_adj = true
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "overlayfs"
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          SystemdCgroup = false
          Root = "{dd}/runc"
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "{CNI_BIN_DIR}"
      conf_dir = "{CNI_CONF_DIR}"
      max_conf_num = 1
"#,
                sock = sock.display()
            ),
        )
        .unwrap();
        std::fs::write(
            d.join(format!("cni/10-sluice-{name}.conflist")),
            format!(
                r#"{{"cniVersion": "0.4.0", "name": "sluice-{name}",
  "plugins": [{{"type": "bridge", "bridge": "sluice-br-{idx}", "isGateway": true, "ipMasq": false, "hairpinMode": true,
    "ipam": {{"type": "host-local", "dataDir": "{dd}/cni-ipam",
      "ranges": [[{{"subnet": "10.244.{idx}.0/24", "gateway": "10.244.{idx}.1"}}]], "routes": [{{"dst": "0.0.0.0/0"}}]}}}}]}}
"#
            ),
        )
        .unwrap();
        // A cgroup root of its own in every v1 hierarchy.
        for h in cgroup_v1_hierarchies() {
            std::fs::create_dir_all(h.join(name)).unwrap();
            if h.ends_with("cpuset") {
                for f in ["cpuset.cpus", "cpuset.mems"] {
                    let v = std::fs::read_to_string(h.join(f)).unwrap_or_default();
                    let _ = std::fs::write(h.join(name).join(f), v.trim());
                }
            }
        }
        // containerd in a mount namespace of its own: a private /run and
        // /var/log, and shared propagation as on a systemd host (mount
        // propagation to and from containers needs it; this machine's own
        // mounts are private, and stay so). The node's CNI directories are
        // in its /run, the same paths on every node (a DaemonSet mounts
        // them by one host path): Debian's plugins, and the network
        // configuration.
        let containerd = Command::new("unshare")
            .args(["--mount", "--propagation", "slave", "--", "sh", "-c"])
            .arg(
                "mount -n -t tmpfs -o mode=0755 sluice-run /run && mount -n --bind \"$1/varlog\" /var/log && mount --make-rshared / \
                 && mkdir -p \"$2\" \"$3\" && ln -s /usr/lib/cni/* \"$2\"/ && cp \"$1\"/cni/*.conflist \"$3\"/ \
                 && exec containerd --config \"$1/containerd/config.toml\"",
            )
            .arg("sh")
            .arg(&d)
            .arg(CNI_BIN_DIR)
            .arg(CNI_CONF_DIR)
            .stdout(self.log(&format!("containerd-{name}")))
            .stderr(self.log(&format!("containerd-{name}")))
            .spawn()
            .expect("containerd");
        let cpid = containerd.id();
        self.nodes.push(Node {
            name,
            dir: d.clone(),
            sock: sock.clone(),
            containerd: Some(containerd),
            kubelet: None,
        });
        wait_until(
            &format!("containerd of {name}"),
            Duration::from_secs(30),
            || {
                Command::new("ctr")
                    .arg("-a")
                    .arg(&sock)
                    .arg("version")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            },
        );
        for img in ["pause", "busybox"] {
            self.ctr(
                name,
                &["images", "import"],
                &cache().join(format!("images/{img}.tar")),
            );
        }
        let p = self.dir.0.join("pki");
        std::fs::write(
            d.join("kubelet-config.yaml"),
            format!(
                r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: {ip}
port: {port}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: {healthz}
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: true}}
  x509: {{clientCAFile: {ca}}}
authorization: {{mode: Webhook}}
cgroupDriver: cgroupfs
cgroupRoot: /{name}
cgroupsPerQOS: true
failSwapOn: false
makeIPTablesUtilChains: false
protectKernelDefaults: false
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
volumePluginDir: {dd}/volume-plugins
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {{memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}}
maxPods: 50
"#,
                ca = p.join("ca.crt").display()
            ),
        )
        .unwrap();
        let kubelet = Command::new("nsenter")
            .args(["--target", &cpid.to_string(), "--mount", "--"])
            .arg(cache().join("bin/kubelet"))
            .arg(format!(
                "--config={}",
                d.join("kubelet-config.yaml").display()
            ))
            .arg(format!(
                "--kubeconfig={}",
                p.join(format!("{name}.kubeconfig")).display()
            ))
            .arg("--container-runtime=remote")
            .arg(format!(
                "--container-runtime-endpoint=unix://{}",
                sock.display()
            ))
            .arg(format!(
                "--image-service-endpoint=unix://{}",
                sock.display()
            ))
            .arg(format!("--root-dir={}", d.join("kubelet").display()))
            .arg(format!("--cert-dir={}", d.join("kubelet/pki").display()))
            .arg(format!("--hostname-override={name}"))
            .arg(format!("--node-ip={ip}"))
            .arg("--v=1")
            .stdout(self.log(&format!("kubelet-{name}")))
            .stderr(self.log(&format!("kubelet-{name}")))
            .spawn()
            .expect("kubelet");
        self.nodes.last_mut().unwrap().kubelet = Some(kubelet);
        wait_until(
            &format!("node {name} Ready"),
            Duration::from_secs(90),
            || {
                self.kubectl_out(&[
                    "get",
                    "node",
                    name,
                    "-o",
                    "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
                ]) == "True"
            },
        );
        // The kubelet sets vm.overcommit_memory and kernel.panic* once at
        // start: put the host's values back (ip_forward stays on: the
        // nodes route between their pod subnets).
        self.restore_sysctls(false);
    }

    fn kube_proxy(&mut self) {
        let p = self.dir.0.join("pki");
        let proxy = Command::new(cache().join("bin/kube-proxy"))
            .arg(format!(
                "--kubeconfig={}",
                p.join("kube-proxy.kubeconfig").display()
            ))
            .args([
                "--hostname-override=node-a",
                "--bind-address=10.99.0.1",
                "--cluster-cidr=10.244.0.0/16",
                "--proxy-mode=iptables",
                "--metrics-bind-address=127.0.0.1:10249",
                "--healthz-bind-address=127.0.0.1:10256",
                "--conntrack-max-per-core=0",
                "--conntrack-tcp-timeout-established=0",
                "--conntrack-tcp-timeout-close-wait=0",
            ])
            .stdout(self.log("kube-proxy"))
            .stderr(self.log("kube-proxy"))
            .spawn()
            .expect("kube-proxy");
        self.proxy = Some(proxy);
        wait_until("kube-proxy healthy", Duration::from_secs(30), || {
            Command::new("curl")
                .args(["-sf", "http://127.0.0.1:10256/healthz"])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
    }

    fn restore_sysctls(&self, all: bool) {
        for (k, v) in &self.sysctls {
            if !all && (k == "net.ipv4.ip_forward" || k == "net.ipv4.conf.all.route_localnet") {
                continue;
            }
            let _ = std::fs::write(format!("/proc/sys/{}", k.replace('.', "/")), v);
        }
    }

    /// `ctr` against a node's containerd (`k8s.io` namespace), with `file`
    /// as the last argument.
    pub fn ctr(&self, node: &str, args: &[&str], file: &Path) {
        let n = self.nodes.iter().find(|n| n.name == node).expect("node");
        run(Command::new("ctr")
            .arg("-a")
            .arg(&n.sock)
            .args(["-n", "k8s.io"])
            .args(args)
            .arg(file)
            .stdout(Stdio::null()));
    }

    /// `path` as node `node` sees it (its own mount namespace: its `/run`),
    /// reached through its containerd's `/proc/<pid>/root`.
    pub fn node_path(&self, node: &str, path: &str) -> PathBuf {
        let n = self.nodes.iter().find(|n| n.name == node).expect("node");
        let pid = n.containerd.as_ref().expect("containerd running").id();
        PathBuf::from(format!("/proc/{pid}/root{path}"))
    }

    /// Import an OCI archive into every node's containerd.
    pub fn import_image(&self, archive: &Path) {
        for n in &self.nodes {
            self.ctr(n.name, &["images", "import"], archive);
        }
    }

    /// Give an imported image another name on every node (a "new
    /// version" for rollouts, same content).
    pub fn tag_image(&self, from: &str, to: &str) {
        for n in &self.nodes {
            run(Command::new("ctr")
                .arg("-a")
                .arg(&n.sock)
                .args(["-n", "k8s.io", "images", "tag", "--force", from, to])
                .stdout(Stdio::null()));
        }
    }

    fn kubectl_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("kubectl");
        c.arg("--kubeconfig").arg(&self.kubeconfig).args(args);
        c
    }

    /// Run `kubectl`; panics with its output when it fails.
    pub fn kubectl(&self, args: &[&str]) -> String {
        String::from_utf8_lossy(&run(&mut self.kubectl_cmd(args)).stdout).to_string()
    }

    /// `kubectl`'s standard output, empty when it fails.
    pub fn kubectl_out(&self, args: &[&str]) -> String {
        self.kubectl_cmd(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default()
    }

    pub fn kubectl_ok(&self, args: &[&str]) -> bool {
        self.kubectl_cmd(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// `kubectl apply` of a YAML text.
    pub fn apply(&self, yaml: &str) {
        let f = self
            .dir
            .0
            .join(format!("apply-{:x}.yaml", rand::random::<u32>()));
        std::fs::write(&f, yaml).unwrap();
        self.kubectl(&["apply", "-f", f.to_str().unwrap()]);
    }

    /// Poll `f` until it holds or `limit` passes (then fail with `what`).
    pub fn wait(&self, what: &str, limit: Duration, f: impl FnMut() -> bool) {
        wait_until(what, limit, f)
    }

    fn stop(name: &str, child: &mut Child) {
        // SAFETY: kill(2) on the PID of a child this harness spawned and has
        // not reaped yet.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("{name} did not stop on SIGTERM: killed");
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// The Sluice image, as `deploy/` names it (`ghcr.io/sluice-mesh/sluice:0.1.0`),
/// built with buildah from scratch out of the binaries this build made
/// (stripped) and the eBPF object, with the C libraries they link: an OCI
/// archive in `dir`.
pub fn build_sluice_image(dir: &Path, ebpf_object: &Path) -> PathBuf {
    let bins = crate::netns::workspace_target();
    let root = dir.join("image-root");
    std::fs::create_dir_all(root.join("usr/bin")).unwrap();
    std::fs::create_dir_all(root.join("usr/lib/sluice")).unwrap();
    std::fs::create_dir_all(root.join("tmp")).unwrap();
    // (The CNI plugin is not a command of the image: the agent installs
    // it on the node.)
    for (b, to) in [
        ("sluice-agent", "usr/bin"),
        ("sluice-waypoint", "usr/bin"),
        ("sluicectl", "usr/bin"),
        ("sluice-cni", "usr/lib/sluice"),
    ] {
        run(Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(root.join(to).join(b))
            .arg(bins.join(b)));
    }
    std::fs::copy(ebpf_object, root.join("usr/lib/sluice/sluice-ebpf.o")).unwrap();
    // The shared libraries the binaries load, at the paths ldd names.
    let ldd = run(Command::new("ldd").arg(root.join("usr/bin/sluice-agent")));
    for lib in String::from_utf8_lossy(&ldd.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
    {
        let to = root.join(lib.trim_start_matches('/'));
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(lib, &to).unwrap_or_else(|e| panic!("{lib}: {e}"));
    }
    let archive = dir.join("sluice.tar");
    let store = dir.join("buildah");
    let b = format!(
        "buildah --root {s}/root --runroot {s}/run --storage-driver vfs",
        s = store.display()
    );
    sh(&format!(
        r#"c=$({b} from scratch)
{b} copy "$c" {root}/ /
{b} config --env PATH=/usr/bin --entrypoint '["/usr/bin/sluice-agent"]' "$c"
{b} commit -q "$c" ghcr.io/sluice-mesh/sluice:0.1.0 >/dev/null
{b} push -q ghcr.io/sluice-mesh/sluice:0.1.0 oci-archive:{archive}:ghcr.io/sluice-mesh/sluice:0.1.0
{b} rm "$c" >/dev/null
{b} rmi -a -f >/dev/null 2>&1 || true
"#,
        root = root.display(),
        archive = archive.display()
    ));
    let _ = std::fs::remove_dir_all(&root);
    archive
}

fn cgroup_v1_hierarchies() -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && f[2] == "cgroup").then(|| PathBuf::from(f[1]))
        })
        .collect()
}

/// PIDs whose command line mentions `needle` (the shims of one containerd
/// carry its socket path).
fn pids_mentioning(needle: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| {
                let e = e.ok()?;
                let pid: i32 = e.file_name().to_str()?.parse().ok()?;
                let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
                String::from_utf8_lossy(&cmd)
                    .contains(needle)
                    .then_some(pid)
            })
            .collect()
        })
        .unwrap_or_default()
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Workloads first, while the kubelets run, so sandboxes are torn
        // down properly (CNI DEL, unmounts).
        if self.control.iter().any(|(n, _)| *n == "kube-apiserver") {
            let _ = self
                .kubectl_cmd(&[
                    "delete",
                    "deploy,ds,rs,sts,job",
                    "--all",
                    "-A",
                    "--wait=false",
                ])
                .output();
            let _ = self
                .kubectl_cmd(&[
                    "delete",
                    "pods",
                    "--all",
                    "-A",
                    "--grace-period=1",
                    "--timeout=60s",
                ])
                .output();
        }
        if let Some(mut p) = self.proxy.take() {
            Self::stop("kube-proxy", &mut p);
            let _ = Command::new(cache().join("bin/kube-proxy"))
                .args(["--cleanup", "--proxy-mode=iptables"])
                .output();
            let before = self.nft_tables_before.clone();
            let _ = Command::new("sh")
                .args(["-c", &format!(r#"for ipt in iptables ip6tables; do
  fam=ip; [ $ipt = ip6tables ] && fam=ip6
  for t in filter nat mangle; do
    for c in $($ipt -t $t -S 2>/dev/null | awk '/^-N KUBE-/{{print $2}}'); do $ipt -t $t -F $c; done
    for c in $($ipt -t $t -S 2>/dev/null | awk '/^-N KUBE-/{{print $2}}'); do $ipt -t $t -X $c; done
    if nft list table $fam $t >/dev/null 2>&1 && ! printf '%s\n' "{before}" | grep -qx "table $fam $t" \
       && [ "$($ipt -t $t -S | grep -c '^-A')" = 0 ] && [ "$($ipt -t $t -S | grep -c '^-N')" = 0 ]; then
      nft delete table $fam $t
    fi
  done
done"#)])
                .output();
        }
        for n in &mut self.nodes {
            if let Some(mut k) = n.kubelet.take() {
                Self::stop(&format!("kubelet-{}", n.name), &mut k);
            }
        }
        for n in &mut self.nodes {
            let sock = n.sock.display().to_string();
            let tasks = Command::new("ctr")
                .args(["-a", &sock, "-n", "k8s.io", "tasks", "ls", "-q"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
                .unwrap_or_default();
            for t in tasks.lines() {
                let _ = Command::new("ctr")
                    .args([
                        "-a", &sock, "-n", "k8s.io", "tasks", "kill", "-s", "SIGKILL", t,
                    ])
                    .output();
            }
            if let Some(mut c) = n.containerd.take() {
                Self::stop(&format!("containerd-{}", n.name), &mut c);
            }
            for pid in pids_mentioning(&sock) {
                // SAFETY: kill(2) on a shim of this cluster's containerd
                // (its command line names this cluster's socket).
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
        while let Some((name, mut child)) = self.control.pop() {
            Self::stop(name, &mut child);
        }
        // Anything still mounted under the cluster's directory (nothing,
        // normally: the mounts lived in the nodes' own namespaces).
        let root = format!("{}/", self.dir.0.display());
        let mut mounts: Vec<String> = std::fs::read_to_string("/proc/mounts")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
            .filter(|m| m.starts_with(&root))
            .collect();
        mounts.sort_by(|a, b| b.cmp(a));
        for m in mounts {
            let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
        }
        for l in ["sluice-br-1", "sluice-br-2", NODE_IP_LINK] {
            let _ = Command::new("ip").args(["link", "del", l]).output();
        }
        for n in &self.nodes {
            for h in cgroup_v1_hierarchies() {
                let root = h.join(n.name);
                if root.exists() {
                    let _ = Command::new("find")
                        .arg(&root)
                        .args(["-depth", "-type", "d", "-exec", "rmdir", "{}", ";"])
                        .output();
                }
            }
            let _ = &n.dir;
        }
        // What Sluice's agents pinned for these nodes (uninstalling Sluice
        // does not remove it yet: capture stays, failing closed).
        for (name, ..) in NODES {
            let _ = std::fs::remove_dir_all(format!("/sys/fs/bpf/sluice/{name}"));
        }
        let _ = std::fs::remove_dir("/sys/fs/bpf/sluice");
        self.restore_sysctls(true);
        for p in &self.created_paths {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}
