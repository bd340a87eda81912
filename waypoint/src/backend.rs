//! One call to a backend service: pick an endpoint (load balancing,
//! circuit breaking, outlier ejection), send the request over HBONE, report
//! the outcome back to the balancer. Both the request path's `forward` and
//! `mirror` phases and the external authorizer ([`crate::extauthz`]) call
//! backends through the [`Backends`] trait, so they sit above this module
//! and not beside each other; the phases' unit tests put a fake behind it.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use mesh_core::model::MeshModel;

use crate::balancer::{Balancer, HashInput, LbPolicy, Outcome, PickError};
use crate::routes::Backend;
use crate::upstream::{self, Target, Upstream};

/// Bodies of backend responses (boxed, so a fake backend can make them).
pub type RespBody = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

/// What went wrong with one attempt, before any response arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The backend service does not exist (any more).
    NoService,
    /// The service has no healthy endpoint.
    NoHealthyEndpoint,
    /// The service is at its request limit (circuit open).
    Overloaded,
    /// The connection to the endpoint failed: nothing reached it.
    Connect,
    /// The connection ended before a response: the request may have been
    /// processed.
    Reset,
    /// No response within the per-try timeout.
    Timeout,
}

/// A failed attempt, for the retry decision and the access log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Failure {
    pub kind: FailureKind,
    pub reason: String,
}

impl Failure {
    /// The status a client gets when this is the last word.
    pub fn status(&self) -> StatusCode {
        match self.kind {
            FailureKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// Whether a different attempt could do better: not when the service
    /// is missing, empty or overloaded (retries would only add load).
    pub fn may_change(&self) -> bool {
        !matches!(
            self.kind,
            FailureKind::NoService | FailureKind::NoHealthyEndpoint | FailureKind::Overloaded
        )
    }
}

/// A response and the endpoint that gave it.
pub struct Sent {
    pub response: Response<RespBody>,
    pub endpoint: SocketAddr,
    /// Index of the endpoint's workload in the model.
    pub workload: usize,
}

/// Where the request path and the external authorizer send requests.
pub trait Backends: Send + Sync + 'static {
    /// One attempt: a request for `backend`'s port, from a client at
    /// `source_ip`, to one of its endpoints not in `tried` (when another
    /// is available).
    fn send(
        &self,
        model: &MeshModel,
        source_ip: IpAddr,
        backend: &Backend,
        req: Request<upstream::Body>,
        tried: &[SocketAddr],
    ) -> impl Future<Output = Result<Sent, Failure>> + Send;
}

/// The real backends: the mesh's endpoints over HBONE.
pub struct MeshBackends {
    pub upstream: Upstream,
    /// Endpoint choice and health (shared with the admin endpoint).
    pub balancer: Arc<Balancer>,
    /// The node the waypoint runs on, for locality-aware picks.
    pub node: Option<String>,
}

impl Backends for MeshBackends {
    async fn send(
        &self,
        model: &MeshModel,
        source_ip: IpAddr,
        backend: &Backend,
        req: Request<upstream::Body>,
        tried: &[SocketAddr],
    ) -> Result<Sent, Failure> {
        let fail = |kind, reason| Failure { kind, reason };
        let Some(svc) = model.service(&backend.namespace, &backend.name) else {
            return Err(fail(
                FailureKind::NoService,
                format!("backend {}/{} not found", backend.namespace, backend.name),
            ));
        };
        let policy = LbPolicy::of(model, svc);
        let input = HashInput {
            headers: req.headers(),
            source_ip,
        };
        let picked = self
            .balancer
            .pick(
                model,
                svc,
                backend.port,
                &policy,
                &input,
                self.node.as_deref(),
                tried,
            )
            .map_err(|e| match e {
                PickError::NoEndpoints => fail(
                    FailureKind::NoHealthyEndpoint,
                    format!("no healthy endpoint of {}/{}", svc.namespace, svc.name),
                ),
                PickError::Overloaded => fail(
                    FailureKind::Overloaded,
                    format!(
                        "circuit open: {}/{} at its request limit",
                        svc.namespace, svc.name
                    ),
                ),
            })?;
        let identity = model.identity(&model.workloads[picked.workload]);
        let mut connect_headers = HeaderMap::new();
        let fwd = mesh_core::hbone::forwarded::for_client(source_ip);
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
        match self.upstream.send(&target, req).await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                self.balancer
                    .report(&picked, Outcome::Status(status), &policy, endpoints);
                Ok(Sent {
                    response: resp.map(|b| b.boxed()),
                    endpoint: picked.addr,
                    workload: picked.workload,
                })
            }
            Err(e) => {
                self.balancer
                    .report(&picked, Outcome::Failed, &policy, endpoints);
                let kind = if e.is_connect_failure() {
                    FailureKind::Connect
                } else {
                    FailureKind::Reset
                };
                Err(fail(kind, e.to_string()))
            }
        }
    }
}
