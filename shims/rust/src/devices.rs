//! Typed forms of the device families' structs (docs/drivers): `tty_line`, `block_geometry` and
//! `net_info` in this machine's layout, which the broker expects from a client speaking its own
//! ABI (gRPC, or a native session with `AbiId::native()`), and helpers that call the methods
//! taking or returning them. Every other method is a plain [`Session::call_named`].

use crate::{ClientError, Session, UserClient};

/// Values of [`TtyLine::parity`].
pub mod parity {
    /// No parity bit.
    pub const NONE: u8 = 0;
    /// Odd parity.
    pub const ODD: u8 = 1;
    /// Even parity.
    pub const EVEN: u8 = 2;
}

/// Values of [`TtyLine::flow`].
pub mod flow {
    /// No flow control.
    pub const NONE: u8 = 0;
    /// RTS/CTS (hardware).
    pub const RTSCTS: u8 = 1;
    /// XON/XOFF (software).
    pub const XONXOFF: u8 = 2;
}

/// A serial line's settings (`struct tty_line`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TtyLine {
    /// Bits per second.
    pub baud: u32,
    /// 5 to 8.
    pub data_bits: u8,
    /// [`parity`].
    pub parity: u8,
    /// 1 or 2.
    pub stop_bits: u8,
    /// [`flow`].
    pub flow: u8,
}

impl TtyLine {
    /// Its size (the same on every ABI).
    pub const SIZE: usize = 8;

    /// The struct's bytes.
    pub fn to_bytes(self) -> Vec<u8> {
        let mut bytes = self.baud.to_ne_bytes().to_vec();
        bytes.extend([self.data_bits, self.parity, self.stop_bits, self.flow]);
        bytes
    }

    /// Reads the struct.
    pub fn from_bytes(bytes: &[u8]) -> Result<TtyLine, ClientError> {
        let b: [u8; Self::SIZE] = bytes
            .try_into()
            .map_err(|_| size_error("tty_line", Self::SIZE, bytes))?;
        Ok(TtyLine {
            baud: u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
            data_bits: b[4],
            parity: b[5],
            stop_bits: b[6],
            flow: b[7],
        })
    }
}

/// What a block device is (`struct block_geometry`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockGeometry {
    /// Size in bytes.
    pub size_bytes: u64,
    /// Logical block size: the unit of `lba` and `count`.
    pub logical_block: u32,
    /// Physical block size.
    pub physical_block: u32,
    /// No writes.
    pub read_only: bool,
    /// A spinning disk.
    pub rotational: bool,
}

impl BlockGeometry {
    /// Its size in this machine's layout (the u64's alignment pads it).
    pub const SIZE: usize = (8usize + 4 + 4 + 2).next_multiple_of(std::mem::align_of::<u64>());

    /// Reads the struct.
    pub fn from_bytes(bytes: &[u8]) -> Result<BlockGeometry, ClientError> {
        if bytes.len() != Self::SIZE {
            return Err(size_error("block_geometry", Self::SIZE, bytes));
        }
        let u64_at = |at: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(bytes.get(at..at + 8).unwrap_or(&[0; 8]));
            u64::from_ne_bytes(w)
        };
        let u32_at = |at: usize| {
            let mut w = [0u8; 4];
            w.copy_from_slice(bytes.get(at..at + 4).unwrap_or(&[0; 4]));
            u32::from_ne_bytes(w)
        };
        Ok(BlockGeometry {
            size_bytes: u64_at(0),
            logical_block: u32_at(8),
            physical_block: u32_at(12),
            read_only: bytes.get(16).is_some_and(|b| *b != 0),
            rotational: bytes.get(17).is_some_and(|b| *b != 0),
        })
    }
}

/// A network interface (`struct net_info`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetInfo {
    /// The interface's name.
    pub name: String,
    /// Its index.
    pub ifindex: u32,
    /// Its MTU.
    pub mtu: u32,
    /// The kernel's `IFF_*` flags.
    pub flags: u32,
}

impl NetInfo {
    /// Its size (the same on every ABI).
    pub const SIZE: usize = 28;

    /// `IFF_UP`.
    pub const UP: u32 = 1;

    /// Reads the struct.
    pub fn from_bytes(bytes: &[u8]) -> Result<NetInfo, ClientError> {
        if bytes.len() != Self::SIZE {
            return Err(size_error("net_info", Self::SIZE, bytes));
        }
        let name = bytes.get(..16).unwrap_or_default();
        let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
        let u32_at = |at: usize| {
            let mut w = [0u8; 4];
            w.copy_from_slice(bytes.get(at..at + 4).unwrap_or(&[0; 4]));
            u32::from_ne_bytes(w)
        };
        Ok(NetInfo {
            name: String::from_utf8_lossy(name.get(..end).unwrap_or_default()).into_owned(),
            ifindex: u32_at(16),
            mtu: u32_at(20),
            flags: u32_at(24),
        })
    }
}

/// Batches of packets as the net family's `send_packets` and `recv_packets` lay them in the
/// `packets` memory (docs/drivers/net.md): records of a 4-byte header (the packet's length as a
/// big-endian `u16`, then two zero bytes), the packet, and zero padding to a multiple of 4.
pub mod packet_records {
    use crate::ClientError;

