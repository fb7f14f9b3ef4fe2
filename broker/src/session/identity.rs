//! Who is on the other end of a connection, from the kernel's point of view only: `SO_PEERCRED`
//! at accept, a pidfd taken at once (so a recycled pid cannot stand in for the peer), the
//! executable path and groups read through `/proc`, and a final check through the pidfd that
//! the process read is still the one that connected.

use std::{fs, os::fd::OwnedFd, path::PathBuf};

use rustix::{
    event::{PollFd, PollFlags, Timespec, poll},
    process::{Pid, PidfdFlags, pidfd_open},
};

/// The kernel's view of a connected task.
#[derive(Debug)]
pub struct PeerIdentity {
    /// Effective uid.
    pub uid: u32,
    /// Effective gid.
    pub gid: u32,
    /// Process id at connect time.
    pub pid: Option<i32>,
    /// Names of the primary and supplementary groups (numeric when a gid has no name).
    pub groups: Vec<String>,
    /// Executable path, when the broker may read it.
    pub exe: Option<String>,
    /// Held for the connection's life: the process identity the checks above refer to.
    _pidfd: Option<OwnedFd>,
}

/// Why a peer's identity could not be established; the connection is refused.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The socket gave no credentials.
    #[error("the peer's credentials are unavailable")]
    NoCredentials,
    /// The peer exited before its identity was read, so what was read may be another process's.
    #[error("process {0} exited while its identity was read")]
    Exited(i32),
    /// The pidfd could not be opened.
    #[error("pidfd for process {pid}: {source}")]
    Pidfd {
        /// The peer's pid.
        pid: i32,
        /// The OS error.
        source: rustix::io::Errno,
    },
}

impl PeerIdentity {
    /// Collects the identity of the peer with these `SO_PEERCRED` values.
    pub fn from_peer_cred(uid: u32, gid: u32, pid: Option<i32>) -> Result<PeerIdentity, IdentityError> {
        let Some(raw_pid) = pid.filter(|p| *p > 0) else {
            // A peer in another pid namespace has pid 0 here: uid and gid are still the kernel's.
            return Ok(PeerIdentity {
                uid,
                gid,
                pid: None,
                groups: group_names(gid, &[]),
                exe: None,
                _pidfd: None,
            });
        };
        let pid = Pid::from_raw(raw_pid).ok_or(IdentityError::NoCredentials)?;
        let pidfd =
            pidfd_open(pid, PidfdFlags::empty()).map_err(|source| IdentityError::Pidfd { pid: raw_pid, source })?;
        let proc_dir = PathBuf::from(format!("/proc/{raw_pid}"));
        let exe = fs::read_link(proc_dir.join("exe"))
            .ok()
            .and_then(|p| p.into_os_string().into_string().ok());
        let supplementary = fs::read_to_string(proc_dir.join("status"))
            .map(|s| parse_groups(&s))
            .unwrap_or_default();
        // A pidfd becomes readable when its process exits: if it has, the pid may have been
        // reused between accept and the reads above, so nothing read can be trusted.
        let mut fds = [PollFd::new(&pidfd, PollFlags::IN)];
        let zero = Timespec { tv_sec: 0, tv_nsec: 0 };
        if poll(&mut fds, Some(&zero)).unwrap_or(1) != 0 {
            return Err(IdentityError::Exited(raw_pid));
        }
        Ok(PeerIdentity {
            uid,
            gid,
            pid: Some(raw_pid),
            groups: group_names(gid, &supplementary),
            exe,
            _pidfd: Some(pidfd),
        })
    }

    /// For in-process callers (tests, benchmarks): this process's own identity.
    pub fn of_self() -> Result<PeerIdentity, IdentityError> {
        let uid = rustix::process::geteuid().as_raw();
        let gid = rustix::process::getegid().as_raw();
        PeerIdentity::from_peer_cred(uid, gid, Some(rustix::process::getpid().as_raw_nonzero().get()))
    }

    /// The policy's view of this task, speaking `abi`.
    pub fn task(&self, abi: portcullis_proto::layout::AbiId) -> portcullis_policy::Task<'_> {
        portcullis_policy::Task {
            uid: self.uid,
            gid: self.gid,
            groups: &self.groups,
            exe: self.exe.as_deref(),
            abi,
        }
    }
}

/// Supplementary gids from the `Groups:` line of `/proc/<pid>/status`.
fn parse_groups(status: &str) -> Vec<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| g.split_whitespace().filter_map(|n| n.parse().ok()).collect())
        .unwrap_or_default()
}

fn group_names(gid: u32, supplementary: &[u32]) -> Vec<String> {
    let mut gids = vec![gid];
    gids.extend(supplementary.iter().filter(|g| **g != gid));
    gids.into_iter()
        .map(|g| match nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(g)) {
            Ok(Some(group)) => group.name,
            _ => g.to_string(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_groups_reads_status_line() {
        assert_eq!(
            parse_groups("Name:\tx\nGroups:\t4 20 27 \nNSpid:\t1\n"),
            vec![4, 20, 27]
        );
        assert!(parse_groups("Groups:\n").is_empty());
    }

    #[test]
    fn identity_of_self_reads_exe_and_groups() {
        let me = PeerIdentity::of_self().unwrap();
        let exe = std::env::current_exe().unwrap();
        assert_eq!(me.exe.as_deref(), exe.to_str());
        assert!(!me.groups.is_empty());
    }

    #[test]
    fn identity_of_exited_process_is_refused() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        child.wait().unwrap();
        // The zombie is reaped, so either the pid is gone or (rarely) reused by another process,
        // which pidfd_open would then open: it must never be accepted as the child.
        match PeerIdentity::from_peer_cred(0, 0, Some(pid)) {
            Err(IdentityError::Pidfd { .. } | IdentityError::Exited(_)) => {}
            Ok(other) => assert_ne!(other.exe.as_deref(), Some("/usr/bin/true")),
            Err(e) => panic!("unexpected {e}"),
        }
    }
}
