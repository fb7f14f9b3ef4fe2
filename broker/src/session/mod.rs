//! The session core. Every transport decodes a client's request and calls a [`Session`]; the
//! session checks the grant, checks the method table, and dispatches to the driver. Nothing a
//! session holds outlives it: dropping it releases every user client, open and pending call.

pub mod accounts;
mod bucket;
mod command;
mod core;
mod decisions;
mod events;
pub(crate) mod identity;
mod user;

pub use command::{Command, Reply, Started};
pub(crate) use core::Live;
pub use core::{Core, CoreEvent, GrantChange, PolicyStatus, ReloadRecord, Stats};
pub use decisions::DecisionLog;
pub use events::{EventHub, EventReceiver, Missed};
pub(crate) use identity::parse_label;
pub use identity::{ExeHashing, FileId, IdentityError, IdentityOptions, PeerIdentity, TlsPeer};
pub use user::{CallStarted, Refusal, Session, SessionEvent};

/// Completes at a session's idle deadline (never, for `None`).
pub(crate) async fn idle(deadline: Option<std::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
