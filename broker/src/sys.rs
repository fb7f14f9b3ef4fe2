//! The broker's unsafe code outside the drivers' own `sys` modules (which hold their ioctls):
//! system calls and registrations that no safe wrapper offers.
//!
//! - `getsockopt(SO_PEERSEC)`: the LSM label (SELinux context, AppArmor profile) the kernel
//!   recorded for the peer of a Unix socket when it connected. Neither rustix nor nix exposes it.
//! - Registering a descriptor with tokio's reactor (`AsyncFd::register`, unsafe since the
//!   caller vouches for the descriptor's lifetime).
//! - Restoring `SIGPIPE`'s default action for the command-line tools (Rust ignores it, so a
//!   closed pipe becomes a write error that `println!` turns into a panic).
//! - Taking the listening sockets systemd passes (socket activation): descriptors that arrive
//!   as numbers, and an environment cleared before any thread exists.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

/// Devices are registered with the broker's runtime: refused outside one.
fn in_runtime() -> std::io::Result<()> {
    match tokio::runtime::Handle::try_current() {
        Ok(_) => Ok(()),
        Err(_) => Err(std::io::Error::other(
            "a device needs the broker's runtime to be opened",
        )),
    }
}

/// A descriptor shared with code that reads and writes it directly, registered with the tokio
/// reactor for as long as the returned `AsyncFd` lives (dropping it deregisters the descriptor;
/// the descriptor stays open while any `Arc` holds it). Refused outside a runtime.
pub(crate) fn async_fd_shared(
    fd: std::sync::Arc<OwnedFd>,
    interest: tokio::io::Interest,
) -> std::io::Result<tokio::io::unix::AsyncFd<std::sync::Arc<OwnedFd>>> {
    in_runtime()?;
    // SAFETY: the `AsyncFd` holds an `Arc` of the `OwnedFd`, so the descriptor stays open and
    // refers to the same file for the `AsyncFd`'s whole life; `as_raw_fd` always returns it.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, interest) }.map_err(std::io::Error::from)
}

/// A descriptor the driver owns, registered with the tokio reactor for readiness; refused
/// outside a runtime.
pub(crate) fn async_fd(fd: OwnedFd) -> std::io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    in_runtime()?;
    // SAFETY: an `OwnedFd` is an open descriptor that it alone closes, on drop; the `AsyncFd`
    // owns it for its whole life, and `as_raw_fd` always returns that same descriptor.
    unsafe { tokio::io::unix::AsyncFd::register(fd) }.map_err(std::io::Error::from)
}

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

/// Gives `SIGPIPE` back its default action, for a command whose output goes to a pipe that may
/// close early (`portcullis schema --json | head`): the process then ends quietly, as other
/// Unix tools do, instead of panicking in `println!`. Never for the broker, which must survive
/// a client that goes away (it writes to sockets with `MSG_NOSIGNAL` or handles `EPIPE`).
pub(crate) fn default_sigpipe() {
    // SAFETY: `signal` with `SIG_DFL` installs no handler (no code runs on the signal), and it
    // is called once at start, before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// The listening sockets a service manager passed (systemd socket activation: `LISTEN_FDS`,
/// `LISTEN_PID`, `LISTEN_FDNAMES`), taken once and the variables cleared so that no child
/// inherits them. Must run before any thread exists (it changes the environment): the broker
/// calls it from `main`, before the runtime starts.
pub(crate) fn take_activated_sockets() -> std::io::Result<Vec<(OwnedFd, String)>> {
    use std::os::fd::FromRawFd;
    // SAFETY: called from the command line's `main` path before the tokio runtime (or any
    // other thread) is started, so no thread reads the environment while it is changed.
    let fds = unsafe { sd_notify::listen_fds_with_names_and_unset_env() }?;
    Ok(fds
        .map(|(fd, name)| {
            // SAFETY: the service manager passed these descriptors to this process (LISTEN_PID
            // is ours), numbered from 3; each is taken exactly once, here, and owned from now on.
            (unsafe { OwnedFd::from_raw_fd(fd) }, name)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use std::os::{fd::AsFd, unix::net::UnixStream};

    use super::*;

    #[test]
    fn peersec_agrees_with_proc_or_identity_falls_back_to_proc() {
        use crate::session::{IdentityOptions, PeerIdentity};
        let (a, _b) = UnixStream::pair().unwrap();
        let from_socket = peer_security_label(a.as_fd()).expect("SO_PEERSEC on a connected Unix socket");
        let from_proc = std::fs::read("/proc/self/attr/current")
            .ok()
            .and_then(|raw| crate::session::parse_label(&raw));
        let me = |peersec| {
            let pid = i32::try_from(std::process::id()).unwrap();
            PeerIdentity::from_peer_cred(0, 0, Some(pid), peersec, IdentityOptions::default()).unwrap()
        };
        match from_socket {
            // An LSM that labels sockets names this process both ways.
            Some(label) => assert_eq!(Some(label), from_proc),
            None => {
                // No socket label (ENOPROTOOPT): the identity takes the label from /proc.
                assert_eq!(me(None).lsm_label, from_proc);
                if from_proc.is_none() {
                    eprintln!("no LSM labels processes on this kernel: the SO_PEERSEC comparison is skipped");
                }
            }
        }
        // A label from the socket wins over /proc's: it was taken when the peer connected.
        assert_eq!(
            me(Some("from_socket_t".into())).lsm_label.as_deref(),
            Some("from_socket_t")
        );
    }

    #[test]
    fn peersec_on_a_non_socket_is_none() {
        let file = std::fs::File::open("/proc/self/status").unwrap();
        let error = peer_security_label(file.as_fd()).unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::ENOTSOCK));
    }
}
