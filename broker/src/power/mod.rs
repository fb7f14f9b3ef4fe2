//! System sleep and wake, as I/O Kit's power management gives them to drivers and apps: the
//! broker follows logind's `PrepareForSleep` ([`logind`]) and `portcullis power sleep|wake`.
//!
//! Going to sleep: from the moment it starts, calls wait for wake (at most `[power]
//! call_wait_ms`, then `ASLEEP`); every client is told `WillSleep`; the synchronous driver calls
//! already running finish; then each driver's [`Driver::power`] runs, children before parents.
//! Waking runs them parents first, lets the waiting calls go, and tells every client `HasWoken`.
//! Sessions, user clients, opens and mappings are untouched either way.

pub mod logind;

use std::{
    sync::{
        Arc, Mutex, OnceLock, RwLock, RwLockReadGuard,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use serde::Deserialize;
use tokio::sync::watch;

use crate::{
    driver::{Driver, PowerChange},
    session::{Core, CoreEvent},
};

/// `[power]`: how the broker follows the machine's sleep and wake.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct PowerConfig {
    /// Follow logind's `PrepareForSleep` on the system bus, holding a delay inhibitor so that
    /// the drivers finish before the machine sleeps [default: true; without a system bus or
    /// logind the broker says so once and sleeps only by `portcullis power`].
    pub follow_logind: bool,
    /// How long a call that arrives while the devices sleep waits for wake before it is
    /// refused `ASLEEP` [default: 10,000 ms; 0 refuses at once].
    pub call_wait_ms: u64,
    /// How long one driver may take to finish before sleep or to restore on wake [default:
    /// 5,000 ms]; a driver that fails or overruns is reported, and the transition goes on.
    pub driver_timeout_ms: u64,
}

impl Default for PowerConfig {
    fn default() -> PowerConfig {
        PowerConfig {
            follow_logind: true,
            call_wait_ms: 10_000,
            driver_timeout_ms: 5_000,
        }
    }
}

/// What asked for a transition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// logind's `PrepareForSleep`.
    Logind,
    /// `portcullis power sleep|wake`.
    Admin,
}

impl Source {
    fn name(self) -> &'static str {
        match self {
            Source::Logind => "logind",
            Source::Admin => "admin",
        }
    }
}

/// The power state and the record of the last transition, for `portcullis power` and `stats`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PowerStatus {
    /// Whether the devices are asleep (or going to sleep).
    pub asleep: bool,
    /// Sleeps so far.
    pub sleeps: u64,
    /// Wakes so far.
    pub wakes: u64,
    /// What started the last transition (`logind`, `admin`), or empty.
    pub last_source: String,
    /// The services with a driver the last transition changed, in the order it changed them.
    pub order: Vec<String>,
    /// Drivers that failed the last transition, with why.
    pub failures: Vec<String>,
    /// Whether the broker follows logind.
    pub logind: bool,
    /// Sleep assertions clients hold (`power.assert`).
    pub assertions: usize,
    /// Calls waiting for wake.
    pub waiting_calls: usize,
}

/// The machine's power as the broker's drivers have it.
#[derive(Debug)]
pub struct Power {
    /// Set (under `gate` held for writing) when the devices start going to sleep.
    asleep: AtomicBool,
    /// The same, for those who wait for wake.
    awake: watch::Sender<bool>,
    /// Held for reading while driver code of a call runs: a transition takes it for writing, so
    /// it starts only once the running calls have returned.
    gate: RwLock<()>,
    /// One transition at a time.
    transition: tokio::sync::Mutex<()>,
    record: Mutex<Record>,
    call_wait_ms: AtomicU64,
    driver_timeout_ms: AtomicU64,
    waiting: Arc<AtomicUsize>,
    assertions: Arc<AtomicUsize>,
    logind: OnceLock<logind::Logind>,
}

#[derive(Debug, Default)]
struct Record {
    sleeps: u64,
    wakes: u64,
    last_source: Option<Source>,
    order: Vec<String>,
    failures: Vec<String>,
}

/// A pass to run a call's driver code: while any is held, the devices do not start to sleep.
#[derive(Debug)]
pub struct Awake<'a>(#[allow(dead_code)] RwLockReadGuard<'a, ()>);

impl Default for Power {
    fn default() -> Power {
        let config = PowerConfig::default();
        Power {
            asleep: AtomicBool::new(false),
            awake: watch::Sender::new(true),
            gate: RwLock::new(()),
            transition: tokio::sync::Mutex::new(()),
            record: Mutex::new(Record::default()),
            call_wait_ms: AtomicU64::new(config.call_wait_ms),
            driver_timeout_ms: AtomicU64::new(config.driver_timeout_ms),
            waiting: Arc::default(),
            assertions: Arc::default(),
            logind: OnceLock::new(),
        }
    }
}

