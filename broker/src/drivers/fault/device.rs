//! The fault device: it panics on request.

use std::sync::LazyLock;

use crate::driver::{CallArgs, CallContext, CallOutput, Completion, Driver, Family, MethodSpec};

use super::methods::{FORBIDDEN, HELPER_FORBIDDEN, OK, PANIC, PANIC_LATER, TABLE};

/// The fault family.
pub static FAMILY: LazyLock<Family> = LazyLock::new(|| Family::new("fault", "FaultDevice", "", &TABLE, &[]));

/// One fault device.
#[derive(Debug, Default)]
pub struct FaultDevice {
    /// Leak a descriptor at every open (property `leak_on_open = true`): the leak `portcullis
    /// qualify` must find.
    leak_on_open: bool,
}

impl FaultDevice {
    /// A fault device; one that leaks a descriptor at every open when `leak_on_open`.
    pub fn new(leak_on_open: bool) -> FaultDevice {
        FaultDevice { leak_on_open }
    }
}

impl Driver for FaultDevice {
    fn family(&self) -> &'static Family {
        &FAMILY
    }

    fn opened(
        &self,
        _client: crate::driver::ClientKey,
        _mode: crate::registry::OpenMode,
    ) -> Result<(), crate::driver::DriverError> {
        if self.leak_on_open
            && let Ok(fd) = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC)
        {
            // The bug on purpose: the descriptor is never closed.
            std::mem::forget(fd);
        }
        Ok(())
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
