//! L4 policy evaluation, with Istio's semantics as ztunnel applies them:
//! a pure function of (model, connection) so it is testable in isolation,
//! cheap on the data path, and the same for a dry run and for enforcement.
//!
//! AuthorizationPolicy: the policies that apply to the destination workload
//! are those of the root namespace and of the workload's namespace whose
//! selector matches (policies attached with `targetRef(s)` are for
//! waypoints). CUSTOM and DENY are checked first — a match denies —, AUDIT
//! only marks, then ALLOW: if any ALLOW policy applies, one of its rules must
//! match. L7-only attributes cannot be checked here and never widen access:
//! an ALLOW rule that uses them does not match, a DENY rule is enforced on
//! its L4 part alone; either way the policy is reported as needing a
//! waypoint.
//!
//! At a waypoint the same rules are evaluated with the request's HTTP
//! attributes (`methods`, `paths`, `hosts`, `request.headers[…]`), for the
//! policies attached to the waypoint or the service ([`waypoint_policies`]).
//!
//! PeerAuthentication: workload (port-level first), then namespace, then
//! mesh-wide; PERMISSIVE when nothing is set.

use std::net::IpAddr;

use serde::Serialize;

use crate::identity::SpiffeId;
use crate::model::file::{parse_ip_block, parse_port};
use crate::model::policy::{
    AuthorizationAction, AuthorizationPolicy, Condition, MtlsMode, Operation, PeerAuthentication,
    Rule, Source,
};
use crate::model::{MeshModel, Workload};

/// What policy sees of a connection arriving at a workload.
#[derive(Debug, Clone)]
pub struct ConnInfo<'a> {
    /// The client's verified identity; `None` for plaintext.
    pub source_identity: Option<&'a SpiffeId>,
    pub source_ip: IpAddr,
    pub destination: &'a Workload,
    pub destination_ip: IpAddr,
    pub destination_port: u16,
}

/// What an L7 proxy adds to a connection's attributes for one request.
#[derive(Debug, Clone, Copy)]
pub struct HttpAttrs<'a> {
    pub method: &'a str,
    /// The path without the query string.
    pub path: &'a str,
    /// `:authority` / `Host`.
    pub host: &'a str,
    pub headers: &'a http::HeaderMap,
}

/// One request (or connection) as the rule matcher sees it.
#[derive(Debug, Clone, Copy)]
pub struct RequestInfo<'a> {
    pub source_identity: Option<&'a SpiffeId>,
    pub source_ip: IpAddr,
    pub destination_ip: IpAddr,
    pub destination_port: u16,
    /// `None` at L4: L7 attributes are then unknown.
    pub http: Option<HttpAttrs<'a>>,
}

impl RequestInfo<'_> {
    /// The source principal as policies write it; empty for plaintext.
    fn principal(&self) -> String {
        self.source_identity
            .map(SpiffeId::principal)
            .unwrap_or_default()
    }

    /// The source namespace (from the identity); empty for plaintext.
    fn source_namespace(&self) -> String {
        self.source_identity
            .map(|i| i.namespace().to_string())
            .unwrap_or_default()
    }
}

/// The outcome of authorization.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Decision {
    pub allowed: bool,
    /// The policy that decided (`namespace/name`), if one did.
    pub policy: Option<String>,
    /// Why, in words an operator can act on.
    pub reason: String,
    /// AUDIT policies whose rules matched.
    pub audited: Vec<String>,
    /// Applicable policies with L7-only attributes (enforce them with a waypoint).
    pub needs_waypoint: Vec<String>,
}

fn name(p: &AuthorizationPolicy) -> String {
    format!("{}/{}", p.metadata.namespace, p.metadata.name)
}

/// The AuthorizationPolicies that apply to `w` at the node agent.
pub fn applicable<'a>(
    model: &'a MeshModel,
    w: &'a Workload,
) -> impl Iterator<Item = &'a AuthorizationPolicy> {
    model.authorization_policies.iter().filter(move |p| {
        let ns = &p.metadata.namespace;
        (ns == &model.root_namespace || ns == &w.namespace)
            && p.spec.target_ref.is_none()
            && p.spec.target_refs.is_empty()
            && p.spec
                .selector
                .as_ref()
                .is_none_or(|s| s.matches(&w.labels))
    })
}

/// Decide whether the connection is allowed (at the node agent, L4).
pub fn authorize(model: &MeshModel, c: &ConnInfo<'_>) -> Decision {
    let policies: Vec<&AuthorizationPolicy> = applicable(model, c.destination).collect();
    evaluate(
        &policies,
        &RequestInfo {
            source_identity: c.source_identity,
            source_ip: c.source_ip,
            destination_ip: c.destination_ip,
            destination_port: c.destination_port,
            http: None,
        },
    )
}

