//! The broker's only unsafe code: system calls that no safe wrapper crate offers yet.
//!
//! - `getsockopt(SO_PEERSEC)`: the LSM label (SELinux context, AppArmor profile) the kernel
//!   recorded for the peer of a Unix socket when it connected. Neither rustix nor nix exposes it.

use std::os::fd::{AsRawFd, BorrowedFd};

/// Longest label read (the kernel's own limit is a page).
const MAX_LABEL: usize = 4096;

/// The peer's LSM label from `SO_PEERSEC`; `Ok(None)` when no LSM provides one (the kernel says
/// `ENOPROTOOPT`).
pub(crate) fn peer_security_label(fd: BorrowedFd<'_>) -> std::io::Result<Option<String>> {
    let mut buf = vec![0u8; MAX_LABEL];
    let mut len = libc::socklen_t::try_from(buf.len()).map_err(std::io::Error::other)?;
    // SAFETY: `buf` is valid for writes of `len` bytes and outlives the call; `len` is a valid,
    // initialised socklen_t the kernel updates; `fd` is a borrowed, open descriptor.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERSEC,
            buf.as_mut_ptr().cast::<libc::c_void>(),
            &mut len,
        )
    };
    if rc != 0 {
        let error = std::io::Error::last_os_error();
        return match error.raw_os_error() {
            Some(libc::ENOPROTOOPT) => Ok(None),
            _ => Err(error),
        };
    }
    buf.truncate(usize::try_from(len).map_err(std::io::Error::other)?.min(MAX_LABEL));
    Ok(crate::session::parse_label(&buf))
}

#[cfg(test)]
mod tests {
    use std::os::{fd::AsFd, unix::net::UnixStream};

    use super::*;

    #[test]
    fn peersec_agrees_with_proc_when_the_kernel_provides_it() {
        let (a, _b) = UnixStream::pair().unwrap();
        let from_socket = peer_security_label(a.as_fd()).expect("SO_PEERSEC on a connected Unix socket");
        let from_proc = std::fs::read("/proc/self/attr/current")
            .ok()
            .and_then(|raw| crate::session::parse_label(&raw));
        // Where an LSM labels sockets, both name this process; where none does, SO_PEERSEC
        // says so (ENOPROTOOPT, `Ok(None)`) and the broker falls back to /proc.
        if from_socket.is_some() {
            assert_eq!(from_socket, from_proc);
        }
    }

    #[test]
    fn peersec_on_a_non_socket_is_none() {
        let file = std::fs::File::open("/proc/self/status").unwrap();
        let error = peer_security_label(file.as_fd()).unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::ENOTSOCK));
    }
}
