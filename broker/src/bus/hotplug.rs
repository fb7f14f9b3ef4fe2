//! The kernel's bus: a nub per tty, block and network device (from sysfs at start, from
//! uevents after), driver matching on each, and termination when a device leaves.
//!
//! Events are hints, sysfs is the truth: an event names a device, and the device is read again
//! from sysfs before anything is done, so a burst of events for one device costs one read and
//! one matching run (a storm is coalesced), and events lost to a full socket buffer cost a
//! resync. All of it runs on one thread of its own; calls never wait for it.

use std::{
    collections::{BTreeMap, BTreeSet},
    os::fd::OwnedFd,
    sync::{Arc, Mutex},
    time::Duration,
};

use portcullis_proto::property::{PropValue, Properties};
use rustix::event::{EventfdFlags, PollFd, PollFlags, eventfd, poll};

use super::{
    netlink::{Received, UeventSocket},
    nub_class,
    sysfs::{KernelDevice, Sysfs},
    uevent::{Action, Uevent},
};
use crate::{
    drivers,
    registry::{
        Binder, MatchRecord, Outcome, Running, Service, ServiceId, match_nub,
        personality::{DEFAULT_CATEGORY, Personalities, Personality},
    },
    session::Core,
    throttle::Throttle,
};

/// The registry name of the kernel's bus.
pub const BUS_NAME: &str = "kernel0";

/// Most messages taken from the socket before the batch is applied.
const MAX_BATCH: usize = 4096;

/// A driver that failed to start, with no other started in its category, is tried again this
/// often (doubling each time), at most [`MAX_RETRIES`] times: a device is often busy for a
/// moment after it appears (`ip tuntap add` holds the interface until it has made it
/// persistent), and no further event will say when it settles.
const RETRY_FIRST: Duration = Duration::from_millis(50);

/// Tries after the first failed start.
const MAX_RETRIES: u32 = 6;

/// Log lines about refused messages: a forger can send many.
static REFUSED: Throttle = Throttle::new(10, Duration::from_secs(1));

/// A nub and the drivers running on it.
struct Nub {
    service: Arc<Service>,
    device: KernelDevice,
    running: BTreeMap<String, Running>,
}

/// The kernel's bus: its nubs, keyed by devpath.
pub struct Hotplug {
    core: Arc<Core>,
    personalities: Personalities,
    sysfs: Sysfs,
    bus: ServiceId,
    nubs: Mutex<BTreeMap<String, Nub>>,
    /// Nubs to match again, when, and how many times they were already.
    retries: Mutex<BTreeMap<String, (std::time::Instant, u32)>>,
    /// Matching runs so far (one per device per batch, however many events named it).
    runs: std::sync::atomic::AtomicU64,
    stop: OwnedFd,
    runtime: Option<tokio::runtime::Handle>,
}

impl std::fmt::Debug for Hotplug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hotplug")
            .field("bus", &self.bus)
            .finish_non_exhaustive()
    }
}

impl Hotplug {
    /// Publishes the kernel's bus. Drivers that need a tokio runtime (network) start in the
    /// one current here, if any.
    pub fn new(core: Arc<Core>, personalities: Personalities, sysfs: Sysfs) -> Result<Arc<Hotplug>, super::BusError> {
        let properties = Properties::from([(
            "personalities".to_string(),
            PropValue::Unsigned(personalities.all().len() as u64),
        )]);
        let bus = core.publish(Some(core.registry().root()), BUS_NAME, "KernelBus", properties, None)?;
        let stop = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
            .map_err(|e| super::BusError::Io(std::io::Error::from(e)))?;
        Ok(Arc::new(Hotplug {
            core,
            personalities,
            sysfs,
            bus: bus.id(),
            nubs: Mutex::new(BTreeMap::new()),
            retries: Mutex::new(BTreeMap::new()),
            runs: std::sync::atomic::AtomicU64::new(0),
            stop,
            runtime: tokio::runtime::Handle::try_current().ok(),
        }))
    }

    /// Publishes a nub per device sysfs lists, and matches each.
    pub fn enumerate(&self) {
        let devices = self.sysfs.enumerate();
        tracing::info!(
            devices = devices.len(),
            personalities = self.personalities.all().len(),
            "enumerating the kernel's devices"
        );
        for device in devices {
            self.refresh_with(&device.devpath.clone(), Some(device));
        }
    }

