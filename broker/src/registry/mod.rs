//! The registry: services with typed properties, parent/child links, matching and open
//! arbitration (the I/O Registry's service plane).

mod arbitration;
mod matching;
pub mod personality;
mod service;

pub use arbitration::{OpenGuard, OpenMode};
pub use matching::{Binder, Candidate, MatchRecord, Matching, Outcome, Running, match_nub};
pub use service::{Registry, RegistryError, Service, ServiceId};
