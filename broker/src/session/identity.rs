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
    /// SHA-256 of the executable's contents, lowercase hex.
    pub exe_sha256: Option<String>,
    /// The cgroup (v2) path.
    pub cgroup: Option<String>,
    /// The LSM label (AppArmor profile, SELinux context), where an LSM provides one.
    pub lsm_label: Option<String>,
    /// For a TCP client: its verified TLS client certificate's identity (and then no uid, gid,
    /// groups or process attributes count: they are not the kernel's).
    pub tls: Option<TlsPeer>,
    /// Held for the connection's life: the process identity the checks above refer to.
    _pidfd: Option<OwnedFd>,
}

/// The identity a verified TLS client certificate carries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsPeer {
    /// Subject alternative names of type URI.
    pub san_uri: Vec<String>,
    /// Subject alternative names of type DNS.
    pub san_dns: Vec<String>,
    /// The subject's common name.
    pub subject_cn: Option<String>,
}

impl TlsPeer {
    /// Reads the identity from a DER certificate (already verified by the TLS handshake against
    /// the configured client CA).
    pub fn from_der(der: &[u8]) -> Result<TlsPeer, String> {
        use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| format!("client certificate: {e}"))?;
        let mut peer = TlsPeer {
            subject_cn: cert
                .subject()
                .iter_common_name()
                .next()
                .and_then(|cn| cn.as_str().ok())
                .map(String::from),
            ..TlsPeer::default()
        };
        if let Some(san) = cert
            .subject_alternative_name()
            .map_err(|e| format!("client certificate SAN: {e}"))?
        {
            for name in &san.value.general_names {
                match name {
                    GeneralName::URI(u) => peer.san_uri.push((*u).to_string()),
                    GeneralName::DNSName(d) => peer.san_dns.push((*d).to_string()),
                    _ => {}
                }
            }
        }
        Ok(peer)
    }
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
    /// Collects the identity of the peer with these `SO_PEERCRED` values and, where the
    /// kernel provides it, the `SO_PEERSEC` label (else the label is read from `/proc`).
    pub fn from_peer_cred(
        uid: u32,
        gid: u32,
        pid: Option<i32>,
        peersec: Option<String>,
    ) -> Result<PeerIdentity, IdentityError> {
        let Some(raw_pid) = pid.filter(|p| *p > 0) else {
            // A peer in another pid namespace has pid 0 here: uid and gid are still the kernel's.
            return Ok(PeerIdentity {
                uid,
                gid,
                pid: None,
                groups: group_names(gid, &[]),
                exe: None,
                exe_sha256: None,
                cgroup: None,
                lsm_label: peersec,
                tls: None,
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
        let exe_sha256 = exe_hash(&proc_dir.join("exe"));
        let cgroup = fs::read_to_string(proc_dir.join("cgroup"))
            .ok()
            .and_then(|s| parse_cgroup(&s));
        let lsm_label = peersec.or_else(|| {
            fs::read(proc_dir.join("attr/current"))
                .ok()
                .and_then(|raw| parse_label(&raw))
        });
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
            exe_sha256,
            cgroup,
            lsm_label,
            tls: None,
            _pidfd: Some(pidfd),
        })
    }

    /// For in-process callers (tests, benchmarks): this process's own identity.
    pub fn of_self() -> Result<PeerIdentity, IdentityError> {
        let uid = rustix::process::geteuid().as_raw();
        let gid = rustix::process::getegid().as_raw();
        PeerIdentity::from_peer_cred(uid, gid, Some(rustix::process::getpid().as_raw_nonzero().get()), None)
    }

    /// A TCP client known by its certificate alone.
    pub fn remote(tls: TlsPeer) -> PeerIdentity {
        PeerIdentity {
            uid: u32::MAX,
            gid: u32::MAX,
            pid: None,
            groups: Vec::new(),
            exe: None,
            exe_sha256: None,
            cgroup: None,
            lsm_label: None,
            tls: Some(tls),
            _pidfd: None,
        }
    }

    /// The policy's view of this task, speaking `abi`.
    pub fn task(&self, abi: portcullis_proto::layout::AbiId) -> portcullis_policy::Task<'_> {
        portcullis_policy::Task {
            uid: self.uid,
            gid: self.gid,
            groups: &self.groups,
            exe: self.exe.as_deref(),
            abi,
            exe_sha256: self.exe_sha256.as_deref(),
            cgroup: self.cgroup.as_deref(),
            lsm_label: self.lsm_label.as_deref(),
            remote: self.tls.as_ref().map(|t| portcullis_policy::Remote {
                san_uri: &t.san_uri,
                san_dns: &t.san_dns,
                subject_cn: t.subject_cn.as_deref(),
            }),
        }
    }
}

