//! Transparent delivery: the application behind the agent sees the client's
//! address, not the agent's, as with ztunnel in a pod's namespace.
//!
//! The agent connects to the application from inside the pod's namespace
//! with `IP_TRANSPARENT`, bound to the client's address, and marks the
//! socket `mark | DELIVERY_MARK_BIT`. The application's side of such a
//! connection must answer to the agent, not to the real client elsewhere,
//! so in the pod's namespace:
//!
//! - `net.ipv4.tcp_fwmark_accept = 1`: an accepted socket (and its SYN-ACK)
//!   carries the mark of the SYN that opened it, so exactly these
//!   connections are marked (Istio does the same with a connection mark
//!   and iptables; this needs neither);
//! - `ip rule fwmark <mark> lookup 133` and `local default dev lo table 133`
//!   (IPv4 and IPv6): marked replies are delivered locally, to the agent's
//!   transparent socket. Istio's table number and rule priority.
//!
//! Nothing else is affected: no other socket carries that mark. The rules
//! are set when a pod is enrolled and removed when the agent is
//! uninstalled; an un-enrolled pod keeps them while the connections already
//! delivered drain. Where they cannot be set (a read-only sysctl), the pod
//! is served the Istio-sidecar way, from 127.0.0.6.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL,
    NLM_F_REQUEST,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use crate::capture::netns::Netns;

/// The routing table of the marked replies (Istio's).
pub const ROUTE_TABLE: u32 = 133;
/// The priority of the rule that selects it (Istio's).
pub const RULE_PRIORITY: u32 = 32764;
/// The loopback device: interface 1 in every network namespace.
const LOOPBACK_INDEX: u32 = 1;

/// Why a pod's namespace could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("entering the pod's network namespace: {0}")]
    Netns(#[source] io::Error),
    #[error("setting {path}: {source}")]
    Sysctl {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{what}: {source}")]
    Netlink {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// The mark of the agent's connections to applications.
pub fn mark(agent_mark: u32) -> u32 {
    agent_mark | sluice_ebpf_common::DELIVERY_MARK_BIT
}

/// Prepare a pod's namespace for transparent delivery (idempotent).
/// `sysctl_dir` is where the host's `/proc/sys/net` is mounted (read per
/// network namespace); `ipv6`: also for IPv6 (the pod has an IPv6 address).
pub fn prepare(
    ns: &Netns,
    sysctl_dir: &Path,
    agent_mark: u32,
    ipv6: bool,
) -> Result<(), DeliveryError> {
    let mark = mark(agent_mark);
    ns.run(|| {
        let path = sysctl_dir.join("ipv4/tcp_fwmark_accept");
        std::fs::write(&path, b"1").map_err(|source| DeliveryError::Sysctl {
            path: path.display().to_string(),
            source,
        })?;
        let nl = Netlink::open()?;
        for v6 in [false, true] {
            if v6 && !ipv6 {
                continue;
            }
            nl.create(
                RouteNetlinkMessage::NewRule(rule(mark, v6)),
                "adding the delivery rule",
            )?;
            nl.create(
                RouteNetlinkMessage::NewRoute(local_route(v6)),
                "adding the delivery route",
            )?;
        }
        Ok(())
    })
    .map_err(DeliveryError::Netns)?
}

/// Remove what [`prepare`] set, except the sysctl (harmless alone, and
/// possibly the pod's own choice). Missing entries are not an error.
pub fn remove(ns: &Netns) -> Result<(), DeliveryError> {
    ns.run(|| {
        let nl = Netlink::open()?;
        for v6 in [false, true] {
            // Any mark: the rule is ours by table and priority.
            for m in [
                RouteNetlinkMessage::DelRule(rule(0, v6)),
                RouteNetlinkMessage::DelRoute(local_route(v6)),
            ] {
                match nl.request(m, 0) {
                    Ok(()) => {}
                    Err(e)
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::ENOENT | libc::ESRCH | libc::EAFNOSUPPORT)
                        ) => {}
                    Err(source) => {
                        return Err(DeliveryError::Netlink {
                            what: "removing the delivery routing",
                            source,
                        });
                    }
                }
            }
        }
        Ok(())
    })
    .map_err(DeliveryError::Netns)?
}

/// Sluice is being removed and its connections have drained: take the
/// routing out of these pods' namespaces ([`crate::Ctx::delivery_namespaces`]).
pub fn remove_all(namespaces: &[std::sync::Arc<Netns>]) {
    if namespaces.is_empty() {
        return;
    }
    let (mut done, mut failed) = (0, 0);
    for ns in namespaces {
        match remove(ns) {
            Ok(()) => done += 1,
            Err(e) => {
                failed += 1;
                tracing::warn!(netns = %ns.path().display(), error = %e, "cannot remove a pod's delivery routing");
            }
        }
    }
    tracing::info!(
        pods = done,
        failed,
        "delivery routing removed from the pods"
    );
}

/// `ip rule add fwmark <mark> lookup 133 pref 32764` (any mark: 0).
fn rule(mark: u32, v6: bool) -> RuleMessage {
    let mut m = RuleMessage::default();
    m.header.family = family(v6);
    m.header.table = ROUTE_TABLE as u8;
    m.header.action = RuleAction::ToTable;
    m.attributes.push(RuleAttribute::Table(ROUTE_TABLE));
    m.attributes.push(RuleAttribute::Priority(RULE_PRIORITY));
    if mark != 0 {
        m.attributes.push(RuleAttribute::FwMark(mark));
        m.attributes.push(RuleAttribute::FwMask(u32::MAX));
    }
    m
}

/// `ip route add local default dev lo table 133`.
fn local_route(v6: bool) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header.address_family = family(v6);
    m.header.destination_prefix_length = 0;
    m.header.table = ROUTE_TABLE as u8;
    m.header.protocol = RouteProtocol::Static;
    m.header.scope = RouteScope::Host;
    m.header.kind = RouteType::Local;
    m.attributes.push(RouteAttribute::Table(ROUTE_TABLE));
    m.attributes.push(RouteAttribute::Destination(if v6 {
        RouteAddress::Inet6(Ipv6Addr::UNSPECIFIED)
    } else {
        RouteAddress::Inet(Ipv4Addr::UNSPECIFIED)
    }));
    m.attributes.push(RouteAttribute::Oif(LOOPBACK_INDEX));
    m
}

