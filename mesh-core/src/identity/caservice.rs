//! The certificate service: Istio's certificate-signing API
//! (`istio.v1.auth.IstioCertificateService/CreateCertificate`, unary gRPC
//! over TLS) as a server in front of a [`CertificateAuthority`], and as the
//! client node agents and waypoints use to obtain workload certificates.
//!
//! Callers authenticate with a bearer token (a projected Kubernetes
//! service-account token); a [`CallerAuthorizer`] decides which identity
//! that caller may obtain — its own, or, for a node agent, the identity of a
//! pod on its own node, named in the request's `ImpersonatedIdentity`
//! metadata as ztunnel does. Because the wire format is Istio's, an agent can
//! also be pointed at istiod.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Request, Response};
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};

use super::ca::{CaError, CertificateAuthority};
use super::certs::{pem, CertificateSigner, SignFuture};
use super::verify::{crypto_provider, ExpectedServerIdentity, ALPN_H2};
use super::SpiffeId;
use crate::grpc::{self, Code};

/// The gRPC method (Istio's).
pub const CREATE_CERTIFICATE: &str = "/istio.v1.auth.IstioCertificateService/CreateCertificate";
/// Request metadata naming the identity a node agent asks for on behalf of
/// a pod (the key ztunnel uses).
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";
/// The port istiod serves this API on; Sluice's CA uses it too.
pub const DEFAULT_PORT: u16 = 15012;

const CALL_TIMEOUT: Duration = Duration::from_secs(15);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// The service's own TLS certificate lives a week and is replaced daily.
const SERVING_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
const SERVING_REFRESH: Duration = Duration::from_secs(24 * 3600);

/// The API's messages (field numbers as in Istio's `ca.proto`).
pub mod proto {
    use std::collections::HashMap;

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct IstioCertificateRequest {
        /// PEM-encoded PKCS#10 request.
        #[prost(string, tag = "1")]
        pub csr: String,
        /// Requested lifetime in seconds.
        #[prost(int64, tag = "3")]
        pub validity_duration: i64,
        #[prost(message, optional, tag = "4")]
        pub metadata: Option<Struct>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct IstioCertificateResponse {
        /// PEM certificates: the leaf first, the root last.
        #[prost(string, repeated, tag = "200")]
        pub cert_chain: Vec<String>,
    }

    /// `google.protobuf.Struct`, reduced to the string values this API uses
    /// (other kinds are skipped when decoding).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Struct {
        #[prost(map = "string, message", tag = "1")]
        pub fields: HashMap<String, Value>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Value {
        #[prost(string, optional, tag = "3")]
        pub string_value: Option<String>,
    }
}

/// Why a caller gets no certificate.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Refusal {
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The decision could not be made (e.g. the API server is unreachable);
    /// the caller retries.
    #[error("unavailable: {0}")]
    Unavailable(String),
}

impl Refusal {
    fn code(&self) -> Code {
        match self {
            Refusal::Unauthenticated(_) => Code::Unauthenticated,
            Refusal::PermissionDenied(_) => Code::PermissionDenied,
            Refusal::Unavailable(_) => Code::Unavailable,
        }
    }
}

/// Boxed future returned by [`CallerAuthorizer::authorize`].
pub type AuthorizeFuture<'a> = Pin<Box<dyn Future<Output = Result<SpiffeId, Refusal>> + Send + 'a>>;

/// Who decides which identity a caller may obtain: on Kubernetes, a
/// TokenReview plus the node check (`crate::kube::ca`).
pub trait CallerAuthorizer: Send + Sync + 'static {
    /// The identity to issue for the caller presenting `token`: its own when
    /// `requested` is `None`, `requested` when the caller may act for it.
    fn authorize<'a>(
        &'a self,
        token: Option<&'a str>,
        requested: Option<&'a SpiffeId>,
    ) -> AuthorizeFuture<'a>;
}

/// The server side: checks each request with the authorizer and signs.
pub struct CaService {
    ca: Arc<CertificateAuthority>,
    authorizer: Arc<dyn CallerAuthorizer>,
    max_ttl: Duration,
    /// Certificates issued since start.
    pub issued: AtomicU64,
    /// Requests refused since start (any reason).
    pub refused: AtomicU64,
}

