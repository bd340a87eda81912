//! Hot restart: a new agent takes over the listening sockets of the agent it
//! replaces, so a rolling update of the DaemonSet (surge one new pod per
//! node, then remove the old) refuses no connection and cuts none.
//!
//! The running agent listens on a Unix socket (`--handover-socket`, mode
//! 0600, root only). The conversation, one SOCK_SEQPACKET message each:
//!
//! - successor → `TAKEOVER`
//! - running agent → `FDS` carrying up to [`FDS_PER_MESSAGE`] listening
//!   sockets (SCM_RIGHTS), as often as needed, then `END`
//! - successor → `READY` once it serves them (listeners, capture, admin)
//!
//! Then the old agent drains: it stops accepting (closing only its own
//! copies — the sockets stay open in the successor, with their queues), lets
//! established connections finish and exits. Both accept from the shared
//! sockets until then; each connection is served whole by whichever took it.
//!
//! The successor learns what each socket is from the socket itself (address
//! by `getsockname`, network namespace by `SO_NETNS_COOKIE`, and that it is
//! a listening TCP socket), never from the peer's word. No agent at the path,
//! a stale socket file, a peer that hangs up or stalls: a normal start.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::socket::{accept4, getsockopt, shutdown, sockopt, Shutdown, SockFlag, SockType};

use crate::capture::netns::netns_cookie;
use crate::fdpass::{connect_to, listen_at, recv, send, set_timeout};

/// Sockets per message (the kernel's SCM_MAX_FD is 253).
pub use crate::fdpass::FDS_PER_MESSAGE;
/// How long either side waits for the other's next message, except for
/// `READY`: the successor may first have to obtain certificates.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the running agent waits for `READY` before it gives up on the
/// successor (and keeps serving as if nothing happened).
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// Why a hand-over could not be done.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("hand-over socket {path}: {source}")]
    Socket { path: String, source: io::Error },
    #[error("hand-over with the running agent: {0}")]
    Protocol(String),
}

/// A listening socket's identity: the network namespace it lives in and
/// the address it is bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ListenerKey {
    pub netns: u64,
    pub addr: SocketAddr,
}

/// Listening sockets received from the previous agent, until adopted.
pub struct Inherited {
    own_netns: u64,
    sockets: Mutex<HashMap<ListenerKey, OwnedFd>>,
    /// The conversation, kept open to say `READY`.
    conn: Mutex<Option<OwnedFd>>,
}

impl Inherited {
    /// Nothing inherited: every listener is bound fresh.
    pub fn none() -> Inherited {
        Inherited {
            own_netns: own_netns(),
            sockets: Mutex::default(),
            conn: Mutex::default(),
        }
    }

    /// How many sockets are still waiting to be adopted.
    pub fn pending(&self) -> usize {
        lock(&self.sockets).len()
    }

    /// Whether a previous agent handed its sockets over.
    pub fn took_over(&self) -> bool {
        lock(&self.conn).is_some()
    }

    /// The inherited listener bound to `addr` in network namespace `netns`
    /// (`None`: the agent's own), if there is one.
    pub fn take(&self, netns: Option<u64>, addr: SocketAddr) -> Option<std::net::TcpListener> {
        let key = ListenerKey {
            netns: netns.unwrap_or(self.own_netns),
            addr,
        };
        let fd = lock(&self.sockets).remove(&key)?;
        let l = std::net::TcpListener::from(fd);
        l.set_nonblocking(true).ok()?;
        tracing::debug!(netns = key.netns, %addr, "adopted an inherited listener");
        Some(l)
    }

