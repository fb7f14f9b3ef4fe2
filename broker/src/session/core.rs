//! The broker core shared by every session: the registry, the running policy and the event bus.

use std::{
    path::PathBuf,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use portcullis_policy::{Policy, ServiceView};
use portcullis_proto::layout::AbiId;
use portcullis_proto::property::Properties;
use tokio::sync::watch;

use super::{
    PeerIdentity,
    accounts::{AccountKey, Accounts},
    identity::{ExeHashing, IdentityOptions},
};
use crate::{
    config::Limits,
    driver::{Driver, DriverNotice},
    registry::{Matching, Registry, RegistryError, Service, ServiceId},
};

/// Sessions (or connections) that must have closed (half of a peak) before their memory is
/// handed back.
const TRIM_AFTER: usize = 32;

/// When freed memory is handed back to the kernel, for a count of live things (sessions,
/// connections): each time the count falls below half of its peak since the last time, and
/// once more when it reaches zero after such a fall, so that a crowd that came and went does
/// not leave the broker at its peak. A few clients coming and going never trim.
#[derive(Debug, Default)]
pub(crate) struct TrimMark {
    /// The count below which memory is next handed back.
    mark: AtomicUsize,
    /// Memory was handed back since the count was last zero.
    crowd: std::sync::atomic::AtomicBool,
}

impl TrimMark {
    /// One more started: `live` now.
    pub(crate) fn started(&self, live: usize) {
        self.mark.fetch_max(live / 2, Ordering::Relaxed);
    }

    /// One ended: `live` now. Whether memory is being handed back.
    pub(crate) fn ended(&self, live: usize) -> bool {
        let mark = self.mark.load(Ordering::Relaxed);
        let trim = if live < mark
            && mark >= TRIM_AFTER
            && self
                .mark
                .compare_exchange(mark, live / 2, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.crowd.store(true, Ordering::Relaxed);
            true
        } else {
            // The last of the crowd: what it left since the last fall goes back too.
            live == 0 && self.crowd.swap(false, Ordering::Relaxed)
        };
        if trim {
            release_memory();
        }
        trim
    }
}

/// Hands freed memory back to the kernel, off the async workers when there are some.
fn release_memory() {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => drop(runtime.spawn_blocking(crate::sys::release_free_memory)),
        Err(_) => crate::sys::release_free_memory(),
    }
}

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
    /// A new policy is running: sessions recompute their grants.
    PolicyReloaded {
        /// Its generation.
        generation: u64,
    },
    /// A driver posted an interest notification.
    Notice {
        /// The service.
        service: Arc<Service>,
        /// What the driver said.
        notice: DriverNotice,
    },
    /// The machine is going to sleep: calls wait for wake from now on (every session hears it).
    WillSleep,
    /// The machine has woken: the devices are back (every session hears it).
    HasWoken,
}

/// The state shared by all sessions of one broker.
#[derive(Debug)]
pub struct Core {
    registry: Registry,
    /// The running policy and its generation, swapped together.
    policy: RwLock<(Arc<Policy>, u64)>,
    /// The running generation, readable without the lock (sessions look at it on every call).
    generation: AtomicU64,
    /// Where the policy is loaded from on reload (`None`: the embedded default).
    policy_source: Option<PathBuf>,
    /// What each client identity holds, and the connection slots.
    accounts: Arc<Accounts>,
    /// Where decisions are logged, when configured.
    decisions: std::sync::OnceLock<super::DecisionLog>,
    max_connections: usize,
    events: Arc<super::events::EventHub>,
    /// When the memory of ended sessions is handed back.
    trim: TrimMark,
    /// Set when the broker is stopping: sessions say goodbye and end.
    stopping: watch::Sender<bool>,
    /// The next user client's key, as drivers know it.
    next_client: AtomicU64,
    /// Live sessions, user clients, mappings and pending calls, for `stats` and leak checks.
    pub(crate) live: LiveCounts,
    /// Every open user client's grant and what it was compiled from, so that a dry-run reload
    /// can say whose grant a new policy would change.
    pub(crate) grants: Arc<std::sync::Mutex<std::collections::HashMap<u64, OpenGrant>>>,
    /// What the last reload did.
    last_reload: std::sync::Mutex<Option<ReloadRecord>>,
    /// The machine's sleep and wake as the drivers have it.
    power: Arc<crate::power::Power>,
}

