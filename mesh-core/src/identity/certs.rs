//! The agent's certificate store: one current certificate per identity it
//! serves, fetched from a [`CertificateSigner`] on first use and rotated in
//! the background well before half of its lifetime has passed. Established
//! TLS connections are unaffected by rotation (they keep their session);
//! new handshakes use the new certificate. A caller that asks for an
//! identity whose certificate has not arrived yet waits for it instead of
//! failing, so connections accepted during start-up are held, not reset.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer, PrivateKeyDer};
use rustls::RootCertStore;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::ca::{new_key_and_csr, CaError, CertificateAuthority};
use super::verify;
use super::SpiffeId;

/// Fraction of a certificate's lifetime after which it is renewed.
pub const REFRESH_FRACTION: f64 = 0.4;
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// The cap while an identity has no certificate at all: every connection
/// of its workload fails meanwhile (a new agent whose CA is restarting in
/// the same rollout waited up to 30 s), so it asks again sooner.
const FIRST_RETRY_MAX: Duration = Duration::from_secs(4);
/// How late a renewal may be before the certificate counts as overdue.
const OVERDUE_GRACE: Duration = Duration::from_secs(1);

/// Boxed future returned by [`CertificateSigner::sign`].
pub type SignFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<CertificateDer<'static>>, CaError>> + Send + 'a>>;

/// Something that turns a CSR into a certificate chain for an identity: the
/// in-process CA in local mode, a remote CA later.
pub trait CertificateSigner: Send + Sync + 'static {
    fn sign<'a>(
        &'a self,
        identity: &'a SpiffeId,
        csr: CertificateSigningRequestDer<'static>,
    ) -> SignFuture<'a>;
}

/// The in-process CA as a signer.
pub struct LocalSigner {
    pub ca: Arc<CertificateAuthority>,
    pub ttl: Duration,
}

impl CertificateSigner for LocalSigner {
    fn sign<'a>(
        &'a self,
        identity: &'a SpiffeId,
        csr: CertificateSigningRequestDer<'static>,
    ) -> SignFuture<'a> {
        Box::pin(async move { self.ca.sign(&csr, identity, self.ttl).map(|c| vec![c]) })
    }
}

/// One issued certificate with its key and the TLS server configuration that
/// presents it.
pub struct WorkloadCert {
    pub identity: SpiffeId,
    pub chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// When this agent received it (the CA back-dates `not_before`).
    pub received_at: SystemTime,
    pub serial: String,
    /// Increases with every rotation of this identity.
    pub generation: u64,
    server_config: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for WorkloadCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadCert")
            .field("identity", &self.identity.to_string())
            .field("serial", &self.serial)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl WorkloadCert {
    /// TLS server configuration presenting this certificate.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.server_config.clone()
    }

    /// TLS client configuration presenting this certificate and accepting
    /// only `expected` as the server.
    pub fn client_config(
        &self,
        roots: Arc<RootCertStore>,
        expected: SpiffeId,
    ) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
        verify::client_config(self.chain.clone(), self.key.clone_key(), roots, expected)
    }

    /// When this certificate should be replaced: at [`REFRESH_FRACTION`] of
    /// the lifetime it had left when it arrived (the CA back-dates
    /// `not_before` for clock skew, which must not count as used lifetime).
    pub fn refresh_at(&self) -> SystemTime {
        let start = self.received_at.max(self.not_before);
        let life = self.not_after.duration_since(start).unwrap_or_default();
        start + life.mul_f64(REFRESH_FRACTION)
    }

    /// What the admin endpoint shows: never the key.
    pub fn summary(&self) -> CertSummary {
        CertSummary {
            identity: self.identity.to_string(),
            serial: self.serial.clone(),
            not_before: unix(self.not_before),
            not_after: unix(self.not_after),
            refresh_at: unix(self.refresh_at()),
            generation: self.generation,
            chain_pem: self.chain.iter().map(|c| pem("CERTIFICATE", c)).collect(),
        }
    }
}

