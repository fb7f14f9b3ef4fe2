//! The drivers the broker owns, one folder each, and the factory the bus enumerator uses to
//! bind a declared device to its driver.

pub mod sample;

use std::sync::Arc;

use crate::driver::Driver;

/// Driver kinds a config's `[[device]]` may name.
pub const KINDS: &[&str] = &["sample"];

/// A new driver instance of the named kind, or `None` for an unknown kind.
pub fn create(kind: &str) -> Option<Arc<dyn Driver>> {
    match kind {
        "sample" => Some(Arc::new(sample::SampleDevice::new())),
        _ => None,
    }
}
