//! The route table: the HTTPRoutes that apply to one service port for the
//! callers of one namespace (GAMMA: the caller's own consumer routes if it
//! has any, else the service's producer routes), compiled (regexes built,
//! durations parsed, backends resolved) and ordered by Gateway API
//! precedence, so that finding a request's rule is one pass over a list.
//!
//! Precedence across all rules of all routes, as the Gateway API specifies:
//! exact path, then the longest prefix (regular expressions after both),
//! then a method match, then the most header matches, then the most query
//! matches; ties go to the oldest route (`creationTimestamp`), then to
//! `namespace/name` in alphabetical order, then to rule order. A service
//! without routes gets one rule sending everything to itself; a service
//! with routes answers 404 to what none of them matches.
//!
//! What Gateway API says of edge cases, kept here: in one match, of several
//! header (case-insensitively) or query entries with the same name only the
//! first counts, and so in a header filter's `set` and `add`; a zero
//! timeout disables the timeout; a backend that cannot be used (missing, not
//! a Service, another namespace's without a ReferenceGrant) answers 500 for
//! the share of requests it would get.

use std::time::Duration;

use http::{HeaderMap, Method};
use mesh_core::model::gateway::{
    parse_duration, BackendProblem, HeaderModifier, HttpHeaderMatch, HttpRouteFilterType,
    HttpRouteRule, PathMatchType, PathModifier, RequestRedirect, UrlRewrite, ValueMatchType,
};
use mesh_core::model::{MeshModel, Service};
use regex::Regex;

/// A service port a rule sends to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub namespace: String,
    pub name: String,
    pub port: u16,
    pub weight: u32,
    /// Why it cannot be used (its share of requests gets a 500).
    pub problem: Option<BackendProblem>,
}

/// Why and how to retry, compiled from `retry`.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub attempts: u32,
    pub backoff: Duration,
    pub on_5xx: bool,
    pub on_gateway_error: bool,
    pub on_reset: bool,
    pub on_connect_failure: bool,
    pub codes: Vec<u16>,
}

impl RetryPolicy {
    /// Whether an answer with `status` is worth another attempt.
    pub fn retries_status(&self, status: u16) -> bool {
        (self.on_5xx && status >= 500)
            || (self.on_gateway_error && matches!(status, 502..=504))
            || self.codes.contains(&status)
    }
}

/// Fault injection of a rule.
#[derive(Debug, Clone, Default)]
pub struct Fault {
    pub delay: Option<(Duration, f64)>,
    pub abort: Option<(u16, f64)>,
}

/// A local rate limit of a rule.
#[derive(Debug, Clone)]
pub struct RateLimitSpec {
    pub requests: u32,
    pub interval: Duration,
    pub burst: u32,
    pub per_source: bool,
}

/// One rule, ready to apply.
#[derive(Debug)]
pub struct Rule {
    /// `namespace/route#index` (or `default` for the implicit rule), for
    /// logs, metrics and rate-limit buckets.
    pub id: String,
    pub backends: Vec<Backend>,
    pub request_headers: Option<HeaderModifier>,
    pub response_headers: Option<HeaderModifier>,
    pub rewrite: Option<UrlRewrite>,
    pub redirect: Option<RequestRedirect>,
    pub mirrors: Vec<(Backend, u32)>,
    pub timeout: Option<Duration>,
    pub backend_timeout: Option<Duration>,
    pub retry: Option<RetryPolicy>,
    pub fault: Option<Fault>,
    pub rate_limit: Option<RateLimitSpec>,
}

#[derive(Debug)]
enum PathMatch {
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

#[derive(Debug)]
enum ValueMatch {
    Exact(String),
    Regex(Regex),
}

impl ValueMatch {
    fn matches(&self, v: &str) -> bool {
        match self {
            ValueMatch::Exact(e) => e == v,
            ValueMatch::Regex(r) => r.is_match(v),
        }
    }
}

#[derive(Debug)]
struct Match {
    path: PathMatch,
    method: Option<Method>,
    headers: Vec<(http::HeaderName, ValueMatch)>,
    query: Vec<(String, ValueMatch)>,
    rule: usize,
}

/// The compiled routes of one service port.
#[derive(Debug)]
pub struct RouteTable {
    matches: Vec<Match>,
    rules: Vec<Rule>,
}

/// A request's rule and, for prefix matches, the prefix that matched
/// (what `ReplacePrefixMatch` replaces).
#[derive(Debug)]
pub struct Routed<'a> {
    pub rule: &'a Rule,
    pub matched_prefix: Option<&'a str>,
}