/// The AuthorizationPolicies a waypoint enforces for traffic to `service`
/// (namespace `service_ns`) through waypoint `waypoint` (namespace
/// `waypoint_ns`): those attached with `targetRef(s)` to the waypoint's
/// Gateway or to the Service, and root-namespace ones attached to the
/// `istio-waypoint` GatewayClass — as in Istio ambient.
pub fn waypoint_policies<'a>(
    model: &'a MeshModel,
    waypoint_ns: &'a str,
    waypoint: &'a str,
    service_ns: &'a str,
    service: &'a str,
) -> Vec<&'a AuthorizationPolicy> {
    model
        .authorization_policies
        .iter()
        .filter(|p| {
            let ns = p.metadata.namespace.as_str();
            p.spec
                .target_ref
                .iter()
                .chain(&p.spec.target_refs)
                .any(|t| {
                    let tns = t.namespace.as_deref().unwrap_or(ns);
                    match t.kind.as_str() {
                        "Gateway" => tns == waypoint_ns && t.name == waypoint,
                        "Service" => tns == service_ns && t.name == service,
                        "GatewayClass" => {
                            ns == model.root_namespace
                                && t.name == crate::model::gateway::WAYPOINT_CLASS
                        }
                        _ => false,
                    }
                })
        })
        .collect()
}

/// The CUSTOM policies among `policies` whose rules match the request: a
/// waypoint asks each one's external authorizer before evaluating the rest
/// (with [`evaluate`] on the non-CUSTOM policies), as Istio does.
pub fn matching_custom<'a>(
    policies: &[&'a AuthorizationPolicy],
    c: &RequestInfo<'_>,
) -> Vec<&'a AuthorizationPolicy> {
    policies
        .iter()
        .filter(|p| p.spec.action == AuthorizationAction::Custom)
        .filter(|p| {
            p.spec
                .rules
                .iter()
                .flatten()
                .any(|r| rule_matches(r, c, Mode::DenyL4Only))
        })
        .copied()
        .collect()
}

