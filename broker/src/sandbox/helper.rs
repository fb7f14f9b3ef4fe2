//! The privileged helper: the one process of a root-started broker that keeps privilege, and
//! uses it for nothing but what the serving process cannot do itself — opening the node of a
//! device a personality matched (or the configuration names), making or attaching the TUN
//! interface, bringing a TUN interface the serving process holds up or down, and reading
//! another process's executable (for identity) through its pidfd.
//!
//! It is forked before the serving process starts its runtime, holds only the capabilities
//! those need (`CAP_DAC_OVERRIDE`, `CAP_NET_ADMIN`, `CAP_SYS_PTRACE`), runs under its own
//! seccomp filter (`seccomp/helper.json`), answers one request at a time over a
//! `SOCK_SEQPACKET` socketpair, and checks every request against what *it* read — its own
//! copy of the configuration and personalities, sysfs, `fstat` of what it opened — never
//! against what the request claims. It dies with the serving process (`PR_SET_PDEATHSIG`,
//! and the socket's end), and the serving process stops when it dies.

use std::{
    io::{IoSlice, IoSliceMut},
    mem::MaybeUninit,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
    sync::Mutex,
};

use rustix::{
    fs::OFlags,
    net::{
        RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer, SendAncillaryMessage,
        SendFlags,
    },
};

use super::protocol::{self, Forbidden, Kind, MAX_MESSAGE, Request, Response};
use crate::{
    bus::sysfs::Sysfs,
    config::Config,
    drivers::node::{self, NodeKind},
    registry::personality::Personalities,
};

/// Sends `message` with at most one descriptor.
pub(crate) fn send(sock: BorrowedFd<'_>, message: &[u8], fd: Option<BorrowedFd<'_>>) -> std::io::Result<()> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut ancillary = SendAncillaryBuffer::new(&mut space);
    let fds;
    if let Some(fd) = fd {
        fds = [fd];
        if !ancillary.push(SendAncillaryMessage::ScmRights(&fds)) {
            return Err(std::io::Error::other("no room for a descriptor"));
        }
    }
    let sent = rustix::net::sendmsg(sock, &[IoSlice::new(message)], &mut ancillary, SendFlags::NOSIGNAL)?;
    if sent != message.len() {
        return Err(std::io::Error::other("message cut short"));
    }
    Ok(())
}

/// One message received: its bytes (`None` at the end of the stream) and its descriptor. A
/// message cut short, or carrying more than one descriptor, is refused (its descriptors closed).
pub(crate) fn recv(sock: BorrowedFd<'_>, buf: &mut [u8]) -> std::io::Result<Option<(usize, Option<OwnedFd>)>> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
    let mut ancillary = RecvAncillaryBuffer::new(&mut space);
    let got = rustix::net::recvmsg(
        sock,
        &mut [IoSliceMut::new(buf)],
        &mut ancillary,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fds: Vec<OwnedFd> = Vec::new();
    for message in ancillary.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    if got.bytes == 0 && fds.is_empty() {
        return Ok(None);
    }
    if got.flags.intersects(ReturnFlags::TRUNC | ReturnFlags::CTRUNC) || fds.len() > 1 || got.bytes > MAX_MESSAGE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "a message cut short or with more than one descriptor",
        ));
    }
    Ok(Some((got.bytes, fds.pop())))
}

/// What a configuration lets the helper open without a personality: the nodes of its devices,
/// and the TUN interfaces it creates.
#[derive(Clone, Debug, Default)]
pub struct Grants {
    /// Nodes of `[[device]]` entries: path, kind, and whether only reading is allowed.
    nodes: Vec<(PathBuf, NodeKind, bool)>,
    /// TUN interfaces of `[[device]]` entries.
    tun: Vec<String>,
    /// The personalities, for kernel devices.
    personalities: Personalities,
    /// Where sysfs is.
    sysfs: Sysfs,
    /// Where device nodes live (`/dev`).
    dev: PathBuf,
}

impl Grants {
    /// What `config` and `personalities` allow.
    pub fn new(config: &Config, personalities: Personalities) -> Grants {
        let mut grants = Grants {
            personalities,
            sysfs: Sysfs::default(),
            dev: PathBuf::from("/dev"),
            ..Grants::default()
        };
        for device in &config.devices {
            match (device.driver.as_str(), &device.path, &device.interface) {
                ("tty", Some(path), _) => grants.nodes.push((path.clone(), NodeKind::Tty, false)),
                ("block", Some(path), _) => grants.nodes.push((path.clone(), NodeKind::Block, device.read_only)),
                ("net", _, Some(name)) => grants.tun.push(name.clone()),
                _ => {}
            }
        }
        grants
    }