/// A gRPC error: status code and message.
pub use crate::grpc::Status as GrpcError;

impl CaService {
    /// A service signing with `ca`; certificates live at most `max_ttl`.
    pub fn new(
        ca: Arc<CertificateAuthority>,
        authorizer: Arc<dyn CallerAuthorizer>,
        max_ttl: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            ca,
            authorizer,
            max_ttl,
            issued: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        })
    }

    /// The root this service's certificates chain to (PEM).
    pub fn root_pem(&self) -> &str {
        self.ca.root_pem()
    }

    /// Handle one request: the PEM chain (leaf, root) or a gRPC error.
    pub async fn create_certificate(
        &self,
        token: Option<&str>,
        req: &proto::IstioCertificateRequest,
    ) -> Result<Vec<String>, GrpcError> {
        let out = self.decide_and_sign(token, req).await;
        match &out {
            Ok(_) => self.issued.fetch_add(1, Ordering::Relaxed),
            Err(GrpcError { code, message }) => {
                tracing::warn!(?code, %message, "certificate request refused");
                self.refused.fetch_add(1, Ordering::Relaxed)
            }
        };
        out
    }

    async fn decide_and_sign(
        &self,
        token: Option<&str>,
        req: &proto::IstioCertificateRequest,
    ) -> Result<Vec<String>, GrpcError> {
        let invalid = |m: String| GrpcError::new(Code::InvalidArgument, m);
        let requested =
            match req
                .metadata
                .as_ref()
                .and_then(|m| m.fields.get(IMPERSONATED_IDENTITY))
            {
                None => None,
                Some(v) => {
                    let s = v.string_value.as_deref().ok_or_else(|| {
                        invalid(format!("metadata {IMPERSONATED_IDENTITY} must be a string"))
                    })?;
                    Some(s.parse::<SpiffeId>().map_err(|e| {
                        invalid(format!("metadata {IMPERSONATED_IDENTITY} {s:?}: {e}"))
                    })?)
                }
            };
        let csr = parse_csr(&req.csr).map_err(invalid)?;
        let identity = self
            .authorizer
            .authorize(token, requested.as_ref())
            .await
            .map_err(|r| GrpcError::new(r.code(), r.to_string()))?;
        check_csr_names(&csr, &identity).map_err(invalid)?;
        let ttl = match u64::try_from(req.validity_duration) {
            Ok(s) if s > 0 => Duration::from_secs(s).min(self.max_ttl),
            _ => self.max_ttl,
        };
        let leaf = self.ca.sign(&csr, &identity, ttl).map_err(|e| match e {
            CaError::BadCsr(m) => invalid(format!("bad CSR: {m}")),
            other => GrpcError::new(Code::Internal, other.to_string()),
        })?;
        tracing::info!(identity = %identity, ttl_s = ttl.as_secs(), "issued a workload certificate");
        Ok(vec![
            pem("CERTIFICATE", &leaf),
            self.ca.root_pem().to_string(),
        ])
    }

    /// TLS configuration of the service: TLS 1.3, ALPN h2, a server
    /// certificate for `dns_names` issued by the CA itself and renewed daily.
    pub fn tls_config(&self, dns_names: Vec<String>) -> Result<Arc<rustls::ServerConfig>, CaError> {
        let resolver = ServingCert {
            ca: self.ca.clone(),
            dns_names,
            current: Mutex::new(None),
        };
        resolver.current()?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| CaError::BadRootCert(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(resolver));
        cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(Arc::new(cfg))
    }

    /// Serve the API on `listener` until the task is dropped. Each
    /// connection is independent: garbage, a stalled handshake or a bad
    /// request affects only itself.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, tls: Arc<rustls::ServerConfig>) {
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("certificate service: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let svc = self.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                {
                    Ok(Ok(t)) => t,
                    // A connection closed before any TLS is a TCP probe
                    // (the kubelet's, a load balancer's): not worth a line
                    // every few seconds.
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                        tracing::debug!(%peer, "certificate service: closed before the TLS handshake");
                        return;
                    }
                    Ok(Err(e)) => {
                        tracing::info!(%peer, "certificate service: TLS handshake failed: {e}");
                        return;
                    }
                    Err(_) => {
                        tracing::info!(%peer, "certificate service: TLS handshake timed out");
                        return;
                    }
                };
                svc.serve_connection(tls, peer).await;
            });
        }
    }

    async fn serve_connection<S>(self: Arc<Self>, io: S, peer: std::net::SocketAddr)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let mut conn = match h2::server::Builder::new()
            .max_concurrent_streams(32)
            .max_header_list_size(16 << 10)
            .handshake::<_, Bytes>(io)
            .await
        {
            Ok(c) => c,
            Err(e) => {
                tracing::info!(%peer, "certificate service: not HTTP/2: {e}");
                return;
            }
        };
        loop {
            match tokio::time::timeout(IDLE_TIMEOUT, conn.accept()).await {
                Ok(Some(Ok((req, respond)))) => {
                    let svc = self.clone();
                    tokio::spawn(async move { svc.handle(req, respond).await });
                }
                Ok(Some(Err(e))) => {
                    tracing::debug!(%peer, "certificate service: connection error: {e}");
                    return;
                }
                Ok(None) => return,
                Err(_) => conn.graceful_shutdown(),
            }
        }
    }

    async fn handle(
        &self,
        req: Request<h2::RecvStream>,
        mut respond: h2::server::SendResponse<Bytes>,
    ) {
        let head = |status: Option<(Code, &str)>| {
            let mut b = Response::builder()
                .status(200)
                .header("content-type", "application/grpc");
            if let Some((code, message)) = status {
                b = b
                    .header("grpc-status", (code as i32).to_string())
                    .header("grpc-message", grpc::percent_encode(message));
            }
            b.body(()).expect("valid response head")
        };
        match self.unary(req).await {
            Ok(resp) => {
                let Ok(mut send) = respond.send_response(head(None), false) else {
                    return;
                };
                let _ = send.send_data(grpc::frame(&resp), false);
                let mut trailers = HeaderMap::new();
                trailers.insert("grpc-status", "0".parse().expect("valid"));
                let _ = send.send_trailers(trailers);
            }
            // Trailers-only response: the status travels in the headers.
            Err(GrpcError { code, message }) => {
                let _ = respond.send_response(head(Some((code, &message))), true);
            }
        }
    }

    async fn unary(
        &self,
        req: Request<h2::RecvStream>,
    ) -> Result<proto::IstioCertificateResponse, GrpcError> {
        if req.uri().path() != CREATE_CERTIFICATE {
            return Err(GrpcError::new(
                Code::Unimplemented,
                format!("unknown method {}", req.uri().path()),
            ));
        }
        let grpc_content = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"));
        if !grpc_content {
            return Err(GrpcError::new(
                Code::InvalidArgument,
                "content-type must be application/grpc",
            ));
        }
        let token = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|t| t.trim().to_string());
        let body = tokio::time::timeout(
            CALL_TIMEOUT,
            read_body(req.into_body(), grpc::MAX_MESSAGE + 5),
        )
        .await
        .map_err(|_| {
            GrpcError::new(
                Code::DeadlineExceeded,
                "request body not received in time".to_string(),
            )
        })??;
        let msg: proto::IstioCertificateRequest = grpc::unframe(&body)
            .map_err(|e| GrpcError::new(Code::InvalidArgument, e.to_string()))?;
        let cert_chain = self.create_certificate(token.as_deref(), &msg).await?;
        Ok(proto::IstioCertificateResponse { cert_chain })
    }
}