/// Decide a request against `policies` with Istio's order: CUSTOM and
/// DENY first, AUDIT marks, then ALLOW. Without HTTP attributes (L4),
/// L7-only rule parts never widen access.
pub fn evaluate(policies: &[&AuthorizationPolicy], c: &RequestInfo<'_>) -> Decision {
    let mut d = Decision {
        allowed: true,
        policy: None,
        reason: String::new(),
        audited: vec![],
        needs_waypoint: vec![],
    };
    for p in policies.iter().filter(|_| c.http.is_none()) {
        if has_l7_rules(p) {
            d.needs_waypoint.push(name(p));
        }
    }
    // CUSTOM needs an external authorizer, which only a waypoint has: a
    // match denies rather than letting the connection through unchecked.
    for action in [AuthorizationAction::Custom, AuthorizationAction::Deny] {
        for p in policies.iter().filter(|p| p.spec.action == action) {
            if p.spec
                .rules
                .iter()
                .flatten()
                .any(|r| rule_matches(r, c, Mode::DenyL4Only))
            {
                d.allowed = false;
                d.policy = Some(name(p));
                d.reason = format!(
                    "denied by {} policy {}",
                    if action == AuthorizationAction::Deny {
                        "DENY"
                    } else {
                        "CUSTOM (no external authorizer at L4)"
                    },
                    name(p)
                );
                return d;
            }
        }
    }
    for p in policies
        .iter()
        .filter(|p| p.spec.action == AuthorizationAction::Audit)
    {
        if p.spec
            .rules
            .iter()
            .flatten()
            .any(|r| rule_matches(r, c, Mode::DenyL4Only))
        {
            d.audited.push(name(p));
        }
    }
    let allows: Vec<&&AuthorizationPolicy> = policies
        .iter()
        .filter(|p| p.spec.action == AuthorizationAction::Allow)
        .collect();
    if allows.is_empty() {
        d.reason = "no ALLOW policy applies".into();
        return d;
    }
    for p in &allows {
        if p.spec
            .rules
            .iter()
            .flatten()
            .any(|r| rule_matches(r, c, Mode::AllowStrict))
        {
            d.policy = Some(name(p));
            d.reason = format!("allowed by ALLOW policy {}", name(p));
            return d;
        }
    }
    d.allowed = false;
    d.reason = format!(
        "no rule of the ALLOW policies ({}) matches",
        allows
            .iter()
            .map(|p| name(p))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if !d.needs_waypoint.is_empty() {
        d.reason
            .push_str("; rules with L7 attributes never match at L4 (they need a waypoint)");
    }
    d
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// ALLOW: a rule with L7 attributes does not match.
    AllowStrict,
    /// DENY/CUSTOM/AUDIT: L7 attributes are ignored, the L4 part decides.
    DenyL4Only,
}

/// Whether any rule of `p` uses attributes only a waypoint can check.
pub fn has_l7_rules(p: &AuthorizationPolicy) -> bool {
    p.spec.rules.iter().flatten().any(has_l7)
}

fn has_l7(r: &Rule) -> bool {
    r.from.iter().any(|f| {
        !f.source.request_principals.is_empty() || !f.source.not_request_principals.is_empty()
    }) || r.to.iter().any(|t| op_has_l7(&t.operation))
        || r.when.iter().any(|w| !is_l4_key(&w.key))
}

fn op_has_l7(o: &Operation) -> bool {
    !(o.hosts.is_empty()
        && o.not_hosts.is_empty()
        && o.methods.is_empty()
        && o.not_methods.is_empty()
        && o.paths.is_empty()
        && o.not_paths.is_empty())
}

fn is_l4_key(k: &str) -> bool {
    matches!(
        k,
        "source.ip"
            | "remote.ip"
            | "source.namespace"
            | "source.principal"
            | "destination.ip"
            | "destination.port"
    )
}

fn rule_matches(r: &Rule, c: &RequestInfo<'_>, mode: Mode) -> bool {
    if c.http.is_none() && mode == Mode::AllowStrict && has_l7(r) {
        return false;
    }
    (r.from.is_empty() || r.from.iter().any(|f| source_matches(&f.source, c)))
        && (r.to.is_empty() || r.to.iter().any(|t| operation_matches(&t.operation, c)))
        && r.when
            .iter()
            .filter(|w| c.http.is_some() || is_l4_key(&w.key))
            .all(|w| condition_matches(w, c))
}

fn operation_matches(o: &Operation, c: &RequestInfo<'_>) -> bool {
    if !ports_match(o, c.destination_port) {
        return false;
    }
    let Some(h) = &c.http else {
        // L4: the L7 part is unknown and ignored (see Mode).
        return true;
    };
    let host_only = h.host.rsplit_once(':').map_or(h.host, |(host, port)| {
        if port.chars().all(|c| c.is_ascii_digit()) {
            host
        } else {
            h.host
        }
    });
    let host_match = |l: &[String]| {
        l.iter()
            .any(|p| string_match_ci(p, h.host) || string_match_ci(p, host_only))
    };
    field(&o.hosts, &o.not_hosts, host_match)
        && field(&o.methods, &o.not_methods, |l| {
            l.iter().any(|m| m == h.method)
        })
        && field(&o.paths, &o.not_paths, |l| any_match(l, h.path))
}

/// Hosts compare case-insensitively.
fn string_match_ci(pattern: &str, value: &str) -> bool {
    string_match(&pattern.to_ascii_lowercase(), &value.to_ascii_lowercase())
}

/// Istio string matching: exact, `prefix*`, `*suffix`, or `*` (any
/// non-empty value).
fn string_match(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        return !value.is_empty();
    }
    if let Some(prefix) = pattern.strip_suffix('*') {
        return value.starts_with(prefix);
    }
    if let Some(suffix) = pattern.strip_prefix('*') {
        return value.ends_with(suffix);
    }
    pattern == value
}

fn any_match(patterns: &[String], value: &str) -> bool {
    patterns.iter().any(|p| string_match(p, value))
}

fn ip_match(blocks: &[String], ip: IpAddr) -> bool {
    blocks
        .iter()
        .filter_map(|b| parse_ip_block(b).ok())
        .any(|net| net.contains(&ip))
}

/// Field absent → matches; positive list → one must match; negative list →
/// none may match.
fn field(pos: &[String], neg: &[String], m: impl Fn(&[String]) -> bool) -> bool {
    (pos.is_empty() || m(pos)) && (neg.is_empty() || !m(neg))
}

