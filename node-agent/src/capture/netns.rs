//! Network namespaces: run a closure inside a pod's namespace (to create its
//! sockets there, as ztunnel's in-pod mode does), and read a socket's
//! namespace cookie (the key the eBPF programs use).

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

use nix::sched::{setns, CloneFlags};

/// `SO_NETNS_COOKIE` (Linux 5.14+).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// An open network namespace.
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: PathBuf,
    cookie: u64,
}

impl Netns {
    /// Open a namespace by path, or by name under `/var/run/netns`.
    pub fn open(name_or_path: &str) -> io::Result<Netns> {
        let path = if name_or_path.contains('/') {
            PathBuf::from(name_or_path)
        } else {
            Path::new("/var/run/netns").join(name_or_path)
        };
        let file = File::open(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        Self::from_file(file, &path.display().to_string())
    }

    /// A namespace already open (handed over by the CNI plugin); `path`
    /// names it.
    pub fn from_file(file: File, path: &str) -> io::Result<Netns> {
        let mut ns = Netns {
            file,
            path: PathBuf::from(path),
            cookie: 0,
        };
        ns.cookie = ns.run(|| {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            netns_cookie(&s)
        })??;
        Ok(ns)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The namespace's cookie, as `bpf_get_netns_cookie` reports it.
    pub fn cookie(&self) -> u64 {
        self.cookie
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Run `f` on this thread inside the namespace, then switch back. `f`
    /// must not block on anything that needs this thread to be elsewhere
    /// (no `.await`): sockets created inside stay in the namespace.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> io::Result<T> {
        let home = File::open("/proc/thread-self/ns/net")?;
        setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        let out = f();
        // A thread left in a pod's namespace would silently put later
        // sockets there: that is not recoverable.
        setns(home.as_fd(), CloneFlags::CLONE_NEWNET)
            .expect("returning to the agent's network namespace");
        Ok(out)
    }
}

/// The namespace cookie of a socket.
pub fn netns_cookie(sock: &impl AsRawFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, a correctly sized out-buffer and its length.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}
