//! The status codes of every Portcullis transport.
//!
//! The numbers are part of the wire contract: they are the same in gRPC responses, native
//! frames and the C API (`PC_*` error codes), and they never change. New codes take new numbers.

use std::fmt;

/// Outcome of a request, as every transport reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u32)]
pub enum Status {
    /// The request succeeded.
    Success = 0,
    /// An argument is malformed: unknown selector, wrong scalar count, struct size out of bounds,
    /// or a value the method does not accept.
    BadArgument = 1,
    /// Policy refused the task, the method, the open mode or a privilege.
    NotPrivileged = 2,
    /// The service is held open exclusively by another user client, or is open and an exclusive
    /// open was asked for.
    ExclusiveAccess = 3,
    /// No such service, or the service has terminated.
    NoDevice = 4,
    /// The request or protocol feature is not supported.
    Unsupported = 5,
    /// A resource limit was reached (open user clients, pending calls, memory).
    NoMemory = 6,
    /// An asynchronous operation did not complete in time.
    Timeout = 7,
    /// The operation was cancelled (user client closed, service terminated, broker stopping).
    Aborted = 8,
    /// The grant's rate limit was exceeded.
    RateLimited = 9,
    /// The call ran, but an output does not fit and is withheld: a value the client's type
    /// cannot hold (narrowing would lose data), or a packet larger than the room given for it.
    Overflow = 10,
    /// The user client handle is not open in this session.
    NotOpen = 11,
    /// The client broke the protocol (bad frame, request before hello, unknown kind).
    ProtocolError = 12,
    /// The broker failed in a way the client did not cause.
    Internal = 13,
    /// The device, or this user client's open of it, does not allow writing (a read-only block
    /// device; a shared open of a device only an exclusive opener may write).
    NotWritable = 14,
    /// The devices are asleep (the machine is going to sleep, or sleeping) and did not wake
    /// within the broker's wait for wake (`[power] call_wait_ms`): the call did not run.
    Asleep = 15,
}

impl Status {
    /// Every status, in number order.
    pub const ALL: [Status; 16] = [
        Status::Success,
        Status::BadArgument,
        Status::NotPrivileged,
        Status::ExclusiveAccess,
        Status::NoDevice,
        Status::Unsupported,
        Status::NoMemory,
        Status::Timeout,
        Status::Aborted,
        Status::RateLimited,
        Status::Overflow,
        Status::NotOpen,
        Status::ProtocolError,
        Status::Internal,
        Status::NotWritable,
        Status::Asleep,
    ];

    /// The fixed wire number.
    pub const fn code(self) -> u32 {
        self as u32
    }

    /// The status with this wire number, if there is one.
    pub fn from_code(code: u32) -> Option<Status> {
        Status::ALL.into_iter().find(|s| s.code() == code)
    }

    /// Stable name in `UPPER_SNAKE` form, as in `portcullis.proto` and the C header.
    pub const fn name(self) -> &'static str {
        match self {
            Status::Success => "SUCCESS",
            Status::BadArgument => "BAD_ARGUMENT",
            Status::NotPrivileged => "NOT_PRIVILEGED",
            Status::ExclusiveAccess => "EXCLUSIVE_ACCESS",
            Status::NoDevice => "NO_DEVICE",
            Status::Unsupported => "UNSUPPORTED",
            Status::NoMemory => "NO_MEMORY",
            Status::Timeout => "TIMEOUT",
            Status::Aborted => "ABORTED",
            Status::RateLimited => "RATE_LIMITED",
            Status::Overflow => "OVERFLOW",
            Status::NotOpen => "NOT_OPEN",
            Status::ProtocolError => "PROTOCOL_ERROR",
            Status::Internal => "INTERNAL",
            Status::NotWritable => "NOT_WRITABLE",
            Status::Asleep => "ASLEEP",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl From<Status> for crate::pb::StatusCode {
    fn from(s: Status) -> Self {
        // Every Status has a proto twin with the same number (tested below).
        crate::pb::StatusCode::try_from(s.code() as i32).unwrap_or(crate::pb::StatusCode::Internal)
    }
}

impl TryFrom<i32> for Status {
    type Error = UnknownStatus;
    fn try_from(code: i32) -> Result<Self, UnknownStatus> {
        u32::try_from(code)
            .ok()
            .and_then(Status::from_code)
            .ok_or(UnknownStatus(code))
    }
}

/// A status number this build does not know (a newer peer, or a corrupted message).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown status code {0}")]
pub struct UnknownStatus(pub i32);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::StatusCode;

    #[test]
    fn status_numbers_are_fixed() {
        let fixed = [
            (Status::Success, 0),
            (Status::BadArgument, 1),
            (Status::NotPrivileged, 2),
            (Status::ExclusiveAccess, 3),
            (Status::NoDevice, 4),
            (Status::Unsupported, 5),
            (Status::NoMemory, 6),
            (Status::Timeout, 7),
            (Status::Aborted, 8),
            (Status::RateLimited, 9),
            (Status::Overflow, 10),
            (Status::NotOpen, 11),
            (Status::ProtocolError, 12),
            (Status::Internal, 13),
            (Status::NotWritable, 14),
            (Status::Asleep, 15),
        ];
        assert_eq!(fixed.len(), Status::ALL.len());
        for (status, code) in fixed {
            assert_eq!(status.code(), code, "{status}");
            assert_eq!(Status::from_code(code), Some(status));
        }
    }

    #[test]
    fn status_proto_twin_has_same_number_and_name() {
        for status in Status::ALL {
            let twin = StatusCode::from(status);
            assert_eq!(twin as i32 as u32, status.code());
            assert_eq!(twin.as_str_name(), status.name());
        }
    }

    #[test]
    fn status_unknown_code_is_refused() {
        assert_eq!(Status::try_from(16), Err(UnknownStatus(16)));
        assert_eq!(Status::try_from(-1), Err(UnknownStatus(-1)));
    }
}
