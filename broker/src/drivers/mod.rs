//! The drivers the broker owns, one folder per family, and the factory the bus enumerator uses
//! to bind a declared device to its driver.

pub mod block;
#[cfg(feature = "fault-injection")]
pub mod fault;
pub mod net;
pub(crate) mod node;
pub mod sample;
pub mod tty;

use std::sync::Arc;

use crate::{
    config::DeviceConfig,
    driver::{Driver, Family},
};

/// Every family, as tools see them (policy checks, `portcullis schema`, the C headers).
pub fn families() -> Vec<&'static Family> {
    let families = vec![&*sample::FAMILY, &*tty::FAMILY, &*block::FAMILY, &*net::FAMILY];
    #[cfg(feature = "fault-injection")]
    let families = [families, vec![&*fault::FAMILY]].concat();
    families
}

/// Driver kinds a config's `[[device]]` may name.
pub fn kinds() -> impl Iterator<Item = &'static str> {
    families().into_iter().map(|f| f.kind)
}

/// The family of a driver kind.
pub fn family(kind: &str) -> Option<&'static Family> {
    families().into_iter().find(|f| f.kind == kind)
}

/// Why a configured device could not be bound to its driver.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The config names a driver kind that does not exist.
    #[error("device {device:?}: unknown driver {driver:?} (known: {known})")]
    UnknownDriver {
        /// The device.
        device: String,
        /// The kind it names.
        driver: String,
        /// The kinds there are.
        known: String,
    },
    /// The device's settings are wrong for its driver, or its node cannot be used.
    #[error("device {device:?} ({driver}): {message}")]
    Unusable {
        /// The device.
        device: String,
        /// Its driver kind.
        driver: String,
        /// What is wrong, naming the node.
        message: String,
    },
}

/// A driver bound to the device a config declares.
pub fn create(device: &DeviceConfig) -> Result<Arc<dyn Driver>, DeviceError> {
    let unusable = |message: String| DeviceError::Unusable {
        device: device.name.clone(),
        driver: device.driver.clone(),
        message,
    };
    match device.driver.as_str() {
        "sample" => {
            if device.path.is_some() || device.interface.is_some() {
                return Err(unusable("the sample device takes no path or interface".into()));
            }
            Ok(Arc::new(sample::SampleDevice::new()))
        }
        "tty" => {
            let path = device
                .path
                .as_deref()
                .ok_or_else(|| unusable("a tty device needs `path`, its device node".into()))?;
            if device.interface.is_some() || device.read_only {
                return Err(unusable("a tty device takes `path` only".into()));
            }
            Ok(Arc::new(tty::TtyDevice::open(path).map_err(unusable)?))
        }
        "block" => {
            let path = device
                .path
                .as_deref()
                .ok_or_else(|| unusable("a block device needs `path`, its device node".into()))?;
            if device.interface.is_some() {
                return Err(unusable("a block device takes `path` and `read_only` only".into()));
            }
            Ok(Arc::new(
                block::BlockDevice::open(path, device.read_only).map_err(unusable)?,
            ))
        }
        "net" => {
            let interface = device
                .interface
                .as_deref()
                .ok_or_else(|| unusable("a net device needs `interface`, the TUN interface it creates".into()))?;
            if device.path.is_some() || device.read_only {
                return Err(unusable("a net device takes `interface` only".into()));
            }
            Ok(Arc::new(net::NetDevice::create(interface).map_err(unusable)?))
        }
        #[cfg(feature = "fault-injection")]
        "fault" => Ok(Arc::new(fault::FaultDevice)),
        other => Err(DeviceError::UnknownDriver {
            device: device.name.clone(),
            driver: other.to_string(),
            known: kinds().collect::<Vec<_>>().join(", "),
        }),
    }
}

/// The names every driver defines (classes, methods, privileges, memory types), to check
/// policies against.
pub fn catalog() -> portcullis_policy::Catalog {
    let mut catalog = portcullis_policy::Catalog::default();
    for family in families() {
        let rows = family.methods().rows();
        catalog.add(
            family.class,
            portcullis_policy::ClassNames {
                methods: rows.iter().map(|r| r.name.to_string()).collect(),
                privileges: rows.iter().filter_map(|r| r.privilege).map(String::from).collect(),
                memory: family.memory_types().iter().map(|m| m.name.to_string()).collect(),
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
                            family.methods().params(i).iter().map(|(n, _)| n.clone()).collect(),
                        )
                    })
                    .collect(),
                text_params: rows
                    .iter()
                    .enumerate()
                    .map(|(i, r)| {
                        let text = family
                            .methods()
                            .params(i)
                            .iter()
                            .filter(|(_, at)| matches!(at, portcullis_policy::ParamAt::Chars { .. }))
                            .map(|(n, _)| n.clone());
                        (r.name.to_string(), text.collect())
                    })
                    .collect(),
            },
        );
    }
    catalog
}

#[cfg(test)]
mod tests {
    use portcullis_proto::Status;

    use super::families;

    /// Every family's method contracts: what each status means is said, in a form the
    /// generated C comments can hold; the families' documents name every status their methods
    /// list; `OVERFLOW` is in a contract exactly where an output can narrow or the row says so.
    #[test]
    fn every_method_says_what_its_own_statuses_mean_and_the_docs_name_them() {
        let docs = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/drivers");
        for family in families() {
            let table = family.methods();
            let doc = std::fs::read_to_string(format!("{docs}/{}.md", family.kind)).ok();
            for (index, row) in table.rows().iter().enumerate() {
                for (status, means) in table.own_statuses(index) {
                    assert!(
                        !means.is_empty() && !means.contains("*/") && !means.contains('\n'),
                        "{} {}: {status:?}: {means:?}",
                        family.kind,
                        row.name
                    );
                    if let Some(doc) = &doc {
                        assert!(
                            doc.contains(&format!("`{}`", status.name())),
                            "docs/drivers/{}.md names no {} ({} lists it)",
                            family.kind,
                            status.name(),
                            row.name
                        );
                    }
                }
                let overflow = table.can_end_with(index).contains(&Status::Overflow);
                let listed = row.statuses.iter().any(|(s, _)| *s == Status::Overflow);
                assert_eq!(overflow, table.narrows(index) || listed, "{} {}", family.kind, row.name);
            }
        }
        let sample = super::sample::FAMILY.methods();
        let narrows = |name: &str| {
            let index = sample.rows().iter().position(|r| r.name == name).unwrap();
            sample.narrows(index)
        };
        assert!(narrows("transform_record"), "its long narrows on 32-bit ABIs");
        assert!(!narrows("get_info"), "fixed-width fields only");
    }
}
