//! The certificate service's input: a gRPC-framed CreateCertificate request
//! whose CSR is signed by a real CA. Garbage frames, protobuf and CSRs are
//! refused with an error; what is signed carries only the identity the CA
//! chose.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use mesh_core::identity::caservice::proto::IstioCertificateRequest;
use mesh_core::identity::verify::spiffe_id_of;
use mesh_core::identity::{CertificateAuthority, SpiffeId};
use rustls_pki_types::CertificateSigningRequestDer;

fn ca() -> &'static CertificateAuthority {
    static CA: OnceLock<CertificateAuthority> = OnceLock::new();
    CA.get_or_init(|| CertificateAuthority::generate("cluster.local").expect("CA"))
}

fuzz_target!(|data: &[u8]| {
    let id = SpiffeId::new("cluster.local", "ns", "sa");
    // The request as it arrives, and a raw CSR as the CA signs it.
    let csrs: Vec<Vec<u8>> = match mesh_core::grpc::unframe::<IstioCertificateRequest>(data) {
        Ok(req) => pem_blocks(&req.csr),
        Err(_) => vec![data.to_vec()],
    };
    for der in csrs {
        let csr = CertificateSigningRequestDer::from(der);
        if let Ok(cert) = ca().sign(&csr, &id, Duration::from_secs(3600)) {
            assert_eq!(
                spiffe_id_of(&cert).expect("signed cert has an identity"),
                id
            );
        }
    }
});

fn pem_blocks(text: &str) -> Vec<Vec<u8>> {
    pem::parse_many(text)
        .map(|v| v.into_iter().map(|p| p.into_contents()).collect())
        .unwrap_or_default()
}
