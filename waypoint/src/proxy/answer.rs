//! What a phase hands back when the request goes no further: a local
//! answer ([`Local`]) with the Envoy response flag ([`ResponseFlag`]) and
//! the reason the access log shows; and the request's [`Record`], which
//! the phases fill in for the log, the metrics and the trace.

use std::net::SocketAddr;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode};
use http_body_util::{BodyExt, Full};

use crate::backend::{Failure, FailureKind, RespBody};

/// A body the waypoint writes itself.
pub fn full(b: impl Into<Bytes>) -> RespBody {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

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

impl From<FailureKind> for ResponseFlag {
    fn from(k: FailureKind) -> Self {
        match k {
            FailureKind::NoService => ResponseFlag::NoRoute,
            FailureKind::NoHealthyEndpoint => ResponseFlag::NoHealthyUpstream,
            FailureKind::Overloaded => ResponseFlag::UpstreamOverflow,
            FailureKind::Connect => ResponseFlag::UpstreamConnectionFailure,
            FailureKind::Reset => ResponseFlag::UpstreamConnectionTermination,
            FailureKind::Timeout => ResponseFlag::UpstreamRequestTimeout,
        }
    }
}

/// A response the waypoint makes itself instead of forwarding.
#[derive(Debug)]
pub struct Local {
    pub status: StatusCode,
    pub flag: ResponseFlag,
    /// For the access log.
    pub reason: String,
    /// Boxed: a local answer is the `Err` of every phase, kept small.
    pub headers: Box<HeaderMap>,
    pub body: Bytes,
}

impl Local {
    /// A plain-text answer (Envoy's bodies, e.g. `no route`).
    pub fn text(
        status: StatusCode,
        flag: ResponseFlag,
        reason: impl Into<String>,
        body: &str,
    ) -> Self {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain"),
        );
        Local {
            status,
            flag,
            reason: reason.into(),
            headers: Box::new(headers),
            body: Bytes::from(format!("{body}\n")),
        }
    }

    /// The answer for a backend failure that ends the request.
    pub fn upstream(f: Failure) -> Self {
        Local::text(
            f.status(),
            f.kind.into(),
            f.reason,
            "upstream connect error or disconnect/reset before headers",
        )
    }

    /// Record its flag (an answer with nothing to report keeps what an
    /// earlier phase reported, e.g. an injected delay) and reason; the
    /// response to send.
    pub fn answer(self, rec: &mut Record) -> Response<RespBody> {
        if self.flag != ResponseFlag::None {
            rec.flags = self.flag;
        }
        rec.reason = self.reason;
        let mut r = Response::new(full(self.body));
        *r.status_mut() = self.status;
        *r.headers_mut() = *self.headers;
        r
    }
}

/// A request's place in its trace.
#[derive(Debug, Clone)]
pub struct TraceIds {
    pub trace: String,
    /// The waypoint's span, the upstream request's parent.
    pub span: String,
    /// The client's span, when it sent one.
    pub parent: Option<String>,
}

/// Everything the access log, metrics and trace record about one request.
#[derive(Debug)]
pub struct Record {
    pub start: Instant,
    pub wall_start: SystemTime,
    pub method: Method,
    pub path: String,
    pub host: String,
    /// The rule's id, `-` before routing.
    pub route: String,
    pub flags: ResponseFlag,
    pub reason: String,
    pub upstream: Option<SocketAddr>,
    pub destination_workload: Option<usize>,
    pub attempts: u32,
    pub trace: Option<TraceIds>,
    pub request_bytes: u64,
    pub grpc: bool,
}

impl Record {
    /// The record of a request that has just arrived.
    pub fn new<B: hyper::body::Body>(req: &http::Request<B>) -> Self {
        Record {
            start: Instant::now(),
            wall_start: SystemTime::now(),
            method: req.method().clone(),
            path: req.uri().path().to_string(),
            host: host_of(req),
            route: "-".into(),
            flags: ResponseFlag::None,
            reason: String::new(),
            upstream: None,
            destination_workload: None,
            attempts: 0,
            trace: None,
            request_bytes: req.body().size_hint().exact().unwrap_or(0),
            grpc: req
                .headers()
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("application/grpc")),
        }
    }
}

/// The authority a request names (URI, else `Host`).
fn host_of<B>(req: &http::Request<B>) -> String {
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