fn source_matches(s: &Source, c: &RequestInfo<'_>) -> bool {
    // Plaintext has no principal and no namespace: positive lists cannot
    // match it, negative ones do not exclude it.
    let (principal, namespace) = (c.principal(), c.source_namespace());
    field(&s.principals, &s.not_principals, |l| {
        any_match(l, &principal)
    }) && field(&s.namespaces, &s.not_namespaces, |l| {
        any_match(l, &namespace)
    }) && field(&s.ip_blocks, &s.not_ip_blocks, |l| ip_match(l, c.source_ip))
        // No JWT support: every request has an empty request principal, so
        // `requestPrincipals` never matches and `notRequestPrincipals`
        // always does (a policy requiring a JWT denies, never lets through).
        && (c.http.is_none()
            || field(&s.request_principals, &s.not_request_principals, |l| {
                any_match(l, "")
            }))
        && field(&s.remote_ip_blocks, &s.not_remote_ip_blocks, |l| {
            ip_match(l, c.source_ip)
        })
}

fn ports_match(o: &Operation, port: u16) -> bool {
    let has = |l: &[String]| l.iter().any(|p| parse_port(p).ok() == Some(port));
    field(&o.ports, &o.not_ports, has)
}

fn condition_matches(w: &Condition, c: &RequestInfo<'_>) -> bool {
    let (principal, namespace) = (c.principal(), c.source_namespace());
    let m = |l: &[String]| -> bool {
        if let (Some(h), Some(name)) = (
            &c.http,
            w.key
                .strip_prefix("request.headers[")
                .and_then(|k| k.strip_suffix(']')),
        ) {
            let value = h
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            return any_match(l, value);
        }
        match w.key.as_str() {
            "source.ip" | "remote.ip" => ip_match(l, c.source_ip),
            "destination.ip" => ip_match(l, c.destination_ip),
            "destination.port" => l
                .iter()
                .any(|p| parse_port(p).ok() == Some(c.destination_port)),
            "source.principal" => any_match(l, &principal),
            "source.namespace" => any_match(l, &namespace),
            _ => false,
        }
    };
    field(&w.values, &w.not_values, m)
}

/// The mutual-TLS mode in force for `w` on `port`, and the policy that set it.
pub fn mtls_mode(model: &MeshModel, w: &Workload, port: u16) -> (MtlsMode, Option<String>) {
    let pa_name =
        |p: &PeerAuthentication| Some(format!("{}/{}", p.metadata.namespace, p.metadata.name));
    let resolve = |m: MtlsMode| if m == MtlsMode::Unset { None } else { Some(m) };
    // Workload level: port-level setting first, then the policy's own.
    let workload_level = model
        .peer_authentications
        .iter()
        .filter(|p| {
            p.metadata.namespace == w.namespace || p.metadata.namespace == model.root_namespace
        })
        .filter(|p| {
            p.spec
                .selector
                .as_ref()
                .is_some_and(|s| s.matches(&w.labels))
        });
    for p in workload_level {
        let port_mode = p
            .spec
            .port_level_mtls
            .iter()
            .find(|(k, _)| parse_port(k).ok() == Some(port))
            .map(|(_, m)| m.mode);
        if let Some(m) = port_mode
            .and_then(resolve)
            .or_else(|| p.spec.mtls.and_then(|m| resolve(m.mode)))
        {
            return (m, pa_name(p));
        }
    }
    for ns in [&w.namespace, &model.root_namespace] {
        if let Some(p) = model
            .peer_authentications
            .iter()
            .find(|p| &p.metadata.namespace == ns && p.spec.selector.is_none())
        {
            if let Some(m) = p.spec.mtls.and_then(|m| resolve(m.mode)) {
                return (m, pa_name(p));
            }
        }
    }
    (MtlsMode::Permissive, None)
}

#[cfg(test)]
mod tests {
    //! Istio's documented AuthorizationPolicy and PeerAuthentication
    //! examples, evaluated at L4.
    use super::*;
    use proptest::prelude::*;

    const BASE: &str = r#"
nodes: [{name: n}]
workloads:
  - {name: web, namespace: foo, serviceAccount: web, node: n, ips: [10.0.0.1], labels: {app: httpbin}}
  - {name: db, namespace: foo, serviceAccount: db, node: n, ips: [10.0.0.2], labels: {app: db}}
  - {name: other, namespace: bar, serviceAccount: sleep, node: n, ips: [10.0.1.1], labels: {app: sleep}}
"#;

    fn model(policies: &str) -> MeshModel {
        MeshModel::from_yaml(&format!("{BASE}{policies}"), "test").unwrap()
    }

    fn id(ns: &str, sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", ns, sa)
    }

