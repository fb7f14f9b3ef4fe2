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
pub fn default_sigpipe() {
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

/// The number of threads this process has (`Threads:` of `/proc/self/status`).
pub(crate) fn thread_count() -> Option<usize> {
    self_status_number("Threads:")
}

/// The process's resident set size in bytes (`VmRSS:` of `/proc/self/status`, in KiB there).
pub(crate) fn resident_bytes() -> Option<u64> {
    self_status_number("VmRSS:").map(|kib| kib as u64 * 1024)
}

/// The number after `field` in `/proc/self/status` (a unit after it is ignored).
fn self_status_number(field: &str) -> Option<usize> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Forks the process, which must have one thread: `None` in the child, the child's pid in the
/// parent. Refused when another thread exists.
pub(crate) fn fork_single_threaded() -> std::io::Result<Option<rustix::process::Pid>> {
    if thread_count() != Some(1) {
        return Err(std::io::Error::other(
            "the process has more than one thread: it cannot fork safely",
        ));
    }
    // SAFETY: the process has one thread (checked just above, and nothing in between starts
    // one), so the child inherits no lock another thread held and may run any code: the
    // async-signal-safety restriction of `fork` concerns multi-threaded parents.
    match unsafe { nix::unistd::fork() }.map_err(std::io::Error::from)? {
        nix::unistd::ForkResult::Child => Ok(None),
        nix::unistd::ForkResult::Parent { child } => Ok(rustix::process::Pid::from_raw(child.as_raw())),
    }
}

/// Closes every descriptor but `keep` (the helper, just forked, keeps its socket and stdio).
pub(crate) fn close_fds_except(keep: &[std::os::fd::RawFd]) {
    let open: Vec<std::os::fd::RawFd> = std::fs::read_dir("/proc/self/fd")
        .map(|dir| {
            dir.flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
                .collect()
        })
        .unwrap_or_default();
    for fd in open.into_iter().filter(|fd| !keep.contains(fd)) {
        // SAFETY: run in the freshly forked helper, single-threaded, before it opens anything:
        // no `OwnedFd` it will use refers to these descriptors (the ones it inherited owned by
        // values it never touches again), so closing them ends nothing that is still used.
        // The directory's own descriptor, already closed, gives EBADF, which is ignored.
        unsafe {
            libc::close(fd);
        }
    }
}

/// Makes a system call the sandbox forbids (test-only builds): `Ok` if it was allowed.
#[cfg(feature = "fault-injection")]
pub(crate) fn forbidden_call(call: crate::sandbox::protocol::Forbidden) -> std::io::Result<()> {
    use crate::sandbox::protocol::Forbidden;
    let rc = match call {
        Forbidden::Execve => {
            let path = c"/bin/true";
            let argv = [path.as_ptr(), std::ptr::null()];
            let envp = [std::ptr::null::<libc::c_char>()];
            // SAFETY: a NUL-terminated path and NULL-terminated argument and environment
            // vectors that outlive the call; if the filter allowed it, the process becomes
            // /bin/true, which is what the test checks for.
            unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) }
        }
        // SAFETY: PTRACE_ATTACH takes a pid and ignores the address and data pointers.
        Forbidden::Ptrace => {
            (unsafe {
                libc::ptrace(
                    libc::PTRACE_ATTACH,
                    1,
                    std::ptr::null_mut::<libc::c_void>(),
                    std::ptr::null_mut::<libc::c_void>(),
                )
            }) as i32
        }
        Forbidden::Mount => {
            let (source, target, fs) = (c"none", c"/tmp", c"tmpfs");
            // SAFETY: NUL-terminated strings that outlive the call, and no data.
            unsafe { libc::mount(source.as_ptr(), target.as_ptr(), fs.as_ptr(), 0, std::ptr::null()) }
        }
        Forbidden::SocketInet => {
            return rustix::net::socket(rustix::net::AddressFamily::INET, rustix::net::SocketType::STREAM, None)
                .map(drop)
                .map_err(std::io::Error::from);
        }
    };
    if rc == -1 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Ignores the signals that stop a process (`SIGTERM`, `SIGINT`, `SIGHUP`): the helper gets them
/// with its whole control group from a service manager (or a terminal), and stops instead when
/// the serving process does — after it, never before.
pub(crate) fn ignore_stop_signals() {
    for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: SIG_IGN installs no handler code; `signal` with a valid signal number and
        // SIG_IGN has no memory-safety preconditions.
        unsafe {
            libc::signal(signal, libc::SIG_IGN);
        }
    }
}

/// Puts the calling thread at idle priority (`SCHED_IDLE`): it runs only when no other thread
/// wants the CPU. Lowering one's own priority needs no privilege.
pub(crate) fn idle_priority() -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid, initialised `sched_param` that outlives the call; pid 0 is
    // the calling thread.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Raises this process's descriptor limit as far as it may go: to the kernel's `nr_open`, at
/// most 2^20 (root raises the hard limit; anyone may raise the soft one to the hard). Every
/// connection holds a descriptor and every ring four more, so the default soft limit (1,024)
/// would cap a broker at a few hundred rings. Returns the soft limit now in force.
pub fn raise_descriptor_limit() -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|text| text.trim().parse::<u64>().ok())
        .unwrap_or(1 << 20)
        .min(1 << 20);
    let now = getrlimit(Resource::Nofile);
    let hard = now.maximum.unwrap_or(u64::MAX);
    let raised = |current, maximum| setrlimit(Resource::Nofile, Rlimit { current, maximum }).is_ok();
    if !(hard < ceiling && raised(Some(ceiling), Some(ceiling))) {
        let target = ceiling.min(hard);
        if now.current.is_some_and(|current| current < target) {
            raised(Some(target), now.maximum);
        }
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// Bytes the allocator has handed out and not had back (glibc's `mallinfo2`), 0 where
/// unknown.
pub fn heap_in_use() -> u64 {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: `mallinfo2` takes nothing and returns the allocator's counters by value.
        let info = unsafe { libc::mallinfo2() };
        info.uordblks as u64
    }
    #[cfg(not(target_env = "gnu"))]
    {
        0
    }
}

/// Keeps every thread on the allocator's main arena (glibc makes up to eight arenas per CPU):
/// memory freed on one runtime thread then serves the others, and `malloc_trim` hands it back,
/// instead of staying resident in an arena of its own, which is what kept a reloaded policy's
/// old rules resident (4.5 KiB per rule after 10 reloads with an arena per thread, 3.0 with
/// one). Each thread's cache still takes the small allocations of the call path without a lock.
pub(crate) fn limit_allocator_arenas() {
    #[cfg(target_env = "gnu")]
    // SAFETY: `mallopt` takes two integers and only sets an allocator parameter, before the
    // process has other threads.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Hands the allocator's free memory back to the kernel (glibc's `malloc_trim`, which walks
/// every arena). Freed memory otherwise stays resident: after a policy reload (the old
/// policy's rules), or after thousands of sessions closed.
pub(crate) fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: `malloc_trim` takes no pointer; it only walks the allocator's own free lists,
    // under the allocator's locks.
    unsafe {
        libc::malloc_trim(0);
    }
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
