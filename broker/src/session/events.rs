//! The core's events, delivered only to the sessions they concern.
//!
//! Every session registers a listener with the hub and tells it what it listens for: its
//! subscription (every service, or some), its matching watches, and the services it holds user
//! clients of. An event goes to the listeners its kind and service name, found through indexes
//! — never to every session:
//!
//! | event | listeners |
//! |---|---|
//! | `Notice` (a driver's notification) | subscribed to every service or to that one |
//! | `Published` | subscribed to every service, or holding a matching watch |
//! | `Terminated` | those, those subscribed to that service, and those holding a user client of it |
//! | `PolicyReloaded` | those holding any user client (their grants change) |
//! | `WillSleep`, `HasWoken` | every session |
//!
//! So a `fire_event` with 4,000 idle sessions costs what it costs with none. Each listener has a
//! bounded queue; a listener that does not keep up loses events and is told how many it lost
//! (it then closes user clients of terminated services by looking, not by being told).

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::sync::mpsc;

use super::CoreEvent;
use crate::registry::ServiceId;

/// Events queued for one listener before it starts losing them.
pub(crate) const LISTENER_QUEUE: usize = 1024;

/// A listener missed events: how many.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missed {
    /// This many events were dropped because the listener's queue was full.
    Lagged(u64),
    /// The broker's core is gone.
    Closed,
}

/// What a listener's subscription covers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) enum Subscribed {
    #[default]
    None,
    All,
    Services(Vec<ServiceId>),
}

#[derive(Debug)]
struct Sink {
    tx: mpsc::Sender<Arc<CoreEvent>>,
    lost: Arc<AtomicU64>,
}

#[derive(Debug, Default)]
struct Index {
    next: u64,
    sinks: HashMap<u64, Sink>,
    subscriptions: HashMap<u64, Subscribed>,
    /// Subscribed to every service.
    all: HashSet<u64>,
    /// Subscribed to the service.
    subscribed: HashMap<ServiceId, HashSet<u64>>,
    /// Holding a matching watch.
    watchers: HashSet<u64>,
    /// User clients held, per service and listener.
    held: HashMap<ServiceId, HashMap<u64, u32>>,
    /// User clients held per listener (any service).
    holders: HashMap<u64, u32>,
    observers: HashSet<u64>,
}

/// Delivers the core's events. One per core.
#[derive(Debug, Default)]
pub struct EventHub {
    index: Mutex<Index>,
    /// Events queued for a listener since the hub was made (what the structural tests count).
    deliveries: AtomicU64,
}