/// Read a whole h2 body (at most `limit` bytes), returning flow-control
/// credit as it goes.
async fn read_body(mut body: h2::RecvStream, limit: usize) -> Result<Bytes, GrpcError> {
    let mut buf = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk
            .map_err(|e| GrpcError::new(Code::Unavailable, format!("reading the body: {e}")))?;
        let _ = body.flow_control().release_capacity(chunk.len());
        if buf.len() + chunk.len() > limit {
            return Err(GrpcError::new(
                Code::ResourceExhausted,
                format!("message larger than {limit} bytes"),
            ));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

fn parse_csr(text: &str) -> Result<CertificateSigningRequestDer<'static>, String> {
    let block = pem::parse(text).map_err(|e| format!("csr is not PEM: {e}"))?;
    if !block.tag().ends_with("CERTIFICATE REQUEST") {
        return Err(format!(
            "csr is a PEM {:?} block, not a CERTIFICATE REQUEST",
            block.tag()
        ));
    }
    Ok(CertificateSigningRequestDer::from(block.into_contents()))
}

/// A CSR may leave its names out (the CA decides them), but if it names a
/// URI SAN, it must be the identity being granted.
fn check_csr_names(
    csr: &CertificateSigningRequestDer<'_>,
    identity: &SpiffeId,
) -> Result<(), String> {
    use x509_parser::extensions::{GeneralName, ParsedExtension};
    use x509_parser::prelude::FromDer;
    let (_, req) = x509_parser::certification_request::X509CertificationRequest::from_der(csr)
        .map_err(|e| format!("bad CSR: {e}"))?;
    let want = identity.to_string();
    for ext in req.requested_extensions().into_iter().flatten() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext {
            for name in &san.general_names {
                if let GeneralName::URI(uri) = name {
                    if *uri != want {
                        return Err(format!(
                            "the CSR names {uri}, but the caller may obtain {want}"
                        ));
                    }
                }
            }
        }
    }
    Ok(())
}

