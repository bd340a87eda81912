//! Certificate checks for mutual TLS between workloads, and the rustls
//! configurations that use them. There is no SNI and no DNS name: a server is
//! authenticated by the SPIFFE ID the mesh model expects for the destination,
//! a client by any SPIFFE ID of the trust domain (policy decides the rest).
//! TLS 1.3 only, AES-GCM suites only, ALPN `h2` — what Istio's ztunnel speaks.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    SignatureScheme,
};
use x509_parser::extensions::GeneralName;

use super::SpiffeId;

/// Why a peer certificate's identity is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("certificate does not parse: {0}")]
    Malformed(String),
    #[error("certificate has no SPIFFE URI SAN")]
    NoSpiffeId,
    #[error("certificate has more than one URI SAN")]
    MultipleUris,
    #[error("{0}")]
    BadSpiffeId(String),
    #[error("peer identity {got} is not in trust domain {want}")]
    WrongTrustDomain { got: String, want: String },
    #[error("peer identity {got} is not the expected {want}")]
    WrongIdentity { got: String, want: String },
}

/// The SPIFFE ID carried by a certificate (its single URI SAN).
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, IdentityError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| IdentityError::Malformed(e.to_string()))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| IdentityError::Malformed(e.to_string()))?
        .ok_or(IdentityError::NoSpiffeId)?;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    let uri = uris.next().ok_or(IdentityError::NoSpiffeId)?;
    if uris.next().is_some() {
        return Err(IdentityError::MultipleUris);
    }
    uri.parse()
        .map_err(|e: super::SpiffeIdError| IdentityError::BadSpiffeId(e.to_string()))
}

fn reject(e: IdentityError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// The crypto provider all mesh TLS uses: ring, TLS 1.3 AES-GCM suites.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring;
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
            ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
        ],
        ..ring::default_provider()
    })
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

/// Client side: accept the server only if its chain leads to a trusted root
/// and its SPIFFE ID is exactly the one expected for the destination.
#[derive(Debug)]
pub struct ExpectedServerIdentity {
    roots: Arc<RootCertStore>,
    expected: SpiffeId,
    algs: WebPkiSupportedAlgorithms,
}

impl ExpectedServerIdentity {
    pub fn new(roots: Arc<RootCertStore>, expected: SpiffeId) -> Self {
        Self {
            roots,
            expected,
            algs: algorithms(),
        }
    }
}

