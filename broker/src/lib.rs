//! The Portcullis device broker: one trusted process owns the device drivers; untrusted
//! applications reach them only through sessions whose every request the policy checks.
//!
//! - [`bus`]: where nubs come from (the configuration, sysfs and the kernel's uevents);
//! - [`registry`]: services, properties, matching, personalities, open arbitration;
//! - [`driver`] and [`drivers`]: the driver model and the drivers;
//! - [`session`]: identity, admission, grants, calls, events;
//! - [`transport`]: gRPC (and, later, the native socket and ring);
//! - [`server`]: assembling and running a broker (the `portcullis` command is its own crate,
//!   `broker/cli`, so that this library never links the client).
//!
//! Unsafe code is denied everywhere but in `sys`, which holds the system calls no safe wrapper
//! crate offers (`SO_PEERSEC`), each with its safety argument.

#![deny(unsafe_code)]

pub mod bus;
mod capture;
pub mod config;
pub mod driver;
pub mod drivers;
#[doc(hidden)]
pub mod fuzzing;
pub mod power;
pub mod registry;
pub mod sandbox;
pub mod server;
pub mod session;
#[allow(unsafe_code)]
mod sys;
pub use sys::{heap_in_use, raise_descriptor_limit};
pub mod systemd;
mod throttle;
pub mod transport;

pub use sys::default_sigpipe;
pub mod trust;