/// The service's TLS certificate, issued by its own CA and replaced when a
/// day old.
#[derive(Debug)]
struct ServingCert {
    ca: Arc<CertificateAuthority>,
    dns_names: Vec<String>,
    current: Mutex<Option<(Arc<CertifiedKey>, Instant)>>,
}

impl ServingCert {
    fn current(&self) -> Result<Arc<CertifiedKey>, CaError> {
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((key, at)) = cur.as_ref() {
            if at.elapsed() < SERVING_REFRESH {
                return Ok(key.clone());
            }
        }
        let (cert, key) = self.ca.issue_serving(&self.dns_names, SERVING_TTL)?;
        let signing = crypto_provider()
            .key_provider
            .load_private_key(key)
            .map_err(|e| CaError::BadRootKey(e.to_string()))?;
        let certified = Arc::new(CertifiedKey::new(vec![cert], signing));
        *cur = Some((certified.clone(), Instant::now()));
        Ok(certified)
    }
}

impl rustls::server::ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        match self.current() {
            Ok(k) => Some(k),
            Err(e) => {
                tracing::error!("certificate service: cannot issue its own TLS certificate: {e}");
                None
            }
        }
    }
}

/// Where a proxy finds the certificate service.
#[derive(Debug, Clone)]
pub struct RemoteCa {
    /// `host:port` of the service.
    pub address: String,
    /// Name to verify the service's certificate against (default: the host
    /// of `address`).
    pub server_name: Option<String>,
    /// The mesh root (PEM): trusted for the service and for peers.
    pub root_cert: PathBuf,
    /// Bearer token file, re-read for every request (the kubelet rotates
    /// projected tokens).
    pub token_file: Option<PathBuf>,
    /// Ask for each workload's identity on its behalf (node agents); without
    /// it the caller gets its own identity (waypoints).
    pub impersonate: bool,
}

/// Flags selecting a remote certificate service, shared by the agent and
/// waypoint binaries.
#[cfg(feature = "cli")]
#[derive(Debug, Clone, clap::Args)]
pub struct RemoteCaArgs {
    /// Certificate service (`host:port`, Istio's certificate API: Sluice's
    /// CA or istiod). Without it the root key is local.
    #[arg(long, env = "SLUICE_CA_ADDRESS", requires = "ca_root_cert")]
    pub ca_address: Option<String>,
    /// Name in the service's TLS certificate (default: the host of
    /// `--ca-address`).
    #[arg(long, env = "SLUICE_CA_SERVER_NAME", requires = "ca_address")]
    pub ca_server_name: Option<String>,
    /// The mesh root certificate (PEM), trusted for the service and peers.
    #[arg(long, env = "SLUICE_CA_ROOT_CERT", requires = "ca_address")]
    pub ca_root_cert: Option<PathBuf>,
    /// Bearer token for the service (a projected service-account token;
    /// re-read for every request).
    #[arg(long, env = "SLUICE_CA_TOKEN_FILE", requires = "ca_address")]
    pub ca_token_file: Option<PathBuf>,
}

