//! `analyze`: problems in a mesh file that validation cannot call errors —
//! policies that select nothing, rules that need a waypoint, conflicting
//! PeerAuthentications, services without endpoints, waypoints that are
//! missing or have no pods, routes that no waypoint applies — found before
//! the file is applied, each with a message an operator can act on.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::model::policy::{AuthorizationAction, AuthorizationPolicy};
use crate::model::MeshModel;

/// How serious a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Info,
    Warning,
    Error,
}

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub level: Level,
    /// The object concerned (`AuthorizationPolicy shop/deny-all`, …).
    pub object: String,
    pub message: String,
}

fn ap(p: &AuthorizationPolicy) -> String {
    format!(
        "AuthorizationPolicy {}/{}",
        p.metadata.namespace, p.metadata.name
    )
}

/// Analyze a validated model.
pub fn analyze(m: &MeshModel) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut push = |level, object: String, message: String| {
        out.push(Finding {
            level,
            object,
            message,
        })
    };
    let root = &m.root_namespace;
    for p in &m.authorization_policies {
        let ns = &p.metadata.namespace;
        let waypoint_attached = p.spec.target_ref.is_some() || !p.spec.target_refs.is_empty();
        if waypoint_attached {
            push(
                Level::Info,
                ap(p),
                "attached with targetRef(s): enforced by a waypoint, not by node agents".into(),
            );
            continue;
        }
        let selected = m
            .workloads
            .iter()
            .filter(|w| {
                (ns == root || &w.namespace == ns)
                    && p.spec
                        .selector
                        .as_ref()
                        .is_none_or(|s| s.matches(&w.labels))
            })
            .count();
        if selected == 0 {
            push(
                Level::Warning,
                ap(p),
                "selects no workload: it has no effect".into(),
            );
        }
        let rules = p.spec.rules.as_deref();
        match (p.spec.action, rules) {
            (AuthorizationAction::Allow, None) | (AuthorizationAction::Allow, Some([])) => push(
                Level::Info,
                ap(p),
                format!("ALLOW without rules: allow-nothing for the {selected} workload(s) it selects"),
            ),
            (AuthorizationAction::Deny, Some(r)) if ns == root && p.spec.selector.is_none() && r.iter().any(|r| r == &Default::default()) => {
                push(Level::Warning, ap(p), "DENY with an empty rule in the root namespace denies all traffic in the mesh".into())
            }
            (AuthorizationAction::Custom, _) => push(
                Level::Warning,
                ap(p),
                "CUSTOM needs an external authorizer (a waypoint); node agents deny what its rules match".into(),
            ),
            _ => {}
        }
        let l7 = crate::policy::has_l7_rules(p);
        if l7 {
            let effect = if p.spec.action == AuthorizationAction::Allow {
                "its rules with L7 attributes never match at a node agent, so they allow nothing there"
            } else {
                "node agents enforce only the L4 part of its rules (denying more)"
            };
            push(
                Level::Warning,
                ap(p),
                format!("uses L7 attributes and needs a waypoint: {effect}"),
            );
        }
    }
    // PeerAuthentication conflicts: more than one namespace-wide policy in a
    // namespace, or several workload policies selecting one workload.
    let mut ns_wide: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for p in m
        .peer_authentications
        .iter()
        .filter(|p| p.spec.selector.is_none())
    {
        ns_wide
            .entry(&p.metadata.namespace)
            .or_default()
            .push(p.metadata.name.clone());
    }
    for (ns, names) in ns_wide.into_iter().filter(|(_, n)| n.len() > 1) {
        push(
            Level::Warning,
            format!("PeerAuthentication {ns}/{}", names.join(",")),
            format!(
                "{} namespace-wide policies in {ns}: only {} takes effect",
                names.len(),
                names[0]
            ),
        );
    }
    for w in &m.workloads {
        let names: Vec<String> = m
            .peer_authentications
            .iter()
            .filter(|p| {
                p.metadata.namespace == w.namespace
                    && p.spec
                        .selector
                        .as_ref()
                        .is_some_and(|s| s.matches(&w.labels))
            })
            .map(|p| p.metadata.name.clone())
            .collect();
        if names.len() > 1 {
            push(
                Level::Warning,
                format!("Workload {}/{}", w.namespace, w.name),
                format!(
                    "selected by {} PeerAuthentications ({}): only {} takes effect",
                    names.len(),
                    names.join(", "),
                    names[0]
                ),
            );
        }
    }
    for s in &m.services {
        if m.service_endpoints(s).next().is_none() {
            push(
                Level::Warning,
                format!("Service {}/{}", s.namespace, s.name),
                "selects no workload: connections to it are refused".into(),
            );
        }
    }
    for s in &m.services {
        let object = format!("Service {}/{}", s.namespace, s.name);
        match m.service_waypoint(s) {
            Some(None) => push(
                Level::Error,
                object.clone(),
                "uses a waypoint that does not exist (istio.io/use-waypoint): its traffic is refused".into(),
            ),
            Some(Some(g)) if m.waypoint_workloads(g).next().is_none() => push(
                Level::Error,
                object.clone(),
                format!(
                    "its waypoint {}/{} has no pods (label gateway.networking.k8s.io/gateway-name): its traffic is refused",
                    g.metadata.namespace, g.metadata.name
                ),
            ),
            None if s.ports.iter().any(|p| m.routes_for(s, p.port).next().is_some()) => push(
                Level::Warning,
                object,
                "has HTTPRoutes but no waypoint (istio.io/use-waypoint): the routes are not applied".into(),
            ),
            _ => {}
        }
    }
    out.sort_by(|a, b| b.level.cmp(&a.level).then(a.object.cmp(&b.object)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_usual_mistakes() {
        let m = MeshModel::from_yaml(
            r#"
nodes: [{name: n}]
workloads:
  - {name: a, namespace: shop, node: n, ips: [10.0.0.1], labels: {app: a}}
services:
  - {name: ghost, namespace: shop, vips: [10.96.0.1], ports: [{port: 80}], selector: {app: nobody}}
authorizationPolicies:
  - metadata: {name: typo, namespace: shop}
    spec: {selector: {matchLabels: {app: aa}}, rules: [{}]}
  - metadata: {name: get-only, namespace: shop}
    spec: {rules: [{to: [{operation: {methods: [GET]}}]}]}
  - metadata: {name: deny-everything, namespace: istio-system}
    spec: {action: DENY, rules: [{}]}
  - metadata: {name: nothing, namespace: shop}
    spec: {}
peerAuthentications:
  - metadata: {name: one, namespace: shop}
    spec: {mtls: {mode: STRICT}}
  - metadata: {name: two, namespace: shop}
    spec: {mtls: {mode: PERMISSIVE}}
"#,
            "m",
        )
        .unwrap();
        let f = analyze(&m);
        let has = |obj: &str, text: &str| {
            f.iter()
                .any(|x| x.object == obj && x.message.contains(text))
        };
        assert!(
            has("AuthorizationPolicy shop/typo", "selects no workload"),
            "{f:#?}"
        );
        assert!(
            has("AuthorizationPolicy shop/get-only", "needs a waypoint"),
            "{f:#?}"
        );
        assert!(
            has(
                "AuthorizationPolicy istio-system/deny-everything",
                "denies all traffic"
            ),
            "{f:#?}"
        );
        assert!(
            has("AuthorizationPolicy shop/nothing", "allow-nothing"),
            "{f:#?}"
        );
        assert!(
            has("PeerAuthentication shop/one,two", "only one takes effect"),
            "{f:#?}"
        );
        assert!(has("Service shop/ghost", "selects no workload"), "{f:#?}");
        assert_eq!(f[0].level, Level::Warning, "most serious first");
    }

    #[test]
    fn a_clean_file_has_no_warnings() {
        let m = MeshModel::from_yaml(
            "nodes: [{name: n}]\nworkloads: [{name: a, node: n, ips: [10.0.0.1]}]\n",
            "m",
        )
        .unwrap();
        assert!(analyze(&m).iter().all(|f| f.level == Level::Info));
    }

    #[test]
    fn waypoint_problems_are_reported() {
        let m = MeshModel::from_yaml(
            r#"
nodes: [{name: n}]
workloads:
  - {name: a, namespace: shop, node: n, ips: [10.0.0.1], labels: {app: a}}
services:
  - {name: a, namespace: shop, ports: [{port: 80}], selector: {app: a}, labels: {istio.io/use-waypoint: ghost}}
  - {name: b, namespace: shop, ports: [{port: 80}], selector: {app: a}, labels: {istio.io/use-waypoint: empty}}
  - {name: c, namespace: shop, ports: [{port: 80}], selector: {app: a}}
gateways:
  - metadata: {name: empty, namespace: shop}
    spec: {gatewayClassName: istio-waypoint}
httpRoutes:
  - metadata: {name: r, namespace: shop}
    spec: {parentRefs: [{name: c}], rules: [{}]}
"#,
            "m",
        )
        .unwrap();
        let f = analyze(&m);
        let find = |o: &str| {
            f.iter()
                .find(|x| x.object == o)
                .map(|x| (x.level, x.message.clone()))
        };
        assert!(
            matches!(find("Service shop/a"), Some((Level::Error, msg)) if msg.contains("does not exist"))
        );
        assert!(
            matches!(find("Service shop/b"), Some((Level::Error, msg)) if msg.contains("no pods"))
        );
        assert!(
            matches!(find("Service shop/c"), Some((Level::Warning, msg)) if msg.contains("not applied"))
        );
    }
}
