//! A real Kubernetes API server for tests: etcd and `kube-apiserver`
//! (v1.20, built from Debian's source package by
//! `xtask/scripts/kube-apiserver.sh`) on loopback ports of their own, an
//! admin token, a kubeconfig for clients and `kubectl`, and Sluice's CRDs
//! installed. Processes and data are removed when dropped, also on failure.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::TempDir;

/// The cached API server binary.
pub fn apiserver_binary() -> PathBuf {
    std::env::var("SLUICE_KUBE_APISERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from("/var/cache/sluice-kube/bin/kube-apiserver"))
}

/// helm, fetched next to the API server by the same script.
pub fn helm_binary() -> PathBuf {
    apiserver_binary().with_file_name("helm")
}

/// Run `helm` (against `kubeconfig` when given) and return its standard
/// output; panics with everything it printed when it fails.
pub fn helm(kubeconfig: Option<&Path>, args: &[&str]) -> String {
    let mut cmd = Command::new(helm_binary());
    if let Some(k) = kubeconfig {
        cmd.arg("--kubeconfig").arg(k);
    }
    let out = cmd.args(args).output().unwrap();
    assert!(
        out.status.success(),
        "helm {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Whether the API server tests can run (or, with `SLUICE_E2E_REQUIRED=1`,
/// a panic naming what is missing).
pub fn kube_available() -> bool {
    let missing = [
        apiserver_binary(),
        helm_binary(),
        PathBuf::from("/usr/bin/etcd"),
        PathBuf::from("/usr/bin/kubectl"),
    ]
    .into_iter()
    .find(|p| !p.exists());
    match missing {
        None => true,
        Some(p) if std::env::var("SLUICE_E2E_REQUIRED").as_deref() == Ok("1") => {
            panic!(
                "Kubernetes tests need {} (cargo xtask setup builds it)",
                p.display()
            )
        }
        Some(p) => {
            eprintln!("skipping Kubernetes test: {} missing", p.display());
            false
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// etcd + kube-apiserver.
pub struct KubeApi {
    pub dir: TempDir,
    pub port: u16,
    etcd_port: u16,
    etcd: Option<Child>,
    apiserver: Option<Child>,
    pub kubeconfig: PathBuf,
}

impl KubeApi {
    pub fn start() -> KubeApi {
        let dir = TempDir::new("kube");
        let d = dir.0.clone();
        let run = |args: &[&str]| {
            let st = Command::new(args[0])
                .args(&args[1..])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .unwrap();
            assert!(st.success(), "{args:?}");
        };
        run(&[
            "openssl",
            "genrsa",
            "-out",
            d.join("sa.key").to_str().unwrap(),
            "2048",
        ]);
        run(&[
            "openssl",
            "rsa",
            "-in",
            d.join("sa.key").to_str().unwrap(),
            "-pubout",
            "-out",
            d.join("sa.pub").to_str().unwrap(),
        ]);
        std::fs::write(
            d.join("tokens.csv"),
            "test-admin-token,admin,admin,system:masters\n",
        )
        .unwrap();
        let mut api = KubeApi {
            kubeconfig: d.join("kubeconfig"),
            port: free_port(),
            etcd_port: free_port(),
            dir,
            etcd: None,
            apiserver: None,
        };
        api.start_etcd();
        api.start_apiserver();
        api.kubectl(&[
            "apply",
            "-f",
            concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/crds"),
        ]);
        // CRDs are served a moment after they are created.
        api.wait(|| {
            api.kubectl_ok(&["get", "httproutes.gateway.networking.k8s.io", "-A"])
                && api.kubectl_ok(&["get", "authorizationpolicies.security.istio.io", "-A"])
        });
        api
    }

    fn log(&self, name: &str) -> std::fs::File {
        std::fs::File::create(self.dir.0.join(format!("{name}.log"))).unwrap()
    }

    fn start_etcd(&mut self) {
        let d = &self.dir.0;
        let peer = free_port();
        let client = format!("http://127.0.0.1:{}", self.etcd_port);
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new("etcd")
            .args(["--name", "t", "--data-dir"])
            .arg(d.join("etcd"))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
            ])
            .args(["--initial-cluster", &format!("t={peer_url}")])
            .stdout(self.log("etcd"))
            .stderr(self.log("etcd-err"))
            .spawn()
            .expect("etcd");
        self.etcd = Some(child);
    }

    /// Start (or restart) the API server; returns when it is ready.
    pub fn start_apiserver(&mut self) {
        let d = &self.dir.0;
        let child = Command::new(apiserver_binary())
            .arg(format!(
                "--etcd-servers=http://127.0.0.1:{}",
                self.etcd_port
            ))
            .args(["--bind-address=127.0.0.1", "--advertise-address=127.0.0.1"])
            .arg(format!("--secure-port={}", self.port))
            .arg(format!("--cert-dir={}", d.join("certs").display()))
            .arg(format!(
                "--token-auth-file={}",
                d.join("tokens.csv").display()
            ))
            .arg("--authorization-mode=RBAC")
            // As on real clusters (kubeadm, kind): the DaemonSet's init
            // container that mounts bpffs on the host is privileged.
            .arg("--allow-privileged=true")
            .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
            .arg(format!(
                "--service-account-key-file={}",
                d.join("sa.pub").display()
            ))
            .arg(format!(
                "--service-account-signing-key-file={}",
                d.join("sa.key").display()
            ))
            .arg("--service-cluster-ip-range=10.96.0.0/24")
            .arg("--disable-admission-plugins=ServiceAccount")
            .arg("--enable-priority-and-fairness=false")
            .stdout(self.log("apiserver"))
            .stderr(self.log("apiserver-err"))
            .spawn()
            .expect("kube-apiserver");
        self.apiserver = Some(child);
        // The serving certificate appears first; then the kubeconfig trusts it.
        let cert = d.join("certs/apiserver.crt");
        self.wait(|| cert.exists());
        std::thread::sleep(Duration::from_millis(200));
        let ca = std::fs::read(&cert).unwrap();
        let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &ca);
        std::fs::write(
            &self.kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: t\n  cluster:\n    server: https://127.0.0.1:{}\n    certificate-authority-data: {b64}\nusers:\n- name: admin\n  user:\n    token: test-admin-token\ncontexts:\n- name: t\n  context: {{cluster: t, user: admin}}\ncurrent-context: t\n",
                self.port
            ),
        )
        .unwrap();
        self.wait(|| self.kubectl_ok(&["get", "--raw", "/readyz"]));
    }

    /// Stop the API server (etcd keeps the data).
    pub fn stop_apiserver(&mut self) {
        if let Some(mut c) = self.apiserver.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn wait(&self, f: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !f() {
            assert!(
                Instant::now() < deadline,
                "API server not ready:\n{}",
                std::fs::read_to_string(self.dir.0.join("apiserver-err.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn kubectl_ok(&self, args: &[&str]) -> bool {
        Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Run kubectl; panics with its output on failure.
    pub fn kubectl(&self, args: &[&str]) -> String {
        let out = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .expect("kubectl");
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// `kubectl apply` YAML given inline.
    pub fn apply(&self, yaml: &str) -> String {
        let path = self
            .dir
            .0
            .join(format!("apply-{}.yaml", rand::random::<u64>()));
        std::fs::write(&path, yaml).unwrap();
        self.kubectl(&["apply", "-f", path.to_str().unwrap()])
    }
}

/// `yaml` as the v1.20 API server of these tests accepts it: DaemonSet
/// surge (Kubernetes 1.22+) becomes the one-node-at-a-time strategy of
/// older clusters. Callers check the surge settings themselves.
pub fn for_api_server_1_20(yaml: &str) -> String {
    let mut out = String::new();
    for line in yaml.lines() {
        match line.trim() {
            "maxSurge: 1" => continue,
            "maxUnavailable: 0" => out.push_str(&line.replace(": 0", ": 1")),
            _ => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        // The API server before etcd (the other order makes it hang).
        self.stop_apiserver();
        if let Some(mut c) = self.etcd.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
