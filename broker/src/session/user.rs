//! One client's session: its user clients, their grants and opens, its pending asynchronous
//! calls and its subscription. Transports own a `Session` per connection and drop it when the
//! connection ends, which releases everything it holds.

use std::{
    collections::{BTreeSet, HashMap},
    fmt,
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use portcullis_policy::{Denial, Grant, MethodRef};
use portcullis_proto::{Status, limits};
use tokio::sync::watch;

use super::{Core, CoreEvent, PeerIdentity, core::view};
use crate::{
    driver::{CallContext, CallOutput, Completion, Driver, DriverError},
    registry::{Matching, OpenGuard, OpenMode, Service, ServiceId},
};

/// A request refused: the status, why, and the policy rule when policy decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The status the client sees.
    pub status: Status,
    /// Why, in words.
    pub message: String,
    /// The deciding rule id (or "default deny") for policy refusals.
    pub rule: Option<String>,
}

impl Refusal {
    /// A refusal that policy did not decide.
    pub fn new(status: Status, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            message: message.into(),
            rule: None,
        }
    }

    fn denied(denial: Denial) -> Refusal {
        Refusal {
            status: Status::NotPrivileged,
            message: denial.reason,
            rule: Some(denial.rule),
        }
    }
}

impl From<DriverError> for Refusal {
    fn from(e: DriverError) -> Refusal {
        Refusal::new(e.status, e.message)
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.status, self.message)?;
        if let Some(rule) = &self.rule {
            write!(f, " (rule {rule:?})")?;
        }
        Ok(())
    }
}

/// How a call started.
pub enum CallStarted {
    /// It completed at once.
    Ready(CallOutput),
    /// An asynchronous method: the future completes it. It resolves to `Aborted` as soon as its
    /// user client is closed or the session dropped, so a transport that spawns it never leaks.
    Pending(Pin<Box<dyn Future<Output = Result<CallOutput, Refusal>> + Send>>),
}

impl fmt::Debug for CallStarted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallStarted::Ready(o) => f.debug_tuple("Ready").field(o).finish(),
            CallStarted::Pending(_) => f.write_str("Pending(..)"),
        }
    }
}

/// Something to tell this session's client.
#[derive(Clone, Debug)]
pub enum SessionEvent {
    /// A core event the client subscribed to (and may see).
    Core(CoreEvent),
    /// The broker closed one of the session's user clients.
    UserClientClosed {
        /// Its handle.
        handle: u64,
        /// Why, as a status.
        status: Status,
        /// Why, in words.
        reason: String,
    },
    /// The session fell behind and missed this many events.
    Lost(u64),
}

struct UserClient {
    open: OpenGuard,
    grant: Grant,
    driver: Arc<dyn Driver>,
    /// Dropped with the user client: every pending call's receiver then sees the close.
    cancel: watch::Sender<()>,
}

impl Drop for UserClient {
    fn drop(&mut self) {
        self.driver.closed();
    }
}

/// What the session's client subscribed to.
#[derive(Debug)]
enum Subscription {
    None,
    All,
    Services(BTreeSet<ServiceId>),
}

