//! The virtual bus: publishes a nub per device declared in the configuration and binds it to
//! its driver. (Buses backed by sysfs/uevent publish the same way.)

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
