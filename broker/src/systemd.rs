//! Running under systemd (`dist/systemd/`): readiness and stopping for `Type=notify`, the
//! watchdog, and socket activation — the Linux form of the launch-on-demand launchd gives
//! I/O Kit daemons. Outside systemd every notification is a no-op (no `NOTIFY_SOCKET`).

use std::{os::fd::OwnedFd, time::Duration};

use rustix::net::{AddressFamily, SocketType, sockopt};
use sd_notify::NotifyState;

/// The listening sockets a service manager passed.
#[derive(Debug, Default)]
pub struct Activated {
    /// The gRPC socket (`ListenStream=`).
    pub grpc: Option<OwnedFd>,
    /// The native socket (`ListenSequentialPacket=`).
    pub native: Option<OwnedFd>,
}

impl Activated {
    /// Takes the sockets systemd passed, if it passed any. Each must be a listening Unix
    /// socket; a stream socket is the gRPC one and a sequential-packet socket the native one
    /// (one `.socket` unit gives all its sockets one name, so the type decides). Call before
    /// any thread exists: the `LISTEN_*` variables are cleared so that no child inherits them.
    pub fn take() -> Result<Option<Activated>, String> {
        let fds = crate::sys::take_activated_sockets().map_err(|e| format!("socket activation: {e}"))?;
        if fds.is_empty() {
            return Ok(None);
        }
        let mut activated = Activated::default();
        for (fd, name) in fds {
            let kind = sockopt::socket_type(&fd).map_err(|e| format!("activated socket {name:?}: {e}"))?;
            let family = rustix::net::getsockname(&fd)
                .map(|a| a.address_family())
                .map_err(|e| format!("activated socket {name:?}: {e}"))?;
            let listening = sockopt::socket_acceptconn(&fd).unwrap_or(false);
            if family != AddressFamily::UNIX || !listening {
                return Err(format!(
                    "activated socket {name:?} is not a listening Unix socket (the broker takes ListenStream= and ListenSequentialPacket= paths)"
                ));
            }
            let slot = match kind {
                SocketType::STREAM => &mut activated.grpc,
                SocketType::SEQPACKET => &mut activated.native,
                _ => {
                    return Err(format!(
                        "activated socket {name:?} is neither a stream nor a sequential-packet socket"
                    ));
                }
            };
            if slot.replace(fd).is_some() {
                return Err(format!("two activated sockets of one kind (the second is {name:?})"));
            }
        }
        Ok(Some(activated))
    }
}

fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}

/// Tells the service manager the broker serves (`READY=1`).
pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Tells the service manager the broker is stopping (`STOPPING=1`).
pub fn stopping(status: &str) {
    notify(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// With a watchdog (`WatchdogSec=`), pings it at half its period from the runtime: a runtime
/// that stops scheduling stops the pings, and systemd restarts the broker.
pub fn spawn_watchdog() -> Option<tokio::task::JoinHandle<()>> {
    let period = sd_notify::watchdog_enabled()?;
    let every = (period / 2).max(Duration::from_millis(10));
    tracing::info!(
        period_ms = period.as_millis() as u64,
        "pinging the service manager's watchdog"
    );
    Some(tokio::spawn(async move {
        let mut ticks = tokio::time::interval(every);
        loop {
            ticks.tick().await;
            notify(&[NotifyState::Watchdog]);
        }
    }))
}

/// Completes once no client has been connected for `idle` (checked every quarter of it, at
/// most every second): with socket activation, the broker then exits and systemd starts it
/// again at the next connection, which waits in the socket's backlog meanwhile.
pub async fn idle_for(core: std::sync::Arc<crate::session::Core>, idle: Duration) {
    let step = (idle / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut quiet_since = tokio::time::Instant::now();
    let mut ticks = tokio::time::interval(step);
    loop {
        ticks.tick().await;
        if core.accounts().connections() > 0 {
            quiet_since = tokio::time::Instant::now();
        } else if quiet_since.elapsed() >= idle {
            return;
        }
    }
}
