//! Workload identity: SPIFFE IDs, the certificate authority, certificate
//! verification for mutual TLS, and the agent's rotating certificate store.

pub mod ca;
pub mod certs;
pub mod spiffe;
pub mod verify;

pub use ca::{CaError, CertificateAuthority};
pub use certs::{CertificateSigner, CertificateStore, LocalSigner, WorkloadCert};
pub use spiffe::{SpiffeId, SpiffeIdError};
