//! The plugin's side of the CNI protocol (`sluice-cni`, run by the
//! container runtime): read the command from the environment and the
//! network configuration from standard input, ask the agent, and answer
//! with the previous plugin's result or a CNI error. Kept here, not in the
//! binary, so the tests drive it with a real socket.

use std::collections::HashMap;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::time::Duration;

use serde_json::{json, Value};

use super::{Cache, PluginConfig, PodAdded, Reply, Request};
use crate::fdpass;

/// The CNI versions this plugin speaks.
pub const SUPPORTED: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// How long the plugin waits for the agent's answer (the agent itself
/// gives up sooner, with a reason).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// CNI's "try again later" (spec 1.0, code 11): the kubelet retries.
const TRY_AGAIN: u32 = 11;
/// CNI's "invalid network config" (code 7).
const BAD_CONFIG: u32 = 7;

/// What the plugin prints and how it exits.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    pub stdout: String,
    pub code: i32,
}

fn error(version: &str, code: u32, msg: &str, details: String) -> Outcome {
    Outcome {
        stdout: json!({"cniVersion": version, "code": code, "msg": msg, "details": details})
            .to_string(),
        code: 1,
    }
}

/// `CNI_ARGS` (`K=V;K=V`) as a map.
fn cni_args(args: &str) -> HashMap<&str, &str> {
    args.split(';')
        .filter_map(|kv| kv.split_once('='))
        .collect()
}

/// The addresses in a CNI result (`ips[].address`, `a.b.c.d/len`).
pub fn result_ips(result: &Value) -> Vec<IpAddr> {
    result
        .get("ips")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|ip| ip.get("address")?.as_str()?.split('/').next()?.parse().ok())
        .collect()
}

/// Run one plugin invocation. `env` reads the `CNI_*` variables.
pub fn run(env: &dyn Fn(&str) -> Option<String>, stdin: &[u8]) -> Outcome {
    let command = env("CNI_COMMAND").unwrap_or_default();
    if command == "VERSION" {
        return Outcome {
            stdout: json!({"cniVersion": "1.0.0", "supportedVersions": SUPPORTED}).to_string(),
            code: 0,
        };
    }
    let conf: Value = match serde_json::from_slice(stdin) {
        Ok(v) => v,
        Err(e) => {
            return error(
                "1.0.0",
                BAD_CONFIG,
                "sluice-cni: the network configuration is not JSON",
                e.to_string(),
            )
        }
    };
    let version = conf
        .get("cniVersion")
        .and_then(Value::as_str)
        .unwrap_or("1.0.0")
        .to_string();
    let ours: PluginConfig = match serde_json::from_value(conf.clone()) {
        Ok(c) => c,
        Err(e) => {
            return error(
                &version,
                BAD_CONFIG,
                "sluice-cni: bad plugin configuration",
                e.to_string(),
            )
        }
    };
    let args = env("CNI_ARGS").unwrap_or_default();
    let args = cni_args(&args);
    let pod = match (args.get("K8S_POD_NAMESPACE"), args.get("K8S_POD_NAME")) {
        (Some(ns), Some(name)) => Some((ns.to_string(), name.to_string())),
        _ => None,
    };
    let prev = conf.get("prevResult").cloned();
    let pass = || Outcome {
        stdout: prev
            .clone()
            .unwrap_or_else(|| json!({"cniVersion": version}))
            .to_string(),
        code: 0,
    };
    match command.as_str() {
        "ADD" => {}
        "DEL" => {
            // Best effort: the sandbox goes whatever the agent says.
            if let Some((namespace, name)) = pod {
                let _ = ask(&ours, &Request::Del { namespace, name }, None);
            }
            return Outcome {
                stdout: String::new(),
                code: 0,
            };
        }
        "CHECK" | "GC" | "STATUS" => {
            return Outcome {
                stdout: String::new(),
                code: 0,
            }
        }
        other => {
            return error(
                &version,
                4,
                "sluice-cni: unknown CNI_COMMAND",
                other.to_string(),
            )
        }
    }
    // Not a Kubernetes pod, or one that never waits: nothing to do.
    let Some((namespace, name)) = pod else {
        return pass();
    };
    if ours.exclude_namespaces.contains(&namespace) {
        return pass();
    }
    let netns_path = env("CNI_NETNS").unwrap_or_default();
    let netns = match std::fs::File::open(&netns_path) {
        Ok(f) => f,
        Err(e) => {
            return error(
                &version,
                TRY_AGAIN,
                "sluice-cni: cannot open the pod's network namespace",
                format!("{netns_path}: {e}"),
            )
        }
    };
    let request = Request::Add(PodAdded {
        namespace: namespace.clone(),
        name: name.clone(),
        uid: args.get("K8S_POD_UID").unwrap_or(&"").to_string(),
        netns: netns_path,
        ips: prev.as_ref().map(result_ips).unwrap_or_default(),
    });
    match ask(&ours, &request, Some(&netns)) {
        Ok(Reply::Captured | Reply::Skipped) => pass(),
        Ok(Reply::Error { message }) => error(
            &version,
            TRY_AGAIN,
            "sluice-cni: the node's Sluice agent cannot capture the pod yet",
            format!("{namespace}/{name}: {message}"),
        ),
        Err(e) => {
            // The agent is away: hold up what may belong in the mesh.
            let cache = Cache::read(&ours.cache);
            match cache {
                Some(c) if !c.namespaces.contains(&namespace) => pass(),
                Some(_) => error(
                    &version,
                    TRY_AGAIN,
                    "sluice-cni: the node's Sluice agent is not running; pods of the mesh wait for it",
                    format!("{namespace}/{name}: {}: {e}", ours.socket.display()),
                ),
                None => error(
                    &version,
                    TRY_AGAIN,
                    "sluice-cni: the node's Sluice agent has not run yet; pods wait for it",
                    format!(
                        "{namespace}/{name}: {}: {e}; no cache at {}",
                        ours.socket.display(),
                        ours.cache.display()
                    ),
                ),
            }
        }
    }
}

