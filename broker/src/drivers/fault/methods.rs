//! The fault device's method table:
//!
//! | sel | name          | in | out | does |
//! |-----|---------------|----|-----|------|
//! | 0   | `ok`          | —  | 1   | answers 1 |
//! | 1   | `panic`       | —  | —   | panics while the broker calls it |
//! | 2   | `panic_later` | —  | —   | asynchronous: panics when its completion is next polled |

use crate::driver::{MethodSpec, SizeRange};

const fn row(selector: u32, name: &'static str, scalar_out: u8, is_async: bool) -> MethodSpec {
    MethodSpec {
        selector,
        name,
        scalar_in: 0,
        scalar_names: &[],
        scalar_out,
        struct_in: SizeRange::NONE,
        struct_out: SizeRange::NONE,
        is_async,
        privilege: None,
        in_layout: None,
        out_layout: None,
        scalar_max: &[],
        statuses: &[],
    }
}

/// Selector of `ok`.
pub const OK: u32 = 0;
/// Selector of `panic`.
pub const PANIC: u32 = 1;
/// Selector of `panic_later`.
pub const PANIC_LATER: u32 = 2;

pub(super) const TABLE: [MethodSpec; 3] = [
    row(OK, "ok", 1, false),
    row(PANIC, "panic", 0, false),
    row(PANIC_LATER, "panic_later", 0, true),
];
