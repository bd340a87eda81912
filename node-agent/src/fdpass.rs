//! Messages with file descriptors over Unix sockets (`SCM_RIGHTS`): how a
//! running agent hands its listeners to its successor, and how the CNI
//! plugin hands a new pod's network namespace to the agent.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::Duration;

use nix::sys::socket::{
    bind, connect, listen, recvmsg, sendmsg, setsockopt, socket, sockopt, AddressFamily, Backlog,
    ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr,
};

/// The most descriptors one message may carry.
pub const FDS_PER_MESSAGE: usize = 64;

/// A new `SOCK_SEQPACKET` Unix socket: one `send` is one message.
pub fn seqpacket() -> io::Result<OwnedFd> {
    socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io::Error::from)
}

/// A `SOCK_SEQPACKET` socket listening at `path`, for the agent's own user
/// only (mode 0600), replacing whatever file is there (a stale socket, or
/// the predecessor's, which no longer needs the name).
pub fn listen_at(path: &Path, backlog: i32) -> io::Result<OwnedFd> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let fd = seqpacket()?;
    bind(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    listen(&fd, Backlog::new(backlog)?)?;
    Ok(fd)
}

/// A `SOCK_SEQPACKET` socket connected to the listener at `path` (the
/// error keeps its errno: `ENOENT`/`ECONNREFUSED` mean nobody listens).
pub fn connect_to(path: &Path) -> io::Result<OwnedFd> {
    let fd = seqpacket()?;
    connect(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    Ok(fd)
}

/// Bound every send and receive on `fd` by `t`.
pub fn set_timeout(fd: &OwnedFd, t: Duration) -> io::Result<()> {
    let tv = nix::sys::time::TimeVal::new(t.as_secs() as _, t.subsec_micros() as _);
    setsockopt(fd, sockopt::ReceiveTimeout, &tv)?;
    setsockopt(fd, sockopt::SendTimeout, &tv)?;
    Ok(())
}

/// Send one message carrying `fds`.
pub fn send(fd: &OwnedFd, what: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let iov = [IoSlice::new(what)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    sendmsg::<()>(fd.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None)?;
    Ok(())
}

/// One message of at most `max` bytes: its bytes and the descriptors it
/// carried (owned from here, so none leaks whatever the message turns out
/// to be). A longer message is an error, not silently cut.
pub fn recv(fd: &OwnedFd, max: usize) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut buf = vec![0u8; max];
    let mut space = nix::cmsg_space!([RawFd; FDS_PER_MESSAGE]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(
        fd.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            // SAFETY: the kernel just installed these descriptors for us;
            // nothing else owns them.
            fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
        }
    }
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(io::Error::other("more descriptors than announced"));
    }
    if msg.flags.contains(MsgFlags::MSG_TRUNC) {
        return Err(io::Error::other(format!("a message over {max} bytes")));
    }
    let n = msg.bytes;
    buf.truncate(n);
    Ok((buf, fds))
}
