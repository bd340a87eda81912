//! The life of one HTTP request through the waypoint, in named phases:
//!
//! 1. `route` — find the rule (404 when routes exist and none matches);
//! 2. `authorize` — `CUSTOM` policies ask their external authorizer, then
//!    L7 AuthorizationPolicy (403);
//! 3. `rate_limit` — the rule's token bucket (429 + `retry-after`);
//! 4. `fault` — injected delay and abort;
//! 5. `redirect` / `rewrite` — answer a redirect, or edit path, host and
//!    headers; propagate W3C trace context;
//! 6. `mirror` — a copy to the shadow backend, answer discarded;
//! 7. `forward` — weighted backend, balanced endpoint, per-try and overall
//!    timeouts, retries with backoff inside a retry budget, outlier
//!    reports;
//! 8. `respond` — response header edits; metrics and the access-log line
//!    are written when the response body ends.
//!
//! Every local answer carries a reason in the access log and an Envoy
//! response flag ([`ResponseFlag`]).

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use mesh_core::identity::SpiffeId;
use mesh_core::metrics::{Peer, Reporter, RequestLabels, TcpLabels};
use mesh_core::model::policy::AuthorizationAction;
use mesh_core::model::{MeshModel, Service};
use mesh_core::policy::{evaluate, matching_custom, waypoint_policies, HttpAttrs, RequestInfo};
use rand::Rng;

use crate::balancer::{HashInput, LbPolicy, Outcome, PickError};
use crate::extauthz;
use crate::routes::{modify_headers, modify_path, Backend, Rule};
use crate::upstream::{self, Target};
use crate::Ctx;

/// Response bodies the waypoint returns.
pub type RespBody = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

/// What the waypoint knows about the tunnel a request came in on.
#[derive(Debug, Clone)]
pub struct ConnCtx {
    /// Verified by mTLS: the client's identity (its node agent presents
    /// the source pod's certificate).
    pub source_identity: SpiffeId,
    pub source_ip: IpAddr,
    /// The original destination (service VIP and port).
    pub target: SocketAddr,
    pub service_namespace: String,
    pub service_name: String,
    pub port: u16,
}

/// Request bodies larger than this are not buffered for retries/mirroring.
const MAX_REPLAY_BODY: usize = 4 * 1024 * 1024;

/// Why the waypoint answered or failed a request itself, as Envoy's
/// response flags name it (the access log's `flags`, the metrics'
/// `response_flags`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFlag {
    /// Nothing to report (`-`).
    None,
    /// No route, or no backend for it (`NR`).
    NoRoute,
    /// A backend service that does not exist (`NC`).
    NoClusterFound,
    /// Denied by an external authorizer (`UAEX`).
    ExtAuthzDenied,
    /// Denied by AuthorizationPolicy (`RBAC`).
    RbacDenied,
    /// Over the rule's rate limit (`RL`).
    RateLimited,
    /// An injected delay (`DI`).
    DelayInjected,
    /// An injected abort (`FI`).
    FaultInjected,
    /// No healthy endpoint (`UH`).
    NoHealthyUpstream,
    /// A circuit breaker's limit (`UO`).
    UpstreamOverflow,
    /// The upstream connection failed (`UF`).
    UpstreamConnectionFailure,
    /// The upstream connection ended before a response (`UC`).
    UpstreamConnectionTermination,
    /// The upstream took longer than the timeout (`UT`).
    UpstreamRequestTimeout,
    /// Retried, and the retries ran out (`URX`).
    UpstreamRetryLimitExceeded,
}

impl ResponseFlag {
    /// Envoy's short name.
    pub fn as_str(self) -> &'static str {
        match self {
            ResponseFlag::None => "-",
            ResponseFlag::NoRoute => "NR",
            ResponseFlag::NoClusterFound => "NC",
            ResponseFlag::ExtAuthzDenied => "UAEX",
            ResponseFlag::RbacDenied => "RBAC",
            ResponseFlag::RateLimited => "RL",
            ResponseFlag::DelayInjected => "DI",
            ResponseFlag::FaultInjected => "FI",
            ResponseFlag::NoHealthyUpstream => "UH",
            ResponseFlag::UpstreamOverflow => "UO",
            ResponseFlag::UpstreamConnectionFailure => "UF",
            ResponseFlag::UpstreamConnectionTermination => "UC",
            ResponseFlag::UpstreamRequestTimeout => "UT",
            ResponseFlag::UpstreamRetryLimitExceeded => "URX",
        }
    }
}

impl std::fmt::Display for ResponseFlag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

