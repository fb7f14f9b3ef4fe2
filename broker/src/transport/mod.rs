//! Transports: decode a client's bytes, call the session core, encode the answer. No policy or
//! driver logic lives here.

pub mod grpc;
pub mod native;

use std::{io, os::fd::AsFd, os::unix::fs::PermissionsExt, path::Path};

use crate::session::{Core, PeerIdentity};

/// A local peer's `SO_PEERCRED`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Cred {
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) pid: Option<i32>,
}

/// Reads a local peer's identity: the LSM label from the socket, then (on a blocking thread)
/// what `/proc` says. The executable is hashed only while the policy names an `exe_sha256`,
/// and only as many at once for one uid as the limits allow (the others wait their turn).
pub(crate) async fn identify(core: &Core, socket: &impl AsFd, cred: Cred) -> Result<PeerIdentity, String> {
    let peersec = crate::sys::peer_security_label(socket.as_fd())
        .inspect_err(|e| tracing::debug!(error = %e, "SO_PEERSEC unavailable"))
        .ok()
        .flatten();
    let options = core.identity_options();
    let _hashing = match options.hash_exe {
        Some(_) => {
            let account = core
                .accounts()
                .account(crate::session::accounts::AccountKey::Uid(cred.uid));
            Some(account.hashing_slot().await)
        }
        None => None,
    };
    tokio::task::spawn_blocking(move || PeerIdentity::from_peer_cred(cred.uid, cred.gid, cred.pid, peersec, options))
        .await
        .map_err(|e| format!("identity task failed: {e}"))?
        .map_err(|e| e.to_string())
}

/// Makes `path` free for a new socket: a stale file left by a dead broker is removed; a socket a
/// live broker still serves is an error.
fn claim_socket_path(path: &Path) -> io::Result<()> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok()
            || tokio_seqpacket::UnixSeqpacket::connect_blocking(path).is_ok()
        {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                "another broker is serving this socket",
            ));
        }
        std::fs::remove_file(path)?;
    }
    Ok(())
}

/// Binds a Unix socket of `kind` at `path` (a stale file of a dead broker replaced), open to
/// every user, not yet listening: a root broker binds before its serving process gives up root
/// (which may not write the run dir), and listens once it is confined, so that nothing connects
/// before the sandbox is in place.
pub fn bind_unix(path: &Path, kind: rustix::net::SocketType) -> io::Result<std::os::fd::OwnedFd> {
    claim_socket_path(path)?;
    let fd = rustix::net::socket_with(
        rustix::net::AddressFamily::UNIX,
        kind,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )?;
    let addr = rustix::net::SocketAddrUnix::new(path)?;
    rustix::net::bind(&fd, &addr)?;
    open_to_all(path)?;
    Ok(fd)
}

/// Starts listening on a socket [`bind_unix`] bound.
pub fn listen(fd: &std::os::fd::OwnedFd) -> io::Result<()> {
    rustix::net::listen(fd, 1024).map_err(io::Error::from)
}

/// Lets every local user connect: the policy, not file modes, is the gate.
fn open_to_all(path: &Path) -> io::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
}

#[cfg(test)]
mod tests {
    fn future_size_1<A, F>(_: impl FnOnce(A) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    fn future_size_3<A, B, C, F>(_: impl FnOnce(A, B, C) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// A session's task lasts as long as the session, and its size is that of the largest state
    /// its future can be in, which every idle session pays for: the handshake, the goodbye, the
    /// shutdown and a session being built must not be part of it. Before they were boxed, the
    /// gRPC session's future was 3,088 bytes and the native connection's 3,056.
    #[test]
    fn a_session_task_keeps_no_room_for_what_only_opening_or_closing_needs() {
        let grpc = future_size_1(super::grpc::run_session);
        assert!(grpc <= 1024, "a gRPC session's future is {grpc} bytes");
        let native = future_size_3(super::native::connection);
        assert!(native <= 1280, "a native connection's future is {native} bytes");
    }
}
