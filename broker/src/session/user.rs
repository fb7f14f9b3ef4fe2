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

use portcullis_policy::{Denial, Grant, MethodRef, ParamRef};
use portcullis_proto::{Status, layout::AbiId, limits};
use tokio::sync::watch;

use super::{Core, CoreEvent, PeerIdentity, core::view};
use std::os::fd::OwnedFd;

use crate::{
    driver::{
        CallContext, CallOutput, ClientKey, Completion, Contained, Driver, DriverError, Mapped, MemoryType, memory,
    },
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
    /// Refused by the argument constraints of the rules granting the method.
    pub by_arguments: bool,
}

impl Refusal {
    /// A refusal that policy did not decide.
    pub fn new(status: Status, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            message: message.into(),
            rule: None,
            by_arguments: false,
        }
    }

    fn denied(denial: Denial) -> Refusal {
        Refusal {
            status: Status::NotPrivileged,
            message: denial.reason,
            rule: Some(denial.rule),
            by_arguments: false,
        }
    }

    /// A refusal by the argument constraints of the rules granting a method.
    fn by_arguments(denial: Denial) -> Refusal {
        Refusal {
            by_arguments: true,
            ..Refusal::denied(denial)
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
    /// How the driver knows this user client.
    key: ClientKey,
    open: OpenGuard,
    grant: Grant,
    driver: Arc<dyn Driver>,
    /// Memory this user client mapped; revocable backings are emptied when it goes away.
    mappings: Vec<Mapped>,
    /// Dropped with the user client: every pending call's receiver then sees the close.
    cancel: watch::Sender<()>,
    /// The grant's rate limit, if it has one.
    rate: Option<(super::bucket::TokenBucket, String)>,
    /// Counts this user client, and each of its mappings, as live.
    _live: super::core::Live,
    /// Its grant in the core's list (for dry-run reloads), removed with it.
    listed: super::core::GrantEntry,
    mapping_live: Vec<super::core::Live>,
    /// The bytes of each mapping, counted against the identity's bound.
    mapping_held: Vec<super::accounts::Held>,
    /// The session hears its service's termination and policy reloads while this is held.
    _heard: super::events::Held,
}

impl Drop for UserClient {
    fn drop(&mut self) {
        for m in self.mappings.iter().filter(|m| m.backing.revocable) {
            if let Err(e) = memory::revoke(&m.backing.fd) {
                tracing::warn!(error = %e, memory_type = m.memory_type.name, "could not revoke a mapping");
            }
        }
        let key = self.key;
        if let Err(panic) = crate::driver::contained(|| self.driver.closed(key)) {
            tracing::error!(service = self.open.service().name(), %panic, "the driver panicked closing a user client");
        }
    }
}

/// What the session's client subscribed to.
#[derive(Debug)]
enum Subscription {
    None,
    All,
    Services(BTreeSet<ServiceId>),
}

/// One connection's session.
pub struct Session {
    core: Arc<Core>,
    peer: Arc<PeerIdentity>,
    /// What the peer's identity holds over all its sessions.
    account: Arc<super::accounts::Account>,
    /// Why the session must end, once it must (its process became another program): every
    /// later request is refused and the transport closes the connection.
    ended: Option<Refusal>,
    /// Refusals written to the broker's log (info level), throttled per session.
    refusal_log: crate::throttle::Throttle,
    /// The client's struct layout ABI (declared in the native `Hello`; native for gRPC).
    abi: AbiId,
    user_clients: HashMap<u64, UserClient>,
    next_handle: u64,
    pending: Arc<AtomicUsize>,
    subscription: Subscription,
    /// When the client last sent a request (or connected).
    last_request: std::time::Instant,
    /// Matching notifications asked for (IOServiceAddMatchingNotification).
    matching_watches: Vec<Matching>,
    /// Services told to this session through a matching watch (or there when it was made),
    /// whose termination it is told too.
    announced: BTreeSet<ServiceId>,
    /// The policy generation every grant of this session was compiled under.
    generation: u64,
    /// That policy's revision (SHA-256 of its sources), for the decision log.
    revision: Arc<str>,
    /// Events the session produced on its own (user clients closed by a policy change), for
    /// the transport to send.
    outbox: Vec<SessionEvent>,
    /// This session's share of the decision log.
    budget: super::decisions::Budget,
    /// Refusals audit mode let through in the request being handled, to log as "would deny".
    audited: Vec<Denial>,
    /// Calls allowed (counted, not logged one by one).
    calls_allowed: u64,
    /// What this session listens for, in the core's event hub.
    listener: super::events::Listener,
    /// Where its events arrive, until the transport takes it.
    events: Option<super::EventReceiver>,
    /// Counts this session as live.
    _live: super::core::Live,
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
    pub fn new(core: Arc<Core>, peer: Arc<PeerIdentity>, abi: AbiId) -> Session {
        let (policy, generation) = core.policy_snapshot();
        let revision: Arc<str> = policy.revision().into();
        tracing::debug!(uid = peer.uid, pid = %peer.pid_text(), exe = peer.exe.as_deref().unwrap_or("-"), %abi, "session started");
        let live = super::core::Live::new(&core.live.sessions);
        core.session_started(core.live.sessions.load(Ordering::Relaxed));
        let account = core.account_of(&peer);
        let (listener, events) = core.events().listen();
        Session {
            _live: live,
            listener,
            events: Some(events),
            core,
            peer,
            account,
            ended: None,
            refusal_log: crate::throttle::Throttle::new(20, std::time::Duration::from_secs(1)),
            abi,
            user_clients: HashMap::new(),
            next_handle: 1,
            pending: Arc::new(AtomicUsize::new(0)),
            subscription: Subscription::None,
            last_request: std::time::Instant::now(),
            matching_watches: Vec::new(),
            announced: BTreeSet::new(),
            generation,
            revision,
            outbox: Vec::new(),
            budget: super::decisions::Budget::default(),
            audited: Vec::new(),
            calls_allowed: 0,
        }
    }

    /// The receiver of the events that concern this session, for its transport to take once
    /// (a second taker gets a receiver that is closed at once).
    pub fn take_events(&mut self) -> super::EventReceiver {
        self.events.take().unwrap_or_else(super::EventReceiver::closed)
    }

    /// Recompiles every grant when a new policy runs: a grant that shrinks applies from this
    /// moment; a user client whose admission is now refused is closed, with an event. Called
    /// before every request, so no request is ever checked against an older policy than the
    /// one running when it arrived, nor against two policies.
    fn refresh(&mut self) {
        // The common case costs one atomic load: nothing changed.
        if self.core.policy_generation() == self.generation {
            return;
        }
        let (policy, generation) = self.core.policy_snapshot();
        self.generation = generation;
        self.revision = policy.revision().into();
        let handles: Vec<u64> = self.user_clients.keys().copied().collect();
        for handle in handles {
            let Some(uc) = self.user_clients.get_mut(&handle) else {
                continue;
            };
            let service = uc.open.service().clone();
            match admit(
                &self.core,
                &policy,
                &self.peer,
                self.abi,
                &service,
                &uc.driver,
                uc.open.mode(),
            ) {
                Ok(grant) => {
                    uc.rate = rate_bucket(&grant);
                    uc.listed.update(&grant);
                    uc.grant = grant;
                }
                Err(denial) => {
                    tracing::info!(uid = self.peer.uid, pid = %self.peer.pid_text(), service = service.name(), handle, rule = %denial.rule, "user client closed by a policy reload");
                    self.log(serde_json::json!({
                        "event": "closed_by_reload",
                        "decision": "deny",
                        "service": service.name(),
                        "request": { "handle": handle },
                        "rule": denial.rule,
                        "check": "policy",
                        "reason": denial.reason,
                    }));
                    self.user_clients.remove(&handle);
                    self.outbox.push(SessionEvent::UserClientClosed {
                        handle,
                        status: Status::NotPrivileged,
                        reason: format!(
                            "the reloaded policy refuses it: {} (rule {:?})",
                            denial.reason, denial.rule
                        ),
                    });
                }
            }
        }
    }

    /// `open_user_client` (IOServiceOpen → initWithTask): admission by policy, then the open.
    /// Returns the handle, the service and the grant's privileges. Logged either way.
    pub fn open_user_client(
        &mut self,
        service_id: ServiceId,
        mode: OpenMode,
    ) -> Result<(u64, Arc<Service>, Vec<String>), Refusal> {
        let result = self.open_user_client_inner(service_id, mode);
        let mode_name = format!("{mode:?}").to_lowercase();
        match &result {
            Ok((handle, service, _)) => {
                let rule = self
                    .user_clients
                    .get(handle)
                    .map(|uc| uc.grant.admitted_by().to_string());
                let record = serde_json::json!({ "event": "admission", "decision": "allow", "service": service.name(), "request": { "open": mode_name }, "rule": rule, "handle": handle });
                self.log(record);
                let audited: Vec<Denial> = self
                    .user_clients
                    .get(handle)
                    .map(|uc| uc.grant.audited().to_vec())
                    .unwrap_or_default();
                self.audited.extend(audited);
                self.log_audited(
                    "admission",
                    Some(service.name()),
                    &serde_json::json!({ "open": mode_name, "handle": handle }),
                );
            }
            Err(refusal) => {
                let name = self.core.registry().get(service_id).map(|s| s.name().to_string());
                crate::throttle::throttled_info!(self.refusal_log, uid = self.peer.uid, pid = %self.peer.pid_text(), service = name.as_deref().unwrap_or("-"), status = %refusal.status, rule = refusal.rule.as_deref().unwrap_or("-"), reason = %refusal.message, "admission denied");
                self.log_refusal(
                    "admission",
                    name.as_deref(),
                    serde_json::json!({ "open": mode_name, "service_id": service_id.0 }),
                    refusal,
                );
            }
        }
        result
    }

    /// `call` (IOConnectCallMethod): grant, method table, translation, argument constraints,
    /// then the driver. Refusals are logged; allowed calls are counted.
    pub fn call(
        &mut self,
        handle: u64,
        selector: u32,
        scalars: Vec<u64>,
        struct_in: Vec<u8>,
        struct_out_cap: u32,
    ) -> Result<CallStarted, Refusal> {
        let result = self.call_inner(handle, selector, scalars, struct_in, struct_out_cap);
        if !self.audited.is_empty() {
            let (service, method) = self.describe(handle, selector);
            let what = serde_json::json!({ "handle": handle, "selector": selector, "method": method });
            self.log_audited("call", service.as_deref(), &what);
        }
        match &result {
            Ok(_) => self.calls_allowed += 1,
            Err(refusal) => {
                let (service, method) = self.describe(handle, selector);
                crate::throttle::throttled_info!(self.refusal_log, uid = self.peer.uid, pid = %self.peer.pid_text(), service = service.as_deref().unwrap_or("-"), handle, method = method.as_deref().unwrap_or("-"), selector, status = %refusal.status, rule = refusal.rule.as_deref().unwrap_or("-"), reason = %refusal.message, "call refused");
                self.log_refusal(
                    "call",
                    service.as_deref(),
                    serde_json::json!({ "handle": handle, "selector": selector, "method": method }),
                    refusal,
                );
            }
        }
        result
    }

    /// `map_memory` (clientMemoryForType), logged either way.
    pub fn map_memory(&mut self, handle: u64, memory_type: u32) -> Result<(OwnedFd, MemoryType), Refusal> {
        let result = self.map_memory_inner(handle, memory_type);
        let (service, _) = self.describe(handle, u32::MAX);
        self.log_audited(
            "map_memory",
            service.as_deref(),
            &serde_json::json!({ "handle": handle, "memory_type": memory_type }),
        );
        match &result {
            Ok((_, kind)) => {
                let record = serde_json::json!({ "event": "map_memory", "decision": "allow", "service": service, "request": { "handle": handle, "memory_type": kind.name } });
                self.log(record);
            }
            Err(refusal) => {
                crate::throttle::throttled_info!(self.refusal_log, uid = self.peer.uid, pid = %self.peer.pid_text(), service = service.as_deref().unwrap_or("-"), handle, memory_type, status = %refusal.status, rule = refusal.rule.as_deref().unwrap_or("-"), reason = %refusal.message, "map_memory refused");
                self.log_refusal(
                    "map_memory",
                    service.as_deref(),
                    serde_json::json!({ "handle": handle, "memory_type": memory_type }),
                    refusal,
                );
            }
        }
        result
    }

    /// The service name and method name of a handle and selector, as far as they are known.
    fn describe(&self, handle: u64, selector: u32) -> (Option<String>, Option<String>) {
        let Some(uc) = self.user_clients.get(&handle) else {
            return (None, None);
        };
        let method = uc.driver.methods().get(selector).map(|(_, m)| m.name.to_string());
        (Some(uc.open.service().name().to_string()), method)
    }

    /// Writes a decision record (with the task and policy generation), within this session's
    /// budget; lines over the budget are counted and reported with the next line written.
    fn log(&mut self, record: serde_json::Value) {
        let Some(log) = self.core.decision_log() else { return };
        let (write, dropped) = self.budget.take();
        if dropped > 0 {
            log.write(self.stamp(
                serde_json::json!({ "event": "dropped", "reason": "client over its log budget", "count": dropped }),
            ));
        }
        if write {
            log.write(self.stamp(record));
        }
    }

    fn stamp(&self, mut record: serde_json::Value) -> serde_json::Value {
        if let Some(map) = record.as_object_mut() {
            map.insert("policy_generation".into(), self.generation.into());
            map.insert("policy_revision".into(), self.revision.as_ref().into());
            if let Some(tls) = &self.peer.tls {
                // A TCP client: its certificate is its identity.
                map.insert(
                    "tls".into(),
                    serde_json::json!({ "san_uri": tls.san_uri, "san_dns": tls.san_dns, "subject_cn": tls.subject_cn }),
                );
            } else {
                // What principals can name, so that `policy suggest` can write a rule for it.
                map.insert("uid".into(), self.peer.uid.into());
                map.insert("gid".into(), self.peer.gid.into());
                map.insert("groups".into(), self.peer.groups.clone().into());
                map.insert("pid".into(), self.peer.pid.into());
                map.insert("exe".into(), self.peer.exe.clone().into());
                map.insert("cgroup".into(), self.peer.cgroup.clone().into());
                map.insert("lsm_label".into(), self.peer.lsm_label.clone().into());
            }
            map.insert("abi".into(), self.abi.to_string().into());
            let class = map.get("service").and_then(|s| s.as_str()).and_then(|name| {
                self.core
                    .registry()
                    .find(&crate::registry::Matching::name(name))
                    .first()
                    .map(|s| s.class().to_string())
            });
            if let Some(class) = class {
                map.insert("class".into(), class.into());
            }
        }
        record
    }

    /// Logs the refusals audit mode let through in this request.
    fn log_audited(&mut self, event: &str, service: Option<&str>, what: &serde_json::Value) {
        for denial in std::mem::take(&mut self.audited) {
            self.log(serde_json::json!({
                "event": event,
                "decision": "would_deny",
                "mode": "audit",
                "service": service,
                "request": what,
                "rule": denial.rule,
                "reason": denial.reason,
            }));
        }
    }

    /// Logs a refused request, naming the check that failed.
    fn log_refusal(&mut self, event: &str, service: Option<&str>, what: serde_json::Value, refusal: &Refusal) {
        let check = refusal_check(refusal);
        self.log(serde_json::json!({
            "event": event,
            "decision": "deny",
            "service": service,
            "request": what,
            "status": refusal.status.name(),
            "rule": refusal.rule.as_deref().unwrap_or(portcullis_policy::DEFAULT_DENY),
            "check": check,
            "reason": refusal.message,
        }));
    }

    /// Why the session must end, once it must: the transport closes it with this reason.
    pub fn end_reason(&self) -> Option<&Refusal> {
        self.ended.as_ref()
    }

    /// The account the session counts against.
    pub fn account(&self) -> &Arc<super::accounts::Account> {
        &self.account
    }

    /// Events the session produced itself since the last call, for the transport to send.
    pub fn take_outbox(&mut self) -> Vec<SessionEvent> {
        std::mem::take(&mut self.outbox)
    }

    /// The client's struct-layout ABI.
    pub fn abi(&self) -> AbiId {
        self.abi
    }

    /// The peer.
    pub fn peer(&self) -> &PeerIdentity {
        &self.peer
    }

    /// A request arrived: the session is not idle.
    pub(crate) fn touch(&mut self) {
        self.last_request = std::time::Instant::now();
    }

    /// Whether the session holds nothing a client would keep a connection for: no user
    /// client, pending call, subscription or matching watch.
    pub fn holds_nothing(&self) -> bool {
        self.user_clients.is_empty()
            && self.pending_count() == 0
            && matches!(self.subscription, Subscription::None)
            && self.matching_watches.is_empty()
    }

    /// When this session is to be closed as idle (`limits.idle_timeout_ms` after its last
    /// request, while it holds nothing); `None` while it holds something, or with no timeout.
    pub fn idle_deadline(&self) -> Option<std::time::Instant> {
        let timeout = self.account.limits().idle_timeout()?;
        self.holds_nothing().then(|| self.last_request + timeout)
    }

    /// The session has been idle past its deadline: why it is closed.
    pub fn idle_close(&self) -> Option<Refusal> {
        let deadline = self.idle_deadline()?;
        (std::time::Instant::now() >= deadline).then(|| {
            Refusal::new(
                Status::Timeout,
                format!(
                    "the session sent no request for {} ms and held nothing (limits.idle_timeout_ms): closed",
                    self.account.limits().idle_timeout_ms
                ),
            )
        })
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
        self.core.find_services(&self.peer, self.abi, matching)
    }

    /// `open_user_client` (IOServiceOpen → initWithTask): admission by policy, then the open.
    /// Returns the handle, the service and the grant's privileges.
    fn open_user_client_inner(
        &mut self,
        service_id: ServiceId,
        mode: OpenMode,
    ) -> Result<(u64, Arc<Service>, Vec<String>), Refusal> {
        let most = self.account.limits().max_user_clients_per_session;
        if self.user_clients.len() >= most {
            return Err(Refusal::new(
                Status::NoMemory,
                format!(
                    "a session may hold at most {most} user clients (limits.max_user_clients_per_session); close some"
                ),
            ));
        }
        let no_device = || Refusal::new(Status::NoDevice, format!("no service with id {service_id}"));
        let service = self.core.registry().get(service_id).ok_or_else(no_device)?;
        let driver = service
            .driver()
            .cloned()
            .ok_or_else(|| Refusal::new(Status::Unsupported, format!("{} has no driver to open", service.name())))?;
        // initWithTask sees the task as it is now: the process that connected, still running
        // the program it ran then.
        if let Err(changed) = self.peer.verify_unchanged() {
            let refusal = Refusal::new(
                Status::NotPrivileged,
                format!("{changed}: the session is closed; a program must connect itself"),
            );
            tracing::warn!(uid = self.peer.uid, pid = %self.peer.pid_text(), exe = self.peer.exe.as_deref().unwrap_or("-"), "{changed}: session refused");
            self.ended = Some(refusal.clone());
            return Err(refusal);
        }
        self.refresh();
        let grant = admit(
            &self.core,
            &self.core.policy_snapshot().0,
            &self.peer,
            self.abi,
            &service,
            &driver,
            mode,
        )
        .map_err(Refusal::denied)?;
        let limit = driver.open_limit();
        let open = OpenGuard::acquire(&service, mode, limit).map_err(|status| {
            let why = match limit {
                Some(limit) => format!(
                    "{} serves {limit} user client(s) at a time, and is held",
                    service.name()
                ),
                None => format!(
                    "{} is held open exclusively, or an exclusive open needs it unopened",
                    service.name()
                ),
            };
            Refusal::new(status, why)
        })?;
        let key = self.core.next_client_key();
        match crate::driver::contained(|| driver.opened(key, mode)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e.into()),
            Err(panic) => return Err(self.driver_failed(&service, &panic)),
        }
        let handle = self.next_handle;
        self.next_handle += 1;
        let privileges = grant.privileges().map(str::to_string).collect();
        tracing::info!(uid = self.peer.uid, pid = %self.peer.pid_text(), service = service.name(), handle, rule = grant.admitted_by(), ?mode, "user client opened");
        let (cancel, _) = watch::channel(());
        let rate = rate_bucket(&grant);
        let listed = super::core::GrantEntry::new(
            &self.core,
            key.0,
            super::core::OpenGrant {
                peer: self.peer.clone(),
                abi: self.abi,
                service: service.clone(),
                driver: driver.clone(),
                mode,
                handle,
                grant: grant.clone(),
            },
        );
        self.user_clients.insert(
            handle,
            UserClient {
                key,
                open,
                grant,
                driver,
                mappings: Vec::new(),
                cancel,
                rate,
                _live: super::core::Live::new(&self.core.live.user_clients),
                listed,
                mapping_live: Vec::new(),
                mapping_held: Vec::new(),
                _heard: self.listener.hold(service.id()),
            },
        );
        Ok((handle, service, privileges))
    }

    /// A driver panicked serving `service` (see [`driver_failed`]).
    fn driver_failed(&mut self, service: &Arc<Service>, panic: &str) -> Refusal {
        let refusal = driver_failed(&self.core, service, panic);
        // This session's own user clients of the service go now, with their events.
        let closed = self.close_terminated();
        self.outbox.extend(closed);
        refusal
    }

    /// Closes every user client (the broker is stopping): pending calls complete with
    /// `Aborted`.
    pub fn close_all(&mut self, why: &str) {
        if !self.user_clients.is_empty() {
            tracing::debug!(uid = self.peer.uid, pid = %self.peer.pid_text(), user_clients = self.user_clients.len(), why, "closing every user client");
        }
        self.user_clients.clear();
    }

    /// Closes a user client; its pending calls complete with `Aborted`.
    pub fn close_user_client(&mut self, handle: u64) -> Result<(), Refusal> {
        self.user_clients
            .remove(&handle)
            .map(drop)
            .ok_or_else(|| not_open(handle))
    }

    /// `call` (IOConnectCallMethod): grant, method table, then the driver.
    fn call_inner(
        &mut self,
        handle: u64,
        selector: u32,
        scalars: Vec<u64>,
        struct_in: Vec<u8>,
        struct_out_cap: u32,
    ) -> Result<CallStarted, Refusal> {
        self.refresh();
        let uc = self.user_clients.get_mut(&handle).ok_or_else(|| not_open(handle))?;
        // The grant's rate limit counts every call of the user client, refused ones too.
        if let Some((bucket, rule)) = uc.rate.as_mut()
            && !bucket.take()
        {
            return Err(Refusal {
                status: Status::RateLimited,
                message: "the user client's rate limit is exceeded".into(),
                rule: Some(rule.clone()),
                by_arguments: false,
            });
        }
        let uc = &*uc;
        let service = uc.open.service();
        if service.is_terminated() {
            return Err(Refusal::new(
                Status::NoDevice,
                format!("{} has terminated", service.name()),
            ));
        }
        let table = uc.driver.methods();
        let (index, spec) = table.get(selector).ok_or_else(|| {
            Refusal::new(
                Status::BadArgument,
                format!("{} has no selector {selector}", service.name()),
            )
        })?;
        let spec = *spec;
        if let Err(denial) = uc.grant.check(index) {
            if !denial.audit {
                return Err(Refusal::denied(denial));
            }
            self.audited.push(denial);
        }
        if scalars.len() > limits::MAX_SCALARS {
            return Err(Refusal::new(
                Status::BadArgument,
                format!("at most {} scalars", limits::MAX_SCALARS),
            ));
        }
        let abi = self.abi;
        let args = table.prepare(index, abi, scalars, struct_in, struct_out_cap)?;
        // Argument constraints see the values in the broker's own layout, after translation.
        if let Err(denial) = uc.grant.check_args(index, &args.scalars, &args.struct_in) {
            if !denial.audit {
                return Err(Refusal::by_arguments(denial));
            }
            self.audited.push(denial);
        }
        let cap = args.struct_out_cap;
        let account_pending = if spec.is_async {
            Some(pending_slot(&self.pending, &self.account)?)
        } else {
            None
        };
        if self.account.queue_full() {
            return Err(Refusal::new(
                Status::NoMemory,
                format!(
                    "{}'s clients have {} messages queued that they have not read, the most they may",
                    self.account.key(),
                    self.account.limits().max_queued_messages_per_uid
                ),
            ));
        }
        let core = &self.core;
        let Some(awake) = core.power().enter() else {
            // The devices sleep: the call waits for wake, counted as pending meanwhile.
            return self.call_when_awake(handle, index, spec, args, account_pending);
        };
        let notify = |notice| core.notify(service, notice);
        let ctx = CallContext {
            memory: &uc.mappings,
            service: service.id(),
            client: uc.key,
            mode: uc.open.mode(),
            notify: &notify,
        };
        let completion = crate::driver::contained(|| uc.driver.call(&ctx, &spec, args));
        drop(awake);
        let completion = match completion {
            Ok(completion) => completion,
            Err(panic) => {
                let service = service.clone();
                return Err(self.driver_failed(&service, &panic));
            }
        };
        match completion {
            Completion::Ready(result) => Ok(CallStarted::Ready(table.finish(index, abi, result, cap)?)),
            Completion::Pending(future) => {
                // Counted for this session (its limit) and for the broker (stats), while it lives.
                let guard = (
                    super::core::Live::new(&self.pending),
                    super::core::Live::new(&self.core.live.pending),
                    account_pending,
                );
                let cancelled = uc.cancel.subscribe();
                let driver = uc.driver.clone();
                let (core, service) = (self.core.clone(), service.clone());
                Ok(CallStarted::Pending(Box::pin(async move {
                    let _guard = guard;
                    complete(future, cancelled, &driver, &core, &service, (index, abi, cap)).await
                })))
            }
        }
    }

    /// A checked call that arrived while the devices sleep: it runs once they wake, or ends
    /// `ASLEEP` when they have not woken within `[power] call_wait_ms`. It counts as a pending
    /// call (the session's and its user's bounds) while it waits.
    fn call_when_awake(
        &mut self,
        handle: u64,
        index: usize,
        spec: crate::driver::MethodSpec,
        args: crate::driver::CallArgs,
        account_pending: Option<super::core::Live>,
    ) -> Result<CallStarted, Refusal> {
        let wait = self.core.power().call_wait();
        let asleep = move || {
            Refusal::new(
                Status::Asleep,
                format!("the devices are asleep and did not wake within {} ms", wait.as_millis()),
            )
        };
        if wait.is_zero() {
            return Err(asleep());
        }
        let account_pending = match account_pending {
            Some(held) => held,
            None => pending_slot(&self.pending, &self.account)?,
        };
        let uc = self.user_clients.get(&handle).ok_or_else(|| not_open(handle))?;
        let guard = (
            super::core::Live::new(&self.pending),
            super::core::Live::new(&self.core.live.pending),
            account_pending,
        );
        let mut cancelled = uc.cancel.subscribe();
        let (driver, service, mappings) = (uc.driver.clone(), uc.open.service().clone(), uc.mappings.clone());
        let (client, mode) = (uc.key, uc.open.mode());
        let (core, abi, cap) = (self.core.clone(), self.abi, args.struct_out_cap);
        let waiting = core.power().waiting();
        Ok(CallStarted::Pending(Box::pin(async move {
            let _guard = guard;
            let deadline = std::time::Instant::now() + wait;
            let power = core.power().clone();
            let completion = loop {
                if service.is_terminated() {
                    return Err(Refusal::new(
                        Status::NoDevice,
                        format!("{} has terminated", service.name()),
                    ));
                }
                // The pass is held only while the driver's code runs, never across an await.
                if let Some(awake) = power.enter() {
                    let notify = |notice| core.notify(&service, notice);
                    let ctx = CallContext {
                        memory: &mappings,
                        service: service.id(),
                        client,
                        mode,
                        notify: &notify,
                    };
                    let completion = crate::driver::contained(|| driver.call(&ctx, &spec, args));
                    drop(awake);
                    break completion;
                }
                tokio::select! {
                    woke = power.wait_awake(deadline) => if !woke {
                        return Err(asleep());
                    },
                    _ = cancelled.changed() => return Err(Refusal::new(
                        Status::NotOpen,
                        "the user client was closed while the call waited for wake",
                    )),
                }
            };
            drop(waiting);
            match completion {
                Err(panic) => Err(driver_failed(&core, &service, &panic)),
                Ok(Completion::Ready(result)) => Ok(driver.methods().finish(index, abi, result, cap)?),
                Ok(Completion::Pending(future)) => {
                    complete(future, cancelled, &driver, &core, &service, (index, abi, cap)).await
                }
            }
        })))
    }

    /// `map_memory` (clientMemoryForType): a descriptor for memory type `memory_type` of the user
    /// client's service, with no more rights than the type allows. Mapping the same type again
    /// gives the same memory.
    fn map_memory_inner(&mut self, handle: u64, memory_type: u32) -> Result<(OwnedFd, MemoryType), Refusal> {
        self.refresh();
        let uc = self.user_clients.get_mut(&handle).ok_or_else(|| not_open(handle))?;
        let service = uc.open.service().clone();
        if service.is_terminated() {
            return Err(Refusal::new(
                Status::NoDevice,
                format!("{} has terminated", service.name()),
            ));
        }
        let types = uc.driver.memory_types();
        let (index, kind) = types
            .iter()
            .enumerate()
            .find(|(_, m)| m.id == memory_type)
            .map(|(i, m)| (i, *m))
            .ok_or_else(|| {
                Refusal::new(
                    Status::BadArgument,
                    format!("{} has no memory type {memory_type}", service.name()),
                )
            })?;
        if let Err(denial) = uc.grant.check_memory(index) {
            if !denial.audit {
                return Err(Refusal::denied(denial));
            }
            self.audited.push(denial);
        }
        let backing = match uc.mappings.iter().find(|m| m.memory_type.id == memory_type) {
            Some(m) => m.backing.clone(),
            None => {
                let held = self.account.take_mapped(kind.size).ok_or_else(|| {
                    Refusal::new(
                        Status::NoMemory,
                        format!(
                            "{} already has {} bytes of driver memory mapped; {} more ({}) would pass limits.max_mapped_bytes_per_uid ({}): unmap some first (close a user client)",
                            self.account.key(),
                            self.account.mapped.load(std::sync::atomic::Ordering::Relaxed),
                            kind.size,
                            kind.name,
                            self.account.limits().max_mapped_bytes_per_uid
                        ),
                    )
                })?;
                let backing = match crate::driver::contained(|| uc.driver.create_memory(&kind)) {
                    Ok(backing) => backing?,
                    Err(panic) => return Err(self.driver_failed(&service, &panic)),
                };
                let Some(uc) = self.user_clients.get_mut(&handle) else {
                    return Err(not_open(handle));
                };
                uc.mappings.push(Mapped {
                    memory_type: kind,
                    backing: backing.clone(),
                });
                uc.mapping_live.push(super::core::Live::new(&self.core.live.mappings));
                uc.mapping_held.push(held);
                backing
            }
        };
        let fd = memory::client_fd(&backing.fd, kind.writable)
            .map_err(|e| Refusal::new(Status::NoMemory, format!("{}: {e}", kind.name)))?;
        tracing::info!(uid = self.peer.uid, pid = %self.peer.pid_text(), service = service.name(), handle, memory_type = kind.name, "memory mapped");
        Ok((fd, kind))
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
                .is_some_and(|s| self.core.can_see(&self.peer, self.abi, &s));
            if !visible {
                return Err(Refusal::new(Status::NoDevice, format!("no service with id {id}")));
            }
        }
        self.subscription = if services.is_empty() {
            self.listener.subscribe(super::events::Subscribed::All);
            Subscription::All
        } else {
            let ids: BTreeSet<ServiceId> = services.iter().copied().collect();
            self.listener
                .subscribe(super::events::Subscribed::Services(ids.iter().copied().collect()));
            Subscription::Services(ids)
        };
        Ok(())
    }

    /// IOServiceAddMatchingNotification: from now on, the publication of a service matching
    /// `matching` that this task may see is told, and so is its termination. Returns the
    /// matching services there are now.
    pub fn watch_matching(&mut self, matching: Matching) -> Result<Vec<Arc<Service>>, Refusal> {
        if self.matching_watches.len() >= limits::MAX_MATCHING_WATCHES {
            return Err(Refusal::new(
                Status::NoMemory,
                format!("at most {} matching watches per session", limits::MAX_MATCHING_WATCHES),
            ));
        }
        let now = self.core.find_services(&self.peer, self.abi, &matching);
        self.announced.extend(now.iter().map(|s| s.id()));
        self.matching_watches.push(matching);
        self.listener.watch();
        Ok(now)
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
                let watched = self.matching_watches.iter().any(|m| m.matches(service));
                let tell = (watched || matches!(self.subscription, Subscription::All))
                    && self.core.can_see(&self.peer, self.abi, service);
                if tell && watched {
                    self.announced.insert(service.id());
                }
                tell
            }
            CoreEvent::Terminated { id, .. } => {
                out.extend(self.close_terminated());
                let announced = self.announced.remove(id);
                self.watches(*id) || announced
            }
            CoreEvent::Notice { service, .. } => {
                self.watches(service.id()) && self.core.can_see(&self.peer, self.abi, service)
            }
            CoreEvent::PolicyReloaded { .. } => {
                self.refresh();
                out.extend(self.take_outbox());
                false
            }
            CoreEvent::WillSleep | CoreEvent::HasWoken => true,
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
        if let Some(log) = self.core.decision_log() {
            let summary = serde_json::json!({ "event": "session_end", "calls_allowed": self.calls_allowed, "dropped": self.budget.dropped() });
            log.write(self.stamp(summary));
        }
        tracing::debug!(uid = self.peer.uid, pid = %self.peer.pid_text(), user_clients = self.user_clients.len(), "session ended, releasing everything");
        // This session's own count goes with its fields, after this.
        let live = self.core.live.sessions.load(Ordering::Relaxed).saturating_sub(1);
        self.core.session_ended(live);
    }
}

