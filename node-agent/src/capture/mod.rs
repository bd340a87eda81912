//! Loading and driving the eBPF capture programs (see `ebpf/`).
//!
//! - `connect4`/`connect6`/`sock_ops` are attached once at the cgroup2 root;
//!   `sk_lookup` per enrolled pod namespace. Every link and map is pinned
//!   under a per-node bpffs directory, so capture outlives the agent: with the
//!   agent down, enrolled pods' connections are redirected to listeners that
//!   no longer exist and fail (fail closed) instead of leaving in clear text.
//! - On start the agent reuses the pinned maps, replaces the pinned links
//!   with its freshly loaded programs (attach new, then drop old: no window
//!   without capture), clears connection records from before the restart
//!   (unless the previous agent handed its sockets over and still serves),
//!   and drops enrollments that the model no longer wants.
//! - `aya-log` records from the programs are forwarded to `tracing`.

pub mod netns;

use std::collections::HashSet;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use aya::maps::{Array, HashMap as BpfHashMap, MapData, SockHash};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, SkLookup, SockOps};
use aya::{Ebpf, EbpfLoader};
use sluice_ebpf_common::{config, maps, ConnKey, Enrolled, IpKey, OrigDst, POD_MAP_SIZE};
use tokio::net::TcpStream;

use crate::orig_dst::OriginalDestination;
use netns::Netns;

/// Where the programs come from and where they are attached and pinned.
#[derive(Debug, Clone)]
pub struct CaptureConfig {
    /// The compiled eBPF object (`cargo xtask build-ebpf`).
    pub object: PathBuf,
    /// Per-node bpffs directory for pinned maps and links.
    pub pin_dir: PathBuf,
    /// The cgroup2 directory the socket programs attach to (the root covers
    /// every pod).
    pub cgroup: PathBuf,
    /// SO_MARK on the agent's own sockets inside pods.
    pub mark: u32,
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub hbone_port: u16,
    /// The node's own network namespace: its connections to pods (the
    /// kubelet's probes) are not captured, and it is never enrolled.
    pub host_netns: Option<PathBuf>,
}

