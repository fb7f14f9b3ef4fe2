//! Who is on the other end of a connection, from the kernel's point of view only: `SO_PEERCRED`
//! at accept, a pidfd taken at once (so a recycled pid cannot stand in for the peer), the
//! executable, groups, cgroup and label read through `/proc`, and a final check through the
//! pidfd that the process read is still the one that connected.
//!
//! What the executable proves, and what it does not (docs/POLICY.md says the same to policy
//! authors): a process of some uid can make itself run any program that uid can run
//! (`LD_PRELOAD`, `ptrace`, or connecting and then `exec`ing an allowed program while a child
//! keeps the socket). An executable identifies a program only where the uid it runs under is one
//! the attacker cannot use. Within that, the broker makes the executable as hard to fake as it
//! can be:
//! - the program is the file `/proc/<pid>/exe` refers to, known by **device and inode**; a path
//!   counts only when the same path, looked up in the broker's own mount namespace, is that very
//!   file (a bind mount over an allowed path in a private mount namespace is another file);
//! - the identity is read when the connection is accepted and re-checked at every admission: a
//!   session whose process has exited or become another program since it connected is refused;
//! - the executable is hashed only while the policy names an `exe_sha256`, only up to a size
//!   limit, a bounded number at once per uid, and each file once (cached by device, inode, size
//!   and change time).

use std::{
    collections::HashMap,
    fs,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::PathBuf,
    sync::{Arc, Mutex, OnceLock, Weak},
};

use rustix::{
    event::{PollFd, PollFlags, Timespec, poll},
    process::{Pid, PidfdFlags, pidfd_open},
};

/// A file as the kernel knows it, whatever path reaches it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileId {
    /// Device number.
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
}

/// How to hash the peer's executable, when the policy asks for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExeHashing {
    /// Larger executables are not hashed (they match no `exe_sha256`; the log says why).
    pub max_bytes: u64,
}

/// What to read of a peer at accept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IdentityOptions {
    /// Hash the executable (`None`: the policy names no `exe_sha256`, so nothing is hashed).
    pub hash_exe: Option<ExeHashing>,
}

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
    /// The executable's path as the process's own mount namespace shows it (`/proc/<pid>/exe`):
    /// for logs. Policy sees it only through [`crate::session::Core`], which checks that the
    /// broker's own view of the path is the same file ([`PeerIdentity::program`]).
    pub exe: Option<String>,
    /// The executable the process ran when it connected (device and inode), when the broker
    /// may read it.
    pub program: Option<FileId>,
    /// SHA-256 of the executable's contents, lowercase hex (only while the policy uses it).
    pub exe_sha256: Option<String>,
    /// The cgroup (v2) path.
    pub cgroup: Option<String>,
    /// The LSM label (AppArmor profile, SELinux context), where an LSM provides one.
    pub lsm_label: Option<String>,
    /// For a TCP client: its verified TLS client certificate's identity (and then no uid, gid,
    /// groups or process attributes count: they are not the kernel's).
    pub tls: Option<TlsPeer>,
    /// Held for the connection's life: the process identity the checks above refer to. One
    /// descriptor per process, whatever number of connections it holds ([`held_pidfd`]).
    pidfd: Option<Arc<OwnedFd>>,
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