/// `initWithTask` under `policy`: the grant for this peer, ABI, service and open mode.
pub(crate) fn admit(
    core: &Core,
    policy: &portcullis_policy::Policy,
    peer: &PeerIdentity,
    abi: AbiId,
    service: &Service,
    driver: &Arc<dyn Driver>,
    mode: OpenMode,
) -> Result<Grant, Denial> {
    let table = driver.methods();
    let params: Vec<Vec<ParamRef<'_>>> = (0..table.rows().len())
        .map(|i| {
            table
                .params(i)
                .iter()
                .map(|(name, at)| ParamRef { name, at: *at })
                .collect()
        })
        .collect();
    let methods: Vec<MethodRef<'_>> = table
        .rows()
        .iter()
        .zip(&params)
        .map(|(r, params)| MethodRef {
            name: r.name,
            privilege: r.privilege,
            params,
        })
        .collect();
    let memory_types: Vec<&str> = driver.memory_types().iter().map(|m| m.name).collect();
    let properties = service.properties();
    policy.admit(
        &peer.task(abi, core.exe_for(policy, peer)),
        &view(service, &properties),
        mode == OpenMode::Exclusive,
        &methods,
        &memory_types,
    )
}

/// What refused a request, for the decision log's `check`: one closed vocabulary of
/// identifiers (docs/POLICY.md lists them), beside the status, which the log gives as `status`.
fn refusal_check(refusal: &Refusal) -> &'static str {
    match refusal.status {
        Status::NotPrivileged if refusal.by_arguments => "argument_constraint",
        Status::NotPrivileged => "policy",
        Status::RateLimited => "rate_limit",
        Status::BadArgument => "method_table",
        Status::Overflow => "translation",
        Status::NotOpen => "handle",
        Status::ExclusiveAccess => "arbitration",
        Status::NoMemory => "resource_limit",
        Status::NoDevice => "device_gone",
        Status::ProtocolError => "protocol",
        Status::Asleep => "asleep",
        Status::Success
        | Status::Unsupported
        | Status::Timeout
        | Status::Aborted
        | Status::Internal
        | Status::NotWritable => "driver",
    }
}

