//! The broker core shared by every session: the registry, the running policy and the event bus.

use std::sync::{Arc, RwLock};

use portcullis_policy::{Policy, ServiceView};
use portcullis_proto::layout::AbiId;
use portcullis_proto::property::Properties;
use tokio::sync::broadcast;

use super::PeerIdentity;
use crate::{
    driver::{Driver, DriverNotice},
    registry::{Matching, Registry, RegistryError, Service, ServiceId},
};

/// Capacity of the event bus; a session that falls further behind is told how many it lost.
const EVENT_BUS_CAPACITY: usize = 1024;

/// Something every session may need to hear about.
#[derive(Clone, Debug)]
pub enum CoreEvent {
    /// A service was published.
    Published(Arc<Service>),
    /// A service was terminated.
    Terminated {
        /// Its id.
        id: ServiceId,
        /// Its name.
        name: String,
    },
    /// A driver posted an interest notification.
    Notice {
        /// The service.
        service: Arc<Service>,
        /// What the driver said.
        notice: DriverNotice,
    },
}

/// The state shared by all sessions of one broker.
#[derive(Debug)]
pub struct Core {
    registry: Registry,
    policy: RwLock<Arc<Policy>>,
    events: broadcast::Sender<CoreEvent>,
}

impl Core {
    /// A core with an empty registry (the root only) and this policy.
    pub fn new(policy: Policy) -> Arc<Core> {
        let (events, _) = broadcast::channel(EVENT_BUS_CAPACITY);
        Arc::new(Core {
            registry: Registry::new(),
            policy: RwLock::new(Arc::new(policy)),
            events,
        })
    }

    /// The registry.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The running policy.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A receiver of every event from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<CoreEvent> {
        self.events.subscribe()
    }

    /// Publishes a service and tells subscribers.
    pub fn publish(
        &self,
        parent: Option<ServiceId>,
        name: &str,
        class: &str,
        properties: Properties,
        driver: Option<Arc<dyn Driver>>,
    ) -> Result<Arc<Service>, RegistryError> {
        let service = self.registry.publish(parent, name, class, properties, driver)?;
        tracing::info!(id = %service.id(), name, class, "service published");
        let _ = self.events.send(CoreEvent::Published(service.clone()));
        Ok(service)
    }

    /// Terminates a service and its descendants and tells every session.
    pub fn terminate(&self, id: ServiceId) {
        for service in self.registry.terminate(id) {
            tracing::info!(id = %service.id(), name = service.name(), "service terminated");
            let _ = self.events.send(CoreEvent::Terminated {
                id: service.id(),
                name: service.name().to_string(),
            });
        }
    }

    /// Posts a driver's notification about a service.
    pub fn notify(&self, service: &Arc<Service>, notice: DriverNotice) {
        let _ = self.events.send(CoreEvent::Notice {
            service: service.clone(),
            notice,
        });
    }

    /// Whether the policy lets this peer see the service.
    pub fn can_see(&self, peer: &PeerIdentity, abi: AbiId, service: &Service) -> bool {
        self.policy().can_see(&peer.task(abi), &view(service))
    }

    /// The services matching the dictionary that this peer may see (IOServiceGetMatchingServices).
    pub fn find_services(&self, peer: &PeerIdentity, abi: AbiId, matching: &Matching) -> Vec<Arc<Service>> {
        let policy = self.policy();
        let task = peer.task(abi);
        self.registry
            .find(matching)
            .into_iter()
            .filter(|s| policy.can_see(&task, &view(s)))
            .collect()
    }
}

/// The policy's view of a service.
pub(super) fn view(service: &Service) -> ServiceView<'_> {
    ServiceView {
        name: service.name(),
        class: service.class(),
        properties: service.properties(),
    }
}