/// Why capture could not be set up or changed.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("reading eBPF object {path}: {source}")]
    Object {
        path: String,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("loading eBPF programs: {}", chain(.0))]
    Load(aya::EbpfError),
    #[error("eBPF program {name}: {}", chain(.0), name = .1)]
    Program(aya::programs::ProgramError, &'static str),
    #[error("eBPF map {name}: {}", chain(.0), name = .1)]
    Map(aya::maps::MapError, &'static str),
    #[error("pinning {path}: {reason}")]
    Pin { path: String, reason: String },
    #[error("eBPF program or map {0} missing from the object")]
    Missing(&'static str),
    #[error("eBPF map {0} is full ({1} entries): no room for this pod until others leave")]
    Full(&'static str, u32),
    #[error("network namespace {0} is the node's own: capturing it would capture the node")]
    HostNamespace(String),
    #[error("capture was removed from this node (uninstall)")]
    Removed,
}

/// A map update's error, telling a full map (E2BIG) apart.
fn update_err(name: &'static str, capacity: u32) -> impl Fn(aya::maps::MapError) -> CaptureError {
    move |e| match &e {
        aya::maps::MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::E2BIG) => {
            CaptureError::Full(name, capacity)
        }
        _ => CaptureError::Map(e, name),
    }
}

/// An error and its causes on one line (aya keeps the OS error as a source).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cur = c.source();
    }
    out
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> CaptureError {
    let what = what.into();
    move |source| CaptureError::Io { what, source }
}

struct Maps {
    enrolled: BpfHashMap<MapData, u64, Enrolled>,
    orig: BpfHashMap<MapData, ConnKey, OrigDst>,
    pending: BpfHashMap<MapData, u64, OrigDst>,
    inbound: SockHash<MapData, IpKey>,
    inbound_pods: BpfHashMap<MapData, IpKey, u32>,
}

/// The loaded capture programs of this node.
pub struct Capture {
    cfg: CaptureConfig,
    /// Cookie of the node's own namespace (0: not known).
    host_cookie: u64,
    /// Set by [`Capture::uninstall`]: nothing is captured any more.
    removed: std::sync::atomic::AtomicBool,
    ebpf: Mutex<Ebpf>,
    maps: Mutex<Maps>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// 16-byte, network-order, IPv4-mapped form of an address.
pub fn ip_key(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The address an original-destination record of the eBPF programs names.
pub fn decode_orig_dst(rec: &OrigDst) -> SocketAddr {
    SocketAddr::new(ip_from_key(rec.ip), rec.port)
}

fn ip_from_key(b: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(b);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// Whether a bpffs is mounted at `dir` or above it.
fn bpffs_covers(dir: &Path) -> Result<bool, CaptureError> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")
        .map_err(io_err("reading /proc/self/mounts"))?;
    Ok(mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (_, at, kind) = (f.next(), f.next(), f.next());
        kind == Some("bpf") && at.is_some_and(|at| dir.starts_with(at))
    }))
}

/// Mount bpffs at `root` unless one is mounted there already; true if this
/// call mounted it. (`sluice-agent mount-bpffs`, the DaemonSet's init
/// container, runs it with the host's `/sys/fs/bpf` mounted Bidirectional.)
pub fn mount_bpffs(root: &Path) -> Result<bool, CaptureError> {
    if bpffs_covers(root)? {
        return Ok(false);
    }
    std::fs::create_dir_all(root).map_err(io_err(format!("creating {}", root.display())))?;
    nix::mount::mount(
        Some("bpf"),
        root,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| CaptureError::Io {
        what: format!("mounting bpffs at {}", root.display()),
        source: e.into(),
    })?;
    Ok(true)
}

/// Make sure `pin_dir` is on a bpffs, mounting one at `/sys/fs/bpf` if
/// needed.
fn ensure_bpffs(pin_dir: &Path) -> Result<(), CaptureError> {
    if !bpffs_covers(pin_dir)? && mount_bpffs(Path::new("/sys/fs/bpf"))? {
        tracing::warn!(
            "mounted bpffs at /sys/fs/bpf myself: unless that directory is shared with the host, the capture does not outlive this agent (pods would talk in plaintext while it is away); mount bpffs on the host (the DaemonSet's init container does)"
        );
    }
    std::fs::create_dir_all(pin_dir.join("links"))
        .map_err(io_err(format!("creating {}", pin_dir.display())))
}

impl Capture {
    /// Load the programs, reuse pinned maps, (re)attach and pin the socket
    /// programs at the cgroup root.
    pub fn load(cfg: CaptureConfig, clear_stale: bool) -> Result<Capture, CaptureError> {
        ensure_bpffs(&cfg.pin_dir)?;
        let bytes = std::fs::read(&cfg.object).map_err(|source| CaptureError::Object {
            path: cfg.object.display().to_string(),
            source,
        })?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&cfg.pin_dir)
            .load(&bytes)
            .map_err(CaptureError::Load)?;
        start_log_forwarding(&mut ebpf);

        let mut conf: Array<_, u32> = Array::try_from(
            ebpf.map_mut(maps::CONFIG)
                .ok_or(CaptureError::Missing(maps::CONFIG))?,
        )
        .map_err(|e| CaptureError::Map(e, maps::CONFIG))?;
        for (i, v) in [
            (config::AGENT_MARK, cfg.mark),
            (config::OUTBOUND_PORT, cfg.outbound_port as u32),
            (config::INBOUND_PORT, cfg.inbound_port as u32),
            (config::HBONE_PORT, cfg.hbone_port as u32),
        ] {
            conf.set(i, v, 0)
                .map_err(|e| CaptureError::Map(e, maps::CONFIG))?;
        }
        let host_cookie = match &cfg.host_netns {
            Some(path) => Netns::open(&path.display().to_string())
                .map_err(io_err(format!(
                    "opening the node's network namespace {}",
                    path.display()
                )))?
                .cookie(),
            None => 0,
        };
        let mut host: Array<_, u64> = Array::try_from(
            ebpf.map_mut(maps::HOST_NETNS)
                .ok_or(CaptureError::Missing(maps::HOST_NETNS))?,
        )
        .map_err(|e| CaptureError::Map(e, maps::HOST_NETNS))?;
        host.set(0, host_cookie, 0)
            .map_err(|e| CaptureError::Map(e, maps::HOST_NETNS))?;

        // bpf_link attachments always stack (the kernel rejects the
        // ALLOW_MULTI flag for links), so "Single" still coexists with other
        // agents' and tools' programs on the same cgroup.
        let cgroup = std::fs::File::open(&cfg.cgroup)
            .map_err(io_err(format!("opening cgroup {}", cfg.cgroup.display())))?;
        let links = cfg.pin_dir.join("links");
        for name in ["sluice_connect4", "sluice_connect6"] {
            attach_at_cgroup!(ebpf, CgroupSockAddr, name, &cgroup, &links);
        }
        attach_at_cgroup!(ebpf, SockOps, "sluice_sockops", &cgroup, &links);
        {
            let prog: &mut SkLookup = program(&mut ebpf, "sluice_sk_lookup")?;
            prog.load()
                .map_err(|e| CaptureError::Program(e, "sluice_sk_lookup"))?;
        }

        let take = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name).ok_or(CaptureError::Missing(name))
        };
        let mut m = Maps {
            enrolled: BpfHashMap::try_from(take(&mut ebpf, maps::ENROLLED)?)
                .map_err(|e| CaptureError::Map(e, maps::ENROLLED))?,
            orig: BpfHashMap::try_from(take(&mut ebpf, maps::ORIG_DST)?)
                .map_err(|e| CaptureError::Map(e, maps::ORIG_DST))?,
            pending: BpfHashMap::try_from(take(&mut ebpf, maps::PENDING)?)
                .map_err(|e| CaptureError::Map(e, maps::PENDING))?,
            inbound: SockHash::try_from(take(&mut ebpf, maps::INBOUND_LISTENERS)?)
                .map_err(|e| CaptureError::Map(e, maps::INBOUND_LISTENERS))?,
            inbound_pods: BpfHashMap::try_from(take(&mut ebpf, maps::INBOUND_PODS)?)
                .map_err(|e| CaptureError::Map(e, maps::INBOUND_PODS))?,
        };
        // Records of connections from before this start can never be
        // claimed: those connections failed with the previous agent. Not
        // so after a hand-over: the previous agent still serves, and either
        // may accept a connection redirected a moment ago.
        if clear_stale {
            let stale: Vec<ConnKey> = m.orig.keys().filter_map(Result::ok).collect();
            for k in &stale {
                let _ = m.orig.remove(k);
            }
            let stale: Vec<u64> = m.pending.keys().filter_map(Result::ok).collect();
            for k in &stale {
                let _ = m.pending.remove(k);
            }
        }
        tracing::info!(pin_dir = %cfg.pin_dir.display(), cgroup = %cfg.cgroup.display(), "eBPF capture attached");
        Ok(Capture {
            cfg,
            host_cookie,
            removed: Default::default(),
            ebpf: Mutex::new(ebpf),
            maps: Mutex::new(m),
        })
    }

    /// Capture a pod: its namespace's outbound connections, and inbound
    /// connections to each IP, which go to that IP's inbound plaintext
    /// listener (15006; one per address family).
    pub fn enroll(
        &self,
        ns: &Netns,
        inbound: &[(IpAddr, std::os::fd::BorrowedFd<'_>)],
    ) -> Result<(), CaptureError> {
        if self.removed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(CaptureError::Removed);
        }
        if self.host_cookie != 0 && ns.cookie() == self.host_cookie {
            return Err(CaptureError::HostNamespace(ns.path().display().to_string()));
        }
        let link_path = self.sk_lookup_pin(ns.cookie());
        {
            let mut ebpf = lock(&self.ebpf);
            let prog: &mut SkLookup = program(&mut ebpf, "sluice_sk_lookup")?;
            let id = prog
                .attach(ns.file())
                .map_err(|e| CaptureError::Program(e, "sluice_sk_lookup"))?;
            let link = FdLink::from(
                prog.take_link(id)
                    .map_err(|e| CaptureError::Program(e, "sluice_sk_lookup"))?,
            );
            replace_pin(&link_path, link)?;
        }
        let mut m = lock(&self.maps);
        let result = (|| {
            for (ip, listener) in inbound {
                let key = IpKey { ip: ip_key(*ip) };
                m.inbound
                    .insert(key, listener.as_raw_fd(), 0)
                    .map_err(update_err(maps::INBOUND_LISTENERS, POD_MAP_SIZE))?;
                m.inbound_pods
                    .insert(key, 1, 0)
                    .map_err(update_err(maps::INBOUND_PODS, POD_MAP_SIZE))?;
            }
            m.enrolled
                .insert(ns.cookie(), Enrolled { flags: 0, _pad: 0 }, 0)
                .map_err(update_err(maps::ENROLLED, POD_MAP_SIZE))
        })();
        drop(m);
        // All or nothing (a full map, typically): a pod half captured —
        // inbound but not outbound — would be harder to reason about than
        // one reported as not enrolled and retried.
        if result.is_err() {
            let ips: Vec<IpAddr> = inbound.iter().map(|(ip, _)| *ip).collect();
            self.unenroll(ns.cookie(), &ips);
        }
        result
    }

    /// Stop capturing a pod: its traffic flows directly again.
    pub fn unenroll(&self, netns_cookie: u64, ips: &[IpAddr]) {
        let mut m = lock(&self.maps);
        let _ = m.enrolled.remove(&netns_cookie);
        for ip in ips {
            let key = IpKey { ip: ip_key(*ip) };
            let _ = m.inbound_pods.remove(&key);
            let _ = m.inbound.remove(&key);
        }
        drop(m);
        let _ = std::fs::remove_file(self.sk_lookup_pin(netns_cookie));
    }

    /// Remove enrollments (from before a restart) of namespaces and pod IPs
    /// not in `keep_ns` / `keep_ips`.
    pub fn prune(&self, keep_ns: &HashSet<u64>, keep_ips: &HashSet<IpAddr>) {
        let mut m = lock(&self.maps);
        let stale: Vec<u64> = m
            .enrolled
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !keep_ns.contains(k))
            .collect();
        for k in &stale {
            let _ = m.enrolled.remove(k);
            let _ = std::fs::remove_file(self.sk_lookup_pin(*k));
            tracing::info!(netns_cookie = k, "removed stale enrollment");
        }
        let stale: Vec<IpKey> = m
            .inbound_pods
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !keep_ips.contains(&ip_from_key(k.ip)))
            .collect();
        for k in &stale {
            let _ = m.inbound_pods.remove(k);
            let _ = m.inbound.remove(k);
        }
    }

    /// Enrolled namespace cookies (for the dump and tests).
    pub fn enrolled_namespaces(&self) -> Vec<u64> {
        lock(&self.maps)
            .enrolled
            .keys()
            .filter_map(Result::ok)
            .collect()
    }

    /// Entries in each map, for the `sluice_ebpf_map_entries` gauge.
    pub fn map_fill(&self) -> [(&'static str, usize); 4] {
        let m = lock(&self.maps);
        [
            (maps::ENROLLED, m.enrolled.keys().count()),
            (maps::PENDING, m.pending.keys().count()),
            (maps::ORIG_DST, m.orig.keys().count()),
            (maps::INBOUND_PODS, m.inbound_pods.keys().count()),
        ]
    }

    /// Entries in the connection-tracking maps (a leak detector).
    pub fn tracked_connections(&self) -> usize {
        let m = lock(&self.maps);
        m.orig.keys().count() + m.pending.keys().count()
    }

    pub fn config(&self) -> &CaptureConfig {
        &self.cfg
    }

    /// Remove this node's capture for good (Sluice is being uninstalled):
    /// every pinned link and map goes, which detaches the programs; they
    /// are freed when the agent exits. Pods talk directly again.
    pub fn uninstall(&self) {
        self.removed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        match remove_pins(&self.cfg.pin_dir) {
            Ok(n) => {
                tracing::info!(pin_dir = %self.cfg.pin_dir.display(), removed = n, "eBPF capture removed from this node")
            }
            Err(e) => {
                tracing::error!(pin_dir = %self.cfg.pin_dir.display(), error = %e, "cannot remove the eBPF capture; run `sluice-agent cleanup` on this node")
            }
        }
    }

    fn sk_lookup_pin(&self, netns_cookie: u64) -> PathBuf {
        self.cfg
            .pin_dir
            .join("links")
            .join(format!("sk_lookup_{netns_cookie}"))
    }
}

