//! Recovering where a captured connection was originally going.
//!
//! The capture mechanism decides how: the eBPF programs record it (next
//! step), iptables-style redirection answers `SO_ORIGINAL_DST`, and tests
//! register explicit mappings. Lookups are pluggable and chained; a
//! connection whose destination cannot be recovered is refused — never
//! forwarded somewhere guessed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;

use tokio::net::TcpStream;

/// A way to find the original destination of an accepted connection.
pub trait OriginalDestination: Send + Sync + 'static {
    /// The original destination of `conn`, consuming any record kept for
    /// it (so records never accumulate).
    fn take(&self, conn: &TcpStream) -> Option<SocketAddr>;
}

/// Explicit mappings from a client's source address to its intended
/// destination, registered before the client connects (as a capture
/// program records the destination before the connection is accepted).
#[derive(Debug, Default)]
pub struct ExplicitMappings {
    map: Mutex<HashMap<SocketAddr, SocketAddr>>,
}

impl ExplicitMappings {
    pub fn insert(&self, client: SocketAddr, original: SocketAddr) {
        self.lock().insert(client, original);
    }

    pub fn remove(&self, client: &SocketAddr) {
        self.lock().remove(client);
    }

    /// Entries not yet consumed (a leak detector for tests and the dump).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, SocketAddr>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl OriginalDestination for ExplicitMappings {
    fn take(&self, conn: &TcpStream) -> Option<SocketAddr> {
        let peer = conn.peer_addr().ok()?;
        self.lock().remove(&peer)
    }
}

/// `getsockopt(SO_ORIGINAL_DST)`: answered by netfilter after an iptables
/// REDIRECT, or by a `cgroup/getsockopt` program.
#[derive(Debug, Default)]
pub struct SoOriginalDst;

impl OriginalDestination for SoOriginalDst {
    fn take(&self, conn: &TcpStream) -> Option<SocketAddr> {
        let sock = socket2::SockRef::from(conn);
        let local = conn.local_addr().ok()?;
        let dst = if local.is_ipv4() {
            sock.original_dst()
        } else {
            sock.original_dst_ipv6()
        };
        let dst = dst.ok()?.as_socket()?;
        // Without redirection the kernel reports the socket's own address:
        // that is not an original destination.
        (dst != local).then_some(dst)
    }
}

/// Try each lookup in order.
pub struct Chain(pub Vec<Box<dyn OriginalDestination>>);

impl OriginalDestination for Chain {
    fn take(&self, conn: &TcpStream) -> Option<SocketAddr> {
        self.0.iter().find_map(|l| l.take(conn))
    }
}

impl<T: OriginalDestination + ?Sized> OriginalDestination for std::sync::Arc<T> {
    fn take(&self, conn: &TcpStream) -> Option<SocketAddr> {
        (**self).take(conn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn explicit_mapping_is_consumed_once() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let client_addr = sock.local_addr().unwrap();
        let m = ExplicitMappings::default();
        let want: SocketAddr = "10.1.2.3:8080".parse().unwrap();
        m.insert(client_addr, want);
        let _c = sock.connect(addr).await.unwrap();
        let (accepted, _) = l.accept().await.unwrap();
        assert_eq!(m.take(&accepted), Some(want));
        assert_eq!(m.take(&accepted), None);
        assert!(m.is_empty());
        // No redirection happened: SO_ORIGINAL_DST has no answer.
        assert_eq!(SoOriginalDst.take(&accepted), None);
    }
}