fn full(b: impl Into<Bytes>) -> RespBody {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// Everything the access log and metrics record about one request.
struct Record {
    start: Instant,
    method: Method,
    path: String,
    host: String,
    route: String,
    flags: ResponseFlag,
    reason: String,
    upstream: Option<SocketAddr>,
    destination_workload: Option<usize>,
    attempts: u32,
    trace: Option<TraceIds>,
    wall_start: std::time::SystemTime,
    request_bytes: u64,
    grpc: bool,
}

/// Serve one request; never fails (errors become status codes).
pub async fn handle(
    ctx: Arc<Ctx>,
    conn: Arc<ConnCtx>,
    req: Request<Incoming>,
) -> Result<Response<RespBody>, Infallible> {
    ctx.active_requests.fetch_add(1, Ordering::Relaxed);
    let model = ctx.model();
    let mut rec = Record {
        start: Instant::now(),
        method: req.method().clone(),
        path: req.uri().path().to_string(),
        host: host_of(&req),
        route: "-".into(),
        flags: ResponseFlag::None,
        reason: String::new(),
        upstream: None,
        destination_workload: None,
        attempts: 0,
        trace: None,
        wall_start: std::time::SystemTime::now(),
        request_bytes: req.body().size_hint().exact().unwrap_or(0),
        grpc: req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc")),
    };
    let resp = process(&ctx, &conn, &model, req, &mut rec).await;
    ctx.active_requests.fetch_sub(1, Ordering::Relaxed);
    Ok(finish(ctx, conn, model, resp, rec))
}

fn host_of<B>(req: &Request<B>) -> String {
    req.uri()
        .authority()
        .map(|a| a.to_string())
        .or_else(|| {
            req.headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_default()
}

/// A response the waypoint makes itself.
fn local(status: StatusCode, body: &str) -> Response<RespBody> {
    let mut r = Response::new(full(format!("{body}\n")));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain"),
    );
    r
}

fn deny(
    rec: &mut Record,
    status: StatusCode,
    flags: ResponseFlag,
    reason: String,
    body: &str,
) -> Response<RespBody> {
    rec.flags = flags;
    rec.reason = reason;
    local(status, body)
}

fn chance(percent: f64) -> bool {
    percent >= 100.0 || rand::rng().random::<f64>() * 100.0 < percent
}

async fn process(
    ctx: &Arc<Ctx>,
    conn: &ConnCtx,
    model: &Arc<MeshModel>,
    req: Request<Incoming>,
    rec: &mut Record,
) -> Response<RespBody> {
    let Some(svc) = model.service(&conn.service_namespace, &conn.service_name) else {
        return deny(
            rec,
            StatusCode::SERVICE_UNAVAILABLE,
            ResponseFlag::NoRoute,
            "service is gone".into(),
            "no such service",
        );
    };

    // 1. route
    // GAMMA: consumer routes apply to callers of their own namespace.
    let table = match ctx.routes(model, svc, conn.port, conn.source_identity.namespace()) {
        Ok(t) => t,
        Err(e) => {
            return deny(
                rec,
                StatusCode::INTERNAL_SERVER_ERROR,
                ResponseFlag::NoRoute,
                e.to_string(),
                "route configuration error",
            )
        }
    };
    let query = req.uri().query().unwrap_or("").to_string();
    let Some(routed) = table.find(req.method(), req.uri().path(), &query, req.headers()) else {
        return deny(
            rec,
            StatusCode::NOT_FOUND,
            ResponseFlag::NoRoute,
            "no route matches".into(),
            "no route",
        );
    };
    let rule: &Rule = routed.rule;
    rec.route = rule.id.clone();

    // 2. authorize
    let policies = waypoint_policies(
        model,
        &ctx.cfg.namespace,
        &ctx.cfg.name,
        &svc.namespace,
        &svc.name,
    );
    let info = RequestInfo {
        source_identity: Some(&conn.source_identity),
        source_ip: conn.source_ip,
        destination_ip: conn.target.ip(),
        destination_port: conn.port,
        http: Some(HttpAttrs {
            method: req.method().as_str(),
            path: req.uri().path(),
            host: &rec.host,
            headers: req.headers(),
        }),
    };
    // CUSTOM first: each matching policy's external authorizer decides.
    let mut allowed_headers = HeaderMap::new();
    for p in matching_custom(&policies, &info) {
        let provider = p
            .spec
            .provider
            .as_ref()
            .and_then(|pr| model.extension_providers.iter().find(|e| e.name == pr.name));
        let Some(provider) = provider else {
            return deny(
                rec,
                StatusCode::FORBIDDEN,
                ResponseFlag::ExtAuthzDenied,
                format!(
                    "policy {}/{}: unknown extension provider",
                    p.metadata.namespace, p.metadata.name
                ),
                "RBAC: access denied",
            );
        };
        let pq = req
            .uri()
            .path_and_query()
            .map(|x| x.as_str())
            .unwrap_or("/");
        let input = extauthz::CheckInput {
            method: req.method(),
            path_and_query: pq,
            host: &rec.host,
            headers: req.headers(),
            protocol: req.version(),
        };
        match extauthz::check(ctx, conn, model, provider, &input).await {
            extauthz::Verdict::Allow(h) => allowed_headers.extend(h),
            extauthz::Verdict::Deny {
                status,
                headers,
                body,
                reason,
            } => {
                ctx.metrics
                    .denials
                    .get_or_create(&crate::telemetry::PolicyLabels {
                        policy: format!("{}/{}", p.metadata.namespace, p.metadata.name),
                    })
                    .inc();
                rec.flags = ResponseFlag::ExtAuthzDenied;
                rec.reason = reason;
                let mut r = Response::new(full(body));
                *r.status_mut() = status;
                r.headers_mut().extend(headers);
                return r;
            }
        }
    }
    let rest: Vec<_> = policies
        .iter()
        .copied()
        .filter(|p| p.spec.action != AuthorizationAction::Custom)
        .collect();
    let decision = evaluate(&rest, &info);
    if !decision.dry_run.is_empty() {
        let what = format!(
            "{} ({}) -> {} {}{}",
            conn.source_ip,
            conn.source_identity,
            req.method(),
            rec.host,
            req.uri().path()
        );
        ctx.metrics.policy.record_dry_run(&decision.dry_run, &what);
    }
    if !decision.allowed {
        ctx.metrics
            .denials
            .get_or_create(&crate::telemetry::PolicyLabels {
                policy: decision.policy.clone().unwrap_or_else(|| "-".into()),
            })
            .inc();
        return deny(
            rec,
            StatusCode::FORBIDDEN,
            ResponseFlag::RbacDenied,
            decision.reason,
            "RBAC: access denied",
        );
    }

    // 3. rate_limit
    if let Some(rl) = &rule.rate_limit {
        let key = if rl.per_source {
            format!("{}|{}", rule.id, conn.source_identity)
        } else {
            rule.id.clone()
        };
        if let Err(wait) = ctx.limiter.check(&key, rl, Instant::now()) {
            let mut r = deny(
                rec,
                StatusCode::TOO_MANY_REQUESTS,
                ResponseFlag::RateLimited,
                format!("rate limited ({key})"),
                "local_rate_limited",
            );
            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            r.headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
            return r;
        }
    }

    // 4. fault
    if let Some(f) = &rule.fault {
        if let Some((d, pct)) = f.delay {
            if chance(pct) {
                rec.flags = ResponseFlag::DelayInjected;
                tokio::time::sleep(d).await;
            }
        }
        if let Some((status, pct)) = f.abort {
            if chance(pct) {
                let status =
                    StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                return deny(
                    rec,
                    status,
                    ResponseFlag::FaultInjected,
                    "fault injected".into(),
                    "fault filter abort",
                );
            }
        }
    }

    // 5. redirect / rewrite
    if let Some(r) = &rule.redirect {
        let location = redirect_location(
            r,
            &rec.host,
            conn.port,
            req.uri().path(),
            &query,
            routed.matched_prefix,
        );
        let status = r
            .status_code
            .and_then(|c| StatusCode::from_u16(c).ok())
            .unwrap_or(StatusCode::FOUND);
        let mut resp = local(status, "redirect");
        if let Ok(v) = HeaderValue::from_str(&location) {
            resp.headers_mut().insert(http::header::LOCATION, v);
        }
        rec.reason = format!("redirect to {location}");
        return resp;
    }
    let (mut parts, body) = req.into_parts();
    for (name, value) in allowed_headers.iter() {
        parts.headers.insert(name.clone(), value.clone());
    }
    if let Some(m) = &rule.request_headers {
        modify_headers(m, &mut parts.headers);
    }
    if let Some(rw) = &rule.rewrite {
        let mut path = parts.uri.path().to_string();
        if let Some(m) = &rw.path {
            path = modify_path(m, &path, routed.matched_prefix);
        }
        let pq = if query.is_empty() {
            path
        } else {
            format!("{path}?{query}")
        };
        let mut uri = http::uri::Builder::new().path_and_query(pq.as_str());
        if let Some(a) = parts.uri.authority() {
            uri = uri
                .scheme(parts.uri.scheme_str().unwrap_or("http"))
                .authority(a.as_str());
        }
        if let Ok(u) = uri.build() {
            parts.uri = u;
        }
        if let Some(h) = &rw.hostname {
            if let Ok(v) = HeaderValue::from_str(h) {
                parts.headers.insert(http::header::HOST, v);
                if parts.uri.authority().is_some() {
                    let pq = parts
                        .uri
                        .path_and_query()
                        .map(|p| p.as_str().to_string())
                        .unwrap_or("/".into());
                    if let Ok(u) = format!("http://{h}{pq}").parse() {
                        parts.uri = u;
                    }
                }
            }
        }
    }
    rec.trace = Some(propagate_trace(&mut parts.headers));
    if !parts.headers.contains_key("x-request-id") {
        let id = format!("{:032x}", rand::rng().random::<u128>());
        if let Ok(v) = HeaderValue::from_str(&id) {
            parts.headers.insert("x-request-id", v);
        }
    }
    strip_hop_by_hop(&mut parts.headers);

    // Bodies are buffered when a retry or a mirror needs to send them again.
    let replay = rule.retry.is_some() || !rule.mirrors.is_empty();
    let mut buffered: Option<Bytes> = None;
    let mut streaming: Option<Incoming> = None;
    if replay {
        match Limited::new(body, MAX_REPLAY_BODY).collect().await {
            Ok(c) => {
                let b = c.to_bytes();
                rec.request_bytes = b.len() as u64;
                buffered = Some(b);
            }
            Err(e) => {
                return deny(
                    rec,
                    StatusCode::PAYLOAD_TOO_LARGE,
                    ResponseFlag::None,
                    format!("request body: {e}"),
                    "request body too large to retry",
                );
            }
        }
    } else {
        streaming = Some(body);
    }

    // 6. mirror
    if let Some(b) = &buffered {
        for (backend, percent) in &rule.mirrors {
            if chance(*percent as f64) {
                let mut copy = Request::from_parts(clone_parts(&parts), ());
                copy.headers_mut().remove(http::header::CONTENT_LENGTH);
                // Istio marks the shadow's host with a `-shadow` suffix.
                shadow_host(copy.headers_mut(), &rec.host);
                let (p, ()) = copy.into_parts();
                let (ctx, conn, model, backend, body) = (
                    ctx.clone(),
                    conn.clone(),
                    model.clone(),
                    backend.clone(),
                    b.clone(),
                );
                tokio::spawn(async move {
                    let req = Request::from_parts(p, full(body));
                    match send_once(&ctx, &conn, &model, &backend, req, &[]).await {
                        Ok((resp, _)) => {
                            // Read and drop: the caller never sees it.
                            let _ = resp.into_body().collect().await;
                        }
                        Err(e) => {
                            tracing::debug!(backend = %backend.name, error = %e.reason, "mirror request failed (ignored)")
                        }
                    }
                });
            }
        }
    }

    // 7. forward
    let forward = forward(ctx, conn, model, rule, parts, buffered, streaming, rec);
    let resp = match rule.timeout {
        Some(t) => match tokio::time::timeout(t, forward).await {
            Ok(r) => r,
            Err(_) => deny(
                rec,
                StatusCode::GATEWAY_TIMEOUT,
                ResponseFlag::UpstreamRequestTimeout,
                format!("request timeout {t:?}"),
                "upstream request timeout",
            ),
        },
        None => forward.await,
    };

    // 8. respond
    let mut resp = resp;
    if let Some(m) = &rule.response_headers {
        modify_headers(m, resp.headers_mut());
    }
    resp
}

fn clone_parts(p: &http::request::Parts) -> http::request::Parts {
    let mut r = Request::builder()
        .method(p.method.clone())
        .uri(p.uri.clone())
        .version(p.version)
        .body(())
        .expect("parts of a valid request");
    *r.headers_mut() = p.headers.clone();
    r.into_parts().0
}

fn shadow_host(h: &mut HeaderMap, host: &str) {
    let (name, port) = host
        .split_once(':')
        .map_or((host, None), |(n, p)| (n, Some(p)));
    let shadow = match port {
        Some(p) => format!("{name}-shadow:{p}"),
        None => format!("{name}-shadow"),
    };
    if let Ok(v) = HeaderValue::from_str(&shadow) {
        h.insert(http::header::HOST, v);
    }
}

/// Headers that describe one hop, not the request.
fn strip_hop_by_hop(h: &mut HeaderMap) {
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
    ] {
        h.remove(name);
    }
    if h.get("te").and_then(|v| v.to_str().ok()) != Some("trailers") {
        h.remove("te");
    }
}

/// A request's place in its trace.
struct TraceIds {
    trace: String,
    /// The waypoint's span, the upstream request's parent.
    span: String,
    /// The client's span, when it sent one.
    parent: Option<String>,
}

/// W3C trace context: keep the trace, start a new span for the upstream
/// hop (or a new sampled trace when there is none).
fn propagate_trace(h: &mut HeaderMap) -> TraceIds {
    let mut rng = rand::rng();
    let parent = h
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let p: Vec<&str> = v.trim().split('-').collect();
            let hex = |s: &str, n| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
            (p.len() >= 4
                && hex(p[0], 2)
                && p[0] != "ff"
                && hex(p[1], 32)
                && hex(p[2], 16)
                && hex(p[3], 2)
                && p[1] != "00000000000000000000000000000000")
                .then(|| {
                    (
                        p[1].to_ascii_lowercase(),
                        p[3].to_string(),
                        p[2].to_ascii_lowercase(),
                    )
                })
        });
    let (trace, flags, parent) = match parent {
        Some((t, f, p)) => (t, f, Some(p)),
        None => (
            format!("{:032x}", rng.random::<u128>() | 1),
            "01".into(),
            None,
        ),
    };
    let span = format!("{:016x}", rng.random::<u64>() | 1);
    if let Ok(v) = HeaderValue::from_str(&format!("00-{trace}-{span}-{flags}")) {
        h.insert("traceparent", v);
    }
    TraceIds {
        trace,
        span,
        parent,
    }
}