/// Public facts about a certificate, for dumps and metrics.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CertSummary {
    pub identity: String,
    pub serial: String,
    /// Seconds since the Unix epoch.
    pub not_before: u64,
    pub not_after: u64,
    pub refresh_at: u64,
    pub generation: u64,
    pub chain_pem: Vec<String>,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(crate) fn pem(label: &str, der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new(label, der.to_vec()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// Why a certificate could not be produced.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("issued certificate is unusable: {0}")]
    Unusable(String),
    #[error("certificate store is shutting down")]
    Closed,
}

struct Entry {
    tx: watch::Sender<Option<Arc<WorkloadCert>>>,
    task: JoinHandle<()>,
}

/// Certificates of every identity this agent serves.
pub struct CertificateStore {
    signer: Arc<dyn CertificateSigner>,
    roots: Arc<RootCertStore>,
    trust_domain: String,
    entries: Mutex<HashMap<SpiffeId, Entry>>,
    rotations: AtomicU64,
    /// Certificate requests that failed (CA unreachable or refusing).
    failures: AtomicU64,
}

impl CertificateStore {
    pub fn new(
        signer: Arc<dyn CertificateSigner>,
        roots: Vec<CertificateDer<'static>>,
        trust_domain: &str,
    ) -> Result<Arc<Self>, CertError> {
        let mut store = RootCertStore::empty();
        for r in roots {
            store
                .add(r)
                .map_err(|e| CertError::Unusable(format!("root: {e}")))?;
        }
        Ok(Arc::new(Self {
            signer,
            roots: Arc::new(store),
            trust_domain: trust_domain.to_string(),
            entries: Mutex::new(HashMap::new()),
            rotations: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        }))
    }

    /// Trust anchors for verifying peers.
    pub fn roots(&self) -> Arc<RootCertStore> {
        self.roots.clone()
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Start fetching (and rotating) the certificate for `id` if not already.
    pub fn ensure(self: &Arc<Self>, id: &SpiffeId) -> watch::Receiver<Option<Arc<WorkloadCert>>> {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = entries.get(id) {
            return e.tx.subscribe();
        }
        let (tx, rx) = watch::channel(None);
        let weak = Arc::downgrade(self);
        let task = tokio::spawn(maintain(weak, id.clone(), tx.clone()));
        entries.insert(id.clone(), Entry { tx, task });
        rx
    }

    /// Stop maintaining `id` (its workloads left this node).
    pub fn forget(&self, id: &SpiffeId) {
        if let Some(e) = self
            .entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
        {
            e.task.abort();
        }
    }

    /// Identities currently maintained.
    pub fn identities(&self) -> Vec<SpiffeId> {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// The current certificate for `id`, waiting for it if it has not been
    /// issued yet.
    pub async fn get(self: &Arc<Self>, id: &SpiffeId) -> Result<Arc<WorkloadCert>, CertError> {
        let mut rx = self.ensure(id);
        let got = rx
            .wait_for(|c| c.is_some())
            .await
            .map_err(|_| CertError::Closed)?;
        Ok(got.clone().expect("waited for Some"))
    }

    /// The current certificate for `id` if one has been issued.
    pub fn current(&self, id: &SpiffeId) -> Option<Arc<WorkloadCert>> {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .and_then(|e| e.tx.borrow().clone())
    }

    /// Whether every identity being maintained has a certificate.
    pub fn all_ready(&self) -> bool {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .all(|e| e.tx.borrow().is_some())
    }

    /// Public facts about all current certificates.
    pub fn summaries(&self) -> Vec<CertSummary> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<_> = entries
            .values()
            .filter_map(|e| e.tx.borrow().as_ref().map(|c| c.summary()))
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }

    /// Certificate requests that failed since start.
    pub fn request_failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Identities whose certificate is past its refresh point without a
    /// replacement — the CA has been failing; connections go on with the
    /// old certificate until it expires. Operators alert on this.
    pub fn overdue(&self) -> usize {
        let now = SystemTime::now();
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .values()
            .filter_map(|e| e.tx.borrow().clone())
            .filter(|c| c.refresh_at() + OVERDUE_GRACE < now)
            .count()
    }

    /// How many certificates were replaced by rotation since start.
    pub fn rotations(&self) -> u64 {
        self.rotations.load(Ordering::Relaxed)
    }

    async fn issue(&self, id: &SpiffeId, generation: u64) -> Result<WorkloadCert, CertError> {
        let (key, csr) = new_key_and_csr(id)?;
        let chain = self.signer.sign(id, csr).await?;
        let leaf = chain
            .first()
            .ok_or_else(|| CertError::Unusable("empty chain".into()))?;
        let got = verify::spiffe_id_of(leaf).map_err(|e| CertError::Unusable(e.to_string()))?;
        if &got != id {
            return Err(CertError::Unusable(format!(
                "CA issued {got}, asked for {id}"
            )));
        }
        let (_, parsed) = x509_parser::parse_x509_certificate(leaf)
            .map_err(|e| CertError::Unusable(e.to_string()))?;
        let to_time = |t: x509_parser::time::ASN1Time| {
            SystemTime::UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64)
        };
        let key = PrivateKeyDer::try_from(key.serialize_der())
            .map_err(|e| CertError::Unusable(e.to_string()))?;
        let server_config = verify::server_config(
            chain.clone(),
            key.clone_key(),
            self.roots.clone(),
            &self.trust_domain,
        )
        .map_err(|e| CertError::Unusable(e.to_string()))?;
        Ok(WorkloadCert {
            identity: id.clone(),
            serial: parsed.raw_serial_as_string(),
            not_before: to_time(parsed.validity().not_before),
            not_after: to_time(parsed.validity().not_after),
            received_at: SystemTime::now(),
            chain,
            key,
            generation,
            server_config,
        })
    }
}

impl Drop for CertificateStore {
    fn drop(&mut self) {
        for e in self
            .entries
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            e.task.abort();
        }
    }
}

