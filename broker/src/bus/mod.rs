//! Where nubs come from. The virtual bus publishes each device the configuration declares,
//! bound to its driver; the kernel's bus ([`sysfs`] at start, [`uevent`]s after) publishes a
//! nub per tty, block and network device, and [`hotplug`] matches driver personalities to them.

pub mod hotplug;
pub mod netlink;
pub mod sysfs;
pub mod uevent;

use portcullis_proto::property::PropValue;

use crate::{
    config::{Config, ConfigError},
    drivers,
    registry::RegistryError,
    session::Core,
};

/// Why the bus could not publish a device.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The device cannot be bound to its driver.
    #[error(transparent)]
    Device(#[from] drivers::DeviceError),
    /// A property is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The registry refused the service.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The kernel's bus could not be set up.
    #[error("the kernel's bus: {0}")]
    Io(#[from] std::io::Error),
}

/// Publishes the virtual bus (`vbus0`) and every configured device on it.
pub fn publish(core: &Core, config: &Config) -> Result<(), BusError> {
    let bus = core.publish(
        Some(core.registry().root()),
        "vbus0",
        "VirtualBus",
        Default::default(),
        None,
    )?;
    for device in &config.devices {
        let driver = drivers::create(device)?;
        let mut properties = device.registry_properties()?;
        properties.insert("driver".into(), PropValue::Text(device.driver.clone()));
        core.publish(Some(bus.id()), &device.name, driver.class(), properties, Some(driver))?;
    }
    Ok(())
}

/// A class of nub the kernel's bus publishes: its subsystem, the drivers that can start on it
/// and every property it can have (what a personality may match on).
#[derive(Debug, PartialEq, Eq)]
pub struct NubClass {
    /// The provider class personalities name.
    pub class: &'static str,
    /// The kernel subsystem.
    pub subsystem: &'static str,
    /// The driver families that can start on it.
    pub drivers: &'static [&'static str],
    /// Its properties.
    pub properties: &'static [&'static str],
}

/// Properties every kernel nub can have.
macro_rules! common {
    ($($extra:literal),*) => {
        &[
            "subsystem", "devpath", "kernel_name", "devname", "devtype", "major", "minor",
            "kernel.driver", "usb.vendor", "usb.product", "usb.serial", $($extra),*
        ]
    };
}

/// The nubs the kernel's bus publishes.
pub const NUB_CLASSES: &[NubClass] = &[
    NubClass {
        class: "TtyNub",
        subsystem: "tty",
        drivers: &["tty"],
        properties: common!(),
    },
    NubClass {
        class: "BlockNub",
        subsystem: "block",
        drivers: &["block"],
        properties: common!(
            "block.size_bytes",
            "block.read_only",
            "block.removable",
            "loop.backing_file"
        ),
    },
    NubClass {
        class: "NetNub",
        subsystem: "net",
        drivers: &["net"],
        properties: common!("net.interface", "net.ifindex", "net.tun"),
    },
];

/// Whether a class is the kernel's bus or one of its nubs: the broker's own view of the
/// host's devices, shown to administrators (`portcullis ls`) and never to clients, who see the
/// services drivers publish on them (which carry the nubs' properties).
pub fn is_kernel_internal(class: &str) -> bool {
    class == "KernelBus" || NUB_CLASSES.iter().any(|c| c.class == class)
}

/// The nub class of a subsystem the broker serves.
pub fn nub_class(subsystem: &str) -> Option<&'static NubClass> {
    NUB_CLASSES.iter().find(|c| c.subsystem == subsystem)
}