/// A failed attempt, for the retry decision and the log.
pub(crate) struct Failure {
    pub status: StatusCode,
    pub flags: ResponseFlag,
    pub reason: String,
    pub connect: bool,
}

/// Send to one endpoint of `backend` (one attempt).
pub(crate) async fn send_once(
    ctx: &Arc<Ctx>,
    conn: &ConnCtx,
    model: &MeshModel,
    backend: &Backend,
    req: Request<upstream::Body>,
    tried: &[SocketAddr],
) -> Result<(Response<Incoming>, crate::balancer::Picked), Failure> {
    let Some(svc) = model.service(&backend.namespace, &backend.name) else {
        return Err(Failure {
            status: StatusCode::SERVICE_UNAVAILABLE,
            flags: ResponseFlag::NoRoute,
            reason: format!("backend {}/{} not found", backend.namespace, backend.name),
            connect: true,
        });
    };
    let policy = LbPolicy::of(model, svc);
    let input = HashInput {
        headers: req.headers(),
        source_ip: conn.source_ip,
    };
    let picked = ctx
        .balancer
        .pick(
            model,
            svc,
            backend.port,
            &policy,
            &input,
            ctx.node.as_deref(),
            tried,
        )
        .map_err(|e| match e {
            PickError::NoEndpoints => Failure {
                status: StatusCode::SERVICE_UNAVAILABLE,
                flags: ResponseFlag::NoHealthyUpstream,
                reason: format!("no healthy endpoint of {}/{}", svc.namespace, svc.name),
                connect: true,
            },
            PickError::Overloaded => Failure {
                status: StatusCode::SERVICE_UNAVAILABLE,
                flags: ResponseFlag::UpstreamOverflow,
                reason: format!(
                    "circuit open: {}/{} at its request limit",
                    svc.namespace, svc.name
                ),
                connect: true,
            },
        })?;
    let w = &model.workloads[picked.workload];
    let identity = model.identity(w);
    let mut connect_headers = HeaderMap::new();
    let fwd = mesh_core::hbone::forwarded::for_client(conn.source_ip);
    if let Ok(v) = HeaderValue::from_str(&fwd) {
        connect_headers.insert("forwarded", v);
    }
    if let Some(tp) = req.headers().get("traceparent") {
        connect_headers.insert("traceparent", tp.clone());
    }
    let target = Target {
        addr: picked.addr,
        identity: &identity,
        connect_headers,
        max_requests_per_connection: policy.max_requests_per_connection,
    };
    let endpoints = model.service_endpoints(svc).count();
    match ctx.upstream.send(&target, req).await {
        Ok(resp) => {
            ctx.balancer.report(
                &picked,
                Outcome::Status(resp.status().as_u16()),
                &policy,
                endpoints,
            );
            Ok((resp, picked))
        }
        Err(e) => {
            ctx.balancer
                .report(&picked, Outcome::Failed, &policy, endpoints);
            let connect = e.is_connect_failure();
            Err(Failure {
                status: StatusCode::SERVICE_UNAVAILABLE,
                flags: if connect {
                    ResponseFlag::UpstreamConnectionFailure
                } else {
                    ResponseFlag::UpstreamConnectionTermination
                },
                reason: e.to_string(),
                connect,
            })
        }
    }
}

