//! Producer and consumer over one ring's words. Safe code: the memory is atomics (see
//! `shm`), every index is masked, and every value read from the other side is checked by
//! `portcullis_proto::ring` before it is used.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use portcullis_proto::ring::{RECORD_HEADER, RingError, RingSize, check_header, header, record_span, used};

fn load(words: &[AtomicU64], size: RingSize, index: u32) -> [u8; 8] {
    let at = size.offset(index) as usize / 8;
    words
        .get(at)
        .map_or([0; 8], |w| w.load(Ordering::Relaxed).to_ne_bytes())
}

fn store(words: &[AtomicU64], size: RingSize, index: u32, bytes: [u8; 8]) {
    let at = size.offset(index) as usize / 8;
    if let Some(w) = words.get(at) {
        w.store(u64::from_ne_bytes(bytes), Ordering::Relaxed);
    }
}

/// Reads a little-endian control word the other side writes.
pub fn load_word(word: &AtomicU32) -> u32 {
    u32::from_le(word.load(Ordering::Acquire))
}

/// Writes a little-endian control word.
pub fn store_word(word: &AtomicU32, value: u32) {
    word.store(value.to_le(), Ordering::Release);
}

/// The consuming side of a ring. Its head lives here; the shared copy is only ever written.
#[derive(Debug)]
pub struct Consumer {
    name: &'static str,
    size: RingSize,
    head: u32,
    tail_seen: u32,
}

impl Consumer {
    /// A consumer of an empty ring.
    pub fn new(name: &'static str, size: RingSize) -> Consumer {
        Consumer {
            name,
            size,
            head: 0,
            tail_seen: 0,
        }
    }

    /// Whether the producer has published records not yet taken (reads the tail).
    pub fn has_more(&self, tail: &AtomicU32) -> bool {
        self.head != self.tail_seen || load_word(tail) != self.head
    }

    /// Copies the next record's payload into `out` (replacing what was there). `Ok(false)`:
    /// nothing is published. The shared words are read once each; the checks apply to the copy.
    pub fn pop(&mut self, words: &[AtomicU64], tail: &AtomicU32, out: &mut Vec<u8>) -> Result<bool, RingError> {
        if self.head == self.tail_seen {
            let tail = load_word(tail);
            used(self.name, self.size, self.head, tail, true)?;
            self.tail_seen = tail;
            if tail == self.head {
                return Ok(false);
            }
        }
        let available = self.tail_seen.wrapping_sub(self.head);
        let len = check_header(self.name, self.head, load(words, self.size, self.head), available)?;
        out.clear();
        out.reserve(len as usize);
        let mut index = self.head.wrapping_add(RECORD_HEADER);
        let mut left = len as usize;
        while left > 0 {
            let word = load(words, self.size, index);
            let take = left.min(8);
            out.extend_from_slice(word.get(..take).unwrap_or_default());
            left -= take;
            index = index.wrapping_add(8);
        }
        self.head = self.head.wrapping_add(record_span(len));
        Ok(true)
    }

    /// Publishes the head: the space of every record taken so far is free again.
    pub fn publish(&self, head: &AtomicU32) {
        store_word(head, self.head);
    }
}

/// The producing side of a ring. Its tail lives here; the shared copy is only ever written.
#[derive(Debug)]
pub struct Producer {
    name: &'static str,
    size: RingSize,
    tail: u32,
    published: u32,
    head_seen: u32,
}

impl Producer {
    /// A producer of an empty ring.
    pub fn new(name: &'static str, size: RingSize) -> Producer {
        Producer {
            name,
            size,
            tail: 0,
            published: 0,
            head_seen: 0,
        }
    }

    /// Whether a record of `len` payload bytes fits now (reads the head when the last seen one
    /// says no).
    pub fn fits(&mut self, head: &AtomicU32, len: usize) -> Result<bool, RingError> {
        let span = u32::try_from(len)
            .ok()
            .filter(|l| record_span(*l) <= self.size.get())
            .map(record_span)
            .ok_or_else(|| RingError::Record {
                ring: self.name,
                index: self.tail,
                why: format!("a {len}-byte record cannot fit a {}-byte ring", self.size.get()),
            })?;
        if self.size.get() - self.tail.wrapping_sub(self.head_seen) >= span {
            return Ok(true);
        }
        let head = load_word(head);
        used(self.name, self.size, head, self.tail, false)?;
        self.head_seen = head;
        Ok(self.size.get() - self.tail.wrapping_sub(head) >= span)
    }

    /// Writes a record if it fits (`Ok(false)` when the ring is full: try again after the
    /// consumer moves on). Not visible to the consumer until [`Producer::publish`].
    pub fn push(&mut self, words: &[AtomicU64], head: &AtomicU32, payload: &[u8]) -> Result<bool, RingError> {
        if !self.fits(head, payload.len())? {
            return Ok(false);
        }
        let len = payload.len() as u32;
        store(words, self.size, self.tail, header(len));
        let mut index = self.tail.wrapping_add(RECORD_HEADER);
        for chunk in payload.chunks(8) {
            let mut word = [0u8; 8];
            if let Some(w) = word.get_mut(..chunk.len()) {
                w.copy_from_slice(chunk);
            }
            store(words, self.size, index, word);
            index = index.wrapping_add(8);
        }
        self.tail = self.tail.wrapping_add(record_span(len));
        Ok(true)
    }

    /// Publishes every record pushed so far. Returns whether there was anything new.
    pub fn publish(&mut self, tail: &AtomicU32) -> bool {
        if self.published == self.tail {
            return false;
        }
        store_word(tail, self.tail);
        self.published = self.tail;
        true
    }

    /// Whether the consumer's head moved since the producer last looked (room may have freed).
    pub fn head_moved(&self, head: &AtomicU32) -> bool {
        load_word(head) != self.head_seen
    }
}
