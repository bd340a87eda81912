//! Original-destination records as the eBPF programs write them (24 bytes:
//! an IPv4-mapped or IPv6 address, a port, padding): any record decodes to
//! an address, and an address always survives the trip through a record.
#![no_main]

use std::net::SocketAddr;

use libfuzzer_sys::fuzz_target;
use node_agent::capture::{decode_orig_dst, ip_key};
use sluice_ebpf_common::OrigDst;

fuzz_target!(|data: &[u8]| {
    if data.len() < 18 {
        return;
    }
    let mut ip = [0u8; 16];
    ip.copy_from_slice(&data[..16]);
    let rec = OrigDst {
        ip,
        port: u16::from_ne_bytes([data[16], data[17]]),
        _pad: [0; 6],
    };
    let addr: SocketAddr = decode_orig_dst(&rec);
    let back = OrigDst {
        ip: ip_key(addr.ip()),
        port: addr.port(),
        _pad: [0; 6],
    };
    assert_eq!(decode_orig_dst(&back), addr);
});
