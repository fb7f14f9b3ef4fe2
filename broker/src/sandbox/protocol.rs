//! The messages between the serving process and the privileged helper: one request, one
//! response, each a postcard-encoded `SOCK_SEQPACKET` message of at most [`MAX_MESSAGE`] bytes,
//! with at most one descriptor as `SCM_RIGHTS` (a TUN descriptor or pidfd going to the helper,
//! an opened node coming back). The helper decodes every request as hostile: the serving
//! process is the one that talks to untrusted clients, so it is the one that may be subverted.

use serde::{Deserialize, Serialize};

/// Largest message either way, in bytes: a path, an error text, a hash.
pub const MAX_MESSAGE: usize = 8192;

/// A node's kind, as the helper checks it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum Kind {
    /// A tty character device.
    Tty,
    /// A block device.
    Block,
}

/// What the serving process asks for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum Request {
    /// Open the device node `path` of `kind`. With `rdev`, the node of a kernel device some
    /// personality matches (the helper reads sysfs itself: the device with that number must
    /// name `path`); without, a node the configuration names.
    OpenNode {
        /// The node.
        path: String,
        /// Its kind.
        kind: Kind,
        /// Read-write rather than read-only.
        write: bool,
        /// `O_EXCL` (a block device's exclusive claim).
        exclusive: bool,
        /// `O_DIRECT`.
        direct: bool,
        /// `O_NONBLOCK`.
        nonblock: bool,
        /// The kernel's device number for it, when the kernel announced it.
        rdev: Option<u64>,
    },
    /// Create the TUN interface `name` the configuration names, or (with `ifindex`) attach to
    /// the persistent TUN interface with that index that a personality matches.
    OpenTun {
        /// The interface name.
        name: String,
        /// The index the kernel announced it with.
        ifindex: Option<u32>,
    },
    /// Bring the interface of the TUN descriptor sent with the request up or down, and/or set
    /// its MTU: only an interface whose descriptor the serving process holds.
    SetLink {
        /// Up (`true`) or down.
        up: Option<bool>,
        /// The MTU.
        mtu: Option<u32>,
    },
    /// The program of the process whose pidfd is sent with the request: its executable's path
    /// and identity, and its SHA-256 when it is at most `hash_max` bytes.
    Program {
        /// Hash the executable when it is at most this long; `None`: do not hash.
        hash_max: Option<u64>,
    },
    /// The helper's own sandbox state.
    Status,
    /// Make a system call the helper's filter forbids (answered only by builds with the
    /// `fault-injection` feature, for the test that shows the filter holds).
    Forbidden {
        /// Which one.
        call: Forbidden,
    },
}

/// The forbidden system calls the test-only entry points make.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum Forbidden {
    /// `execve("/bin/true")`.
    Execve,
    /// `ptrace(PTRACE_ATTACH, 1)`.
    Ptrace,
    /// `mount("none", "/tmp", "tmpfs")`.
    Mount,
    /// `socket(AF_INET, SOCK_STREAM)`.
    SocketInet,
}

/// A process's sandbox as `/proc/<pid>/status` and the process itself tell it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct ProcessState {
    /// Its pid.
    pub pid: u32,
    /// Its real, effective, saved and file-system uids.
    pub uids: [u32; 4],
    /// Effective capabilities (a mask).
    pub cap_eff: u64,
    /// Permitted capabilities.
    pub cap_prm: u64,
    /// The bounding set.
    pub cap_bnd: u64,
    /// Ambient capabilities.
    pub cap_amb: u64,
    /// `no_new_privs`.
    pub no_new_privs: bool,
    /// Seccomp mode (0 none, 2 filter).
    pub seccomp: u32,
    /// Seccomp filters of the thread that read this.
    pub seccomp_filters: u32,
    /// Landlock: "enforced", "partially enforced", "not enforced (…)" or "off".
    pub landlock: String,
}

/// What the helper answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum Response {
    /// The node is open: its descriptor comes with this.
    Opened,
    /// The TUN interface is made (or attached): its descriptor comes with this.
    Tun {
        /// The name the kernel gave it.
        name: String,
    },
    /// Done.
    Done,
    /// The program of the process.
    Program {
        /// Its executable's path, as its mount namespace shows it.
        exe: Option<String>,
        /// The executable's device.
        dev: u64,
        /// The executable's inode.
        ino: u64,
        /// Its SHA-256 (lowercase hex), when asked and within the limit.
        sha256: Option<String>,
    },
    /// The helper's sandbox.
    Status(ProcessState),
    /// What a forbidden call ended with: its errno (0: allowed).
    Errno(i32),
    /// Refused or failed: why.
    Refused(String),
}

/// Encodes a message; `None` when it would exceed [`MAX_MESSAGE`].
pub fn encode<T: Serialize>(message: &T) -> Option<Vec<u8>> {
    postcard::to_stdvec(message).ok().filter(|b| b.len() <= MAX_MESSAGE)
}

/// Decodes one message: the whole of `bytes`, nothing left over.
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Option<T> {
    if bytes.len() > MAX_MESSAGE {
        return None;
    }
    match postcard::take_from_bytes(bytes) {
        Ok((message, [])) => Some(message),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_garbage_decodes_to_nothing() {
        let request = Request::OpenNode {
            path: "/dev/loop3".into(),
            kind: Kind::Block,
            write: true,
            exclusive: false,
            direct: true,
            nonblock: false,
            rdev: Some(7 << 8 | 3),
        };
        let bytes = encode(&request).unwrap();
        assert_eq!(decode::<Request>(&bytes), Some(request));
        // Trailing bytes, a truncated message, an unknown variant, an oversized one: refused.
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert_eq!(decode::<Request>(&trailing), None);
        assert_eq!(decode::<Request>(bytes.get(..bytes.len() - 1).unwrap()), None);
        assert_eq!(decode::<Request>(&[200]), None);
        assert_eq!(decode::<Request>(&vec![0u8; MAX_MESSAGE + 1]), None);
        let long = Response::Refused("x".repeat(MAX_MESSAGE));
        assert_eq!(encode(&long), None);
    }
}
