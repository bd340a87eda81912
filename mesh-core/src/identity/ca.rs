//! The certificate authority: a root key that signs short-lived workload
//! certificates carrying a SPIFFE ID as their only URI SAN. In local mode it
//! runs inside the node agent; later it is a component of its own reached
//! over the network. Callers always present a CSR, so private keys never leave
//! the process that uses them.

use std::path::Path;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer};
use time::OffsetDateTime;

use super::SpiffeId;

/// Default lifetime of a workload certificate (as in Istio).
pub const DEFAULT_WORKLOAD_TTL: Duration = Duration::from_secs(24 * 3600);
/// Lifetime of a generated root.
const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Tolerated clock skew: certificates start slightly in the past.
const BACKDATE: Duration = Duration::from_secs(60);

/// Why the CA could not load its root or sign a request.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("bad CA certificate: {0}")]
    BadRootCert(String),
    #[error("bad CA private key: {0}")]
    BadRootKey(String),
    #[error("the CA key does not match the CA certificate")]
    KeyMismatch,
    #[error("bad certificate signing request: {0}")]
    BadCsr(String),
    #[error("identity {requested} is outside this CA's trust domain {trust_domain}")]
    WrongTrustDomain {
        requested: String,
        trust_domain: String,
    },
    #[error("signing failed: {0}")]
    Signing(#[from] rcgen::Error),
    #[error("certificate service {address}: {reason}")]
    Remote { address: String, reason: String },
    #[error("a remote CA ({0}) holds no root key in this process")]
    NoLocalRoot(String),
}