/// The `Location` of a redirect, as Gateway API derives it: the scheme,
/// host and path of the filter or of the request; the port of the filter,
/// else the scheme's well-known port when the filter sets a scheme, else the
/// port the request came to (the service port); and no port in `Location`
/// when it is the scheme's default (80 for http, 443 for https).
fn redirect_location(
    r: &mesh_core::model::gateway::RequestRedirect,
    request_host: &str,
    service_port: u16,
    path: &str,
    query: &str,
    matched_prefix: Option<&str>,
) -> String {
    let host = strip_port(request_host);
    let host = r.hostname.as_deref().unwrap_or(host);
    let path = match &r.path {
        Some(m) => modify_path(m, path, matched_prefix),
        None => path.to_string(),
    };
    let scheme = r.scheme.as_deref().unwrap_or("http");
    let default_port = if scheme == "https" { 443 } else { 80 };
    let port = r.port.unwrap_or(if r.scheme.is_some() {
        default_port
    } else {
        service_port
    });
    let port = if port == default_port {
        String::new()
    } else {
        format!(":{port}")
    };
    let q = if query.is_empty() {
        String::new()
    } else {
        format!("?{query}")
    };
    format!("{scheme}://{host}{port}{path}{q}")
}

/// A `Host` without its port (IPv6 literals keep their brackets).
fn strip_port(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(':') => h,
        _ => host,
    }
}

