//! The kernel's hotplug announcements: a `NETLINK_KOBJECT_UEVENT` socket bound to the kernel's
//! multicast group. Every message is hostile until checked: only the kernel's are accepted
//! (sender port id 0 — udev's CVE-2009-1185 was a uevent forged from user space), each is
//! parsed strictly ([`super::uevent`]), and a message longer than any the kernel sends is
//! refused whole, never read in part.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::{
    io::Errno,
    net::{
        AddressFamily, RecvFlags, SocketFlags, SocketType, netlink, recvfrom, socket_with,
        sockopt::{set_socket_recv_buffer_size, set_socket_recv_buffer_size_force},
    },
};

use super::uevent::{self, MAX_MESSAGE, Uevent, UeventError};

/// The kernel's uevent multicast group (udev listens on group 2, for its own re-broadcasts).
const KERNEL_GROUP: u32 = 1;

/// The receive buffer asked for: room for a storm (a `losetup` of 64 devices sends hundreds).
const RECEIVE_BUFFER: usize = 8 << 20;

/// What one receive gave.
#[derive(Debug)]
pub enum Received {
    /// A kernel uevent, checked.
    Event(Uevent),
    /// A message refused: not from the kernel, or malformed.
    Refused(UeventError),
    /// The kernel dropped messages (the buffer overflowed): what is known may be stale.
    Overrun,
    /// Nothing waiting (a non-blocking receive).
    Empty,
}

/// A socket on the kernel's uevent group.
#[derive(Debug)]
pub struct UeventSocket {
    fd: OwnedFd,
}

impl UeventSocket {
    /// Opens and binds the socket (non-blocking, close-on-exec). Any user may listen.
    pub fn open() -> std::io::Result<UeventSocket> {
        let fd = socket_with(
            AddressFamily::NETLINK,
            SocketType::RAW,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            Some(netlink::KOBJECT_UEVENT),
        )?;
        rustix::net::bind(&fd, &netlink::SocketAddrNetlink::new(0, KERNEL_GROUP))?;
        // Past net.core.rmem_max only with CAP_NET_ADMIN; the plain request is the fallback.
        if set_socket_recv_buffer_size_force(&fd, RECEIVE_BUFFER).is_err() {
            let _ = set_socket_recv_buffer_size(&fd, RECEIVE_BUFFER);
        }
        Ok(UeventSocket { fd })
    }

    /// The next message, without waiting.
    pub fn receive(&self) -> std::io::Result<Received> {
        let mut buf = [0u8; MAX_MESSAGE + 1];
        let (length, sender) = match recvfrom(&self.fd, &mut buf[..], RecvFlags::TRUNC) {
            Ok((_, length, sender)) => (length, sender),
            Err(Errno::AGAIN) => return Ok(Received::Empty),
            Err(Errno::NOBUFS) => return Ok(Received::Overrun),
            Err(Errno::INTR) => return Ok(Received::Empty),
            Err(e) => return Err(e.into()),
        };
        let port = sender
            .and_then(|a| netlink::SocketAddrNetlink::try_from(a).ok())
            .map_or(u32::MAX, |a| a.pid());
        if let Err(e) = uevent::from_kernel(port) {
            return Ok(Received::Refused(e));
        }
        if length > MAX_MESSAGE {
            return Ok(Received::Refused(UeventError::TooLong(length)));
        }
        let message = buf.get(..length).unwrap_or_default();
        Ok(match uevent::parse(message) {
            Ok(event) => Received::Event(event),
            Err(e) => Received::Refused(e),
        })
    }
}

impl AsFd for UeventSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
