//! Where a proxy's certificates come from: a root of its own (PEM files,
//! or an in-memory one for tests) or a certificate service over the network.
//! Apart from the CA ([`super::ca`]) and the service client
//! ([`super::caservice`]), so that neither depends on the other's callers.

use std::path::PathBuf;
use std::time::Duration;

use rustls::pki_types::CertificateDer;

use super::ca::{CaError, CertificateAuthority};
use super::caservice::{RemoteCa, RemoteSigner};
use super::certs::{CertificateSigner, LocalSigner};

/// Where the certificate authority's root comes from in local mode.
#[derive(Debug, Clone)]
pub enum CaSource {
    /// Load root certificate and key from PEM files; with `generate`, create
    /// and save them first if the files do not exist yet.
    Files {
        cert: PathBuf,
        key: PathBuf,
        generate: bool,
    },
    /// A fresh in-memory root (single-agent use and tests only: peers of
    /// another process would not trust it).
    Ephemeral,
    /// A certificate service reached over the network (Sluice's own CA
    /// Deployment, or anything speaking Istio's certificate API).
    Remote(RemoteCa),
}

impl CaSource {
    /// Build the certificate authority this source describes.
    pub fn load(&self, trust_domain: &str) -> Result<CertificateAuthority, CaError> {
        Ok(match self {
            CaSource::Remote(r) => return Err(CaError::NoLocalRoot(r.address.clone())),
            CaSource::Ephemeral => CertificateAuthority::generate(trust_domain)?,
            CaSource::Files {
                cert,
                key,
                generate,
            } => {
                if *generate && !cert.exists() && !key.exists() {
                    let ca = CertificateAuthority::generate(trust_domain)?;
                    ca.save(cert, key)?;
                    tracing::info!(cert = %cert.display(), "generated a new root CA");
                    ca
                } else {
                    CertificateAuthority::load(trust_domain, cert, key)?
                }
            }
        })
    }

    /// What a proxy needs from this source: something that signs its CSRs
    /// (workload certificates living `ttl`), and the roots that peers'
    /// certificates must chain to.
    pub fn signer(
        &self,
        trust_domain: &str,
        ttl: Duration,
    ) -> Result<
        (
            std::sync::Arc<dyn CertificateSigner>,
            Vec<CertificateDer<'static>>,
        ),
        CaError,
    > {
        if let CaSource::Remote(remote) = self {
            let signer = RemoteSigner::new(remote.clone(), ttl)?;
            let roots = signer.roots().to_vec();
            return Ok((std::sync::Arc::new(signer), roots));
        }
        let ca = std::sync::Arc::new(self.load(trust_domain)?);
        let root = ca.root().clone();
        Ok((std::sync::Arc::new(LocalSigner { ca, ttl }), vec![root]))
    }
}
