//! The fault device: it panics on request.

use std::sync::LazyLock;

use crate::driver::{CallArgs, CallContext, CallOutput, Completion, Driver, Family, MethodSpec};

use super::methods::{OK, PANIC, PANIC_LATER, TABLE};

/// The fault family.
pub static FAMILY: LazyLock<Family> = LazyLock::new(|| Family::new("fault", "FaultDevice", "", &TABLE, &[]));

/// One fault device.
#[derive(Debug, Default)]
pub struct FaultDevice;

impl Driver for FaultDevice {
    fn family(&self) -> &'static Family {
        &FAMILY
    }

    fn call(&self, _ctx: &CallContext<'_>, spec: &MethodSpec, _args: CallArgs) -> Completion {
        match spec.selector {
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
