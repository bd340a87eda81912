//! Where a local workload's sockets live. `Host`: the agent's own network
//! namespace, on the workload's IPs (loopback demos and tests). `Netns`: the
//! pod's own namespace, entered with `setns` to create listeners, the
//! connections to the application (from the client's address, see
//! [`crate::delivery`]) and the pod's own outbound connections (HBONE,
//! passthrough) — the in-pod model, independent of the CNI.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::capture::netns::Netns;

/// A workload's network placement.
#[derive(Debug, Clone)]
pub enum PodNet {
    Host,
    Netns {
        ns: Arc<Netns>,
        /// Whether the namespace is prepared for transparent delivery
        /// ([`crate::delivery::prepare`]): the application then sees its
        /// clients' addresses.
        transparent: bool,
    },
}

fn new_socket(addr: &SocketAddr) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(*addr), Type::STREAM, None)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_nonblocking(true)?;
    Ok(s)
}

/// Turn on an integer socket option socket2 0.5 does not wrap
/// (`IP_BIND_ADDRESS_NO_PORT`, `IPV6_TRANSPARENT`).
fn turn_on(s: &Socket, level: libc::c_int, option: libc::c_int) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: a valid socket and a c_int option value of the right size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            option,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl PodNet {
    fn run<T>(&self, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        match self {
            PodNet::Host => f(),
            PodNet::Netns { ns, .. } => ns.run(f)?,
        }
    }

    /// Listen on `addr` in this workload's namespace.
    pub fn listen(&self, addr: SocketAddr) -> io::Result<TcpListener> {
        let std = self.run(|| {
            let s = new_socket(&addr)?;
            s.set_reuse_address(true)?;
            s.bind(&addr.into())?;
            s.listen(1024)?;
            Ok(std::net::TcpListener::from(s))
        })?;
        TcpListener::from_std(std)
    }

    /// Connect to the application at `target` on behalf of a client at
    /// `client`. Inside a pod namespace the socket carries the agent's mark
    /// (so outbound capture skips it) and comes from the client's address
    /// where the namespace allows (transparent delivery), else from
    /// 127.0.0.6 (IPv4, as Istio's sidecars) or the pod's own address
    /// (IPv6), which inbound capture lets through.
    pub async fn connect_app(
        &self,
        target: SocketAddr,
        client: IpAddr,
        mark: u32,
    ) -> io::Result<TcpStream> {
        let sock = self.run(|| {
            let s = new_socket(&target)?;
            let PodNet::Netns { transparent, .. } = self else {
                return Ok(s);
            };
            let transparent =
                *transparent && mark != 0 && crate::delivery::presentable(client, target.ip());
            let src = if transparent {
                s.set_mark(crate::delivery::mark(mark))?;
                if target.is_ipv4() {
                    s.set_ip_transparent(true)?;
                } else {
                    turn_on(&s, libc::IPPROTO_IPV6, libc::IPV6_TRANSPARENT)?;
                }
                client.to_canonical()
            } else {
                // Not transparent: the agent's mark only, from 127.0.0.6
                // (IPv4) or the pod's own address (IPv6: no bind).
                if mark != 0 {
                    s.set_mark(mark)?;
                }
                if target.is_ipv6() {
                    return Ok(s);
                }
                IpAddr::V4(Ipv4Addr::from(sluice_ebpf_common::AGENT_INBOUND_SOURCE_V4))
            };
            // Pick the source port at connect(), unique per destination, not
            // at bind(), unique per source address: otherwise every
            // connection of the pod (TIME_WAIT included) competes for one
            // port range and bind() slows down as it fills.
            turn_on(&s, libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT)?;
            s.bind(&SocketAddr::new(src, 0).into())?;
            Ok(s)
        })?;
        TcpSocket::from_std_stream(std::net::TcpStream::from(sock))
            .connect(target)
            .await
    }

    /// A socket for the workload's own outbound connections (HBONE tunnels,
    /// passthrough), made inside its namespace so the destination sees the
    /// pod's address, and carrying the agent's mark so capture leaves it
    /// alone.
    pub fn dial_socket(&self, target: SocketAddr, mark: u32) -> io::Result<TcpSocket> {
        let sock = self.run(|| {
            let s = new_socket(&target)?;
            if mark != 0 {
                s.set_mark(mark)?;
            }
            Ok(s)
        })?;
        Ok(TcpSocket::from_std_stream(std::net::TcpStream::from(sock)))
    }

    /// Where a workload at `addr` dials from: its namespace (`None` for the
    /// agent's own, which needs no origin).
    pub fn origin(&self, addr: IpAddr, mark: u32) -> Option<mesh_core::hbone::Origin> {
        let net = match self {
            PodNet::Netns { .. } => self.clone(),
            PodNet::Host => return None,
        };
        Some(mesh_core::hbone::Origin {
            addr,
            socket: Arc::new(move |to| net.dial_socket(to, mark)),
        })
    }

    /// Whether this is a pod namespace.
    pub fn netns(&self) -> Option<&Arc<Netns>> {
        match self {
            PodNet::Netns { ns, .. } => Some(ns),
            PodNet::Host => None,
        }
    }
}