impl OriginalDestination for Capture {
    fn take(&self, conn: &TcpStream) -> Option<SocketAddr> {
        let peer = conn.peer_addr().ok()?;
        let netns = netns::netns_cookie(conn).ok()?;
        let key = ConnKey {
            netns,
            ip: ip_key(peer.ip()),
            port: peer.port(),
            _pad: [0; 6],
        };
        let mut m = lock(&self.maps);
        let orig = m.orig.get(&key, 0).ok()?;
        let _ = m.orig.remove(&key);
        Some(decode_orig_dst(&orig))
    }
}

/// Remove a node's pinned capture (links, then maps, then the directory
/// and its parent if empty); returns how many pins went. Removing a link's
/// pin detaches its program once no process holds the link.
pub fn remove_pins(pin_dir: &Path) -> std::io::Result<usize> {
    let mut n = 0;
    for dir in [pin_dir.join("links"), pin_dir.to_path_buf()] {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for e in entries {
            let e = e?;
            if e.file_type()?.is_file() {
                std::fs::remove_file(e.path())?;
                n += 1;
            }
        }
        std::fs::remove_dir(&dir)?;
    }
    if let Some(parent) = pin_dir.parent() {
        // Only if no other node's agent uses it (a shared test host).
        let _ = std::fs::remove_dir(parent);
    }
    Ok(n)
}