/// Why a peer's identity could not be established (the connection is refused), or no longer
/// holds (the session is refused).
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The socket gave no credentials.
    #[error("the peer's credentials are unavailable")]
    NoCredentials,
    /// The peer exited: what was read, or would be read now, may be another process's.
    #[error("process {0} that connected has exited, so its identity cannot be checked")]
    Exited(i32),
    /// The peer runs another program than when it connected (it called `exec`).
    #[error("process {0} has become another program since it connected")]
    Changed(i32),
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
        options: IdentityOptions,
    ) -> Result<PeerIdentity, IdentityError> {
        let Some(raw_pid) = pid.filter(|p| *p > 0) else {
            // A peer in another pid namespace has pid 0 here: uid and gid are still the kernel's.
            return Ok(PeerIdentity {
                uid,
                gid,
                pid: None,
                groups: group_names(gid, &[]),
                exe: None,
                program: None,
                exe_sha256: None,
                cgroup: None,
                lsm_label: peersec,
                tls: None,
                pidfd: None,
            });
        };
        let pid = Pid::from_raw(raw_pid).ok_or(IdentityError::NoCredentials)?;
        let pidfd =
            pidfd_open(pid, PidfdFlags::empty()).map_err(|source| IdentityError::Pidfd { pid: raw_pid, source })?;
        let proc_dir = PathBuf::from(format!("/proc/{raw_pid}"));
        let (exe, program, exe_sha256) = read_program(pidfd.as_fd(), raw_pid, options.hash_exe);
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
        if exited(&pidfd) {
            return Err(IdentityError::Exited(raw_pid));
        }
        Ok(PeerIdentity {
            uid,
            gid,
            pid: Some(raw_pid),
            groups: group_names(gid, &supplementary),
            exe,
            program,
            exe_sha256,
            cgroup,
            lsm_label,
            tls: None,
            pidfd: Some(held_pidfd(pidfd)),
        })
    }

    /// For in-process callers (tests, benchmarks): this process's own identity, executable
    /// hashed.
    pub fn of_self() -> Result<PeerIdentity, IdentityError> {
        let uid = rustix::process::geteuid().as_raw();
        let gid = rustix::process::getegid().as_raw();
        let options = IdentityOptions {
            hash_exe: Some(ExeHashing { max_bytes: u64::MAX }),
        };
        PeerIdentity::from_peer_cred(
            uid,
            gid,
            Some(rustix::process::getpid().as_raw_nonzero().get()),
            None,
            options,
        )
    }

    /// A TCP client known by its certificate alone.
    pub fn remote(tls: TlsPeer) -> PeerIdentity {
        PeerIdentity {
            uid: u32::MAX,
            gid: u32::MAX,
            pid: None,
            groups: Vec::new(),
            exe: None,
            program: None,
            exe_sha256: None,
            cgroup: None,
            lsm_label: None,
            tls: Some(tls),
            pidfd: None,
        }
    }

    /// Checks that the process that connected is still alive and still runs the program it
    /// ran then. A peer with no process to check (a TCP client, or one in another pid
    /// namespace) passes.
    pub fn verify_unchanged(&self) -> Result<(), IdentityError> {
        let (Some(pid), Some(pidfd)) = (self.pid, self.pidfd.as_ref()) else {
            return Ok(());
        };
        let (_, now, _) = read_program(pidfd.as_fd(), pid, None);
        // Read first, then check the process is still the one that connected: while its pidfd
        // is not readable, the pid has not been reused, so what was read is its own.
        if exited(pidfd) {
            return Err(IdentityError::Exited(pid));
        }
        if now != self.program {
            return Err(IdentityError::Changed(pid));
        }
        Ok(())
    }

    /// The pid for logs: the number, or `-` when the peer has none here.
    pub fn pid_text(&self) -> String {
        self.pid.map_or_else(|| "-".to_string(), |p| p.to_string())
    }

    /// The policy's view of this task, speaking `abi`, whose executable path (when it is
    /// known to be the program the task runs) is `exe`.
    pub fn task<'a>(
        &'a self,
        abi: portcullis_proto::layout::AbiId,
        exe: Option<&'a str>,
    ) -> portcullis_policy::Task<'a> {
        portcullis_policy::Task {
            uid: self.uid,
            gid: self.gid,
            groups: &self.groups,
            exe,
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

/// What a process runs: its executable's path, identity and (with `hashing`) hash — asked of
/// the privileged helper when the serving process has one (reading another user's
/// `/proc/<pid>/exe` takes privilege), else read here. Unknown parts are `None`.
fn read_program(
    pidfd: BorrowedFd<'_>,
    pid: i32,
    hashing: Option<ExeHashing>,
) -> (Option<String>, Option<FileId>, Option<String>) {
    use crate::sandbox::protocol::{Request, Response};
    let request = Request::Program {
        hash_max: hashing.map(|h| h.max_bytes),
    };
    match crate::sandbox::ask(&request, Some(pidfd)) {
        None => {
            let program = program_of(pid);
            let exe = fs::read_link(format!("/proc/{pid}/exe"))
                .ok()
                .and_then(|p| p.into_os_string().into_string().ok());
            let sha256 = match (hashing, program) {
                (Some(hashing), Some(program)) => exe_hash(pid, program, hashing),
                _ => None,
            };
            (exe, program, sha256)
        }
        Some(Ok((Response::Program { exe, dev, ino, sha256 }, _))) => (exe, Some(FileId { dev, ino }), sha256),
        Some(answer) => {
            tracing::debug!(pid, answer = ?answer.map(|(r, _)| r), "the helper did not read the program");
            (None, None, None)
        }
    }
}

/// The privileged helper's side of [`read_program`]: the pid comes from the pidfd itself (a
/// recycled pid cannot be substituted), and what was read is answered only if the process is
/// still alive after the reads (so it was that process's).
pub(crate) fn program_here(
    pidfd: BorrowedFd<'_>,
    hash_max: Option<u64>,
) -> Result<(Option<String>, FileId, Option<String>), String> {
    use std::os::fd::AsRawFd;
    let info = fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd()))
        .map_err(|e| format!("reading the pidfd: {e}"))?;
    let pid: i32 = info
        .lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|p| p.trim().parse().ok())
        .filter(|p| *p > 0)
        .ok_or("not the pidfd of a live process")?;
    let program = program_of(pid).ok_or("its executable cannot be read")?;
    let exe = fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .and_then(|p| p.into_os_string().into_string().ok());
    let sha256 = hash_max.and_then(|max_bytes| exe_hash(pid, program, ExeHashing { max_bytes }));
    if exited(pidfd) {
        return Err(format!("process {pid} exited"));
    }
    Ok((exe, program, sha256))
}