/// Why a route could not be compiled (only for objects that bypassed the
/// mesh file's validation).
#[derive(Debug, thiserror::Error)]
#[error("route {route}: {reason}")]
pub struct RouteError {
    pub route: String,
    pub reason: String,
}

fn value_match(kind: ValueMatchType, value: &str) -> Result<ValueMatch, String> {
    Ok(match kind {
        ValueMatchType::Exact => ValueMatch::Exact(value.to_string()),
        ValueMatchType::RegularExpression => ValueMatch::Regex(anchored(value)?),
    })
}

/// Gateway API regexes match the whole value.
fn anchored(re: &str) -> Result<Regex, String> {
    Regex::new(&format!("^(?:{re})$")).map_err(|e| format!("bad regular expression: {e}"))
}

fn duration(d: &Option<String>) -> Result<Option<Duration>, String> {
    d.as_deref().map(parse_duration).transpose()
}

/// A Gateway API timeout: zero disables it.
fn timeout(d: &Option<String>) -> Result<Option<Duration>, String> {
    Ok(duration(d)?.filter(|t| !t.is_zero()))
}

/// Of entries with the same key, the first (Gateway API: "only the first
/// entry with an equivalent name MUST be considered").
fn first_of<T, K: PartialEq>(items: impl IntoIterator<Item = T>, key: impl Fn(&T) -> K) -> Vec<T> {
    let mut out: Vec<T> = vec![];
    for i in items {
        if !out.iter().any(|o| key(o) == key(&i)) {
            out.push(i);
        }
    }
    out
}

/// A header modifier with one `set` and one `add` per header name (the
/// first), names compared case-insensitively.
fn dedup_modifier(m: &HeaderModifier) -> HeaderModifier {
    let lower = |h: &&mesh_core::model::gateway::HttpHeader| h.name.to_ascii_lowercase();
    HeaderModifier {
        set: first_of(m.set.iter(), lower).into_iter().cloned().collect(),
        add: first_of(m.add.iter(), lower).into_iter().cloned().collect(),
        remove: m.remove.clone(),
    }
}

impl RouteTable {
    /// Compile the routes of `svc` port `port` for callers in `caller_ns`.
    pub fn build(
        model: &MeshModel,
        svc: &Service,
        port: u16,
        caller_ns: &str,
    ) -> Result<RouteTable, RouteError> {
        let mut table = RouteTable {
            matches: vec![],
            rules: vec![],
        };
        let mut ordered: Vec<(u32, usize, usize, Match)> = vec![];
        let mut any_route = false;
        let (_, routes) = model.routes_for_caller(svc, port, caller_ns);
        for (ri, route) in routes.into_iter().enumerate() {
            any_route = true;
            let name = format!("{}/{}", route.metadata.namespace, route.metadata.name);
            for (i, r) in route.spec.rules.iter().enumerate() {
                let id = format!("{name}#{i}");
                let rule = compile_rule(model, r, &id, &route.metadata.namespace, svc, port)
                    .map_err(|reason| RouteError {
                        route: id.clone(),
                        reason,
                    })?;
                // Said once per table (a table lives as long as its model).
                for b in rule.backends.iter().filter(|b| b.problem.is_some()) {
                    tracing::warn!(
                        route = %id,
                        backend = %format!("{}/{}", b.namespace, b.name),
                        problem = %b.problem.as_ref().map(|p| p.to_string()).unwrap_or_default(),
                        "backend cannot be used: its share of requests gets 500"
                    );
                }
                let idx = table.rules.len();
                table.rules.push(rule);
                let default_match = [Default::default()];
                let ms = if r.matches.is_empty() {
                    &default_match[..]
                } else {
                    &r.matches[..]
                };
                for m in ms {
                    let path = m
                        .path
                        .clone()
                        .unwrap_or(mesh_core::model::gateway::HttpPathMatch {
                            kind: PathMatchType::PathPrefix,
                            value: "/".into(),
                        });
                    let err = |reason| RouteError {
                        route: id.clone(),
                        reason,
                    };
                    let path = match path.kind {
                        PathMatchType::Exact => PathMatch::Exact(path.value),
                        PathMatchType::PathPrefix => {
                            PathMatch::Prefix(path.value.trim_end_matches('/').to_string())
                        }
                        PathMatchType::RegularExpression => {
                            PathMatch::Regex(anchored(&path.value).map_err(err)?)
                        }
                    };
                    let headers = first_of(m.headers.iter(), |h| h.name.to_ascii_lowercase())
                        .into_iter()
                        .map(|h: &HttpHeaderMatch| {
                            let name = http::HeaderName::from_bytes(h.name.as_bytes())
                                .map_err(|e| format!("header {:?}: {e}", h.name))?;
                            Ok((name, value_match(h.kind, &h.value)?))
                        })
                        .collect::<Result<Vec<_>, String>>()
                        .map_err(err)?;
                    let query = first_of(m.query_params.iter(), |q| q.name.clone())
                        .into_iter()
                        .map(|q| Ok((q.name.clone(), value_match(q.kind, &q.value)?)))
                        .collect::<Result<Vec<_>, String>>()
                        .map_err(err)?;
                    let method = m
                        .method
                        .as_deref()
                        .map(|x| Method::from_bytes(x.as_bytes()).map_err(|e| e.to_string()))
                        .transpose()
                        .map_err(err)?;
                    let rank = precedence(&path, method.is_some(), headers.len(), query.len());
                    ordered.push((
                        rank,
                        ri,
                        ordered.len(),
                        Match {
                            path,
                            method,
                            headers,
                            query,
                            rule: idx,
                        },
                    ));
                }
            }
        }
        if !any_route {
            table.rules.push(default_rule(svc, port));
            ordered.push((
                0,
                0,
                0,
                Match {
                    path: PathMatch::Prefix(String::new()),
                    method: None,
                    headers: vec![],
                    query: vec![],
                    rule: 0,
                },
            ));
        }
        // Highest precedence first; stable on route then declaration order.
        ordered.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        table.matches = ordered.into_iter().map(|(_, _, _, m)| m).collect();
        Ok(table)
    }

