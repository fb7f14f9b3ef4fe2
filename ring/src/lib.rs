//! The Portcullis shared-memory ring (layout in `portcullis_proto::ring`): the mapping,
//! the producer and consumer of records, and the sleep/wake handshake. The broker and the
//! Rust client both use it; `libportcullis` implements the same contract in C.
//!
//! Unsafe code is confined to [`shm`] (creating, mapping and unmapping the memfd, and
//! viewing it as atomics); everything else is safe code over those views.

#![deny(unsafe_code)]

pub mod queue;
#[allow(unsafe_code)]
pub mod shm;
pub mod wake;

pub use queue::{Consumer, Producer};
pub use shm::{Header, Mapping, mapping_len};

#[cfg(test)]
mod tests;
