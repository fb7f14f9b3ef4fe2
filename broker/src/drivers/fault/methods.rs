//! The fault device's method table:
//!
//! | sel | name          | in | out | does |
//! |-----|---------------|----|-----|------|
//! | 0   | `ok`          | —  | 1   | answers 1 |
//! | 1   | `panic`       | —  | —   | panics while the broker calls it |
//! | 2   | `panic_later` | —  | —   | asynchronous: panics when its completion is next polled |
//! | 3   | `forbidden`   | 1  | 1   | makes forbidden system call `call` (0 `execve`, 1 `ptrace`, 2 `mount`, 3 `socket(AF_INET)`) on a runtime thread; answers its errno (0: allowed) |
//! | 4   | `helper_forbidden` | 1 | 1 | has the privileged helper make it; answers its errno (0: allowed; -1 without a helper) |

use crate::driver::{MethodSpec, SizeRange};

const fn row(selector: u32, name: &'static str, scalar_out: u8, is_async: bool) -> MethodSpec {
    MethodSpec {
        selector,
        name,
        scalar_in: if selector >= FORBIDDEN { 1 } else { 0 },
        scalar_names: if selector >= FORBIDDEN { &["call"] } else { &[] },
        scalar_out,
        struct_in: SizeRange::NONE,
        struct_out: SizeRange::NONE,
        is_async,
        privilege: None,
        in_layout: None,
        out_layout: None,
        scalar_max: if selector >= FORBIDDEN { &[("call", 3)] } else { &[] },
        statuses: &[],
    }
}

/// Selector of `ok`.
pub const OK: u32 = 0;
/// Selector of `panic`.
pub const PANIC: u32 = 1;
/// Selector of `panic_later`.
pub const PANIC_LATER: u32 = 2;

/// Selector of `forbidden`.
pub const FORBIDDEN: u32 = 3;
/// Selector of `helper_forbidden`.
pub const HELPER_FORBIDDEN: u32 = 4;

pub(super) const TABLE: [MethodSpec; 5] = [
    row(OK, "ok", 1, false),
    row(PANIC, "panic", 0, false),
    row(PANIC_LATER, "panic_later", 0, true),
    row(FORBIDDEN, "forbidden", 1, false),
    row(HELPER_FORBIDDEN, "helper_forbidden", 1, false),
];
