//! Policy evaluation with Istio's semantics: a pure function of (model,
//! connection or request) so it is testable in isolation, cheap on the data
//! path, and the same for a dry run and for enforcement.
//!
//! AuthorizationPolicy at the node agent (L4), as istiod translates a
//! policy for ztunnel and ztunnel enforces it: the policies that apply to
//! the destination workload are those of the root namespace and of the
//! workload's namespace whose selector matches (policies attached with
//! `targetRef(s)` are for waypoints). CUSTOM and DENY are checked first — a
//! match denies —, AUDIT only marks, then ALLOW: if any ALLOW policy
//! applies, one of its rules must match. Attributes that only an L7 proxy
//! can see (`methods`, `paths`, `hosts`, `requestPrincipals`,
//! `remoteIpBlocks`, `when` keys other than `source.ip`,
//! `source.namespace`, `source.principal`, `destination.ip` and
//! `destination.port`) never widen access and never deny more than Istio:
//! - an ALLOW rule that uses any of them does not match;
//! - in a DENY (or AUDIT) rule, a `source` or `operation` is checked on its
//!   L4 fields; one with only L7 fields is an empty match that never
//!   matches, so a `from` or `to` made only of such entries, or any L7
//!   `when` condition, makes the rule never match at L4 (istiod turns such
//!   clauses into empty matches and ztunnel skips empty matches);
//! - CUSTOM (which Istio's node proxy ignores) is Sluice's deliberate
//!   difference: with no external authorizer at L4, a rule denies on its L4
//!   part alone, the L7 part being assumed to match (fail closed).
//!
//! A policy annotated `istio.io/dry-run: "true"` is evaluated but never
//! enforced: [`Decision::dry_run`] says what it would have decided.
//!
//! At a waypoint the same rules are evaluated with the request's HTTP
//! attributes, for the policies attached to the waypoint or the service
//! ([`waypoint_policies`]).
//!
//! PeerAuthentication ([`mtls_mode`]): workload policy (port-level first),
//! then namespace, then mesh-wide; PERMISSIVE when nothing is set.

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
    fn source_namespace(&self) -> &str {
        self.source_identity
            .map(SpiffeId::namespace)
            .unwrap_or_default()
    }
}

/// What a dry-run policy would have decided, had it been enforced (with
/// every enforced policy as it is).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DryRun {
    /// `namespace/name`.
    pub policy: String,
    pub allowed: bool,
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
    /// Applicable dry-run policies and what each would have decided.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dry_run: Vec<DryRun>,
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
        .filter(|p| p.spec.action == AuthorizationAction::Custom && policy_matches(p, c))
        .copied()
        .collect()
}

/// Decide a request against `policies` with Istio's order: CUSTOM and
/// DENY first, AUDIT marks, then ALLOW. Without HTTP attributes (L4),
/// L7-only rule parts never widen access (see the module documentation).
/// Dry-run policies are left out of the decision; each one's would-be
/// decision is in [`Decision::dry_run`].
pub fn evaluate(policies: &[&AuthorizationPolicy], c: &RequestInfo<'_>) -> Decision {
    let (dry, enforced): (Vec<&AuthorizationPolicy>, Vec<&AuthorizationPolicy>) =
        policies.iter().partition(|p| p.is_dry_run());
    let mut d = decide(&enforced, c);
    for p in dry {
        let mut with = enforced.clone();
        with.push(p);
        d.dry_run.push(DryRun {
            policy: p.key(),
            allowed: decide(&with, c).allowed,
        });
    }
    d
}

/// [`evaluate`] on enforced policies only.
fn decide(policies: &[&AuthorizationPolicy], c: &RequestInfo<'_>) -> Decision {
    let mut d = Decision {
        allowed: true,
        policy: None,
        reason: String::new(),
        audited: vec![],
        needs_waypoint: vec![],
        dry_run: vec![],
    };
    if c.http.is_none() {
        d.needs_waypoint = policies
            .iter()
            .filter(|p| has_l7_rules(p))
            .map(|p| p.key())
            .collect();
    }
    // CUSTOM needs an external authorizer, which only a waypoint has: a
    // match denies rather than letting the connection through unchecked.
    for action in [AuthorizationAction::Custom, AuthorizationAction::Deny] {
        if let Some(p) = policies
            .iter()
            .find(|p| p.spec.action == action && policy_matches(p, c))
        {
            d.allowed = false;
            d.policy = Some(p.key());
            d.reason = match (&p.rejected, action) {
                (Some(why), _) => unreadable(p, why),
                (None, AuthorizationAction::Deny) => format!("denied by DENY policy {}", p.key()),
                (None, _) => format!(
                    "denied by CUSTOM policy {} (no external authorizer at L4)",
                    p.key()
                ),
            };
            return d;
        }
    }
    d.audited = policies
        .iter()
        .filter(|p| p.spec.action == AuthorizationAction::Audit && policy_matches(p, c))
        .map(|p| p.key())
        .collect();
    let allows: Vec<&&AuthorizationPolicy> = policies
        .iter()
        .filter(|p| p.spec.action == AuthorizationAction::Allow)
        .collect();
    if allows.is_empty() {
        d.reason = "no ALLOW policy applies".into();
        return d;
    }
    if let Some(p) = allows.iter().find(|p| policy_matches(p, c)) {
        d.policy = Some(p.key());
        d.reason = format!("allowed by ALLOW policy {}", p.key());
        return d;
    }
    d.allowed = false;
    if let Some(p) = allows.iter().find(|p| p.rejected.is_some()) {
        // Name the unreadable policy: that is what the operator must fix.
        d.policy = Some(p.key());
        d.reason = unreadable(p, p.rejected.as_deref().unwrap_or_default());
        return d;
    }
    d.reason = format!(
        "no rule of the ALLOW policies ({}) matches",
        allows
            .iter()
            .map(|p| p.key())
            .collect::<Vec<_>>()
            .join(", ")
    );
    if !d.needs_waypoint.is_empty() {
        d.reason
            .push_str("; rules with L7 attributes never match at L4 (they need a waypoint)");
    }
    d
}

