//! Driver memory as memfds, made so that the kernel enforces what a memory type promises,
//! whatever a client does with the descriptor it holds.
//!
//! A memfd's inode is mode 0777 when created: any process holding a read-only descriptor could
//! reopen `/proc/self/fd/N` read-write, and anyone holding a writable one could add seals of its
//! own (`F_SEAL_SHRINK` would then defeat revocation). So every memfd made here:
//! - has its mode cut to the broker's own user (`0400` read-only, `0600` writable): another uid
//!   cannot reopen it through `/proc`, even read-only;
//! - is sealed with `F_SEAL_SEAL` last, so nobody adds or changes a seal after the broker;
//! - read-only memory is also sealed against writes (`F_SEAL_WRITE`) and any change of size
//!   (`F_SEAL_SHRINK`, `F_SEAL_GROW`): no descriptor, however opened (root's included), can
//!   write, map it writable and shared, truncate or extend it;
//! - writable memory is sealed against any change of size (`F_SEAL_SHRINK`, `F_SEAL_GROW`):
//!   pages a client shares cannot vanish from under the broker (a driver may map it and let the
//!   kernel move device data straight into it), and the broker empties it by punching its pages
//!   out ([`revoke`]: `FALLOC_FL_PUNCH_HOLE`, which no client can seal against).

use std::{
    io,
    os::fd::{AsRawFd, OwnedFd},
};

use rustix::fs::{MemfdFlags, Mode, OFlags, SealFlags};

/// A zero-filled, writable memfd of `size` bytes: no one can change its size or add a seal to
/// it, so [`revoke`] always works and a mapping of it never faults.
pub fn create_writable(name: &str, size: u64) -> io::Result<OwnedFd> {
    let fd = new_memfd(name, size)?;
    rustix::fs::fchmod(&fd, Mode::RUSR | Mode::WUSR)?;
    rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)?;
    Ok(fd)
}

/// A read-only memfd of `size` bytes whose contents `init` writes (through the descriptor it is
/// given, e.g. with `pwrite`); afterwards no one can change its bytes or its size.
pub fn create_read_only(name: &str, size: u64, init: impl FnOnce(&OwnedFd) -> io::Result<()>) -> io::Result<OwnedFd> {
    let fd = new_memfd(name, size)?;
    init(&fd)?;
    rustix::fs::fchmod(&fd, Mode::RUSR)?;
    rustix::fs::fcntl_add_seals(
        &fd,
        SealFlags::WRITE | SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL,
    )?;
    Ok(fd)
}

fn new_memfd(name: &str, size: u64) -> io::Result<OwnedFd> {
    let fd = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
    rustix::fs::ftruncate(&fd, size)?;
    Ok(fd)
}

/// A descriptor for a client: the same file, read-write for a writable type, otherwise a fresh
/// read-only open of it (so `mmap(PROT_WRITE, MAP_SHARED)` fails with `EACCES`, whatever the
/// client asks for; and the seals refuse every write however the file is reached).
pub fn client_fd(backing: &OwnedFd, writable: bool) -> io::Result<OwnedFd> {
    if writable {
        return backing.try_clone();
    }
    let path = format!("/proc/self/fd/{}", backing.as_raw_fd());
    Ok(rustix::fs::open(path, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())?)
}

/// Empties the memory: its pages are punched out, so what the user client wrote is gone (and
/// its memory freed); a client that still maps it reads zeros, its own from then on.
pub fn revoke(backing: &OwnedFd) -> io::Result<()> {
    let size = rustix::fs::fstat(backing)?.st_size;
    let size = u64::try_from(size).map_err(io::Error::other)?;
    rustix::fs::fallocate(
        backing,
        rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
        0,
        size,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use rustix::fs::FallocateFlags;

    use super::*;

    fn read_only() -> OwnedFd {
        create_read_only("test", 4096, |fd| {
            rustix::io::pwrite(fd, b"abc", 0).map(drop).map_err(Into::into)
        })
        .unwrap()
    }

    #[test]
    fn memory_read_only_descriptor_reads_what_init_wrote() {
        let ro = client_fd(&read_only(), false).unwrap();
        let mut buf = [0u8; 3];
        rustix::io::pread(&ro, &mut buf, 0).unwrap();
        assert_eq!(&buf, b"abc");
        assert!(rustix::io::pwrite(&ro, b"x", 0).is_err());
    }

    #[test]
    fn memory_read_only_refuses_every_change_even_through_a_writable_descriptor() {
        // The broker's own descriptor is read-write, as a reopen by root would be: the seals,
        // not the descriptor's mode, make the memory read-only.
        let fd = read_only();
        assert_eq!(rustix::io::pwrite(&fd, b"x", 0).unwrap_err(), rustix::io::Errno::PERM);
        assert_eq!(rustix::fs::ftruncate(&fd, 0).unwrap_err(), rustix::io::Errno::PERM);
        assert_eq!(rustix::fs::ftruncate(&fd, 8192).unwrap_err(), rustix::io::Errno::PERM);
        assert_eq!(
            rustix::fs::fallocate(&fd, FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE, 0, 4096).unwrap_err(),
            rustix::io::Errno::PERM
        );
        assert!(rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK).is_err());
        assert_eq!(
            rustix::fs::fcntl_get_seals(&fd).unwrap(),
            SealFlags::WRITE | SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL
        );
        assert_eq!(rustix::fs::fstat(&fd).unwrap().st_mode & 0o777, 0o400);
    }

    #[test]
    fn memory_writable_cannot_be_resized_or_resealed_and_revoke_empties() {
        let fd = create_writable("test", 4096).unwrap();
        let rw = client_fd(&fd, true).unwrap();
        assert!(rustix::fs::ftruncate(&rw, 8192).is_err(), "sealed against growth");
        assert!(rustix::fs::ftruncate(&rw, 0).is_err(), "sealed against shrinking");
        // A client adding F_SEAL_WRITE would make revocation fail: F_SEAL_SEAL stops it.
        for seal in [SealFlags::WRITE, SealFlags::FUTURE_WRITE, SealFlags::SEAL] {
            assert!(rustix::fs::fcntl_add_seals(&rw, seal).is_err(), "{seal:?} added");
        }
        rustix::io::pwrite(&rw, b"the client's data", 100).unwrap();
        assert!(rustix::fs::fstat(&rw).unwrap().st_blocks > 0);
        revoke(&fd).unwrap();
        let after = rustix::fs::fstat(&rw).unwrap();
        assert_eq!((after.st_size, after.st_blocks), (4096, 0), "every page punched out");
        let mut back = [1u8; 17];
        rustix::io::pread(&rw, &mut back, 100).unwrap();
        assert_eq!(back, [0u8; 17]);
        assert_eq!(after.st_mode & 0o777, 0o600);
    }
}