/// Pick a backend by weight.
fn weighted(backends: &[Backend]) -> Option<&Backend> {
    let total: u64 = backends.iter().map(|b| b.weight as u64).sum();
    if total == 0 {
        return None;
    }
    let mut x = rand::rng().random_range(0..total);
    backends.iter().find(|b| {
        if x < b.weight as u64 {
            true
        } else {
            x -= b.weight as u64;
            false
        }
    })
}

#[allow(clippy::too_many_arguments)]
async fn forward(
    ctx: &Arc<Ctx>,
    conn: &ConnCtx,
    model: &MeshModel,
    rule: &Rule,
    parts: http::request::Parts,
    buffered: Option<Bytes>,
    mut streaming: Option<Incoming>,
    rec: &mut Record,
) -> Response<RespBody> {
    let attempts = 1 + rule.retry.as_ref().map_or(0, |r| r.attempts);
    let mut tried: Vec<SocketAddr> = vec![];
    let mut last: Option<Response<RespBody>> = None;
    for attempt in 0..attempts {
        if attempt > 0 {
            // Retry budget: retries in flight stay under 20 % of requests
            // in flight (at least 10), so retries cannot snowball an outage.
            let active = ctx.active_requests.load(Ordering::Relaxed);
            let retries = ctx.active_retries.load(Ordering::Relaxed);
            if retries >= (active / 5).max(10) {
                rec.reason.push_str("; retry budget exhausted");
                break;
            }
            let base = rule
                .retry
                .as_ref()
                .map_or(Duration::from_millis(25), |r| r.backoff);
            let cap = base.saturating_mul(1 << (attempt - 1).min(6));
            let sleep = rand::rng().random_range(cap / 2..=cap);
            tokio::time::sleep(sleep).await;
        }
        let Some(backend) = weighted(&rule.backends) else {
            return deny(
                rec,
                StatusCode::INTERNAL_SERVER_ERROR,
                ResponseFlag::NoRoute,
                "no backend with weight".into(),
                "no backend",
            );
        };
        if let Some(p) = &backend.problem {
            // Gateway API: the share of requests an invalid backend would
            // get is answered with a 500.
            return deny(
                rec,
                StatusCode::INTERNAL_SERVER_ERROR,
                ResponseFlag::NoClusterFound,
                format!("backend {}/{}: {p}", backend.namespace, backend.name),
                "invalid backend",
            );
        }
        let body = match (&buffered, streaming.take()) {
            (Some(b), _) => full(b.clone()),
            (None, Some(s)) => s.boxed(),
            (None, None) => full(Bytes::new()),
        };
        let req = Request::from_parts(clone_parts(&parts), body);
        rec.attempts = attempt + 1;
        if attempt > 0 {
            ctx.active_retries.fetch_add(1, Ordering::Relaxed);
        }
        let once = send_once(ctx, conn, model, backend, req, &tried);
        let result = match rule.backend_timeout {
            Some(t) => tokio::time::timeout(t, once).await.unwrap_or_else(|_| {
                Err(Failure {
                    status: StatusCode::GATEWAY_TIMEOUT,
                    flags: ResponseFlag::UpstreamRequestTimeout,
                    reason: format!("backend request timeout {t:?}"),
                    connect: false,
                })
            }),
            None => once.await,
        };
        if attempt > 0 {
            ctx.active_retries.fetch_sub(1, Ordering::Relaxed);
        }
        let can_retry = buffered.is_some() && attempt + 1 < attempts;
        match result {
            Ok((resp, picked)) => {
                rec.upstream = Some(picked.addr);
                rec.destination_workload = Some(picked.workload);
                tried.push(picked.addr);
                let status = resp.status().as_u16();
                let retry = rule
                    .retry
                    .as_ref()
                    .is_some_and(|r| r.retries_status(status));
                let resp = resp.map(|b| b.boxed());
                if retry && can_retry {
                    rec.flags = ResponseFlag::UpstreamRetryLimitExceeded;
                    rec.reason = format!("retrying after {status}");
                    last = Some(resp);
                    continue;
                }
                if !retry && rec.flags == ResponseFlag::UpstreamRetryLimitExceeded {
                    // A retry succeeded.
                    rec.flags = ResponseFlag::None;
                    rec.reason = format!("succeeded on attempt {}", attempt + 1);
                }
                return resp;
            }
            Err(f) => {
                let retry = rule.retry.as_ref().is_some_and(|r| {
                    if f.flags == ResponseFlag::UpstreamRequestTimeout {
                        r.on_reset || r.on_5xx
                    } else if f.connect {
                        r.on_connect_failure
                    } else {
                        r.on_reset
                    }
                });
                // Overload and missing backends are not worth retrying.
                let retry = retry
                    && !matches!(
                        f.flags,
                        ResponseFlag::UpstreamOverflow
                            | ResponseFlag::NoRoute
                            | ResponseFlag::NoHealthyUpstream
                    );
                if retry && can_retry {
                    rec.flags = ResponseFlag::UpstreamRetryLimitExceeded;
                    rec.reason = f.reason;
                    last = None;
                    continue;
                }
                return deny(
                    rec,
                    f.status,
                    f.flags,
                    f.reason,
                    "upstream connect error or disconnect/reset before headers",
                );
            }
        }
    }
    match last {
        Some(r) => r,
        None => {
            let reason = std::mem::take(&mut rec.reason);
            deny(
                rec,
                StatusCode::SERVICE_UNAVAILABLE,
                ResponseFlag::UpstreamRetryLimitExceeded,
                reason,
                "upstream failed after retries",
            )
        }
    }
}

