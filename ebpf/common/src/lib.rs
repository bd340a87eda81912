//! Map keys and values shared by Sluice's eBPF programs and the node agent.
//! `no_std`, `repr(C)`, explicit padding (zeroed, since keys are compared
//! byte for byte). Addresses are 16 bytes in network order, IPv4 as
//! IPv4-mapped IPv6 (`::ffff:a.b.c.d`), so one key type serves both
//! families.
#![no_std]

/// Map names, as the programs declare them and the agent opens them.
pub mod maps {
    /// netns cookie → [`super::Enrolled`]: pod network namespaces to capture.
    pub const ENROLLED: &str = "SLUICE_ENROLLED";
    /// socket cookie → [`super::OrigDst`]: set by connect4/6, moved to
    /// [`ORIG_DST`] once the source port is known.
    pub const PENDING: &str = "SLUICE_PENDING";
    /// [`super::ConnKey`] → [`super::OrigDst`]: what the agent looks up for
    /// an accepted connection.
    pub const ORIG_DST: &str = "SLUICE_ORIG_DST";
    /// [`super::IpKey`] (pod IP) → inbound plaintext listener (SOCKHASH).
    pub const INBOUND_LISTENERS: &str = "SLUICE_INBOUND";
    /// [`super::IpKey`] (pod IP) → u32 flags: pods whose inbound is captured
    /// (a pod here with no listener gets its connections dropped).
    pub const INBOUND_PODS: &str = "SLUICE_INBOUND_PODS";
    /// Array of u32 settings, indexed by [`super::config`].
    pub const CONFIG: &str = "SLUICE_CONFIG";
    /// One u64: the cookie of the node's own (host) network namespace, or
    /// 0 when connections from the node are not exempted.
    pub const HOST_NETNS: &str = "SLUICE_HOST_NETNS";
    /// [`super::FlowKey`] → u32: connections inbound capture lets through —
    /// those opened from the node's own namespace to a captured pod (the
    /// kubelet's probes), and the agent's own to an application, from the
    /// client's address ([`super::DELIVERY_MARK_BIT`]). Added at connect,
    /// removed at close.
    pub const HOST_CONNS: &str = "SLUICE_HOST_CONNS";
}

/// Indices into the CONFIG array.
pub mod config {
    /// SO_MARK the agent puts on its own sockets: never redirected.
    pub const AGENT_MARK: u32 = 0;
    /// Outbound capture port (15001).
    pub const OUTBOUND_PORT: u32 = 1;
    /// Inbound plaintext port (15006).
    pub const INBOUND_PORT: u32 = 2;
    /// HBONE port (15008): reaches the agent directly.
    pub const HBONE_PORT: u32 = 3;
    pub const LEN: u32 = 4;
}

/// Capacity of the connection-tracking maps (LRU: they cannot grow beyond).
pub const CONN_MAP_SIZE: u32 = 65536;
/// Capacity of the map of connections from the node to its pods (LRU).
pub const HOST_CONN_MAP_SIZE: u32 = 16384;
/// Capacity of the per-pod maps.
pub const POD_MAP_SIZE: u32 = 4096;

/// Added to the agent's mark on the connections it makes to an application
/// from the client's address (transparent delivery): outbound capture skips
/// them like any socket of the agent, `sock_ops` records them so inbound
/// capture lets them through, and the application's replies, which inherit
/// the mark, are routed back to the agent inside the pod. The agent's own
/// mark never has this bit.
pub const DELIVERY_MARK_BIT: u32 = 0x1000;

/// Source address the agent uses to reach applications inside a pod whose
/// namespace cannot deliver transparently, so the inbound capture lets
/// those connections through (as Istio's 127.0.0.6).
pub const AGENT_INBOUND_SOURCE_V4: [u8; 4] = [127, 0, 0, 6];

/// Value of the ENROLLED map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Enrolled {
    /// Reserved for per-pod options.
    pub flags: u32,
    pub _pad: u32,
}

/// An original destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrigDst {
    /// Network order, IPv4-mapped for IPv4.
    pub ip: [u8; 16],
    /// Host order.
    pub port: u16,
    pub _pad: [u8; 6],
}

/// A client connection as the agent sees it from the accepting side.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnKey {
    /// Network namespace (cookie) of the connection.
    pub netns: u64,
    /// Client (source) address, network order, IPv4-mapped for IPv4.
    pub ip: [u8; 16],
    /// Client port, host order.
    pub port: u16,
    pub _pad: [u8; 6],
}

/// One TCP connection, named from the client's side.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowKey {
    /// Client address, network order, IPv4-mapped for IPv4.
    pub src: [u8; 16],
    /// Server address, same form.
    pub dst: [u8; 16],
    /// Client port, host order.
    pub sport: u16,
    /// Server port, host order.
    pub dport: u16,
    pub _pad: [u8; 4],
}

/// A pod IP.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpKey {
    pub ip: [u8; 16],
}

/// The IPv4-mapped form of an IPv4 address given as its 4 bytes.
#[inline(always)]
pub fn v4_mapped(a: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
    ]
}

/// An IPv6 address as the kernel hands it to programs (four 32-bit words,
/// each in network order) as 16 bytes.
#[inline(always)]
pub fn ip6_bytes(w: [u32; 4]) -> [u8; 16] {
    let mut ip = [0u8; 16];
    for i in 0..4 {
        ip[i * 4..i * 4 + 4].copy_from_slice(&w[i].to_ne_bytes());
    }
    ip
}

#[cfg(feature = "user")]
mod user {
    // All these types are repr(C), Copy, and contain only integers and
    // explicit padding fields, so every bit pattern is valid.
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Enrolled {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::OrigDst {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ConnKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::IpKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowKey {}
}
