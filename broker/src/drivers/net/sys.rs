//! The interface ioctls no safe wrapper offers: creating a TUN interface (`TUNSETIFF`) and
//! reading and setting an interface's index, flags and MTU (`SIOCGIFINDEX`, `SIOCGIFFLAGS`,
//! `SIOCSIFFLAGS`, `SIOCGIFMTU`, `SIOCSIFMTU`), each with the kernel's `struct ifreq`.

use std::os::fd::BorrowedFd;

use rustix::{
    io,
    ioctl::{Opcode, Updater, ioctl, opcode},
};

/// `struct ifreq`: the interface's name, then a union whose first bytes hold the `short`
/// flags or the `int` index or MTU (40 bytes, 8-aligned, on 64-bit Linux; 32 on 32-bit).
#[repr(C, align(8))]
#[derive(Clone, Copy)]
struct IfReq {
    name: [u8; 16],
    value: [u8; 24],
}

/// The interface name as `ifreq` holds it: at most 15 bytes and a NUL.
fn ifreq(name: &str) -> io::Result<IfReq> {
    let mut req = IfReq {
        name: [0; 16],
        value: [0; 24],
    };
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() > 15 || bytes.contains(&0) {
        return Err(io::Errno::INVAL);
    }
    req.name
        .get_mut(..bytes.len())
        .ok_or(io::Errno::INVAL)?
        .copy_from_slice(bytes);
    Ok(req)
}

fn int(req: &IfReq) -> i32 {
    let mut four = [0u8; 4];
    four.copy_from_slice(req.value.get(..4).unwrap_or(&[0; 4]));
    i32::from_ne_bytes(four)
}

const SIOCGIFFLAGS: Opcode = 0x8913;
const SIOCSIFFLAGS: Opcode = 0x8914;
const SIOCGIFMTU: Opcode = 0x8921;
const SIOCSIFMTU: Opcode = 0x8922;
const SIOCGIFINDEX: Opcode = 0x8933;

/// `TUNSETIFF` on a fresh `/dev/net/tun` descriptor: makes it the TUN interface `name`
/// (no packet information header). Returns the name the kernel gave it.
pub(super) fn tun_set_iff(tun: BorrowedFd<'_>, name: &str) -> io::Result<String> {
    let mut req = ifreq(name)?;
    let flags = (libc::IFF_TUN | libc::IFF_NO_PI) as i16;
    req.value
        .get_mut(..2)
        .ok_or(io::Errno::INVAL)?
        .copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes back a `struct ifreq` (drivers/net/tun.c); `IfReq` has
    // its size and alignment, and `Updater` passes a pointer to it. The opcode is the kernel's
    // `_IOW('T', 202, int)`.
    unsafe {
        ioctl(
            tun,
            Updater::<{ opcode::write::<i32>(b'T', 202) }, IfReq>::new(&mut req),
        )?
    };
    let end = req.name.iter().position(|b| *b == 0).unwrap_or(req.name.len());
    Ok(String::from_utf8_lossy(req.name.get(..end).unwrap_or_default()).into_owned())
}

/// `TUNGETIFF`: the name of the interface a TUN descriptor is (`EBADFD` when it is not
/// attached to one; `ENOTTY`/`EINVAL` when it is not a TUN descriptor at all).
pub(super) fn tun_get_iff(tun: BorrowedFd<'_>) -> io::Result<String> {
    let mut req = IfReq {
        name: [0; 16],
        value: [0; 24],
    };
    // SAFETY: TUNGETIFF writes a `struct ifreq` (drivers/net/tun.c); `IfReq` has its size and
    // alignment, and `Updater` passes a pointer to it. The opcode is the kernel's
    // `_IOR('T', 210, unsigned int)`.
    unsafe { ioctl(tun, Updater::<{ opcode::read::<u32>(b'T', 210) }, IfReq>::new(&mut req))? };
    let end = req.name.iter().position(|b| *b == 0).unwrap_or(req.name.len());
    Ok(String::from_utf8_lossy(req.name.get(..end).unwrap_or_default()).into_owned())
}

/// Runs a get-style interface ioctl on `socket`; returns the `int` it wrote.
fn get<const OPCODE: Opcode>(socket: BorrowedFd<'_>, name: &str) -> io::Result<i32> {
    let mut req = ifreq(name)?;
    // SAFETY: the SIOCGIF* requests read the name from and write their value into a `struct
    // ifreq` (netdevice(7)); `Updater` passes a pointer to one.
    unsafe { ioctl(socket, Updater::<OPCODE, IfReq>::new(&mut req))? };
    Ok(int(&req))
}

/// Runs a set-style interface ioctl on `socket` with `value` in the union's first bytes.
fn set<const OPCODE: Opcode>(socket: BorrowedFd<'_>, name: &str, value: &[u8]) -> io::Result<()> {
    let mut req = ifreq(name)?;
    req.value
        .get_mut(..value.len())
        .ok_or(io::Errno::INVAL)?
        .copy_from_slice(value);
    // SAFETY: the SIOCSIF* requests read a `struct ifreq` (netdevice(7)); `Updater` passes a
    // pointer to one.
    unsafe { ioctl(socket, Updater::<OPCODE, IfReq>::new(&mut req)) }
}

/// The interface's index.
pub(super) fn index(socket: BorrowedFd<'_>, name: &str) -> io::Result<u32> {
    get::<SIOCGIFINDEX>(socket, name).map(|i| i as u32)
}

/// The interface's `IFF_*` flags (a `short`).
pub(super) fn flags(socket: BorrowedFd<'_>, name: &str) -> io::Result<u16> {
    get::<SIOCGIFFLAGS>(socket, name).map(|f| f as u16)
}

/// Sets the interface's `IFF_*` flags.
pub(super) fn set_flags(socket: BorrowedFd<'_>, name: &str, flags: u16) -> io::Result<()> {
    set::<SIOCSIFFLAGS>(socket, name, &(flags as i16).to_ne_bytes())
}

/// The interface's MTU.
pub(super) fn mtu(socket: BorrowedFd<'_>, name: &str) -> io::Result<u32> {
    get::<SIOCGIFMTU>(socket, name).map(|m| m as u32)
}

/// Sets the interface's MTU.
pub(super) fn set_mtu(socket: BorrowedFd<'_>, name: &str, mtu: u32) -> io::Result<()> {
    let mtu = i32::try_from(mtu).map_err(|_| io::Errno::INVAL)?;
    set::<SIOCSIFMTU>(socket, name, &mtu.to_ne_bytes())
}
