//! Driver memory as memfds: created sealed against growth, handed to clients with no more
//! rights than the memory type allows, and emptied to revoke it.

use std::{
    io,
    os::fd::{AsRawFd, OwnedFd},
};

use rustix::fs::{MemfdFlags, Mode, OFlags, SealFlags};

/// A zero-filled memfd of `size` bytes that no one can grow.
pub fn create(name: &str, size: u64) -> io::Result<OwnedFd> {
    let fd = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
    rustix::fs::ftruncate(&fd, size)?;
    rustix::fs::fcntl_add_seals(&fd, SealFlags::GROW)?;
    Ok(fd)
}

/// A descriptor for a client: the same file, read-write for a writable type, otherwise a fresh
/// read-only open of it (so `mmap(PROT_WRITE, MAP_SHARED)` fails with `EACCES`, whatever the
/// client asks for).
pub fn client_fd(backing: &OwnedFd, writable: bool) -> io::Result<OwnedFd> {
    if writable {
        return backing.try_clone();
    }
    let path = format!("/proc/self/fd/{}", backing.as_raw_fd());
    Ok(rustix::fs::open(path, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())?)
}

/// Empties the memory: a client that still maps it faults on its next touch.
pub fn revoke(backing: &OwnedFd) -> io::Result<()> {
    Ok(rustix::fs::ftruncate(backing, 0)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_read_only_descriptor_cannot_write() {
        let fd = create("test", 4096).unwrap();
        let ro = client_fd(&fd, false).unwrap();
        assert!(rustix::io::pwrite(&ro, b"x", 0).is_err());
        rustix::io::pwrite(&fd, b"abc", 0).unwrap();
        let mut buf = [0u8; 3];
        rustix::io::pread(&ro, &mut buf, 0).unwrap();
        assert_eq!(&buf, b"abc", "the read-only descriptor sees the broker's writes");
    }

    #[test]
    fn memory_cannot_grow_and_revoke_empties() {
        let fd = create("test", 4096).unwrap();
        let rw = client_fd(&fd, true).unwrap();
        assert!(rustix::fs::ftruncate(&rw, 8192).is_err(), "sealed against growth");
        revoke(&fd).unwrap();
        assert_eq!(rustix::fs::fstat(&rw).unwrap().st_size, 0);
    }
}