    /// The rule for a request, or `None` (answer 404).
    pub fn find(
        &self,
        method: &Method,
        path: &str,
        query: &str,
        headers: &HeaderMap,
    ) -> Option<Routed<'_>> {
        self.matches.iter().find_map(|m| {
            let prefix = match &m.path {
                PathMatch::Exact(p) => (p == path).then_some(None)?,
                PathMatch::Prefix(p) => {
                    // Element-wise: `/foo` matches `/foo` and `/foo/bar`,
                    // not `/foobar`.
                    let ok = path.starts_with(p.as_str())
                        && (path.len() == p.len()
                            || path.as_bytes()[p.len()] == b'/'
                            || p.is_empty());
                    ok.then_some(Some(p.as_str()))?
                }
                PathMatch::Regex(r) => r.is_match(path).then_some(None)?,
            };
            if m.method.as_ref().is_some_and(|x| x != method) {
                return None;
            }
            let headers_ok = m.headers.iter().all(|(name, v)| {
                headers
                    .get_all(name)
                    .iter()
                    .any(|h| h.to_str().is_ok_and(|h| v.matches(h)))
            });
            let query_ok = m
                .query
                .iter()
                .all(|(name, v)| query_pairs(query).any(|(k, val)| k == name && v.matches(val)));
            (headers_ok && query_ok).then(|| Routed {
                rule: &self.rules[m.rule],
                matched_prefix: prefix,
            })
        })
    }
}

/// `a=1&b=2` as pairs (no percent-decoding: values compare as sent).
pub fn query_pairs(q: &str) -> impl Iterator<Item = (&str, &str)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
}

/// Gateway API precedence as one number (bigger wins).
fn precedence(path: &PathMatch, method: bool, headers: usize, query: usize) -> u32 {
    let (kind, len) = match path {
        PathMatch::Exact(p) => (2, p.len()),
        PathMatch::Prefix(p) => (1, p.len()),
        PathMatch::Regex(_) => (0, 0),
    };
    let len = len.min(4095) as u32;
    (kind << 30)
        | (len << 18)
        | ((method as u32) << 17)
        | ((headers.min(255) as u32) << 9)
        | query.min(255) as u32
}

fn default_rule(svc: &Service, port: u16) -> Rule {
    Rule::forwarding(
        "default",
        Backend {
            namespace: svc.namespace.clone(),
            name: svc.name.clone(),
            port,
            weight: 1,
            problem: None,
        },
    )
}

impl Rule {
    /// A rule that only forwards to `backend` (the implicit rule of a
    /// service without routes).
    pub fn forwarding(id: &str, backend: Backend) -> Rule {
        Rule {
            id: id.into(),
            backends: vec![backend],
            request_headers: None,
            response_headers: None,
            rewrite: None,
            redirect: None,
            mirrors: vec![],
            timeout: None,
            backend_timeout: None,
            retry: None,
            fault: None,
            rate_limit: None,
        }
    }
}