/// Load a cgroup program, attach it to `cgroup` and pin its link under
/// `links` (replacing the previous agent's). CgroupSockAddr and SockOps share
/// these steps but no trait, hence a macro.
macro_rules! attach_at_cgroup {
    ($ebpf:expr, $ty:ty, $name:expr, $cgroup:expr, $links:expr) => {{
        let name: &'static str = $name;
        let prog: &mut $ty = program(&mut $ebpf, name)?;
        prog.load().map_err(|e| CaptureError::Program(e, name))?;
        let id = prog
            .attach($cgroup, CgroupAttachMode::Single)
            .map_err(|e| CaptureError::Program(e, name))?;
        let link = prog
            .take_link(id)
            .map_err(|e| CaptureError::Program(e, name))?;
        let link = FdLink::try_from(link).map_err(|e| CaptureError::Pin {
            path: name.into(),
            reason: e.to_string(),
        })?;
        replace_pin(&$links.join(name), link)?;
    }};
}
use attach_at_cgroup;

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, CaptureError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let p = ebpf.program_mut(name).ok_or(CaptureError::Missing(name))?;
    p.try_into().map_err(|e| CaptureError::Program(e, name))
}

/// Pin `link` at `path`, detaching whatever link was pinned there before —
/// after the new one is attached, so capture never has a gap.
fn replace_pin(path: &Path, link: FdLink) -> Result<(), CaptureError> {
    let old = PinnedLink::from_pin(path).ok();
    if old.is_some() {
        let _ = std::fs::remove_file(path);
    }
    link.pin(path).map_err(|e| CaptureError::Pin {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    // Dropping the old link's last reference detaches its program.
    drop(old);
    Ok(())
}

/// Forward the programs' aya-log records to `tracing` (through the `log`
/// facade, which tracing-subscriber captures).
fn start_log_forwarding(ebpf: &mut Ebpf) {
    match aya_log::EbpfLogger::init(ebpf) {
        // SAFETY: the logger owns its ring buffer's fd for as long as it
        // lives, and the AsyncFd owns the logger: the fd stays open while
        // registered.
        Ok(logger) => match unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
        } {
            Ok(mut fd) => {
                tokio::spawn(async move {
                    loop {
                        let Ok(mut guard) = fd.readable_mut().await else {
                            return;
                        };
                        guard.get_inner_mut().flush();
                        guard.clear_ready();
                    }
                });
            }
            Err(e) => tracing::warn!(error = %e, "cannot poll eBPF logs"),
        },
        Err(e) => tracing::warn!(error = %e, "eBPF logs unavailable"),
    }
}