    /// Grants over a sysfs tree and device directory of a test's own making.
    #[cfg(test)]
    fn at(sysfs: &Path, dev: &Path, personalities: Personalities) -> Grants {
        Grants {
            personalities,
            sysfs: Sysfs::at(sysfs),
            dev: dev.to_path_buf(),
            ..Grants::default()
        }
    }
}

/// Answers one request (`fd`: the descriptor that came with it): the response and the
/// descriptor that goes back with it.
pub(crate) fn handle(grants: &Grants, request: Request, fd: Option<OwnedFd>) -> (Response, Option<OwnedFd>) {
    let refused = |why: String| (Response::Refused(why), None);
    match request {
        Request::OpenNode {
            path,
            kind,
            write,
            exclusive,
            direct,
            nonblock,
            rdev,
        } => {
            let kind = match kind {
                Kind::Tty => NodeKind::Tty,
                Kind::Block => NodeKind::Block,
            };
            if let Err(why) = allowed_node(grants, Path::new(&path), kind, write, rdev) {
                return refused(format!("{path}: {why}: refused"));
            }
            let mut flags = if write { OFlags::RDWR } else { OFlags::RDONLY };
            for (on, flag) in [
                (exclusive, OFlags::EXCL),
                (direct, OFlags::DIRECT),
                (nonblock, OFlags::NONBLOCK),
            ] {
                if on {
                    flags |= flag;
                }
            }
            // `node::open` checks the type before opening and again after, and opens a kernel
            // node `O_NOFOLLOW`, as that very device number.
            match node::open_here(Path::new(&path), kind, flags, rdev) {
                Ok(fd) => (Response::Opened, Some(fd)),
                Err(why) => refused(why),
            }
        }
        Request::OpenTun { name, ifindex } => {
            if let Err(why) = allowed_tun(grants, &name, ifindex) {
                return refused(format!("interface {name}: {why}: refused"));
            }
            match crate::drivers::net::open_tun(&name) {
                Ok((fd, name)) => (Response::Tun { name }, Some(fd)),
                Err(why) => refused(why),
            }
        }
        Request::SetLink { up, mtu } => match fd {
            Some(tun) => match crate::drivers::net::set_link(tun.as_fd(), up, mtu) {
                Ok(()) => (Response::Done, None),
                Err(why) => refused(why),
            },
            None => refused("SetLink comes with the interface's TUN descriptor".into()),
        },
        Request::Program { hash_max } => match fd {
            Some(pidfd) => match crate::session::identity::program_here(pidfd.as_fd(), hash_max) {
                Ok((exe, program, sha256)) => (
                    Response::Program {
                        exe,
                        dev: program.dev,
                        ino: program.ino,
                        sha256,
                    },
                    None,
                ),
                Err(why) => refused(why),
            },
            None => refused("Program comes with the process's pidfd".into()),
        },
        Request::Status => (Response::Status(super::state_of_self()), None),
        Request::Forbidden { call } => forbidden(call),
    }
}

#[cfg(feature = "fault-injection")]
fn forbidden(call: Forbidden) -> (Response, Option<OwnedFd>) {
    (Response::Errno(super::make_forbidden(call)), None)
}

#[cfg(not(feature = "fault-injection"))]
fn forbidden(_call: Forbidden) -> (Response, Option<OwnedFd>) {
    (Response::Refused("not a request this helper answers".into()), None)
}

