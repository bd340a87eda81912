//! Putting the plugin on the node and taking it off: the binary into the
//! CNI binary directory, the entry at the end of the primary network
//! configuration's `plugins` (a single-plugin `.conf` becomes a
//! `.conflist`, as the runtime only chains lists). Every write is a
//! rename, so the runtime never reads half a file; the agent re-checks on
//! a timer, because the network plugin may rewrite its configuration.

use std::io;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{PluginConfig, PLUGIN_TYPE};

/// Why the plugin could not be installed or removed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: not a CNI network configuration: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("{dir}: no CNI network configuration yet (the network plugin writes one)")]
    NoConfig { dir: PathBuf },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> InstallError + '_ {
    move |source| InstallError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The node's CNI directories (host paths as the agent sees them).
#[derive(Debug, Clone)]
pub struct Dirs {
    pub bin: PathBuf,
    pub conf: PathBuf,
}

/// The runtime's choice among the configurations in `dir`: the first by
/// name of `.conf`, `.conflist` and `.json` files.
pub fn primary(dir: &Path) -> Result<Option<PathBuf>, InstallError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io_err(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("conf" | "conflist" | "json")
                )
        })
        .collect();
    files.sort();
    Ok(files.into_iter().next())
}

fn is_ours(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

/// `config` (the text of a `.conf` or `.conflist`) as a list ending in
/// `entry`, any earlier entry of ours replaced.
pub fn with_plugin(config: &str, entry: &Value) -> Result<Value, String> {
    let mut v: Value = serde_json::from_str(config).map_err(|e| e.to_string())?;
    if !v.is_object() {
        return Err("not a JSON object".into());
    }
    if v.get("plugins").is_none() {
        // A single plugin: wrap it.
        if v.get("type").and_then(Value::as_str).is_none() {
            return Err("neither `plugins` nor `type`".into());
        }
        let name = v.get("name").cloned().unwrap_or(Value::Null);
        let version = v.get("cniVersion").cloned().unwrap_or(Value::Null);
        v = serde_json::json!({"cniVersion": version, "name": name, "plugins": [v]});
    }
    let plugins = v["plugins"]
        .as_array_mut()
        .ok_or("`plugins` is not a list")?;
    plugins.retain(|p| !is_ours(p));
    plugins.push(entry.clone());
    Ok(v)
}

/// `config` without our entry (`None` when it had none).
pub fn without_plugin(config: &str) -> Option<Value> {
    let mut v: Value = serde_json::from_str(config).ok()?;
    let plugins = v.get_mut("plugins")?.as_array_mut()?;
    let before = plugins.len();
    plugins.retain(|p| !is_ours(p));
    (plugins.len() != before).then_some(v)
}

fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_file_name(format!(
        ".{}.sluice-tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("x")
    ));
    std::fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// A file as last seen (inode, size, modification time): the installed
/// binary is compared byte for byte only when it or its source changed
/// since the last check, not on every round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    ino: u64,
    len: u64,
    modified: Option<std::time::SystemTime>,
}

impl Stamp {
    fn of(path: &Path) -> Option<Stamp> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(Stamp {
            ino: m.ino(),
            len: m.len(),
            modified: m.modified().ok(),
        })
    }
}

/// The source binary and the installed copy, when last found identical.
pub type Verified = Option<(Stamp, Stamp)>;

/// Install (or re-install) the plugin: `binary` into `dirs.bin`, the entry
/// into the primary configuration. Returns whether anything changed.
/// `verified` carries what the previous call found over to the next.
pub fn ensure(
    dirs: &Dirs,
    binary: &Path,
    config: &PluginConfig,
    verified: &mut Verified,
) -> Result<bool, InstallError> {
    let mut changed = false;
    let target = dirs.bin.join(PLUGIN_TYPE);
    let seen = Stamp::of(binary).zip(Stamp::of(&target));
    if seen.is_none() || seen != *verified {
        let new = std::fs::read(binary).map_err(io_err(binary))?;
        if std::fs::read(&target).ok().as_deref() != Some(&new[..]) {
            write_atomic(&target, &new, 0o755)?;
            changed = true;
        }
        *verified = Stamp::of(binary).zip(Stamp::of(&target));
    }
    let Some(path) = primary(&dirs.conf)? else {
        return Err(InstallError::NoConfig {
            dir: dirs.conf.clone(),
        });
    };
    let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    let list = with_plugin(&text, &config.entry()).map_err(|reason| InstallError::Config {
        path: path.clone(),
        reason,
    })?;
    let is_list = path.extension().and_then(|e| e.to_str()) == Some("conflist");
    let out_path = if is_list {
        path.clone()
    } else {
        path.with_extension("conflist")
    };
    let current: Option<Value> = serde_json::from_str(&text).ok();
    if !is_list || current.as_ref() != Some(&list) {
        let mut bytes = serde_json::to_vec_pretty(&list).expect("plain data");
        bytes.push(b'\n');
        write_atomic(&out_path, &bytes, 0o644)?;
        if out_path != path {
            std::fs::remove_file(&path).map_err(io_err(&path))?;
        }
        changed = true;
    }
    Ok(changed)
}

