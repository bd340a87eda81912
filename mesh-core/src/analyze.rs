//! `analyze`: problems in a mesh file that validation cannot call errors —
//! policies that select nothing, rules that need a waypoint or have no
//! effect at a node agent, dry runs, where Sluice deliberately differs
//! from Istio, conflicting or ignored PeerAuthentications, policies that
//! could not be read, services without endpoints, waypoints that are
//! missing or have no pods, routes that no waypoint applies — found before
//! the file is applied, each with a message an operator can act on.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::model::policy::{
    AuthorizationAction, AuthorizationPolicy, MtlsMode, PeerAuthentication,
};
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
        if let Some(why) = &p.rejected {
            push(
                Level::Error,
                ap(p),
                format!("could not be read ({why}): it denies in its scope until fixed"),
            );
            continue;
        }
        match p.dry_run_annotation() {
            Some(Ok(true)) if p.is_dry_run() => push(
                Level::Info,
                ap(p),
                "dry run (istio.io/dry-run): evaluated and counted in sluice_policy_dry_run_total, never enforced".into(),
            ),
            Some(Ok(true)) => push(
                Level::Warning,
                ap(p),
                format!(
                    "istio.io/dry-run applies to ALLOW and DENY policies only: this {:?} policy is enforced",
                    p.spec.action
                ),
            ),
            Some(Err(e)) => push(
                Level::Warning,
                ap(p),
                format!("{e}: the policy is enforced (as in Istio)"),
            ),
            _ => {}
        }
        for (field, block) in p.spec.rules.iter().flatten().flat_map(|r| {
            r.from.iter().flat_map(|f| {
                let s = &f.source;
                [
                    ("ipBlocks", &s.ip_blocks),
                    ("notIpBlocks", &s.not_ip_blocks),
                    ("remoteIpBlocks", &s.remote_ip_blocks),
                    ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
                ]
                .into_iter()
                .flat_map(|(n, l)| l.iter().map(move |b| (n, b)))
            })
        }) {
            if let Ok(net) = crate::model::file::parse_ip_block(block) {
                if block.contains('/') && net.to_string() != *block {
                    push(
                        Level::Info,
                        ap(p),
                        format!("{field} {block} has host bits set: it reads as {net}"),
                    );
                }
            }
        }
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
                "CUSTOM needs an external authorizer (a waypoint); node agents deny what its rules match on their L4 part (a deliberate difference: Istio's node proxy ignores CUSTOM)".into(),
            ),
            _ => {}
        }
        let ineffective = crate::policy::ineffective_at_l4(p);
        if !ineffective.is_empty() {
            push(
                Level::Warning,
                ap(p),
                format!(
                    "has no effect at node agents for {}: a clause with only L7 attributes never matches there (as in Istio); attach the policy to a waypoint to enforce it",
                    ineffective.join(", ")
                ),
            );
        } else if crate::policy::has_l7_rules(p) {
            let effect = match p.spec.action {
                AuthorizationAction::Allow => {
                    "its rules with L7 attributes never match at a node agent, so they allow nothing there"
                }
                AuthorizationAction::Custom => {
                    "node agents take its L7 attributes to match (denying more)"
                }
                _ => "node agents enforce only the L4 part of its rules (denying more)",
            };
            push(
                Level::Warning,
                ap(p),
                format!("uses L7 attributes and needs a waypoint: {effect}"),
            );
        }
    }
    // PeerAuthentications: unreadable ones, ignored ones, conflicts (the
    // oldest wins, then the name, as in Istio), and readings where Istio's
    // ambient translation is inconsistent.
    let pa = |p: &PeerAuthentication| format!("PeerAuthentication {}", p.key());
    let mut ns_wide: BTreeMap<&str, Vec<&PeerAuthentication>> = BTreeMap::new();
    for p in &m.peer_authentications {
        if let Some(why) = &p.rejected {
            push(
                Level::Error,
                pa(p),
                format!("could not be read ({why}): STRICT in its scope until fixed"),
            );
            continue;
        }
        let in_root = &p.metadata.namespace == root;
        if in_root && p.spec.selector.is_some() {
            push(
                Level::Warning,
                pa(p),
                "a mesh-wide (root namespace) policy must not have a selector: it is ignored (as in Istio)".into(),
            );
            continue;
        }
        if !p.selects_workloads() {
            ns_wide.entry(&p.metadata.namespace).or_default().push(p);
            if p.spec.selector.is_some() {
                push(
                    Level::Info,
                    pa(p),
                    "selector without labels: namespace-wide (as in Istio)".into(),
                );
            }
            continue;
        }
        let own = p.spec.mtls.map(|x| x.mode).unwrap_or_default();
        if own == MtlsMode::Unset {
            for (port, mode) in &p.spec.port_level_mtls {
                match mode.mode {
                    MtlsMode::Disable => push(
                        Level::Warning,
                        pa(p),
                        format!("port {port}: DISABLE under a policy without a mode of its own is ignored, the port inherits the namespace or mesh mode (Istio's ambient translation drops it under STRICT; Sluice takes that stricter reading everywhere): set PERMISSIVE, or give the policy a mode"),
                    ),
                    MtlsMode::Permissive => push(
                        Level::Info,
                        pa(p),
                        format!("port {port}: PERMISSIVE under a policy without a mode of its own: the other ports inherit the namespace or mesh mode (some Istio versions make every port PERMISSIVE here when a namespace policy without a mode exists; give the policy a mode to be unambiguous)"),
                    ),
                    _ => {}
                }
            }
        }
    }
    for (ns, mut pols) in ns_wide.into_iter().filter(|(_, n)| n.len() > 1) {
        pols.sort_by(|a, b| a.metadata.precedence().cmp(&b.metadata.precedence()));
        let names: Vec<&str> = pols.iter().map(|p| p.metadata.name.as_str()).collect();
        push(
            Level::Warning,
            format!("PeerAuthentication {ns}/{}", names.join(",")),
            format!(
                "{} namespace-wide policies in {ns}: only {} takes effect (the oldest, then by name)",
                names.len(),
                names[0]
            ),
        );
    }
    for w in &m.workloads {
        let names: Vec<&str> =
            crate::policy::peer_authentications_in(m, w, crate::policy::PaScope::Workload)
                .iter()
                .map(|p| p.metadata.name.as_str())
                .collect();
        if names.len() > 1 {
            push(
                Level::Warning,
                format!("Workload {}/{}", w.namespace, w.name),
                format!(
                    "selected by {} PeerAuthentications ({}): only {} takes effect (the oldest, then by name)",
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
    for r in &m.http_routes {
        let object = format!("HTTPRoute {}/{}", r.metadata.namespace, r.metadata.name);
        for c in crate::model::route_status::conditions(m, r) {
            for cond in c.conditions.iter().filter(|x| !x.status) {
                push(
                    Level::Error,
                    object.clone(),
                    format!(
                        "parent {}: {} is False ({}): {}",
                        c.parent, cond.kind, cond.reason, cond.message
                    ),
                );
            }
            if c.consumer {
                push(
                    Level::Info,
                    object.clone(),
                    format!(
                        "consumer route for {}: it applies to clients in namespace {} only (GAMMA), instead of the service's own routes",
                        c.parent, r.metadata.namespace
                    ),
                );
            }
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
    fn policies_istio_reads_differently_at_l4_are_named_with_the_clause() {
        let mut m = MeshModel::from_yaml(
            r#"
nodes: [{name: n}]
workloads:
  - {name: a, namespace: shop, node: n, ips: [10.0.0.1], labels: {app: a}}
authorizationPolicies:
  - metadata: {name: deny-post, namespace: shop}
    spec: {action: DENY, rules: [{to: [{operation: {methods: [POST]}}]}, {from: [{source: {namespaces: [x]}}]}]}
  - metadata: {name: trial, namespace: shop, annotations: {istio.io/dry-run: "true"}}
    spec: {action: DENY, rules: [{}]}
  - metadata: {name: typo, namespace: shop, annotations: {istio.io/dry-run: "ja"}}
    spec: {action: DENY, rules: [{from: [{source: {namespaces: [x]}}]}]}
  - metadata: {name: net, namespace: shop}
    spec: {rules: [{from: [{source: {ipBlocks: ["10.0.1.7/24"]}}]}]}
peerAuthentications:
  - metadata: {name: mesh-selector, namespace: istio-system}
    spec: {selector: {matchLabels: {app: a}}, mtls: {mode: STRICT}}
  - metadata: {name: ports, namespace: shop}
    spec: {selector: {matchLabels: {app: a}}, portLevelMtls: {"9000": {mode: DISABLE}}}
  - metadata: {name: broken, namespace: shop}
    spec: {}
"#,
            "m",
        )
        .unwrap();
        m.peer_authentications[2].rejected = Some("spec.mtls: bad".into());
        let f = analyze(&m);
        let has = |obj: &str, level: Level, text: &str| {
            f.iter()
                .any(|x| x.object == obj && x.level == level && x.message.contains(text))
        };
        assert!(
            has(
                "AuthorizationPolicy shop/deny-post",
                Level::Warning,
                "no effect at node agents for rules[0] (to: methods)"
            ),
            "{f:#?}"
        );
        assert!(
            has("AuthorizationPolicy shop/trial", Level::Info, "dry run"),
            "{f:#?}"
        );
        assert!(
            has(
                "AuthorizationPolicy shop/typo",
                Level::Warning,
                "is enforced"
            ),
            "{f:#?}"
        );
        assert!(
            has(
                "AuthorizationPolicy shop/net",
                Level::Info,
                "reads as 10.0.1.0/24"
            ),
            "{f:#?}"
        );
        assert!(
            has(
                "PeerAuthentication istio-system/mesh-selector",
                Level::Warning,
                "ignored"
            ),
            "{f:#?}"
        );
        assert!(
            has(
                "PeerAuthentication shop/ports",
                Level::Warning,
                "port 9000: DISABLE"
            ),
            "{f:#?}"
        );
        assert!(
            has("PeerAuthentication shop/broken", Level::Error, "STRICT"),
            "{f:#?}"
        );
    }

    #[test]
    fn routes_with_unusable_backends_and_consumer_routes_are_reported() {
        let m = MeshModel::from_yaml(
            r#"
nodes: [{name: n}]
workloads:
  - {name: a, namespace: shop, node: n, ips: [10.0.0.1], labels: {app: a}}
services:
  - {name: a, namespace: shop, ports: [{port: 80}], selector: {app: a}}
  - {name: b, namespace: other, ports: [{port: 80}], selector: {app: a}}
httpRoutes:
  - metadata: {name: r, namespace: shop}
    spec:
      parentRefs: [{name: a}]
      rules: [{backendRefs: [{name: b, namespace: other, port: 80}]}]
  - metadata: {name: mine, namespace: client}
    spec:
      parentRefs: [{name: a, namespace: shop}]
      rules: [{}]
"#,
            "m",
        )
        .unwrap();
        let f = analyze(&m);
        assert!(
            f.iter().any(|x| x.object == "HTTPRoute shop/r"
                && x.level == Level::Error
                && x.message.contains("RefNotPermitted")),
            "{f:#?}"
        );
        assert!(
            f.iter().any(
                |x| x.object == "HTTPRoute client/mine" && x.message.contains("consumer route")
            ),
            "{f:#?}"
        );
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
