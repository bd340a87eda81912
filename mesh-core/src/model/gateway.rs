//! Waypoint and L7 traffic objects as they appear in a mesh file (and, later,
//! in the Kubernetes API), with the field names users already write:
//!
//! - Gateway API `Gateway` of class `istio-waypoint`: a waypoint. Its pods
//!   are the workloads labelled `gateway.networking.k8s.io/gateway-name`.
//! - Gateway API `HTTPRoute` attached to a `Service` (the GAMMA pattern
//!   Istio ambient uses): matches, filters, weighted backends, timeouts and
//!   retries. Two Sluice extensions sit on a rule, because neither Gateway
//!   API nor an `HTTPRoute` can express them: `fault` (Istio
//!   VirtualService's fault injection) and `rateLimit` (a local token
//!   bucket).
//! - Istio `DestinationRule`: load balancing, connection limits and outlier
//!   detection for a service.
//! - Gateway API `ReferenceGrant` (`v1beta1`): lets routes of another
//!   namespace send traffic to this namespace's Services.
//!
//! Unknown fields are rejected, as everywhere in the mesh file: a misspelt
//! match that silently matched everything would be worse than an error.

use serde::{Deserialize, Serialize};

use super::policy::ObjectMeta;

/// The Gateway API class of waypoints (same as Istio's).
pub const WAYPOINT_CLASS: &str = "istio-waypoint";
/// Label on a waypoint's pods naming their Gateway.
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// Label on a waypoint Gateway saying which traffic it handles
/// (`service` by default, `workload`, `all` or `none`), as in Istio.
pub const WAYPOINT_FOR_LABEL: &str = "istio.io/waypoint-for";

/// Gateway API `Gateway`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Gateway {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub metadata: ObjectMeta,
    pub spec: GatewaySpec,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GatewaySpec {
    pub gateway_class_name: String,
    #[serde(default)]
    pub listeners: Vec<GatewayListener>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GatewayListener {
    pub name: String,
    pub port: u16,
    pub protocol: String,
}

/// Which traffic a waypoint takes (Istio's `istio.io/waypoint-for`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaypointFor {
    Service,
    Workload,
    All,
    None,
}

impl Gateway {
    /// Whether this Gateway is a waypoint.
    pub fn is_waypoint(&self) -> bool {
        self.spec.gateway_class_name == WAYPOINT_CLASS
    }

    /// The traffic this waypoint takes; Istio's default is service traffic.
    pub fn waypoint_for(&self) -> WaypointFor {
        match self
            .metadata
            .labels
            .get(WAYPOINT_FOR_LABEL)
            .map(String::as_str)
        {
            Some("workload") => WaypointFor::Workload,
            Some("all") => WaypointFor::All,
            Some("none") => WaypointFor::None,
            _ => WaypointFor::Service,
        }
    }
}

/// Gateway API `HTTPRoute`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRoute {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub metadata: ObjectMeta,
    pub spec: HttpRouteSpec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteSpec {
    pub parent_refs: Vec<ParentReference>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<HttpRouteRule>,
}

/// What a route attaches to: a `Service` (mesh routing) in Sluice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ParentReference {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Restricts the route to one service port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

