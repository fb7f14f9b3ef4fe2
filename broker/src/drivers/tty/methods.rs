//! The tty family's method table (docs/drivers/tty.md):
//!
//! | sel | name         | in                              | out                  |
//! |-----|--------------|---------------------------------|----------------------|
//! | 0   | `get_line`   | —                               | struct `tty_line`    |
//! | 1   | `set_line`   | struct `tty_line`               | —                    |
//! | 2   | `write`      | timeout_ms; bytes (0–4096)      | bytes written (async)|
//! | 3   | `read`       | max_len (1–4096), timeout_ms    | bytes (async)        |
//! | 4   | `get_modem`  | —                               | modem line bits      |
//! | 5   | `set_modem`  | bits, mask (DTR, RTS)           | —                    |
//! | 6   | `flush`      | queue: 0 input, 1 output, 2 both| —                    |
//! | 7   | `drain`      | timeout_ms (async)              | —                    |
//! | 8   | `send_break` | duration_ms (async; `tty.break`)| —                    |
//!
//! One user client at a time (as serial ports are on every OS); the line settings it changed are
//! restored when it closes.

use portcullis_proto::Status;

use crate::driver::{MethodSpec, SizeRange};

/// The struct descriptions.
pub const LAYOUTS: &str = include_str!("layout.toml");

/// Most bytes one `write` takes or one `read` returns.
pub const IO_MAX: u32 = 4096;

/// Longest timeout any method accepts (10 minutes).
pub const MAX_TIMEOUT_MS: u64 = 600_000;

/// Longest break (10 s).
pub const MAX_BREAK_MS: u64 = 10_000;

/// Modem line bits of `get_modem` and `set_modem`.
pub mod modem {
    /// Data Terminal Ready (settable).
    pub const DTR: u64 = 1;
    /// Request To Send (settable).
    pub const RTS: u64 = 2;
    /// Clear To Send.
    pub const CTS: u64 = 4;
    /// Data Set Ready.
    pub const DSR: u64 = 8;
    /// Data Carrier Detect.
    pub const DCD: u64 = 16;
    /// Ring Indicator.
    pub const RI: u64 = 32;
}

/// The tty family's selectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Selector {
    /// `get_line() -> tty_line`.
    GetLine = 0,
    /// `set_line(tty_line)`.
    SetLine = 1,
    /// `write(timeout_ms; bytes) -> written` (async).
    Write = 2,
    /// `read(max_len, timeout_ms) -> bytes` (async).
    Read = 3,
    /// `get_modem() -> bits`.
    GetModem = 4,
    /// `set_modem(bits, mask)`.
    SetModem = 5,
    /// `flush(queue)`.
    Flush = 6,
    /// `drain(timeout_ms)` (async).
    Drain = 7,
    /// `send_break(duration_ms)` (async, privileged).
    SendBreak = 8,
}

impl Selector {
    pub(super) fn from_u32(selector: u32) -> Option<Selector> {
        [
            Selector::GetLine,
            Selector::SetLine,
            Selector::Write,
            Selector::Read,
            Selector::GetModem,
            Selector::SetModem,
            Selector::Flush,
            Selector::Drain,
            Selector::SendBreak,
        ]
        .into_iter()
        .find(|s| *s as u32 == selector)
    }
}

const fn row(
    selector: Selector,
    name: &'static str,
    scalar_names: &'static [&'static str],
    scalar_out: u8,
) -> MethodSpec {
    MethodSpec {
        selector: selector as u32,
        name,
        scalar_in: scalar_names.len() as u8,
        scalar_names,
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

pub(super) const TABLE: [MethodSpec; 9] = [
    MethodSpec {
        out_layout: Some("tty_line"),
        ..row(Selector::GetLine, "get_line", &[], 0)
    },
    MethodSpec {
        in_layout: Some("tty_line"),
        statuses: &[
            (Status::BadArgument, "a field out of range"),
            (
                Status::Unsupported,
                "the device cannot take these settings (a pty is always 8 data bits, no parity); nothing changed",
            ),
        ],
        ..row(Selector::SetLine, "set_line", &[], 0)
    },
    MethodSpec {
        struct_in: SizeRange::between(0, IO_MAX),
        is_async: true,
        scalar_max: &[("timeout_ms", MAX_TIMEOUT_MS)],
        statuses: &[
            (
                Status::Timeout,
                "the device took nothing before timeout_ms (a part is SUCCESS with the count written)",
            ),
            (Status::NoDevice, "the tty hung up"),
        ],
        ..row(Selector::Write, "write", &["timeout_ms"], 1)
    },
    MethodSpec {
        struct_out: SizeRange::between(0, IO_MAX),
        is_async: true,
        scalar_max: &[("max_len", IO_MAX as u64), ("timeout_ms", MAX_TIMEOUT_MS)],
        statuses: &[
            (Status::BadArgument, "max_len is 0 or more than the output room"),
            (Status::Timeout, "no bytes arrived before timeout_ms"),
            (Status::NoDevice, "the tty hung up"),
        ],
        ..row(Selector::Read, "read", &["max_len", "timeout_ms"], 0)
    },
    MethodSpec {
        statuses: &[(Status::Unsupported, "the device has no modem lines (a pty)")],
        ..row(Selector::GetModem, "get_modem", &[], 1)
    },
    MethodSpec {
        statuses: &[
            (Status::BadArgument, "mask has a line other than DTR (1) and RTS (2)"),
            (Status::Unsupported, "the device has no modem lines (a pty)"),
        ],
        ..row(Selector::SetModem, "set_modem", &["bits", "mask"], 0)
    },
    MethodSpec {
        statuses: &[(Status::BadArgument, "queue is not 0 (input), 1 (output) or 2 (both)")],
        ..row(Selector::Flush, "flush", &["queue"], 0)
    },
    MethodSpec {
        is_async: true,
        scalar_max: &[("timeout_ms", MAX_TIMEOUT_MS)],
        statuses: &[(Status::Timeout, "bytes were still queued at timeout_ms")],
        ..row(Selector::Drain, "drain", &["timeout_ms"], 0)
    },
    MethodSpec {
        is_async: true,
        privilege: Some("tty.break"),
        scalar_max: &[("duration_ms", MAX_BREAK_MS)],
        statuses: &[(Status::BadArgument, "duration_ms is 0")],
        ..row(Selector::SendBreak, "send_break", &["duration_ms"], 0)
    },
];
