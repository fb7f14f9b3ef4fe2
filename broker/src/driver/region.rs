//! A driver's own mapping of memory it shares with a client, for device I/O straight into it
//! (`pread` from a device into the mapping, `pwrite` from it): one copy, by the kernel, where a
//! bounce buffer would take two.
//!
//! The broker never makes a Rust reference into this memory: the client writes it whenever it
//! likes, so a `&[u8]` over it would be a data race in Rust's terms. Only the kernel touches
//! it, through raw pointers handed to `pread`/`pwrite`. The memory is a memfd sealed against
//! shrinking ([`super::memory::create_writable`]), so no access within its length can fault.

use std::{
    io,
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
};

use rustix::mm::{MapFlags, ProtFlags};

/// A shared, writable mapping of a sealed memfd, for the kernel to move device data through.
#[derive(Debug)]
pub struct Region {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory that only system calls read or write (through raw
// pointers, never references); it may be used and dropped from any thread.
unsafe impl Send for Region {}
// SAFETY: as above: `&Region` only hands raw pointers to the kernel.
unsafe impl Sync for Region {}

impl Region {
    /// Maps all of `fd`, which must be a memfd sealed against shrinking (else refused, since a
    /// client could then make the broker fault).
    pub fn map(fd: impl AsFd) -> io::Result<Region> {
        let fd = fd.as_fd();
        let seals = rustix::fs::fcntl_get_seals(fd)?;
        if !seals.contains(rustix::fs::SealFlags::SHRINK | rustix::fs::SealFlags::SEAL) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "only memory sealed against shrinking is mapped by the broker",
            ));
        }
        let len = usize::try_from(rustix::fs::fstat(fd)?.st_size).map_err(io::Error::other)?;
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty memory"));
        }
        // SAFETY: a new mapping at an address the kernel picks, of a file of `len` bytes that
        // cannot shrink (checked above); nothing refers to that address range yet.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                fd,
                0,
            )?
        };
        let base = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Region { base, len })
    }

    /// Its length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it is empty (never: an empty memory is not mapped).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The raw pointer to `[at, at + len)`, if that range is inside the mapping.
    fn span(&self, at: usize, len: usize) -> io::Result<*mut u8> {
        match at.checked_add(len) {
            Some(end) if end <= self.len => {
                // SAFETY: `at + len <= self.len`, so the offset stays inside the mapping.
                Ok(unsafe { self.base.as_ptr().add(at) })
            }
            _ => Err(io::Error::new(io::ErrorKind::InvalidInput, "outside the region")),
        }
    }

    /// `pread(fd, region[at..at + len], offset)`: the kernel writes device data into the region.
    pub fn read_from(&self, fd: impl AsFd, at: usize, len: usize, offset: u64) -> io::Result<usize> {
        let ptr = self.span(at, len)?;
        let offset = libc::off_t::try_from(offset).map_err(io::Error::other)?;
        // SAFETY: `ptr..ptr + len` lies inside a live mapping that cannot fault (a sealed
        // memfd); the kernel writes it, and no Rust reference to it exists.
        let n = unsafe { libc::pread(fd.as_fd().as_raw_fd(), ptr.cast(), len, offset) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    /// `pwrite(fd, region[at..at + len], offset)`: the kernel reads the region to the device.
    pub fn write_to(&self, fd: impl AsFd, at: usize, len: usize, offset: u64) -> io::Result<usize> {
        let ptr = self.span(at, len)?;
        let offset = libc::off_t::try_from(offset).map_err(io::Error::other)?;
        // SAFETY: as in `read_from`; here the kernel only reads the range.
        let n = unsafe { libc::pwrite(fd.as_fd().as_raw_fd(), ptr.cast(), len, offset) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` came from `mmap` in `map`, and no reference into the mapping was
        // ever handed out.
        let _ = unsafe { rustix::mm::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_moves_file_data_in_and_out_within_its_bounds() {
        let memory = super::super::memory::create_writable("test", 8192).unwrap();
        let region = Region::map(&memory).unwrap();
        let file = tempfile::tempfile().unwrap();
        rustix::io::pwrite(&file, b"0123456789", 0).unwrap();
        assert_eq!(region.read_from(&file, 4096, 10, 0).unwrap(), 10);
        let mut seen = [0u8; 10];
        rustix::io::pread(&memory, &mut seen, 4096).unwrap();
        assert_eq!(
            &seen, b"0123456789",
            "the memory's own descriptor sees what the kernel wrote"
        );
        assert_eq!(region.write_to(&file, 4098, 4, 100).unwrap(), 4);
        let mut back = [0u8; 4];
        rustix::io::pread(&file, &mut back, 100).unwrap();
        assert_eq!(&back, b"2345");
        assert!(region.read_from(&file, 8190, 10, 0).is_err(), "past the end");
        assert!(region.read_from(&file, usize::MAX, 2, 0).is_err(), "overflowing");
    }

    #[test]
    fn region_refuses_memory_that_could_shrink() {
        let loose = rustix::fs::memfd_create("loose", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&loose, 4096).unwrap();
        assert!(Region::map(&loose).is_err());
    }
}