/// Wrap the response so metrics and the access log are written when its
/// body has been sent (or abandoned).
fn finish(
    ctx: Arc<Ctx>,
    conn: Arc<ConnCtx>,
    model: Arc<MeshModel>,
    resp: Response<RespBody>,
    rec: Record,
) -> Response<RespBody> {
    let grpc_status = resp
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let status = resp.status().as_u16();
    let (parts, body) = resp.into_parts();
    let tracked = Tracked {
        inner: body,
        bytes: 0,
        grpc_status,
        done: Some(Done {
            ctx,
            conn,
            model,
            rec,
            status,
        }),
    };
    Response::from_parts(parts, tracked.boxed())
}

struct Done {
    ctx: Arc<Ctx>,
    conn: Arc<ConnCtx>,
    model: Arc<MeshModel>,
    rec: Record,
    status: u16,
}

struct Tracked {
    inner: RespBody,
    bytes: u64,
    grpc_status: Option<String>,
    done: Option<Done>,
}

impl Tracked {
    fn record(&mut self) {
        let Some(d) = self.done.take() else { return };
        let model = &d.model;
        let rec = &d.rec;
        let src = model
            .workload_by_ip(d.conn.source_ip)
            .filter(|w| model.identity(w) == d.conn.source_identity);
        let dst = rec
            .destination_workload
            .and_then(|i| model.workloads.get(i));
        let dst_id = dst.map(|w| model.identity(w));
        let svc: Option<&Service> = model.service(&d.conn.service_namespace, &d.conn.service_name);
        let mut peers = TcpLabels::new(
            model,
            Reporter::Waypoint,
            Peer {
                workload: src,
                identity: Some(&d.conn.source_identity),
            },
            Peer {
                workload: dst,
                identity: dst_id.as_ref(),
            },
            svc,
            true,
        );
        peers.request_protocol = if rec.grpc { "grpc" } else { "http" };
        peers.response_flags = rec.flags.as_str();
        let labels = RequestLabels {
            peers,
            response_code: d.status,
            grpc_response_status: self.grpc_status.clone().unwrap_or_default(),
        };
        export_span(&d, d.status, self.bytes);
        let elapsed = rec.start.elapsed();
        let m = &d.ctx.metrics.requests;
        m.requests.get_or_create(&labels).inc();
        m.duration_ms
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64() * 1000.0);
        m.request_bytes
            .get_or_create(&labels)
            .observe(rec.request_bytes as f64);
        m.response_bytes
            .get_or_create(&labels)
            .observe(self.bytes as f64);
        tracing::info!(
            target: "access",
            method = %rec.method,
            path = %rec.path,
            host = %rec.host,
            status = d.status,
            flags = rec.flags.as_str(),
            route = %rec.route,
            src = %d.conn.source_ip,
            src.identity = %d.conn.source_identity,
            service = %format!("{}/{}", d.conn.service_namespace, d.conn.service_name),
            upstream = %rec.upstream.map(|a| a.to_string()).unwrap_or_else(|| "-".into()),
            attempts = rec.attempts,
            duration_ms = elapsed.as_millis() as u64,
            bytes_sent = self.bytes,
            trace_id = %rec.trace.as_ref().map_or("-", |t| t.trace.as_str()),
            grpc_status = %self.grpc_status.as_deref().unwrap_or("-"),
            reason = %rec.reason,
            "request"
        );
    }
}

