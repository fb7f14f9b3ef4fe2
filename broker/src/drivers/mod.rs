//! The drivers the broker owns, one folder each, and the factory the bus enumerator uses to
//! bind a declared device to its driver.

pub mod sample;

use std::sync::Arc;

use crate::driver::Driver;

/// Driver kinds a config's `[[device]]` may name.
pub const KINDS: &[&str] = &["sample"];

/// The names every driver defines (classes, methods, privileges, memory types), to check
/// policies against.
pub fn catalog() -> portcullis_policy::Catalog {
    let mut catalog = portcullis_policy::Catalog::default();
    for driver in KINDS.iter().filter_map(|k| create(k)) {
        let rows = driver.methods().rows();
        catalog.add(
            driver.class(),
            portcullis_policy::ClassNames {
                methods: rows.iter().map(|r| r.name.to_string()).collect(),
                privileges: rows.iter().filter_map(|r| r.privilege).map(String::from).collect(),
                memory: driver.memory_types().iter().map(|m| m.name.to_string()).collect(),
                method_privileges: rows
                    .iter()
                    .filter_map(|r| r.privilege.map(|p| (r.name.to_string(), p.to_string())))
                    .collect(),
                params: rows
                    .iter()
                    .enumerate()
                    .map(|(i, r)| {
                        (
                            r.name.to_string(),
                            driver.methods().params(i).iter().map(|(n, _)| n.clone()).collect(),
                        )
                    })
                    .collect(),
            },
        );
    }
    catalog
}

/// A new driver instance of the named kind, or `None` for an unknown kind.
pub fn create(kind: &str) -> Option<Arc<dyn Driver>> {
    match kind {
        "sample" => Some(Arc::new(sample::SampleDevice::new())),
        _ => None,
    }
}