impl EventHub {
    fn index(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a session's listener, hearing nothing yet but what every session hears.
    pub(crate) fn listen(self: &Arc<Self>) -> (Listener, EventReceiver) {
        self.register(false)
    }

    /// A receiver of every event from now on (tools and tests).
    pub fn observe(self: &Arc<Self>) -> EventReceiver {
        let (listener, receiver) = self.register(true);
        // The receiver keeps the registration: it ends when the receiver goes.
        EventReceiver {
            _listener: Some(listener),
            ..receiver
        }
    }

    fn register(self: &Arc<Self>, observer: bool) -> (Listener, EventReceiver) {
        let (tx, rx) = mpsc::channel(LISTENER_QUEUE);
        let lost = Arc::new(AtomicU64::new(0));
        let mut index = self.index();
        let id = index.next;
        index.next += 1;
        index.sinks.insert(id, Sink { tx, lost: lost.clone() });
        if observer {
            index.observers.insert(id);
        }
        drop(index);
        let listener = Listener { hub: self.clone(), id };
        (
            listener,
            EventReceiver {
                rx,
                lost,
                _listener: None,
            },
        )
    }

    /// Queues `event` for the listeners it concerns. Costs the number of those listeners.
    pub fn publish(&self, event: CoreEvent) {
        let event = Arc::new(event);
        let index = self.index();
        let mut to = HashSet::new();
        let mut add = |set: Option<&HashSet<u64>>| {
            if let Some(set) = set {
                to.extend(set.iter().copied());
            }
        };
        match &*event {
            CoreEvent::Notice { service, .. } => {
                add(Some(&index.all));
                add(index.subscribed.get(&service.id()));
            }
            CoreEvent::Published(_) => {
                add(Some(&index.all));
                add(Some(&index.watchers));
            }
            CoreEvent::Terminated { id, .. } => {
                add(Some(&index.all));
                add(Some(&index.watchers));
                add(index.subscribed.get(id));
                to.extend(index.held.get(id).into_iter().flat_map(|h| h.keys().copied()));
            }
            CoreEvent::PolicyReloaded { .. } => to.extend(index.holders.keys().copied()),
            CoreEvent::WillSleep | CoreEvent::HasWoken => to.extend(index.sinks.keys().copied()),
        }
        to.extend(index.observers.iter().copied());
        for id in to {
            let Some(sink) = index.sinks.get(&id) else {
                continue;
            };
            match sink.tx.try_send(event.clone()) {
                Ok(()) => {
                    self.deliveries.fetch_add(1, Ordering::Relaxed);
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    sink.lost.fetch_add(1, Ordering::Relaxed);
                }
                // The receiver is gone; the listener leaves with its session.
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
    }

    /// Events queued for listeners so far.
    pub fn deliveries(&self) -> u64 {
        self.deliveries.load(Ordering::Relaxed)
    }

    /// Listeners registered (sessions and observers).
    pub fn listeners(&self) -> usize {
        self.index().sinks.len()
    }
}

/// A session's registration with the hub: what it listens for. Leaves the hub when dropped.
#[derive(Debug)]
pub(crate) struct Listener {
    hub: Arc<EventHub>,
    id: u64,
}

impl Listener {
    /// Replaces the subscription.
    pub(crate) fn subscribe(&self, to: Subscribed) {
        let mut index = self.hub.index();
        let index = &mut *index;
        let old = index.subscriptions.remove(&self.id).unwrap_or_default();
        match old {
            Subscribed::None => {}
            Subscribed::All => {
                index.all.remove(&self.id);
            }
            Subscribed::Services(ids) => {
                for sid in ids {
                    if let Some(set) = index.subscribed.get_mut(&sid) {
                        set.remove(&self.id);
                        if set.is_empty() {
                            index.subscribed.remove(&sid);
                        }
                    }
                }
            }
        }
        match &to {
            Subscribed::None => return,
            Subscribed::All => {
                index.all.insert(self.id);
            }
            Subscribed::Services(ids) => {
                for sid in ids {
                    index.subscribed.entry(*sid).or_default().insert(self.id);
                }
            }
        }
        index.subscriptions.insert(self.id, to);
    }

    /// The session holds a matching watch (it hears every publication, to match it).
    pub(crate) fn watch(&self) {
        self.hub.index().watchers.insert(self.id);
    }

    /// The session holds a user client of `service` until the returned guard goes.
    pub(crate) fn hold(&self, service: ServiceId) -> Held {
        let mut index = self.hub.index();
        *index.held.entry(service).or_default().entry(self.id).or_default() += 1;
        *index.holders.entry(self.id).or_default() += 1;
        Held {
            hub: self.hub.clone(),
            listener: self.id,
            service,
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.subscribe(Subscribed::None);
        let mut index = self.hub.index();
        index.sinks.remove(&self.id);
        index.watchers.remove(&self.id);
        index.observers.remove(&self.id);
        // Held guards normally went first (a session's user clients go before it); a guard
        // that outlives its listener finds nothing to take away.
    }
}

/// A user client's interest in its service's events (`Terminated`, policy reloads).
#[derive(Debug)]
pub(crate) struct Held {
    hub: Arc<EventHub>,
    listener: u64,
    service: ServiceId,
}

fn decrement<K: std::hash::Hash + Eq>(map: &mut HashMap<K, u32>, key: &K) {
    if let Some(n) = map.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            map.remove(key);
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut index = self.hub.index();
        if let Some(per) = index.held.get_mut(&self.service) {
            decrement(per, &self.listener);
            if per.is_empty() {
                index.held.remove(&self.service);
            }
        }
        decrement(&mut index.holders, &self.listener);
    }
}

/// Where a listener's events arrive.
#[derive(Debug)]
pub struct EventReceiver {
    rx: mpsc::Receiver<Arc<CoreEvent>>,
    lost: Arc<AtomicU64>,
    /// An observer's registration, kept as long as the receiver.
    _listener: Option<Listener>,
}

impl EventReceiver {
    /// A receiver that hears nothing: its `recv` answers `Closed`.
    pub fn closed() -> EventReceiver {
        let (_, rx) = mpsc::channel(1);
        EventReceiver {
            rx,
            lost: Arc::default(),
            _listener: None,
        }
    }

    /// The next event, or how many were lost before it.
    pub async fn recv(&mut self) -> Result<Arc<CoreEvent>, Missed> {
        if let Some(n) = self.take_lost() {
            return Err(Missed::Lagged(n));
        }
        self.rx.recv().await.ok_or(Missed::Closed)
    }

    /// An event already queued, if any.
    pub fn try_recv(&mut self) -> Option<Result<Arc<CoreEvent>, Missed>> {
        if let Some(n) = self.take_lost() {
            return Some(Err(Missed::Lagged(n)));
        }
        match self.rx.try_recv() {
            Ok(event) => Some(Ok(event)),
            Err(mpsc::error::TryRecvError::Empty) => None,
            Err(mpsc::error::TryRecvError::Disconnected) => Some(Err(Missed::Closed)),
        }
    }

    fn take_lost(&self) -> Option<u64> {
        match self.lost.swap(0, Ordering::Relaxed) {
            0 => None,
            n => Some(n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notice(id: u32) -> CoreEvent {
        let registry = crate::registry::Registry::default();
        let service = registry
            .publish(None, &format!("s{id}"), "SampleDevice", Default::default(), None)
            .unwrap();
        CoreEvent::Notice {
            service,
            notice: crate::driver::DriverNotice {
                kind: "event",
                value: 1,
                detail: String::new(),
            },
        }
    }

    #[test]
    fn a_notice_reaches_only_its_subscribers() {
        let hub = Arc::new(EventHub::default());
        let event = notice(1);
        let CoreEvent::Notice { service, .. } = &event else {
            unreachable!()
        };
        let sid = service.id();
        let idle: Vec<_> = (0..1000).map(|_| hub.listen()).collect();
        let (everything, mut all_rx) = hub.listen();
        everything.subscribe(Subscribed::All);
        let (one, mut one_rx) = hub.listen();
        one.subscribe(Subscribed::Services(vec![sid]));
        let (other, mut other_rx) = hub.listen();
        other.subscribe(Subscribed::Services(vec![ServiceId(sid.0 + 1)]));
        hub.publish(event);
        assert_eq!(hub.deliveries(), 2, "two subscribers, 1,002 other listeners");
        assert!(all_rx.try_recv().is_some_and(|e| e.is_ok()));
        assert!(one_rx.try_recv().is_some_and(|e| e.is_ok()));
        assert!(other_rx.try_recv().is_none());
        for (_, mut rx) in idle {
            assert!(rx.try_recv().is_none());
        }
    }

    #[test]
    fn terminated_and_reloads_reach_holders_power_reaches_everyone() {
        let hub = Arc::new(EventHub::default());
        let (holder, mut holder_rx) = hub.listen();
        let (_idle, mut idle_rx) = hub.listen();
        let held = holder.hold(ServiceId(7));
        hub.publish(CoreEvent::Terminated {
            id: ServiceId(7),
            name: "s".into(),
        });
        hub.publish(CoreEvent::PolicyReloaded { generation: 2 });
        assert!(holder_rx.try_recv().is_some_and(|e| e.is_ok()));
        assert!(holder_rx.try_recv().is_some_and(|e| e.is_ok()));
        assert!(idle_rx.try_recv().is_none());
        drop(held);
        hub.publish(CoreEvent::PolicyReloaded { generation: 3 });
        assert!(holder_rx.try_recv().is_none(), "no user client left, no reload to hear");
        hub.publish(CoreEvent::WillSleep);
        assert!(holder_rx.try_recv().is_some() && idle_rx.try_recv().is_some());
    }

    #[test]
    fn a_full_queue_counts_what_it_lost_and_leaving_cleans_every_index() {
        let hub = Arc::new(EventHub::default());
        let (listener, mut rx) = hub.listen();
        listener.subscribe(Subscribed::All);
        listener.watch();
        let held = listener.hold(ServiceId(3));
        for _ in 0..LISTENER_QUEUE + 5 {
            hub.publish(CoreEvent::HasWoken);
        }
        assert_eq!(rx.try_recv().map(|r| r.err()), Some(Some(Missed::Lagged(5))));
        drop(held);
        drop(listener);
        let index = hub.index();
        assert!(index.sinks.is_empty() && index.all.is_empty() && index.watchers.is_empty());
        assert!(index.held.is_empty() && index.holders.is_empty() && index.subscriptions.is_empty());
    }
}
