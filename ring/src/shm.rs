//! The ring's shared mapping: the crate's only unsafe code.
//!
//! Everything in the mapping is reached through atomics — control words as [`AtomicU32`],
//! record bytes as [`AtomicU64`] words — so that a peer writing the same memory at the same
//! time is a race on values, never undefined behaviour in this process. The types here are
//! `repr(C)` and hold no pointers; their offsets are checked against `portcullis_proto::ring`
//! at compile time.

use std::{
    io,
    os::fd::{AsFd, OwnedFd},
    ptr::NonNull,
    sync::atomic::{AtomicU32, AtomicU64},
};

use portcullis_proto::ring::{HEADER_SIZE, MAGIC, RING_VERSION, RingSize, offset};
use rustix::{
    fs::{MemfdFlags, SealFlags},
    mm::{MapFlags, ProtFlags},
};

/// A control word alone on its 64-byte line.
#[repr(C, align(64))]
#[derive(Debug)]
pub struct Line(pub AtomicU32);

/// The ring header as it lies in the mapping (see `portcullis_proto::ring`).
#[repr(C)]
#[derive(Debug)]
pub struct Header {
    /// [`MAGIC`].
    pub magic: AtomicU32,
    /// [`RING_VERSION`].
    pub version: AtomicU32,
    /// Submission ring bytes.
    pub sq_size: AtomicU32,
    /// Completion ring bytes.
    pub cq_size: AtomicU32,
    _reserved: [u32; 12],
    /// Written by the client.
    pub sq_tail: Line,
    /// Written by the broker.
    pub sq_head: Line,
    /// Written by the broker.
    pub cq_tail: Line,
    /// Written by the client.
    pub cq_head: Line,
    /// Written by the broker.
    pub broker_sleeping: Line,
    /// Written by the client.
    pub client_sleeping: Line,
}

const _: () = {
    assert!(std::mem::offset_of!(Header, magic) == offset::MAGIC);
    assert!(std::mem::offset_of!(Header, version) == offset::VERSION);
    assert!(std::mem::offset_of!(Header, sq_size) == offset::SQ_SIZE);
    assert!(std::mem::offset_of!(Header, cq_size) == offset::CQ_SIZE);
    assert!(std::mem::offset_of!(Header, sq_tail) == offset::SQ_TAIL);
    assert!(std::mem::offset_of!(Header, sq_head) == offset::SQ_HEAD);
    assert!(std::mem::offset_of!(Header, cq_tail) == offset::CQ_TAIL);
    assert!(std::mem::offset_of!(Header, cq_head) == offset::CQ_HEAD);
    assert!(std::mem::offset_of!(Header, broker_sleeping) == offset::BROKER_SLEEPING);
    assert!(std::mem::offset_of!(Header, client_sleeping) == offset::CLIENT_SLEEPING);
    assert!(std::mem::size_of::<Header>() <= HEADER_SIZE);
};

/// A mapped ring: header, submission ring, completion ring.
#[derive(Debug)]
pub struct Mapping {
    base: NonNull<u8>,
    len: usize,
    sq_size: RingSize,
    cq_size: RingSize,
}

// SAFETY: the mapping is plain shared memory reached only through atomics; it may be used
// and dropped from any thread.
unsafe impl Send for Mapping {}
// SAFETY: as above; every access through `&Mapping` is an atomic operation.
unsafe impl Sync for Mapping {}

/// Bytes of a mapping with these rings.
pub fn mapping_len(sq: RingSize, cq: RingSize) -> usize {
    HEADER_SIZE + sq.get() as usize + cq.get() as usize
}

impl Mapping {
    /// Creates the ring's memfd (sealed against shrinking and growing) and maps it. The header
    /// is written; both rings are empty.
    pub fn create(sq_size: RingSize, cq_size: RingSize) -> io::Result<(OwnedFd, Mapping)> {
        let len = mapping_len(sq_size, cq_size);
        let fd = rustix::fs::memfd_create("portcullis-ring", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
        rustix::fs::ftruncate(&fd, len as u64)?;
        rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)?;
        let mapping = Mapping::map(&fd, sq_size, cq_size)?;
        let h = mapping.header();
        h.magic.store(MAGIC.to_le(), std::sync::atomic::Ordering::Relaxed);
        h.version
            .store(RING_VERSION.to_le(), std::sync::atomic::Ordering::Relaxed);
        h.sq_size
            .store(sq_size.get().to_le(), std::sync::atomic::Ordering::Relaxed);
        h.cq_size
            .store(cq_size.get().to_le(), std::sync::atomic::Ordering::Relaxed);
        Ok((fd, mapping))
    }

    /// Maps a ring memfd of these sizes read-write and shared. The file must be at least
    /// [`mapping_len`] bytes: a shorter one is refused (touching past its end would fault).
    pub fn map(fd: impl AsFd, sq_size: RingSize, cq_size: RingSize) -> io::Result<Mapping> {
        let len = mapping_len(sq_size, cq_size);
        let stat = rustix::fs::fstat(fd.as_fd())?;
        if u64::try_from(stat.st_size).unwrap_or(0) < len as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the ring file holds {} bytes, {len} needed", stat.st_size),
            ));
        }
        // SAFETY: a fresh mapping at an address the kernel picks, of a file at least `len`
        // bytes long (checked above); nothing else refers to that address range yet.
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
        Ok(Mapping {
            base,
            len,
            sq_size,
            cq_size,
        })
    }

    /// The header.
    pub fn header(&self) -> &Header {
        // SAFETY: the mapping is page-aligned and at least `HEADER_SIZE` bytes (the compile-time
        // check above bounds `Header`), lives as long as `self`, and `Header` is made of atomics
        // only, for which any bit pattern is valid.
        unsafe { self.base.cast::<Header>().as_ref() }
    }

    /// The submission ring's words.
    pub fn sq(&self) -> &[AtomicU64] {
        self.words(HEADER_SIZE, self.sq_size)
    }

    /// The completion ring's words.
    pub fn cq(&self) -> &[AtomicU64] {
        self.words(HEADER_SIZE + self.sq_size.get() as usize, self.cq_size)
    }

    /// Submission ring size.
    pub fn sq_size(&self) -> RingSize {
        self.sq_size
    }

    /// Completion ring size.
    pub fn cq_size(&self) -> RingSize {
        self.cq_size
    }

    fn words(&self, start: usize, size: RingSize) -> &[AtomicU64] {
        let count = size.get() as usize / 8;
        debug_assert!(start + count * 8 <= self.len);
        // SAFETY: `start` is a multiple of 8 within the page-aligned mapping and
        // `start + size <= len` (`mapping_len`); the memory lives as long as `self` and
        // `AtomicU64` accepts any bit pattern.
        unsafe { std::slice::from_raw_parts(self.base.as_ptr().add(start).cast::<AtomicU64>(), count) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` came from `mmap` in `map`; every reference handed out borrows
        // `self`, so none outlives this.
        let _ = unsafe { rustix::mm::munmap(self.base.as_ptr().cast(), self.len) };
    }
}
