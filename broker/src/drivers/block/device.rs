//! The block device: the node opened once, its geometry read once; blocks copied between the
//! device and each user client's `dma` memory, every range checked first.

use std::{
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{
        Arc, LazyLock,
        atomic::{AtomicUsize, Ordering},
    },
};

use portcullis_proto::Status;
use rustix::{fs::OFlags, io::Errno};

use super::{
    methods::{DMA, LAYOUTS, MEMORY_TYPES, Selector, TABLE},
    sys,
};
use crate::{
    driver::{
        Backing, CallArgs, CallContext, CallOutput, CallResult, ClientKey, Completion, Driver, DriverError, DriverLive,
        Family, MemoryType, MethodSpec, NativeStruct, PowerChange, memory, region::Region,
    },
    drivers::node::{self, NodeKind},
    registry::OpenMode,
};

/// The block family.
pub static FAMILY: LazyLock<Family> =
    LazyLock::new(|| Family::new("block", "BlockDevice", LAYOUTS, &TABLE, &MEMORY_TYPES));

static GEOMETRY: LazyLock<NativeStruct> = LazyLock::new(|| NativeStruct::of(FAMILY.schema(), "block_geometry"));

/// Bytes copied per system call between the device and `dma`.
const CHUNK: usize = 256 << 10;

/// What the device is, read once when it is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Size in bytes.
    pub size_bytes: u64,
    /// Logical block size: the unit of `lba` and `count`.
    pub logical_block: u32,
    /// Physical block size.
    pub physical_block: u32,
    /// The device, or the broker's configuration, allows no writes.
    pub read_only: bool,
    /// The device says it spins.
    pub rotational: bool,
}

/// One block device.
#[derive(Debug)]
pub struct BlockDevice {
    path: PathBuf,
    /// For ioctls, and buffered I/O where direct I/O is refused.
    fd: Arc<OwnedFd>,
    /// The same device opened `O_DIRECT`, when it allows it: blocks move between the device
    /// and a user client's mapped memory with no page cache or bounce buffer in between.
    direct: Option<OwnedFd>,
    geometry: Geometry,
    opens: AtomicUsize,
    /// The device went away (its nub was removed, or its media): every call from now on, and
    /// one that was running, ends with `NO_DEVICE`.
    terminated: std::sync::atomic::AtomicBool,
}

fn bad(message: impl Into<String>) -> DriverError {
    DriverError::new(Status::BadArgument, message)
}

impl BlockDevice {
    /// Opens the block device at `path`, read-write unless `read_only` or the device itself is
    /// read-only.
    pub fn open(path: &Path, read_only: bool) -> Result<BlockDevice, String> {
        BlockDevice::open_node(path, read_only, false, None)
    }

