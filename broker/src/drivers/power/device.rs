//! The power domain's service: the state, and sleep assertions held as logind inhibitors.

use std::{
    collections::HashMap,
    os::fd::OwnedFd,
    sync::{Arc, LazyLock, Mutex, atomic::Ordering},
};

use portcullis_proto::Status;

use super::methods::{Selector, TABLE};
use crate::{
    driver::{
        CallArgs, CallContext, CallOutput, ClientKey, Completion, Driver, DriverError, DriverLive, Family, MethodSpec,
    },
    power::Power,
    registry::OpenMode,
};

/// The power domain family.
pub static FAMILY: LazyLock<Family> = LazyLock::new(|| Family::new("power", "PowerDomain", "", &TABLE, &[]));

/// The power domain's driver.
#[derive(Debug)]
pub struct PowerDomain {
    power: Arc<Power>,
    /// Each open user client, with its assertion's inhibitor when it holds one.
    clients: Arc<Mutex<HashMap<ClientKey, Option<OwnedFd>>>>,
}

impl PowerDomain {
    /// The driver of the broker's power domain.
    pub fn new(power: Arc<Power>) -> PowerDomain {
        PowerDomain {
            power,
            clients: Arc::default(),
        }
    }

    fn scalars(values: Vec<u64>) -> Completion {
        Completion::Ready(Ok(CallOutput {
            scalars: values,
            struct_out: vec![],
        }))
    }

    fn prevent_sleep(&self, client: ClientKey) -> Completion {
        let held = matches!(
            self.clients.lock().unwrap_or_else(|e| e.into_inner()).get(&client),
            Some(Some(_))
        );
        if held {
            return PowerDomain::scalars(vec![]);
        }
        let Some(logind) = self.power.logind().cloned() else {
            return Completion::Ready(Err(DriverError::new(
                Status::Unsupported,
                "the broker follows no logind here: there is no system sleep to prevent",
            )));
        };
        let (clients, assertions) = (self.clients.clone(), self.power.assertions().clone());
        Completion::Pending(Box::pin(async move {
            let why = format!("an app holds a power assertion (user client {})", client.0);
            let fd = logind
                .inhibit(true, "portcullis", &why)
                .await
                .map_err(|e| DriverError::new(Status::Unsupported, e.to_string()))?;
            let mut clients = clients.lock().unwrap_or_else(|e| e.into_inner());
            // A user client closed meanwhile is gone from the map: its inhibitor closes here.
            if let Some(slot @ None) = clients.get_mut(&client) {
                *slot = Some(fd);
                assertions.fetch_add(1, Ordering::Relaxed);
                tracing::info!(client = client.0, "a power assertion is held");
            }
            Ok(CallOutput::default())
        }))
    }

    fn release(&self, client: ClientKey, close: bool) {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        let held = if close {
            clients.remove(&client).flatten()
        } else {
            clients.get_mut(&client).and_then(Option::take)
        };
        if held.is_some() {
            self.power.assertions().fetch_sub(1, Ordering::Relaxed);
            tracing::info!(client = client.0, "a power assertion is released");
        }
    }
}

impl Driver for PowerDomain {
    fn family(&self) -> &'static Family {
        &FAMILY
    }

    fn call(&self, ctx: &CallContext<'_>, spec: &MethodSpec, _args: CallArgs) -> Completion {
        match Selector::from_u32(spec.selector) {
            Some(Selector::GetState) => {
                let status = self.power.status();
                PowerDomain::scalars(vec![u64::from(status.asleep), status.sleeps, status.assertions as u64])
            }
            Some(Selector::PreventSleep) => self.prevent_sleep(ctx.client),
            Some(Selector::AllowSleep) => {
                self.release(ctx.client, false);
                PowerDomain::scalars(vec![])
            }
            None => Completion::Ready(Err(DriverError::new(Status::Internal, "no such selector"))),
        }
    }

    fn opened(&self, client: ClientKey, _mode: OpenMode) -> Result<(), DriverError> {
        self.clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(client, None);
        Ok(())
    }

    fn closed(&self, client: ClientKey) {
        self.release(client, true);
    }

    fn live(&self) -> DriverLive {
        DriverLive {
            opens: self.clients.lock().unwrap_or_else(|e| e.into_inner()).len(),
            waiting: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(domain: &PowerDomain, selector: Selector) -> Completion {
        let notify = |_| {};
        let ctx = CallContext {
            service: crate::registry::ServiceId(2),
            client: ClientKey(7),
            mode: OpenMode::Shared,
            notify: &notify,
            memory: &[],
        };
        let (_, spec) = FAMILY.methods().get(selector as u32).unwrap();
        domain.call(&ctx, spec, CallArgs::default())
    }

    #[test]
    fn power_table_is_valid() {
        assert_eq!(FAMILY.methods().rows().len(), 3);
        assert_eq!(FAMILY.methods().get(1).unwrap().1.privilege, Some("power.assert"));
    }

    #[test]
    fn power_assertion_without_logind_is_unsupported_and_state_reads() {
        let domain = PowerDomain::new(Arc::default());
        domain.opened(ClientKey(7), OpenMode::Shared).unwrap();
        match call(&domain, Selector::PreventSleep) {
            Completion::Ready(Err(e)) => assert_eq!(e.status, Status::Unsupported, "{e}"),
            other => panic!("{other:?}"),
        }
        match call(&domain, Selector::GetState) {
            Completion::Ready(Ok(out)) => assert_eq!(out.scalars, vec![0, 0, 0]),
            other => panic!("{other:?}"),
        }
        assert_eq!(domain.live().opens, 1);
        domain.closed(ClientKey(7));
        assert_eq!(domain.live().opens, 0);
    }
}
