//! Objects from the API server: a JSON array of Kubernetes objects (any
//! kind, any shape) goes through the same translation the watcher uses; a
//! malformed object is reported and left out, never a panic.
#![no_main]

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use kube::core::DynamicObject;
use libfuzzer_sys::fuzz_target;
use mesh_core::kube::translate::{translate, ClusterState};
use serde_json::Value;

fn typed<T: serde::de::DeserializeOwned>(v: &Value) -> Option<T> {
    serde_json::from_value(v.clone()).ok()
}

fuzz_target!(|data: &[u8]| {
    let Ok(Value::Array(objects)) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let mut state = ClusterState::default();
    for o in &objects {
        match o.get("kind").and_then(Value::as_str) {
            Some("Namespace") => state.namespaces.extend(typed::<Namespace>(o)),
            Some("Node") => state.nodes.extend(typed::<Node>(o)),
            Some("Pod") => state.pods.extend(typed::<Pod>(o)),
            Some("Service") => state.services.extend(typed::<Service>(o)),
            Some(kind) => {
                let Some(d) = typed::<DynamicObject>(o) else {
                    continue;
                };
                match kind {
                    "AuthorizationPolicy" => state.authorization_policies.push(d),
                    "PeerAuthentication" => state.peer_authentications.push(d),
                    "Gateway" => state.gateways.push(d),
                    "HTTPRoute" => state.http_routes.push(d),
                    "DestinationRule" => state.destination_rules.push(d),
                    _ => {}
                }
            }
            None => {}
        }
    }
    let netns = |_: &Pod| None;
    let t = translate(&state, "cluster.local", "istio-system", &netns);
    let _ = mesh_core::analyze::analyze(&t.model);
});
