//! Transports: decode a client's bytes, call the session core, encode the answer. No policy or
//! driver logic lives here.

pub mod grpc;
pub mod native;

use std::{io, os::unix::fs::PermissionsExt, path::Path};

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

/// Lets every local user connect: the policy, not file modes, is the gate.
fn open_to_all(path: &Path) -> io::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
}