/// Background task: issue, then renew at the refresh point, retrying with
/// backoff on failure while the previous certificate stays in use.
async fn maintain(
    store: std::sync::Weak<CertificateStore>,
    id: SpiffeId,
    tx: watch::Sender<Option<Arc<WorkloadCert>>>,
) {
    let mut generation = 0;
    let mut backoff = RETRY_MIN;
    loop {
        let Some(s) = store.upgrade() else { return };
        match s.issue(&id, generation + 1).await {
            Ok(cert) => {
                generation += 1;
                backoff = RETRY_MIN;
                let wait = cert
                    .refresh_at()
                    .duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO);
                tracing::info!(identity = %id, serial = %cert.serial, generation, refresh_in_s = wait.as_secs_f64(), "certificate issued");
                if generation > 1 {
                    s.rotations.fetch_add(1, Ordering::Relaxed);
                }
                tx.send_replace(Some(Arc::new(cert)));
                drop(s);
                tokio::time::sleep(wait.max(Duration::from_millis(100))).await;
            }
            Err(e) => {
                s.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(identity = %id, error = %e, retry_in_ms = backoff.as_millis() as u64, "certificate request failed");
                drop(s);
                tokio::time::sleep(backoff).await;
                let cap = if generation == 0 {
                    FIRST_RETRY_MAX
                } else {
                    RETRY_MAX
                };
                backoff = (backoff * 2).min(cap);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local_store(ttl: Duration) -> Arc<CertificateStore> {
        let ca = Arc::new(CertificateAuthority::generate("cluster.local").unwrap());
        let root = ca.root().clone();
        CertificateStore::new(
            Arc::new(LocalSigner { ca, ttl }),
            vec![root],
            "cluster.local",
        )
        .unwrap()
    }

    #[tokio::test]
    async fn issues_on_demand_and_rotates_before_half_life() {
        let store = local_store(Duration::from_secs(4));
        let id = SpiffeId::new("cluster.local", "ns", "sa");
        let first = store.get(&id).await.unwrap();
        assert_eq!(first.generation, 1);
        let life = first.not_after.duration_since(first.received_at).unwrap();
        let half = first.received_at + life / 2;
        assert!(first.refresh_at() < half);
        // Wait for the rotation.
        let mut rx = store.ensure(&id);
        let second = tokio::time::timeout(
            Duration::from_secs(30),
            rx.wait_for(|c| c.as_ref().is_some_and(|c| c.generation == 2)),
        )
        .await
        .expect("rotated in time")
        .unwrap()
        .clone()
        .unwrap();
        assert!(
            SystemTime::now() < half + Duration::from_secs(1),
            "rotated after half-life"
        );
        assert_ne!(first.serial, second.serial);
        assert_eq!(store.rotations(), 1);
        assert!(store.summaries()[0].chain_pem[0].starts_with("-----BEGIN CERTIFICATE-----\n"));
    }

    #[tokio::test]
    async fn summary_pem_matches_der() {
        let store = local_store(Duration::from_secs(3600));
        let id = SpiffeId::new("cluster.local", "ns", "sa");
        let cert = store.get(&id).await.unwrap();
        let pem = &cert.summary().chain_pem[0];
        let parsed = rustls_pemfile::certs(&mut pem.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(parsed, cert.chain[0]);
        assert!(!format!("{:?}", cert.summary()).contains("PRIVATE"));
    }

    struct FailingSigner;
    impl CertificateSigner for FailingSigner {
        fn sign<'a>(
            &'a self,
            _: &'a SpiffeId,
            _: CertificateSigningRequestDer<'static>,
        ) -> SignFuture<'a> {
            Box::pin(async { Err(CaError::BadCsr("CA unreachable".into())) })
        }
    }

    /// Signs the first request, then fails like an unreachable CA.
    struct CaGoesAway {
        ca: LocalSigner,
        calls: AtomicU64,
    }
    impl CertificateSigner for CaGoesAway {
        fn sign<'a>(
            &'a self,
            id: &'a SpiffeId,
            csr: CertificateSigningRequestDer<'static>,
        ) -> SignFuture<'a> {
            if self.calls.fetch_add(1, Ordering::Relaxed) == 0 {
                self.ca.sign(id, csr)
            } else {
                FailingSigner.sign(id, csr)
            }
        }
    }

    #[tokio::test]
    async fn an_unreachable_ca_leaves_the_certificate_in_use_and_flags_it_overdue() {
        let ca = Arc::new(CertificateAuthority::generate("cluster.local").unwrap());
        let root = ca.root().clone();
        let signer = CaGoesAway {
            ca: LocalSigner {
                ca,
                ttl: Duration::from_secs(3),
            },
            calls: AtomicU64::new(0),
        };
        let store = CertificateStore::new(Arc::new(signer), vec![root], "cluster.local").unwrap();
        let id = SpiffeId::new("cluster.local", "ns", "sa");
        let first = store.get(&id).await.unwrap();
        assert_eq!(store.overdue(), 0);
        // Past the refresh point (40 % of 3 s) plus the grace, renewal has
        // failed: the certificate is overdue but still served.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while store.overdue() == 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(store.overdue(), 1);
        assert!(store.request_failures() >= 1);
        let current = store.current(&id).unwrap();
        assert_eq!(current.serial, first.serial);
        assert!(store.all_ready());
    }

    #[tokio::test]
    async fn waiting_callers_are_held_not_failed() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let store = CertificateStore::new(
            Arc::new(FailingSigner),
            vec![ca.root().clone()],
            "cluster.local",
        )
        .unwrap();
        let id = SpiffeId::new("cluster.local", "ns", "sa");
        let r = tokio::time::timeout(Duration::from_millis(500), store.get(&id)).await;
        assert!(r.is_err(), "get() should still be waiting");
        assert!(!store.all_ready());
    }
}