/// How often proxies check their mounted mesh root for a change.
pub const ROOT_POLL: Duration = Duration::from_secs(5);

/// Completes once the mesh root at `path` (a mounted ConfigMap the kubelet
/// refreshes) no longer holds what it held when called. A proxy holds its
/// root, its certificates and its peers' trust for its whole life, so a new
/// root (Sluice reinstalled, a pod started with a stale copy) means a
/// restart: the caller drains and exits, and the kubelet starts it again
/// with the new file. Polls every `every`; a file that cannot be read
/// counts as unchanged, and without a file (a local root) it never
/// completes.
pub async fn root_changed(path: Option<PathBuf>, every: Duration) {
    let Some(path) = path else {
        return std::future::pending().await;
    };
    let first = std::fs::read(&path).ok();
    loop {
        tokio::time::sleep(every).await;
        match std::fs::read(&path) {
            Ok(now) if first.as_ref() != Some(&now) => {
                tracing::error!(path = %path.display(), "the mesh root changed: draining and exiting, to start again with it");
                return;
            }
            _ => {}
        }
    }
}

#[cfg(feature = "cli")]
impl RemoteCaArgs {
    /// The remote CA these flags name, if any.
    pub fn remote(self, impersonate: bool) -> Option<RemoteCa> {
        Some(RemoteCa {
            address: self.ca_address?,
            server_name: self.ca_server_name,
            root_cert: self.ca_root_cert?,
            token_file: self.ca_token_file,
            impersonate,
        })
    }
}

/// The client side: a [`CertificateSigner`] calling a remote service over
/// one reused HTTP/2 connection.
pub struct RemoteSigner {
    cfg: RemoteCa,
    ttl: Duration,
    roots: Vec<CertificateDer<'static>>,
    root_store: Arc<rustls::RootCertStore>,
    tls: Arc<rustls::ClientConfig>,
    server_name: ServerName<'static>,
    conn: tokio::sync::Mutex<Option<h2::client::SendRequest<Bytes>>>,
}