fn compile_rule(
    model: &MeshModel,
    r: &HttpRouteRule,
    id: &str,
    route_ns: &str,
    parent: &Service,
    port: u16,
) -> Result<Rule, String> {
    let backend = |b: &mesh_core::model::gateway::BackendObjectReference, weight| Backend {
        namespace: b.namespace.clone().unwrap_or_else(|| route_ns.to_string()),
        name: b.name.clone(),
        port: b.port.unwrap_or(port),
        weight,
        problem: model.backend_problem(route_ns, Some(parent), b, Some(port)),
    };
    let mut rule = default_rule(parent, port);
    rule.id = id.to_string();
    if !r.backend_refs.is_empty() {
        rule.backends = r
            .backend_refs
            .iter()
            .map(|b| backend(&b.backend, b.weight))
            .collect();
    }
    for f in &r.filters {
        match f.kind {
            HttpRouteFilterType::RequestHeaderModifier => {
                rule.request_headers = f.request_header_modifier.as_ref().map(dedup_modifier)
            }
            HttpRouteFilterType::ResponseHeaderModifier => {
                rule.response_headers = f.response_header_modifier.as_ref().map(dedup_modifier)
            }
            HttpRouteFilterType::URLRewrite => rule.rewrite = f.url_rewrite.clone(),
            HttpRouteFilterType::RequestRedirect => {
                rule.redirect = f.request_redirect.clone();
                rule.backends.clear();
            }
            HttpRouteFilterType::RequestMirror => {
                if let Some(m) = &f.request_mirror {
                    // A mirror that cannot be used mirrors nothing (the
                    // request itself is not affected).
                    let b = backend(&m.backend_ref, 1);
                    if b.problem.is_none() {
                        rule.mirrors.push((b, m.percent.unwrap_or(100)));
                    }
                }
            }
        }
    }
    if let Some(t) = &r.timeouts {
        rule.timeout = timeout(&t.request)?;
        rule.backend_timeout = timeout(&t.backend_request)?;
    }
    if let Some(rt) = &r.retry {
        let mut p = RetryPolicy {
            attempts: rt.attempts.unwrap_or(2),
            backoff: duration(&rt.backoff)?.unwrap_or(Duration::from_millis(25)),
            on_5xx: false,
            on_gateway_error: false,
            on_reset: false,
            on_connect_failure: false,
            codes: vec![],
        };
        let conditions: Vec<&str> = if rt.retry_on.is_empty() {
            if rt.codes.is_empty() {
                vec!["5xx"]
            } else {
                vec!["connect-failure", "reset", "retriable-status-codes"]
            }
        } else {
            rt.retry_on.iter().map(String::as_str).collect()
        };
        for c in conditions {
            match c {
                "5xx" => p.on_5xx = true,
                "gateway-error" => p.on_gateway_error = true,
                "reset" => p.on_reset = true,
                "connect-failure" => p.on_connect_failure = true,
                "retriable-status-codes" => p.codes = rt.codes.clone(),
                other => return Err(format!("unknown retry condition {other:?}")),
            }
        }
        // 5xx covers resets and connect failures in Envoy/Istio.
        if p.on_5xx || p.on_gateway_error {
            p.on_reset = true;
            p.on_connect_failure = true;
        }
        rule.retry = Some(p);
    }
    if let Some(f) = &r.fault {
        rule.fault = Some(Fault {
            delay: f
                .delay
                .as_ref()
                .map(|d| {
                    Ok::<_, String>((
                        parse_duration(&d.fixed_delay)?,
                        d.percentage.unwrap_or(100.0),
                    ))
                })
                .transpose()?,
            abort: f
                .abort
                .as_ref()
                .map(|a| (a.http_status, a.percentage.unwrap_or(100.0))),
        });
    }
    if let Some(rl) = &r.rate_limit {
        rule.rate_limit = Some(RateLimitSpec {
            requests: rl.requests,
            interval: duration(&rl.interval)?.unwrap_or(Duration::from_secs(1)),
            burst: rl.burst.unwrap_or(rl.requests),
            per_source: rl.per_source,
        });
    }
    Ok(rule)
}

