//! Sluice's traffic capture, in the kernel.
//!
//! Outbound: `connect4`/`connect6` (cgroup, attached at the cgroup root) see
//! every TCP `connect()`. From a network namespace in ENROLLED, and not from
//! a socket carrying the agent's mark, the destination is recorded under the
//! socket cookie and rewritten to the agent's outbound listener on the pod's
//! own loopback. `sock_ops` then moves the record to the (netns, source
//! address, source port) key the agent can compute from the accepted socket.
//!
//! Inbound: `sk_lookup` (attached to each enrolled pod's namespace) hands
//! TCP connections to the pod's IP to the agent's inbound plaintext listener,
//! except HBONE and the agent's own ports and connections the agent itself
//! makes to the application: from 127.0.0.6, or from the client's own
//! address on a socket carrying the delivery mark, which `sock_ops` records
//! (transparent delivery: the application sees its real client). A captured
//! pod with no listener (agent down) gets its connections dropped: fail
//! closed.
//!
//! The node's own connections to its pods (the kubelet's health probes,
//! host-network pods) are not captured, as Istio exempts them: `sock_ops`
//! records each connection a socket of the host's network namespace opens
//! to a captured pod (and forgets it at close), and `sk_lookup` lets the
//! recorded ones through. Only sockets of the node itself qualify — traffic
//! the node merely forwards (a NodePort, masqueraded to the node's address)
//! has no such socket and stays captured.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_TCP_CLOSE, sk_action,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, map, sk_lookup, sock_ops},
    maps::{Array, HashMap, LruHashMap, SockHash},
    programs::{SkLookupContext, SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::{debug, warn};
use sluice_ebpf_common::{
    AGENT_INBOUND_SOURCE_V4, CONN_MAP_SIZE, ConnKey, DELIVERY_MARK_BIT, Enrolled, FlowKey,
    HOST_CONN_MAP_SIZE, IpKey, OrigDst, POD_MAP_SIZE, config, ip6_bytes, v4_mapped,
};

const IPPROTO_TCP: u32 = 6;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
/// cgroup/connect verdicts.
const ALLOW: i32 = 1;
const REJECT: i32 = 0;

#[map(name = "SLUICE_ENROLLED")]
static ENROLLED: HashMap<u64, Enrolled> = HashMap::pinned(POD_MAP_SIZE, 0);

#[map(name = "SLUICE_PENDING")]
static PENDING: LruHashMap<u64, OrigDst> = LruHashMap::pinned(CONN_MAP_SIZE, 0);

#[map(name = "SLUICE_ORIG_DST")]
static ORIG_DST: LruHashMap<ConnKey, OrigDst> = LruHashMap::pinned(CONN_MAP_SIZE, 0);

#[map(name = "SLUICE_INBOUND")]
static INBOUND: SockHash<IpKey> = SockHash::pinned(POD_MAP_SIZE, 0);

#[map(name = "SLUICE_INBOUND_PODS")]
static INBOUND_PODS: HashMap<IpKey, u32> = HashMap::pinned(POD_MAP_SIZE, 0);

#[map(name = "SLUICE_CONFIG")]
static CONFIG: Array<u32> = Array::pinned(config::LEN, 0);

#[map(name = "SLUICE_HOST_NETNS")]
static HOST_NETNS: Array<u64> = Array::pinned(1, 0);

#[map(name = "SLUICE_HOST_CONNS")]
static HOST_CONNS: LruHashMap<FlowKey, u32> = LruHashMap::pinned(HOST_CONN_MAP_SIZE, 0);

#[inline(always)]
fn setting(i: u32) -> u32 {
    CONFIG.get(i).copied().unwrap_or(0)
}

/// Whether this `connect()` must be captured; records the destination if so.
#[inline(always)]
fn capture(ctx: &SockAddrContext, orig: OrigDst) -> Result<bool, ()> {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel passes a valid bpf_sock_addr for the program's run.
    let protocol = unsafe { (*sa).protocol };
    if protocol != IPPROTO_TCP {
        return Ok(false);
    }
    // SAFETY: valid context pointer, helper allowed for cgroup_sock_addr.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: the value is only tested for presence.
    if unsafe { ENROLLED.get(&netns) }.is_none() {
        return Ok(false);
    }
    // SAFETY: sock_addr programs always have a non-null socket.
    let mark = unsafe { (*(*sa).__bindgen_anon_1.sk).mark };
    let agent_mark = setting(config::AGENT_MARK);
    if agent_mark != 0 && (mark & !DELIVERY_MARK_BIT) == agent_mark {
        return Ok(false);
    }
    // SAFETY: valid context pointer, helper allowed for cgroup_sock_addr.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    PENDING.insert(&cookie, &orig, 0).map_err(|_| ())?;
    Ok(true)
}

#[cgroup_sock_addr(connect4)]
pub fn sluice_connect4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel passes a valid bpf_sock_addr for the program's run.
    let (ip4, port_be) = unsafe { ((*sa).user_ip4, (*sa).user_port as u16) };
    let ip = ip4.to_ne_bytes();
    if ip[0] == 127 {
        // The pod's own loopback stays inside the pod.
        return ALLOW;
    }
    let port = u16::from_be(port_be);
    let orig = OrigDst {
        ip: v4_mapped(ip),
        port,
        _pad: [0; 6],
    };
    match capture(&ctx, orig) {
        Ok(false) => ALLOW,
        Ok(true) => {
            let outbound = setting(config::OUTBOUND_PORT) as u16;
            // SAFETY: user_ip4/user_port are writable in connect4.
            unsafe {
                (*sa).user_ip4 = u32::from_ne_bytes([127, 0, 0, 1]);
                (*sa).user_port = outbound.to_be() as u32;
            }
            debug!(&ctx, "captured connect to {:i}:{}", u32::from_be(ip4), port);
            ALLOW
        }
        Err(()) => {
            warn!(
                &ctx,
                "cannot record original destination; refusing connect (fail closed)"
            );
            REJECT
        }
    }
}