fn family(v6: bool) -> AddressFamily {
    if v6 {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    }
}

/// A route netlink socket of the namespace it was opened in.
struct Netlink(Socket);

impl Netlink {
    fn open() -> Result<Self, DeliveryError> {
        let open = || -> io::Result<Socket> {
            let mut s = Socket::new(NETLINK_ROUTE)?;
            s.bind_auto()?;
            s.connect(&SocketAddr::new(0, 0))?;
            Ok(s)
        };
        open()
            .map(Netlink)
            .map_err(|source| DeliveryError::Netlink {
                what: "opening a route netlink socket",
                source,
            })
    }

    /// Create, where already there is as good as created.
    fn create(&self, m: RouteNetlinkMessage, what: &'static str) -> Result<(), DeliveryError> {
        match self.request(m, NLM_F_CREATE | NLM_F_EXCL) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            Err(source) => Err(DeliveryError::Netlink { what, source }),
        }
    }

    /// Send one request and wait for its acknowledgement.
    fn request(&self, m: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        header.sequence_number = 1;
        let mut msg = NetlinkMessage::new(header, NetlinkPayload::from(m));
        msg.finalize();
        let mut buf = vec![0u8; msg.buffer_len()];
        msg.serialize(&mut buf);
        self.0.send(&buf, 0)?;
        let mut reply = Vec::with_capacity(8192);
        loop {
            reply.clear();
            self.0.recv(&mut reply, 0)?;
            let mut at = 0;
            while at < reply.len() {
                let m = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&reply[at..])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let len = m.header.length as usize;
                if let NetlinkPayload::Error(e) = m.payload {
                    return match e.code {
                        None => Ok(()),
                        Some(_) => Err(e.to_io()),
                    };
                }
                if len == 0 {
                    break;
                }
                at += len;
            }
        }
    }
}

/// Whether `source` can be presented to an application at `target`: the
/// same address family, and not the agent's own loopback.
pub fn presentable(source: IpAddr, target: IpAddr) -> bool {
    let source = source.to_canonical();
    source.is_ipv4() == target.is_ipv4() && !source.is_loopback() && !source.is_unspecified()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// A network namespace of its own, created with `unshare` on a thread
    /// and kept open by its file (no name, nothing to clean up but the fd).
    fn private_netns() -> Option<Netns> {
        if !nix::unistd::Uid::effective().is_root() {
            return None;
        }
        let file = std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).ok()?;
            std::fs::File::open("/proc/thread-self/ns/net").ok()
        })
        .join()
        .ok()??;
        Netns::from_file(file, "test").ok()
    }

    fn ip(ns: &Netns, args: &[&str]) -> String {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let out = ns
            .run(move || Command::new("ip").args(&args).output())
            .expect("setns")
            .expect("ip");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn prepare_sets_the_routing_once_and_remove_takes_it_away() {
        let Some(ns) = private_netns() else { return };
        // (A pod's loopback is up: the runtime's CNI set-up does it first.)
        ip(&ns, &["link", "set", "lo", "up"]);
        let dir = Path::new("/proc/sys/net");
        for _ in 0..2 {
            prepare(&ns, dir, 0x539, true).expect("prepare (again)");
        }
        let rules = ip(&ns, &["rule", "show"]);
        assert_eq!(
            rules.matches("from all fwmark 0x1539 lookup 133").count(),
            1,
            "{rules}"
        );
        assert!(rules.starts_with("0:"), "{rules}");
        assert!(rules.contains("32764:"), "{rules}");
        let rules6 = ip(&ns, &["-6", "rule", "show"]);
        assert!(rules6.contains("fwmark 0x1539 lookup 133"), "{rules6}");
        let routes = ip(&ns, &["route", "show", "table", "133"]);
        assert_eq!(routes.lines().count(), 1, "{routes}");
        assert!(routes.starts_with("local default dev lo "), "{routes}");
        let routes6 = ip(&ns, &["-6", "route", "show", "table", "133"]);
        assert!(routes6.contains("local default dev lo"), "{routes6}");
        let accept = ns
            .run(|| std::fs::read_to_string("/proc/sys/net/ipv4/tcp_fwmark_accept"))
            .unwrap()
            .unwrap();
        assert_eq!(accept.trim(), "1");

        remove(&ns).expect("remove");
        for family in ["-4", "-6"] {
            let rules = ip(&ns, &[family, "rule", "show"]);
            assert!(!rules.contains("133"), "{rules}");
            let routes = ip(&ns, &[family, "route", "show", "table", "133"]);
            assert!(routes.trim().is_empty(), "{routes}");
        }
        // Nothing left to remove is not an error.
        remove(&ns).expect("remove again");
    }
}
