//! The net family's method table (docs/drivers/net.md):
//!
//! | sel | name          | in                          | out                            |
//! |-----|---------------|-----------------------------|--------------------------------|
//! | 0   | `get_info`    | —                           | struct `net_info`              |
//! | 1   | `set_up`      | — (`net.admin`)             | —                              |
//! | 2   | `set_down`    | — (`net.admin`)             | —                              |
//! | 3   | `set_mtu`     | mtu (`net.admin`)           | —                              |
//! | 4   | `send_packet` | one IP packet (1..=MTU)     | bytes sent                     |
//! | 5   | `recv_packet` | timeout_ms (async)          | one IP packet; packets dropped |
//! | 6   | `send_packets` | offset, count              | packets sent                   |
//! | 7   | `recv_packets` | offset, room, max_count, timeout_ms (async) | packets, bytes, packets dropped |
//!
//! The device is a TUN interface the broker creates and owns. Every open user client receives
//! every packet the interface sends, into a queue of its own bounded to 256 packets and 1 MiB:
//! what overflows is dropped and counted, and `recv_packet` reports the count (its scalar)
//! with the next packet.
//!
//! The batch methods move many packets per call through the user client's `packets` memory
//! (memory type 0), where each packet is a record: a 4-byte header — the packet's length as a
//! big-endian `u16`, then two zero bytes — and the packet, padded with zeros to a multiple of 4.

use portcullis_proto::Status;

use crate::driver::{MemoryType, MethodSpec, SizeRange};

/// The struct descriptions.
pub const LAYOUTS: &str = include_str!("layout.toml");

/// Largest packet (an IPv4/IPv6 packet's length field's limit).
pub const PACKET_MAX: u32 = 65_535;

/// Longest `recv_packet` wait (10 minutes).
pub const MAX_TIMEOUT_MS: u64 = 600_000;

/// Packets queued per user client.
pub const QUEUE_PACKETS: usize = 256;

/// Bytes queued per user client.
pub const QUEUE_BYTES: usize = 1 << 20;

/// Memory type `packets`: batches of packets, as records (see the module's documentation).
pub const PACKETS: MemoryType = MemoryType {
    id: 0,
    name: "packets",
    size: 1 << 20,
    writable: true,
    contents: "batches of packets as records: a big-endian u16 packet length, two zero bytes, the packet, zero padding to a multiple of 4; send_packets reads records from an offset, recv_packets writes them at one",
};

pub(super) const MEMORY_TYPES: [MemoryType; 1] = [PACKETS];

/// Most packets one batch call moves.
pub const BATCH_MAX: u64 = 1024;

/// A record's header: the length (big-endian `u16`) and two zero bytes.
pub const RECORD_HEADER: usize = 4;

/// The net family's selectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Selector {
    /// `get_info() -> net_info`.
    GetInfo = 0,
    /// `set_up()`, privileged.
    SetUp = 1,
    /// `set_down()`, privileged.
    SetDown = 2,
    /// `set_mtu(mtu)`, privileged.
    SetMtu = 3,
    /// `send_packet(packet) -> bytes`.
    SendPacket = 4,
    /// `recv_packet(timeout_ms) -> (dropped; packet)` (async).
    RecvPacket = 5,
    /// `send_packets(offset, count) -> sent`, records in `packets` memory.
    SendPackets = 6,
    /// `recv_packets(offset, room, max_count, timeout_ms) -> (count, bytes, dropped)` (async),
    /// records into `packets` memory.
    RecvPackets = 7,
}

impl Selector {
    pub(super) fn from_u32(selector: u32) -> Option<Selector> {
        [
            Selector::GetInfo,
            Selector::SetUp,
            Selector::SetDown,
            Selector::SetMtu,
            Selector::SendPacket,
            Selector::RecvPacket,
            Selector::SendPackets,
            Selector::RecvPackets,
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

/// What `NO_MEMORY` means for a send.
const FULL: &str = "the interface's queue is full now (nothing of that packet was sent); try again";

/// What `OVERFLOW` means for a receive.
const OVERSIZE: &str =
    "it ran: the next packet does not fit the room given, so it was dropped, and counted with the next one delivered";

pub(super) const TABLE: [MethodSpec; 8] = [
    MethodSpec {
        out_layout: Some("net_info"),
        ..row(Selector::GetInfo, "get_info", &[], 0)
    },
    MethodSpec {
        privilege: Some("net.admin"),
        ..row(Selector::SetUp, "set_up", &[], 0)
    },
    MethodSpec {
        privilege: Some("net.admin"),
        ..row(Selector::SetDown, "set_down", &[], 0)
    },
    MethodSpec {
        privilege: Some("net.admin"),
        scalar_max: &[("mtu", PACKET_MAX as u64)],
        statuses: &[(Status::BadArgument, "mtu is below 68, or the interface refuses it")],
        ..row(Selector::SetMtu, "set_mtu", &["mtu"], 0)
    },
    MethodSpec {
        struct_in: SizeRange::between(1, PACKET_MAX),
        statuses: &[
            (
                Status::BadArgument,
                "the packet exceeds the MTU, or the kernel refuses it (not an IP packet)",
            ),
            (Status::NoMemory, FULL),
            (Status::NoDevice, "the interface went away"),
        ],
        ..row(Selector::SendPacket, "send_packet", &[], 1)
    },
    MethodSpec {
        struct_out: SizeRange::between(0, PACKET_MAX),
        is_async: true,
        scalar_max: &[("timeout_ms", MAX_TIMEOUT_MS)],
        statuses: &[
            (Status::Overflow, OVERSIZE),
            (Status::Timeout, "no packet arrived before timeout_ms"),
            (Status::NoDevice, "the interface went away"),
        ],
        ..row(Selector::RecvPacket, "recv_packet", &["timeout_ms"], 1)
    },
    MethodSpec {
        scalar_max: &[("count", BATCH_MAX)],
        statuses: &[
            (
                Status::BadArgument,
                "packets memory not mapped, a record malformed or outside it, or the first packet exceeds the MTU or is refused",
            ),
            (Status::NoMemory, FULL),
            (Status::NoDevice, "the interface went away"),
        ],
        ..row(Selector::SendPackets, "send_packets", &["offset", "count"], 1)
    },
    MethodSpec {
        is_async: true,
        scalar_max: &[("max_count", BATCH_MAX), ("timeout_ms", MAX_TIMEOUT_MS)],
        statuses: &[
            (
                Status::BadArgument,
                "packets memory not mapped, or offset and room outside it",
            ),
            (Status::Overflow, OVERSIZE),
            (Status::Timeout, "no packet arrived before timeout_ms"),
            (Status::NoDevice, "the interface went away"),
        ],
        ..row(
            Selector::RecvPackets,
            "recv_packets",
            &["offset", "room", "max_count", "timeout_ms"],
            3,
        )
    },
];
