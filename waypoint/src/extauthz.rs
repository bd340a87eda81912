//! External authorization for `CUSTOM` AuthorizationPolicies: the
//! extension point organisations plug their own decision service into.
//! Two protocols, as Istio's `extensionProviders` define them:
//!
//! - `envoyExtAuthzHttp`: the request's method and path (under
//!   `pathPrefix`) and the chosen headers are sent to the service; a 2xx
//!   answer allows (copying `headersToUpstreamOnAllow` onto the request),
//!   any other answer is returned to the client as the denial.
//! - `envoyExtAuthzGrpc`: Envoy's `envoy.service.auth.v3.Authorization/Check`
//!   (the messages are in [`proto`]); gRPC status OK allows.
//!
//! The authorizer is a mesh service reached over HBONE like any backend.
//! An authorizer that cannot be reached, times out or answers garbage
//! denies (403), unless the provider says `failOpen`.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use mesh_core::model::gateway::{parse_duration, ExtensionProviderConfig};
use mesh_core::model::MeshModel;

use mesh_core::identity::SpiffeId;

use crate::backend::Backends;
use crate::routes::Backend;

/// Envoy's ext_authz v3 messages (the fields Sluice sends and reads).
pub mod proto {
    use std::collections::HashMap;

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct CheckRequest {
        #[prost(message, optional, tag = "1")]
        pub attributes: Option<AttributeContext>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct AttributeContext {
        #[prost(message, optional, tag = "1")]
        pub source: Option<Peer>,
        #[prost(message, optional, tag = "2")]
        pub destination: Option<Peer>,
        #[prost(message, optional, tag = "4")]
        pub request: Option<AttributeRequest>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Peer {
        #[prost(message, optional, tag = "1")]
        pub address: Option<Address>,
        #[prost(string, tag = "2")]
        pub service: String,
        #[prost(string, tag = "4")]
        pub principal: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Address {
        #[prost(message, optional, tag = "1")]
        pub socket_address: Option<SocketAddress>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SocketAddress {
        #[prost(string, tag = "2")]
        pub address: String,
        #[prost(uint32, tag = "3")]
        pub port_value: u32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct AttributeRequest {
        #[prost(message, optional, tag = "2")]
        pub http: Option<HttpRequest>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct HttpRequest {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(string, tag = "2")]
        pub method: String,
        #[prost(map = "string, string", tag = "3")]
        pub headers: HashMap<String, String>,
        #[prost(string, tag = "4")]
        pub path: String,
        #[prost(string, tag = "5")]
        pub host: String,
        #[prost(string, tag = "6")]
        pub scheme: String,
        #[prost(string, tag = "10")]
        pub protocol: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct CheckResponse {
        #[prost(message, optional, tag = "1")]
        pub status: Option<RpcStatus>,
        #[prost(message, optional, tag = "2")]
        pub denied_response: Option<DeniedHttpResponse>,
        #[prost(message, optional, tag = "3")]
        pub ok_response: Option<OkHttpResponse>,
    }

    /// `google.rpc.Status`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RpcStatus {
        #[prost(int32, tag = "1")]
        pub code: i32,
        #[prost(string, tag = "2")]
        pub message: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct DeniedHttpResponse {
        #[prost(message, optional, tag = "1")]
        pub status: Option<HttpStatus>,
        #[prost(message, repeated, tag = "2")]
        pub headers: Vec<HeaderValueOption>,
        #[prost(string, tag = "3")]
        pub body: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct HttpStatus {
        #[prost(int32, tag = "1")]
        pub code: i32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct OkHttpResponse {
        #[prost(message, repeated, tag = "2")]
        pub headers: Vec<HeaderValueOption>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct HeaderValueOption {
        #[prost(message, optional, tag = "1")]
        pub header: Option<HeaderValue>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct HeaderValue {
        #[prost(string, tag = "1")]
        pub key: String,
        #[prost(string, tag = "2")]
        pub value: String,
    }

    /// The gRPC method path.
    pub const CHECK_PATH: &str = "/envoy.service.auth.v3.Authorization/Check";
}

/// The authorizer's verdict.
pub enum Verdict {
    /// Go on, adding these headers to the upstream request.
    Allow(HeaderMap),
    /// Answer the client with this.
    Deny {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
        reason: String,
    },
}

fn deny(reason: String) -> Verdict {
    Verdict::Deny {
        status: StatusCode::FORBIDDEN,
        headers: HeaderMap::new(),
        body: Bytes::from_static(b"RBAC: access denied\n"),
        reason,
    }
}

/// What the authorizer is told about the request.
pub struct CheckInput<'a> {
    pub method: &'a http::Method,
    pub path_and_query: &'a str,
    pub host: &'a str,
    pub headers: &'a HeaderMap,
    pub protocol: Version,
    /// The caller, as mTLS proved it.
    pub source_identity: &'a SpiffeId,
    pub source_ip: IpAddr,
    /// The original destination (service address and port).
    pub destination: SocketAddr,
    /// The destination service's host name (`name.namespace.svc.cluster.local`).
    pub destination_service: &'a str,
}

/// Who decides a `CUSTOM` policy's requests: the request path's
/// `authorize` phase asks through this, so its tests can answer for the
/// provider.
pub trait Authorizer: Sync {
    /// `provider`'s verdict on a request.
    fn check(
        &self,
        provider: &ExtensionProviderConfig,
        input: &CheckInput<'_>,
    ) -> impl std::future::Future<Output = Verdict> + Send;
}

/// The real authorizer: the provider's service, called over the mesh.
pub struct Client<'a, B> {
    pub backends: &'a B,
    pub model: &'a MeshModel,
    /// The waypoint's identity (the destination principal it reports).
    pub waypoint: &'a SpiffeId,
}

impl<B: Backends> Authorizer for Client<'_, B> {
    async fn check(&self, provider: &ExtensionProviderConfig, input: &CheckInput<'_>) -> Verdict {
        check(self, provider, input).await
    }
}

/// Ask `provider` about a request.
async fn check<B: Backends>(
    client: &Client<'_, B>,
    provider: &ExtensionProviderConfig,
    input: &CheckInput<'_>,
) -> Verdict {
    let Some((service, port, timeout)) = provider.endpoint() else {
        return deny(format!("provider {} is misconfigured", provider.name));
    };
    let timeout = timeout
        .and_then(|t| parse_duration(t).ok())
        .unwrap_or(Duration::from_secs(1));
    let (name, ns) = mesh_core::model::split_host(service, "default");
    let backend = Backend {
        namespace: ns.to_string(),
        name: name.to_string(),
        port,
        weight: 1,
        problem: None,
    };
    let fail_open = provider
        .envoy_ext_authz_http
        .as_ref()
        .map(|h| h.fail_open)
        .or(provider.envoy_ext_authz_grpc.as_ref().map(|g| g.fail_open))
        .unwrap_or(false);
    let call = async {
        if let Some(h) = &provider.envoy_ext_authz_http {
            check_http(client, &backend, h, input).await
        } else {
            check_grpc(client, &backend, input).await
        }
    };
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(v)) => v,
        Ok(Err(problem)) => unreachable_or(fail_open, &provider.name, problem),
        Err(_) => unreachable_or(fail_open, &provider.name, NoVerdict::Timeout(timeout)),
    }
}

/// Why an authorizer gave no verdict.
#[derive(Debug, thiserror::Error)]
enum NoVerdict {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("building the check request: {0}")]
    Request(#[from] http::Error),
    #[error(transparent)]
    Backend(#[from] crate::backend::Failure),
    #[error("HTTP {0}")]
    Http(StatusCode),
    #[error("reading the answer: {0}")]
    Body(#[from] hyper::Error),
    #[error("answer without grpc-status")]
    NoStatus,
    #[error(transparent)]
    Status(#[from] mesh_core::grpc::PeerStatus),
    #[error(transparent)]
    Frame(#[from] mesh_core::grpc::FrameError),
}

/// The authorizer could not decide: deny, unless it fails open.
fn unreachable_or(fail_open: bool, provider: &str, problem: NoVerdict) -> Verdict {
    tracing::warn!(provider, %problem, fail_open, "external authorizer unavailable");
    if fail_open {
        Verdict::Allow(HeaderMap::new())
    } else {
        deny(format!(
            "external authorizer {provider} unavailable: {problem}"
        ))
    }
}

async fn check_http<B: Backends>(
    client: &Client<'_, B>,
    backend: &Backend,
    cfg: &mesh_core::model::gateway::ExtAuthzHttp,
    input: &CheckInput<'_>,
) -> Result<Verdict, NoVerdict> {
    let path = format!(
        "{}{}",
        cfg.path_prefix
            .as_deref()
            .unwrap_or("")
            .trim_end_matches('/'),
        input.path_and_query
    );
    let mut req = Request::builder()
        .method(input.method.clone())
        .uri(path)
        .version(Version::HTTP_11)
        .body(
            Full::new(Bytes::new())
                .map_err(|never| match never {})
                .boxed(),
        )?;
    let h = req.headers_mut();
    if let Ok(v) = HeaderValue::from_str(input.host) {
        h.insert(http::header::HOST, v);
    }
    for name in &cfg.include_request_headers_in_check {
        for v in input.headers.get_all(name.as_str()) {
            if let Ok(n) = HeaderName::from_bytes(name.as_bytes()) {
                h.append(n, v.clone());
            }
        }
    }
    // Envoy's defaults travel too: the caller's identity.
    if let Ok(v) = HeaderValue::from_str(&format!(
        "By=spiffe://waypoint;URI={}",
        input.source_identity
    )) {
        h.insert("x-forwarded-client-cert", v);
    }
    let resp = client
        .backends
        .send(client.model, input.source_ip, backend, req, &[])
        .await?
        .response;
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await?.to_bytes();
    let pick = |names: &[String]| {
        let mut out = HeaderMap::new();
        for name in names {
            if let Ok(n) = HeaderName::from_bytes(name.as_bytes()) {
                for v in headers.get_all(&n) {
                    out.append(n.clone(), v.clone());
                }
            }
        }
        out
    };
    if status.is_success() {
        Ok(Verdict::Allow(pick(&cfg.headers_to_upstream_on_allow)))
    } else {
        Ok(Verdict::Deny {
            status,
            headers: pick(&cfg.headers_to_downstream_on_deny),
            body,
            reason: format!("denied by external authorizer ({status})"),
        })
    }
}

/// Decode the one message of a unary gRPC body (re-exported for tests
/// that play the authorization service).
pub use mesh_core::grpc::unframe as grpc_unframe;

async fn check_grpc<B: Backends>(
    client: &Client<'_, B>,
    backend: &Backend,
    input: &CheckInput<'_>,
) -> Result<Verdict, NoVerdict> {
    let headers = input
        .headers
        .iter()
        .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
        .collect();
    let sock = |ip: std::net::IpAddr, port: u16| proto::Address {
        socket_address: Some(proto::SocketAddress {
            address: ip.to_string(),
            port_value: port as u32,
        }),
    };
    let msg = proto::CheckRequest {
        attributes: Some(proto::AttributeContext {
            source: Some(proto::Peer {
                address: Some(sock(input.source_ip, 0)),
                service: String::new(),
                principal: input.source_identity.to_string(),
            }),
            destination: Some(proto::Peer {
                address: Some(sock(input.destination.ip(), input.destination.port())),
                service: input.destination_service.to_string(),
                principal: client.waypoint.to_string(),
            }),
            request: Some(proto::AttributeRequest {
                http: Some(proto::HttpRequest {
                    id: input
                        .headers
                        .get("x-request-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string(),
                    method: input.method.to_string(),
                    headers,
                    path: input.path_and_query.to_string(),
                    host: input.host.to_string(),
                    scheme: "http".into(),
                    protocol: format!("{:?}", input.protocol),
                }),
            }),
        }),
    };
    let req = Request::builder()
        .method(http::Method::POST)
        .uri(format!(
            "http://{}.{}{}",
            backend.name,
            backend.namespace,
            proto::CHECK_PATH
        ))
        .version(Version::HTTP_2)
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header("te", "trailers")
        .body(
            Full::new(mesh_core::grpc::frame(&msg))
                .map_err(|never| match never {})
                .boxed(),
        )?;
    let resp = client
        .backends
        .send(client.model, input.source_ip, backend, req, &[])
        .await?
        .response;
    if !resp.status().is_success() {
        return Err(NoVerdict::Http(resp.status()));
    }
    // The status comes in the trailers, or (trailers-only) in the head.
    let (head, body) = resp.into_parts();
    let collected = body.collect().await?;
    let status = match collected.trailers() {
        Some(t) if t.contains_key("grpc-status") => t,
        _ => &head.headers,
    };
    if !status.contains_key("grpc-status") {
        return Err(NoVerdict::NoStatus);
    }
    mesh_core::grpc::peer_status(status)?;
    let answer: proto::CheckResponse = grpc_unframe(&collected.to_bytes())?;
    let to_map = |hs: &[proto::HeaderValueOption]| {
        let mut out = HeaderMap::new();
        for h in hs.iter().filter_map(|h| h.header.as_ref()) {
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(h.key.as_bytes()),
                HeaderValue::from_str(&h.value),
            ) {
                out.append(n, v);
            }
        }
        out
    };
    let code = answer.status.as_ref().map_or(0, |s| s.code);
    if code == 0 {
        let headers = answer
            .ok_response
            .as_ref()
            .map(|o| to_map(&o.headers))
            .unwrap_or_default();
        return Ok(Verdict::Allow(headers));
    }
    let denied = answer.denied_response.unwrap_or_default();
    let status = denied
        .status
        .as_ref()
        .and_then(|s| StatusCode::from_u16(s.code as u16).ok())
        .filter(|s| !s.is_success())
        .unwrap_or(StatusCode::FORBIDDEN);
    Ok(Verdict::Deny {
        status,
        headers: to_map(&denied.headers),
        body: Bytes::from(denied.body),
        reason: format!(
            "denied by external authorizer (gRPC code {code}: {})",
            answer.status.map(|s| s.message).unwrap_or_default()
        ),
    })
}
