//! Services and the registry that holds them.

use std::{
    collections::BTreeMap,
    fmt,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use portcullis_proto::{layout::AbiId, pb, property::Properties};

use super::{Matching, arbitration::Arbitration};
use crate::driver::Driver;

/// A registry entry id, unique for the broker's lifetime (never reused).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceId(pub u64);

impl fmt::Display for ServiceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// One service: a bus, a device nub with its driver, or the root.
pub struct Service {
    id: ServiceId,
    name: String,
    class: String,
    /// Swapped whole when a nub's device changes (a `change` uevent).
    properties: RwLock<Arc<Properties>>,
    /// For a nub: how matching went the last time it ran.
    matching: RwLock<Option<Arc<super::MatchRecord>>>,
    parent: Option<ServiceId>,
    children: RwLock<Vec<ServiceId>>,
    driver: Option<Arc<dyn Driver>>,
    terminated: AtomicBool,
    pub(super) arbitration: Arbitration,
}

impl fmt::Debug for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Service")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("class", &self.class)
            .finish_non_exhaustive()
    }
}

impl Service {
    /// The service id.
    pub fn id(&self) -> ServiceId {
        self.id
    }

    /// The registry name (`sample0`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The class (`SampleDevice`); the driver's family for device services.
    pub fn class(&self) -> &str {
        &self.class
    }

    /// Typed properties, as they are now.
    pub fn properties(&self) -> Arc<Properties> {
        self.properties.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the properties (a nub whose device changed).
    pub(crate) fn set_properties(&self, properties: Properties) {
        *self.properties.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(properties);
    }

    /// How matching went for this nub the last time it ran; `None` for other services.
    pub fn match_record(&self) -> Option<Arc<super::MatchRecord>> {
        self.matching.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Records how matching went for this nub.
    pub(crate) fn set_match_record(&self, record: super::MatchRecord) {
        *self.matching.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(record));
    }

    /// The driver, for device services.
    pub fn driver(&self) -> Option<&Arc<dyn Driver>> {
        self.driver.as_ref()
    }

    /// Opens of this service held now (shared ones, plus one for an exclusive open).
    pub fn opens_held(&self) -> usize {
        self.arbitration.held()
    }

    /// Whether an exclusive open of this service is held.
    pub fn held_exclusively(&self) -> bool {
        self.arbitration.exclusive()
    }

    /// Whether the service has been terminated (its device is gone).
    pub fn is_terminated(&self) -> bool {
        self.terminated.load(Ordering::Acquire)
    }

    /// The parent's id; `None` for the root.
    pub fn parent(&self) -> Option<ServiceId> {
        self.parent
    }

    /// Ids of the children, in publication order.
    pub fn children(&self) -> Vec<ServiceId> {
        self.children.read().map(|c| c.clone()).unwrap_or_default()
    }

    /// The wire description of this service, with struct sizes as a client of `abi` sees them.
    pub fn info(&self, abi: AbiId) -> pb::ServiceInfo {
        pb::ServiceInfo {
            id: self.id.0,
            name: self.name.clone(),
            class: self.class.clone(),
            parent: self.parent.map_or(0, |p| p.0),
            children: self.children().into_iter().map(|c| c.0).collect(),
            properties: self.properties().iter().map(|(k, v)| (k.clone(), v.into())).collect(),
            methods: self.driver.as_ref().map(|d| d.methods().infos(abi)).unwrap_or_default(),
            candidates: self
                .match_record()
                .map(|r| r.candidates.iter().map(Into::into).collect())
                .unwrap_or_default(),
        }
    }
}

/// All services, by id. Reads vastly outnumber writes (publication and termination).
#[derive(Debug)]
pub struct Registry {
    services: RwLock<BTreeMap<ServiceId, Arc<Service>>>,
    next_id: AtomicU64,
}

impl Default for Registry {
    fn default() -> Self {
        Registry::new()
    }
}

/// Why a service could not be published.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Service names are unique among live services.
    #[error("a service named {0:?} already exists")]
    DuplicateName(String),
    /// The parent id is not a live service.
    #[error("parent service {0} does not exist")]
    NoParent(ServiceId),
}

impl Registry {
    /// A registry holding only the root service (`Root`, id 1).
    pub fn new() -> Registry {
        let registry = Registry {
            services: RwLock::new(BTreeMap::new()),
            next_id: AtomicU64::new(1),
        };
        // The registry is empty, so neither error can happen.
        let _ = registry.publish(None, "Root", "Root", Properties::new(), None);
        registry
    }

    /// The root's id.
    pub fn root(&self) -> ServiceId {
        ServiceId(1)
    }