fn unreadable(p: &AuthorizationPolicy, why: &str) -> String {
    format!(
        "policy {} could not be read and denies in its scope until fixed: {why}",
        p.key()
    )
}

/// Whether one of the policy's rules matches.
fn policy_matches(p: &AuthorizationPolicy, c: &RequestInfo<'_>) -> bool {
    p.spec
        .rules
        .iter()
        .flatten()
        .any(|r| rule_matches(r, c, p.spec.action, &p.metadata.namespace))
}

/// Whether any rule of `p` uses attributes only a waypoint can check.
pub fn has_l7_rules(p: &AuthorizationPolicy) -> bool {
    p.spec.rules.iter().flatten().any(has_l7)
}

fn has_l7(r: &Rule) -> bool {
    r.from.iter().any(|f| source_has_l7(&f.source))
        || r.to.iter().any(|t| op_has_l7(&t.operation))
        || r.when.iter().any(|w| !is_l4_key(&w.key))
}

fn source_has_l7(s: &Source) -> bool {
    !(s.request_principals.is_empty()
        && s.not_request_principals.is_empty()
        && s.remote_ip_blocks.is_empty()
        && s.not_remote_ip_blocks.is_empty())
}

/// A `source` with none of the fields a node agent can check (istiod
/// makes it an empty match, which ztunnel never matches).
fn source_l4_empty(s: &Source) -> bool {
    s.principals.is_empty()
        && s.not_principals.is_empty()
        && s.namespaces.is_empty()
        && s.not_namespaces.is_empty()
        && s.service_accounts.is_empty()
        && s.not_service_accounts.is_empty()
        && s.ip_blocks.is_empty()
        && s.not_ip_blocks.is_empty()
}

fn op_has_l7(o: &Operation) -> bool {
    !(o.hosts.is_empty()
        && o.not_hosts.is_empty()
        && o.methods.is_empty()
        && o.not_methods.is_empty()
        && o.paths.is_empty()
        && o.not_paths.is_empty())
}

/// An `operation` with no ports: nothing a node agent can check.
fn op_l4_empty(o: &Operation) -> bool {
    o.ports.is_empty() && o.not_ports.is_empty()
}

/// The `when` keys a node agent can check (istiod's list for ztunnel;
/// `remote.ip` comes from X-Forwarded-For and is L7).
fn is_l4_key(k: &str) -> bool {
    matches!(
        k,
        "source.ip"
            | "source.namespace"
            | "source.principal"
            | "destination.ip"
            | "destination.port"
    )
}

/// The parts of a DENY or AUDIT policy that have no effect at a node
/// agent: for each rule that can never match there, the clause that makes
/// it so and its L7 attributes (`rules[0].to: methods, paths`). Istio says
/// the same of such a policy in its status; Sluice logs it, counts it and
/// `analyze` reports it.
pub fn ineffective_at_l4(p: &AuthorizationPolicy) -> Vec<String> {
    if !matches!(
        p.spec.action,
        AuthorizationAction::Deny | AuthorizationAction::Audit
    ) {
        return vec![];
    }
    let mut out = vec![];
    for (i, r) in p.spec.rules.iter().flatten().enumerate() {
        let mut l7 = vec![];
        if !r.from.is_empty() && r.from.iter().all(|f| source_l4_empty(&f.source)) {
            l7.push(format!("from: {}", l7_source_fields(&r.from).join(", ")));
        }
        if !r.to.is_empty() && r.to.iter().all(|t| op_l4_empty(&t.operation)) {
            l7.push(format!("to: {}", l7_op_fields(&r.to).join(", ")));
        }
        for (j, w) in r.when.iter().enumerate() {
            if !is_l4_key(&w.key) {
                l7.push(format!("when[{j}]: {}", w.key));
            }
        }
        if !l7.is_empty() {
            out.push(format!("rules[{i}] ({})", l7.join("; ")));
        }
    }
    out
}