/// Whether the helper may open `path`: a node the configuration names (of that kind, and
/// read-only when the configuration says so), or — with `rdev` — the node of the kernel device
/// with that number, as sysfs names it, which a personality of the node's driver matches
/// (and which that personality lets be written, if `write`).
fn allowed_node(grants: &Grants, path: &Path, kind: NodeKind, write: bool, rdev: Option<u64>) -> Result<(), String> {
    let Some(rdev) = rdev else {
        return match grants.nodes.iter().find(|(p, k, _)| p == path && *k == kind) {
            Some((_, _, true)) if write => Err("the configuration says read_only".into()),
            Some(_) => Ok(()),
            None => Err("not a device node the configuration names".into()),
        };
    };
    let (major, minor) = (rustix::fs::major(rdev), rustix::fs::minor(rdev));
    let (subsystem, driver) = match kind {
        NodeKind::Tty => ("char", "tty"),
        NodeKind::Block => ("block", "block"),
    };
    let (devpath, device) = device_at(grants, &format!("dev/{subsystem}/{major}:{minor}"))
        .map_err(|why| why.unwrap_or_else(|| format!("the kernel has no {subsystem} device {major}:{minor}")))?;
    let node = device.node.as_ref().ok_or("the kernel gave the device no node")?;
    let named = grants.dev.join(node.path.strip_prefix("/dev").unwrap_or(&node.path));
    if named != path || node.rdev() != rdev {
        return Err(format!(
            "the kernel's device {major}:{minor} is {}, not this node",
            node.path.display()
        ));
    }
    if matched(grants, driver, &device, write) {
        Ok(())
    } else {
        Err(format!(
            "no personality of the {driver} driver matches {devpath}{}",
            if write { " for writing" } else { "" }
        ))
    }
}

/// Whether the helper may make or attach to TUN interface `name`: one the configuration names
/// (made), or — with `ifindex` — a persistent TUN interface with that index, which a
/// personality of the net driver matches (attached).
fn allowed_tun(grants: &Grants, name: &str, ifindex: Option<u32>) -> Result<(), String> {
    if name.is_empty() || name.len() > 15 || name.contains('/') || name == "." || name == ".." {
        return Err("not an interface name".into());
    }
    let Some(ifindex) = ifindex else {
        return if grants.tun.iter().any(|t| t == name) {
            Ok(())
        } else {
            Err("not an interface the configuration names".into())
        };
    };
    let (_, device) = device_at(grants, &format!("class/net/{name}"))
        .map_err(|why| why.unwrap_or_else(|| "no such interface".into()))?;
    use portcullis_proto::property::PropValue;
    if device.properties.get("net.ifindex") != Some(&PropValue::Unsigned(u64::from(ifindex))) {
        return Err(format!("not the interface with index {ifindex}"));
    }
    if matched(grants, "net", &device, false) {
        Ok(())
    } else {
        Err("no personality of the net driver matches it".into())
    }
}

/// The device a sysfs link (relative to the sysfs root) leads to, as the helper reads it now:
/// its devpath and description. `Err(None)`: there is no such link.
fn device_at(grants: &Grants, link: &str) -> Result<(String, crate::bus::sysfs::KernelDevice), Option<String>> {
    let real = std::fs::canonicalize(grants.sysfs.root().join(link)).map_err(|_| None)?;
    let devpath = real
        .strip_prefix(grants.sysfs.root())
        .ok()
        .and_then(|p| p.to_str())
        .map(|p| format!("/{p}"))
        .ok_or_else(|| Some("a device outside sysfs".to_string()))?;
    let device = grants
        .sysfs
        .read(&devpath)
        .map_err(Some)?
        .ok_or_else(|| Some(format!("{devpath} is not a device the broker serves")))?;
    Ok((devpath, device))
}

/// Whether a personality of `driver` passively matches `device` (and lets it be written, if
/// `write`).
fn matched(grants: &Grants, driver: &str, device: &crate::bus::sysfs::KernelDevice, write: bool) -> bool {
    grants.personalities.all().iter().any(|p| {
        p.driver == driver
            && p.provider_class == device.class.class
            && p.passive(&device.properties).is_ok()
            && !(write && p.block.read_only)
    })
}

/// The helper's loop: one request, one response, until the serving process closes its end.
/// A message that is not a request is answered `Refused` (and its descriptor closed).
pub(crate) fn serve(sock: &OwnedFd, grants: &Grants) {
    let mut buf = vec![0u8; MAX_MESSAGE + 1];
    loop {
        let (response, fd) = match recv(sock.as_fd(), &mut buf) {
            Ok(None) => return,
            Ok(Some((len, fd))) => match buf.get(..len).and_then(protocol::decode::<Request>) {
                Some(request) => handle(grants, request, fd),
                None => (Response::Refused("not a request".into()), None),
            },
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => (Response::Refused(e.to_string()), None),
            Err(_) => return,
        };
        let bytes = protocol::encode(&response)
            .or_else(|| protocol::encode(&Response::Refused("the answer is too long".into())))
            .unwrap_or_default();
        if send(sock.as_fd(), &bytes, fd.as_ref().map(AsFd::as_fd)).is_err() {
            return;
        }
    }
}

