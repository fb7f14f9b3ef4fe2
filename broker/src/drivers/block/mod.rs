//! The block family (`BlockDevice`): a block device node (a disk, a partition, a loop device
//! over a file in tests) whose blocks clients read and write through their `dma` memory.

mod device;
mod methods;
#[allow(unsafe_code)]
mod sys;

pub use device::{BlockDevice, FAMILY};
pub use methods::{DMA, Selector};

/// Who else uses the block device `major:minor` (sysfs path `devpath`), or one of its
/// partitions: a mount (from this process's mount table, which is the broker's view), or a
/// kernel holder (device-mapper, md, …). `None` when nobody does.
pub fn in_use(devpath: &str, major: u32, minor: u32) -> Option<String> {
    let dir = std::path::Path::new("/sys").join(devpath.trim_start_matches('/'));
    let mut devices = vec![(format!("{major}:{minor}"), dir.clone())];
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.join("partition").is_file()
                && let Ok(dev) = std::fs::read_to_string(path.join("dev"))
            {
                devices.push((dev.trim().to_string(), path));
            }
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for (dev, path) in &devices {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // mountinfo(5): id parent major:minor root mount-point …
        if let Some(at) = mounts
            .lines()
            .map(|l| l.split(' ').collect::<Vec<_>>())
            .find(|f| f.get(2) == Some(&dev.as_str()))
            .and_then(|f| f.get(4).map(|m| m.to_string()))
        {
            return Some(format!("{name} is mounted at {at}"));
        }
        if let Some(holder) = std::fs::read_dir(path.join("holders"))
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|e| e.ok())
        {
            return Some(format!("{name} is held by {}", holder.file_name().to_string_lossy()));
        }
    }
    None
}
