//! The kernel's view of its devices, read from sysfs: the tty, block and network devices the
//! broker serves, each with the properties personalities and policy match on. Nothing here
//! opens a device node; every value read is bounded and checked (a `DEVNAME` names a node
//! under `/dev` and nothing else).

use std::{
    io::Read,
    path::{Path, PathBuf},
};

use portcullis_proto::property::{PropValue, Properties};

use super::{NUB_CLASSES, NubClass, nub_class};

/// Longest attribute file read (sysfs attributes are one page at most).
const MAX_ATTRIBUTE: u64 = 4096;

/// `IFF_TUN` in a TUN/TAP interface's `tun_flags`.
const IFF_TUN: u64 = 0x0001;

/// One device as sysfs shows it now.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelDevice {
    /// `/devices/virtual/block/loop0`: the key of a nub for its whole life.
    pub devpath: String,
    /// Its nub class.
    pub class: &'static NubClass,
    /// The last component of the devpath (`loop0`, `ttyS0`, `tun7`).
    pub kernel_name: String,
    /// The device node the kernel made for it (`/dev/loop0`) with its number; none for
    /// network interfaces.
    pub node: Option<Node>,
    /// What personalities and policy match on.
    pub properties: Properties,
}

/// A device node: where it should be and the number it must have.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// `/dev/<DEVNAME>`.
    pub path: PathBuf,
    /// Major number.
    pub major: u32,
    /// Minor number.
    pub minor: u32,
}

impl Node {
    /// The device number as `st_rdev` holds it.
    pub fn rdev(&self) -> u64 {
        rustix::fs::makedev(self.major, self.minor)
    }
}

/// A sysfs tree: `/sys` on a running system.
#[derive(Clone, Debug)]
pub struct Sysfs {
    root: PathBuf,
}

impl Default for Sysfs {
    fn default() -> Self {
        Sysfs { root: "/sys".into() }
    }
}

impl Sysfs {
    /// The tree mounted at `root`.
    pub fn at(root: impl Into<PathBuf>) -> Sysfs {
        Sysfs { root: root.into() }
    }

    /// Where the tree is mounted.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Every device of the subsystems the broker serves, in devpath order.
    pub fn enumerate(&self) -> Vec<KernelDevice> {
        let mut out = Vec::new();
        for class in NUB_CLASSES {
            let Ok(entries) = std::fs::read_dir(self.root.join("class").join(class.subsystem)) else {
                continue;
            };
            for entry in entries.flatten() {
                let Ok(real) = std::fs::canonicalize(entry.path()) else {
                    continue;
                };
                let Some(devpath) = real
                    .strip_prefix(&self.root)
                    .ok()
                    .and_then(|p| p.to_str())
                    .map(|p| format!("/{p}"))
                else {
                    continue;
                };
                match self.read(&devpath) {
                    Ok(Some(device)) => out.push(device),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(devpath, error = %e, "a device sysfs lists could not be read; no nub for it")
                    }
                }
            }
        }
        out.sort_by(|a, b| a.devpath.cmp(&b.devpath));
        out.dedup_by(|a, b| a.devpath == b.devpath);
        out
    }

    /// The device at `devpath` as it is now: `None` when it is gone or of a subsystem the
    /// broker does not serve.
    pub fn read(&self, devpath: &str) -> Result<Option<KernelDevice>, String> {
        if !devpath.starts_with("/devices/")
            || devpath
                .split('/')
                .skip(1)
                .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(format!("{devpath:?} is not a device path"));
        }
        let dir = self.root.join(devpath.trim_start_matches('/'));
        let Ok(subsystem) = std::fs::read_link(dir.join("subsystem")) else {
            return Ok(None);
        };
        let Some(class) = subsystem.file_name().and_then(|n| n.to_str()).and_then(nub_class) else {
            return Ok(None);
        };
        let Some(uevent) = attribute(&dir.join("uevent")) else {
            return Ok(None);
        };
        let kernel_name = devpath.rsplit('/').next().unwrap_or_default().to_string();
        let vars: Vec<(&str, &str)> = uevent.lines().filter_map(|l| l.split_once('=')).collect();
        let var = |key: &str| vars.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
        let mut properties = Properties::new();
        let mut text = |key: &str, value: &str| {
            properties.insert(key.to_string(), PropValue::Text(value.to_string()));
        };
        text("subsystem", class.subsystem);
        text("devpath", devpath);
        text("kernel_name", &kernel_name);
        if let Some(devtype) = var("DEVTYPE") {
            text("devtype", devtype);
        }
        let node = match (var("DEVNAME"), var("MAJOR"), var("MINOR")) {
            (Some(name), Some(major), Some(minor)) => {
                if !is_devname(name) {
                    return Err(format!("DEVNAME {name:?} does not name a node under /dev"));
                }
                let (Ok(major), Ok(minor)) = (major.parse::<u32>(), minor.parse::<u32>()) else {
                    return Err(format!("MAJOR {major:?} / MINOR {minor:?} are not numbers"));
                };
                text("devname", name);
                Some(Node {
                    path: Path::new("/dev").join(name),
                    major,
                    minor,
                })
            }
            _ => None,
        };
        if let Some(node) = &node {
            properties.insert("major".into(), PropValue::Unsigned(node.major.into()));
            properties.insert("minor".into(), PropValue::Unsigned(node.minor.into()));
        }
        if let Some(driver) = link_name(&dir.join("device/driver")) {
            properties.insert("kernel.driver".into(), PropValue::Text(driver));
        }
        if let Some(usb) = self.usb_parent(&dir) {
            for (key, file) in [
                ("usb.vendor", "idVendor"),
                ("usb.product", "idProduct"),
                ("usb.serial", "serial"),
            ] {
                if let Some(value) = attribute(&usb.join(file)) {
                    properties.insert(key.into(), PropValue::Text(value.trim().to_string()));
                }
            }
        }
        match class.subsystem {
            "block" => {
                let number = |file: &str| attribute(&dir.join(file)).and_then(|s| s.trim().parse::<u64>().ok());
                if let Some(sectors) = number("size") {
                    properties.insert(
                        "block.size_bytes".into(),
                        PropValue::Unsigned(sectors.saturating_mul(512)),
                    );
                }
                properties.insert("block.read_only".into(), PropValue::Flag(number("ro") == Some(1)));
                properties.insert(
                    "block.removable".into(),
                    PropValue::Flag(number("removable") == Some(1)),
                );
                if let Some(file) = attribute(&dir.join("loop/backing_file")) {
                    properties.insert("loop.backing_file".into(), PropValue::Text(file.trim_end().to_string()));
                }
            }
            "net" => {
                let interface = var("INTERFACE").unwrap_or(&kernel_name).to_string();
                properties.insert("net.interface".into(), PropValue::Text(interface));
                if let Some(index) = var("IFINDEX").and_then(|i| i.parse::<u64>().ok()) {
                    properties.insert("net.ifindex".into(), PropValue::Unsigned(index));
                }
                let tun = attribute(&dir.join("tun_flags"))
                    .and_then(|f| u64::from_str_radix(f.trim().trim_start_matches("0x"), 16).ok())
                    .is_some_and(|f| f & IFF_TUN != 0);
                properties.insert("net.tun".into(), PropValue::Flag(tun));
            }
            _ => {}
        }
        Ok(Some(KernelDevice {
            devpath: devpath.to_string(),
            class,
            kernel_name,
            node,
            properties,
        }))
    }

    /// The USB device above `dir` (the first ancestor with an `idVendor`), if there is one.
    fn usb_parent(&self, dir: &Path) -> Option<PathBuf> {
        let devices = self.root.join("devices");
        let mut at = std::fs::canonicalize(dir.join("device")).ok()?;
        while at.starts_with(&devices) && at != devices {
            if at.join("idVendor").is_file() {
                return Some(at);
            }
            at = at.parent()?.to_path_buf();
        }
        None
    }
}