    /// Tell the previous agent that this one serves (it starts draining),
    /// and close inherited sockets nobody adopted (workloads that left).
    /// Returns how many were left unadopted.
    pub fn finish(&self) -> usize {
        let left: Vec<ListenerKey> = lock(&self.sockets).drain().map(|(k, _)| k).collect();
        if let Some(conn) = lock(&self.conn).take() {
            match send(&conn, b"READY", &[]) {
                Ok(()) => tracing::info!(
                    unadopted = left.len(),
                    "took over from the previous agent; it drains now"
                ),
                Err(e) => tracing::warn!(error = %e, "could not tell the previous agent to drain"),
            }
        }
        for k in &left {
            tracing::info!(netns = k.netns, addr = %k.addr, "inherited listener not needed; closed");
        }
        left.len()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn own_netns() -> u64 {
    socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .and_then(|s| netns_cookie(&s))
        .unwrap_or(0)
}

/// What a received descriptor is, if it is a listening TCP socket.
fn identify(fd: &OwnedFd) -> Option<ListenerKey> {
    if !getsockopt(fd, sockopt::AcceptConn).ok()? {
        return None;
    }
    if getsockopt(fd, sockopt::SockType).ok()? != SockType::Stream {
        return None;
    }
    let s = socket2::SockRef::from(fd);
    let addr = s.local_addr().ok()?.as_socket()?;
    let netns = netns_cookie(fd).ok()?;
    Some(ListenerKey { netns, addr })
}

/// Ask the agent serving at `path` for its listening sockets. No agent
/// there (no file, a stale file, nobody answering): nothing inherited.
pub fn take_over(path: &Path) -> Result<Inherited, HandoverError> {
    let mut inherited = Inherited::none();
    let err = |source: io::Error| HandoverError::Socket {
        path: path.display().to_string(),
        source,
    };
    let conn = match connect_to(path) {
        Ok(conn) => conn,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ECONNREFUSED)) => {
            return Ok(inherited)
        }
        Err(e) => return Err(err(e)),
    };
    set_timeout(&conn, STEP_TIMEOUT).map_err(err)?;
    send(&conn, b"TAKEOVER", &[]).map_err(err)?;
    let mut sockets = HashMap::new();
    loop {
        let (what, fds) = recv(&conn, 64).map_err(err)?;
        match what.as_slice() {
            b"FDS" => {
                for fd in fds {
                    match identify(&fd) {
                        Some(key) => {
                            sockets.insert(key, fd);
                        }
                        None => tracing::warn!(
                            "hand-over: ignored a descriptor that is not a listening TCP socket"
                        ),
                    }
                }
            }
            b"END" => break,
            b"" => {
                return Err(HandoverError::Protocol(
                    "the running agent hung up during the hand-over".into(),
                ))
            }
            other => {
                return Err(HandoverError::Protocol(format!(
                    "unexpected message {:?}",
                    String::from_utf8_lossy(other)
                )))
            }
        }
    }
    tracing::info!(
        listeners = sockets.len(),
        socket = %path.display(),
        "received the running agent's listening sockets"
    );
    inherited.sockets = Mutex::new(sockets);
    inherited.conn = Mutex::new(Some(conn));
    Ok(inherited)
}

/// The running agent's side: hands its listeners to a successor that asks.
pub struct HandoverServer {
    listener: Arc<OwnedFd>,
    path: PathBuf,
}