fn l7_source_fields(from: &[crate::model::policy::RuleFrom]) -> Vec<&'static str> {
    let mut names = vec![];
    for f in from {
        let s = &f.source;
        for (set, name) in [
            (!s.request_principals.is_empty(), "requestPrincipals"),
            (!s.not_request_principals.is_empty(), "notRequestPrincipals"),
            (!s.remote_ip_blocks.is_empty(), "remoteIpBlocks"),
            (!s.not_remote_ip_blocks.is_empty(), "notRemoteIpBlocks"),
        ] {
            if set && !names.contains(&name) {
                names.push(name);
            }
        }
    }
    names
}

fn l7_op_fields(to: &[crate::model::policy::RuleTo]) -> Vec<&'static str> {
    let mut names = vec![];
    for t in to {
        let o = &t.operation;
        for (set, name) in [
            (!o.hosts.is_empty(), "hosts"),
            (!o.not_hosts.is_empty(), "notHosts"),
            (!o.methods.is_empty(), "methods"),
            (!o.not_methods.is_empty(), "notMethods"),
            (!o.paths.is_empty(), "paths"),
            (!o.not_paths.is_empty(), "notPaths"),
        ] {
            if set && !names.contains(&name) {
                names.push(name);
            }
        }
    }
    names
}

/// One rule against one request. `ns` is the policy's namespace (the
/// default namespace of `serviceAccounts` entries).
fn rule_matches(r: &Rule, c: &RequestInfo<'_>, action: AuthorizationAction, ns: &str) -> bool {
    if c.http.is_some() {
        // A waypoint sees every attribute.
        return (r.from.is_empty() || r.from.iter().any(|f| source_matches(&f.source, c, ns)))
            && (r.to.is_empty() || r.to.iter().any(|t| operation_matches(&t.operation, c)))
            && r.when.iter().all(|w| condition_matches(w, c, ns));
    }
    match action {
        AuthorizationAction::Allow => {
            !has_l7(r)
                && (r.from.is_empty() || r.from.iter().any(|f| source_matches(&f.source, c, ns)))
                && (r.to.is_empty() || r.to.iter().any(|t| operation_matches(&t.operation, c)))
                && r.when.iter().all(|w| condition_matches(w, c, ns))
        }
        AuthorizationAction::Deny | AuthorizationAction::Audit => {
            // Entries with no L4 field are empty matches: they never match.
            (r.from.is_empty()
                || r.from
                    .iter()
                    .any(|f| !source_l4_empty(&f.source) && source_matches(&f.source, c, ns)))
                && (r.to.is_empty()
                    || r.to
                        .iter()
                        .any(|t| !op_l4_empty(&t.operation) && operation_matches(&t.operation, c)))
                && r.when
                    .iter()
                    .all(|w| is_l4_key(&w.key) && condition_matches(w, c, ns))
        }
        AuthorizationAction::Custom => {
            // Fail closed: the unknown L7 part is taken to match.
            (r.from.is_empty() || r.from.iter().any(|f| source_matches(&f.source, c, ns)))
                && (r.to.is_empty() || r.to.iter().any(|t| operation_matches(&t.operation, c)))
                && r.when
                    .iter()
                    .all(|w| !is_l4_key(&w.key) || condition_matches(w, c, ns))
        }
    }
}