/// A sysfs attribute's text, bounded; `None` when it cannot be read.
fn attribute(path: &Path) -> Option<String> {
    let mut text = String::new();
    std::fs::File::open(path)
        .ok()?
        .take(MAX_ATTRIBUTE)
        .read_to_string(&mut text)
        .ok()?;
    Some(text)
}

/// The last component of a symbolic link's target (`device/driver` → `serial8250`).
fn link_name(path: &Path) -> Option<String> {
    std::fs::read_link(path).ok()?.file_name()?.to_str().map(String::from)
}

/// Whether a `DEVNAME` names a node under `/dev`: relative, no `.` or `..` component, no
/// empty one, printable, 255 bytes at most.
pub fn is_devname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('/')
        && name.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/_-.:+@".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devnames_stay_under_dev() {
        for good in ["loop0", "ttyS0", "pts/3", "mapper/vg-root", "input/event1"] {
            assert!(is_devname(good), "{good}");
        }
        for bad in [
            "",
            "/etc/shadow",
            "../etc/shadow",
            "pts/../../etc",
            "a//b",
            "a\nb",
            "sda 1",
            "./x",
        ] {
            assert!(!is_devname(bad), "{bad:?}");
        }
    }

    /// This machine's own sysfs: every tty, block and net device is found with its subsystem,
    /// and nothing is opened (reading sysfs needs no device node).
    #[test]
    fn enumerates_the_subsystems_served_on_this_machine() {
        let devices = Sysfs::default().enumerate();
        for subsystem in ["tty", "block", "net"] {
            let listed = std::fs::read_dir(format!("/sys/class/{subsystem}")).map_or(0, |d| d.count());
            let found = devices.iter().filter(|d| d.class.subsystem == subsystem).count();
            assert_eq!(found, listed, "{subsystem}");
        }
        let lo = devices
            .iter()
            .find(|d| d.kernel_name == "lo")
            .expect("the loopback interface");
        assert_eq!(lo.class.class, "NetNub");
        assert_eq!(lo.properties.get("net.tun"), Some(&PropValue::Flag(false)));
        assert_eq!(lo.properties.get("net.interface"), Some(&PropValue::Text("lo".into())));
        assert!(lo.node.is_none());
        let tty = devices.iter().find(|d| d.kernel_name == "tty").expect("/dev/tty");
        assert_eq!(
            tty.node,
            Some(Node {
                path: "/dev/tty".into(),
                major: 5,
                minor: 0
            })
        );
        assert_eq!(
            tty.properties.get("devpath"),
            Some(&PropValue::Text("/devices/virtual/tty/tty".into()))
        );
    }

    #[test]
    fn paths_that_are_not_device_paths_are_refused() {
        let sysfs = Sysfs::default();
        for bad in ["/etc", "/devices/../../etc", "devices/virtual", "/devices//x"] {
            assert!(sysfs.read(bad).is_err(), "{bad}");
        }
        assert_eq!(sysfs.read("/devices/virtual/net/no-such-interface"), Ok(None));
    }
}