#[cgroup_sock_addr(connect6)]
pub fn sluice_connect6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel passes a valid bpf_sock_addr for the program's run.
    let (w, port_be) = unsafe { ((*sa).user_ip6, (*sa).user_port as u16) };
    let ip = ip6_bytes(w);
    let mapped = ip[..10] == [0u8; 10] && ip[10] == 0xff && ip[11] == 0xff;
    let loopback6 = ip[..15] == [0u8; 15] && ip[15] == 1;
    if loopback6 || (mapped && ip[12] == 127) {
        return ALLOW;
    }
    let port = u16::from_be(port_be);
    let orig = OrigDst {
        ip,
        port,
        _pad: [0; 6],
    };
    match capture(&ctx, orig) {
        Ok(false) => ALLOW,
        Ok(true) => {
            let outbound = setting(config::OUTBOUND_PORT) as u16;
            let to: [u8; 16] = if mapped {
                v4_mapped([127, 0, 0, 1])
            } else {
                [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]
            };
            // SAFETY: user_ip6 words and user_port are writable in connect6.
            unsafe {
                for i in 0..4 {
                    (*sa).user_ip6[i] = u32::from_ne_bytes([
                        to[i * 4],
                        to[i * 4 + 1],
                        to[i * 4 + 2],
                        to[i * 4 + 3],
                    ]);
                }
                (*sa).user_port = outbound.to_be() as u32;
            }
            debug!(&ctx, "captured IPv6 connect to port {}", port);
            ALLOW
        }
        Err(()) => {
            warn!(
                &ctx,
                "cannot record original destination; refusing connect (fail closed)"
            );
            REJECT
        }
    }
}