impl RemoteSigner {
    /// Check the configuration (the root file must hold certificates).
    pub fn new(cfg: RemoteCa, ttl: Duration) -> Result<Self, CaError> {
        let path = cfg.root_cert.display().to_string();
        let text = std::fs::read_to_string(&cfg.root_cert).map_err(|source| CaError::Read {
            path: path.clone(),
            source,
        })?;
        let roots = rustls_pemfile::certs(&mut text.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| CaError::BadRootCert(format!("{path}: {e}")))?;
        if roots.is_empty() {
            return Err(CaError::BadRootCert(format!(
                "{path}: no CERTIFICATE block"
            )));
        }
        let mut store = rustls::RootCertStore::empty();
        for r in &roots {
            store
                .add(r.clone())
                .map_err(|e| CaError::BadRootCert(format!("{path}: {e}")))?;
        }
        let store = Arc::new(store);
        let host = cfg.server_name.clone().unwrap_or_else(|| {
            let a = cfg.address.as_str();
            a.rsplit_once(':')
                .map_or(a, |(h, _)| h)
                .trim_matches(['[', ']'])
                .to_string()
        });
        let server_name = ServerName::try_from(host.clone()).map_err(|e| CaError::Remote {
            address: cfg.address.clone(),
            reason: format!("bad server name {host:?}: {e}"),
        })?;
        let mut tls = rustls::ClientConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| CaError::BadRootCert(e.to_string()))?
            .with_root_certificates(store.clone())
            .with_no_client_auth();
        tls.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(Self {
            cfg,
            ttl,
            roots,
            root_store: store,
            tls: Arc::new(tls),
            server_name,
            conn: tokio::sync::Mutex::new(None),
        })
    }

    /// The configured roots.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    async fn connection(&self) -> Result<h2::client::SendRequest<Bytes>, String> {
        let mut cached = self.conn.lock().await;
        if let Some(send) = cached.clone() {
            if let Ok(ready) = send.ready().await {
                return Ok(ready);
            }
        }
        *cached = None;
        let tcp = tokio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(&self.cfg.address))
            .await
            .map_err(|_| "connect timed out".to_string())?
            .map_err(|e| format!("connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let tls = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            tokio_rustls::TlsConnector::from(self.tls.clone())
                .connect(self.server_name.clone(), tcp),
        )
        .await
        .map_err(|_| "TLS handshake timed out".to_string())?
        .map_err(|e| format!("TLS: {e}"))?;
        let (send, conn) = h2::client::handshake(tls)
            .await
            .map_err(|e| format!("HTTP/2: {e}"))?;
        let address = self.cfg.address.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%address, "certificate service connection ended: {e}");
            }
        });
        *cached = Some(send.clone());
        Ok(send)
    }

    async fn call(
        &self,
        identity: &SpiffeId,
        csr: &CertificateSigningRequestDer<'_>,
    ) -> Result<Vec<CertificateDer<'static>>, String> {
        let token = match &self.cfg.token_file {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .map_err(|e| format!("cannot read the token {}: {e}", p.display()))?
                    .trim()
                    .to_string(),
            ),
            None => None,
        };
        let metadata = self.cfg.impersonate.then(|| proto::Struct {
            fields: HashMap::from([(
                IMPERSONATED_IDENTITY.to_string(),
                proto::Value {
                    string_value: Some(identity.to_string()),
                },
            )]),
        });
        let msg = proto::IstioCertificateRequest {
            csr: pem("CERTIFICATE REQUEST", csr),
            validity_duration: self.ttl.as_secs() as i64,
            metadata,
        };
        let mut req = Request::builder()
            .method("POST")
            .uri(format!("https://{}{CREATE_CERTIFICATE}", self.cfg.address))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = req.body(()).map_err(|e| format!("request: {e}"))?;
        let mut send = self.connection().await?;
        let (resp, mut stream) = send
            .send_request(req, false)
            .map_err(|e| format!("send: {e}"))?;
        stream
            .send_data(grpc::frame(&msg), true)
            .map_err(|e| format!("send: {e}"))?;
        let resp = resp.await.map_err(|e| format!("response: {e}"))?;
        if resp.status() != http::StatusCode::OK {
            return Err(format!("HTTP status {}", resp.status()));
        }
        let (head, mut body) = resp.into_parts();
        grpc::peer_status(&head.headers).map_err(|e| format!("refused ({e})"))?;
        let mut buf = BytesMut::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(|e| format!("response body: {e}"))?;
            let _ = body.flow_control().release_capacity(chunk.len());
            if buf.len() + chunk.len() > grpc::MAX_MESSAGE + 5 {
                return Err("response too large".into());
            }
            buf.extend_from_slice(&chunk);
        }
        let trailers = body
            .trailers()
            .await
            .map_err(|e| format!("response trailers: {e}"))?
            .unwrap_or_default();
        grpc::peer_status(&trailers).map_err(|e| format!("refused ({e})"))?;
        if !trailers.contains_key("grpc-status") && !head.headers.contains_key("grpc-status") {
            return Err("response without grpc-status".into());
        }
        let answer: proto::IstioCertificateResponse =
            grpc::unframe(&buf).map_err(|e| e.to_string())?;
        let mut chain = Vec::new();
        for text in &answer.cert_chain {
            for c in rustls_pemfile::certs(&mut text.as_bytes()) {
                chain.push(c.map_err(|e| format!("certificate chain: {e}"))?);
            }
        }
        // The root is trusted from configuration and not presented.
        while chain.len() > 1 && chain.last().is_some_and(|c| self.roots.contains(c)) {
            chain.pop();
        }
        let (leaf, intermediates) = chain.split_first().ok_or("empty certificate chain")?;
        // Refuse a certificate peers would refuse: it must chain to our root.
        let verifier = ExpectedServerIdentity::new(self.root_store.clone(), identity.clone());
        rustls::client::danger::ServerCertVerifier::verify_server_cert(
            &verifier,
            leaf,
            intermediates,
            &ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
            &[],
            UnixTime::now(),
        )
        .map_err(|e| {
            format!("the issued certificate does not verify against the configured root: {e}")
        })?;
        Ok(chain)
    }
}

