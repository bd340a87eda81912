//! Identities from outside: SPIFFE ID strings (principals in policies, SAN
//! values) and certificates presented by peers (the URI SAN is read from
//! arbitrary DER).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_core::identity::verify::spiffe_id_of;
use mesh_core::identity::SpiffeId;
use rustls_pki_types::CertificateDer;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(id) = s.parse::<SpiffeId>() {
            // What parses prints back to the same identity.
            let again: SpiffeId = id.to_string().parse().expect("round trip");
            assert_eq!(again, id);
            let _ = id.principal();
        }
    }
    let _ = spiffe_id_of(&CertificateDer::from(data));
});
