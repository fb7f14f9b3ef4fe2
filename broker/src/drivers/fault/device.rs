//! The fault device: it panics on request.

use std::sync::LazyLock;

use crate::driver::{CallArgs, CallContext, CallOutput, Completion, Driver, Family, MethodSpec};

use super::methods::{FORBIDDEN, HELPER_FORBIDDEN, OK, PANIC, PANIC_LATER, TABLE};

/// The fault family.
pub static FAMILY: LazyLock<Family> = LazyLock::new(|| Family::new("fault", "FaultDevice", "", &TABLE, &[]));

/// One fault device.
#[derive(Debug, Default)]
pub struct FaultDevice;

impl Driver for FaultDevice {
    fn family(&self) -> &'static Family {
        &FAMILY
    }

    fn call(&self, _ctx: &CallContext<'_>, spec: &MethodSpec, args: CallArgs) -> Completion {
        use crate::sandbox::protocol::Forbidden;
        let call = match args.scalars.first() {
            Some(0) => Some(Forbidden::Execve),
            Some(1) => Some(Forbidden::Ptrace),
            Some(2) => Some(Forbidden::Mount),
            Some(3) => Some(Forbidden::SocketInet),
            _ => None,
        };
        let answer = |errno: i32| {
            Completion::Ready(Ok(CallOutput {
                scalars: vec![errno as u64],
                struct_out: vec![],
            }))
        };
        match spec.selector {
            FORBIDDEN => answer(crate::sandbox::make_forbidden(call.unwrap_or(Forbidden::Ptrace))),
            // The gate keeps `call` within 0..=3 (`scalar_max`).
            HELPER_FORBIDDEN => {
                answer(crate::sandbox::helper_forbidden(call.unwrap_or(Forbidden::Ptrace)).unwrap_or(-1))
            }
            OK => Completion::Ready(Ok(CallOutput {
                scalars: vec![1],
                struct_out: vec![],
            })),
            PANIC => panic!("the fault device panics on request"),
            PANIC_LATER => Completion::Pending(Box::pin(async {
                tokio::task::yield_now().await;
                panic!("the fault device panics on request, later")
            })),
            other => panic!("the fault device has no selector {other}"),
        }
    }
}