    /// Brings every nub in line with sysfs: after events were lost.
    pub fn resync(&self) {
        let devices = self.sysfs.enumerate();
        let now: BTreeSet<String> = devices.iter().map(|d| d.devpath.clone()).collect();
        let gone: Vec<String> = self
            .nubs()
            .keys()
            .filter(|devpath| !now.contains(*devpath))
            .cloned()
            .collect();
        for devpath in gone {
            self.remove(&devpath);
        }
        for device in devices {
            self.refresh_with(&device.devpath.clone(), Some(device));
        }
    }

    /// Applies a batch of kernel events, coalesced: each device named is removed (when an
    /// event said so) and then read again and matched once.
    pub fn apply(&self, batch: &[Uevent]) {
        let mut order: Vec<&str> = Vec::new();
        let mut removed: BTreeSet<&str> = BTreeSet::new();
        let mut present: BTreeSet<&str> = BTreeSet::new();
        for event in batch.iter().filter(|e| nub_class(&e.subsystem).is_some()) {
            let devpath = event.devpath.as_str();
            tracing::debug!(action = event.action.name(), devpath, seqnum = event.seqnum, "uevent");
            if !order.contains(&devpath) {
                order.push(devpath);
            }
            match event.action {
                Action::Remove => {
                    removed.insert(devpath);
                    present.remove(devpath);
                }
                Action::Move => {
                    // A renamed device (an interface): the old path is gone.
                    if let Some(old) = event.get("DEVPATH_OLD") {
                        if !order.contains(&old) {
                            order.push(old);
                        }
                        removed.insert(old);
                        present.remove(old);
                    }
                    present.insert(devpath);
                }
                _ => {
                    present.insert(devpath);
                }
            }
        }
        for devpath in order {
            if removed.contains(devpath) {
                self.remove(devpath);
            }
            if present.contains(devpath) {
                self.refresh_with(devpath, None);
            }
        }
    }

    /// Reads `devpath` again (unless given what it is now) and publishes, updates or removes
    /// its nub, then runs matching.
    fn refresh_with(&self, devpath: &str, device: Option<KernelDevice>) {
        let device = match device.map_or_else(|| self.sysfs.read(devpath), |d| Ok(Some(d))) {
            Ok(Some(device)) => device,
            Ok(None) => {
                self.remove(devpath);
                return;
            }
            Err(e) => {
                tracing::warn!(devpath, error = %e, "an announced device could not be read; ignored");
                return;
            }
        };
        let mut nubs = self.nubs();
        if let Some(nub) = nubs.get_mut(devpath) {
            if nub.device.properties != device.properties || nub.device.node != device.node {
                nub.service.set_properties(device.properties.clone());
                tracing::info!(devpath, nub = nub.service.name(), "device changed");
            }
            nub.device = device;
        } else {
            let name = format!("{}/{}", device.class.subsystem, device.kernel_name);
            let service = match self.core.publish(
                Some(self.bus),
                &name,
                device.class.class,
                device.properties.clone(),
                None,
            ) {
                Ok(service) => service,
                Err(e) => {
                    tracing::warn!(devpath, error = %e, "no nub for this device");
                    return;
                }
            };
            nubs.insert(
                devpath.to_string(),
                Nub {
                    service,
                    device,
                    running: BTreeMap::new(),
                },
            );
        }
        let Some(nub) = nubs.get_mut(devpath) else {
            return;
        };
        let _entered = self.runtime.as_ref().map(tokio::runtime::Handle::enter);
        self.runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut binder = NubBinder {
            core: &self.core,
            nub: &nub.service,
            device: &nub.device,
        };
        let record = match_nub(
            self.personalities.for_class(nub.device.class.class),
            &nub.device.properties,
            &nub.running,
            &mut binder,
        );
        nub.running = running_after(&record);
        self.schedule_retry(devpath, &record);
        for running in nub.running.values() {
            if let Some(service) = self.core.registry().get(running.service)
                && let Some(p) = self.personalities.all().iter().find(|p| p.id == running.personality)
            {
                let properties = driver_properties(&nub.device, p);
                if *service.properties() != properties {
                    service.set_properties(properties);
                }
            }
        }
        nub.service.set_match_record(record);
    }

    /// Matches the nub again later when a category has no driver because a start failed.
    fn schedule_retry(&self, devpath: &str, record: &MatchRecord) {
        let failed = record.candidates.iter().any(|c| {
            matches!(c.outcome, Outcome::Start(_)) && !record.started().any(|(category, _)| category == c.category)
        });
        let mut retries = self.retries.lock().unwrap_or_else(|e| e.into_inner());
        if !failed {
            retries.remove(devpath);
            return;
        }
        let tries = retries.get(devpath).map_or(0, |(_, n)| *n);
        if tries >= MAX_RETRIES {
            retries.remove(devpath);
            tracing::warn!(
                devpath,
                tries,
                "no driver could start on this device; it is matched again at its next event"
            );
            return;
        }
        let due = std::time::Instant::now() + RETRY_FIRST * 2u32.pow(tries);
        retries.insert(devpath.to_string(), (due, tries + 1));
    }