/// The serving process's end: one request at a time.
#[derive(Debug)]
pub struct Client {
    sock: Mutex<OwnedFd>,
}

impl Client {
    /// The client of the helper at the other end of `sock`.
    pub(crate) fn new(sock: OwnedFd) -> Client {
        Client { sock: Mutex::new(sock) }
    }

    /// Asks the helper; the answer, with the descriptor that came with it. An error means the
    /// helper is gone or broke the protocol.
    pub fn call(&self, request: &Request, fd: Option<BorrowedFd<'_>>) -> std::io::Result<(Response, Option<OwnedFd>)> {
        let bytes = protocol::encode(request).ok_or_else(|| std::io::Error::other("request too long"))?;
        let sock = self.sock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        send(sock.as_fd(), &bytes, fd)?;
        let mut buf = vec![0u8; MAX_MESSAGE + 1];
        let (len, fd) = recv(sock.as_fd(), &mut buf)?
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the privileged helper is gone"))?;
        let response = buf
            .get(..len)
            .and_then(protocol::decode::<Response>)
            .ok_or_else(|| std::io::Error::other("the privileged helper answered something that is not a response"))?;
        Ok((response, fd))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (OwnedFd, OwnedFd) {
        rustix::net::socketpair(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::SEQPACKET,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )
        .unwrap()
    }

    fn open(path: &Path, kind: Kind, rdev: Option<u64>) -> Request {
        Request::OpenNode {
            path: path.display().to_string(),
            kind,
            write: false,
            exclusive: false,
            direct: false,
            nonblock: true,
            rdev,
        }
    }

    fn refusal(response: (Response, Option<OwnedFd>)) -> String {
        match response {
            (Response::Refused(why), None) => why,
            (other, fd) => panic!("not refused: {other:?} {fd:?}"),
        }
    }

    /// A block node numbered `rdev` at `path`.
    fn mknod(path: &Path, rdev: u64) {
        let mode = rustix::fs::Mode::from_raw_mode(0o600);
        rustix::fs::mknodat(rustix::fs::CWD, path, rustix::fs::FileType::BlockDevice, mode, rdev).unwrap();
    }

    /// A sysfs tree with one loop device, 7:99, whose node is `dev/loopfake`.
    fn fake_sysfs(root: &Path) {
        let dir = root.join("devices/virtual/block/loopfake");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::create_dir_all(root.join("class/block")).unwrap();
        std::os::unix::fs::symlink(root.join("class/block"), dir.join("subsystem")).unwrap();
        std::fs::write(
            dir.join("uevent"),
            "MAJOR=7\nMINOR=99\nDEVNAME=loopfake\nDEVTYPE=disk\n",
        )
        .unwrap();
        std::fs::write(dir.join("size"), "8\n").unwrap();
        std::fs::create_dir_all(root.join("dev/block")).unwrap();
        std::os::unix::fs::symlink(&dir, root.join("dev/block/7:99")).unwrap();
    }

    fn personalities(matching: &str) -> Personalities {
        Personalities::parse(&[(
            "p.toml".into(),
            format!("[[personality]]\nid = \"org.test.disk\"\nversion = \"1\"\ndriver = \"block\"\nprovider_class = \"BlockNub\"\nprobe_score = 1\n{matching}"),
        )])
        .unwrap()
    }

    /// The helper refuses a node no personality matched, a symbolic link where the node should
    /// be, a node whose number is not the kernel's, a path the configuration does not name, and
    /// garbage; it opens the kernel's node a personality matches. Device nodes are made here
    /// with mknod, in the test's own directory (the numbers of no device the test touches).
    #[test]
    fn the_helper_opens_only_matched_nodes_as_themselves() {
        let root = tempfile::tempdir().unwrap();
        let (sys, dev) = (root.path().join("sys"), root.path().join("dev"));
        fake_sysfs(&sys);
        std::fs::create_dir_all(&dev).unwrap();
        let node = dev.join("loopfake");
        let rdev = rustix::fs::makedev(7, 99);
        let grants = Grants::at(&sys, &dev, personalities(""));
        // No node yet: the kernel's device has no node here.
        assert!(refusal(handle(&grants, open(&node, Kind::Block, Some(rdev)), None)).contains("No such file"));
        // A symbolic link where the node should be (to a block node of the same number elsewhere).
        let elsewhere = root.path().join("elsewhere");
        mknod(&elsewhere, rdev);
        std::os::unix::fs::symlink(&elsewhere, &node).unwrap();
        assert!(refusal(handle(&grants, open(&node, Kind::Block, Some(rdev)), None)).contains("symbolic link"));
        std::fs::remove_file(&node).unwrap();
        // A node of another number under the kernel's name.
        mknod(&node, rustix::fs::makedev(7, 98));
        assert!(
            refusal(handle(&grants, open(&node, Kind::Block, Some(rdev)), None)).contains("not the kernel's device")
        );
        // The request claiming the other number: sysfs has no such device.
        let other = rustix::fs::makedev(7, 98);
        assert!(
            refusal(handle(&grants, open(&node, Kind::Block, Some(other)), None)).contains("has no block device 7:98")
        );
        std::fs::remove_file(&node).unwrap();
        // The right node, but no personality matches it.
        mknod(&node, rdev);
        let unmatched = Grants::at(
            &sys,
            &dev,
            personalities("[personality.match]\ndevname = \"/dev/sdz\"\n"),
        );
        assert!(
            refusal(handle(&unmatched, open(&node, Kind::Block, Some(rdev)), None))
                .contains("no personality of the block driver matches")
        );
        // A node elsewhere than sysfs says, and one the configuration does not name.
        assert!(refusal(handle(&grants, open(&elsewhere, Kind::Block, Some(rdev)), None)).contains("not this node"));
        assert!(
            refusal(handle(&grants, open(Path::new("/dev/null"), Kind::Tty, None), None))
                .contains("not a device node the configuration names")
        );
        // A TUN the configuration does not name, a link of a descriptor that is not a TUN.
        assert!(
            refusal(handle(
                &grants,
                Request::OpenTun {
                    name: "pc-evil".into(),
                    ifindex: None
                },
                None
            ))
            .contains("not an interface the configuration names")
        );
        assert!(
            refusal(handle(
                &grants,
                Request::OpenTun {
                    name: "../x".into(),
                    ifindex: Some(1)
                },
                None
            ))
            .contains("not an interface name")
        );
        let null = rustix::fs::open("/dev/null", OFlags::RDONLY, rustix::fs::Mode::empty()).unwrap();
        assert!(
            refusal(handle(
                &grants,
                Request::SetLink {
                    up: Some(true),
                    mtu: None
                },
                Some(null)
            ))
            .contains("not a TUN")
        );
        // The matched node itself opens (nothing is behind 7:99 here: the open is as far as
        // the kernel lets it go, and the refusal is the kernel's, not the helper's).
        match handle(&grants, open(&node, Kind::Block, Some(rdev)), None) {
            (Response::Opened, Some(_)) => {}
            (Response::Refused(why), None) => assert!(why.contains("No such device"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    /// Over its socket: garbage is answered `Refused` and the helper goes on serving; when the
    /// serving end closes, the helper's loop ends.
    #[test]
    fn the_helper_refuses_garbage_and_ends_with_its_peer() {
        let (ours, theirs) = pair();
        let grants = Grants::default();
        let server = std::thread::spawn(move || serve(&theirs, &grants));
        send(ours.as_fd(), &[0xff, 0xff, 0xff], None).unwrap();
        let mut buf = vec![0u8; MAX_MESSAGE + 1];
        let (len, fd) = recv(ours.as_fd(), &mut buf).unwrap().unwrap();
        assert!(fd.is_none());
        assert_eq!(
            protocol::decode::<Response>(buf.get(..len).unwrap()),
            Some(Response::Refused("not a request".into()))
        );
        // Two descriptors with one message: refused, both closed.
        let (a, b) = pair();
        let fds = [a.as_fd(), b.as_fd()];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
        let mut ancillary = SendAncillaryBuffer::new(&mut space);
        assert!(ancillary.push(SendAncillaryMessage::ScmRights(&fds)));
        let status = protocol::encode(&Request::Status).unwrap();
        rustix::net::sendmsg(&ours, &[IoSlice::new(&status)], &mut ancillary, SendFlags::empty()).unwrap();
        let (len, _) = recv(ours.as_fd(), &mut buf).unwrap().unwrap();
        assert!(matches!(
            protocol::decode::<Response>(buf.get(..len).unwrap()),
            Some(Response::Refused(_))
        ));
        // Still serving.
        let client = Client::new(ours);
        assert!(matches!(
            client.call(&Request::Status, None).unwrap(),
            (Response::Status(_), None)
        ));
        drop(client);
        server.join().unwrap();
    }
}