/// Room for one more pending call (an asynchronous one, or one waiting for wake) within the
/// session's bound (`pending`, its count) and its user's: the user's slot, held while the call
/// is pending.
fn pending_slot(pending: &AtomicUsize, account: &super::accounts::Account) -> Result<super::core::Live, Refusal> {
    if pending.load(Ordering::Relaxed) >= limits::MAX_PENDING_CALLS_PER_SESSION {
        let limit = limits::MAX_PENDING_CALLS_PER_SESSION;
        return Err(Refusal::new(
            Status::NoMemory,
            format!("a session may have at most {limit} pending calls (calls waiting for wake count)"),
        ));
    }
    account.take_pending().ok_or_else(|| {
        Refusal::new(
            Status::NoMemory,
            format!(
                "{} has {} calls pending over all its sessions, the most it may",
                account.key(),
                account.limits().max_pending_calls_per_uid
            ),
        )
    })
}

/// Waits for a driver's pending completion, or the close of its user client.
async fn complete(
    future: Pin<Box<dyn Future<Output = crate::driver::CallResult> + Send>>,
    mut cancelled: watch::Receiver<()>,
    driver: &Arc<dyn Driver>,
    core: &Core,
    service: &Arc<Service>,
    (index, abi, cap): (usize, AbiId, usize),
) -> Result<CallOutput, Refusal> {
    tokio::select! {
        result = Contained(future) => match result {
            Ok(result) => Ok(driver.methods().finish(index, abi, result, cap)?),
            Err(panic) => Err(driver_failed(core, service, &panic)),
        },
        _ = cancelled.changed() => Err(Refusal::new(Status::Aborted, "the user client was closed")),
    }
}

