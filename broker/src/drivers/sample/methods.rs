//! The sample device's method table, by selector:
//!
//! | sel | name         | in                  | out                                    |
//! |-----|--------------|---------------------|----------------------------------------|
//! | 0   | `add`        | a, b                | a + b (wrapping)                       |
//! | 1   | `echo`       | struct 0..=4096     | the same bytes                         |
//! | 2   | `get_info`   | —                   | struct `sample_info` (16 bytes)        |
//! | 3   | `wait_event` | timeout_ms (async)  | the value passed to `fire_event`, or `TIMEOUT` |
//! | 4   | `fire_event` | value               | number of waiters completed            |
//! | 5   | `reset`      | — (`sample.admin`)  | —                                      |
//!
//! `sample_info` is `{ u32 version; u32 current_opens; u64 calls_served; }` in the broker's
//! native byte order: the same offsets on every ABI, no padding.

use crate::driver::{MethodSpec, SizeRange};

/// Reported by `get_info`.
pub const SAMPLE_VERSION: u32 = 1;

/// Longest `wait_event` timeout accepted (10 minutes).
pub const MAX_WAIT_MS: u64 = 600_000;

/// The sample device's selectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Selector {
    /// `add(a, b) -> a + b`.
    Add = 0,
    /// `echo(struct) -> struct`.
    Echo = 1,
    /// `get_info() -> sample_info`.
    GetInfo = 2,
    /// `wait_event(timeout_ms) -> value` (async).
    WaitEvent = 3,
    /// `fire_event(value) -> completed`.
    FireEvent = 4,
    /// `reset()`, privileged.
    Reset = 5,
}

impl Selector {
    pub(super) fn from_u32(selector: u32) -> Option<Selector> {
        [
            Selector::Add,
            Selector::Echo,
            Selector::GetInfo,
            Selector::WaitEvent,
            Selector::FireEvent,
            Selector::Reset,
        ]
        .into_iter()
        .find(|s| *s as u32 == selector)
    }
}

const fn row(selector: Selector, name: &'static str, scalar_in: u8, scalar_out: u8) -> MethodSpec {
    MethodSpec {
        selector: selector as u32,
        name,
        scalar_in,
        scalar_out,
        struct_in: SizeRange::NONE,
        struct_out: SizeRange::NONE,
        is_async: false,
        privilege: None,
    }
}

/// Size of `sample_info`.
pub const INFO_SIZE: u32 = 16;

/// Largest `echo` struct.
pub const ECHO_MAX: u32 = 4096;

pub(super) const TABLE: [MethodSpec; 6] = [
    row(Selector::Add, "add", 2, 1),
    MethodSpec {
        struct_in: SizeRange::between(0, ECHO_MAX),
        struct_out: SizeRange::between(0, ECHO_MAX),
        ..row(Selector::Echo, "echo", 0, 0)
    },
    MethodSpec {
        struct_out: SizeRange::exactly(INFO_SIZE),
        ..row(Selector::GetInfo, "get_info", 0, 0)
    },
    MethodSpec {
        is_async: true,
        ..row(Selector::WaitEvent, "wait_event", 1, 1)
    },
    row(Selector::FireEvent, "fire_event", 1, 1),
    MethodSpec {
        privilege: Some("sample.admin"),
        ..row(Selector::Reset, "reset", 0, 0)
    },
];