impl Power {
    /// Applies `[power]`.
    pub fn configure(&self, config: &PowerConfig) {
        self.call_wait_ms.store(config.call_wait_ms, Ordering::Relaxed);
        self.driver_timeout_ms
            .store(config.driver_timeout_ms, Ordering::Relaxed);
    }

    /// A pass to run driver code now, or `None` while the devices sleep.
    pub fn enter(&self) -> Option<Awake<'_>> {
        let guard = self.gate.read().unwrap_or_else(|e| e.into_inner());
        (!self.asleep.load(Ordering::Acquire)).then_some(Awake(guard))
    }

    /// Whether the devices are asleep (or going to sleep).
    pub fn is_asleep(&self) -> bool {
        self.asleep.load(Ordering::Acquire)
    }

    /// How long a call waits for wake.
    pub fn call_wait(&self) -> Duration {
        Duration::from_millis(self.call_wait_ms.load(Ordering::Relaxed))
    }

    /// Counts a call waiting for wake, for as long as the guard lives.
    pub(crate) fn waiting(&self) -> crate::session::Live {
        crate::session::Live::new(&self.waiting)
    }

    /// Waits until the devices are awake, or `deadline`; whether they are.
    pub async fn wait_awake(&self, deadline: Instant) -> bool {
        let mut rx = self.awake.subscribe();
        matches!(
            tokio::time::timeout_at(deadline.into(), rx.wait_for(|awake| *awake)).await,
            Ok(Ok(_))
        )
    }

    /// Counts the sleep assertions clients hold.
    pub fn assertions(&self) -> &Arc<AtomicUsize> {
        &self.assertions
    }

    /// The logind connection, once the broker follows logind.
    pub fn logind(&self) -> Option<&logind::Logind> {
        self.logind.get()
    }

    pub(crate) fn set_logind(&self, logind: logind::Logind) {
        let _ = self.logind.set(logind);
    }

    /// The state and the last transition.
    pub fn status(&self) -> PowerStatus {
        let record = self.record.lock().unwrap_or_else(|e| e.into_inner());
        PowerStatus {
            asleep: self.is_asleep(),
            sleeps: record.sleeps,
            wakes: record.wakes,
            last_source: record.last_source.map(Source::name).unwrap_or_default().to_string(),
            order: record.order.clone(),
            failures: record.failures.clone(),
            logind: self.logind.get().is_some(),
            assertions: self.assertions.load(Ordering::Relaxed),
            waiting_calls: self.waiting.load(Ordering::Relaxed),
        }
    }
}

/// Puts the devices to sleep (nothing when they already sleep): see the module's description.
pub async fn sleep(core: &Arc<Core>, source: Source) -> PowerStatus {
    let power = core.power();
    let _one = power.transition.lock().await;
    if power.is_asleep() {
        return power.status();
    }
    tracing::info!(source = source.name(), "the devices go to sleep");
    let gate_core = core.clone();
    // Taking the gate for writing waits for the running calls' driver code: a blocking wait.
    let _ = tokio::task::spawn_blocking(move || {
        let power = gate_core.power();
        let _all = power.gate.write().unwrap_or_else(|e| e.into_inner());
        power.asleep.store(true, Ordering::Release);
        power.awake.send_replace(false);
    })
    .await;
    core.announce(CoreEvent::WillSleep);
    let mut services = core.registry().parents_first();
    services.reverse();
    transition(core, services, PowerChange::Sleep, source).await;
    tracing::info!("the devices are asleep");
    power.status()
}

/// Wakes the devices (nothing when they are awake): see the module's description.
pub async fn wake(core: &Arc<Core>, source: Source) -> PowerStatus {
    let power = core.power();
    let _one = power.transition.lock().await;
    if !power.is_asleep() {
        return power.status();
    }
    tracing::info!(source = source.name(), "the devices wake");
    let services = core.registry().parents_first();
    transition(core, services, PowerChange::Wake, source).await;
    {
        let _all = power.gate.write().unwrap_or_else(|e| e.into_inner());
        power.asleep.store(false, Ordering::Release);
        power.awake.send_replace(true);
    }
    core.announce(CoreEvent::HasWoken);
    tracing::info!("the devices are awake");
    power.status()
}

