//! Route status in Kubernetes mode: for every HTTPRoute attached to a
//! Service this waypoint serves, `status.parents[]` gets the `Accepted` and
//! `ResolvedRefs` conditions (`mesh_core::model::route_status`), as
//! conformant implementations write them, so `kubectl get httproute -o
//! yaml` tells a user why a route does not work. Entries of other
//! controllers are kept; ours are rewritten only when they change (the
//! waypoint's replicas write the same thing, so they do not fight).

use std::sync::Arc;

use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use mesh_core::model::route_status::{conditions, ParentStatus};
use mesh_core::model::MeshModel;
use serde_json::{json, Value};
use tokio::sync::watch;

/// The `controllerName` Sluice's waypoints write.
pub const CONTROLLER_NAME: &str = "sluice.dev/waypoint";

/// Keep the status of the routes this waypoint (`namespace/name`) serves
/// current, model after model, until the channel closes.
pub async fn follow(
    client: kube::Client,
    mut models: watch::Receiver<Arc<MeshModel>>,
    namespace: String,
    name: String,
) {
    let gvk = GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "HTTPRoute");
    let ar = ApiResource::from_gvk_with_plural(&gvk, "httproutes");
    loop {
        let model = models.borrow_and_update().clone();
        for r in model.http_routes.iter() {
            let ours: Vec<ParentStatus> = conditions(&model, r)
                .into_iter()
                .filter(|p| served_here(&model, r, p.index, &namespace, &name))
                .collect();
            if ours.is_empty() {
                continue;
            }
            let api: Api<DynamicObject> =
                Api::namespaced_with(client.clone(), &r.metadata.namespace, &ar);
            if let Err(e) = write(&api, &r.metadata.name, r, &ours).await {
                tracing::warn!(
                    route = %format!("{}/{}", r.metadata.namespace, r.metadata.name),
                    error = %e,
                    "cannot write the route's status"
                );
            }
        }
        if models.changed().await.is_err() {
            return;
        }
    }
}

/// Whether parent `index` of route `r` is a Service whose waypoint is
/// `namespace/name`.
fn served_here(
    m: &MeshModel,
    r: &mesh_core::model::HttpRoute,
    index: usize,
    namespace: &str,
    name: &str,
) -> bool {
    let Some(p) = r.spec.parent_refs.get(index) else {
        return false;
    };
    let ns = p.namespace.as_deref().unwrap_or(&r.metadata.namespace);
    m.service(ns, &p.name)
        .and_then(|s| m.service_waypoint(s))
        .flatten()
        .is_some_and(|g| g.metadata.namespace == namespace && g.metadata.name == name)
}

async fn write(
    api: &Api<DynamicObject>,
    name: &str,
    r: &mesh_core::model::HttpRoute,
    ours: &[ParentStatus],
) -> Result<(), kube::Error> {
    let current = api.get_status(name).await?;
    let generation = current.metadata.generation.unwrap_or(0);
    let old: Vec<Value> = current
        .data
        .get("status")
        .and_then(|s| s.get("parents"))
        .and_then(|p| p.as_array())
        .cloned()
        .unwrap_or_default();
    let parents = merged(&old, r, ours, generation, &now());
    if parents == old {
        return Ok(());
    }
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(&json!({"status": {"parents": parents}})),
    )
    .await?;
    Ok(())
}

fn now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// The new `status.parents`: other controllers' entries as they are, then
/// ours; a condition that did not change keeps its `lastTransitionTime`.
fn merged(
    old: &[Value],
    r: &mesh_core::model::HttpRoute,
    ours: &[ParentStatus],
    generation: i64,
    now: &str,
) -> Vec<Value> {
    let mut out: Vec<Value> = old
        .iter()
        .filter(|p| p.get("controllerName").and_then(Value::as_str) != Some(CONTROLLER_NAME))
        .cloned()
        .collect();
    for s in ours {
        let p = &r.spec.parent_refs[s.index];
        let mut parent_ref = json!({
            "group": "",
            "kind": "Service",
            "name": p.name,
            "namespace": p.namespace.as_deref().unwrap_or(&r.metadata.namespace),
        });
        if let Some(port) = p.port {
            parent_ref["port"] = json!(port);
        }
        let previous = old.iter().find(|o| {
            o.get("controllerName").and_then(Value::as_str) == Some(CONTROLLER_NAME)
                && o.get("parentRef") == Some(&parent_ref)
        });
        let conditions: Vec<Value> = s
            .conditions
            .iter()
            .map(|c| {
                let status = if c.status { "True" } else { "False" };
                let since = previous
                    .and_then(|o| o.get("conditions")?.as_array())
                    .and_then(|cs| {
                        cs.iter().find(|x| {
                            x.get("type").and_then(Value::as_str) == Some(c.kind)
                                && x.get("status").and_then(Value::as_str) == Some(status)
                        })
                    })
                    .and_then(|x| x.get("lastTransitionTime").cloned())
                    .unwrap_or_else(|| json!(now));
                json!({
                    "type": c.kind,
                    "status": status,
                    "reason": c.reason,
                    "message": c.message,
                    "observedGeneration": generation,
                    "lastTransitionTime": since,
                })
            })
            .collect();
        out.push(json!({
            "parentRef": parent_ref,
            "controllerName": CONTROLLER_NAME,
            "conditions": conditions,
        }));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MESH: &str = r#"
nodes: [{name: n}]
workloads:
  - {name: a, namespace: shop, node: n, ips: [10.0.0.1], labels: {app: a}}
services:
  - {name: a, namespace: shop, ports: [{port: 80}], selector: {app: a}}
httpRoutes:
  - metadata: {name: r, namespace: shop}
    spec:
      parentRefs: [{name: a, port: 80}]
      rules: [{backendRefs: [{name: ghost, port: 80}]}]
"#;

    #[test]
    fn our_entries_are_replaced_others_kept_and_unchanged_conditions_keep_their_time() {
        let m = MeshModel::from_yaml(MESH, "m").unwrap();
        let r = &m.http_routes[0];
        let ours = conditions(&m, r);
        let foreign = json!({"parentRef": {"name": "x"}, "controllerName": "istio.io/gateway-controller", "conditions": []});
        let first = merged(
            std::slice::from_ref(&foreign),
            r,
            &ours,
            3,
            "2026-12-02T10:00:00Z",
        );
        assert_eq!(first[0], foreign);
        let mine = &first[1];
        assert_eq!(mine["parentRef"]["port"], 80);
        assert_eq!(mine["conditions"][0]["type"], "Accepted");
        assert_eq!(mine["conditions"][0]["status"], "True");
        assert_eq!(mine["conditions"][1]["type"], "ResolvedRefs");
        assert_eq!(mine["conditions"][1]["status"], "False");
        assert_eq!(mine["conditions"][1]["reason"], "BackendNotFound");
        assert_eq!(mine["conditions"][1]["observedGeneration"], 3);
        // Written again later with nothing changed: identical (no patch).
        let again = merged(&first, r, &ours, 3, "2026-12-02T11:00:00Z");
        assert_eq!(again, first);
    }
}