impl HandoverServer {
    /// Listen at `path` (replacing whatever file is there: a successor binds
    /// after its predecessor, which no longer needs the name). For each
    /// successor, `listeners` gives duplicates of the sockets to hand over
    /// and `on_ready` runs when it says `READY`.
    pub fn start(
        path: &Path,
        listeners: impl Fn() -> Vec<OwnedFd> + Send + 'static,
        on_ready: impl Fn() + Send + 'static,
    ) -> Result<HandoverServer, HandoverError> {
        let err = |source: io::Error| HandoverError::Socket {
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let listener = Arc::new(listen_at(path, 4).map_err(err)?);
        let l = listener.clone();
        let shown = path.display().to_string();
        std::thread::Builder::new()
            .name("sluice-handover".into())
            .spawn(move || loop {
                let conn = match accept4(l.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
                    // SAFETY: accept4 returned a new descriptor we own.
                    Ok(c) => unsafe { OwnedFd::from_raw_fd(c) },
                    Err(nix::errno::Errno::EINTR | nix::errno::Errno::ECONNABORTED) => continue,
                    // Shut down (the agent drains or stops).
                    Err(_) => return,
                };
                match serve_successor(&conn, &listeners) {
                    Ok(()) => {
                        on_ready();
                        return;
                    }
                    Err(e) => tracing::warn!(socket = %shown, error = %e, "hand-over abandoned; this agent keeps serving"),
                }
            })
            .map_err(err)?;
        Ok(HandoverServer {
            listener,
            path: path.to_path_buf(),
        })
    }

    /// Where successors find this agent.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Take no more successors.
    pub fn stop(&self) {
        let _ = shutdown(self.listener.as_raw_fd(), Shutdown::Both);
    }
}

impl Drop for HandoverServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve_successor(
    conn: &OwnedFd,
    listeners: &impl Fn() -> Vec<OwnedFd>,
) -> Result<(), HandoverError> {
    let proto = |e: io::Error| HandoverError::Protocol(e.to_string());
    // Only the agent's own user (root) may take its sockets; the file's
    // mode says so too.
    let peer = getsockopt(conn, sockopt::PeerCredentials).map_err(|e| proto(e.into()))?;
    if peer.uid() != nix::unistd::geteuid().as_raw() {
        return Err(HandoverError::Protocol(format!(
            "refused a successor running as uid {}",
            peer.uid()
        )));
    }
    set_timeout(conn, STEP_TIMEOUT).map_err(proto)?;
    let (what, _) = recv(conn, 64).map_err(proto)?;
    if what != b"TAKEOVER" {
        return Err(HandoverError::Protocol(format!(
            "unexpected request {:?}",
            String::from_utf8_lossy(&what)
        )));
    }
    let fds = listeners();
    for chunk in fds.chunks(FDS_PER_MESSAGE) {
        let raw: Vec<RawFd> = chunk.iter().map(|f| f.as_fd().as_raw_fd()).collect();
        send(conn, b"FDS", &raw).map_err(proto)?;
    }
    send(conn, b"END", &[]).map_err(proto)?;
    tracing::info!(
        listeners = fds.len(),
        "handed the listening sockets to a successor; waiting until it serves"
    );
    drop(fds);
    set_timeout(conn, READY_TIMEOUT).map_err(proto)?;
    let (what, _) = recv(conn, 64).map_err(proto)?;
    if what != b"READY" {
        return Err(HandoverError::Protocol(if what.is_empty() {
            "the successor went away before it was ready".into()
        } else {
            format!("unexpected message {:?}", String::from_utf8_lossy(&what))
        }));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn listeners_cross_over_and_ready_is_reported() {
        let dir = std::env::temp_dir().join(format!("sluice-handover-{}", std::process::id()));
        let path = dir.join("h.sock");
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let dup = l.try_clone().unwrap();
        let not_listening = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let ready = Arc::new(AtomicBool::new(false));
        let r = ready.clone();
        let server = HandoverServer::start(
            &path,
            move || {
                vec![
                    OwnedFd::from(dup.try_clone().unwrap()),
                    OwnedFd::from(not_listening.try_clone().unwrap()),
                ]
            },
            move || r.store(true, Ordering::SeqCst),
        )
        .unwrap();
        let inherited = take_over(&path).unwrap();
        assert!(inherited.took_over());
        assert_eq!(inherited.pending(), 1, "the UDP socket is not adopted");
        let adopted = inherited.take(None, addr).expect("the listener crossed");
        // It is the same socket: a connection queued on it is accepted here.
        let _c = std::net::TcpStream::connect(addr).unwrap();
        adopted.set_nonblocking(false).unwrap();
        adopted.accept().unwrap();
        assert_eq!(inherited.finish(), 0);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !ready.load(Ordering::SeqCst) {
            assert!(std::time::Instant::now() < deadline, "READY not seen");
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(server);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn nobody_there_means_a_fresh_start() {
        let dir = std::env::temp_dir().join(format!("sluice-handover-none-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("h.sock");
        let none = take_over(&path).unwrap();
        assert!(!none.took_over());
        // A stale socket file from an agent that was killed.
        let stale = std::os::unix::net::UnixListener::bind(&path).unwrap();
        drop(stale);
        let none = take_over(&path).unwrap();
        assert!(!none.took_over());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
