//! Workload identity: SPIFFE IDs, the certificate authority, certificate
//! verification for mutual TLS, the agent's rotating certificate store, and the
//! certificate service that issues certificates over the network.

pub mod ca;
pub mod caservice;
pub mod certs;
pub mod source;
pub mod spiffe;
pub mod verify;

pub use ca::{CaError, CertificateAuthority};
pub use certs::{CertificateSigner, CertificateStore, LocalSigner, WorkloadCert};
pub use source::CaSource;
pub use spiffe::{SpiffeId, SpiffeIdError};
