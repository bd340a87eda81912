//! The HBONE server after TLS: arbitrary bytes from a peer (HTTP/2
//! preface, frames, CONNECT requests with any authority and headers) end
//! in a clean error or a clean close, never a panic or a hang.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use mesh_core::hbone::{server, HboneSettings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    rt.block_on(async {
        let (mut peer, agent) = tokio::io::duplex(1 << 20);
        let settings = HboneSettings::default();
        let serve = server::serve_connection(agent, &settings, |stream| async move {
            // What the agent reads from every stream.
            let _ = stream.header("forwarded");
            let _ = stream.header("baggage");
            let _ = stream.header("traceparent");
            if stream.target.port() % 2 == 0 {
                stream.reject(http::StatusCode::UNAUTHORIZED);
            } else if let Ok(s) = stream.accept() {
                let mut s = mesh_core::hbone::H2Io::new(s);
                let _ = s.write_all(b"ok").await;
                let mut buf = [0u8; 64];
                let _ = s.read(&mut buf).await;
            }
        });
        let client = async {
            let _ = peer.write_all(data).await;
            let _ = peer.shutdown().await;
            let mut sink = Vec::new();
            let _ = peer.read_to_end(&mut sink).await;
        };
        // With a paused clock, a hang shows as this (virtual) timeout.
        let _ = tokio::time::timeout(Duration::from_secs(3600), async {
            tokio::join!(serve, client)
        })
        .await;
    });
});
