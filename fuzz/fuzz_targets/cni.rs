//! What the CNI plugin and the agent read from outside: the agent's socket
//! requests, a node's network configuration (which the agent edits), and
//! a CNI result's addresses. None may panic; an edited configuration keeps
//! exactly one entry of ours, last, and taking it out again leaves none.
#![no_main]

use libfuzzer_sys::fuzz_target;
use node_agent::cni::install::{with_plugin, without_plugin};
use node_agent::cni::plugin::result_ips;
use node_agent::cni::{PluginConfig, Request, PLUGIN_TYPE};

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<Request>(data);
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        let _ = result_ips(&v);
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let entry = PluginConfig {
        socket: "/run/sluice/cni.sock".into(),
        cache: "/run/sluice/cni-cache.json".into(),
        exclude_namespaces: vec!["kube-system".into()],
    }
    .entry();
    let Ok(list) = with_plugin(text, &entry) else {
        return;
    };
    let plugins = list["plugins"].as_array().expect("a list");
    let ours = plugins
        .iter()
        .filter(|p| p["type"] == PLUGIN_TYPE)
        .count();
    assert_eq!(ours, 1);
    assert_eq!(plugins.last(), Some(&entry));
    let back = without_plugin(&list.to_string()).expect("ours was there");
    assert!(back["plugins"]
        .as_array()
        .expect("a list")
        .iter()
        .all(|p| p["type"] != PLUGIN_TYPE));
});