impl CertificateSigner for RemoteSigner {
    fn sign<'a>(
        &'a self,
        identity: &'a SpiffeId,
        csr: CertificateSigningRequestDer<'static>,
    ) -> SignFuture<'a> {
        Box::pin(async move {
            let out = match tokio::time::timeout(CALL_TIMEOUT, self.call(identity, &csr)).await {
                Ok(r) => r,
                Err(_) => Err("no answer in time".into()),
            };
            out.map_err(|reason| {
                // The next attempt starts from a fresh connection.
                if let Ok(mut c) = self.conn.try_lock() {
                    *c = None;
                }
                CaError::Remote {
                    address: self.cfg.address.clone(),
                    reason,
                }
            })
        })
    }
}

#[cfg(test)]
mod tests {
    //! The protocol end to end over loopback TLS, with an authorizer that
    //! grants by a table of tokens (the Kubernetes one is tested against a
    //! real API server in the workspace tests).
    use super::*;
    use crate::identity::ca::new_key_and_csr;

    struct Table;

    impl CallerAuthorizer for Table {
        fn authorize<'a>(
            &'a self,
            token: Option<&'a str>,
            requested: Option<&'a SpiffeId>,
        ) -> AuthorizeFuture<'a> {
            Box::pin(async move {
                let own = match token {
                    Some("agent") => SpiffeId::new("cluster.local", "sluice-system", "agent"),
                    Some("web") => SpiffeId::new("cluster.local", "shop", "web"),
                    Some(_) => return Err(Refusal::Unauthenticated("unknown token".into())),
                    None => return Err(Refusal::Unauthenticated("no token".into())),
                };
                match requested {
                    None => Ok(own),
                    Some(r) if own.service_account() == "agent" && r.namespace() == "shop" => {
                        Ok(r.clone())
                    }
                    Some(r) => Err(Refusal::PermissionDenied(format!(
                        "{own} may not obtain {r}"
                    ))),
                }
            })
        }
    }

    #[tokio::test]
    async fn a_changed_root_file_is_noticed() {
        let f = fixture("root-changed").await;
        let root = f.dir.join("root.pem");
        let watch = tokio::spawn(root_changed(Some(root.clone()), Duration::from_millis(10)));
        // Rewritten with the same content: not a change.
        std::fs::write(&root, std::fs::read(&root).unwrap()).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!watch.is_finished(), "an unchanged root counted as changed");
        let other = CertificateAuthority::generate("cluster.local").unwrap();
        std::fs::write(&root, other.root_pem()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), watch)
            .await
            .expect("a new root is noticed")
            .unwrap();
    }

    struct Fixture {
        dir: PathBuf,
        addr: std::net::SocketAddr,
        svc: Arc<CaService>,
        _task: tokio::task::JoinHandle<()>,
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    async fn fixture(name: &str) -> Fixture {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = std::env::temp_dir().join(format!("sluice-casvc-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = Arc::new(CertificateAuthority::generate("cluster.local").unwrap());
        std::fs::write(dir.join("root.pem"), ca.root_pem()).unwrap();
        let svc = CaService::new(ca, Arc::new(Table), Duration::from_secs(3600));
        let tls = svc.tls_config(vec!["ca.test".into()]).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(svc.clone().serve(listener, tls));
        Fixture {
            dir,
            addr,
            svc,
            _task: task,
        }
    }

    fn signer(f: &Fixture, token: Option<&str>, impersonate: bool) -> RemoteSigner {
        let token_file = token.map(|t| {
            let p = f.dir.join(format!("token-{t}"));
            std::fs::write(&p, format!("{t}\n")).unwrap();
            p
        });
        RemoteSigner::new(
            RemoteCa {
                address: f.addr.to_string(),
                server_name: Some("ca.test".into()),
                root_cert: f.dir.join("root.pem"),
                token_file,
                impersonate,
            },
            Duration::from_secs(600),
        )
        .unwrap()
    }

    async fn ask(s: &RemoteSigner, id: &SpiffeId) -> Result<Vec<CertificateDer<'static>>, CaError> {
        let (_key, csr) = new_key_and_csr(id).unwrap();
        s.sign(id, csr).await
    }

    #[tokio::test]
    async fn grants_own_and_impersonated_identities_and_names_refusals() {
        let f = fixture("grants").await;
        let web = SpiffeId::new("cluster.local", "shop", "web");
        // An agent for a pod: the leaf only (the root is not presented),
        // with the requested lifetime capped by the service.
        let chain = ask(&signer(&f, Some("agent"), true), &web).await.unwrap();
        assert_eq!(chain.len(), 1);
        assert_eq!(
            crate::identity::verify::spiffe_id_of(&chain[0]).unwrap(),
            web
        );
        // A workload for itself.
        assert!(ask(&signer(&f, Some("web"), false), &web).await.is_ok());
        // A workload for someone else: refused with the authorizer's reason.
        let other = SpiffeId::new("cluster.local", "shop", "db");
        let e = ask(&signer(&f, Some("web"), true), &other)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("status 7") && e.contains("may not obtain"),
            "{e}"
        );
        // No token, an unknown token.
        let e = ask(&signer(&f, None, false), &web)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("status 16") && e.contains("no token"), "{e}");
        let e = ask(&signer(&f, Some("forged"), false), &web)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("status 16"), "{e}");
        // Without impersonation the caller gets its own identity; a CSR
        // naming another is refused rather than silently re-labelled.
        let e = ask(&signer(&f, Some("web"), false), &other)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("status 3") && e.contains("the CSR names"), "{e}");
        assert_eq!(f.svc.issued.load(Ordering::Relaxed), 2);
        assert_eq!(f.svc.refused.load(Ordering::Relaxed), 4);
    }

    #[tokio::test]
    async fn a_csr_naming_another_identity_is_refused() {
        let f = fixture("csr").await;
        let web = SpiffeId::new("cluster.local", "shop", "web");
        let db = SpiffeId::new("cluster.local", "shop", "db");
        let (_key, csr_for_db) = new_key_and_csr(&db).unwrap();
        let e = signer(&f, Some("agent"), true)
            .sign(&web, csr_for_db)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("status 3") && e.contains("the CSR names"), "{e}");
        // Garbage instead of a CSR.
        let e = f
            .svc
            .create_certificate(
                Some("agent"),
                &proto::IstioCertificateRequest {
                    csr: "hello".into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap_err();
        assert_eq!(e.code, Code::InvalidArgument);
        assert!(e.message.contains("not PEM"), "{}", e.message);
    }

    #[tokio::test]
    async fn garbage_on_the_socket_and_a_wrong_root_do_not_stop_the_service() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let f = fixture("garbage").await;
        // Plain text instead of TLS.
        let mut s = TcpStream::connect(f.addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
        // A client trusting another root refuses the service.
        let other = CertificateAuthority::generate("cluster.local").unwrap();
        std::fs::write(f.dir.join("other.pem"), other.root_pem()).unwrap();
        let mut bad = signer(&f, Some("agent"), true).cfg.clone();
        bad.root_cert = f.dir.join("other.pem");
        let bad = RemoteSigner::new(bad, Duration::from_secs(60)).unwrap();
        let web = SpiffeId::new("cluster.local", "shop", "web");
        let e = ask(&bad, &web).await.unwrap_err().to_string();
        assert!(e.contains("TLS"), "{e}");
        // The service still answers good clients.
        assert!(ask(&signer(&f, Some("agent"), true), &web).await.is_ok());
        // A root file without certificates is a clear configuration error.
        std::fs::write(f.dir.join("empty.pem"), "nothing here").unwrap();
        let mut empty = signer(&f, Some("agent"), true).cfg.clone();
        empty.root_cert = f.dir.join("empty.pem");
        let e = RemoteSigner::new(empty, Duration::from_secs(60))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("no CERTIFICATE block"), "{e}");
    }
}
