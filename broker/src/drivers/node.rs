//! Opening the device node a configuration names, and nothing else: the node's type is checked
//! before it is opened (opening the wrong character device can have effects of its own, as a
//! watchdog's does), and again after, against the node the path named when it was checked (a
//! symbolic link swapped in between is refused, not followed somewhere else).

use std::{
    os::fd::OwnedFd,
    path::{Path, PathBuf},
};

use rustix::fs::{FileType, Mode, OFlags, Stat};

/// What kind of node a driver serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeKind {
    /// A tty character device (a serial port, a pty follower).
    Tty,
    /// A block device.
    Block,
}

impl NodeKind {
    fn describe(self) -> &'static str {
        match self {
            NodeKind::Tty => "a tty character device",
            NodeKind::Block => "a block device",
        }
    }
}

/// Why a node was refused, in words that name it.
pub(crate) fn describe_type(stat: &Stat) -> String {
    let (major, minor) = (rustix::fs::major(stat.st_rdev), rustix::fs::minor(stat.st_rdev));
    match FileType::from_raw_mode(stat.st_mode) {
        FileType::RegularFile => "a regular file".into(),
        FileType::Directory => "a directory".into(),
        FileType::Symlink => "a symbolic link".into(),
        FileType::Fifo => "a FIFO".into(),
        FileType::Socket => "a socket".into(),
        FileType::CharacterDevice => format!("character device {major}:{minor}"),
        FileType::BlockDevice => format!("block device {major}:{minor}"),
        FileType::Unknown => "a file of unknown type".into(),
    }
}

/// Whether the character device `rdev` is a tty: the kernel's tty class says so in sysfs, and
/// Unix98 pty followers (majors 136–143), which sysfs does not list, are ttys too.
fn is_tty(rdev: u64) -> bool {
    let (major, minor) = (rustix::fs::major(rdev), rustix::fs::minor(rdev));
    if (136..=143).contains(&major) {
        return true;
    }
    let class = PathBuf::from(format!("/sys/dev/char/{major}:{minor}/subsystem"));
    std::fs::read_link(class).is_ok_and(|target| target.file_name().is_some_and(|n| n == "tty"))
}

fn matches(kind: NodeKind, stat: &Stat) -> bool {
    match (kind, FileType::from_raw_mode(stat.st_mode)) {
        (NodeKind::Tty, FileType::CharacterDevice) => is_tty(stat.st_rdev),
        (NodeKind::Block, FileType::BlockDevice) => true,
        _ => false,
    }
}

/// Checks, without opening it, that `path` is a node of `kind` — and, for a node the kernel
/// announced (`expect`: its device number), that it is that very node and not a symbolic
/// link. Returns what `path` names.
pub(crate) fn check(path: &Path, kind: NodeKind, expect: Option<u64>) -> Result<Stat, String> {
    let named = path.display();
    let stat = if expect.is_some() {
        rustix::fs::lstat(path)
    } else {
        rustix::fs::stat(path)
    }
    .map_err(|e| format!("{named}: {e}"))?;
    if !matches(kind, &stat) {
        return Err(format!("{named} is {}, not {}", describe_type(&stat), kind.describe()));
    }
    if let Some(rdev) = expect
        && stat.st_rdev != rdev
    {
        return Err(format!(
            "{named} is {}, not the kernel's device {}:{}: refused",
            describe_type(&stat),
            rustix::fs::major(rdev),
            rustix::fs::minor(rdev)
        ));
    }
    Ok(stat)
}

/// Opens `path` as a node of `kind` with `flags` (plus `O_CLOEXEC`, and `O_NOCTTY` for ttys):
/// its type is checked first ([`check`], with `expect` as there; such a node is opened
/// `O_NOFOLLOW`), and the node opened must be the node checked.
///
/// In a serving process with a privileged helper, the helper opens it (after its own checks:
/// a node the configuration names, or a kernel device a personality matches) and this process
/// checks what it received as if it had opened it.
pub(crate) fn open(path: &Path, kind: NodeKind, flags: OFlags, expect: Option<u64>) -> Result<OwnedFd, String> {
    use crate::sandbox::protocol::{Kind, Request, Response};
    let request = Request::OpenNode {
        path: path
            .to_str()
            .ok_or_else(|| format!("{}: not a UTF-8 path", path.display()))?
            .to_string(),
        kind: match kind {
            NodeKind::Tty => Kind::Tty,
            NodeKind::Block => Kind::Block,
        },
        write: flags.contains(OFlags::RDWR) || flags.contains(OFlags::WRONLY),
        exclusive: flags.contains(OFlags::EXCL),
        direct: flags.contains(OFlags::DIRECT),
        nonblock: flags.contains(OFlags::NONBLOCK),
        rdev: expect,
    };
    let fd = match crate::sandbox::ask(&request, None) {
        None => return open_here(path, kind, flags, expect),
        Some(Ok((Response::Opened, Some(fd)))) => fd,
        Some(Ok((Response::Refused(why), _))) => return Err(why),
        Some(Ok((other, _))) => return Err(format!("the privileged helper answered {other:?}")),
        Some(Err(e)) => return Err(e),
    };
    // What came back must be what was asked for: the helper is trusted, but checked.
    let stat = rustix::fs::fstat(&fd).map_err(|e| format!("{}: {e}", path.display()))?;
    if !matches(kind, &stat) || expect.is_some_and(|rdev| rdev != stat.st_rdev) {
        return Err(format!(
            "{}: the helper opened {}",
            path.display(),
            describe_type(&stat)
        ));
    }
    Ok(fd)
}