/// An open user client's grant, with what admission compiled it from.
#[derive(Clone)]
pub(crate) struct OpenGrant {
    pub(crate) peer: Arc<super::PeerIdentity>,
    pub(crate) abi: portcullis_proto::layout::AbiId,
    pub(crate) service: Arc<crate::registry::Service>,
    pub(crate) driver: Arc<dyn crate::driver::Driver>,
    pub(crate) mode: crate::registry::OpenMode,
    pub(crate) handle: u64,
    pub(crate) grant: portcullis_policy::Grant,
}

impl std::fmt::Debug for OpenGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenGrant")
            .field("service", &self.service.name())
            .field("handle", &self.handle)
            .field("uid", &self.peer.uid)
            .finish_non_exhaustive()
    }
}

/// Removes a user client's entry from [`Core::grants`] when the user client goes.
pub(crate) struct GrantEntry {
    grants: Arc<std::sync::Mutex<std::collections::HashMap<u64, OpenGrant>>>,
    key: u64,
}

impl GrantEntry {
    pub(crate) fn new(core: &Core, key: u64, entry: OpenGrant) -> GrantEntry {
        core.grants.lock().unwrap_or_else(|e| e.into_inner()).insert(key, entry);
        GrantEntry {
            grants: core.grants.clone(),
            key,
        }
    }

    /// The grant a reload recompiled.
    pub(crate) fn update(&self, grant: &portcullis_policy::Grant) {
        if let Some(entry) = self.grants.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&self.key) {
            entry.grant = grant.clone();
        }
    }
}

impl Drop for GrantEntry {
    fn drop(&mut self) {
        self.grants.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.key);
    }
}

/// The outcome of a reload, for `policy status`.
#[derive(Clone, Debug)]
pub struct ReloadRecord {
    /// When (seconds since the epoch).
    pub time: f64,
    /// Whether the new policy runs.
    pub accepted: bool,
    /// The new policy's revision (accepted), or empty.
    pub revision: String,
    /// Why it was refused, or empty.
    pub error: String,
    /// The generation running after it.
    pub generation: u64,
}

/// The running policy, as `policy status` reports it.
#[derive(Clone, Debug)]
pub struct PolicyStatus {
    /// Its revision.
    pub revision: String,
    /// Reloads so far, plus one.
    pub generation: u64,
    /// The whole policy in audit mode.
    pub audit: bool,
    /// Its files (none: the embedded default).
    pub files: Vec<PathBuf>,
    /// Its rules.
    pub rules: usize,
    /// The last reload, if any.
    pub last_reload: Option<ReloadRecord>,
}

/// A live user client whose grant a new policy would change.
#[derive(Clone, Debug)]
pub struct GrantChange {
    /// The client's uid and pid (0 for a TLS client), as the broker knows them.
    pub uid: u32,
    /// Its pid, as text.
    pub pid: String,
    /// The service.
    pub service: String,
    /// The user client's handle in its session.
    pub handle: u64,
    /// What would change, in words.
    pub change: String,
}

/// Counters of live objects, each kept by a [`Live`] guard held by the object.
#[derive(Debug, Default)]
pub(crate) struct LiveCounts {
    pub(crate) sessions: Arc<AtomicUsize>,
    pub(crate) user_clients: Arc<AtomicUsize>,
    pub(crate) mappings: Arc<AtomicUsize>,
    pub(crate) pending: Arc<AtomicUsize>,
    pub(crate) rings: Arc<AtomicUsize>,
}

/// Counts one live object for as long as it lives.
#[derive(Debug)]
pub(crate) struct Live(Arc<AtomicUsize>);

impl Live {
    pub(crate) fn new(counter: &Arc<AtomicUsize>) -> Live {
        counter.fetch_add(1, Ordering::Relaxed);
        Live(counter.clone())
    }

