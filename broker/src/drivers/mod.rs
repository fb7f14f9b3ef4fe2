//! The drivers the broker owns, one folder per family, and the factory the bus enumerator uses
//! to bind a declared device to its driver.

pub mod block;
#[cfg(feature = "fault-injection")]
pub mod fault;
pub mod net;
pub(crate) mod node;
pub mod power;
pub mod sample;
pub mod state;
pub mod tty;

use std::sync::Arc;

use portcullis_proto::property::PropValue;

use crate::{
    bus::sysfs::{self, KernelDevice},
    config::DeviceConfig,
    driver::{Driver, Family},
    registry::personality::Personality,
};

/// Every family, as tools see them (policy checks, `portcullis schema`, the C headers).
pub fn families() -> Vec<&'static Family> {
    let families = vec![
        &*sample::FAMILY,
        &*tty::FAMILY,
        &*block::FAMILY,
        &*net::FAMILY,
        &*power::FAMILY,
    ];
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
        "fault" => Ok(Arc::new(fault::FaultDevice::new(
            device.properties.get("leak_on_open").and_then(toml::Value::as_bool) == Some(true),
        ))),
        other => Err(DeviceError::UnknownDriver {
            device: device.name.clone(),
            driver: other.to_string(),
            known: kinds().collect::<Vec<_>>().join(", "),
        }),
    }
}

/// The active probe of a personality's driver on a device the kernel announced: whether the
/// driver can serve it, and at what score. Nothing is opened: a tty's node must be that tty, a
/// block device must have media, be writable unless the personality asks for read-only, and be
/// neither mounted nor held by another kernel user unless it allows that; a network interface
/// must be a TUN.
pub fn probe(personality: &Personality, device: &KernelDevice) -> Result<i64, String> {
    let flag = |key: &str| device.properties.get(key) == Some(&PropValue::Flag(true));
    let node = |kind| -> Result<&sysfs::Node, String> {
        let node = device.node.as_ref().ok_or("the kernel gave it no device node")?;
        node::check(&node.path, kind, Some(node.rdev()))?;
        Ok(node)
    };
    match personality.driver.as_str() {
        "tty" => {
            node(node::NodeKind::Tty)?;
        }
        "block" => {
            let node = node(node::NodeKind::Block)?;
            let size = match device.properties.get("block.size_bytes") {
                Some(PropValue::Unsigned(n)) => *n,
                _ => 0,
            };
            if size == 0 {
                return Err("no media (size 0)".into());
            }
            if flag("block.read_only") && !personality.block.read_only {
                return Err("the device is read-only, and the personality does not say read_only = true".into());
            }
            if !personality.block.allow_mounted
                && let Some(user) = block::in_use(&device.devpath, node.major, node.minor)
            {
                return Err(format!("{user}, and the personality does not say allow_mounted = true"));
            }
        }
        "net" => {
            if !flag("net.tun") {
                return Err("not a TUN interface".into());
            }
        }
        other => return Err(format!("the {other} driver serves no kernel device")),
    }
    Ok(personality.probe_score)
}

/// Starts a personality's driver on a device the kernel announced (after its probe passed).
/// Network drivers need a tokio runtime.
pub fn start(personality: &Personality, device: &KernelDevice) -> Result<Arc<dyn Driver>, String> {
    let node = || device.node.as_ref().ok_or("the kernel gave it no device node");
    match personality.driver.as_str() {
        "tty" => {
            let node = node()?;
            Ok(Arc::new(tty::TtyDevice::open_node(&node.path, Some(node.rdev()))?))
        }
        "block" => {
            let node = node()?;
            let options = personality.block;
            Ok(Arc::new(block::BlockDevice::open_node(
                &node.path,
                options.read_only,
                options.exclusive,
                Some(node.rdev()),
            )?))
        }
        "net" => {
            let index = match device.properties.get("net.ifindex") {
                Some(PropValue::Unsigned(i)) => u32::try_from(*i).map_err(|_| "an interface index out of range")?,
                _ => return Err("the kernel gave no interface index".into()),
            };
            Ok(Arc::new(net::NetDevice::attach(&device.kernel_name, index)?))
        }
        other => Err(format!("the {other} driver serves no kernel device")),
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
    use portcullis_proto::{
        Status,
        property::{PropValue, Properties},
    };

    use super::{families, probe, start};
    use crate::{
        bus::{
            nub_class,
            sysfs::{KernelDevice, Node},
        },
        registry::personality::Personalities,
    };

    /// Ptys have no sysfs presence, so the tty driver's probe and start on a kernel device are
    /// shown on a pty this test made, described as the kernel would: its node and number.
    #[tokio::test]
    async fn the_tty_driver_probes_and_starts_only_on_the_node_the_kernel_named() {
        use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
        let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).unwrap();
        grantpt(&master).unwrap();
        unlockpt(&master).unwrap();
        let path = std::path::PathBuf::from(ptsname(&master, Vec::new()).unwrap().to_str().unwrap());
        let rdev = rustix::fs::stat(&path).unwrap().st_rdev;
        let set = Personalities::parse(&[(
            "t.toml".into(),
            "[[personality]]\nid = \"org.test.serial\"\nversion = \"1\"\ndriver = \"tty\"\nprovider_class = \"TtyNub\"\nprobe_score = 7\n".into(),
        )])
        .unwrap();
        let personality = &set.all()[0];
        let mut device = KernelDevice {
            devpath: "/devices/virtual/tty/test".into(),
            class: nub_class("tty").unwrap(),
            kernel_name: "test".into(),
            node: Some(Node {
                path: path.clone(),
                major: rustix::fs::major(rdev),
                minor: rustix::fs::minor(rdev),
            }),
            properties: Properties::from([("subsystem".to_string(), PropValue::Text("tty".into()))]),
        };
        assert_eq!(probe(personality, &device), Ok(7));
        let driver = start(personality, &device).unwrap();
        assert_eq!(driver.class(), "TtyDevice");
        // A node whose number is not the kernel's is refused before it is opened.
        if let Some(node) = device.node.as_mut() {
            node.minor += 1000;
        }
        assert!(
            probe(personality, &device)
                .unwrap_err()
                .contains("not the kernel's device")
        );
        assert!(start(personality, &device).is_err());
        device.node = None;
        assert!(probe(personality, &device).unwrap_err().contains("no device node"));
    }

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
