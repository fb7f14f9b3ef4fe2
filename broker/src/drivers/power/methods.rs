//! The power domain's method table, by selector:
//!
//! | sel | name            | in | out                                  |
//! |-----|-----------------|----|--------------------------------------|
//! | 0   | `get_state`     | —  | asleep (0/1), sleeps so far, assertions held (all clients) |
//! | 1   | `prevent_sleep` | — (`power.assert`, async) | — : this user client holds a sleep assertion |
//! | 2   | `allow_sleep`   | —  | — : this user client's assertion, if any, is released |

use portcullis_proto::Status;

use crate::driver::{MethodSpec, SizeRange};

/// The power domain's selectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Selector {
    /// `get_state() -> (asleep, sleeps, assertions)`.
    GetState = 0,
    /// `prevent_sleep()`, privileged, asynchronous.
    PreventSleep = 1,
    /// `allow_sleep()`.
    AllowSleep = 2,
}

impl Selector {
    pub(super) fn from_u32(selector: u32) -> Option<Selector> {
        [Selector::GetState, Selector::PreventSleep, Selector::AllowSleep]
            .into_iter()
            .find(|s| *s as u32 == selector)
    }
}

const fn row(selector: Selector, name: &'static str, scalar_out: u8) -> MethodSpec {
    MethodSpec {
        selector: selector as u32,
        name,
        scalar_in: 0,
        scalar_names: &[],
        scalar_out,
        struct_in: SizeRange::NONE,
        struct_out: SizeRange::NONE,
        is_async: false,
        privilege: None,
        in_layout: None,
        out_layout: None,
        scalar_max: &[],
        statuses: &[],
    }
}

pub(super) const TABLE: [MethodSpec; 3] = [
    row(Selector::GetState, "get_state", 3),
    MethodSpec {
        is_async: true,
        privilege: Some("power.assert"),
        statuses: &[(
            Status::Unsupported,
            "the broker follows no logind, or logind refused its inhibitor (polkit: the broker's user needs org.freedesktop.login1.inhibit-block-sleep)",
        )],
        ..row(Selector::PreventSleep, "prevent_sleep", 0)
    },
    row(Selector::AllowSleep, "allow_sleep", 0),
];