    /// A record's header length.
    pub const HEADER: usize = 4;

    /// The bytes one packet's record takes.
    pub fn span(packet_len: usize) -> usize {
        (HEADER + packet_len).next_multiple_of(HEADER)
    }

    /// Appends one packet's record to `batch` (1 to 65,535 bytes).
    pub fn push(batch: &mut Vec<u8>, packet: &[u8]) -> Result<(), ClientError> {
        let len = u16::try_from(packet.len())
            .ok()
            .filter(|l| *l > 0)
            .ok_or_else(|| ClientError::Protocol(format!("a packet of {} bytes: 1 to 65535", packet.len())))?;
        batch.extend_from_slice(&len.to_be_bytes());
        batch.extend_from_slice(&[0, 0]);
        batch.extend_from_slice(packet);
        batch.resize(batch.len().next_multiple_of(HEADER), 0);
        Ok(())
    }

    /// The packets of a batch, in order (`bytes`: what `recv_packets` wrote, as long as its
    /// `bytes` output says).
    pub fn parse(bytes: &[u8]) -> Result<Vec<&[u8]>, ClientError> {
        let mut packets = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let bad = || ClientError::Protocol(format!("a malformed packet record at offset {at}"));
            let &[hi, lo, 0, 0] = bytes.get(at..at + HEADER).ok_or_else(bad)? else {
                return Err(bad());
            };
            let len = usize::from(u16::from_be_bytes([hi, lo]));
            if len == 0 || at + span(len) > bytes.len() {
                return Err(bad());
            }
            packets.push(bytes.get(at + HEADER..at + HEADER + len).ok_or_else(bad)?);
            at += span(len);
        }
        Ok(packets)
    }
}

fn size_error(name: &str, want: usize, got: &[u8]) -> ClientError {
    ClientError::Protocol(format!("struct {name} is {want} bytes here, got {}", got.len()))
}

impl Session {
    /// `get_line` of a tty.
    pub async fn tty_get_line(&self, tty: &UserClient) -> Result<TtyLine, ClientError> {
        TtyLine::from_bytes(&self.call_named(tty, "get_line", &[], &[]).await?.struct_out)
    }

    /// `set_line` of a tty.
    pub async fn tty_set_line(&self, tty: &UserClient, line: TtyLine) -> Result<(), ClientError> {
        self.call_named(tty, "set_line", &[], &line.to_bytes()).await.map(drop)
    }

    /// `get_geometry` of a block device.
    pub async fn block_get_geometry(&self, disk: &UserClient) -> Result<BlockGeometry, ClientError> {
        BlockGeometry::from_bytes(&self.call_named(disk, "get_geometry", &[], &[]).await?.struct_out)
    }

    /// `get_info` of a network device.
    pub async fn net_get_info(&self, net: &UserClient) -> Result<NetInfo, ClientError> {
        NetInfo::from_bytes(&self.call_named(net, "get_info", &[], &[]).await?.struct_out)
    }

    /// `recv_packet` of a network device: the next packet, and how many were dropped before it.
    pub async fn net_recv_packet(&self, net: &UserClient, timeout_ms: u64) -> Result<(Vec<u8>, u64), ClientError> {
        let out = self.call_named(net, "recv_packet", &[timeout_ms], &[]).await?;
        Ok((out.struct_out, out.scalars.first().copied().unwrap_or(0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_records_round_trip_and_refuse_malformed_batches() {
        let mut batch = Vec::new();
        packet_records::push(&mut batch, b"abcde").unwrap();
        packet_records::push(&mut batch, &[7; 8]).unwrap();
        assert_eq!(batch.len(), 12 + 12);
        assert_eq!(&batch[..12], b"\0\x05\0\0abcde\0\0\0");
        assert_eq!(packet_records::parse(&batch).unwrap(), [&b"abcde"[..], &[7; 8][..]]);
        assert!(packet_records::push(&mut batch, &[]).is_err());
        assert!(packet_records::push(&mut batch, &vec![0; 65_536]).is_err());
        assert!(packet_records::parse(&batch[..10]).is_err(), "cut short");
        assert!(packet_records::parse(&batch[..20]).is_err(), "cut short");
        let mut reserved = batch.clone();
        reserved[2] = 1;
        assert!(packet_records::parse(&reserved).is_err());
    }

    #[test]
    fn tty_line_round_trips() {
        let line = TtyLine {
            baud: 115_200,
            data_bits: 8,
            parity: parity::EVEN,
            stop_bits: 2,
            flow: flow::RTSCTS,
        };
        assert_eq!(TtyLine::from_bytes(&line.to_bytes()).unwrap(), line);
        assert!(TtyLine::from_bytes(&[0; 7]).is_err());
    }

    #[test]
    fn structs_of_the_wrong_size_are_refused() {
        assert!(BlockGeometry::from_bytes(&[0; 3]).is_err());
        assert!(NetInfo::from_bytes(&[0; 27]).is_err());
    }
}