/// One request to the agent, with the namespace descriptor if any.
fn ask(
    conf: &PluginConfig,
    request: &Request,
    netns: Option<&std::fs::File>,
) -> std::io::Result<Reply> {
    let sock = fdpass::connect_to(&conf.socket)?;
    fdpass::set_timeout(&sock, ANSWER_TIMEOUT)?;
    let fds: Vec<_> = netns.iter().map(|f| f.as_raw_fd()).collect();
    fdpass::send(
        &sock,
        &serde_json::to_vec(request).expect("plain data"),
        &fds,
    )?;
    let (bytes, _) = fdpass::recv(&sock, super::MAX_REQUEST)?;
    if bytes.is_empty() {
        return Err(std::io::Error::other("the agent hung up without answering"));
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| std::io::Error::other(format!("an answer that does not parse: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| vars.get(k).cloned()
    }

    fn scratch() -> PathBuf {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let d = std::env::temp_dir().join(format!("sluice-cni-plugin-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn conf(dir: &std::path::Path) -> Value {
        json!({
            "cniVersion": "0.4.0", "name": "pods", "type": "sluice-cni",
            "socket": dir.join("cni.sock"), "cache": dir.join("cache.json"),
            "excludeNamespaces": ["kube-system"],
            "prevResult": {"cniVersion": "0.4.0", "ips": [{"version": "4", "address": "10.244.1.9/24"}]}
        })
    }

    const ARGS: &str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=late;K8S_POD_UID=u-1";

    #[test]
    fn version_and_bad_config() {
        let out = run(&env_of(&[("CNI_COMMAND", "VERSION")]), b"");
        assert_eq!(out.code, 0);
        assert!(out.stdout.contains("0.4.0"));
        let out = run(&env_of(&[("CNI_COMMAND", "ADD")]), b"{nope");
        assert_eq!(out.code, 1);
        let v: Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(v["code"], 7);
        let out = run(
            &env_of(&[("CNI_COMMAND", "ADD")]),
            br#"{"cniVersion": "0.4.0"}"#,
        );
        assert_eq!(out.code, 1, "no socket, no cache: {}", out.stdout);
    }

    #[test]
    fn without_the_agent_only_pods_outside_the_mesh_start() {
        let dir = scratch();
        let c = conf(&dir).to_string();
        let netns = "/proc/self/ns/net";
        let add = |args: &str| {
            run(
                &env_of(&[
                    ("CNI_COMMAND", "ADD"),
                    ("CNI_ARGS", args),
                    ("CNI_NETNS", netns),
                ]),
                c.as_bytes(),
            )
        };
        // No cache: every pod waits, except in the excluded namespaces.
        let out = add(ARGS);
        assert_eq!(out.code, 1);
        let v: Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(v["code"], 11);
        assert!(v["msg"].as_str().unwrap().contains("has not run yet"));
        let out = add("K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=dns");
        assert_eq!(out.code, 0);
        assert_eq!(
            result_ips(&serde_json::from_str(&out.stdout).unwrap()).len(),
            1
        );
        // Not a pod: passed through.
        assert_eq!(add("").code, 0);

        let cache = Cache {
            namespaces: ["shop".to_string()].into(),
        };
        cache.write(&dir.join("cache.json")).unwrap();
        assert_eq!(add(ARGS).code, 1, "the mesh's pods wait");
        assert_eq!(add("K8S_POD_NAMESPACE=plain;K8S_POD_NAME=x").code, 0);
        // DEL always succeeds.
        let del = run(
            &env_of(&[("CNI_COMMAND", "DEL"), ("CNI_ARGS", ARGS)]),
            c.as_bytes(),
        );
        assert_eq!(del.code, 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_agent_gets_the_pod_and_its_namespace() {
        let dir = scratch();
        // A fake agent on a SEQPACKET socket answering in turn.
        let sock = fdpass::listen_at(&dir.join("cni.sock"), 4).unwrap();
        let agent = std::thread::spawn(move || {
            let mut seen = vec![];
            for reply in [
                Reply::Captured,
                Reply::Error {
                    message: "not in the model yet".into(),
                },
            ] {
                let raw = nix::sys::socket::accept(sock.as_raw_fd()).unwrap();
                // SAFETY: accept just returned this descriptor.
                let conn =
                    unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
                let (bytes, fds) = fdpass::recv(&conn, crate::cni::MAX_REQUEST).unwrap();
                seen.push((
                    serde_json::from_slice::<Request>(&bytes).unwrap(),
                    fds.len(),
                ));
                fdpass::send(&conn, &serde_json::to_vec(&reply).unwrap(), &[]).unwrap();
            }
            seen
        });
        let c = conf(&dir).to_string();
        let env = env_of(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_ARGS", ARGS),
            ("CNI_NETNS", "/proc/self/ns/net"),
        ]);
        let out = run(&env, c.as_bytes());
        assert_eq!(out.code, 0, "{}", out.stdout);
        let out = run(&env, c.as_bytes());
        assert_eq!(out.code, 1);
        assert!(
            out.stdout.contains("not in the model yet"),
            "{}",
            out.stdout
        );
        let seen = agent.join().unwrap();
        assert_eq!(
            seen[0],
            (
                Request::Add(PodAdded {
                    namespace: "shop".into(),
                    name: "late".into(),
                    uid: "u-1".into(),
                    netns: "/proc/self/ns/net".into(),
                    ips: vec!["10.244.1.9".parse().unwrap()],
                }),
                1
            )
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