impl ParentReference {
    /// Mesh routes attach to services (`group: ""`, `kind: Service`).
    pub fn is_service(&self) -> bool {
        self.group.as_deref().unwrap_or("").is_empty()
            && self.kind.as_deref().unwrap_or("Service") == "Service"
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Empty: every request (a `PathPrefix /` match).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<HttpRouteMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<HttpRouteFilter>,
    /// Empty: the parent service itself.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backend_refs: Vec<HttpBackendRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<HttpRouteTimeouts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<HttpRouteRetry>,
    /// Sluice extension: fault injection (Istio VirtualService semantics).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<HttpFault>,
    /// Sluice extension: local rate limiting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<HttpPathMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HttpHeaderMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query_params: Vec<HttpHeaderMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum PathMatchType {
    Exact,
    #[default]
    PathPrefix,
    RegularExpression,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpPathMatch {
    #[serde(default, rename = "type")]
    pub kind: PathMatchType,
    #[serde(default = "root_path")]
    pub value: String,
}

fn root_path() -> String {
    "/".into()
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ValueMatchType {
    #[default]
    Exact,
    RegularExpression,
}

/// A header or query-parameter match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpHeaderMatch {
    #[serde(default, rename = "type")]
    pub kind: ValueMatchType,
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HttpRouteFilterType {
    RequestHeaderModifier,
    ResponseHeaderModifier,
    URLRewrite,
    RequestRedirect,
    RequestMirror,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteFilter {
    #[serde(rename = "type")]
    pub kind: HttpRouteFilterType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_header_modifier: Option<HeaderModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_header_modifier: Option<HeaderModifier>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        rename = "urlRewrite"
    )]
    pub url_rewrite: Option<UrlRewrite>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_redirect: Option<RequestRedirect>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_mirror: Option<RequestMirror>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderModifier {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub set: Vec<HttpHeader>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<HttpHeader>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpHeader {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PathModifierType {
    ReplaceFullPath,
    ReplacePrefixMatch,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PathModifier {
    #[serde(rename = "type")]
    pub kind: PathModifierType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace_full_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace_prefix_match: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UrlRewrite {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathModifier>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RequestRedirect {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// 302 (the default), 301, or the extended 303, 307 and 308.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_code: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RequestMirror {
    pub backend_ref: BackendObjectReference,
    /// Share of requests mirrored (default all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u32>,
}

/// A service (and port) a rule sends to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BackendObjectReference {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpBackendRef {
    #[serde(flatten)]
    pub backend: BackendObjectReference,
    /// Relative weight (default 1); 0 sends nothing there.
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

/// Gateway API `ReferenceGrant`: objects of the kinds and namespaces in
/// `from` may refer to objects of the kinds (and names) in `to` in the
/// grant's own namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ReferenceGrant {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub metadata: ObjectMeta,
    pub spec: ReferenceGrantSpec,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReferenceGrantSpec {
    pub from: Vec<ReferenceGrantFrom>,
    pub to: Vec<ReferenceGrantTo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReferenceGrantFrom {
    pub group: String,
    pub kind: String,
    pub namespace: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReferenceGrantTo {
    pub group: String,
    pub kind: String,
    /// Absent: every object of the kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ReferenceGrant {
    /// Whether this grant lets an HTTPRoute in `route_ns` refer to Service
    /// `name` in the grant's namespace.
    pub fn permits_route_to_service(&self, route_ns: &str, name: &str) -> bool {
        self.spec.from.iter().any(|f| {
            f.group == "gateway.networking.k8s.io"
                && f.kind == "HTTPRoute"
                && f.namespace == route_ns
        }) && self.spec.to.iter().any(|t| {
            (t.group.is_empty() || t.group == "core")
                && t.kind == "Service"
                && t.name.as_deref().is_none_or(|n| n == name)
        })
    }
}

/// Why a route's backend cannot be used: each answers 500 for the share of
/// requests it would get, and sets the route's `ResolvedRefs` condition to
/// False with the reason Gateway API names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendProblem {
    /// Not a core `Service` (`InvalidKind`).
    InvalidKind(String),
    /// No such Service or port (`BackendNotFound`).
    NotFound(String),
    /// In another namespace, and no ReferenceGrant there allows it
    /// (`RefNotPermitted`).
    NotPermitted(String),
}

impl BackendProblem {
    /// The Gateway API condition reason.
    pub fn reason(&self) -> &'static str {
        match self {
            BackendProblem::InvalidKind(_) => "InvalidKind",
            BackendProblem::NotFound(_) => "BackendNotFound",
            BackendProblem::NotPermitted(_) => "RefNotPermitted",
        }
    }

    /// What is wrong, in words.
    pub fn message(&self) -> &str {
        match self {
            BackendProblem::InvalidKind(m)
            | BackendProblem::NotFound(m)
            | BackendProblem::NotPermitted(m) => m,
        }
    }
}

impl std::fmt::Display for BackendProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message(), self.reason())
    }
}

/// Gateway API durations (`"10s"`, `"500ms"`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteTimeouts {
    /// The whole request, retries included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    /// One attempt against a backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_request: Option<String>,
}

/// Gateway API `HTTPRouteRetry` plus `retryOn`, Istio's retry conditions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteRetry {
    /// Retries after the first attempt (default 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// Base of the exponential backoff (default 25ms), jittered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<String>,
    /// Status codes retried under `retriable-status-codes`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub codes: Vec<u16>,
    /// Conditions: `5xx`, `gateway-error`, `reset`, `connect-failure`,
    /// `retriable-status-codes`. Default: `connect-failure`, `reset` and
    /// `retriable-status-codes` when codes are given, else `5xx`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retry_on: Vec<String>,
}

/// Fault injection, as Istio's `HTTPFaultInjection`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpFault {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultDelay {
    pub fixed_delay: String,
    /// Percentage of requests delayed (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percentage: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultAbort {
    pub http_status: u16,
    /// Percentage of requests aborted (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percentage: Option<f64>,
}

/// A local token bucket: `requests` per `interval`, with `burst` extra.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RateLimit {
    pub requests: u32,
    /// Default `1s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    /// Bucket size (default `requests`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// One bucket per source identity instead of one for the route.
    #[serde(default)]
    pub per_source: bool,
}

/// Istio `networking.istio.io/v1` DestinationRule (the traffic policy
/// parts a waypoint applies).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DestinationRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub metadata: ObjectMeta,
    pub spec: DestinationRuleSpec,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DestinationRuleSpec {
    /// The service: `name`, `name.namespace` or the full
    /// `name.namespace.svc.cluster.local`.
    pub host: String,
    #[serde(default)]
    pub traffic_policy: TrafficPolicy,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TrafficPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancerSettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPoolSettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SimpleLb {
    #[default]
    RoundRobin,
    LeastRequest,
    Random,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LoadBalancerSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub simple: Option<SimpleLb>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistent_hash: Option<ConsistentHash>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality_lb_setting: Option<LocalityLbSetting>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConsistentHash {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_header_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_cookie: Option<HttpCookie>,
    #[serde(default)]
    pub use_source_ip: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpCookie {
    pub name: String,
}

/// Locality-aware balancing: prefer the client's zone, then region, then
/// anywhere, moving on only when the nearer endpoints are unhealthy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalityLbSetting {
    #[serde(default = "yes")]
    pub enabled: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionPoolSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpPoolSettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpPoolSettings>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TcpPoolSettings {
    /// Upstream connections to the service at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpPoolSettings {
    /// Requests waiting for a connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http1_max_pending_requests: Option<u32>,
    /// Requests in flight to the service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http2_max_requests: Option<u32>,
    /// Requests one upstream connection carries before it is closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests_per_connection: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OutlierDetection {
    /// 5xx answers in a row that eject an endpoint (default 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive5xx_errors: Option<u32>,
    /// 502/503/504 and connection failures in a row (default off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_gateway_errors: Option<u32>,
    /// Default `30s`; multiplied by the number of ejections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ejection_time: Option<String>,
    /// Upper bound of ejected endpoints, in percent (default 10, at least one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_percent: Option<u32>,
}

/// Parse a Gateway API / Istio duration (`"250ms"`, `"10s"`, `"1m"`).
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("{s:?} is not a duration: {e}"))
}

use super::FieldError;

fn at(field: impl Into<String>, reason: impl Into<String>) -> FieldError {
    FieldError::new(field, reason)
}

pub(crate) fn check_api(
    api_version: &Option<String>,
    kind: &Option<String>,
    groups: &[&str],
    want: &str,
) -> Result<(), FieldError> {
    if let Some(v) = api_version {
        if !groups.iter().any(|g| v.starts_with(&format!("{g}/"))) {
            return Err(at(
                "apiVersion",
                format!("expected {}/…, got {v:?}", groups[0]),
            ));
        }
    }
    match kind {
        Some(k) if k != want => Err(at("kind", format!("expected {want}, got {k:?}"))),
        _ => Ok(()),
    }
}

fn check_regex(field: String, re: &str) -> Result<(), FieldError> {
    regex::Regex::new(re)
        .map(|_| ())
        .map_err(|e| at(field, format!("bad regular expression {re:?}: {e}")))
}

fn check_percent(field: String, p: Option<f64>) -> Result<(), FieldError> {
    match p {
        Some(p) if !(0.0..=100.0).contains(&p) || p.is_nan() => {
            Err(at(field, format!("{p} is not a percentage (0 to 100)")))
        }
        _ => Ok(()),
    }
}

fn check_duration(field: String, d: &Option<String>) -> Result<(), FieldError> {
    match d {
        Some(d) => parse_duration(d).map(|_| ()).map_err(|r| at(field, r)),
        None => Ok(()),
    }
}

fn check_path_modifier(field: &str, m: &PathModifier) -> Result<(), FieldError> {
    let value = match m.kind {
        PathModifierType::ReplaceFullPath => &m.replace_full_path,
        PathModifierType::ReplacePrefixMatch => &m.replace_prefix_match,
    };
    match value {
        Some(v) if v.starts_with('/') => Ok(()),
        // Gateway API: an empty prefix replacement is valid (as `/`).
        Some(v) if v.is_empty() && m.kind == PathModifierType::ReplacePrefixMatch => Ok(()),
        Some(v) => Err(at(field, format!("path {v:?} must start with '/'"))),
        None => Err(at(
            field,
            format!("type {:?} needs its matching replace field", m.kind),
        )),
    }
}

/// Check one HTTPRoute rule (everything but references, which need the model).
pub(crate) fn check_rule(rule: &HttpRouteRule) -> Result<(), FieldError> {
    for (i, m) in rule.matches.iter().enumerate() {
        if let Some(p) = &m.path {
            let f = format!("matches[{i}].path.value");
            match p.kind {
                PathMatchType::RegularExpression => check_regex(f, &p.value)?,
                _ if !p.value.starts_with('/') => {
                    return Err(at(f, format!("path {:?} must start with '/'", p.value)))
                }
                _ => {}
            }
        }
        for (kind, list) in [("headers", &m.headers), ("queryParams", &m.query_params)] {
            for (j, h) in list.iter().enumerate() {
                if h.name.is_empty() {
                    return Err(at(format!("matches[{i}].{kind}[{j}].name"), "empty name"));
                }
                if kind == "headers" && http::HeaderName::from_bytes(h.name.as_bytes()).is_err() {
                    return Err(at(
                        format!("matches[{i}].{kind}[{j}].name"),
                        format!("{:?} is not a valid header name", h.name),
                    ));
                }
                if h.kind == ValueMatchType::RegularExpression {
                    check_regex(format!("matches[{i}].{kind}[{j}].value"), &h.value)?;
                }
            }
        }
        if let Some(method) = &m.method {
            if http::Method::from_bytes(method.as_bytes()).is_err() || method.is_empty() {
                return Err(at(
                    format!("matches[{i}].method"),
                    format!("{method:?} is not an HTTP method"),
                ));
            }
        }
    }
    for (i, f) in rule.filters.iter().enumerate() {
        let field = |name: &str| format!("filters[{i}].{name}");
        let (present, name) = match f.kind {
            HttpRouteFilterType::RequestHeaderModifier => {
                (f.request_header_modifier.is_some(), "requestHeaderModifier")
            }
            HttpRouteFilterType::ResponseHeaderModifier => (
                f.response_header_modifier.is_some(),
                "responseHeaderModifier",
            ),
            HttpRouteFilterType::URLRewrite => (f.url_rewrite.is_some(), "urlRewrite"),
            HttpRouteFilterType::RequestRedirect => {
                (f.request_redirect.is_some(), "requestRedirect")
            }
            HttpRouteFilterType::RequestMirror => (f.request_mirror.is_some(), "requestMirror"),
        };
        let set = [
            f.request_header_modifier.is_some(),
            f.response_header_modifier.is_some(),
            f.url_rewrite.is_some(),
            f.request_redirect.is_some(),
            f.request_mirror.is_some(),
        ]
        .iter()
        .filter(|&&b| b)
        .count();
        if !present || set != 1 {
            return Err(at(
                field("type"),
                format!("type {:?} needs exactly its own field {name:?}", f.kind),
            ));
        }
        for m in [&f.request_header_modifier, &f.response_header_modifier]
            .into_iter()
            .flatten()
        {
            for h in m.set.iter().chain(&m.add) {
                if http::HeaderName::from_bytes(h.name.as_bytes()).is_err()
                    || http::HeaderValue::from_str(&h.value).is_err()
                {
                    return Err(at(
                        field(name),
                        format!("{:?}: {:?} is not a valid header", h.name, h.value),
                    ));
                }
            }
        }
        if let Some(r) = &f.url_rewrite {
            if let Some(p) = &r.path {
                check_path_modifier(&field("urlRewrite.path"), p)?;
            }
        }
        if let Some(r) = &f.request_redirect {
            if let Some(p) = &r.path {
                check_path_modifier(&field("requestRedirect.path"), p)?;
            }
            if let Some(code) = r.status_code {
                if !matches!(code, 301 | 302 | 303 | 307 | 308) {
                    return Err(at(
                        field("requestRedirect.statusCode"),
                        format!("{code}: Gateway API allows 301, 302, 303, 307 or 308"),
                    ));
                }
            }
            if let Some(s) = &r.scheme {
                if s != "http" && s != "https" {
                    return Err(at(
                        field("requestRedirect.scheme"),
                        format!("{s:?}: expected http or https"),
                    ));
                }
            }
        }
        if let Some(m) = &f.request_mirror {
            if m.percent.is_some_and(|p| p > 100) {
                return Err(at(field("requestMirror.percent"), "at most 100"));
            }
        }
    }
    if rule
        .filters
        .iter()
        .any(|f| f.kind == HttpRouteFilterType::RequestRedirect)
        && !rule.backend_refs.is_empty()
    {
        return Err(at(
            "backendRefs",
            "a rule with a RequestRedirect filter answers itself: it cannot have backends",
        ));
    }
    if !rule.backend_refs.is_empty() && rule.backend_refs.iter().all(|b| b.weight == 0) {
        return Err(at(
            "backendRefs",
            "all weights are 0: nothing would be served",
        ));
    }
    if let Some(t) = &rule.timeouts {
        check_duration("timeouts.request".into(), &t.request)?;
        check_duration("timeouts.backendRequest".into(), &t.backend_request)?;
    }
    if let Some(r) = &rule.retry {
        check_duration("retry.backoff".into(), &r.backoff)?;
        for (i, c) in r.retry_on.iter().enumerate() {
            if !matches!(
                c.as_str(),
                "5xx" | "gateway-error" | "reset" | "connect-failure" | "retriable-status-codes"
            ) {
                return Err(at(
                    format!("retry.retryOn[{i}]"),
                    format!("unknown condition {c:?} (5xx, gateway-error, reset, connect-failure, retriable-status-codes)"),
                ));
            }
        }
        for (i, c) in r.codes.iter().enumerate() {
            if !(400..=599).contains(c) {
                return Err(at(
                    format!("retry.codes[{i}]"),
                    format!("{c} is not an error status"),
                ));
            }
        }
        if r.attempts.is_some_and(|a| a > 10) {
            return Err(at("retry.attempts", "at most 10 retries"));
        }
    }
    if let Some(f) = &rule.fault {
        if let Some(d) = &f.delay {
            check_duration(
                "fault.delay.fixedDelay".into(),
                &Some(d.fixed_delay.clone()),
            )?;
            check_percent("fault.delay.percentage".into(), d.percentage)?;
        }
        if let Some(a) = &f.abort {
            if !(200..=599).contains(&a.http_status) {
                return Err(at(
                    "fault.abort.httpStatus",
                    format!("{} is not an HTTP status", a.http_status),
                ));
            }
            check_percent("fault.abort.percentage".into(), a.percentage)?;
        }
    }
    if let Some(r) = &rule.rate_limit {
        if r.requests == 0 {
            return Err(at("rateLimit.requests", "must be at least 1"));
        }
        check_duration("rateLimit.interval".into(), &r.interval)?;
        if r.interval
            .as_deref()
            .and_then(|i| parse_duration(i).ok())
            .is_some_and(|d| d.is_zero())
        {
            return Err(at("rateLimit.interval", "must be longer than 0"));
        }
    }
    Ok(())
}

/// Check a DestinationRule's traffic policy (the host is resolved by the caller).
pub(crate) fn check_traffic_policy(t: &TrafficPolicy) -> Result<(), FieldError> {
    if let Some(lb) = &t.load_balancer {
        if lb.simple.is_some() && lb.consistent_hash.is_some() {
            return Err(at(
                "trafficPolicy.loadBalancer",
                "simple and consistentHash are mutually exclusive",
            ));
        }
        if let Some(h) = &lb.consistent_hash {
            let keys = [
                h.http_header_name.is_some(),
                h.http_cookie.is_some(),
                h.use_source_ip,
            ];
            if keys.iter().filter(|&&k| k).count() != 1 {
                return Err(at(
                    "trafficPolicy.loadBalancer.consistentHash",
                    "set exactly one of httpHeaderName, httpCookie, useSourceIp",
                ));
            }
        }
    }
    if let Some(o) = &t.outlier_detection {
        check_duration(
            "trafficPolicy.outlierDetection.baseEjectionTime".into(),
            &o.base_ejection_time,
        )?;
        if o.max_ejection_percent.is_some_and(|p| p > 100) {
            return Err(at(
                "trafficPolicy.outlierDetection.maxEjectionPercent",
                "at most 100",
            ));
        }
    }
    Ok(())
}

/// Istio MeshConfig `extensionProviders` entry: an external authorizer that
/// `CUSTOM` AuthorizationPolicies name. Exactly one of the two kinds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ExtensionProviderConfig {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envoy_ext_authz_http: Option<ExtAuthzHttp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envoy_ext_authz_grpc: Option<ExtAuthzGrpc>,
}

/// Envoy-style HTTP authorization: the request's method, path and chosen
/// headers are sent to the service; 2xx allows, anything else denies.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ExtAuthzHttp {
    /// A mesh service: `name.namespace[.svc.cluster.local]`.
    pub service: String,
    pub port: u16,
    /// Default `1s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// Let requests through when the authorizer cannot be reached
    /// (default false: fail closed).
    #[serde(default)]
    pub fail_open: bool,
    /// Request headers sent with the check (always: `host`, `:path` and
    /// `:method` as the check request's own).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub include_request_headers_in_check: Vec<String>,
    /// Headers of an allowing answer copied onto the upstream request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers_to_upstream_on_allow: Vec<String>,
    /// Headers of a denying answer copied onto the response.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers_to_downstream_on_deny: Vec<String>,
}

/// Envoy `envoy.service.auth.v3.Authorization/Check` over gRPC.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ExtAuthzGrpc {
    pub service: String,
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    #[serde(default)]
    pub fail_open: bool,
}

impl ExtensionProviderConfig {
    /// The service, port and timeout of whichever kind this is.
    pub fn endpoint(&self) -> Option<(&str, u16, Option<&str>)> {
        match (&self.envoy_ext_authz_http, &self.envoy_ext_authz_grpc) {
            (Some(h), None) => Some((&h.service, h.port, h.timeout.as_deref())),
            (None, Some(g)) => Some((&g.service, g.port, g.timeout.as_deref())),
            _ => None,
        }
    }
}