/// Apply a path modifier: the new path for `path` (whose `matched_prefix`
/// matched, for `ReplacePrefixMatch`).
pub fn modify_path(m: &PathModifier, path: &str, matched_prefix: Option<&str>) -> String {
    use mesh_core::model::gateway::PathModifierType;
    match m.kind {
        PathModifierType::ReplaceFullPath => {
            m.replace_full_path.clone().unwrap_or_else(|| "/".into())
        }
        PathModifierType::ReplacePrefixMatch => {
            let replacement = m.replace_prefix_match.as_deref().unwrap_or("/");
            let rest = matched_prefix
                .and_then(|p| path.strip_prefix(p))
                .unwrap_or(path);
            let out = match (replacement.ends_with('/'), rest.starts_with('/')) {
                (true, true) => format!("{replacement}{}", &rest[1..]),
                (false, false) if !rest.is_empty() => format!("{replacement}/{rest}"),
                _ if replacement.is_empty() => rest.to_string(),
                _ => format!("{replacement}{rest}"),
            };
            // An empty replacement of the whole path is the root.
            if out.is_empty() {
                "/".into()
            } else {
                out
            }
        }
    }
}

/// Apply a header modifier (set, add, remove) to `headers`.
pub fn modify_headers(m: &HeaderModifier, headers: &mut HeaderMap) {
    for h in &m.set {
        if let (Ok(n), Ok(v)) = (
            http::HeaderName::from_bytes(h.name.as_bytes()),
            http::HeaderValue::from_str(&h.value),
        ) {
            headers.insert(n, v);
        }
    }
    for h in &m.add {
        if let (Ok(n), Ok(v)) = (
            http::HeaderName::from_bytes(h.name.as_bytes()),
            http::HeaderValue::from_str(&h.value),
        ) {
            headers.append(n, v);
        }
    }
    for name in &m.remove {
        headers.remove(name.as_str());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MESH: &str = r#"
nodes: [{name: n}]
workloads:
  - {name: r1, namespace: shop, node: n, ips: [10.0.0.1], labels: {app: reviews, version: v1}}
  - {name: r2, namespace: shop, node: n, ips: [10.0.0.2], labels: {app: reviews, version: v2}}
services:
  - {name: reviews, namespace: shop, vips: [10.96.0.1], ports: [{port: 80, targetPort: 8080}], selector: {app: reviews}}
  - {name: reviews-v1, namespace: shop, ports: [{port: 80, targetPort: 8080}], selector: {app: reviews, version: v1}}
  - {name: reviews-v2, namespace: shop, ports: [{port: 80, targetPort: 8080}], selector: {app: reviews, version: v2}}
"#;

    fn table(routes: &str) -> RouteTable {
        let m = MeshModel::from_yaml(&format!("{MESH}{routes}"), "t").unwrap();
        let svc = m.service("shop", "reviews").unwrap();
        RouteTable::build(&m, svc, 80, "shop").unwrap()
    }

    fn find<'a>(
        t: &'a RouteTable,
        method: &str,
        uri: &str,
        headers: &[(&str, &str)],
    ) -> Option<&'a str> {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
        t.find(
            &Method::from_bytes(method.as_bytes()).unwrap(),
            path,
            query,
            &map,
        )
        .map(|r| r.rule.id.as_str())
    }

    const ROUTES: &str = r#"
httpRoutes:
  - metadata: {name: reviews, namespace: shop}
    spec:
      parentRefs: [{kind: Service, group: "", name: reviews, port: 80}]
      rules:
        - matches: [{path: {type: PathPrefix, value: /api}}]
          backendRefs: [{name: reviews-v1, port: 80}]
        - matches: [{path: {type: PathPrefix, value: /api/v2}}]
          backendRefs: [{name: reviews-v2, port: 80}]
        - matches: [{path: {type: Exact, value: /api/v2/exact}}]
          backendRefs: [{name: reviews-v2, port: 80}]
        - matches: [{headers: [{name: end-user, value: jason}], path: {type: PathPrefix, value: /api}}]
          backendRefs: [{name: reviews-v2, port: 80}]
        - matches: [{method: POST, path: {type: RegularExpression, value: "/orders/[0-9]+"}}]
        - matches: [{queryParams: [{name: debug, value: "1"}], path: {value: /q}}]