    /// Check a connection to `dst` (workload name) on `port` from `src`.
    fn check(
        m: &MeshModel,
        src: Option<&SpiffeId>,
        src_ip: &str,
        dst: &str,
        port: u16,
    ) -> Decision {
        let w = m.workloads.iter().find(|w| w.name == dst).unwrap();
        authorize(
            m,
            &ConnInfo {
                source_identity: src,
                source_ip: src_ip.parse().unwrap(),
                destination: w,
                destination_ip: w.ips[0],
                destination_port: port,
            },
        )
    }

    #[test]
    fn no_policy_allows() {
        let m = model("");
        assert!(check(&m, None, "10.9.9.9", "web", 80).allowed);
    }

    #[test]
    fn allow_nothing_denies_everything_in_scope() {
        let m = model("authorizationPolicies:\n  - metadata: {name: allow-nothing, namespace: foo}\n    spec: {}\n");
        let d = check(&m, Some(&id("foo", "x")), "10.0.0.9", "web", 80);
        assert!(!d.allowed);
        assert!(d.reason.contains("foo/allow-nothing"), "{}", d.reason);
        // Other namespaces are out of scope.
        assert!(check(&m, None, "10.0.0.9", "other", 80).allowed);
    }

    #[test]
    fn mesh_wide_deny_all_from_root_namespace() {
        let m = model("authorizationPolicies:\n  - metadata: {name: deny-all, namespace: istio-system}\n    spec: {action: DENY, rules: [{}]}\n");
        for dst in ["web", "other"] {
            let d = check(&m, Some(&id("foo", "x")), "10.0.0.9", dst, 80);
            assert!(!d.allowed);
            assert_eq!(d.policy.as_deref(), Some("istio-system/deny-all"));
        }
    }

    #[test]
    fn allow_from_namespace_with_selector() {
        let m = model(
            r#"authorizationPolicies:
  - metadata: {name: allow-bar, namespace: foo}
    spec:
      selector: {matchLabels: {app: httpbin}}
      action: ALLOW
      rules: [{from: [{source: {namespaces: [bar]}}]}]
"#,
        );
        assert!(check(&m, Some(&id("bar", "sleep")), "10.0.1.1", "web", 80).allowed);
        assert!(!check(&m, Some(&id("baz", "sleep")), "10.0.1.1", "web", 80).allowed);
        assert!(
            !check(&m, None, "10.0.1.1", "web", 80).allowed,
            "plaintext has no namespace"
        );
        // The selector does not pick db: no ALLOW policy applies there.
        assert!(check(&m, Some(&id("baz", "sleep")), "10.0.1.1", "db", 80).allowed);
    }

    #[test]
    fn deny_by_ip_block_wins_over_allow() {
        let m = model(
            r#"authorizationPolicies:
  - metadata: {name: allow-all, namespace: foo}
    spec: {rules: [{}]}
  - metadata: {name: deny-bad-net, namespace: foo}
    spec:
      action: DENY
      rules: [{from: [{source: {ipBlocks: ["192.168.0.0/16", "10.0.7.7"]}}]}]
"#,
        );
        assert!(!check(&m, Some(&id("foo", "a")), "192.168.3.4", "web", 80).allowed);
        assert!(!check(&m, Some(&id("foo", "a")), "10.0.7.7", "web", 80).allowed);
        assert!(check(&m, Some(&id("foo", "a")), "10.0.7.8", "web", 80).allowed);
    }

    #[test]
    fn port_rules_and_not_ports() {
        let m = model(
            r#"authorizationPolicies:
  - metadata: {name: only-8080, namespace: foo}
    spec: {rules: [{to: [{operation: {ports: ["8080"]}}]}]}
  - metadata: {name: never-9090, namespace: foo}
    spec: {action: DENY, rules: [{to: [{operation: {notPorts: ["8080", "8081"]}}]}]}
"#,
        );
        assert!(check(&m, None, "10.0.0.9", "web", 8080).allowed);
        assert!(
            !check(&m, None, "10.0.0.9", "web", 8081).allowed,
            "8081 is not allowed"
        );
        let d = check(&m, None, "10.0.0.9", "web", 9090);
        assert_eq!(d.policy.as_deref(), Some("foo/never-9090"));
    }