    /// Takes over one count the caller already added.
    pub(crate) fn adopt(counter: &Arc<AtomicUsize>) -> Live {
        Live(counter.clone())
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What the broker holds for its clients right now (`portcullis stats`). After every client
/// has gone, everything but `services` is zero.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    /// Services in the registry.
    pub services: usize,
    /// Sessions (connections) being served.
    pub sessions: usize,
    /// User clients open, each with its grant.
    pub user_clients: usize,
    /// Memory mappings handed out and not yet released.
    pub mappings: usize,
    /// Asynchronous calls not yet completed.
    pub pending_calls: usize,
    /// Opens the registry's arbitration holds.
    pub service_opens: usize,
    /// User clients the drivers count as open.
    pub driver_opens: usize,
    /// Calls waiting inside drivers.
    pub driver_waiting: usize,
    /// Shared-memory rings being served (each with its thread, memfd and eventfds).
    pub rings: usize,
    /// File descriptors the broker process holds (listening sockets, logs and watches
    /// included: compare against the figure with no client connected).
    pub open_fds: usize,
    /// Responses and events queued for clients that have not read them yet.
    pub queued_messages: usize,
    /// Connections being served, over every transport.
    pub connections: usize,
    /// Of them, those served by the background workers.
    pub background_connections: usize,
    /// Threads of the serving process (runtime workers, ring threads, blocking threads).
    pub threads: usize,
    /// Resident memory of the serving process, in bytes.
    pub rss_bytes: u64,
}

/// What differs between two grants of one user client, in words: methods and memory types
/// newly allowed or refused, privileges, the rate.
fn describe_grant_change(
    before: &portcullis_policy::Grant,
    after: &portcullis_policy::Grant,
    driver: &Arc<dyn crate::driver::Driver>,
) -> String {
    let mut said = Vec::new();
    for (i, row) in driver.methods().rows().iter().enumerate() {
        match (before.check(i).is_ok(), after.check(i).is_ok()) {
            (true, false) => said.push(format!("method {} refused", row.name)),
            (false, true) => said.push(format!("method {} allowed", row.name)),
            _ => {}
        }
    }
    for (i, m) in driver.memory_types().iter().enumerate() {
        match (before.check_memory(i).is_ok(), after.check_memory(i).is_ok()) {
            (true, false) => said.push(format!("memory {} refused", m.name)),
            (false, true) => said.push(format!("memory {} allowed", m.name)),
            _ => {}
        }
    }
    let (was, now): (Vec<&str>, Vec<&str>) = (before.privileges().collect(), after.privileges().collect());
    if was != now {
        said.push(format!("privileges [{}] -> [{}]", was.join(", "), now.join(", ")));
    }
    let rate = |g: &portcullis_policy::Grant| {
        g.rate_limit()
            .map_or_else(|| "none".to_string(), |(r, _)| r.to_string())
    };
    if rate(before) != rate(after) {
        said.push(format!("rate {} -> {}", rate(before), rate(after)));
    }
    if said.is_empty() {
        said.push("the deciding rules or argument constraints change".into());
    }
    said.join("; ")
}

impl Core {
    /// A core with an empty registry (the root only) and this policy.
    pub fn new(policy: Policy) -> Arc<Core> {
        Core::with_source(policy, None)
    }

    /// A core whose policy reloads from `source` (a file or directory; `None`: the embedded default).
    pub fn with_source(policy: Policy, source: Option<PathBuf>) -> Arc<Core> {
        Core::with_limits(
            policy,
            source,
            crate::config::DEFAULT_MAX_CONNECTIONS,
            Limits::default(),
        )
    }

    /// A core like [`Core::with_source`] serving at most `max_connections` connections at once,
    /// each client identity within `limits`.
    pub fn with_limits(policy: Policy, source: Option<PathBuf>, max_connections: usize, limits: Limits) -> Arc<Core> {
        Arc::new(Core {
            registry: Registry::new(),
            policy: RwLock::new((Arc::new(policy), 1)),
            generation: AtomicU64::new(1),
            policy_source: source,
            grants: Arc::default(),
            last_reload: std::sync::Mutex::new(None),
            accounts: Accounts::new(max_connections, limits),
            max_connections,
            decisions: std::sync::OnceLock::new(),
            events: Arc::default(),
            trim: TrimMark::default(),
            stopping: watch::Sender::new(false),
            next_client: AtomicU64::new(1),
            live: LiveCounts::default(),
            power: Arc::default(),
        })
    }