impl ServerCertVerifier for ExpectedServerIdentity {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        let got = spiffe_id_of(end_entity).map_err(reject)?;
        if got != self.expected {
            return Err(reject(IdentityError::WrongIdentity {
                got: got.to_string(),
                want: self.expected.to_string(),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Server side: require a client certificate chaining to a trusted root whose
/// SPIFFE ID is in our trust domain.
#[derive(Debug)]
pub struct TrustDomainClients {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl TrustDomainClients {
    pub fn new(roots: Arc<RootCertStore>, trust_domain: &str) -> Result<Self, rustls::Error> {
        let inner = WebPkiClientVerifier::builder_with_provider(roots, crypto_provider())
            .build()
            .map_err(|e| rustls::Error::General(format!("client verifier: {e}")))?;
        Ok(Self {
            inner,
            trust_domain: trust_domain.to_string(),
        })
    }
}

impl ClientCertVerifier for TrustDomainClients {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let got = spiffe_id_of(end_entity).map_err(reject)?;
        if got.trust_domain() != self.trust_domain {
            return Err(reject(IdentityError::WrongTrustDomain {
                got: got.to_string(),
                want: self.trust_domain.clone(),
            }));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The ALPN protocol HBONE negotiates.
pub const ALPN_H2: &[u8] = b"h2";

/// TLS server configuration presenting `chain`/`key` and requiring SPIFFE
/// client certificates from `trust_domain`.
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
    trust_domain: &str,
) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let verifier = Arc::new(TrustDomainClients::new(roots, trust_domain)?);
    let mut cfg = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    // No resumption: a resumed session would skip the identity check, and a
    // pod IP can be reused by another identity.
    cfg.send_tls13_tickets = 0;
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(Arc::new(cfg))
}

/// TLS client configuration presenting `chain`/`key` and accepting only a
/// server whose identity is `expected`.
pub fn client_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
    expected: SpiffeId,
) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ExpectedServerIdentity::new(roots, expected)))
        .with_client_auth_cert(chain, key)?;
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    cfg.enable_sni = false;
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    //! Real TLS handshakes in memory (over a tokio duplex pipe) between
    //! certificates of every kind that must be refused.
    use super::*;
    use crate::identity::ca::{new_key_and_csr, CertificateAuthority, DEFAULT_WORKLOAD_TTL};
    use time::{Duration as TD, OffsetDateTime};

    struct Cred {
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    }

    fn cred(ca: &CertificateAuthority, id: &SpiffeId) -> Cred {
        let (key, csr) = new_key_and_csr(id).unwrap();
        let cert = ca.sign(&csr, id, DEFAULT_WORKLOAD_TTL).unwrap();
        Cred {
            chain: vec![cert],
            key: PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        }
    }

    fn cred_valid(
        ca: &CertificateAuthority,
        id: &SpiffeId,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> Cred {
        let (key, csr) = new_key_and_csr(id).unwrap();
        let cert = ca.sign_with_validity(&csr, id, from, to).unwrap();
        Cred {
            chain: vec![cert],
            key: PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        }
    }

    fn roots(ca: &CertificateAuthority) -> Arc<RootCertStore> {
        let mut r = RootCertStore::empty();
        r.add(ca.root().clone()).unwrap();
        Arc::new(r)
    }

    /// Handshake a client and a server; returns (client result, server result
    /// with the client identity it saw).
    async fn handshake(
        client: Cred,
        client_roots: Arc<RootCertStore>,
        expect: SpiffeId,
        server: Cred,
        server_roots: Arc<RootCertStore>,
    ) -> (Result<(), String>, Result<SpiffeId, String>) {
        let scfg = server_config(server.chain, server.key, server_roots, "cluster.local").unwrap();
        let ccfg = client_config(client.chain, client.key, client_roots, expect).unwrap();
        let (a, b) = tokio::io::duplex(64 * 1024);
        let srv = tokio::spawn(async move {
            let tls = tokio_rustls::TlsAcceptor::from(scfg)
                .accept(b)
                .await
                .map_err(|e| e.to_string())?;
            let peer = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
            let alpn = tls.get_ref().1.alpn_protocol().map(|p| p.to_vec());
            assert_eq!(alpn.as_deref(), Some(ALPN_H2));
            assert_eq!(
                tls.get_ref().1.protocol_version(),
                Some(rustls::ProtocolVersion::TLSv1_3)
            );
            // Keep the connection open until the client side has finished.
            let mut tls = tls;
            let _ = tokio::io::AsyncReadExt::read(&mut tls, &mut [0u8; 1]).await;
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut tls).await;
            spiffe_id_of(&peer).map_err(|e| e.to_string())
        });
        let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
        let cli = match tokio_rustls::TlsConnector::from(ccfg)
            .connect(name, a)
            .await
        {
            Ok(mut s) => {
                // TLS 1.3: the client learns about a rejected client certificate
                // only on its first read.
                use tokio::io::AsyncWriteExt;
                let _ = s.write_all(b"x").await;
                let mut buf = Vec::new();
                match tokio::io::AsyncReadExt::read_to_end(&mut s, &mut buf).await {
                    Ok(_) => Ok(()),
                    Err(e) => Err(e.to_string()),
                }
            }
            Err(e) => Err(e.to_string()),
        };
        let srv = srv.await.unwrap();
        (cli, srv)
    }

    fn ids() -> (SpiffeId, SpiffeId) {
        (
            SpiffeId::new("cluster.local", "a", "client"),
            SpiffeId::new("cluster.local", "b", "server"),
        )
    }

    #[tokio::test]
    async fn good_pair_authenticates_both_ways() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let (c, s) = ids();
        let (cli, srv) = handshake(
            cred(&ca, &c),
            roots(&ca),
            s.clone(),
            cred(&ca, &s),
            roots(&ca),
        )
        .await;
        assert_eq!(cli, Ok(()), "server: {srv:?}");
        assert_eq!(srv.unwrap(), c);
    }

    #[tokio::test]
    async fn wrong_server_identity_is_refused() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let (c, s) = ids();
        let imposter = SpiffeId::new("cluster.local", "b", "other");
        let (cli, _) = handshake(
            cred(&ca, &c),
            roots(&ca),
            s,
            cred(&ca, &imposter),
            roots(&ca),
        )
        .await;
        let e = cli.unwrap_err();
        assert!(e.contains("WrongIdentity"), "{e}");
    }

