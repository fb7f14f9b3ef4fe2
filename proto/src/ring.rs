//! The shared-memory ring's layout and the arithmetic both sides do on it. Pure: the mapping
//! itself lives in `portcullis-ring` (broker and Rust shim) and `libportcullis` (C).
//!
//! After `Hello`, a client sends `Request::EnableRing`; the response (`Body::Ring`) carries three
//! descriptors as `SCM_RIGHTS`: the memfd holding the ring, the eventfd that wakes the broker
//! and the eventfd that wakes the client. The memfd holds:
//!
//! | offset | size | what |
//! |---|---|---|
//! | 0 | 4096 | header (below) |
//! | 4096 | `sq_size` | submission ring: client → broker records |
//! | 4096 + `sq_size` | `cq_size` | completion ring: broker → client records |
//!
//! Every header word is a little-endian `u32`, whatever the client's endianness. The words
//! one side writes sit on their own 64-byte line so that the two sides do not share a line.
//!
//! | offset | word | written by |
//! |---|---|---|
//! | 0 | magic [`MAGIC`] | broker, once |
//! | 4 | version [`RING_VERSION`] | broker, once |
//! | 8 | `sq_size` (bytes, a power of two) | broker, once |
//! | 12 | `cq_size` (bytes, a power of two) | broker, once |
//! | 64 | `sq_tail` | client |
//! | 128 | `sq_head` | broker |
//! | 192 | `cq_tail` | broker |
//! | 256 | `cq_head` | client |
//! | 320 | `broker_sleeping` (bit 1: waits for records, bit 2: for room) | broker |
//! | 384 | `client_sleeping` (bit 1: waits for records, bit 2: for room) | client |
//!
//! Indices are free-running byte counts (they wrap at 2³²); a record at index `i` starts at
//! byte `i & (size − 1)` of its ring. A record is an 8-byte header — payload length (`u32`
//! LE), then a `u32` that must be zero — followed by the payload, padded with zeros to a
//! multiple of 8. Records may wrap around the end of the ring (an 8-byte header never
//! straddles it). Submission payloads are `ClientFrame::Request` frames; completion payloads
//! are `ServerFrame` frames (responses, events, and a `Goodbye` before the broker ends a ring).
//!
//! A producer writes the record, then publishes its tail with release ordering. A consumer
//! reads the tail with acquire ordering, copies the records out, then publishes its head.
//! A side about to sleep sets its `*_sleeping` word to what would wake it, re-checks, and waits
//! on its eventfd; a side that publishes a tail (records) or a head (room) writes the other's
//! eventfd when the other's word has that bit.

use crate::frame::MAX_FRAME;

/// `"PCRG"` read as a little-endian `u32`.
pub const MAGIC: u32 = u32::from_le_bytes(*b"PCRG");
/// The ring layout version this build speaks.
pub const RING_VERSION: u32 = 1;
/// Bytes before the submission ring.
pub const HEADER_SIZE: usize = 4096;
/// Header word offsets.
pub mod offset {
    /// Magic.
    pub const MAGIC: usize = 0;
    /// Version.
    pub const VERSION: usize = 4;
    /// Submission ring size.
    pub const SQ_SIZE: usize = 8;
    /// Completion ring size.
    pub const CQ_SIZE: usize = 12;
    /// Submission tail (client).
    pub const SQ_TAIL: usize = 64;
    /// Submission head (broker).
    pub const SQ_HEAD: usize = 128;
    /// Completion tail (broker).
    pub const CQ_TAIL: usize = 192;
    /// Completion head (client).
    pub const CQ_HEAD: usize = 256;
    /// Broker sleeping flag (broker).
    pub const BROKER_SLEEPING: usize = 320;
    /// Client sleeping flag (client).
    pub const CLIENT_SLEEPING: usize = 384;
}

/// Bytes of a record header.
pub const RECORD_HEADER: u32 = 8;
/// Smallest ring: one frame of the largest size must fit.
pub const MIN_RING: u32 = (MAX_FRAME as u32 + RECORD_HEADER).next_power_of_two();
/// Largest ring.
pub const MAX_RING: u32 = 16 << 20;
/// The ring size a client gets when it asks for 0.
pub const DEFAULT_RING: u32 = 256 << 10;

/// How the broker waits for a client's submissions (chosen by the broker's configuration).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WaitMode {
    /// Spin for a bounded time, then sleep on the eventfd.
    Adaptive,
    /// Only spin (burns a core per ring; for latency benchmarks and dedicated machines).
    Spin,
    /// Only sleep on the eventfd.
    Sleep,
}

/// A ring's size in bytes: a power of two within [`MIN_RING`, `MAX_RING`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingSize(u32);

impl RingSize {
    /// The size a client asked for: 0 means the default; others are rounded up to a power of
    /// two and must lie within the bounds.
    pub fn requested(bytes: u32) -> Result<RingSize, RingError> {
        if bytes == 0 {
            return Ok(RingSize(DEFAULT_RING));
        }
        let size = bytes.checked_next_power_of_two().ok_or(RingError::Size(bytes))?;
        if !(MIN_RING..=MAX_RING).contains(&size) {
            return Err(RingError::Size(bytes));
        }
        Ok(RingSize(size))
    }