/// Counts a pending call for as long as it lives.
struct PendingGuard(Arc<AtomicUsize>);

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One connection's session.
pub struct Session {
    core: Arc<Core>,
    peer: Arc<PeerIdentity>,
    user_clients: HashMap<u64, UserClient>,
    next_handle: u64,
    pending: Arc<AtomicUsize>,
    subscription: Subscription,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("peer", &self.peer)
            .field("user_clients", &self.user_clients.len())
            .field("pending", &self.pending.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Session {
    /// A new session for the peer.
    pub fn new(core: Arc<Core>, peer: Arc<PeerIdentity>) -> Session {
        tracing::debug!(uid = peer.uid, pid = ?peer.pid, exe = ?peer.exe, "session started");
        Session {
            core,
            peer,
            user_clients: HashMap::new(),
            next_handle: 1,
            pending: Arc::new(AtomicUsize::new(0)),
            subscription: Subscription::None,
        }
    }

    /// The peer.
    pub fn peer(&self) -> &PeerIdentity {
        &self.peer
    }

    /// Number of open user clients.
    pub fn user_client_count(&self) -> usize {
        self.user_clients.len()
    }

    /// Number of pending asynchronous calls.
    pub fn pending_count(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    /// `find_services`: the matching services this task may see.
    pub fn find_services(&self, matching: &Matching) -> Vec<Arc<Service>> {
        self.core.find_services(&self.peer, matching)
    }

    /// `open_user_client` (IOServiceOpen → initWithTask): admission by policy, then the open.
    /// Returns the handle, the service and the grant's privileges.
    pub fn open_user_client(
        &mut self,
        service_id: ServiceId,
        mode: OpenMode,
    ) -> Result<(u64, Arc<Service>, Vec<String>), Refusal> {
        if self.user_clients.len() >= limits::MAX_USER_CLIENTS_PER_SESSION {
            return Err(Refusal::new(
                Status::NoMemory,
                format!(
                    "a session may hold at most {} user clients",
                    limits::MAX_USER_CLIENTS_PER_SESSION
                ),
            ));
        }
        let no_device = || Refusal::new(Status::NoDevice, format!("no service with id {service_id}"));
        let service = self.core.registry().get(service_id).ok_or_else(no_device)?;
        let driver = service
            .driver()
            .cloned()
            .ok_or_else(|| Refusal::new(Status::Unsupported, format!("{} has no driver to open", service.name())))?;
        let methods: Vec<MethodRef<'_>> = driver
            .methods()
            .rows()
            .iter()
            .map(|r| MethodRef {
                name: r.name,
                privilege: r.privilege,
            })
            .collect();
        let grant = self
            .core
            .policy()
            .admit(&self.peer.task(), &view(&service), mode == OpenMode::Exclusive, &methods)
            .map_err(|denial| {
                tracing::info!(uid = self.peer.uid, pid = ?self.peer.pid, service = service.name(), rule = %denial.rule, reason = %denial.reason, "admission denied");
                Refusal::denied(denial)
            })?;
        let open = OpenGuard::acquire(&service, mode).map_err(|status| {
            Refusal::new(
                status,
                format!(
                    "{} is held open exclusively, or an exclusive open needs it unopened",
                    service.name()
                ),
            )
        })?;
        driver.opened();
        let handle = self.next_handle;
        self.next_handle += 1;
        let privileges = grant.privileges().map(str::to_string).collect();
        tracing::info!(uid = self.peer.uid, pid = ?self.peer.pid, service = service.name(), handle, rule = grant.admitted_by(), ?mode, "user client opened");
        let (cancel, _) = watch::channel(());
        self.user_clients.insert(
            handle,
            UserClient {
                open,
                grant,
                driver,
                cancel,
            },
        );
        Ok((handle, service, privileges))
    }

    /// Closes a user client; its pending calls complete with `Aborted`.
    pub fn close_user_client(&mut self, handle: u64) -> Result<(), Refusal> {
        self.user_clients
            .remove(&handle)
            .map(drop)
            .ok_or_else(|| not_open(handle))
    }

    /// `call` (IOConnectCallMethod): grant, method table, then the driver.
    pub fn call(
        &mut self,
        handle: u64,
        selector: u32,
        scalars: Vec<u64>,
        struct_in: Vec<u8>,
        struct_out_cap: u32,
    ) -> Result<CallStarted, Refusal> {
        let uc = self.user_clients.get(&handle).ok_or_else(|| not_open(handle))?;
        let service = uc.open.service().clone();
        if service.is_terminated() {
            return Err(Refusal::new(
                Status::NoDevice,
                format!("{} has terminated", service.name()),
            ));
        }
        let spec = *uc.driver.methods().get(selector).ok_or_else(|| {
            Refusal::new(
                Status::BadArgument,
                format!("{} has no selector {selector}", service.name()),
            )
        })?;
        let index =
            usize::try_from(selector).map_err(|_| Refusal::new(Status::BadArgument, "selector out of range"))?;
        uc.grant.check(index).map_err(Refusal::denied)?;
        if scalars.len() > limits::MAX_SCALARS {
            return Err(Refusal::new(
                Status::BadArgument,
                format!("at most {} scalars", limits::MAX_SCALARS),
            ));
        }
        let args = spec.check_args(scalars, struct_in, struct_out_cap)?;
        let cap = args.struct_out_cap;
        if spec.is_async && self.pending.load(Ordering::Relaxed) >= limits::MAX_PENDING_CALLS_PER_SESSION {
            return Err(Refusal::new(
                Status::NoMemory,
                format!(
                    "a session may have at most {} pending calls",
                    limits::MAX_PENDING_CALLS_PER_SESSION
                ),
            ));
        }
        let core = self.core.clone();
        let notify_service = service.clone();
        let notify = move |notice| core.notify(&notify_service, notice);
        let ctx = CallContext {
            service: service.id(),
            notify: &notify,
        };
        match uc.driver.call(&ctx, &spec, args) {
            Completion::Ready(result) => {
                let out = result?;
                spec.check_output(&out, cap)?;
                Ok(CallStarted::Ready(out))
            }
            Completion::Pending(future) => {
                self.pending.fetch_add(1, Ordering::Relaxed);
                let guard = PendingGuard(self.pending.clone());
                let mut cancelled = uc.cancel.subscribe();
                Ok(CallStarted::Pending(Box::pin(async move {
                    let _guard = guard;
                    tokio::select! {
                        result = future => {
                            let out = result?;
                            spec.check_output(&out, cap)?;
                            Ok(out)
                        }
                        _ = cancelled.changed() => Err(Refusal::new(Status::Aborted, "the user client was closed")),
                    }
                })))
            }
        }
    }

    /// Subscribes to interest notifications: for the named services, or all visible ones when
    /// none are named. Replaces any earlier subscription.
    pub fn subscribe(&mut self, services: &[ServiceId]) -> Result<(), Refusal> {
        if services.len() > limits::MAX_SUBSCRIBED_SERVICES {
            return Err(Refusal::new(
                Status::BadArgument,
                format!("at most {} services per subscription", limits::MAX_SUBSCRIBED_SERVICES),
            ));
        }
        for id in services {
            let visible = self
                .core
                .registry()
                .get(*id)
                .is_some_and(|s| self.core.can_see(&self.peer, &s));
            if !visible {
                return Err(Refusal::new(Status::NoDevice, format!("no service with id {id}")));
            }
        }
        self.subscription = if services.is_empty() {
            Subscription::All
        } else {
            Subscription::Services(services.iter().copied().collect())
        };
        Ok(())
    }

    fn watches(&self, id: ServiceId) -> bool {
        match &self.subscription {
            Subscription::None => false,
            Subscription::All => true,
            Subscription::Services(ids) => ids.contains(&id),
        }
    }

    /// Folds an event of the core into what this session's client should hear, and closes the
    /// user clients of terminated services.
    pub fn on_core_event(&mut self, event: &CoreEvent) -> Vec<SessionEvent> {
        let mut out = Vec::new();
        let tell = match event {
            CoreEvent::Published(service) => {
                matches!(self.subscription, Subscription::All) && self.core.can_see(&self.peer, service)
            }
            CoreEvent::Terminated { id, .. } => {
                out.extend(self.close_terminated());
                self.watches(*id)
            }
            CoreEvent::Notice { service, .. } => self.watches(service.id()) && self.core.can_see(&self.peer, service),
        };
        if tell {
            out.push(SessionEvent::Core(event.clone()));
        }
        out
    }

    /// The session missed `n` events: say so, and close user clients whose service went away
    /// unseen.
    pub fn on_events_lost(&mut self, n: u64) -> Vec<SessionEvent> {
        let mut out = vec![SessionEvent::Lost(n)];
        out.extend(self.close_terminated());
        out
    }

    fn close_terminated(&mut self) -> Vec<SessionEvent> {
        let gone: Vec<u64> = self
            .user_clients
            .iter()
            .filter(|(_, uc)| uc.open.service().is_terminated())
            .map(|(h, _)| *h)
            .collect();
        gone.into_iter()
            .filter_map(|handle| {
                let uc = self.user_clients.remove(&handle)?;
                let reason = format!("{} was terminated", uc.open.service().name());
                Some(SessionEvent::UserClientClosed {
                    handle,
                    status: Status::NoDevice,
                    reason,
                })
            })
            .collect()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        tracing::debug!(uid = self.peer.uid, pid = ?self.peer.pid, user_clients = self.user_clients.len(), "session ended, releasing everything");
    }
}

fn not_open(handle: u64) -> Refusal {
    Refusal::new(
        Status::NotOpen,
        format!("user client {handle} is not open in this session"),
    )
}

#[cfg(test)]
mod tests {
    use portcullis_policy::{Policy, Source};

    use super::*;
    use crate::{bus, config::Config};

    fn core() -> Arc<Core> {
        let policy = Policy::parse(&[Source {
            origin: "default",
            text: crate::config::DEFAULT_POLICY,
        }])
        .unwrap();
        let core = Core::new(policy);
        bus::publish(&core, &Config::load(None).unwrap()).unwrap();
        core
    }

    fn sample(core: &Core) -> Arc<Service> {
        core.registry().find(&Matching::name("sample0")).remove(0)
    }

    fn session(core: &Arc<Core>) -> Session {
        Session::new(core.clone(), Arc::new(PeerIdentity::of_self().unwrap()))
    }

    #[tokio::test]
    async fn terminated_service_closes_user_clients_and_aborts_pending_calls() {
        let core = core();
        let mut watcher = session(&core);
        watcher.subscribe(&[]).unwrap();
        let mut s = session(&core);
        let id = sample(&core).id();
        let (handle, _, _) = s.open_user_client(id, OpenMode::Exclusive).unwrap();
        let Ok(CallStarted::Pending(pending)) = s.call(handle, 3, vec![60_000], vec![], 0) else {
            panic!("wait_event must pend")
        };
        assert_eq!(s.pending_count(), 1);

        let mut events = core.subscribe();
        core.terminate(id);
        assert_eq!(pending.await.unwrap_err().status, Status::Aborted);
        assert_eq!(s.pending_count(), 0);
        let event = events.recv().await.unwrap();

        let closed = s.on_core_event(&event);
        assert!(
            matches!(closed.as_slice(), [SessionEvent::UserClientClosed { handle: h, status: Status::NoDevice, .. }] if *h == handle),
            "{closed:?}"
        );
        assert_eq!(s.user_client_count(), 0);
        assert_eq!(
            s.call(handle, 0, vec![1, 2], vec![], 0).unwrap_err().status,
            Status::NotOpen
        );
        assert_eq!(
            s.open_user_client(id, OpenMode::Shared).unwrap_err().status,
            Status::NoDevice
        );

        let told = watcher.on_core_event(&event);
        assert!(
            matches!(told.as_slice(), [SessionEvent::Core(CoreEvent::Terminated { name, .. })] if name == "sample0"),
            "{told:?}"
        );
    }

    #[tokio::test]
    async fn lost_events_still_close_terminated_user_clients() {
        let core = core();
        let mut s = session(&core);
        let id = sample(&core).id();
        let (handle, _, _) = s.open_user_client(id, OpenMode::Shared).unwrap();
        core.terminate(id);
        let out = s.on_events_lost(3);
        assert!(
            matches!(out.as_slice(), [SessionEvent::Lost(3), SessionEvent::UserClientClosed { handle: h, .. }] if *h == handle),
            "{out:?}"
        );
    }

    #[tokio::test]
    async fn dropping_session_releases_opens() {
        let core = core();
        let id = sample(&core).id();
        let mut s = session(&core);
        s.open_user_client(id, OpenMode::Exclusive).unwrap();
        let mut other = session(&core);
        assert_eq!(
            other.open_user_client(id, OpenMode::Shared).unwrap_err().status,
            Status::ExclusiveAccess
        );
        drop(s);
        assert!(other.open_user_client(id, OpenMode::Exclusive).is_ok());
    }

    #[tokio::test]
    async fn subscription_filters_notices_to_watched_services() {
        let core = core();
        let sample = sample(&core);
        let mut unsubscribed = session(&core);
        let mut watching = session(&core);
        watching.subscribe(&[sample.id()]).unwrap();
        let event = CoreEvent::Notice {
            service: sample.clone(),
            notice: crate::driver::DriverNotice {
                kind: "event",
                value: 1,
                detail: String::new(),
            },
        };
        assert!(unsubscribed.on_core_event(&event).is_empty());
        assert_eq!(watching.on_core_event(&event).len(), 1);
        let bus = core.registry().find(&Matching::name("vbus0")).remove(0);
        let other = CoreEvent::Notice {
            service: bus,
            notice: crate::driver::DriverNotice {
                kind: "event",
                value: 1,
                detail: String::new(),
            },
        };
        assert!(watching.on_core_event(&other).is_empty());
    }

    #[tokio::test]
    async fn pending_calls_are_bounded_per_session() {
        let core = core();
        let mut s = session(&core);
        let (handle, _, _) = s.open_user_client(sample(&core).id(), OpenMode::Shared).unwrap();
        let mut held = Vec::new();
        for _ in 0..limits::MAX_PENDING_CALLS_PER_SESSION {
            match s.call(handle, 3, vec![60_000], vec![], 0) {
                Ok(CallStarted::Pending(p)) => held.push(p),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            s.call(handle, 3, vec![60_000], vec![], 0).unwrap_err().status,
            Status::NoMemory
        );
        held.pop();
        assert!(matches!(
            s.call(handle, 3, vec![60_000], vec![], 0),
            Ok(CallStarted::Pending(_))
        ));
    }
}