/// The pidfd to hold for a connection of the process `pidfd` refers to: the one already held for
/// that process's other connections, if any (and `pidfd` is closed), else `pidfd` itself. Only
/// where pidfds live in pidfs, whose inode numbers name one process each and are never reused
/// (64 bits); elsewhere every pidfd shares one inode, and each connection keeps its own.
fn held_pidfd(pidfd: OwnedFd) -> Arc<OwnedFd> {
    let Some(ino) = pidfs_inode(&pidfd) else {
        return Arc::new(pidfd);
    };
    static HELD: Mutex<Held> = Mutex::new(Held {
        by_inode: None,
        prune_at: 0,
    });
    let mut held = HELD.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let Held { by_inode, prune_at } = &mut *held;
    let by_inode = by_inode.get_or_insert_with(HashMap::new);
    if let Some(live) = by_inode.get(&ino).and_then(Weak::upgrade) {
        return live;
    }
    // Entries of processes whose connections have all gone are dropped once the table has
    // doubled since the last sweep, so it stays within twice the processes connected.
    if by_inode.len() >= *prune_at {
        by_inode.retain(|_, held| held.strong_count() > 0);
        *prune_at = (by_inode.len() * 2).max(64);
    }
    let pidfd = Arc::new(pidfd);
    by_inode.insert(ino, Arc::downgrade(&pidfd));
    pidfd
}

/// The pidfds held, by pidfs inode.
struct Held {
    by_inode: Option<HashMap<u64, Weak<OwnedFd>>>,
    prune_at: usize,
}

/// The inode that names `pidfd`'s process, when pidfds are pidfs files (Linux 6.9 and later) on
/// a 64-bit machine.
fn pidfs_inode(pidfd: &OwnedFd) -> Option<u64> {
    if !cfg!(target_pointer_width = "64") || !pidfds_are_pidfs() {
        return None;
    }
    #[allow(clippy::useless_conversion, reason = "st_ino is narrower on some architectures")]
    rustix::fs::fstat(pidfd).ok().map(|st| u64::from(st.st_ino))
}

/// Whether this kernel's pidfds are pidfs files: asked once, before the sandbox (whose filters
/// leave out `fstatfs`) — [`crate::server::prepare`] calls it; asked first under the filters, the
/// answer is no and every connection keeps a pidfd of its own.
pub(crate) fn pidfds_are_pidfs() -> bool {
    /// `PIDFS_MAGIC` in `<linux/magic.h>`.
    const PIDFS_MAGIC: i64 = 0x5049_4446;
    static PIDFS: OnceLock<bool> = OnceLock::new();
    #[allow(clippy::useless_conversion, reason = "f_type is i32 or u32 on some architectures")]
    *PIDFS.get_or_init(|| {
        pidfd_open(rustix::process::getpid(), PidfdFlags::empty())
            .and_then(|own| rustix::fs::fstatfs(&own))
            .is_ok_and(|fs| i64::from(fs.f_type) == PIDFS_MAGIC)
    })
}