/// [`open`] in this process, with its own privileges.
pub(crate) fn open_here(path: &Path, kind: NodeKind, flags: OFlags, expect: Option<u64>) -> Result<OwnedFd, String> {
    let named = path.display();
    let before = check(path, kind, expect)?;
    let mut flags = flags | OFlags::CLOEXEC;
    if kind == NodeKind::Tty {
        flags |= OFlags::NOCTTY;
    }
    if expect.is_some() {
        flags |= OFlags::NOFOLLOW;
    }
    let fd = rustix::fs::open(path, flags, Mode::empty()).map_err(|e| format!("{named}: {e}"))?;
    let after = rustix::fs::fstat(&fd).map_err(|e| format!("{named}: {e}"))?;
    if after.st_rdev != before.st_rdev
        || FileType::from_raw_mode(after.st_mode) != FileType::from_raw_mode(before.st_mode)
    {
        return Err(format!(
            "{named} changed while it was opened (now {}): refused",
            describe_type(&after)
        ));
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_of_the_wrong_type_is_refused_without_being_opened() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain");
        std::fs::write(&file, "x").unwrap();
        let err = open(&file, NodeKind::Tty, OFlags::RDWR, None).unwrap_err();
        assert!(err.ends_with("is a regular file, not a tty character device"), "{err}");
        let err = open(Path::new("/dev/null"), NodeKind::Tty, OFlags::RDWR, None).unwrap_err();
        assert!(err.contains("character device 1:3, not a tty"), "{err}");
        let err = open(Path::new("/dev/null"), NodeKind::Block, OFlags::RDONLY, None).unwrap_err();
        assert!(err.contains("not a block device"), "{err}");
        let err = open(&dir.path().join("missing"), NodeKind::Block, OFlags::RDONLY, None).unwrap_err();
        assert!(err.contains("No such file"), "{err}");
    }

    #[test]
    fn a_pty_follower_is_a_tty_and_a_link_to_it_is_followed() {
        let master = rustix::pty::openpt(rustix::pty::OpenptFlags::RDWR | rustix::pty::OpenptFlags::NOCTTY).unwrap();
        rustix::pty::grantpt(&master).unwrap();
        rustix::pty::unlockpt(&master).unwrap();
        let name = rustix::pty::ptsname(&master, Vec::new()).unwrap();
        let follower = PathBuf::from(name.to_str().unwrap());
        let rdev = open(&follower, NodeKind::Tty, OFlags::RDWR | OFlags::NONBLOCK, None)
            .and_then(|fd| rustix::fs::fstat(&fd).map_err(|e| e.to_string()))
            .unwrap()
            .st_rdev;
        // A symbolic link to the node names the node (as /dev/serial/by-id links do)...
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("by-id");
        std::os::unix::fs::symlink(&follower, &link).unwrap();
        open(&link, NodeKind::Tty, OFlags::RDWR | OFlags::NONBLOCK, None).unwrap();
        // ...but a node the kernel announced is opened only as itself, with its own number.
        open(&follower, NodeKind::Tty, OFlags::RDWR | OFlags::NONBLOCK, Some(rdev)).unwrap();
        let err = open(&link, NodeKind::Tty, OFlags::RDWR, Some(rdev)).unwrap_err();
        assert!(err.contains("is a symbolic link"), "{err}");
        let err = open(&follower, NodeKind::Tty, OFlags::RDWR, Some(rdev + 1)).unwrap_err();
        assert!(err.contains("not the kernel's device"), "{err}");
    }
}
