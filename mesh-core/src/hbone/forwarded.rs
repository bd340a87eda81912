//! The `forwarded` header (RFC 7239, `for=` only) by which a tunnel names
//! its client: written by a node agent and a waypoint, read by the next
//! hop, which believes it only when it names a workload with the identity
//! the peer proved.

use std::net::IpAddr;

/// The header's value for a client at `ip` (IPv6 quoted and bracketed).
pub fn for_client(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(ip) => format!("for={ip}"),
        IpAddr::V6(ip) => format!("for=\"[{ip}]\""),
    }
}

/// The client address a header names, if it is one.
pub fn client(header: &str) -> Option<IpAddr> {
    header
        .strip_prefix("for=")?
        .trim_matches('"')
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_and_read_back() {
        for ip in ["10.0.1.1", "fd00::1:1"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(client(&for_client(ip)), Some(ip));
        }
        assert_eq!(for_client("fd00::1".parse().unwrap()), "for=\"[fd00::1]\"");
        for bad in ["", "for=", "for=x", "by=10.0.0.1", "10.0.0.1"] {
            assert_eq!(client(bad), None, "{bad:?}");
        }
    }
}