/// Whether a pidfd's process has exited (its pidfd is readable).
fn exited(pidfd: impl AsFd) -> bool {
    let mut fds = [PollFd::new(&pidfd, PollFlags::IN)];
    let zero = Timespec { tv_sec: 0, tv_nsec: 0 };
    poll(&mut fds, Some(&zero)).unwrap_or(1) != 0
}

/// The file `/proc/<pid>/exe` refers to. `AT_STATX_DONT_SYNC`: the inode's identity comes from
/// the kernel's cache, so a file system the peer serves (FUSE) is never asked.
fn program_of(pid: i32) -> Option<FileId> {
    file_id(&format!("/proc/{pid}/exe"))
}

/// The file at `path` (following links), by device and inode, without asking a remote or user
/// file system to refresh anything.
pub(crate) fn file_id(path: &str) -> Option<FileId> {
    use rustix::fs::{AtFlags, CWD, StatxFlags, makedev, statx};
    let stx = statx(CWD, path, AtFlags::STATX_DONT_SYNC, StatxFlags::INO).ok()?;
    Some(FileId {
        dev: makedev(stx.stx_dev_major, stx.stx_dev_minor),
        ino: stx.stx_ino,
    })
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

/// What identifies a file's contents for the hash cache: device, inode, size and change time
/// (`ctime` cannot be set back by the file's owner, unlike `mtime`).
type HashKey = (u64, u64, i64, i64, i64);
type HashCache = std::collections::HashMap<HashKey, String>;
static EXE_HASHES: std::sync::Mutex<Option<HashCache>> = std::sync::Mutex::new(None);

/// Most executables whose hash is remembered.
const EXE_HASH_CACHE: usize = 256;

/// SHA-256 of the file the `exe` link of `pid` points to (opened through the link, so a deleted
/// or replaced binary is still the one running), when it is still `program` and at most
/// `hashing.max_bytes` long; cached.
fn exe_hash(pid: i32, program: FileId, hashing: ExeHashing) -> Option<String> {
    use std::{io::Read, os::unix::fs::MetadataExt};

    use sha2::{Digest, Sha256};
    let mut file = fs::File::open(format!("/proc/{pid}/exe")).ok()?;
    let meta = file.metadata().ok()?;
    if (FileId {
        dev: meta.dev(),
        ino: meta.ino(),
    }) != program
    {
        // Another program since the identity was read (an exec in between): nothing to hash.
        return None;
    }
    if meta.size() > hashing.max_bytes {
        tracing::info!(
            pid,
            bytes = meta.size(),
            limit = hashing.max_bytes,
            "executable not hashed: larger than max_exe_hash_bytes (it matches no exe_sha256)"
        );
        return None;
    }
    let key = (
        meta.dev(),
        meta.ino(),
        meta.size() as i64,
        meta.ctime(),
        meta.ctime_nsec(),
    );
    if let Some(hit) = EXE_HASHES.lock().ok()?.as_ref().and_then(|c| c.get(&key)).cloned() {
        return Some(hit);
    }
    let mut hasher = Sha256::new();
    let mut chunk = vec![0u8; 1 << 16];
    let mut left = hashing.max_bytes;
    loop {
        let n = file.read(&mut chunk).ok()?;
        if n == 0 {
            break;
        }
        // The file may grow while it is read: never hash more than the limit.
        left = left.checked_sub(n as u64)?;
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
    fn identity_of_self_reads_program_exe_hash_groups_and_cgroup() {
        use sha2::{Digest, Sha256};
        let me = PeerIdentity::of_self().unwrap();
        let exe = std::env::current_exe().unwrap();
        assert_eq!(me.exe.as_deref(), exe.to_str());
        assert_eq!(me.program, file_id(exe.to_str().unwrap()));
        assert!(me.program.is_some());
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
        me.verify_unchanged().unwrap();
    }

    #[test]
    fn identity_without_hashing_has_no_hash() {
        let me = PeerIdentity::from_peer_cred(0, 0, Some(std::process::id() as i32), None, IdentityOptions::default())
            .unwrap();
        assert!(me.program.is_some());
        assert_eq!(me.exe_sha256, None);
    }

    #[test]
    fn identity_over_the_hash_limit_has_no_hash() {
        let options = IdentityOptions {
            hash_exe: Some(ExeHashing { max_bytes: 1024 }),
        };
        let me = PeerIdentity::from_peer_cred(0, 0, Some(std::process::id() as i32), None, options).unwrap();
        assert!(me.program.is_some());
        assert_eq!(me.exe_sha256, None, "a test binary is larger than 1 KiB");
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
        match PeerIdentity::from_peer_cred(0, 0, Some(pid), None, IdentityOptions::default()) {
            Err(IdentityError::Pidfd { .. } | IdentityError::Exited(_)) => {}
            Ok(other) => assert_ne!(other.exe.as_deref(), Some("/usr/bin/true")),
            Err(e) => panic!("unexpected {e}"),
        }
    }

    /// A child process that sleeps for a minute.
    fn sleeper() -> std::process::Child {
        std::process::Command::new("sleep")
            .arg("60")
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    }

    #[test]
    fn verify_unchanged_refuses_a_peer_that_exited() {
        let mut child = sleeper();
        let peer =
            PeerIdentity::from_peer_cred(0, 0, Some(child.id() as i32), None, IdentityOptions::default()).unwrap();
        peer.verify_unchanged().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(matches!(peer.verify_unchanged(), Err(IdentityError::Exited(_))));
    }

    #[test]
    fn a_process_holds_one_pidfd_whatever_its_connections_and_another_process_its_own() {
        let mut child = sleeper();
        let of =
            |pid: u32| PeerIdentity::from_peer_cred(0, 0, Some(pid as i32), None, IdentityOptions::default()).unwrap();
        let pidfd = |peer: &PeerIdentity| peer.pidfd.clone().unwrap();
        // Told apart without the code under test: pidfs gives each process's pidfd an inode of
        // its own, the anonymous-inode pidfds of older kernels share one.
        let ino = |pid: u32| {
            let fd = pidfd_open(Pid::from_raw(pid as i32).unwrap(), PidfdFlags::empty()).unwrap();
            rustix::fs::fstat(&fd).unwrap().st_ino
        };
        let pidfs = ino(std::process::id()) != ino(child.id());
        assert_eq!(pidfds_are_pidfs(), pidfs);

        let (own, first, second) = (of(std::process::id()), of(child.id()), of(child.id()));
        assert_eq!(
            Arc::ptr_eq(&pidfd(&first), &pidfd(&second)),
            pidfs,
            "one process, two connections"
        );
        assert!(!Arc::ptr_eq(&pidfd(&own), &pidfd(&first)), "two processes");
        // The pidfd lives as long as the last connection of its process (the child's: other
        // tests here hold identities of this process).
        let weak = Arc::downgrade(&pidfd(&second));
        drop(first);
        second.verify_unchanged().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(matches!(second.verify_unchanged(), Err(IdentityError::Exited(_))));
        drop(second);
        assert!(weak.upgrade().is_none(), "closed with its last connection");
    }

    #[test]
    fn verify_unchanged_refuses_a_peer_that_became_another_program() {
        // `sh` reads a line, then execs `sleep`: the identity taken before the line is sh's.
        use std::io::Write;
        let mut child = std::process::Command::new("sh")
            .args(["-c", "read line; exec sleep 60"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let peer = PeerIdentity::from_peer_cred(0, 0, Some(pid), None, IdentityOptions::default()).unwrap();
        assert_eq!(peer.program, file_id("/bin/sh"));
        peer.verify_unchanged().unwrap();
        child.stdin.take().unwrap().write_all(b"go\n").unwrap();
        // Wait for the exec itself: the program /proc shows changes to sleep's.
        let sleep = file_id("/bin/sleep");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while program_of(pid) != sleep {
            assert!(std::time::Instant::now() < deadline, "sh never exec'd sleep");
            std::thread::yield_now();
        }
        assert!(matches!(peer.verify_unchanged(), Err(IdentityError::Changed(p)) if p == pid));
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