/// A root certificate and key that issue workload certificates.
pub struct CertificateAuthority {
    trust_domain: String,
    root: CertificateDer<'static>,
    root_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Generate a fresh self-signed root (ECDSA P-256) for `trust_domain`.
    pub fn generate(trust_domain: &str) -> Result<Self, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "sluice");
        params.distinguished_name.push(
            DnType::CommonName,
            format!("sluice root CA ({trust_domain})"),
        );
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.subject_alt_names = vec![SanType::URI(
            format!("spiffe://{trust_domain}")
                .try_into()
                .map_err(|e: rcgen::Error| CaError::BadRootCert(e.to_string()))?,
        )];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + ROOT_TTL;
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        Ok(CertificateAuthority {
            trust_domain: trust_domain.to_string(),
            root: cert.der().clone(),
            root_pem: cert.pem(),
            key_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// Use an existing root certificate and key (PEM).
    pub fn from_pem(trust_domain: &str, cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| CaError::BadRootKey(e.to_string()))?;
        let der = rustls_pemfile::certs(&mut cert_pem.as_bytes())
            .next()
            .ok_or_else(|| CaError::BadRootCert("no CERTIFICATE block in PEM".into()))?
            .map_err(|e| CaError::BadRootCert(e.to_string()))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| CaError::BadRootCert(e.to_string()))?;
        if !parsed.is_ca() {
            return Err(CaError::BadRootCert(
                "certificate is not a CA (basicConstraints cA=false)".into(),
            ));
        }
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(CaError::KeyMismatch);
        }
        let issuer =
            Issuer::from_ca_cert_der(&der, key).map_err(|e| CaError::BadRootCert(e.to_string()))?;
        Ok(CertificateAuthority {
            trust_domain: trust_domain.to_string(),
            root: der,
            root_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
            issuer,
        })
    }

    /// Load a root from `cert_path` and `key_path` (PEM files).
    pub fn load(trust_domain: &str, cert_path: &Path, key_path: &Path) -> Result<Self, CaError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| CaError::Read {
                path: p.display().to_string(),
                source,
            })
        };
        Self::from_pem(trust_domain, &read(cert_path)?, &read(key_path)?)
    }

    /// Write the root certificate and key as PEM (key file mode 0600).
    pub fn save(&self, cert_path: &Path, key_path: &Path) -> Result<(), CaError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        fn werr(p: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
            move |source| CaError::Write {
                path: p.display().to_string(),
                source,
            }
        }
        std::fs::write(cert_path, &self.root_pem).map_err(werr(cert_path))?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(key_path)
            .map_err(werr(key_path))?;
        f.write_all(self.key_pem.as_bytes()).map_err(werr(key_path))
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The root certificate peers must trust.
    pub fn root(&self) -> &CertificateDer<'static> {
        &self.root
    }

    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// The root key (PEM), for storing the root where the next start of the
    /// CA finds it (a file or a Kubernetes Secret).
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// A TLS server certificate and key for the CA's own service, naming
    /// `dns_names` (clients verify it against the root they already trust).
    pub fn issue_serving(
        &self,
        dns_names: &[String],
        ttl: Duration,
    ) -> Result<
        (
            CertificateDer<'static>,
            rustls::pki_types::PrivateKeyDer<'static>,
        ),
        CaError,
    > {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(dns_names.to_vec())?;
        params
            .distinguished_name
            .push(DnType::CommonName, "sluice certificate service");
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + ttl;
        params.serial_number = Some(random_serial());
        let cert = params.signed_by(&key, &self.issuer)?;
        let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        Ok((cert.der().clone(), key_der))
    }

    /// Sign a workload CSR for `identity`, valid from now for `ttl`. The
    /// identity is the caller's decision (it must have authorised it); the
    /// CSR contributes only its public key.
    pub fn sign(
        &self,
        csr: &CertificateSigningRequestDer<'_>,
        identity: &SpiffeId,
        ttl: Duration,
    ) -> Result<CertificateDer<'static>, CaError> {
        let now = OffsetDateTime::now_utc();
        self.sign_with_validity(csr, identity, now - BACKDATE, now + ttl)
    }

    /// Sign with an explicit validity window (tests use it to make expired or
    /// not-yet-valid certificates).
    pub fn sign_with_validity(
        &self,
        csr: &CertificateSigningRequestDer<'_>,
        identity: &SpiffeId,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<CertificateDer<'static>, CaError> {
        if identity.trust_domain() != self.trust_domain {
            return Err(CaError::WrongTrustDomain {
                requested: identity.to_string(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        let req = CertificateSigningRequestParams::from_der(csr)
            .map_err(|e| CaError::BadCsr(e.to_string()))?;
        let params = workload_params(identity, not_before, not_after)?;
        Ok(params
            .signed_by(&req.public_key, &self.issuer)?
            .der()
            .clone())
    }
}

/// The parameters every workload certificate gets: the SPIFFE ID as the only
/// SAN, usable for both TLS client and server authentication.
fn workload_params(
    identity: &SpiffeId,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into()?)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.not_before = not_before;
    params.not_after = not_after;
    params.serial_number = Some(random_serial());
    Ok(params)
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // positive
    SerialNumber::from_slice(&bytes)
}

/// A fresh key and a CSR for `identity`: what a workload (or the agent on its
/// behalf) sends to the CA.
pub fn new_key_and_csr(
    identity: &SpiffeId,
) -> Result<(KeyPair, CertificateSigningRequestDer<'static>), CaError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into()?)];
    let csr = params.serialize_request(&key)?;
    Ok((key, csr.der().clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::verify::spiffe_id_of;

    #[test]
    fn issues_certificate_with_spiffe_san_and_ttl() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let id = SpiffeId::new("cluster.local", "shop", "cart");
        let (_key, csr) = new_key_and_csr(&id).unwrap();
        let cert = ca.sign(&csr, &id, DEFAULT_WORKLOAD_TTL).unwrap();
        assert_eq!(spiffe_id_of(&cert).unwrap(), id);
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert).unwrap();
        let life =
            parsed.validity().not_after.timestamp() - parsed.validity().not_before.timestamp();
        assert_eq!(
            life as u64,
            DEFAULT_WORKLOAD_TTL.as_secs() + BACKDATE.as_secs()
        );
        assert!(!parsed.is_ca());
    }

    #[test]
    fn refuses_other_trust_domain() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let id = SpiffeId::new("evil.example", "shop", "cart");
        let (_key, csr) = new_key_and_csr(&id).unwrap();
        assert!(matches!(
            ca.sign(&csr, &id, DEFAULT_WORKLOAD_TTL),
            Err(CaError::WrongTrustDomain { .. })
        ));
    }

    #[test]
    fn refuses_garbage_csr() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let id = SpiffeId::new("cluster.local", "a", "b");
        let junk = CertificateSigningRequestDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00]);
        assert!(matches!(
            ca.sign(&junk, &id, DEFAULT_WORKLOAD_TTL),
            Err(CaError::BadCsr(_))
        ));
    }

    #[test]
    fn root_round_trips_through_files() {
        let dir = std::env::temp_dir().join(format!("sluice-ca-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (c, k) = (dir.join("root.pem"), dir.join("root-key.pem"));
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        ca.save(&c, &k).unwrap();
        let loaded = CertificateAuthority::load("cluster.local", &c, &k).unwrap();
        assert_eq!(loaded.root(), ca.root());
        // A certificate signed by the loaded CA verifies against the original root.
        let id = SpiffeId::new("cluster.local", "a", "b");
        let (_key, csr) = new_key_and_csr(&id).unwrap();
        let cert = loaded.sign(&csr, &id, DEFAULT_WORKLOAD_TTL).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.root().clone()).unwrap();
        let verifier =
            crate::identity::verify::ExpectedServerIdentity::new(std::sync::Arc::new(roots), id);
        let name = rustls::pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
        let now = rustls::pki_types::UnixTime::now();
        rustls::client::danger::ServerCertVerifier::verify_server_cert(
            &verifier,
            &cert,
            &[],
            &name,
            &[],
            now,
        )
        .unwrap();
        // A key from another CA is refused.
        let other = CertificateAuthority::generate("cluster.local").unwrap();
        std::fs::write(&k, &other.key_pem).unwrap();
        assert!(matches!(
            CertificateAuthority::load("cluster.local", &c, &k),
            Err(CaError::KeyMismatch)
        ));
        std::fs::write(&k, "not a key").unwrap();
        assert!(matches!(
            CertificateAuthority::load("cluster.local", &c, &k),
            Err(CaError::BadRootKey(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