    /// Publishes a service under `parent` (`None` only for the root).
    pub fn publish(
        &self,
        parent: Option<ServiceId>,
        name: &str,
        class: &str,
        properties: Properties,
        driver: Option<Arc<dyn Driver>>,
    ) -> Result<Arc<Service>, RegistryError> {
        let mut services = self.services.write().unwrap_or_else(|e| e.into_inner());
        if services.values().any(|s| s.name == name && !s.is_terminated()) {
            return Err(RegistryError::DuplicateName(name.to_string()));
        }
        let parent_service = match parent {
            Some(p) => Some(
                services
                    .get(&p)
                    .filter(|s| !s.is_terminated())
                    .ok_or(RegistryError::NoParent(p))?
                    .clone(),
            ),
            None => None,
        };
        let id = ServiceId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let service = Arc::new(Service {
            id,
            name: name.to_string(),
            class: class.to_string(),
            properties: RwLock::new(Arc::new(properties)),
            matching: RwLock::new(None),
            parent,
            children: RwLock::new(Vec::new()),
            driver,
            terminated: AtomicBool::new(false),
            arbitration: Arbitration::default(),
        });
        if let Some(p) = parent_service {
            p.children.write().unwrap_or_else(|e| e.into_inner()).push(id);
        }
        services.insert(id, service.clone());
        Ok(service)
    }

    /// Terminates a service and all its descendants, deepest first; returns them in that order.
    /// Their drivers are told to abort pending work.
    pub fn terminate(&self, id: ServiceId) -> Vec<Arc<Service>> {
        let mut services = self.services.write().unwrap_or_else(|e| e.into_inner());
        let mut order = Vec::new();
        let mut stack = vec![id];
        while let Some(next) = stack.pop() {
            if let Some(s) = services.get(&next) {
                stack.extend(s.children());
                order.push(s.clone());
            }
        }
        order.reverse();
        for s in &order {
            s.terminated.store(true, Ordering::Release);
            if let Some(d) = &s.driver
                && let Err(panic) = crate::driver::contained(|| d.terminate())
            {
                tracing::error!(service = s.name(), %panic, "the driver panicked while terminating");
            }
            services.remove(&s.id);
            if let Some(parent) = s.parent.and_then(|p| services.get(&p)) {
                parent
                    .children
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .retain(|c| *c != s.id);
            }
        }
        order
    }

    /// Every live service, each after its parent (the power tree's order coming up; reversed,
    /// the order going down).
    pub fn parents_first(&self) -> Vec<Arc<Service>> {
        let services = self.services.read().unwrap_or_else(|e| e.into_inner());
        let mut order = Vec::with_capacity(services.len());
        let mut stack = vec![self.root()];
        while let Some(next) = stack.pop() {
            if let Some(s) = services.get(&next) {
                stack.extend(s.children().into_iter().rev());
                order.push(s.clone());
            }
        }
        order
    }

    /// The live service with this id.
    pub fn get(&self, id: ServiceId) -> Option<Arc<Service>> {
        self.services
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned()
    }

    /// Live services matching the dictionary, in id order.
    pub fn find(&self, matching: &Matching) -> Vec<Arc<Service>> {
        self.services
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|s| matching.matches(s))
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use portcullis_proto::property::PropValue;

    use super::*;

    #[test]
    fn registry_publish_links_parent_and_child() {
        let r = Registry::new();
        let bus = r
            .publish(Some(r.root()), "vbus0", "VirtualBus", Properties::new(), None)
            .unwrap();
        let dev = r
            .publish(Some(bus.id()), "dev0", "Thing", Properties::new(), None)
            .unwrap();
        assert_eq!(r.get(r.root()).unwrap().children(), vec![bus.id()]);
        assert_eq!(bus.children(), vec![dev.id()]);
        assert_eq!(dev.parent(), Some(bus.id()));
        assert_eq!(dev.info(AbiId::native()).parent, bus.id().0);
    }

    #[test]
    fn registry_duplicate_name_is_refused() {
        let r = Registry::new();
        r.publish(Some(r.root()), "a", "X", Properties::new(), None).unwrap();
        assert!(matches!(
            r.publish(Some(r.root()), "a", "X", Properties::new(), None),
            Err(RegistryError::DuplicateName(_))
        ));
    }

    #[test]
    fn registry_terminate_removes_subtree_deepest_first() {
        let r = Registry::new();
        let bus = r
            .publish(Some(r.root()), "bus", "Bus", Properties::new(), None)
            .unwrap();
        let dev = r
            .publish(Some(bus.id()), "dev", "Thing", Properties::new(), None)
            .unwrap();
        let gone = r.terminate(bus.id());
        assert_eq!(
            gone.iter().map(|s| s.id()).collect::<Vec<_>>(),
            vec![dev.id(), bus.id()]
        );
        assert!(dev.is_terminated());
        assert!(r.get(dev.id()).is_none());
        assert!(r.get(r.root()).unwrap().children().is_empty());
        // The name is free again and ids are never reused.
        let again = r
            .publish(Some(r.root()), "bus", "Bus", Properties::new(), None)
            .unwrap();
        assert!(again.id() > dev.id());
    }

    #[test]
    fn registry_find_filters_by_matching() {
        let r = Registry::new();
        let props = Properties::from([("model".to_string(), PropValue::Text("demo".into()))]);
        r.publish(Some(r.root()), "a", "Sample", props, None).unwrap();
        r.publish(Some(r.root()), "b", "Sample", Properties::new(), None)
            .unwrap();
        let m = Matching {
            class: Some("Sample".into()),
            properties: Properties::from([("model".to_string(), PropValue::Text("demo".into()))]),
            ..Matching::default()
        };
        let found = r.find(&m);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].name(), "a");
        assert_eq!(r.find(&Matching::default()).len(), 3);
    }
}