fn export_span(d: &Done, status: u16, bytes: u64) {
    let (Some(spans), Some(t)) = (&d.ctx.spans, &d.rec.trace) else {
        return;
    };
    let rec = &d.rec;
    spans.export(crate::otlp::Span {
        trace_id: t.trace.clone(),
        span_id: t.span.clone(),
        parent_span_id: t.parent.clone(),
        name: format!(
            "{}.{}.svc.cluster.local:{}/*",
            d.conn.service_name, d.conn.service_namespace, d.conn.port
        ),
        start: rec.wall_start,
        end: std::time::SystemTime::now(),
        error: status >= 500,
        attributes: vec![
            ("http.request.method", rec.method.as_str().into()),
            ("url.path", rec.path.clone().into()),
            ("server.address", rec.host.clone().into()),
            ("http.response.status_code", status.into()),
            ("http.response.body.size", bytes.into()),
            (
                "istio.source_principal",
                d.conn.source_identity.to_string().into(),
            ),
            (
                "upstream.address",
                rec.upstream
                    .map(|a| a.to_string())
                    .unwrap_or_default()
                    .into(),
            ),
            ("route", rec.route.clone().into()),
            ("response_flags", rec.flags.as_str().into()),
        ],
    });
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.record();
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    self.bytes += d.len() as u64;
                } else if let Some(t) = f.trailers_ref() {
                    if let Some(s) = t.get("grpc-status").and_then(|v| v.to_str().ok()) {
                        self.grpc_status = Some(s.to_string());
                    }
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => self.record(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::model::gateway::RequestRedirect;

    /// Gateway API `HTTPRequestRedirectFilter.port` (conformance:
    /// MeshHTTPRouteRedirectPort, HTTPRouteRedirectPortAndScheme): without a
    /// port, the scheme's well-known port when a scheme is set, else the
    /// port the request came to; never the default port of the scheme in
    /// `Location`.
    #[test]
    fn redirect_ports_follow_gateway_api() {
        let loc = |r: RequestRedirect, service_port: u16| {
            redirect_location(&r, "echo:8080", service_port, "/p", "", None)
        };
        let r = |scheme: Option<&str>, port: Option<u16>| RequestRedirect {
            scheme: scheme.map(str::to_string),
            port,
            ..Default::default()
        };
        assert_eq!(loc(r(None, None), 8080), "http://echo:8080/p");
        assert_eq!(loc(r(None, None), 80), "http://echo/p");
        assert_eq!(loc(r(None, Some(8083)), 8080), "http://echo:8083/p");
        assert_eq!(loc(r(None, Some(80)), 8080), "http://echo/p");
        assert_eq!(loc(r(Some("https"), None), 8080), "https://echo/p");
        assert_eq!(loc(r(Some("https"), Some(443)), 8080), "https://echo/p");
        assert_eq!(
            loc(r(Some("https"), Some(8443)), 8080),
            "https://echo:8443/p"
        );
        assert_eq!(loc(r(Some("http"), None), 8080), "http://echo/p");
        let host = RequestRedirect {
            hostname: Some("example.org".into()),
            ..Default::default()
        };
        assert_eq!(
            redirect_location(&host, "[fd00::1]:8080", 8080, "/p", "a=b", None),
            "http://example.org:8080/p?a=b"
        );
    }
}