    /// The size in bytes.
    pub fn get(self) -> u32 {
        self.0
    }

    /// The byte offset of index `i` within the ring.
    pub fn offset(self, index: u32) -> u32 {
        index & (self.0 - 1)
    }
}

/// What is wrong with a ring or a record in it. Each ends the session that owns the ring.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// A size outside the bounds.
    #[error("ring size {0} is not within {MIN_RING}..={MAX_RING} bytes")]
    Size(u32),
    /// The other side's index is further from ours than the ring is long, or not 8-aligned.
    #[error("{ring} index {theirs} is {distance} bytes from {ours} in a ring of {size}")]
    Index {
        /// Which ring.
        ring: &'static str,
        /// The other side's index.
        theirs: u32,
        /// Ours.
        ours: u32,
        /// `theirs − ours` (wrapping) or `ours − theirs`.
        distance: u32,
        /// The ring's size.
        size: u32,
    },
    /// A record header that cannot be right.
    #[error("{ring} record at index {index}: {why}")]
    Record {
        /// Which ring.
        ring: &'static str,
        /// The record's index.
        index: u32,
        /// What is wrong.
        why: String,
    },
}

/// Bytes a record of `len` payload bytes occupies.
pub fn record_span(len: u32) -> u32 {
    RECORD_HEADER + len.next_multiple_of(8)
}

/// Bytes published and not yet consumed: `tail − head`, checked against the ring. The consumer
/// calls it with its own head and the producer's tail; the producer with its own tail and the
/// consumer's head. Either way the other side's word cannot make it exceed the ring.
pub fn used(ring: &'static str, size: RingSize, head: u32, tail: u32, ours_is_head: bool) -> Result<u32, RingError> {
    let distance = tail.wrapping_sub(head);
    if distance > size.get() || !distance.is_multiple_of(8) {
        let (theirs, ours) = if ours_is_head { (tail, head) } else { (head, tail) };
        return Err(RingError::Index {
            ring,
            theirs,
            ours,
            distance,
            size: size.get(),
        });
    }
    Ok(distance)
}

/// Checks a record header (the first 8 bytes at `index`) against what is published.
/// Returns the payload length.
pub fn check_header(ring: &'static str, index: u32, header: [u8; 8], available: u32) -> Result<u32, RingError> {
    let bad = |why: String| RingError::Record { ring, index, why };
    let [a, b, c, d, e, f, g, h] = header;
    let len = u32::from_le_bytes([a, b, c, d]);
    let reserved = u32::from_le_bytes([e, f, g, h]);
    if reserved != 0 {
        return Err(bad(format!("reserved word is {reserved:#x}, not 0")));
    }
    if len == 0 {
        return Err(bad("empty record".into()));
    }
    if len as usize > MAX_FRAME {
        return Err(bad(format!("{len} bytes exceed the {MAX_FRAME}-byte frame limit")));
    }
    if record_span(len) > available {
        return Err(bad(format!(
            "{len} bytes claimed but only {} published",
            available.saturating_sub(RECORD_HEADER)
        )));
    }
    Ok(len)
}

/// A record header for a payload of `len` bytes.
pub fn header(len: u32) -> [u8; 8] {
    let mut h = [0u8; 8];
    let (l, _) = h.split_at_mut(4);
    l.copy_from_slice(&len.to_le_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_size_zero_is_the_default() {
        assert_eq!(RingSize::requested(0).unwrap().get(), DEFAULT_RING);
    }

    #[test]
    fn ring_size_rounds_up_to_a_power_of_two() {
        assert_eq!(RingSize::requested(MIN_RING + 1).unwrap().get(), MIN_RING * 2);
    }

    #[test]
    fn ring_size_out_of_bounds_is_refused() {
        assert_eq!(RingSize::requested(4096), Err(RingError::Size(4096)));
        assert!(RingSize::requested(MAX_RING + 1).is_err());
        assert!(RingSize::requested(u32::MAX).is_err());
    }

    #[test]
    fn used_wraps_around_u32() {
        let size = RingSize::requested(0).unwrap();
        assert_eq!(used("sq", size, u32::MAX - 7, 8, true), Ok(16));
    }

    #[test]
    fn used_past_the_ring_is_refused() {
        let size = RingSize::requested(0).unwrap();
        assert!(used("sq", size, 0, size.get() + 8, true).is_err());
        // A head ahead of the tail looks like almost 2^32 bytes in flight.
        assert!(used("sq", size, 16, 8, true).is_err());
        assert!(used("sq", size, 0, 12, true).is_err(), "unaligned");
    }

    #[test]
    fn header_checks_length_and_reserved() {
        assert_eq!(check_header("sq", 0, header(5), 16), Ok(5));
        assert!(check_header("sq", 0, header(9), 16).is_err(), "longer than published");
        assert!(check_header("sq", 0, header(0), 16).is_err(), "empty");
        assert!(check_header("sq", 0, [1, 0, 0, 0, 1, 0, 0, 0], 16).is_err(), "reserved");
        let huge = u32::try_from(MAX_FRAME).unwrap() + 1;
        assert!(check_header("sq", 0, header(huge), u32::MAX).is_err());
    }

    #[test]
    fn magic_reads_pcrg_in_memory() {
        assert_eq!(MAGIC.to_le_bytes(), *b"PCRG");
    }
}
