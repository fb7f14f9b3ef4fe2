//! The block family's method table (docs/drivers/block.md):
//!
//! | sel | name           | in                          | out                    |
//! |-----|----------------|-----------------------------|------------------------|
//! | 0   | `get_geometry` | —                           | struct `block_geometry`|
//! | 1   | `read_blocks`  | lba, count, offset          | bytes read             |
//! | 2   | `write_blocks` | lba, count, offset          | bytes written          |
//! | 3   | `flush`        | —                           | —                      |
//! | 4   | `discard`      | lba, count (`block.discard`)| —                      |
//!
//! Blocks travel through the user client's `dma` memory (memory type 0, 1 MiB, read-write, its
//! own, emptied when it closes): `read_blocks` fills `dma[offset..]` with `count` logical blocks
//! from `lba`; `write_blocks` writes them from there. Many shared openers may read; only an
//! exclusive opener may write, flush or discard, and never on a read-only device
//! (`NOT_WRITABLE`). Every range is checked against the device's size and the `dma` size with
//! overflow-checked arithmetic before any I/O.

use portcullis_proto::Status;

use crate::driver::{MemoryType, MethodSpec, SizeRange};

/// The struct descriptions.
pub const LAYOUTS: &str = include_str!("layout.toml");

/// Memory type `dma`: where blocks are read into and written from.
pub const DMA: MemoryType = MemoryType {
    id: 0,
    name: "dma",
    size: 1 << 20,
    writable: true,
    contents: "blocks as they are on the device (no byte order: raw bytes): read_blocks and write_blocks move count x the logical block size at offset. Emptied when the user client closes",
};

pub(super) const MEMORY_TYPES: [MemoryType; 1] = [DMA];

/// The block family's selectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Selector {
    /// `get_geometry() -> block_geometry`.
    GetGeometry = 0,
    /// `read_blocks(lba, count, offset) -> bytes`.
    ReadBlocks = 1,
    /// `write_blocks(lba, count, offset) -> bytes`.
    WriteBlocks = 2,
    /// `flush()`.
    Flush = 3,
    /// `discard(lba, count)`, privileged.
    Discard = 4,
}

impl Selector {
    pub(super) fn from_u32(selector: u32) -> Option<Selector> {
        [
            Selector::GetGeometry,
            Selector::ReadBlocks,
            Selector::WriteBlocks,
            Selector::Flush,
            Selector::Discard,
        ]
        .into_iter()
        .find(|s| *s as u32 == selector)
    }
}

const fn row(
    selector: Selector,
    name: &'static str,
    scalar_names: &'static [&'static str],
    scalar_out: u8,
) -> MethodSpec {
    MethodSpec {
        selector: selector as u32,
        name,
        scalar_in: scalar_names.len() as u8,
        scalar_names,
        scalar_out,
        struct_in: SizeRange::NONE,
        struct_out: SizeRange::NONE,
        is_async: false,
        privilege: None,
        in_layout: None,
        out_layout: None,
        scalar_max: &[],
        statuses: &[],
    }
}

/// What `BAD_ARGUMENT` means for a transfer.
const RANGE: &str = "the blocks are outside the device, or count x the block size at offset outside the dma memory (or it is not mapped)";

/// What `NOT_WRITABLE` means.
const NOT_WRITABLE: &str =
    "the device is read-only, or this user client's open is shared (only an exclusive open writes)";

pub(super) const TABLE: [MethodSpec; 5] = [
    MethodSpec {
        out_layout: Some("block_geometry"),
        ..row(Selector::GetGeometry, "get_geometry", &[], 0)
    },
    MethodSpec {
        statuses: &[
            (Status::BadArgument, RANGE),
            (
                Status::NoDevice,
                "the device ended early (it shrank), failed the transfer (an I/O error: its media went or is failing) or went away",
            ),
        ],
        ..row(Selector::ReadBlocks, "read_blocks", &["lba", "count", "offset"], 1)
    },
    MethodSpec {
        statuses: &[
            (Status::BadArgument, RANGE),
            (Status::NotWritable, NOT_WRITABLE),
            (
                Status::NoDevice,
                "the device ended early (it shrank), failed the transfer (an I/O error: its media went or is failing) or went away",
            ),
        ],
        ..row(Selector::WriteBlocks, "write_blocks", &["lba", "count", "offset"], 1)
    },
    MethodSpec {
        statuses: &[(Status::NotWritable, NOT_WRITABLE)],
        ..row(Selector::Flush, "flush", &[], 0)
    },
    MethodSpec {
        privilege: Some("block.discard"),
        statuses: &[
            (Status::BadArgument, "the blocks are outside the device"),
            (Status::NotWritable, NOT_WRITABLE),
            (Status::Unsupported, "the device cannot discard"),
        ],
        ..row(Selector::Discard, "discard", &["lba", "count"], 0)
    },
];