/// Take the plugin off the node: its entry out of every configuration,
/// then the binary.
pub fn remove(dirs: &Dirs) -> Result<(), InstallError> {
    if let Ok(entries) = std::fs::read_dir(&dirs.conf) {
        for path in entries.filter_map(|e| e.ok().map(|e| e.path())) {
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            if let Some(v) = without_plugin(&text) {
                let mut bytes = serde_json::to_vec_pretty(&v).expect("plain data");
                bytes.push(b'\n');
                write_atomic(&path, &bytes, 0o644)?;
            }
        }
    }
    let target = dirs.bin.join(PLUGIN_TYPE);
    match std::fs::remove_file(&target) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(&target)(e)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> PluginConfig {
        PluginConfig {
            socket: "/run/sluice/cni.sock".into(),
            cache: "/run/sluice/cni-cache.json".into(),
            exclude_namespaces: vec!["kube-system".into()],
        }
    }

    fn scratch(name: &str) -> Dirs {
        let root = std::env::temp_dir().join(format!("sluice-cni-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let dirs = Dirs {
            bin: root.join("bin"),
            conf: root.join("net.d"),
        };
        std::fs::create_dir_all(&dirs.bin).unwrap();
        std::fs::create_dir_all(&dirs.conf).unwrap();
        dirs
    }

    const BRIDGE: &str = r#"{"cniVersion": "0.4.0", "name": "pods", "plugins": [
        {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local"}},
        {"type": "portmap", "capabilities": {"portMappings": true}}]}"#;

    #[test]
    fn the_entry_goes_last_once_and_comes_out_again() {
        let entry = config().entry();
        let v = with_plugin(BRIDGE, &entry).unwrap();
        let types: Vec<&str> = v["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["bridge", "portmap", "sluice-cni"]);
        assert_eq!(v["plugins"][2]["socket"], "/run/sluice/cni.sock");
        assert_eq!(v["plugins"][2]["excludeNamespaces"][0], "kube-system");
        // Again: still once.
        let again = with_plugin(&v.to_string(), &entry).unwrap();
        assert_eq!(again, v);
        let back = without_plugin(&v.to_string()).unwrap();
        assert_eq!(back, serde_json::from_str::<Value>(BRIDGE).unwrap());
        assert!(without_plugin(BRIDGE).is_none(), "nothing to take out");
    }

    #[test]
    fn a_single_plugin_becomes_a_list_and_garbage_is_named() {
        let single = r#"{"cniVersion": "0.3.1", "name": "k8s", "type": "bridge"}"#;
        let v = with_plugin(single, &config().entry()).unwrap();
        assert_eq!(v["name"], "k8s");
        assert_eq!(v["cniVersion"], "0.3.1");
        assert_eq!(v["plugins"][0]["type"], "bridge");
        assert_eq!(v["plugins"][1]["type"], "sluice-cni");
        assert!(with_plugin("[1, 2]", &config().entry()).is_err());
        assert!(with_plugin("{\"name\": \"x\"}", &config().entry()).is_err());
        assert!(with_plugin("not json", &config().entry()).is_err());
    }

    #[test]
    fn install_and_remove_on_disk() {
        let dirs = scratch("disk");
        let binary = dirs.bin.parent().unwrap().join("plugin-src");
        std::fs::write(&binary, b"#!/bin/sh\n").unwrap();
        let mut verified = None;
        assert!(matches!(
            ensure(&dirs, &binary, &config(), &mut verified),
            Err(InstallError::NoConfig { .. })
        ));
        // The runtime reads the first file by name: that one is edited.
        std::fs::write(
            dirs.conf.join("10-pods.conf"),
            r#"{"cniVersion": "0.4.0", "name": "pods", "type": "bridge"}"#,
        )
        .unwrap();
        std::fs::write(dirs.conf.join("99-other.conflist"), BRIDGE).unwrap();
        assert!(ensure(&dirs, &binary, &config(), &mut verified).unwrap());
        assert!(!dirs.conf.join("10-pods.conf").exists());
        let list: Value =
            serde_json::from_slice(&std::fs::read(dirs.conf.join("10-pods.conflist")).unwrap())
                .unwrap();
        assert_eq!(list["plugins"][1]["type"], "sluice-cni");
        assert_eq!(
            std::fs::read_to_string(dirs.conf.join("99-other.conflist")).unwrap(),
            BRIDGE
        );
        assert_eq!(
            std::fs::read(dirs.bin.join("sluice-cni")).unwrap(),
            b"#!/bin/sh\n"
        );
        assert!(
            !ensure(&dirs, &binary, &config(), &mut verified).unwrap(),
            "already there"
        );

        // The network plugin rewrites its file: the entry comes back.
        std::fs::write(dirs.conf.join("10-pods.conflist"), BRIDGE).unwrap();
        assert!(ensure(&dirs, &binary, &config(), &mut verified).unwrap());
        // Someone replaces the installed binary: it is put back.
        std::fs::write(dirs.bin.join("sluice-cni"), b"#!/bin/sh\nexit 1\n").unwrap();
        assert!(ensure(&dirs, &binary, &config(), &mut verified).unwrap());
        assert_eq!(
            std::fs::read(dirs.bin.join("sluice-cni")).unwrap(),
            b"#!/bin/sh\n"
        );
        // A new release of the source: installed too.
        std::fs::write(&binary, b"#!/bin/sh\n# v2\n").unwrap();
        assert!(ensure(&dirs, &binary, &config(), &mut verified).unwrap());
        assert!(!ensure(&dirs, &binary, &config(), &mut verified).unwrap());

        remove(&dirs).unwrap();
        let list: Value =
            serde_json::from_slice(&std::fs::read(dirs.conf.join("10-pods.conflist")).unwrap())
                .unwrap();
        assert_eq!(list, serde_json::from_str::<Value>(BRIDGE).unwrap());
        assert!(!dirs.bin.join("sluice-cni").exists());
        remove(&dirs).unwrap();
        std::fs::remove_dir_all(dirs.bin.parent().unwrap()).unwrap();
    }
}