    #[test]
    fn principals_with_wildcards_and_not_principals() {
        let m = model(
            r#"authorizationPolicies:
  - metadata: {name: p, namespace: foo}
    spec:
      rules:
        - from: [{source: {principals: ["cluster.local/ns/bar/*"]}}]
        - from: [{source: {principals: ["*/sa/admin"]}}]
  - metadata: {name: require-mtls, namespace: foo}
    spec: {action: DENY, rules: [{from: [{source: {notPrincipals: ["*"]}}]}]}
"#,
        );
        assert!(check(&m, Some(&id("bar", "anything")), "1.1.1.1", "web", 80).allowed);
        assert!(check(&m, Some(&id("qux", "admin")), "1.1.1.1", "web", 80).allowed);
        assert!(!check(&m, Some(&id("qux", "user")), "1.1.1.1", "web", 80).allowed);
        let d = check(&m, None, "1.1.1.1", "web", 80);
        assert_eq!(
            d.policy.as_deref(),
            Some("foo/require-mtls"),
            "plaintext denied: {d:?}"
        );
    }

    #[test]
    fn l7_attributes_never_widen_access() {
        let m = model(
            r#"authorizationPolicies:
  - metadata: {name: allow-get, namespace: foo}
    spec: {rules: [{to: [{operation: {methods: [GET]}}]}]}
  - metadata: {name: deny-post-from-bar, namespace: foo}
    spec:
      selector: {matchLabels: {app: db}}
      action: DENY
      rules: [{from: [{source: {namespaces: [bar]}}], to: [{operation: {methods: [POST]}}]}]
"#,
        );
        // ALLOW with only L7 rules: nothing matches at L4 → denied, reported.
        let d = check(&m, Some(&id("foo", "a")), "1.1.1.1", "web", 80);
        assert!(!d.allowed);
        assert_eq!(d.needs_waypoint, vec!["foo/allow-get".to_string()]);
        assert!(d.reason.contains("need a waypoint"), "{}", d.reason);
        // DENY with L7: enforced on its L4 part (all of bar is denied).
        let d = check(&m, Some(&id("bar", "sleep")), "1.1.1.1", "db", 80);
        assert!(!d.allowed);
        assert_eq!(d.policy.as_deref(), Some("foo/deny-post-from-bar"));
        // Not from bar: the DENY does not match; the L7-only ALLOW (no
        // selector, so it covers db too) still denies, as in ztunnel.
        let d = check(&m, Some(&id("qux", "x")), "1.1.1.1", "db", 80);
        assert!(!d.allowed);
        assert_eq!(d.policy, None, "{d:?}");
        assert!(d.reason.contains("foo/allow-get"), "{}", d.reason);
    }

    #[test]
    fn when_conditions_at_l4_and_audit() {
        let m = model(
            r#"authorizationPolicies:
  - metadata: {name: allow-when, namespace: foo}
    spec:
      rules:
        - when:
            - {key: source.namespace, values: [bar]}
            - {key: destination.port, notValues: ["22"]}
  - metadata: {name: audit-all, namespace: foo}
    spec: {action: AUDIT, rules: [{}]}
"#,
        );
        let d = check(&m, Some(&id("bar", "a")), "1.1.1.1", "web", 80);
        assert!(d.allowed);
        assert_eq!(d.audited, vec!["foo/audit-all".to_string()]);
        assert!(!check(&m, Some(&id("bar", "a")), "1.1.1.1", "web", 22).allowed);
        assert!(!check(&m, Some(&id("baz", "a")), "1.1.1.1", "web", 80).allowed);
    }

    #[test]
    fn target_ref_policies_are_for_waypoints() {
        let m = model(
            r#"authorizationPolicies:
  - metadata: {name: wp, namespace: foo}
    spec:
      targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
      action: DENY
      rules: [{}]
"#,
        );
        assert!(check(&m, None, "1.1.1.1", "web", 80).allowed);
    }

    #[test]
    fn peer_authentication_precedence() {
        let m = model(
            r#"peerAuthentications:
  - metadata: {name: mesh, namespace: istio-system}
    spec: {mtls: {mode: STRICT}}
  - metadata: {name: ns, namespace: bar}
    spec: {mtls: {mode: PERMISSIVE}}
  - metadata: {name: db-port, namespace: foo}
    spec:
      selector: {matchLabels: {app: db}}
      mtls: {mode: STRICT}
      portLevelMtls: {"9000": {mode: DISABLE}, "9001": {mode: UNSET}}
"#,
        );
        let w = |n: &str| m.workloads.iter().find(|w| w.name == n).unwrap();
        assert_eq!(
            mtls_mode(&m, w("web"), 80),
            (MtlsMode::Strict, Some("istio-system/mesh".into()))
        );
        assert_eq!(
            mtls_mode(&m, w("other"), 80),
            (MtlsMode::Permissive, Some("bar/ns".into()))
        );
        assert_eq!(mtls_mode(&m, w("db"), 9000).0, MtlsMode::Disable);
        assert_eq!(
            mtls_mode(&m, w("db"), 9001).0,
            MtlsMode::Strict,
            "UNSET inherits the policy's mode"
        );
        assert_eq!(mtls_mode(&m, w("db"), 80).0, MtlsMode::Strict);
        assert_eq!(mtls_mode(&model(""), w("web"), 80).0, MtlsMode::Permissive);
    }

