//! The sample device's method table, by selector:
//!
//! | sel | name         | in                  | out                                    |
//! |-----|--------------|---------------------|----------------------------------------|
//! | 0   | `add`        | a, b                | a + b (wrapping)                       |
//! | 1   | `echo`       | struct 0..=4096     | the same bytes                         |
//! | 2   | `get_info`   | —                   | struct `sample_info` (16 bytes)        |
//! | 3   | `wait_event` | timeout_ms (async)  | the value passed to `fire_event`, or `TIMEOUT` |
//! | 4   | `fire_event` | value               | number of waiters completed            |
//! | 5   | `reset`      | — (`sample.admin`)  | —                                      |
//! | 7   | `transform_record` | struct `sample_record` | struct `sample_record`, transformed |
//! | 8   | `checksum_dma` | offset, len       | FNV-1a 64 of `dma[offset..offset + len]` |
//!
//! Memory types: 0 `registers` (4 KiB, read-only for clients: `u32 version` at 0 and the magic
//! `0x50435352` at 4, little-endian like a device's registers, whatever the client's order), 1 `dma` (1 MiB, read-write, one buffer per user
//! client, emptied when the user client goes away).
//!
//! Structs are described in `layout.toml` and translated from and to each client's ABI.
//! `sample_info` is `{ u32 version; u32 current_opens; u64 calls_served; }`.
//!
//! `transform_record` is deterministic: every integer field from `u8_` to `handle` + 1, wrapping
//! at the broker's native width (so a 32-bit client whose `long_` is `INT32_MAX` gets
//! `OVERFLOW`, not a wrapped value); `f32_` and `f64_` × 2; `flag` negated; `name` upper-cased
//! (ASCII); `inner` reversed, each `tag` + 1 (wrapping) and each `value` unchanged; `tail`
//! bit-inverted.

use portcullis_proto::Status;

use crate::driver::{MemoryType, MethodSpec, SizeRange};

/// Reported by `get_info`.
pub const SAMPLE_VERSION: u32 = 1;

/// Longest `wait_event` timeout accepted (10 minutes).
pub const MAX_WAIT_MS: u64 = 600_000;

/// The sample device's selectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Selector {
    /// `add(a, b) -> a + b`.
    Add = 0,
    /// `echo(struct) -> struct`.
    Echo = 1,
    /// `get_info() -> sample_info`.
    GetInfo = 2,
    /// `wait_event(timeout_ms) -> value` (async).
    WaitEvent = 3,
    /// `fire_event(value) -> completed`.
    FireEvent = 4,
    /// `reset()`, privileged.
    Reset = 5,
    /// `transform_record(sample_record) -> sample_record`.
    TransformRecord = 7,
    /// `checksum_dma(offset, len) -> fnv1a64`.
    ChecksumDma = 8,
}

impl Selector {
    pub(super) fn from_u32(selector: u32) -> Option<Selector> {
        [
            Selector::Add,
            Selector::Echo,
            Selector::GetInfo,
            Selector::WaitEvent,
            Selector::FireEvent,
            Selector::Reset,
            Selector::TransformRecord,
            Selector::ChecksumDma,
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

/// The struct descriptions.
pub const LAYOUTS: &str = include_str!("layout.toml");

/// Largest `echo` struct.
pub const ECHO_MAX: u32 = 4096;

pub(super) const TABLE: [MethodSpec; 8] = [
    row(Selector::Add, "add", &["a", "b"], 1),
    MethodSpec {
        struct_in: SizeRange::between(0, ECHO_MAX),
        struct_out: SizeRange::between(0, ECHO_MAX),
        ..row(Selector::Echo, "echo", &[], 0)
    },
    MethodSpec {
        out_layout: Some("sample_info"),
        ..row(Selector::GetInfo, "get_info", &[], 0)
    },
    MethodSpec {
        is_async: true,
        scalar_max: &[("timeout_ms", MAX_WAIT_MS)],
        statuses: &[
            (Status::Timeout, "no fire_event before timeout_ms"),
            (Status::Aborted, "the user client closed first"),
        ],
        ..row(Selector::WaitEvent, "wait_event", &["timeout_ms"], 1)
    },
    row(Selector::FireEvent, "fire_event", &["value"], 1),
    MethodSpec {
        privilege: Some("sample.admin"),
        ..row(Selector::Reset, "reset", &[], 0)
    },
    MethodSpec {
        in_layout: Some("sample_record"),
        out_layout: Some("sample_record"),
        ..row(Selector::TransformRecord, "transform_record", &[], 0)
    },
    MethodSpec {
        statuses: &[(
            Status::BadArgument,
            "the dma memory type is not mapped, or offset + len is outside it",
        )],
        ..row(Selector::ChecksumDma, "checksum_dma", &["offset", "len"], 1)
    },
];

/// Memory type `registers`.
pub const REGISTERS: MemoryType = MemoryType {
    id: 0,
    name: "registers",
    size: 4096,
    writable: false,
    contents: "offset 0: u32 version; offset 4: u32 magic 0x50435352; both little-endian whatever the byte order of the client; the rest zero. Shared by every user client",
};

/// Memory type `dma`.
pub const DMA: MemoryType = MemoryType {
    id: 1,
    name: "dma",
    size: 1 << 20,
    writable: true,
    contents: "bytes the client writes; checksum_dma(offset, len) reads them. Emptied when the user client closes",
};

/// The magic at offset 4 of `registers`.
pub const REGISTERS_MAGIC: u32 = 0x5043_5352;

pub(super) const MEMORY_TYPES: [MemoryType; 2] = [REGISTERS, DMA];
