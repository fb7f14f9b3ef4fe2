//! The tty ioctls no safe wrapper offers (`rustix::termios` covers the rest): modem lines
//! (`TIOCMGET`, `TIOCMBIS`, `TIOCMBIC`), the output queue (`TIOCOUTQ`), and a break held for a
//! while (`TIOCSBRK`, `TIOCCBRK`). Each is the kernel's documented `int` in or out, on a tty
//! descriptor the driver owns.

use std::os::fd::BorrowedFd;

use rustix::{
    io,
    ioctl::{Getter, NoArg, Opcode, Setter, ioctl},
};

/// The modem lines set now (`TIOCM_*` bits).
pub(super) fn modem_bits(fd: BorrowedFd<'_>) -> io::Result<i32> {
    // SAFETY: TIOCMGET writes one `int` of modem bits (tty_ioctl(4)); `Getter<_, i32>` provides
    // exactly that storage.
    unsafe { ioctl(fd, Getter::<{ libc::TIOCMGET as Opcode }, i32>::new()) }
}

/// Raises the modem lines in `bits`.
pub(super) fn modem_set(fd: BorrowedFd<'_>, bits: i32) -> io::Result<()> {
    // SAFETY: TIOCMBIS reads one `int` through the pointer `Setter` passes (tty_ioctl(4)).
    unsafe { ioctl(fd, Setter::<{ libc::TIOCMBIS as Opcode }, i32>::new(bits)) }
}

/// Lowers the modem lines in `bits`.
pub(super) fn modem_clear(fd: BorrowedFd<'_>, bits: i32) -> io::Result<()> {
    // SAFETY: TIOCMBIC reads one `int` through the pointer `Setter` passes (tty_ioctl(4)).
    unsafe { ioctl(fd, Setter::<{ libc::TIOCMBIC as Opcode }, i32>::new(bits)) }
}

/// Bytes waiting in the output queue.
pub(super) fn output_queued(fd: BorrowedFd<'_>) -> io::Result<i32> {
    // SAFETY: TIOCOUTQ writes one `int`, the output queue's length (tty_ioctl(4)).
    unsafe { ioctl(fd, Getter::<{ libc::TIOCOUTQ as Opcode }, i32>::new()) }
}

/// Starts (`true`) or ends (`false`) a break.
pub(super) fn set_break(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    // SAFETY: TIOCSBRK and TIOCCBRK take no argument (tty_ioctl(4)).
    unsafe {
        if on {
            ioctl(fd, NoArg::<{ libc::TIOCSBRK as Opcode }>::new())
        } else {
            ioctl(fd, NoArg::<{ libc::TIOCCBRK as Opcode }>::new())
        }
    }
}