/// An operation against a request; at L4 only its ports are known (the
/// caller decides what an unknown L7 part means).
fn operation_matches(o: &Operation, c: &RequestInfo<'_>) -> bool {
    if !ports_match(o, c.destination_port) {
        return false;
    }
    let Some(h) = &c.http else {
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

/// `serviceAccounts` entries (`ns/sa`, or `sa` in the policy's namespace)
/// against the peer's identity: exact match, as Istio defines them.
fn service_account_match(entries: &[String], id: Option<&SpiffeId>, ns: &str) -> bool {
    let Some(id) = id else {
        return false;
    };
    entries.iter().any(|e| {
        let (want_ns, want_sa) = e.split_once('/').unwrap_or((ns, e.as_str()));
        id.namespace() == want_ns && id.service_account() == want_sa
    })
}

/// Field absent → matches; positive list → one must match; negative list →
/// none may match.
fn field(pos: &[String], neg: &[String], m: impl Fn(&[String]) -> bool) -> bool {
    (pos.is_empty() || m(pos)) && (neg.is_empty() || !m(neg))
}

/// A source against a request; at L4 its L7 fields are unknown and left
/// out (the caller decides what an entry with only L7 fields means).
fn source_matches(s: &Source, c: &RequestInfo<'_>, ns: &str) -> bool {
    // Plaintext has no principal and no namespace: positive lists cannot
    // match it, negative ones do not exclude it.
    let (principal, namespace) = (c.principal(), c.source_namespace());
    let l4 = field(&s.principals, &s.not_principals, |l| {
        any_match(l, &principal)
    }) && field(&s.namespaces, &s.not_namespaces, |l| {
        any_match(l, namespace)
    }) && field(&s.service_accounts, &s.not_service_accounts, |l| {
        service_account_match(l, c.source_identity, ns)
    }) && field(&s.ip_blocks, &s.not_ip_blocks, |l| ip_match(l, c.source_ip));
    if c.http.is_none() {
        return l4;
    }
    // No JWT support: every request has an empty request principal, so
    // `requestPrincipals` never matches and `notRequestPrincipals` always
    // does (a policy requiring a JWT denies, never lets through). The
    // remote address is the client's: no proxy in between is trusted to
    // set X-Forwarded-For.
    l4 && field(&s.request_principals, &s.not_request_principals, |l| {
        any_match(l, "")
    }) && field(&s.remote_ip_blocks, &s.not_remote_ip_blocks, |l| {
        ip_match(l, c.source_ip)
    })
}

fn ports_match(o: &Operation, port: u16) -> bool {
    let has = |l: &[String]| l.iter().any(|p| parse_port(p).ok() == Some(port));
    field(&o.ports, &o.not_ports, has)
}

/// One `when` condition. Keys without a value at hand (JWT claims, SNI,
/// Envoy filter metadata) read as empty: their `values` never match,
/// their `notValues` always do.
fn condition_matches(w: &Condition, c: &RequestInfo<'_>, ns: &str) -> bool {
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
            "source.namespace" => any_match(l, namespace),
            "source.serviceAccount" => service_account_match(l, c.source_identity, ns),
            _ => any_match(l, ""),
        }
    };
    field(&w.values, &w.not_values, m)
}

/// The PeerAuthentications of one scope of `w`, in the order Istio lets
/// them win: a policy that could not be read first, then the oldest, then
/// by name. Scopes: a workload policy of `w`'s namespace whose selector
/// (with labels) matches, a namespace-wide one (no selector, or one without
/// labels), a mesh-wide one (the root namespace, no selector). Root-namespace
/// policies with a selector are in no scope, as in Istio.
pub fn peer_authentications_in<'a>(
    model: &'a MeshModel,
    w: &Workload,
    scope: PaScope,
) -> Vec<&'a PeerAuthentication> {
    let root = &model.root_namespace;
    let mut v: Vec<&PeerAuthentication> = model
        .peer_authentications
        .iter()
        .filter(|p| match scope {
            PaScope::Workload => {
                p.metadata.namespace == w.namespace
                    && &p.metadata.namespace != root
                    && p.selects_workloads()
                    && p.spec
                        .selector
                        .as_ref()
                        .is_some_and(|s| s.matches(&w.labels))
            }
            PaScope::Namespace => {
                p.metadata.namespace == w.namespace
                    && &p.metadata.namespace != root
                    && !p.selects_workloads()
            }
            PaScope::Mesh => &p.metadata.namespace == root && p.spec.selector.is_none(),
        })
        .collect();
    v.sort_by(|a, b| {
        (a.rejected.is_none(), a.metadata.precedence())
            .cmp(&(b.rejected.is_none(), b.metadata.precedence()))
    });
    v
}

/// The scopes of PeerAuthentication, narrowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaScope {
    Workload,
    Namespace,
    Mesh,
}