    /// What the broker holds for its clients right now.
    pub fn stats(&self) -> Stats {
        let services = self.registry.find(&crate::registry::Matching::default());
        let drivers: Vec<crate::driver::DriverLive> =
            services.iter().filter_map(|s| s.driver()).map(|d| d.live()).collect();
        Stats {
            services: services.len(),
            sessions: self.live.sessions.load(Ordering::Relaxed),
            user_clients: self.live.user_clients.load(Ordering::Relaxed),
            mappings: self.live.mappings.load(Ordering::Relaxed),
            pending_calls: self.live.pending.load(Ordering::Relaxed),
            service_opens: services.iter().map(|s| s.opens_held()).sum(),
            driver_opens: drivers.iter().map(|d| d.opens).sum(),
            driver_waiting: drivers.iter().map(|d| d.waiting).sum(),
            rings: self.live.rings.load(Ordering::Relaxed),
            open_fds: std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count().saturating_sub(1)),
            queued_messages: self.accounts.queued_messages(),
            connections: self.accounts.connections(),
            background_connections: self.accounts.background_connections(),
            threads: crate::sys::thread_count().unwrap_or(0),
            rss_bytes: crate::sys::resident_bytes().unwrap_or(0),
        }
    }

    /// Counts a new ring while fewer than `max` are served; `None` when the limit is reached.
    pub(crate) fn admit_ring(&self, max: usize) -> Option<Live> {
        self.live
            .rings
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| Live(self.live.rings.clone()))
    }

    /// The machine's sleep and wake as the drivers have it.
    pub fn power(&self) -> &Arc<crate::power::Power> {
        &self.power
    }

    /// Tells every session about something that concerns all of them.
    pub(crate) fn announce(&self, event: CoreEvent) {
        self.events.publish(event);
    }

    /// The registry.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The running policy.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy_snapshot().0
    }

    /// The running policy with its generation, read together.
    pub fn policy_snapshot(&self) -> (Arc<Policy>, u64) {
        let guard = self.policy.read().unwrap_or_else(|e| e.into_inner());
        (guard.0.clone(), guard.1)
    }

    /// The running policy's generation (1 for the policy loaded at start).
    pub fn policy_generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Swaps in a new policy atomically and tells every session; returns its generation.
    pub fn replace_policy(&self, policy: Policy) -> u64 {
        let generation = {
            let mut guard = self.policy.write().unwrap_or_else(|e| e.into_inner());
            let generation = guard.1 + 1;
            *guard = (Arc::new(policy), generation);
            self.generation.store(generation, Ordering::Release);
            generation
        };
        self.events.publish(CoreEvent::PolicyReloaded { generation });
        // The old policy's rules are free now (user clients keep compiled grants, not rules).
        release_memory();
        generation
    }

    /// A session started: `live` sessions now.
    pub(crate) fn session_started(&self, live: usize) {
        self.trim.started(live);
    }

    /// A session ended: `live` sessions now (see [`TrimMark`]).
    pub(crate) fn session_ended(&self, live: usize) {
        self.trim.ended(live);
    }

    /// Loads the policy again from its source. On any error the running policy stays and the
    /// error is returned (and logged); on success the new one runs from the next call of every
    /// session. Returns the new generation and its rule count.
    pub fn reload_policy(&self) -> Result<(u64, usize), crate::config::ConfigError> {
        let time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let result = crate::config::load_policy_trusted(self.policy_source.as_deref());
        let (record, outcome) = match result {
            Ok(policy) => {
                let rules = policy.rule_count();
                let revision = policy.revision().to_string();
                let generation = self.replace_policy(policy);
                tracing::info!(generation, rules, revision, "policy reloaded");
                let record = ReloadRecord {
                    time,
                    accepted: true,
                    revision: revision.clone(),
                    error: String::new(),
                    generation,
                };
                if let Some(log) = self.decision_log() {
                    log.write(serde_json::json!({ "event": "reload", "decision": "accepted", "policy_generation": generation, "policy_revision": revision, "rules": rules }));
                }
                (record, Ok((generation, rules)))
            }
            Err(e) => {
                tracing::warn!(error = %e, "policy reload refused; the running policy stays");
                let generation = self.policy_generation();
                if let Some(log) = self.decision_log() {
                    log.write(serde_json::json!({ "event": "reload", "decision": "refused", "policy_generation": generation, "error": e.to_string() }));
                }
                let record = ReloadRecord {
                    time,
                    accepted: false,
                    revision: String::new(),
                    error: e.to_string(),
                    generation,
                };
                (record, Err(e))
            }
        };
        *self.last_reload.lock().unwrap_or_else(|e| e.into_inner()) = Some(record);
        outcome
    }

    /// The running policy: revision, generation, mode, files, rules, and the last reload.
    pub fn policy_status(&self) -> PolicyStatus {
        let (policy, generation) = self.policy_snapshot();
        PolicyStatus {
            revision: policy.revision().to_string(),
            generation,
            audit: policy.audit_mode(),
            files: self
                .policy_source
                .as_deref()
                .map(|p| crate::config::policy_files(p).unwrap_or_default())
                .unwrap_or_default(),
            rules: policy.rule_count(),
            last_reload: self.last_reload.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        }
    }

    /// What a reload would do, without doing it: the policy the files now hold is loaded and
    /// checked as a reload would, and each open user client's admission recompiled under it;
    /// returns that policy's revision and every user client whose grant would change (or that
    /// would be closed). Nothing changes; a policy that does not load is the error.
    pub fn reload_dry_run(&self) -> Result<(String, Vec<GrantChange>), crate::config::ConfigError> {
        let policy = crate::config::load_policy_trusted(self.policy_source.as_deref())?;
        let entries: Vec<OpenGrant> = self
            .grants
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        let mut changes: Vec<GrantChange> = entries
            .iter()
            .filter_map(|e| {
                let after = super::user::admit(self, &policy, &e.peer, e.abi, &e.service, &e.driver, e.mode);
                let change = match after {
                    Err(denial) => format!("would be closed: {} (rule {:?})", denial.reason, denial.rule),
                    Ok(grant) if grant == e.grant => return None,
                    Ok(grant) => describe_grant_change(&e.grant, &grant, &e.driver),
                };
                Some(GrantChange {
                    uid: e.peer.uid,
                    pid: e.peer.pid_text(),
                    service: e.service.name().to_string(),
                    handle: e.handle,
                    change,
                })
            })
            .collect();
        changes.sort_by(|a, b| (a.uid, &a.pid, a.handle).cmp(&(b.uid, &b.pid, b.handle)));
        Ok((policy.revision().to_string(), changes))
    }

    /// Every client identity's account, and the connection slots.
    pub fn accounts(&self) -> &Arc<Accounts> {
        &self.accounts
    }

    /// The account a peer's sessions count against.
    pub fn account_of(&self, peer: &PeerIdentity) -> Arc<super::accounts::Account> {
        let key = match &peer.tls {
            Some(tls) => AccountKey::Remote(
                tls.san_uri
                    .first()
                    .or_else(|| tls.san_dns.first())
                    .or(tls.subject_cn.as_ref())
                    .cloned()
                    .unwrap_or_default(),
            ),
            None => AccountKey::Uid(peer.uid),
        };
        self.accounts.account(key)
    }

    /// What to read of a new peer: its executable is hashed only while the policy names an
    /// `exe_sha256`.
    pub fn identity_options(&self) -> IdentityOptions {
        IdentityOptions {
            hash_exe: self.policy().uses_exe_sha256().then_some(ExeHashing {
                max_bytes: self.accounts.limits().max_exe_hash_bytes,
            }),
        }
    }

    /// The peer's executable path as the policy may see it: only a path the policy names, and
    /// only when that path, looked up in the broker's own mount namespace, is the very file the
    /// peer runs (device and inode). A path seen through another mount namespace (a bind mount
    /// over an allowed program) or a replaced binary is not the program it names.
    pub fn exe_for<'a>(&self, policy: &Policy, peer: &'a PeerIdentity) -> Option<&'a str> {
        let path = peer.exe.as_deref()?;
        if !policy.names_exe(path) {
            // Nothing can match it; looking it up would only let the peer choose what the
            // broker's file system calls touch.
            return None;
        }
        let program = peer.program?;
        (super::identity::file_id(path) == Some(program)).then_some(path)
    }

    /// A key for a new user client, unique for the broker's life.
    pub(crate) fn next_client_key(&self) -> crate::driver::ClientKey {
        crate::driver::ClientKey(self.next_client.fetch_add(1, Ordering::Relaxed))
    }

    /// Tells every session that the broker is stopping.
    pub fn stop(&self) {
        self.stopping.send_replace(true);
    }

    /// Completes (at once, if it has already happened) when the broker starts stopping.
    pub fn stopping(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.stopping.subscribe();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    }

    /// Whether the broker is stopping.
    pub fn is_stopping(&self) -> bool {
        *self.stopping.borrow()
    }

    /// Logs decisions to `log` from now on (once; later calls are ignored).
    pub fn set_decision_log(&self, log: super::DecisionLog) {
        let _ = self.decisions.set(log);
    }

    /// The decision log, if one is configured.
    pub fn decision_log(&self) -> Option<&super::DecisionLog> {
        self.decisions.get()
    }

    /// The most connections served at once.
    pub fn max_connections(&self) -> usize {
        self.max_connections
    }

    /// Where the policy reloads from.
    pub fn policy_source(&self) -> Option<&std::path::Path> {
        self.policy_source.as_deref()
    }

    /// A receiver of every event from now on (tools and tests; sessions hear only what
    /// concerns them).
    pub fn subscribe(&self) -> super::EventReceiver {
        self.events.observe()
    }

    /// The hub that delivers the core's events.
    pub fn events(&self) -> &Arc<super::events::EventHub> {
        &self.events
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
        if service.driver().is_some() {
            tracing::info!(id = %service.id(), name, class, "service published");
        } else {
            tracing::debug!(id = %service.id(), name, class, "service published");
        }
        self.events.publish(CoreEvent::Published(service.clone()));
        Ok(service)
    }

    /// Terminates a service and its descendants and tells every session.
    pub fn terminate(&self, id: ServiceId) {
        for service in self.registry.terminate(id) {
            tracing::info!(id = %service.id(), name = service.name(), "service terminated");
            self.events.publish(CoreEvent::Terminated {
                id: service.id(),
                name: service.name().to_string(),
            });
        }
    }

    /// Posts a driver's notification about a service.
    pub fn notify(&self, service: &Arc<Service>, notice: DriverNotice) {
        self.events.publish(CoreEvent::Notice {
            service: service.clone(),
            notice,
        });
    }

    /// Whether the policy lets this peer see the service.
    pub fn can_see(&self, peer: &PeerIdentity, abi: AbiId, service: &Service) -> bool {
        if crate::bus::is_kernel_internal(service.class()) {
            return false;
        }
        let policy = self.policy();
        let properties = service.properties();
        policy.can_see(
            &peer.task(abi, self.exe_for(&policy, peer)),
            &view(service, &properties),
        )
    }

    /// The services matching the dictionary that this peer may see (IOServiceGetMatchingServices).
    pub fn find_services(&self, peer: &PeerIdentity, abi: AbiId, matching: &Matching) -> Vec<Arc<Service>> {
        let policy = self.policy();
        // The task's principals are found once, not once per service.
        let principals = policy.principals_of(&peer.task(abi, self.exe_for(&policy, peer)));
        self.registry
            .find(matching)
            .into_iter()
            .filter(|s| !crate::bus::is_kernel_internal(s.class()))
            .filter(|s| policy.can_see_as(&principals, &view(s, &s.properties())))
            .collect()
    }
}

/// The policy's view of a service.
pub(super) fn view<'a>(service: &'a Service, properties: &'a Properties) -> ServiceView<'a> {
    ServiceView {
        name: service.name(),
        class: service.class(),
        properties,
    }
}

#[cfg(test)]
mod tests {
    use super::TrimMark;

    #[test]
    fn memory_goes_back_at_each_halving_of_a_crowd_and_at_its_end_only() {
        let trim = TrimMark::default();
        // A few clients coming and going: never.
        for live in 1..=10 {
            trim.started(live);
        }
        assert!((0..10).rev().all(|live| !trim.ended(live)));
        // A crowd of 200: below 100, below 49 (half of 99), then not below 24 (a mark under 32),
        // until the last one.
        for live in 1..=200 {
            trim.started(live);
        }
        let trimmed: Vec<usize> = (0..200).rev().filter(|&live| trim.ended(live)).collect();
        assert_eq!(trimmed, vec![99, 48, 0]);
        // Once handed back at zero, a lone client's end does not trim again.
        trim.started(1);
        assert!(!trim.ended(0));
    }
}