#[sock_ops]
pub fn sluice_sockops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB && op != BPF_SOCK_OPS_STATE_CB {
        return 1;
    }
    // SAFETY: valid context pointer, helper allowed for sock_ops (5.15+).
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // Every context field is read once, at its fixed offset: the verifier
    // rejects context loads at computed offsets, which is what the optimiser
    // makes of a per-family branch.
    let ops = ctx.ops;
    // SAFETY: valid bpf_sock_ops; all these fields are readable in sock_ops.
    let (family, ip4, w, port, rip4, rw, rport, new_state) = unsafe {
        (
            core::ptr::read_volatile(&(*ops).family),
            core::ptr::read_volatile(&(*ops).local_ip4),
            [
                core::ptr::read_volatile(&(*ops).local_ip6[0]),
                core::ptr::read_volatile(&(*ops).local_ip6[1]),
                core::ptr::read_volatile(&(*ops).local_ip6[2]),
                core::ptr::read_volatile(&(*ops).local_ip6[3]),
            ],
            core::ptr::read_volatile(&(*ops).local_port),
            core::ptr::read_volatile(&(*ops).remote_ip4),
            [
                core::ptr::read_volatile(&(*ops).remote_ip6[0]),
                core::ptr::read_volatile(&(*ops).remote_ip6[1]),
                core::ptr::read_volatile(&(*ops).remote_ip6[2]),
                core::ptr::read_volatile(&(*ops).remote_ip6[3]),
            ],
            core::ptr::read_volatile(&(*ops).remote_port),
            core::ptr::read_volatile(&(*ops).__bindgen_anon_1.args[1]),
        )
    };
    let (ip, rip) = match family {
        AF_INET => (v4_mapped(ip4.to_ne_bytes()), v4_mapped(rip4.to_ne_bytes())),
        AF_INET6 => (ip6_bytes(w), ip6_bytes(rw)),
        _ => return 1,
    };
    let flow = FlowKey {
        src: ip,
        dst: rip,
        sport: port as u16,
        // Network order in the upper half of the word.
        dport: u32::from_be(rport) as u16,
        _pad: [0; 4],
    };
    // Asked for only on the sockets recorded below: forget them at close.
    if op == BPF_SOCK_OPS_STATE_CB {
        if new_state == BPF_TCP_CLOSE {
            let _ = HOST_CONNS.remove(&flow);
        }
        return 1;
    }
    // The node's own connection to a captured pod, and the agent's
    // connection to an application from its client's address: let through
    // by inbound capture until they close.
    let host = HOST_NETNS.get(0).copied().unwrap_or(0);
    let from_node = host != 0 && netns == host;
    let let_through = if from_node {
        // SAFETY: the value is only tested for presence.
        unsafe { INBOUND_PODS.get(&IpKey { ip: rip }) }.is_some()
    } else {
        let agent_mark = setting(config::AGENT_MARK);
        // SAFETY: valid bpf_sock_ops; `sk` is a socket or null (5.3+).
        let sk = unsafe { core::ptr::read_volatile(&(*ops).__bindgen_anon_2.sk) };
        // SAFETY: checked non-null; `mark` is readable in a bpf_sock.
        agent_mark != 0 && !sk.is_null() && unsafe { (*sk).mark } == agent_mark | DELIVERY_MARK_BIT
    };
    if let_through {
        if HOST_CONNS.insert(&flow, &1, 0).is_ok() {
            let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
        } else {
            warn!(
                &ctx,
                "cannot record a connection inbound capture lets through"
            );
        }
        return 1;
    }
    if from_node {
        return 1;
    }
    // SAFETY: valid context pointer, helper allowed for sock_ops.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out before the entry is removed.
    let Some(orig) = (unsafe { PENDING.get(&cookie) }).copied() else {
        return 1;
    };
    let key = ConnKey {
        netns,
        ip,
        port: port as u16,
        _pad: [0; 6],
    };
    if ORIG_DST.insert(&key, &orig, 0).is_err() {
        warn!(&ctx, "cannot store original destination");
    }
    let _ = PENDING.remove(&cookie);
    1
}

#[sk_lookup]
pub fn sluice_sk_lookup(ctx: SkLookupContext) -> u32 {
    let l = ctx.lookup;
    // SAFETY: the kernel passes a valid bpf_sk_lookup for the program's run.
    let (protocol, family, local_port) = unsafe { ((*l).protocol, (*l).family, (*l).local_port) };
    if protocol != IPPROTO_TCP {
        return sk_action::SK_PASS;
    }
    let port = local_port;
    if port == setting(config::HBONE_PORT)
        || port == setting(config::INBOUND_PORT)
        || port == setting(config::OUTBOUND_PORT)
    {
        return sk_action::SK_PASS;
    }
    // SAFETY: as above.
    let remote_port = u16::from_be(unsafe { (*l).remote_port });
    let (ip, rip) = if family == AF_INET {
        // SAFETY: as above.
        let (local, remote) =
            unsafe { ((*l).local_ip4.to_ne_bytes(), (*l).remote_ip4.to_ne_bytes()) };
        if local[0] == 127 || remote == AGENT_INBOUND_SOURCE_V4 {
            return sk_action::SK_PASS;
        }
        (v4_mapped(local), v4_mapped(remote))
    } else if family == AF_INET6 {
        // SAFETY: as above.
        let (w, r) = unsafe { ((*l).local_ip6, (*l).remote_ip6) };
        // ::1 passes, and so do connections from the pod's own address:
        // that is how the agent reaches the application over IPv6.
        if (w[0] | w[1] | w[2]) == 0 && (w[3] == 1u32.to_be()) {
            return sk_action::SK_PASS;
        }
        if r == w {
            return sk_action::SK_PASS;
        }
        (ip6_bytes(w), ip6_bytes(r))
    } else {
        return sk_action::SK_PASS;
    };
    let key = IpKey { ip };
    // SAFETY: the value is only tested for presence.
    if unsafe { INBOUND_PODS.get(&key) }.is_none() {
        return sk_action::SK_PASS;
    }
    let flow = FlowKey {
        src: rip,
        dst: ip,
        sport: remote_port,
        dport: port as u16,
        _pad: [0; 4],
    };
    // SAFETY: the value is only tested for presence.
    if unsafe { HOST_CONNS.get(&flow) }.is_some() {
        // From the node itself (a kubelet probe): straight to the app.
        return sk_action::SK_PASS;
    }
    match INBOUND.redirect_sk_lookup(&ctx, key, 0) {
        Ok(()) => sk_action::SK_PASS,
        Err(_) => {
            warn!(
                &ctx,
                "inbound listener missing for a captured pod; dropping (fail closed)"
            );
            sk_action::SK_DROP
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