    fn arb_source() -> impl Strategy<Value = Source> {
        let names = prop::collection::vec(
            prop::sample::select(vec!["foo", "bar", "baz", "*", "ba*"]),
            0..2,
        );
        let blocks = prop::collection::vec(
            prop::sample::select(vec!["10.0.0.0/8", "10.0.0.1", "192.168.0.0/16"]),
            0..2,
        );
        (names.clone(), names, blocks.clone(), blocks).prop_map(
            |(namespaces, not_namespaces, ip_blocks, not_ip_blocks)| Source {
                namespaces: namespaces.into_iter().map(String::from).collect(),
                not_namespaces: not_namespaces.into_iter().map(String::from).collect(),
                ip_blocks: ip_blocks.into_iter().map(String::from).collect(),
                not_ip_blocks: not_ip_blocks.into_iter().map(String::from).collect(),
                ..Default::default()
            },
        )
    }

    fn arb_rule() -> impl Strategy<Value = Rule> {
        (
            prop::collection::vec(arb_source(), 0..2),
            prop::collection::vec(prop::sample::select(vec!["80", "8080"]), 0..2),
        )
            .prop_map(|(sources, ports)| Rule {
                from: sources
                    .into_iter()
                    .map(|source| crate::model::policy::RuleFrom { source })
                    .collect(),
                to: if ports.is_empty() {
                    vec![]
                } else {
                    vec![crate::model::policy::RuleTo {
                        operation: Operation {
                            ports: ports.into_iter().map(String::from).collect(),
                            ..Default::default()
                        },
                    }]
                },
                when: vec![],
            })
    }

    fn policy(name: &str, action: AuthorizationAction, rules: Vec<Rule>) -> AuthorizationPolicy {
        AuthorizationPolicy {
            api_version: None,
            kind: None,
            metadata: crate::model::policy::ObjectMeta {
                name: name.into(),
                namespace: "foo".into(),
                labels: Default::default(),
                annotations: Default::default(),
            },
            spec: crate::model::policy::AuthorizationPolicySpec {
                action,
                rules: Some(rules),
                ..Default::default()
            },
        }
    }

    fn arb_conn() -> impl Strategy<Value = (Option<&'static str>, &'static str, u16)> {
        (
            prop::option::of(prop::sample::select(vec!["foo", "bar", "baz", "qux"])),
            prop::sample::select(vec!["10.0.0.1", "10.2.3.4", "192.168.1.1", "172.16.0.1"]),
            prop::sample::select(vec![80u16, 8080, 443]),
        )
    }

    fn eval(m: &MeshModel, (ns, ip, port): (Option<&str>, &str, u16)) -> bool {
        let ident = ns.map(|n| id(n, "sa"));
        check(m, ident.as_ref(), ip, "web", port).allowed
    }

    proptest! {
        /// A matching DENY policy always wins, whatever ALLOW policies say.
        #[test]
        fn deny_always_wins(allow in prop::collection::vec(arb_rule(), 0..3), deny in arb_rule(), conn in arb_conn()) {
            let mut m = model("");
            m.authorization_policies = vec![policy("a", AuthorizationAction::Allow, allow), policy("d", AuthorizationAction::Deny, vec![deny.clone()])];
            let denied_alone = {
                let mut only = model("");
                only.authorization_policies = vec![policy("d", AuthorizationAction::Deny, vec![deny])];
                !eval(&only, conn)
            };
            if denied_alone {
                prop_assert!(!eval(&m, conn));
            }
        }

        /// Adding an ALLOW rule to an existing ALLOW policy never removes
        /// access that was granted before.
        #[test]
        fn adding_allow_rules_never_removes_access(rules in prop::collection::vec(arb_rule(), 1..3), extra in arb_rule(), conn in arb_conn()) {
            let mut before = model("");
            before.authorization_policies = vec![policy("a", AuthorizationAction::Allow, rules.clone())];
            let mut after = model("");
            let mut more = rules;
            more.push(extra);
            after.authorization_policies = vec![policy("a", AuthorizationAction::Allow, more)];
            if eval(&before, conn) {
                prop_assert!(eval(&after, conn));
            }
        }
    }

