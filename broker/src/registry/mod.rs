//! The registry: services with typed properties, parent/child links, matching and open
//! arbitration (the I/O Registry's service plane).

mod arbitration;
mod matching;
mod service;

pub use arbitration::{OpenGuard, OpenMode};
pub use matching::Matching;
pub use service::{Registry, RegistryError, Service, ServiceId};