/// Runs every driver's side of a transition, in the order given, on a blocking thread.
async fn transition(
    core: &Arc<Core>,
    services: Vec<Arc<crate::registry::Service>>,
    change: PowerChange,
    source: Source,
) {
    let timeout = Duration::from_millis(core.power().driver_timeout_ms.load(Ordering::Relaxed));
    let core = core.clone();
    let _ = tokio::task::spawn_blocking(move || {
        let mut order = Vec::new();
        let mut failures = Vec::new();
        for service in services.iter().filter(|s| !s.is_terminated()) {
            let Some(driver) = service.driver() else { continue };
            order.push(service.name().to_string());
            let started = Instant::now();
            let outcome = run_driver(driver.as_ref(), change, started + timeout);
            let took = started.elapsed();
            let failure = match outcome {
                Ok(()) if took <= timeout => None,
                Ok(()) => Some(format!(
                    "took {} ms, over the {} ms allowed",
                    took.as_millis(),
                    timeout.as_millis()
                )),
                Err(why) => Some(why),
            };
            if let Some(why) = failure {
                tracing::warn!(service = service.name(), ?change, %why, "a driver failed a power change");
                failures.push(format!("{}: {why}", service.name()));
            }
        }
        let mut record = core.power().record.lock().unwrap_or_else(|e| e.into_inner());
        match change {
            PowerChange::Sleep => record.sleeps += 1,
            PowerChange::Wake => record.wakes += 1,
        }
        record.last_source = Some(source);
        record.order = order;
        record.failures = failures;
    })
    .await;
}

fn run_driver(driver: &dyn Driver, change: PowerChange, deadline: Instant) -> Result<(), String> {
    match crate::driver::contained(|| driver.power(change, deadline)) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(panic) => Err(format!("the driver panicked: {panic}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::{CallArgs, CallContext, Completion, DriverError, Family, MethodSpec};
    use portcullis_policy::{Policy, Source as PolicySource};

    /// A driver that writes down the power changes it is given.
    #[derive(Debug)]
    struct Recorder {
        name: &'static str,
        seen: Arc<Mutex<Vec<(&'static str, PowerChange)>>>,
        fail: bool,
    }

    impl Driver for Recorder {
        fn family(&self) -> &'static Family {
            &crate::drivers::sample::FAMILY
        }

        fn call(&self, _ctx: &CallContext<'_>, _spec: &MethodSpec, _args: CallArgs) -> Completion {
            Completion::Ready(Ok(Default::default()))
        }

        fn power(&self, change: PowerChange, _deadline: Instant) -> Result<(), DriverError> {
            self.seen.lock().unwrap().push((self.name, change));
            if self.fail {
                return Err(DriverError::new(
                    portcullis_proto::Status::Internal,
                    "broken on purpose",
                ));
            }
            Ok(())
        }
    }

    fn core() -> Arc<Core> {
        let policy = Policy::parse(&[PolicySource {
            origin: "default",
            text: crate::config::DEFAULT_POLICY,
        }])
        .unwrap();
        Core::new(policy)
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn power_changes_reach_children_before_parents_going_down_and_after_coming_up() {
        let core = core();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let driver = |name, fail| -> Option<Arc<dyn Driver>> {
            Some(Arc::new(Recorder {
                name,
                seen: seen.clone(),
                fail,
            }))
        };
        let root = core.registry().root();
        let hub = core
            .publish(
                Some(root),
                "hub",
                "SampleDevice",
                Default::default(),
                driver("hub", false),
            )
            .unwrap();
        let port = core
            .publish(
                Some(hub.id()),
                "port",
                "SampleDevice",
                Default::default(),
                driver("port", true),
            )
            .unwrap();
        core.publish(
            Some(port.id()),
            "disk",
            "SampleDevice",
            Default::default(),
            driver("disk", false),
        )
        .unwrap();
        core.publish(
            Some(root),
            "other",
            "SampleDevice",
            Default::default(),
            driver("other", false),
        )
        .unwrap();

        let asleep = sleep(&core, Source::Admin).await;
        assert!(asleep.asleep && core.power().enter().is_none());
        let down: Vec<&str> = seen.lock().unwrap().drain(..).map(|(n, _)| n).collect();
        let at = |name| down.iter().position(|n| *n == name).unwrap();
        assert!(at("disk") < at("port") && at("port") < at("hub"), "{down:?}");
        // A driver that fails is reported; the others still sleep.
        assert_eq!(asleep.failures, vec!["port: INTERNAL: broken on purpose".to_string()]);
        assert_eq!(down.len(), 4);

        let awake = wake(&core, Source::Admin).await;
        assert!(!awake.asleep && core.power().enter().is_some());
        let up: Vec<&str> = seen.lock().unwrap().drain(..).map(|(n, _)| n).collect();
        let mut reversed = down.clone();
        reversed.reverse();
        assert_eq!(up, reversed);
        assert_eq!((awake.sleeps, awake.wakes), (1, 1));
        // Waking what is awake changes nothing.
        wake(&core, Source::Admin).await;
        assert!(seen.lock().unwrap().is_empty());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_waiter_for_wake_sees_the_wake_or_its_deadline() {
        let core = core();
        sleep(&core, Source::Admin).await;
        let power = core.power().clone();
        assert!(!power.wait_awake(Instant::now()).await, "asleep at the deadline");
        let waiter = tokio::spawn(async move { power.wait_awake(Instant::now() + Duration::from_secs(60)).await });
        wake(&core, Source::Admin).await;
        assert!(waiter.await.unwrap());
    }
}
