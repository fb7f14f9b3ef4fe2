//! logind on the system bus: the broker sleeps when logind says `PrepareForSleep(true)` and
//! wakes on `PrepareForSleep(false)`, holding a *delay* inhibitor while awake so that logind
//! waits for the drivers to finish before the machine sleeps; and it takes *block* inhibitors
//! for clients' sleep assertions (`power.assert`).
//!
//! The signal is taken only from the connection that owns `org.freedesktop.login1` (zbus
//! matches the sender against the name's owner): any other peer on the bus sending the same
//! signal is not heard. An inhibitor is a descriptor: it holds until closed.

use std::{os::fd::OwnedFd, sync::Arc};

use tokio_stream::StreamExt;

use super::Source;
use crate::session::Core;

const DESTINATION: &str = "org.freedesktop.login1";
const PATH: &str = "/org/freedesktop/login1";
const MANAGER: &str = "org.freedesktop.login1.Manager";

/// The broker's connection to logind.
#[derive(Clone, Debug)]
pub struct Logind {
    manager: zbus::Proxy<'static>,
}

/// Why logind could not be reached or refused.
#[derive(Debug, thiserror::Error)]
pub enum LogindError {
    /// No system bus, or logind is not on it.
    #[error("logind is not reachable on the system bus: {0}")]
    Unreachable(zbus::Error),
    /// logind refused (polkit said no, or a bad argument).
    #[error("logind refused: {0}")]
    Refused(zbus::Error),
}

impl Logind {
    /// Connects to the system bus (`$DBUS_SYSTEM_BUS_ADDRESS`, else the standard socket) and
    /// checks that logind answers there.
    pub async fn connect() -> Result<Logind, LogindError> {
        let connection = zbus::Connection::system().await.map_err(LogindError::Unreachable)?;
        let manager = zbus::Proxy::new(&connection, DESTINATION, PATH, MANAGER)
            .await
            .map_err(LogindError::Unreachable)?;
        // A property read both starts logind where the bus activates it and proves it is there.
        manager
            .get_property::<bool>("PreparingForSleep")
            .await
            .map_err(LogindError::Unreachable)?;
        Ok(Logind { manager })
    }

    /// Takes a sleep inhibitor (`block`: sleep waits until it is released; `delay`: sleep waits
    /// at most logind's `InhibitDelayMaxSec`). It holds until the descriptor closes.
    pub async fn inhibit(&self, block: bool, who: &str, why: &str) -> Result<OwnedFd, LogindError> {
        let mode = if block { "block" } else { "delay" };
        let fd: zbus::zvariant::OwnedFd = self
            .manager
            .call("Inhibit", &("sleep", who, why, mode))
            .await
            .map_err(LogindError::Refused)?;
        Ok(fd.into())
    }
}

/// Follows logind's sleep and wake until the broker stops: see the module's description. Says
/// once, at info level, when there is no logind to follow.
pub async fn follow(core: Arc<Core>) {
    let logind = match Logind::connect().await {
        Ok(logind) => logind,
        Err(e) => {
            tracing::info!(error = %e, "not following logind: the devices sleep and wake only by `portcullis power`");
            return;
        }
    };
    let mut signals = match logind.manager.receive_signal("PrepareForSleep").await {
        Ok(signals) => signals,
        Err(e) => {
            tracing::warn!(error = %e, "cannot subscribe to logind's PrepareForSleep: not following logind");
            return;
        }
    };
    let delay = || {
        logind.inhibit(
            false,
            "portcullis",
            "the broker's drivers finish their devices' work before sleep",
        )
    };
    let mut inhibitor = take(delay().await);
    core.power().set_logind(logind.clone());
    tracing::info!(
        delay_inhibitor = inhibitor.is_some(),
        "following logind's sleep and wake"
    );
    let stopping = core.stopping();
    tokio::pin!(stopping);
    loop {
        let message = tokio::select! {
            message = signals.next() => message,
            () = &mut stopping => return,
        };
        let Some(message) = message else {
            tracing::warn!("logind's signals ended (logind or the bus went away): no longer following sleep and wake");
            if core.power().is_asleep() {
                super::wake(&core, Source::Logind).await;
            }
            return;
        };
        let start: bool = match message.body().deserialize() {
            Ok(start) => start,
            Err(e) => {
                tracing::warn!(error = %e, "a PrepareForSleep signal without its boolean: ignored");
                continue;
            }
        };
        if start {
            super::sleep(&core, Source::Logind).await;
            // Releasing the delay lets logind go on with the sleep.
            inhibitor = None;
        } else {
            super::wake(&core, Source::Logind).await;
            if inhibitor.is_none() {
                inhibitor = take(delay().await);
            }
        }
    }
}

fn take(result: Result<OwnedFd, LogindError>) -> Option<OwnedFd> {
    result
        .map_err(|e| tracing::warn!(error = %e, "no delay inhibitor: logind may sleep before the drivers finish"))
        .ok()
}