/// The cgroup v2 path from `/proc/<pid>/cgroup` (its `0::` line).
fn parse_cgroup(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim().to_string())
}

/// The label in `/proc/<pid>/attr/current`, without its trailing NUL or newline.
pub(crate) fn parse_label(raw: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(raw);
    let label = text.trim_end_matches(['\0', '\n']).trim();
    (!label.is_empty()).then(|| label.to_string())
}

/// Cached hashes, by the executable's device, inode, size and modification time.
type HashCache = std::collections::HashMap<(u64, u64, i64, i64, i64), String>;
static EXE_HASHES: std::sync::Mutex<Option<HashCache>> = std::sync::Mutex::new(None);

/// Most executables whose hash is remembered.
const EXE_HASH_CACHE: usize = 256;

/// SHA-256 of the file the `exe` link of a process points to (opened through the link, so a
/// deleted or replaced binary is still the one running), cached by inode and mtime.
fn exe_hash(link: &std::path::Path) -> Option<String> {
    use std::{io::Read, os::unix::fs::MetadataExt};

    use sha2::{Digest, Sha256};
    let mut file = fs::File::open(link).ok()?;
    let meta = file.metadata().ok()?;
    let key = (
        meta.dev(),
        meta.ino(),
        meta.size() as i64,
        meta.mtime(),
        meta.mtime_nsec(),
    );
    if let Some(hit) = EXE_HASHES.lock().ok()?.as_ref().and_then(|c| c.get(&key)).cloned() {
        return Some(hit);
    }
    let mut hasher = Sha256::new();
    let mut chunk = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut chunk).ok()?;
        if n == 0 {
            break;
        }
        hasher.update(chunk.get(..n)?);
    }
    let hex: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    let mut cache = EXE_HASHES.lock().ok()?;
    let cache = cache.get_or_insert_with(HashCache::new);
    if cache.len() >= EXE_HASH_CACHE {
        cache.clear();
    }
    cache.insert(key, hex.clone());
    Some(hex)
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
    fn identity_of_self_reads_exe_hash_groups_and_cgroup() {
        use sha2::{Digest, Sha256};
        let me = PeerIdentity::of_self().unwrap();
        let exe = std::env::current_exe().unwrap();
        assert_eq!(me.exe.as_deref(), exe.to_str());
        assert!(!me.groups.is_empty());
        let expected: String = Sha256::digest(std::fs::read(&exe).unwrap())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(me.exe_sha256.as_deref(), Some(expected.as_str()));
        assert!(
            me.cgroup.as_deref().is_some_and(|c| c.starts_with('/')),
            "{:?}",
            me.cgroup
        );
    }

    #[test]
    fn parse_cgroup_and_label() {
        assert_eq!(
            parse_cgroup("12:pids:/x\n0::/user.slice/app.scope\n").as_deref(),
            Some("/user.slice/app.scope")
        );
        assert_eq!(parse_cgroup("12:pids:/x\n"), None);
        assert_eq!(parse_label(b"unconfined\n").as_deref(), Some("unconfined"));
        assert_eq!(
            parse_label(b"system_u:system_r:app_t:s0\0").as_deref(),
            Some("system_u:system_r:app_t:s0")
        );
        assert_eq!(parse_label(b"\0"), None);
    }

    #[test]
    fn identity_of_exited_process_is_refused() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        child.wait().unwrap();
        // The zombie is reaped, so either the pid is gone or (rarely) reused by another process,
        // which pidfd_open would then open: it must never be accepted as the child.
        match PeerIdentity::from_peer_cred(0, 0, Some(pid), None) {
            Err(IdentityError::Pidfd { .. } | IdentityError::Exited(_)) => {}
            Ok(other) => assert_ne!(other.exe.as_deref(), Some("/usr/bin/true")),
            Err(e) => panic!("unexpected {e}"),
        }
    }
}