"#;

    #[test]
    fn precedence_follows_gateway_api() {
        let t = table(ROUTES);
        assert_eq!(find(&t, "GET", "/api/list", &[]), Some("shop/reviews#0"));
        // Longest prefix wins over rule order.
        assert_eq!(find(&t, "GET", "/api/v2/x", &[]), Some("shop/reviews#1"));
        // Exact wins over any prefix.
        assert_eq!(
            find(&t, "GET", "/api/v2/exact", &[]),
            Some("shop/reviews#2")
        );
        // Same prefix, more header matches wins.
        assert_eq!(
            find(&t, "GET", "/api/list", &[("end-user", "jason")]),
            Some("shop/reviews#3")
        );
        // Prefixes match whole path elements.
        assert_eq!(find(&t, "GET", "/apix", &[]), None);
        assert_eq!(find(&t, "POST", "/orders/42", &[]), Some("shop/reviews#4"));
        assert_eq!(find(&t, "GET", "/orders/42", &[]), None);
        assert_eq!(
            find(&t, "POST", "/orders/42x", &[]),
            None,
            "regexes are anchored"
        );
        assert_eq!(
            find(&t, "GET", "/q?a=b&debug=1", &[]),
            Some("shop/reviews#5")
        );
        assert_eq!(find(&t, "GET", "/q?debug=2", &[]), None);
    }

    #[test]
    fn no_route_means_the_service_itself() {
        let t = table("");
        let r = t
            .find(&Method::GET, "/anything", "", &HeaderMap::new())
            .unwrap();
        assert_eq!(r.rule.id, "default");
        assert_eq!(
            r.rule.backends,
            [Backend {
                namespace: "shop".into(),
                name: "reviews".into(),
                port: 80,
                weight: 1,
                problem: None,
            }]
        );
    }

    #[test]
    fn weights_retries_faults_and_limits_compile() {
        let t = table(
            r#"
httpRoutes:
  - metadata: {name: canary, namespace: shop}
    spec:
      parentRefs: [{name: reviews}]
      rules:
        - backendRefs: [{name: reviews-v1, port: 80, weight: 90}, {name: reviews-v2, port: 80, weight: 10}]
          timeouts: {request: 2s, backendRequest: 500ms}
          retry: {attempts: 3, backoff: 10ms, retryOn: [gateway-error]}
          fault: {delay: {fixedDelay: 100ms, percentage: 50}, abort: {httpStatus: 503, percentage: 1.5}}
          rateLimit: {requests: 10, interval: 1m, perSource: true}
"#,
        );
        let r = t
            .find(&Method::GET, "/", "", &HeaderMap::new())
            .unwrap()
            .rule;
        assert_eq!(
            r.backends.iter().map(|b| b.weight).collect::<Vec<_>>(),
            [90, 10]
        );
        assert_eq!(r.timeout, Some(Duration::from_secs(2)));
        assert_eq!(r.backend_timeout, Some(Duration::from_millis(500)));
        let retry = r.retry.as_ref().unwrap();
        assert_eq!(retry.attempts, 3);
        assert!(retry.retries_status(503) && !retry.retries_status(500));
        assert!(retry.on_reset && retry.on_connect_failure);
        let fault = r.fault.as_ref().unwrap();
        assert_eq!(fault.delay, Some((Duration::from_millis(100), 50.0)));
        assert_eq!(fault.abort, Some((503, 1.5)));
        let rl = r.rate_limit.as_ref().unwrap();
        assert_eq!((rl.requests, rl.burst, rl.per_source), (10, 10, true));
        assert_eq!(rl.interval, Duration::from_secs(60));
    }

    #[test]
    fn path_rewrites() {
        use mesh_core::model::gateway::PathModifierType::*;
        let m = |kind, v: &str| PathModifier {
            kind,
            replace_full_path: Some(v.into()),
            replace_prefix_match: Some(v.into()),
        };
        assert_eq!(
            modify_path(&m(ReplaceFullPath, "/new"), "/old/x", Some("/old")),
            "/new"
        );
        assert_eq!(
            modify_path(&m(ReplacePrefixMatch, "/v2"), "/api/x", Some("/api")),
            "/v2/x"
        );
        assert_eq!(
            modify_path(&m(ReplacePrefixMatch, "/"), "/api/x", Some("/api")),
            "/x"
        );
        assert_eq!(
            modify_path(&m(ReplacePrefixMatch, "/v2/"), "/api/x", Some("/api")),
            "/v2/x"
        );
        assert_eq!(
            modify_path(&m(ReplacePrefixMatch, "/v2"), "/api", Some("/api")),
            "/v2"
        );
    }

    fn table_for(m: &MeshModel, caller: &str) -> RouteTable {
        let svc = m.service("shop", "reviews").unwrap();
        RouteTable::build(m, svc, 80, caller).unwrap()
    }

    fn model(extra: &str) -> MeshModel {
        MeshModel::from_yaml(
            &format!("{MESH}  - {{name: other, namespace: ext, ports: [{{port: 80}}], selector: {{app: reviews}}}}\n{extra}"),
            "t",
        )
        .unwrap()
    }

    /// Gateway API `HTTPRouteTimeouts`: a zero duration disables the
    /// timeout (conformance: HTTPRouteRequestTimeout with "0s").
    #[test]
    fn zero_timeouts_are_no_timeouts() {
        let t = table(
            r#"
httpRoutes:
  - metadata: {name: r, namespace: shop}
    spec:
      parentRefs: [{name: reviews}]
      rules: [{timeouts: {request: 0s, backendRequest: 0ms}}]
"#,
        );
        let r = t
            .find(&Method::GET, "/", "", &HeaderMap::new())
            .unwrap()
            .rule;
        assert_eq!((r.timeout, r.backend_timeout), (None, None));
    }

    /// Gateway API (GEP-709): a backendRef to another namespace's Service
    /// needs a ReferenceGrant there; without one the backend is invalid
    /// (`RefNotPermitted`) and its share gets a 500. The route's own parent
    /// Service is always reachable.
    #[test]
    fn cross_namespace_backends_need_a_reference_grant() {
        const ROUTE: &str = r#"
httpRoutes:
  - metadata: {name: r, namespace: shop}
    spec:
      parentRefs: [{name: reviews}]
      rules: [{backendRefs: [{name: other, namespace: ext, port: 80}, {name: reviews-v1, port: 80}]}]
"#;
        let problem = |m: &MeshModel| {
            let t = table_for(m, "shop");
            let r = t
                .find(&Method::GET, "/", "", &HeaderMap::new())
                .unwrap()
                .rule;
            (
                r.backends[0].problem.as_ref().map(|p| p.reason()),
                r.backends[1].problem.clone(),
            )
        };
        assert_eq!(problem(&model(ROUTE)), (Some("RefNotPermitted"), None));
        let grant = |from_ns: &str, name: &str| {
            format!("referenceGrants:\n  - metadata: {{name: g, namespace: ext}}\n    spec:\n      from: [{{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: {from_ns}}}]\n      to: [{{group: \"\", kind: Service{name}}}]\n")
        };
        assert_eq!(
            problem(&model(&format!("{ROUTE}{}", grant("shop", "")))),
            (None, None)
        );
        assert_eq!(
            problem(&model(&format!(
                "{ROUTE}{}",
                grant("shop", ", name: other")
            ))),
            (None, None)
        );
        for wrong in [
            grant("elsewhere", ""),
            grant("shop", ", name: someone-else"),
        ] {
            assert_eq!(
                problem(&model(&format!("{ROUTE}{wrong}"))).0,
                Some("RefNotPermitted")
            );
        }
    }

    /// GAMMA (conformance MeshConsumerRoute): a route in the caller's
    /// namespace whose parent is another namespace's Service applies to
    /// that caller only, and instead of the producer's routes; callers of
    /// other namespaces get the producer's routes.
    #[test]
    fn consumer_routes_apply_to_their_own_namespace_only() {
        let m = model(
            r#"
httpRoutes:
  - metadata: {name: producer, namespace: shop}
    spec:
      parentRefs: [{name: reviews}]
      rules: [{backendRefs: [{name: reviews-v1, port: 80}]}]
  - metadata: {name: consumer, namespace: ext}
    spec:
      parentRefs: [{name: reviews, namespace: shop}]
      rules: [{backendRefs: [{name: reviews, namespace: shop, port: 80}]}]
"#,
        );
        let rule = |caller: &str| {
            table_for(&m, caller)
                .find(&Method::GET, "/", "", &HeaderMap::new())
                .unwrap()
                .rule
                .id
                .clone()
        };
        assert_eq!(rule("ext"), "ext/consumer#0");
        assert_eq!(rule("shop"), "shop/producer#0");
        assert_eq!(rule("third"), "shop/producer#0");
        // The consumer route sends to its parent across namespaces: allowed.
        let t = table_for(&m, "ext");
        let r = t
            .find(&Method::GET, "/", "", &HeaderMap::new())
            .unwrap()
            .rule;
        assert_eq!(r.backends[0].problem, None);
    }

    /// Gateway API: a backend that does not exist or is not a Service is
    /// invalid, not dropped: its share of requests gets a 500.
    #[test]
    fn invalid_backends_stay_in_the_rule_with_their_problem() {
        let t = table(
            r#"
httpRoutes:
  - metadata: {name: r, namespace: shop}
    spec:
      parentRefs: [{name: reviews}]
      rules: [{backendRefs: [{name: ghost, port: 80, weight: 1}, {name: reviews-v1, kind: Pod, port: 80}, {name: reviews-v2, port: 9999}, {name: reviews-v1, port: 80}]}]
"#,
        );
        let r = t
            .find(&Method::GET, "/", "", &HeaderMap::new())
            .unwrap()
            .rule;
        let reasons: Vec<_> = r
            .backends
            .iter()
            .map(|b| b.problem.as_ref().map(|p| p.reason()))
            .collect();
        assert_eq!(
            reasons,
            [
                Some("BackendNotFound"),
                Some("InvalidKind"),
                Some("BackendNotFound"),
                None
            ]
        );
    }

    /// Gateway API `HTTPRouteMatch`: of header entries with the same name
    /// (case-insensitive) or query entries with the same name, only the
    /// first counts; likewise in a header filter's `set` and `add`.
    #[test]
    fn of_duplicate_names_only_the_first_counts() {
        let t = table(
            r#"
httpRoutes:
  - metadata: {name: r, namespace: shop}
    spec:
      parentRefs: [{name: reviews}]
      rules:
        - matches: [{headers: [{name: version, value: one}, {name: Version, value: two}], queryParams: [{name: q, value: a}, {name: q, value: b}]}]
          filters:
            - type: RequestHeaderModifier
              requestHeaderModifier:
                set: [{name: X-A, value: first}, {name: x-a, value: second}]
                add: [{name: X-B, value: first}, {name: X-B, value: second}]
"#,
        );
        assert_eq!(
            find(&t, "GET", "/?q=a", &[("version", "one")]),
            Some("shop/r#0")
        );
        assert_eq!(find(&t, "GET", "/?q=b", &[("version", "one")]), None);
        assert_eq!(find(&t, "GET", "/?q=a", &[("version", "two")]), None);
        let r = t
            .find(&Method::GET, "/", "q=a", &{
                let mut h = HeaderMap::new();
                h.insert("version", "one".parse().unwrap());
                h
            })
            .unwrap()
            .rule;
        let mut h = HeaderMap::new();
        modify_headers(r.request_headers.as_ref().unwrap(), &mut h);
        assert_eq!(h.get_all("x-a").iter().collect::<Vec<_>>(), ["first"]);
        assert_eq!(h.get_all("x-b").iter().collect::<Vec<_>>(), ["first"]);
    }

    /// Gateway API precedence ties: the oldest route wins, then
    /// `namespace/name` alphabetically — never the order of the list.
    #[test]
    fn ties_go_to_the_oldest_route_then_the_name() {
        let routes = |a_time: &str, b_time: &str, a_first: bool| {
            let a = format!("  - metadata: {{name: a-route, namespace: shop{a_time}}}\n    spec: {{parentRefs: [{{name: reviews}}], rules: [{{backendRefs: [{{name: reviews-v1, port: 80}}]}}]}}\n");
            let b = format!("  - metadata: {{name: b-route, namespace: shop{b_time}}}\n    spec: {{parentRefs: [{{name: reviews}}], rules: [{{backendRefs: [{{name: reviews-v2, port: 80}}]}}]}}\n");
            if a_first {
                format!("httpRoutes:\n{a}{b}")
            } else {
                format!("httpRoutes:\n{b}{a}")
            }
        };
        for a_first in [true, false] {
            assert_eq!(
                find(&table(&routes("", "", a_first)), "GET", "/", &[]),
                Some("shop/a-route#0")
            );
            let older_b = routes(
                ", creationTimestamp: \"2026-12-02T10:00:00Z\"",
                ", creationTimestamp: \"2026-12-01T10:00:00Z\"",
                a_first,
            );
            assert_eq!(
                find(&table(&older_b), "GET", "/", &[]),
                Some("shop/b-route#0")
            );
        }
    }

    /// Gateway API: `replacePrefixMatch: ""` is valid and means `/`.
    #[test]
    fn an_empty_prefix_replacement_is_the_root() {
        let m = MeshModel::from_yaml(
            &format!(
                "{MESH}httpRoutes:\n  - metadata: {{name: r, namespace: shop}}\n    spec: {{parentRefs: [{{name: reviews}}], rules: [{{matches: [{{path: {{value: /api}}}}], filters: [{{type: URLRewrite, urlRewrite: {{path: {{type: ReplacePrefixMatch, replacePrefixMatch: \"\"}}}}}}]}}]}}\n"
            ),
            "t",
        )
        .expect("an empty replacePrefixMatch is valid");
        let svc = m.service("shop", "reviews").unwrap();
        let t = RouteTable::build(&m, svc, 80, "shop").unwrap();
        let routed = t
            .find(&Method::GET, "/api/x", "", &HeaderMap::new())
            .unwrap();
        let rw = routed.rule.rewrite.as_ref().unwrap().path.as_ref().unwrap();
        assert_eq!(modify_path(rw, "/api/x", routed.matched_prefix), "/x");
        assert_eq!(modify_path(rw, "/api", routed.matched_prefix), "/");
    }
}
