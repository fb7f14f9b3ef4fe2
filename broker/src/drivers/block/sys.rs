//! The block ioctls no safe wrapper offers: the device's size (`BLKGETSIZE64`), its logical and
//! physical block sizes (`BLKSSZGET`, `BLKPBSZGET`), whether it is read-only (`BLKROGET`), and
//! discarding a byte range (`BLKDISCARD`). Each passes the kernel's documented argument, on a
//! block device descriptor the driver owns.

use std::os::fd::BorrowedFd;

use rustix::{
    io,
    ioctl::{Getter, Setter, ioctl, opcode},
};

/// `BLKGETSIZE64`: `_IOR(0x12, 114, size_t)`, the size in bytes.
pub(super) fn size_bytes(fd: BorrowedFd<'_>) -> io::Result<u64> {
    // SAFETY: BLKGETSIZE64 writes one u64 (block/ioctl.c); `Getter<_, u64>` provides it.
    unsafe { ioctl(fd, Getter::<{ opcode::read::<u64>(0x12, 114) }, u64>::new()) }
}

/// `BLKSSZGET`: `_IO(0x12, 104)`, the logical block size (an `int` written through the argument).
pub(super) fn logical_block(fd: BorrowedFd<'_>) -> io::Result<i32> {
    // SAFETY: BLKSSZGET writes one int (block/ioctl.c).
    unsafe { ioctl(fd, Getter::<{ opcode::none(0x12, 104) }, i32>::new()) }
}

/// `BLKPBSZGET`: `_IO(0x12, 123)`, the physical block size (an `unsigned int`).
pub(super) fn physical_block(fd: BorrowedFd<'_>) -> io::Result<u32> {
    // SAFETY: BLKPBSZGET writes one unsigned int (block/ioctl.c).
    unsafe { ioctl(fd, Getter::<{ opcode::none(0x12, 123) }, u32>::new()) }
}

/// `BLKROGET`: `_IO(0x12, 94)`, non-zero for a read-only device (an `int`).
pub(super) fn read_only(fd: BorrowedFd<'_>) -> io::Result<bool> {
    // SAFETY: BLKROGET writes one int (block/ioctl.c).
    unsafe { ioctl(fd, Getter::<{ opcode::none(0x12, 94) }, i32>::new()) }.map(|ro| ro != 0)
}

/// `BLKDISCARD`: `_IO(0x12, 119)`, discards `len` bytes from `start` (a `u64[2]` read).
pub(super) fn discard(fd: BorrowedFd<'_>, start: u64, len: u64) -> io::Result<()> {
    // SAFETY: BLKDISCARD reads a `u64[2]` {start, length} in bytes (block/ioctl.c); `Setter`
    // passes a pointer to exactly that.
    unsafe { ioctl(fd, Setter::<{ opcode::none(0x12, 119) }, [u64; 2]>::new([start, len])) }
}