    /// Evaluate a request against the policies attached to service
    /// `foo/httpbin` behind waypoint `foo/waypoint`.
    fn check_http(
        m: &MeshModel,
        src: Option<&SpiffeId>,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Decision {
        let mut map = http::HeaderMap::new();
        for (k, v) in headers {
            map.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let policies = waypoint_policies(m, "foo", "waypoint", "foo", "httpbin");
        evaluate(
            &policies,
            &RequestInfo {
                source_identity: src,
                source_ip: "10.0.1.1".parse().unwrap(),
                destination_ip: "10.96.0.1".parse().unwrap(),
                destination_port: 8000,
                http: Some(HttpAttrs {
                    method,
                    path,
                    host: "httpbin.foo.svc.cluster.local:8000",
                    headers: &map,
                }),
            },
        )
    }

    const L7: &str = r#"
services:
  - {name: httpbin, namespace: foo, vips: [10.96.0.1], ports: [{port: 8000}], selector: {app: httpbin}}
authorizationPolicies:
  - metadata: {name: get-only, namespace: foo}
    spec:
      targetRefs: [{kind: Service, group: "", name: httpbin}]
      action: ALLOW
      rules:
        - from: [{source: {principals: ["cluster.local/ns/bar/sa/sleep"]}}]
          to: [{operation: {methods: ["GET"], paths: ["/info*", "/status/*"], hosts: ["httpbin.foo.svc.cluster.local"]}}]
  - metadata: {name: no-admin, namespace: foo}
    spec:
      targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
      action: DENY
      rules:
        - to: [{operation: {paths: ["/admin*"]}}]
        - when: [{key: "request.headers[x-evil]", values: ["*"]}]
"#;

    #[test]
    fn l7_allow_matches_method_path_and_host_at_the_waypoint() {
        let m = model(L7);
        let sleep = id("bar", "sleep");
        let d = check_http(&m, Some(&sleep), "GET", "/info", &[]);
        assert!(d.allowed, "{d:?}");
        assert_eq!(d.policy.as_deref(), Some("foo/get-only"));
        assert!(check_http(&m, Some(&sleep), "GET", "/status/200", &[]).allowed);
        assert!(!check_http(&m, Some(&sleep), "POST", "/info", &[]).allowed);
        assert!(!check_http(&m, Some(&sleep), "GET", "/headers", &[]).allowed);
        assert!(!check_http(&m, Some(&id("bar", "other")), "GET", "/info", &[]).allowed);
        assert!(!check_http(&m, None, "GET", "/info", &[]).allowed);
    }

    #[test]
    fn l7_deny_on_path_or_header_wins() {
        let m = model(L7);
        let sleep = id("bar", "sleep");
        let d = check_http(&m, Some(&sleep), "GET", "/admin/x", &[]);
        assert!(!d.allowed);
        assert_eq!(d.policy.as_deref(), Some("foo/no-admin"));
        let d = check_http(&m, Some(&sleep), "GET", "/info", &[("x-evil", "1")]);
        assert!(!d.allowed);
        assert_eq!(d.policy.as_deref(), Some("foo/no-admin"));
    }

    #[test]
    fn waypoint_policies_are_not_enforced_at_l4_and_l4_ones_not_at_the_waypoint() {
        let m = model(&format!(
            "{L7}  - metadata: {{name: l4, namespace: foo}}\n    spec: {{action: DENY, rules: [{{}}]}}\n"
        ));
        let names: Vec<_> = waypoint_policies(&m, "foo", "waypoint", "foo", "httpbin")
            .iter()
            .map(|p| p.metadata.name.clone())
            .collect();
        assert_eq!(names, ["get-only", "no-admin"]);
        let web = m.workloads.iter().find(|w| w.name == "web").unwrap();
        let l4: Vec<_> = applicable(&m, web)
            .map(|p| p.metadata.name.clone())
            .collect();
        assert_eq!(l4, ["l4"]);
    }

    #[test]
    fn a_policy_requiring_a_jwt_denies_without_jwt_support() {
        let m = model(
            r#"
services:
  - {name: httpbin, namespace: foo, vips: [10.96.0.1], ports: [{port: 8000}], selector: {app: httpbin}}
authorizationPolicies:
  - metadata: {name: require-jwt, namespace: foo}
    spec:
      targetRefs: [{kind: Service, name: httpbin}]
      action: DENY
      rules: [{from: [{source: {notRequestPrincipals: ["*"]}}]}]
"#,
        );
        let d = check_http(&m, Some(&id("bar", "sleep")), "GET", "/", &[]);
        assert!(!d.allowed, "{d:?}");
    }
}