    /// Matches again the nubs whose retry is due; returns how long until the next one.
    fn retry_due(&self) -> Option<Duration> {
        let now = std::time::Instant::now();
        let due: Vec<String> = {
            let retries = self.retries.lock().unwrap_or_else(|e| e.into_inner());
            retries
                .iter()
                .filter(|(_, (at, _))| *at <= now)
                .map(|(d, _)| d.clone())
                .collect()
        };
        for devpath in due {
            tracing::debug!(devpath, "matching again after a failed start");
            self.refresh_with(&devpath, None);
        }
        let retries = self.retries.lock().unwrap_or_else(|e| e.into_inner());
        retries.values().map(|(at, _)| at.saturating_duration_since(now)).min()
    }

    /// Terminates the nub of `devpath` and every driver on it.
    fn remove(&self, devpath: &str) {
        self.retries.lock().unwrap_or_else(|e| e.into_inner()).remove(devpath);
        let nub = self.nubs().remove(devpath);
        if let Some(nub) = nub {
            tracing::info!(devpath, nub = nub.service.name(), "device removed");
            self.core.terminate(nub.service.id());
        }
    }

    fn nubs(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Nub>> {
        self.nubs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Nubs published now.
    pub fn nub_count(&self) -> usize {
        self.nubs().len()
    }

    /// Matching runs so far: one per device per batch of events, however many named it.
    pub fn matching_runs(&self) -> u64 {
        self.runs.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Listens to the kernel's events on a thread of its own until [`Hotplug::stop`].
    pub fn listen(self: &Arc<Self>, socket: UeventSocket) -> std::io::Result<std::thread::JoinHandle<()>> {
        let this = self.clone();
        std::thread::Builder::new()
            .name("hotplug".into())
            .spawn(move || this.run(&socket))
    }

    /// Ends [`Hotplug::listen`]'s thread.
    pub fn stop(&self) {
        let _ = rustix::io::write(&self.stop, &1u64.to_ne_bytes());
    }

    fn run(&self, socket: &UeventSocket) {
        let mut wait = self.retry_due();
        loop {
            let mut fds = [
                PollFd::new(socket, PollFlags::IN),
                PollFd::new(&self.stop, PollFlags::IN),
            ];
            let timeout = wait.map(|d| rustix::event::Timespec {
                tv_sec: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                tv_nsec: i64::from(d.subsec_nanos()),
            });
            match poll(&mut fds, timeout.as_ref()) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => {
                    tracing::error!(error = %e, "hotplug: poll failed; no more device events");
                    return;
                }
            }
            if fds.get(1).is_some_and(|f| !f.revents().is_empty()) {
                return;
            }
            let mut batch = Vec::new();
            let mut overrun = false;
            while batch.len() < MAX_BATCH {
                match socket.receive() {
                    Ok(Received::Event(event)) => batch.push(event),
                    Ok(Received::Refused(why)) => {
                        if let Some(left_out) = REFUSED.admit() {
                            tracing::warn!(%why, left_out, "hotplug: a uevent was ignored");
                        }
                    }
                    Ok(Received::Overrun) => overrun = true,
                    Ok(Received::Empty) => break,
                    Err(e) => {
                        tracing::error!(error = %e, "hotplug: the uevent socket failed; no more device events");
                        return;
                    }
                }
            }
            if overrun {
                tracing::warn!("hotplug: the kernel dropped device events (socket buffer full); reading sysfs again");
                self.resync();
            } else if !batch.is_empty() {
                tracing::debug!(events = batch.len(), "hotplug: applying events");
                self.apply(&batch);
            }
            wait = self.retry_due();
        }
    }
}

/// The properties of a driver's service: the nub's, then the personality's (which win), then
/// which personality published it.
fn driver_properties(device: &KernelDevice, p: &Personality) -> Properties {
    let mut properties = device.properties.clone();
    properties.extend(p.properties.clone());
    for (key, value) in [
        ("driver", p.driver.as_str()),
        ("personality", p.id.as_str()),
        ("personality.version", p.version.as_str()),
        ("category", p.category.as_str()),
    ] {
        properties.insert(key.into(), PropValue::Text(value.into()));
    }
    properties
}

/// The drivers running after a matching run, by category.
fn running_after(record: &MatchRecord) -> BTreeMap<String, Running> {
    record
        .candidates
        .iter()
        .filter_map(|c| match c.outcome {
            Outcome::Started(service) => Some((
                c.category.clone(),
                Running {
                    personality: c.personality.clone(),
                    service,
                },
            )),
            _ => None,
        })
        .collect()
}

/// The four stages' driver side for one nub: the family's probe, and starting a driver by
/// publishing its service under the nub.
struct NubBinder<'a> {
    core: &'a Core,
    nub: &'a Arc<Service>,
    device: &'a KernelDevice,
}

impl Binder for NubBinder<'_> {
    fn probe(&mut self, personality: &Personality) -> Result<i64, String> {
        drivers::probe(personality, self.device)
    }