/// The mutual-TLS mode in force for `w` on `port`, and the policy that set
/// it: the workload policy's port-level mode, then its own mode, then the
/// namespace's, then the mesh's (UNSET inherits); PERMISSIVE when nothing
/// is set.
///
/// Where Istio's ambient translation is inconsistent, the stricter reading
/// wins (and `analyze` warns): a port-level DISABLE under a workload policy
/// without a mode of its own is ignored (istiod drops it when the inherited
/// mode is STRICT), so the port inherits.
pub fn mtls_mode(model: &MeshModel, w: &Workload, port: u16) -> (MtlsMode, Option<String>) {
    let resolve = |m: MtlsMode| (m != MtlsMode::Unset).then_some(m);
    let first = |scope| peer_authentications_in(model, w, scope).first().copied();
    let (workload, namespace, mesh) = (
        first(PaScope::Workload),
        first(PaScope::Namespace),
        first(PaScope::Mesh),
    );
    if let Some(p) = workload {
        let own = p.spec.mtls.map(|m| m.mode).unwrap_or_default();
        let port_mode = p
            .spec
            .port_level_mtls
            .iter()
            .find(|(k, _)| parse_port(k).ok() == Some(port))
            .map(|(_, m)| m.mode)
            .filter(|m| !(own == MtlsMode::Unset && *m == MtlsMode::Disable));
        if let Some(m) = port_mode.and_then(resolve).or_else(|| resolve(own)) {
            return (m, Some(p.key()));
        }
    }
    for p in [namespace, mesh].into_iter().flatten() {
        if let Some(m) = p.spec.mtls.and_then(|m| resolve(m.mode)) {
            return (m, Some(p.key()));
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

    /// Istio: an ALLOW rule with any HTTP attribute is omitted for ztunnel
    /// (istiod `handleRule`: "L7 policies never match for ALLOW"), so an
    /// ALLOW policy made only of such rules allows nothing at L4.
    #[test]
    fn an_allow_rule_with_l7_attributes_never_matches_at_l4() {
        let m = model(
            r#"authorizationPolicies:
  - metadata: {name: allow-get, namespace: foo}
    spec: {rules: [{to: [{operation: {methods: [GET]}}]}]}
"#,
        );
        let d = check(&m, Some(&id("foo", "a")), "1.1.1.1", "web", 80);
        assert!(!d.allowed);
        assert_eq!(d.needs_waypoint, vec!["foo/allow-get".to_string()]);
        assert!(d.reason.contains("need a waypoint"), "{}", d.reason);
    }

    /// Istio: `remoteIpBlocks`, `notRemoteIpBlocks` and the `remote.ip` key
    /// are HTTP attributes (istiod `httpSources`; `remote.ip` is not in
    /// `l4WhenAttributes`): they come from X-Forwarded-For. In an ALLOW rule
    /// they make the rule unmatchable at L4; alone in a DENY clause they
    /// make it an empty match that never matches. At a waypoint they match
    /// the client's address.
    #[test]
    fn remote_ip_blocks_are_l7_attributes() {
        let m = model(
            r#"
services:
  - {name: httpbin, namespace: foo, vips: [10.96.0.1], ports: [{port: 8000}], selector: {app: httpbin}}
authorizationPolicies:
  - metadata: {name: allow-remote, namespace: foo}
    spec:
      selector: {matchLabels: {app: httpbin}}
      rules:
        - from: [{source: {remoteIpBlocks: ["10.0.0.0/8"]}}]
        - when: [{key: remote.ip, values: ["10.0.0.0/8"]}]
  - metadata: {name: deny-remote, namespace: foo}
    spec:
      selector: {matchLabels: {app: db}}
      action: DENY
      rules:
        - from: [{source: {notRemoteIpBlocks: ["192.168.0.0/16"]}}]
        - when: [{key: remote.ip, values: ["10.0.0.0/8"]}]
  - metadata: {name: wp-allow-remote, namespace: foo}
    spec:
      targetRefs: [{kind: Service, name: httpbin}]
      rules: [{from: [{source: {remoteIpBlocks: ["10.0.1.0/24"]}}]}]
"#,
        );
        // ALLOW: the source address is in the block, yet nothing matches.
        let d = check(&m, Some(&id("bar", "sleep")), "10.0.1.1", "web", 80);
        assert!(!d.allowed, "{d:?}");
        assert_eq!(d.needs_waypoint, vec!["foo/allow-remote".to_string()]);
        // DENY: no effect at L4, whatever the source address.
        for src in ["10.0.1.1", "172.16.0.1"] {
            let d = check(&m, Some(&id("bar", "sleep")), src, "db", 80);
            assert!(d.allowed, "{src}: {d:?}");
        }
        assert_eq!(
            ineffective_at_l4(&m.authorization_policies[1]),
            [
                "rules[0] (from: notRemoteIpBlocks)",
                "rules[1] (when[0]: remote.ip)"
            ]
        );
        // At the waypoint the client's address is the remote address.
        // (check_http sends from 10.0.1.1.)
        assert!(check_http(&m, Some(&id("bar", "sleep")), "GET", "/", &[]).allowed);
    }

    /// Istio: in a DENY policy istiod turns a `from`, `to` or `when` clause
    /// that holds only HTTP attributes into an empty match, and ztunnel
    /// never matches an empty match, so such a rule has no effect at L4
    /// (recent Istio says the policy has no enforceable rules at ztunnel).
    #[test]
    fn a_deny_rule_with_an_l7_only_clause_has_no_effect_at_l4() {
        let m = model(
            r#"authorizationPolicies:
  - metadata: {name: deny-post-from-bar, namespace: foo}
    spec:
      action: DENY
      rules: [{from: [{source: {namespaces: [bar]}}], to: [{operation: {methods: [POST]}}]}]
  - metadata: {name: deny-jwt, namespace: foo}
    spec:
      action: DENY
      rules: [{from: [{source: {notRequestPrincipals: ["*"]}}]}]
  - metadata: {name: deny-header, namespace: foo}
    spec:
      action: DENY
      rules: [{when: [{key: "request.headers[x-evil]", values: ["*"]}]}]
  - metadata: {name: deny-hosts, namespace: foo}
    spec:
      action: DENY
      rules: [{to: [{operation: {hosts: ["evil.example.com"], notPaths: ["/ok"]}}]}]
"#,
        );
        for src in ["bar", "qux"] {
            let d = check(&m, Some(&id(src, "sleep")), "1.1.1.1", "web", 80);
            assert!(d.allowed, "from {src}: {d:?}");
            assert_eq!(d.policy, None);
        }
        let d = check(&m, None, "1.1.1.1", "web", 80);
        assert!(d.allowed, "plaintext: {d:?}");
        let said: Vec<Vec<String>> = m
            .authorization_policies
            .iter()
            .map(ineffective_at_l4)
            .collect();
        assert_eq!(
            said,
            [
                vec!["rules[0] (to: methods)".to_string()],
                vec!["rules[0] (from: notRequestPrincipals)".to_string()],
                vec!["rules[0] (when[0]: request.headers[x-evil])".to_string()],
                vec!["rules[0] (to: hosts, notPaths)".to_string()],
            ]
        );
    }

    /// Istio: L4 and L7 fields in the same `source` or `operation` give a
    /// match with the L4 fields only, so such a DENY rule is enforced on its
    /// L4 part ("more restrictive than requested"); an L7-only entry next
    /// to an L4 one is skipped while the other is checked.
    #[test]
    fn a_deny_rule_mixing_l4_and_l7_in_one_entry_is_enforced_on_its_l4_part() {
        let m = model(
            r#"authorizationPolicies:
  - metadata: {name: deny-post-on-80, namespace: foo}
    spec:
      action: DENY
      rules: [{to: [{operation: {ports: ["80"], methods: [POST]}}]}]
  - metadata: {name: deny-bar-jwt, namespace: foo}
    spec:
      action: DENY
      rules: [{from: [{source: {namespaces: [bar], requestPrincipals: ["*"]}}]}]
  - metadata: {name: deny-9000-or-get, namespace: foo}
    spec:
      action: DENY
      rules: [{to: [{operation: {methods: [GET]}}, {operation: {ports: ["9000"]}}]}]
"#,
        );
        let d = check(&m, Some(&id("qux", "a")), "1.1.1.1", "web", 80);
        assert_eq!(d.policy.as_deref(), Some("foo/deny-post-on-80"), "{d:?}");
        let d = check(&m, Some(&id("bar", "a")), "1.1.1.1", "web", 81);
        assert_eq!(d.policy.as_deref(), Some("foo/deny-bar-jwt"), "{d:?}");
        let d = check(&m, Some(&id("qux", "a")), "1.1.1.1", "web", 9000);
        assert_eq!(d.policy.as_deref(), Some("foo/deny-9000-or-get"), "{d:?}");
        assert!(check(&m, Some(&id("qux", "a")), "1.1.1.1", "web", 81).allowed);
        assert!(m
            .authorization_policies
            .iter()
            .all(|p| ineffective_at_l4(p).is_empty()));
    }

    /// Sluice's deliberate difference: Istio's node proxy ignores CUSTOM;
    /// Sluice has no external authorizer at L4 and denies what the rule's
    /// L4 part matches, taking an unknown L7 part to match (fail closed).
    #[test]
    fn custom_at_l4_denies_on_its_l4_part() {
        let m = model(
            r#"
extensionProviders:
  - {name: authz, envoyExtAuthzHttp: {service: authz.foo, port: 80}}
services:
  - {name: authz, namespace: foo, vips: [10.96.0.9], ports: [{port: 80}], selector: {app: db}}
authorizationPolicies:
  - metadata: {name: ext, namespace: foo}
    spec:
      selector: {matchLabels: {app: httpbin}}
      action: CUSTOM
      provider: {name: authz}
      rules: [{to: [{operation: {paths: ["/admin*"]}}]}, {to: [{operation: {ports: ["9000"]}}]}]
"#,
        );
        let d = check(&m, Some(&id("bar", "a")), "1.1.1.1", "web", 80);
        assert!(!d.allowed);
        assert!(d.reason.contains("CUSTOM"), "{}", d.reason);
        assert!(check(&m, Some(&id("bar", "a")), "1.1.1.1", "db", 80).allowed);
    }

    /// Istio: `istio.io/dry-run: "true"` makes an ALLOW or DENY policy
    /// report what it would decide without enforcing it (ztunnel logs
    /// dry-run matches and never acts on them).
    #[test]
    fn dry_run_policies_are_evaluated_but_never_enforced() {
        let m = model(
            r#"authorizationPolicies:
  - metadata: {name: would-deny-bar, namespace: foo, annotations: {istio.io/dry-run: "true"}}
    spec:
      action: DENY
      rules: [{from: [{source: {namespaces: [bar]}}]}]
  - metadata: {name: would-allow-qux, namespace: foo, annotations: {istio.io/dry-run: "True"}}
    spec:
      rules: [{from: [{source: {namespaces: [qux]}}]}]
"#,
        );
        let dry = |src: &str| {
            let d = check(&m, Some(&id(src, "a")), "1.1.1.1", "web", 80);
            assert!(d.allowed, "dry run enforced: {d:?}");
            assert_eq!(d.reason, "no ALLOW policy applies");
            d.dry_run
                .iter()
                .map(|o| (o.policy.as_str().to_string(), o.allowed))
                .collect::<Vec<_>>()
        };
        let s = |p: &str, a: bool| (p.to_string(), a);
        assert_eq!(
            dry("bar"),
            [
                s("foo/would-deny-bar", false),
                s("foo/would-allow-qux", false)
            ]
        );
        assert_eq!(
            dry("qux"),
            [
                s("foo/would-deny-bar", true),
                s("foo/would-allow-qux", true)
            ]
        );
        // With an enforced ALLOW that matches, the dry-run ALLOW that does
        // not would change nothing: it reports allow.
        let mut m2 = model(
            r#"authorizationPolicies:
  - metadata: {name: allow-all, namespace: foo}
    spec: {rules: [{}]}
"#,
        );
        m2.authorization_policies
            .push(m.authorization_policies[1].clone());
        let d = check(&m2, Some(&id("bar", "a")), "1.1.1.1", "web", 80);
        assert!(d.allowed);
        assert_eq!(
            d.dry_run,
            [DryRun {
                policy: "foo/would-allow-qux".into(),
                allowed: true
            }]
        );
    }

    /// Istio: a value that is not a boolean leaves the policy enforced; the
    /// annotation means nothing on CUSTOM or AUDIT (dry run covers ALLOW and
    /// DENY only).
    #[test]
    fn dry_run_needs_a_boolean_and_an_allow_or_deny_policy() {
        let m = model(
            r#"authorizationPolicies:
  - metadata: {name: typo, namespace: foo, annotations: {istio.io/dry-run: "yes"}}
    spec: {action: DENY, rules: [{}]}
"#,
        );
        let d = check(&m, Some(&id("bar", "a")), "1.1.1.1", "web", 80);
        assert_eq!(d.policy.as_deref(), Some("foo/typo"), "{d:?}");
        assert!(d.dry_run.is_empty());
        let mut p = m.authorization_policies[0].clone();
        p.metadata.annotations.insert(
            crate::model::policy::DRY_RUN_ANNOTATION.into(),
            "true".into(),
        );
        assert!(p.is_dry_run());
        p.spec.action = AuthorizationAction::Audit;
        assert!(!p.is_dry_run());
    }

    /// Istio 1.25+: `serviceAccounts` entries are `namespace/name` or a bare
    /// name in the policy's namespace, matched exactly against the peer's
    /// identity (istiod `stringToServiceAccountMatch`, ztunnel
    /// `ServiceAccountMatch`); plaintext has none.
    #[test]
    fn service_accounts_match_namespace_and_name_exactly() {
        let m = model(
            r#"authorizationPolicies:
  - metadata: {name: sa, namespace: foo}
    spec:
      selector: {matchLabels: {app: httpbin}}
      rules:
        - from: [{source: {serviceAccounts: ["bar/sleep", "web"]}}]
  - metadata: {name: not-sa, namespace: foo}
    spec:
      selector: {matchLabels: {app: db}}
      action: DENY
      rules: [{from: [{source: {notServiceAccounts: ["foo/web"]}}]}]
"#,
        );
        assert!(check(&m, Some(&id("bar", "sleep")), "1.1.1.1", "web", 80).allowed);
        assert!(check(&m, Some(&id("foo", "web")), "1.1.1.1", "web", 80).allowed);
        assert!(!check(&m, Some(&id("bar", "sleepy")), "1.1.1.1", "web", 80).allowed);
        assert!(!check(&m, Some(&id("baz", "web")), "1.1.1.1", "web", 80).allowed);
        assert!(!check(&m, None, "1.1.1.1", "web", 80).allowed);
        assert!(check(&m, Some(&id("foo", "web")), "1.1.1.1", "db", 80).allowed);
        assert!(!check(&m, Some(&id("bar", "web")), "1.1.1.1", "db", 80).allowed);
        assert!(!check(&m, None, "1.1.1.1", "db", 80).allowed);
    }

    /// Istio accepts a CIDR with host bits set; the prefix is what counts
    /// (Go's `netip.ParsePrefix`, then the masked range).
    #[test]
    fn a_cidr_with_host_bits_counts_by_its_prefix() {
        let m = model(
            r#"authorizationPolicies:
  - metadata: {name: net, namespace: foo}
    spec: {rules: [{from: [{source: {ipBlocks: ["10.0.1.7/24"]}}]}]}
"#,
        );
        assert!(check(&m, None, "10.0.1.200", "web", 80).allowed);
        assert!(!check(&m, None, "10.0.2.1", "web", 80).allowed);
    }

    /// Fail closed: the stand-in for an ALLOW policy that could not be read
    /// (Kubernetes mode) allows nothing in its scope, and the denial names
    /// it.
    #[test]
    fn an_unreadable_allow_policy_denies_in_its_scope() {
        let mut m = model("");
        let mut p = policy("broken", AuthorizationAction::Allow, vec![]);
        p.spec.rules = None;
        p.rejected = Some("spec.rules[0].from[0].source.principal: unknown field".into());
        m.authorization_policies = vec![p];
        let d = check(&m, Some(&id("foo", "a")), "1.1.1.1", "web", 80);
        assert!(!d.allowed);
        assert_eq!(d.policy.as_deref(), Some("foo/broken"));
        assert!(d.reason.contains("could not be read"), "{}", d.reason);
        assert!(d.reason.contains("unknown field"), "{}", d.reason);
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

    /// Istio: a PeerAuthentication in the root namespace with a selector is
    /// not mesh-wide and applies to nothing (istiod only takes root-namespace
    /// policies without a selector, and workload policies from the
    /// workload's own namespace).
    #[test]
    fn a_root_namespace_peer_authentication_with_a_selector_is_ignored() {
        let m = model(
            r#"peerAuthentications:
  - metadata: {name: strict-web, namespace: istio-system}
    spec: {selector: {matchLabels: {app: httpbin}}, mtls: {mode: STRICT}}
"#,
        );
        let w = m.workloads.iter().find(|w| w.name == "web").unwrap();
        assert_eq!(mtls_mode(&m, w, 80), (MtlsMode::Permissive, None));
    }

    /// Istio: a selector without labels (`selector: {}`) is namespace-wide
    /// (istiod classifies by `len(MatchLabels) == 0`); of two namespace-wide
    /// policies the oldest wins.
    #[test]
    fn an_empty_selector_is_namespace_wide_and_the_oldest_policy_wins() {
        let m = model(
            r#"peerAuthentications:
  - metadata: {name: b-newer, namespace: foo, creationTimestamp: "2026-12-02T10:00:00Z"}
    spec: {mtls: {mode: PERMISSIVE}}
  - metadata: {name: a-empty-selector, namespace: foo, creationTimestamp: "2026-12-01T10:00:00Z"}
    spec: {selector: {}, mtls: {mode: STRICT}}
"#,
        );
        let w = m
            .workloads
            .iter()
            .find(|w| w.name == "web")
            .unwrap()
            .clone();
        let w = &w;
        assert_eq!(
            mtls_mode(&m, w, 80),
            (MtlsMode::Strict, Some("foo/a-empty-selector".into()))
        );
        // Without timestamps the name decides, never the order of the file.
        let mut m = m;
        for p in &mut m.peer_authentications {
            p.metadata.creation_timestamp = None;
        }
        m.peer_authentications.reverse();
        assert_eq!(
            mtls_mode(&m, w, 80).1.as_deref(),
            Some("foo/a-empty-selector")
        );
    }

    /// Where istiod's ambient translation is inconsistent, the stricter
    /// reading: under a workload policy without a mode of its own, a
    /// port-level DISABLE is dropped by istiod when the inherited mode is
    /// STRICT (it only looks for PERMISSIVE ports there), so the port stays
    /// STRICT; a port-level PERMISSIVE is honoured.
    #[test]
    fn port_level_disable_under_a_workload_policy_without_a_mode_inherits() {
        let m = model(
            r#"peerAuthentications:
  - metadata: {name: ns, namespace: foo}
    spec: {mtls: {mode: STRICT}}
  - metadata: {name: db-ports, namespace: foo}
    spec:
      selector: {matchLabels: {app: db}}
      portLevelMtls: {"9000": {mode: DISABLE}, "9001": {mode: PERMISSIVE}}
"#,
        );
        let db = m.workloads.iter().find(|w| w.name == "db").unwrap();
        assert_eq!(
            mtls_mode(&m, db, 9000),
            (MtlsMode::Strict, Some("foo/ns".into()))
        );
        assert_eq!(
            mtls_mode(&m, db, 9001),
            (MtlsMode::Permissive, Some("foo/db-ports".into()))
        );
        assert_eq!(mtls_mode(&m, db, 80).0, MtlsMode::Strict);
    }

    /// Fail closed: the stand-in for a PeerAuthentication that could not be
    /// read is STRICT and wins over readable policies of its scope.
    #[test]
    fn an_unreadable_peer_authentication_is_strict_in_its_scope() {
        let mut m = model(
            r#"peerAuthentications:
  - metadata: {name: a-permissive, namespace: foo}
    spec: {mtls: {mode: PERMISSIVE}}
  - metadata: {name: z-broken, namespace: foo}
    spec: {mtls: {mode: STRICT}}
"#,
        );
        m.peer_authentications[1].rejected = Some("spec.mtls.mode: unknown variant".into());
        let w = m.workloads.iter().find(|w| w.name == "web").unwrap();
        assert_eq!(
            mtls_mode(&m, w, 80),
            (MtlsMode::Strict, Some("foo/z-broken".into()))
        );
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
                ..Default::default()
            },
            spec: crate::model::policy::AuthorizationPolicySpec {
                action,
                rules: Some(rules),
                ..Default::default()
            },
            rejected: None,
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