/// A driver panicked serving `service`: the call ends with `INTERNAL`, and the service is
/// terminated (its user clients are closed with an event, their calls aborted, their memory
/// revoked); the broker and every other service carry on.
fn driver_failed(core: &Core, service: &Arc<Service>, panic: &str) -> Refusal {
    tracing::error!(service = service.name(), class = service.class(), %panic, "a driver panicked: the service is terminated");
    core.terminate(service.id());
    Refusal::new(
        Status::Internal,
        format!(
            "the driver of {} failed ({panic}); the service was terminated",
            service.name()
        ),
    )
}

/// A fresh bucket for the grant's rate limit (burst: one period's calls).
fn rate_bucket(grant: &Grant) -> Option<(super::bucket::TokenBucket, String)> {
    grant.rate_limit().map(|(rate, rule)| {
        (
            super::bucket::TokenBucket::new(rate.per_second(), f64::from(rate.calls)),
            rule.to_string(),
        )
    })
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
    use portcullis_proto::{layout::Schema, property::Properties};

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
        Session::new(
            core.clone(),
            Arc::new(PeerIdentity::of_self().unwrap()),
            AbiId::native(),
        )
    }

    /// IOServiceAddMatchingNotification: the services matching now, then publications and
    /// terminations of matching services this task may see — and nothing about others, nor
    /// about the kernel's nubs, nor about what a policy hides.
    #[tokio::test]
    async fn matching_watches_tell_what_matches_and_may_be_seen() {
        let core = core();
        let mut s = session(&core);
        let class = |c: &str| Matching {
            class: Some(c.into()),
            ..Matching::default()
        };
        let names = |v: Vec<Arc<Service>>| v.iter().map(|s| s.name().to_string()).collect::<Vec<_>>();
        assert_eq!(names(s.watch_matching(class("SampleDevice")).unwrap()), ["sample0"]);
        assert!(s.watch_matching(class("BlockNub")).unwrap().is_empty());
        let bus = core.registry().find(&Matching::name("vbus0")).remove(0).id();
        let mut events = core.subscribe();
        let sample = || Some(Arc::new(crate::drivers::sample::SampleDevice::new()) as Arc<dyn Driver>);
        core.publish(Some(bus), "other0", "Other", Properties::new(), None)
            .unwrap();
        core.publish(Some(bus), "block/loop9", "BlockNub", Properties::new(), None)
            .unwrap();
        let second = core
            .publish(Some(bus), "sample9", "SampleDevice", Properties::new(), sample())
            .unwrap();
        core.terminate(second.id());
        let mut told = Vec::new();
        for _ in 0..4 {
            let event = events.recv().await.unwrap();
            told.extend(s.on_core_event(&event));
        }
        assert!(
            matches!(told.as_slice(), [
                SessionEvent::Core(CoreEvent::Published(p)),
                SessionEvent::Core(CoreEvent::Terminated { name, .. }),
            ] if p.name() == "sample9" && name == "sample9"),
            "{told:?}"
        );
        for _ in 0..limits::MAX_MATCHING_WATCHES - 2 {
            s.watch_matching(Matching::default()).unwrap();
        }
        assert_eq!(
            s.watch_matching(Matching::default()).unwrap_err().status,
            Status::NoMemory
        );

        // A policy that hides sample devices from this task: nothing found, nothing told.
        let hidden = Policy::parse(&[Source {
            origin: "hide",
            text: "[[principal]]\nname = \"all\"\n[[rule]]\nid = \"hide\"\neffect = \"forbid\"\nprincipals = [\"all\"]\nservice = { class = \"SampleDevice\" }\n",
        }])
        .unwrap();
        core.replace_policy(hidden);
        let mut s = session(&core);
        assert!(s.watch_matching(class("SampleDevice")).unwrap().is_empty());
        let mut events = core.subscribe();
        let third = core
            .publish(Some(bus), "sample10", "SampleDevice", Properties::new(), sample())
            .unwrap();
        let event = events.recv().await.unwrap();
        assert!(s.on_core_event(&event).is_empty());
        core.terminate(third.id());
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
        assert_eq!(pending.await.unwrap_err().status, Status::NoDevice);
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
    async fn a_notification_reaches_only_the_sessions_that_subscribed() {
        let core = core();
        let sample = sample(&core);
        let mut idle: Vec<Session> = (0..500).map(|_| session(&core)).collect();
        // Holding a user client of the device is not a subscription to its notifications.
        let mut holder = session(&core);
        holder.open_user_client(sample.id(), OpenMode::Shared).unwrap();
        let mut watching = session(&core);
        watching.subscribe(&[sample.id()]).unwrap();
        let mut watching_rx = watching.take_events();
        let before = core.events().deliveries();
        core.notify(
            &sample,
            crate::driver::DriverNotice {
                kind: "event",
                value: 9,
                detail: String::new(),
            },
        );
        assert_eq!(
            core.events().deliveries() - before,
            1,
            "one subscriber among 502 sessions"
        );
        assert!(matches!(watching_rx.try_recv(), Some(Ok(e)) if matches!(&*e, CoreEvent::Notice { .. })));
        assert!(holder.take_events().try_recv().is_none());
        assert!(idle.iter_mut().all(|s| s.take_events().try_recv().is_none()));
    }

    /// An encoder for tests, independent of the plans: values written at each ABI's offsets in
    /// its byte order.
    struct Rec {
        abi: &'static portcullis_proto::layout::Abi,
        layout: portcullis_proto::layout::StructLayout,
        buf: Vec<u8>,
    }

    impl Rec {
        fn new(abi: AbiId, schema: &portcullis_proto::layout::Schema) -> Rec {
            let layout = schema.layout(schema.index("sample_record").unwrap(), abi.abi());
            Rec {
                abi: abi.abi(),
                buf: vec![0; layout.size as usize],
                layout,
            }
        }
        fn at(&self, name: &str) -> (usize, usize) {
            let f = self.layout.fields.iter().find(|f| f.name == name).unwrap();
            (f.offset as usize, f.size as usize)
        }
        fn put(&mut self, name: &str, v: u64) {
            let (o, n) = self.at(name);
            for i in 0..n {
                let shift = if self.abi.big_endian { (n - 1 - i) * 8 } else { i * 8 };
                self.buf[o + i] = (v >> shift) as u8;
            }
        }
        fn get(&self, name: &str) -> u64 {
            let (o, n) = self.at(name);
            (0..n).fold(0u64, |v, i| {
                let b = u64::from(self.buf[o + i]);
                if self.abi.big_endian {
                    v << 8 | b
                } else {
                    v | b << (i * 8)
                }
            })
        }
    }

    #[tokio::test]
    async fn transform_record_translates_for_every_abi() {
        let core = core();
        let schema = Schema::from_toml(crate::drivers::sample::LAYOUTS).unwrap();
        for abi in portcullis_proto::layout::ABIS.iter().map(|a| a.id) {
            let mut s = Session::new(core.clone(), Arc::new(PeerIdentity::of_self().unwrap()), abi);
            let (handle, _, _) = s.open_user_client(sample(&core).id(), OpenMode::Shared).unwrap();
            let mut r = Rec::new(abi, &schema);
            let word = u64::from(abi.abi().long) * 8;
            let max_signed_long = (1u64 << (word - 1)) - 2; // fits after + 1
            r.put("u8_", 0xff);
            r.put("i8_", 0x7f);
            r.put("u16_", 0x1234);
            r.put("i16_", 0xffff); // -1
            r.put("u32_", 0xdead_beef);
            r.put("i32_", 0x8000_0000); // i32::MIN
            r.put("u64_", u64::MAX);
            r.put("i64_", (-7i64) as u64);
            r.put("long_", max_signed_long);
            r.put("ulong_", 41);
            r.put("handle", 0x1000);
            r.put("f32_", u64::from(1.25f32.to_bits()));
            r.put("f64_", (-3.5f64).to_bits());
            r.put("flag", 1);
            let (name_at, _) = r.at("name");
            r.buf[name_at..name_at + 5].copy_from_slice(b"abc-z");
            let (inner_at, inner_size) = r.at("inner");
            let elem = inner_size / 3;
            for k in 0..3 {
                r.buf[inner_at + k * elem] = k as u8 + 10;
            }
            r.put("tail", 0x00ff);
            let out = match s.call(handle, 7, vec![], r.buf.clone(), 4096) {
                Ok(CallStarted::Ready(out)) => out,
                other => panic!("{abi}: transform failed: {other:?}"),
            };
            let mut o = Rec::new(abi, &schema);
            assert_eq!(out.struct_out.len(), o.buf.len(), "{abi}");
            o.buf = out.struct_out;
            assert_eq!(o.get("u8_"), 0, "{abi}");
            assert_eq!(o.get("i8_"), 0x80, "{abi}");
            assert_eq!(o.get("u16_"), 0x1235, "{abi}");
            assert_eq!(o.get("i16_"), 0, "{abi}");
            assert_eq!(o.get("u32_"), 0xdead_bef0, "{abi}");
            assert_eq!(o.get("i32_"), 0x8000_0001, "{abi}");
            assert_eq!(o.get("u64_"), 0, "{abi}");
            assert_eq!(o.get("i64_"), (-6i64) as u64, "{abi}");
            assert_eq!(o.get("long_"), max_signed_long + 1, "{abi}");
            assert_eq!(o.get("ulong_"), 42, "{abi}");
            assert_eq!(o.get("handle"), 0x1001, "{abi}");
            assert_eq!(o.get("f32_") as u32, 2.5f32.to_bits(), "{abi}");
            assert_eq!(o.get("f64_"), (-7.0f64).to_bits(), "{abi}");
            assert_eq!(o.get("flag"), 0, "{abi}");
            assert_eq!(&o.buf[name_at..name_at + 6], b"ABC-Z\0", "{abi}");
            for k in 0..3 {
                assert_eq!(o.buf[inner_at + k * elem], (2 - k) as u8 + 11, "{abi} inner[{k}]");
            }
            assert_eq!(o.get("tail"), 0xff00, "{abi}");

            // A 32-bit client's LONG_MAX + 1 does not fit its long: Overflow, not a wrap.
            if abi.abi().long == 4 {
                r.put("long_", 0x7fff_ffff);
                let err = s.call(handle, 7, vec![], r.buf.clone(), 4096).unwrap_err();
                assert_eq!(err.status, Status::Overflow, "{abi}: {err}");
                r.put("long_", 0);
            }
            // A bool byte that is not 0 or 1, and a struct of the wrong size for the ABI.
            r.put("flag", 2);
            assert_eq!(
                s.call(handle, 7, vec![], r.buf.clone(), 4096).unwrap_err().status,
                Status::BadArgument
            );
            r.put("flag", 0);
            let mut long = r.buf.clone();
            long.push(0);
            assert_eq!(
                s.call(handle, 7, vec![], long, 4096).unwrap_err().status,
                Status::BadArgument
            );
            // Output room too small for this ABI's layout.
            let small = u32::try_from(r.buf.len() - 1).unwrap();
            assert_eq!(
                s.call(handle, 7, vec![], r.buf.clone(), small).unwrap_err().status,
                Status::BadArgument
            );
        }
    }

    fn policy(text: &str) -> Policy {
        Policy::parse(&[Source { origin: "reload", text }]).unwrap()
    }

    #[tokio::test]
    async fn reload_shrinks_grants_from_the_next_call() {
        let core = core();
        let mut s = session(&core);
        let (handle, _, _) = s.open_user_client(sample(&core).id(), OpenMode::Shared).unwrap();
        assert!(s.call(handle, 0, vec![1, 2], vec![], 0).is_ok());
        core.replace_policy(policy(
            "[[principal]]\nname = \"all\"\n[[rule]]\nid = \"echo-only\"\neffect = \"allow\"\nprincipals = [\"all\"]\nmethods = [\"echo\"]\n",
        ));
        let refused = s.call(handle, 0, vec![1, 2], vec![], 0).unwrap_err();
        assert_eq!(
            (refused.status, refused.rule.as_deref()),
            (Status::NotPrivileged, Some("default deny"))
        );
        assert!(s.call(handle, 1, vec![], vec![7], 16).is_ok());
        assert!(s.take_outbox().is_empty(), "the user client stays open");
    }

    #[tokio::test]
    async fn reload_that_refuses_admission_closes_the_user_client() {
        let core = core();
        let mut s = session(&core);
        let (handle, _, _) = s.open_user_client(sample(&core).id(), OpenMode::Exclusive).unwrap();
        let mut events = core.subscribe();
        // Still admitted, but no longer for exclusive opens.
        core.replace_policy(policy(
            "[[principal]]\nname = \"all\"\n[[rule]]\nid = \"shared-only\"\neffect = \"allow\"\nprincipals = [\"all\"]\nmethods = [\"*\"]\n",
        ));
        let out = s.on_core_event(&events.recv().await.unwrap());
        assert!(
            matches!(out.as_slice(), [SessionEvent::UserClientClosed { handle: h, status: Status::NotPrivileged, .. }] if *h == handle),
            "{out:?}"
        );
        assert_eq!(
            s.call(handle, 0, vec![1, 2], vec![], 0).unwrap_err().status,
            Status::NotOpen
        );
        // Its exclusive open was released with it.
        assert!(s.open_user_client(sample(&core).id(), OpenMode::Shared).is_ok());
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