    #[tokio::test]
    async fn wrong_trust_domain_client_is_refused() {
        // Same root, but the client's identity names another trust domain.
        let ca = CertificateAuthority::generate("other.domain").unwrap();
        let evil = SpiffeId::new("other.domain", "a", "client");
        let server_ca_same_root = ca;
        let s = SpiffeId::new("other.domain", "b", "server");
        let (_, srv) = handshake(
            cred(&server_ca_same_root, &evil),
            roots(&server_ca_same_root),
            s.clone(),
            cred(&server_ca_same_root, &s),
            roots(&server_ca_same_root),
        )
        .await;
        let e = srv.unwrap_err();
        assert!(e.contains("WrongTrustDomain"), "{e}");
    }

    #[tokio::test]
    async fn stranger_from_another_ca_is_refused_both_ways() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let stranger_ca = CertificateAuthority::generate("cluster.local").unwrap();
        let (c, s) = ids();
        // Untrusted client.
        let (_, srv) = handshake(
            cred(&stranger_ca, &c),
            roots(&ca),
            s.clone(),
            cred(&ca, &s),
            roots(&ca),
        )
        .await;
        let e = srv.unwrap_err();
        assert!(
            e.contains("UnknownIssuer") || e.contains("BadSignature"),
            "{e}"
        );
        // Untrusted server.
        let (cli, _) = handshake(
            cred(&ca, &c),
            roots(&ca),
            s.clone(),
            cred(&stranger_ca, &s),
            roots(&ca),
        )
        .await;
        let e = cli.unwrap_err();
        assert!(
            e.contains("UnknownIssuer") || e.contains("BadSignature"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn self_signed_stranger_is_refused() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let (c, s) = ids();
        // A self-signed leaf carrying the right SPIFFE ID.
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.subject_alt_names = vec![rcgen::SanType::URI(c.to_string().try_into().unwrap())];
        let cert = p.self_signed(&key).unwrap();
        let selfsigned = Cred {
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        };
        let (_, srv) =
            handshake(selfsigned, roots(&ca), s.clone(), cred(&ca, &s), roots(&ca)).await;
        assert!(srv.is_err());
    }

    #[tokio::test]
    async fn expired_and_not_yet_valid_are_refused() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let (c, s) = ids();
        let now = OffsetDateTime::now_utc();
        let expired = cred_valid(&ca, &c, now - TD::hours(2), now - TD::hours(1));
        let (_, srv) = handshake(expired, roots(&ca), s.clone(), cred(&ca, &s), roots(&ca)).await;
        let e = srv.unwrap_err();
        assert!(e.contains("certificate expired"), "{e}");
        let future = cred_valid(&ca, &s, now + TD::hours(1), now + TD::hours(2));
        let (cli, _) = handshake(cred(&ca, &c), roots(&ca), s.clone(), future, roots(&ca)).await;
        let e = cli.unwrap_err();
        assert!(e.contains("certificate not valid yet"), "{e}");
    }

    #[test]
    fn spiffe_id_extraction_rejects_certificates_without_one() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["example.com".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert_eq!(spiffe_id_of(cert.der()), Err(IdentityError::NoSpiffeId));
        let mut p = rcgen::CertificateParams::default();
        p.subject_alt_names = vec![rcgen::SanType::URI(
            "https://example.com/x".try_into().unwrap(),
        )];
        let cert = p.self_signed(&key).unwrap();
        assert!(matches!(
            spiffe_id_of(cert.der()),
            Err(IdentityError::BadSpiffeId(_))
        ));
        assert!(matches!(
            spiffe_id_of(&CertificateDer::from(vec![1, 2, 3])),
            Err(IdentityError::Malformed(_))
        ));
    }
}