    fn start(&mut self, personality: &Personality) -> Result<ServiceId, String> {
        let driver = match crate::driver::contained(|| drivers::start(personality, self.device)) {
            Ok(result) => result?,
            Err(panic) => return Err(format!("the driver panicked while starting: {panic}")),
        };
        let name = if personality.category == DEFAULT_CATEGORY {
            self.device.kernel_name.clone()
        } else {
            format!("{}.{}", self.device.kernel_name, personality.category)
        };
        let service = self
            .core
            .publish(
                Some(self.nub.id()),
                &name,
                driver.class(),
                driver_properties(self.device, personality),
                Some(driver),
            )
            .map_err(|e| e.to_string())?;
        tracing::info!(nub = self.nub.name(), personality = personality.id, service = %service.id(), "driver started");
        Ok(service.id())
    }

    fn stop(&mut self, service: ServiceId) {
        tracing::info!(nub = self.nub.name(), %service, "driver's probe no longer passes: terminated");
        self.core.terminate(service);
    }
}

#[cfg(test)]
mod tests {
    use portcullis_policy::{Policy, Source};

    use super::*;

    fn hotplug() -> (Arc<Core>, Arc<Hotplug>) {
        let policy = Policy::parse(&[Source {
            origin: "default",
            text: crate::config::DEFAULT_POLICY,
        }])
        .unwrap();
        let core = Core::new(policy);
        let hotplug = Hotplug::new(core.clone(), Personalities::default(), Sysfs::default()).unwrap();
        (core, hotplug)
    }

    fn event(action: Action, devpath: &str, subsystem: &str, seqnum: u64) -> Uevent {
        Uevent {
            action,
            devpath: devpath.into(),
            subsystem: subsystem.into(),
            seqnum,
            vars: Vec::new(),
        }
    }

    fn nub_id(core: &Core, name: &str) -> Option<ServiceId> {
        core.registry()
            .find(&crate::registry::Matching::name(name))
            .first()
            .map(|s| s.id())
    }

    /// This machine's own loopback interface and /dev/tty, named by a storm of events: each is
    /// read and matched once per batch; subsystems the broker does not serve are ignored.
    #[test]
    fn a_storm_is_coalesced_to_one_matching_run_per_device() {
        let (core, hotplug) = hotplug();
        let storm: Vec<Uevent> = (0..2000u64)
            .map(|i| match i % 4 {
                0 => event(Action::Add, "/devices/virtual/net/lo", "net", i),
                1 | 2 => event(Action::Change, "/devices/virtual/net/lo", "net", i),
                _ => event(Action::Change, "/devices/virtual/tty/tty", "tty", i),
            })
            .chain([event(Action::Add, "/devices/virtual/input/input9", "input", 9999)])
            .collect();
        hotplug.apply(&storm);
        assert_eq!(hotplug.matching_runs(), 2);
        assert_eq!(hotplug.nub_count(), 2);
        let lo = nub_id(&core, "net/lo").unwrap();
        // A remove and an add in one batch: the device left and came back, a new service.
        hotplug.apply(&[
            event(Action::Remove, "/devices/virtual/net/lo", "net", 10_000),
            event(Action::Add, "/devices/virtual/net/lo", "net", 10_001),
        ]);
        let again = nub_id(&core, "net/lo").unwrap();
        assert!(again > lo, "{again} after {lo}");
        // An event for a device sysfs does not have publishes nothing (and removes its nub).
        hotplug.apply(&[event(Action::Add, "/devices/virtual/net/pcghost0", "net", 10_002)]);
        assert!(nub_id(&core, "net/pcghost0").is_none());
        // A removal of what is not known changes nothing.
        hotplug.apply(&[event(Action::Remove, "/devices/virtual/net/pcghost0", "net", 10_003)]);
        assert_eq!(hotplug.nub_count(), 2);
    }
}