    /// [`BlockDevice::open`], `O_EXCL` when `exclusive` (the kernel's claim: refused while the
    /// device is mounted or claimed, and keeping others from claiming it), and for a node the
    /// kernel announced with device number `expect`: the node must be that device, and not a
    /// link to it.
    pub fn open_node(
        path: &Path,
        read_only: bool,
        exclusive: bool,
        expect: Option<u64>,
    ) -> Result<BlockDevice, String> {
        let named = path.display();
        let probe = node::open(path, NodeKind::Block, OFlags::RDONLY, expect)?;
        let device_ro = sys::read_only(probe.as_fd()).map_err(|e| format!("{named}: BLKROGET: {e}"))?;
        let read_only = read_only || device_ro;
        let access = if read_only { OFlags::RDONLY } else { OFlags::RDWR };
        let fd = if read_only && !exclusive {
            probe
        } else {
            drop(probe);
            let claim = if exclusive { OFlags::EXCL } else { OFlags::empty() };
            node::open(path, NodeKind::Block, access | claim, expect).map_err(|e| {
                if exclusive && e.ends_with("Device or resource busy") {
                    format!("{e} (claimed by another: mounted, or opened O_EXCL)")
                } else {
                    e
                }
            })?
        };
        let direct = node::open(path, NodeKind::Block, access | OFlags::DIRECT, expect).ok();
        let stat = rustix::fs::fstat(&fd).map_err(|e| format!("{named}: {e}"))?;
        let (major, minor) = (rustix::fs::major(stat.st_rdev), rustix::fs::minor(stat.st_rdev));
        let rotational = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/queue/rotational"))
            .is_ok_and(|s| s.trim() == "1");
        let logical = sys::logical_block(fd.as_fd()).map_err(|e| format!("{named}: BLKSSZGET: {e}"))?;
        let logical_block = u32::try_from(logical)
            .ok()
            .filter(|b| b.is_power_of_two() && u64::from(*b) <= DMA.size)
            .ok_or_else(|| format!("{named}: a logical block of {logical} bytes"))?;
        let geometry = Geometry {
            size_bytes: sys::size_bytes(fd.as_fd()).map_err(|e| format!("{named}: BLKGETSIZE64: {e}"))?,
            logical_block,
            physical_block: sys::physical_block(fd.as_fd()).unwrap_or(logical_block),
            read_only,
            rotational,
        };
        Ok(BlockDevice {
            path: path.to_path_buf(),
            fd: Arc::new(fd),
            direct,
            geometry,
            opens: AtomicUsize::new(0),
            terminated: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// What the device is.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn failed(&self, what: &str, e: Errno) -> DriverError {
        // An I/O error is the device failing the transfer — its media going (a loop device's
        // file emptied, a card pulled) or failing — not a fault of the broker.
        if e == Errno::NXIO || e == Errno::NODEV || e == Errno::NOMEDIUM || e == Errno::IO {
            return DriverError::new(
                Status::NoDevice,
                format!("{} went away: {what}: {e}", self.path.display()),
            );
        }
        DriverError::new(Status::Internal, format!("{}: {what}: {e}", self.path.display()))
    }

    /// The device bytes `[lba, lba + count)` in logical blocks, checked against the device's
    /// size; with `offset`, also the `dma` bytes they travel through.
    fn range(&self, lba: u64, count: u64, offset: Option<u64>) -> Result<(u64, u64), DriverError> {
        let block = u64::from(self.geometry.logical_block);
        if count == 0 {
            return Err(bad("count 0: at least one block"));
        }
        let overflow = || bad(format!("lba {lba} + count {count} overflows"));
        let len = count.checked_mul(block).ok_or_else(overflow)?;
        let start = lba.checked_mul(block).ok_or_else(overflow)?;
        let end = start.checked_add(len).ok_or_else(overflow)?;
        if end > self.geometry.size_bytes {
            return Err(bad(format!(
                "blocks {lba}..{} are past the end of the device ({} blocks of {block} bytes)",
                lba.saturating_add(count),
                self.geometry.size_bytes / block
            )));
        }
        if let Some(offset) = offset {
            if offset % block != 0 {
                return Err(bad(format!("offset {offset}: a multiple of the {block}-byte block")));
            }
            if offset.checked_add(len).is_none_or(|end| end > DMA.size) {
                return Err(bad(format!(
                    "{len} bytes at offset {offset} do not fit the {}-byte dma memory",
                    DMA.size
                )));
            }
        }
        Ok((start, len))
    }

    fn writable(&self, mode: OpenMode, what: &str) -> Result<(), DriverError> {
        if self.geometry.read_only {
            return Err(DriverError::new(
                Status::NotWritable,
                format!("{} is read-only: no {what}", self.path.display()),
            ));
        }
        if mode != OpenMode::Exclusive {
            return Err(DriverError::new(
                Status::NotWritable,
                format!(
                    "a shared open of {} may only read: open it exclusively to {what}",
                    self.path.display()
                ),
            ));
        }
        Ok(())
    }

    fn get_geometry(&self) -> CallResult {
        let g = self.geometry;
        Ok(CallOutput {
            scalars: vec![],
            struct_out: GEOMETRY.build(&[
                ("size_bytes", g.size_bytes),
                ("logical_block", u64::from(g.logical_block)),
                ("physical_block", u64::from(g.physical_block)),
                ("read_only", u64::from(g.read_only)),
                ("rotational", u64::from(g.rotational)),
            ]),
        })
    }

    /// Copies `len` bytes from `from` at `from_at` to `to` at `to_at`, through a bounce buffer.
    fn copy(
        &self,
        (from, mut from_at): (&OwnedFd, u64),
        (to, mut to_at): (&OwnedFd, u64),
        len: u64,
    ) -> Result<u64, DriverError> {
        let mut buf = vec![0u8; (len as usize).min(CHUNK)];
        let mut left = len;
        while left > 0 {
            let want = (left as usize).min(buf.len());
            let chunk = buf.get_mut(..want).unwrap_or_default();
            let got = rustix::io::pread(from, &mut *chunk, from_at).map_err(|e| self.failed("read", e))?;
            if got == 0 {
                return Err(DriverError::new(
                    Status::NoDevice,
                    format!("{} ended early (a shrunk device or dma memory)", self.path.display()),
                ));
            }
            let data = chunk.get(..got).unwrap_or_default();
            let mut put = 0;
            while put < got {
                let n = rustix::io::pwrite(to, data.get(put..).unwrap_or_default(), to_at + put as u64)
                    .map_err(|e| self.failed("write", e))?;
                put += n;
            }
            from_at += got as u64;
            to_at += got as u64;
            left -= got as u64;
        }
        Ok(len)
    }

    /// Moves `len` bytes between device offset `start` and `dma[offset..]` with direct I/O
    /// (offsets and lengths are multiples of the logical block, the mapping page-aligned).
    fn direct_transfer(
        &self,
        region: &Region,
        direct: &OwnedFd,
        write: bool,
        offset: u64,
        start: u64,
        len: u64,
    ) -> Result<u64, DriverError> {
        let mut done = 0u64;
        while done < len {
            let at = usize::try_from(offset + done).map_err(|_| bad("offset"))?;
            let want = usize::try_from(len - done).map_err(|_| bad("length"))?;
            let moved = if write {
                region.write_to(direct, at, want, start + done)
            } else {
                region.read_from(direct, at, want, start + done)
            }
            .map_err(|e| {
                self.failed(
                    if write { "write" } else { "read" },
                    Errno::from_io_error(&e).unwrap_or(Errno::IO),
                )
            })?;
            if moved == 0 {
                return Err(DriverError::new(
                    Status::NoDevice,
                    format!("{} ended early", self.path.display()),
                ));
            }
            done += moved as u64;
        }
        Ok(len)
    }

    fn transfer(&self, ctx: &CallContext<'_>, write: bool, [lba, count, offset]: [u64; 3]) -> CallResult {
        if write {
            self.writable(ctx.mode, "writes")?;
        }
        let (start, len) = self.range(lba, count, Some(offset))?;
        let dma = ctx
            .memory(DMA.id)
            .ok_or_else(|| bad("map the dma memory type (0) first: blocks travel through it"))?;
        let moved = match (&dma.backing.region, &self.direct) {
            // One copy, by the kernel, straight between the device and the client's memory.
            (Some(region), Some(direct)) => self.direct_transfer(region, direct, write, offset, start, len)?,
            _ if write => self.copy((&dma.backing.fd, offset), (&self.fd, start), len)?,
            _ => self.copy((&self.fd, start), (&dma.backing.fd, offset), len)?,
        };
        Ok(CallOutput {
            scalars: vec![moved],
            struct_out: vec![],
        })
    }
}

impl Driver for BlockDevice {
    fn family(&self) -> &'static Family {
        &FAMILY
    }

    /// Going to sleep: what was written reaches the device (its write cache flushed).
    fn power(&self, change: PowerChange, _deadline: std::time::Instant) -> Result<(), DriverError> {
        if change == PowerChange::Sleep && !self.terminated.load(Ordering::Acquire) {
            rustix::fs::fdatasync(&*self.fd).map_err(|e| self.failed("fdatasync", e))?;
        }
        Ok(())
    }

    fn call(&self, ctx: &CallContext<'_>, spec: &MethodSpec, args: CallArgs) -> Completion {
        let Some(selector) = Selector::from_u32(spec.selector) else {
            return Completion::Ready(Err(DriverError::new(
                Status::Internal,
                format!("no block method {}", spec.selector),
            )));
        };
        let gone = || {
            self.terminated
                .load(Ordering::Acquire)
                .then(|| DriverError::new(Status::NoDevice, format!("{} went away", self.path.display())))
        };
        if let Some(gone) = gone() {
            return Completion::Ready(Err(gone));
        }
        let result = match selector {
            Selector::GetGeometry => self.get_geometry(),
            Selector::ReadBlocks => self.transfer(ctx, false, args.scalars()),
            Selector::WriteBlocks => self.transfer(ctx, true, args.scalars()),
            Selector::Flush => self.writable(ctx.mode, "flushes").and_then(|()| {
                rustix::fs::fdatasync(&*self.fd)
                    .map(|()| CallOutput::default())
                    .map_err(|e| self.failed("fdatasync", e))
            }),
            Selector::Discard => {
                let [lba, count] = args.scalars();
                self.writable(ctx.mode, "discards")
                    .and_then(|()| self.range(lba, count, None))
                    .and_then(|(start, len)| match sys::discard(self.fd.as_fd(), start, len) {
                        Ok(()) => Ok(CallOutput::default()),
                        Err(e) if e == Errno::OPNOTSUPP || e == Errno::NOTSUP || e == Errno::INVAL => Err(
                            DriverError::new(Status::Unsupported, format!("{} cannot discard", self.path.display())),
                        ),
                        Err(e) => Err(self.failed("BLKDISCARD", e)),
                    })
            }
        };
        // A transfer that ran while the device went: what it moved is not to be trusted.
        Completion::Ready(match gone() {
            Some(gone) => Err(gone),
            None => result,
        })
    }

    fn terminate(&self) {
        self.terminated.store(true, Ordering::Release);
    }

    fn create_memory(&self, memory_type: &MemoryType) -> Result<Backing, DriverError> {
        if memory_type.id != DMA.id {
            return Err(bad(format!("no memory type {}", memory_type.id)));
        }
        let fd = memory::create_writable("portcullis-block-dma", DMA.size)
            .map_err(|e| DriverError::new(Status::NoMemory, format!("dma: {e}")))?;
        // The broker's own mapping, for direct I/O; without it, transfers go through a buffer.
        let region = Region::map(&fd)
            .inspect_err(|e| tracing::debug!(error = %e, "dma not mapped by the broker"))
            .ok()
            .map(Arc::new);
        Ok(Backing {
            fd: Arc::new(fd),
            revocable: true,
            region,
        })
    }

    fn opened(&self, _client: ClientKey, _mode: OpenMode) -> Result<(), DriverError> {
        self.opens.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn closed(&self, _client: ClientKey) {
        self.opens.fetch_sub(1, Ordering::Relaxed);
    }

    fn live(&self) -> DriverLive {
        DriverLive {
            opens: self.opens.load(Ordering::Relaxed),
            waiting: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_table_and_layout_are_valid() {
        assert_eq!(FAMILY.methods().rows().len(), TABLE.len());
        let size = |abi: &str| {
            let schema = FAMILY.schema();
            schema
                .layout(
                    schema.index("block_geometry").unwrap(),
                    portcullis_proto::layout::AbiId::by_name(abi).unwrap().abi(),
                )
                .size
        };
        assert_eq!((size("x86_64"), size("i386"), size("m68k")), (24, 20, 18));
    }

    fn device(size_bytes: u64) -> BlockDevice {
        BlockDevice {
            path: "/dev/test".into(),
            fd: Arc::new(rustix::fs::open("/dev/null", OFlags::RDONLY, rustix::fs::Mode::empty()).unwrap()),
            direct: None,
            geometry: Geometry {
                size_bytes,
                logical_block: 512,
                physical_block: 4096,
                read_only: false,
                rotational: false,
            },
            opens: AtomicUsize::new(0),
            terminated: std::sync::atomic::AtomicBool::new(false),
        }
    }

    #[test]
    fn block_ranges_are_checked_without_overflow() {
        let dev = device(1 << 20);
        assert_eq!(dev.range(0, 2048, None).unwrap(), (0, 1 << 20));
        assert!(dev.range(1, 2048, None).is_err(), "one block past the end");
        assert!(dev.range(0, 0, None).is_err(), "zero blocks");
        assert!(dev.range(u64::MAX, 1, None).is_err(), "lba overflows");
        assert!(dev.range(1, u64::MAX, None).is_err(), "count overflows");
        assert!(dev.range(u64::MAX / 512, 2, None).is_err(), "lba + count overflows");
        assert!(dev.range(0, 1, Some(100)).is_err(), "a misaligned dma offset");
        assert!(dev.range(0, 1, Some((1 << 20) - 512)).is_ok());
        assert!(dev.range(0, 2, Some((1 << 20) - 512)).is_err(), "past the dma memory");
        assert!(dev.range(0, 1, Some(u64::MAX - 511)).is_err(), "offset + len overflows");
    }

    #[test]
    fn block_writes_need_an_exclusive_open_of_a_writable_device() {
        let mut dev = device(1 << 20);
        assert_eq!(
            dev.writable(OpenMode::Shared, "writes").unwrap_err().status,
            Status::NotWritable
        );
        assert!(dev.writable(OpenMode::Exclusive, "writes").is_ok());
        dev.geometry.read_only = true;
        let err = dev.writable(OpenMode::Exclusive, "writes").unwrap_err();
        assert_eq!(err.status, Status::NotWritable);
        assert!(err.message.contains("read-only"), "{err}");
    }
}
