//! Open arbitration: many shared opens, or exactly one exclusive open (IOService::open with
//! kIOServiceExclusive). An [`OpenGuard`] releases its open when dropped, so whatever drops a
//! user client — close, disconnect, crash — releases the service.

use std::sync::{Arc, Mutex};

use portcullis_proto::Status;

use super::Service;

/// How a user client holds its service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenMode {
    /// Alongside other shared opens.
    Shared,
    /// Alone.
    Exclusive,
}

#[derive(Debug, Default)]
struct State {
    shared: usize,
    exclusive: bool,
}

/// The open state of one service.
#[derive(Debug, Default)]
pub(super) struct Arbitration {
    state: Mutex<State>,
}

/// One open of one service; dropping it releases the open.
#[derive(Debug)]
pub struct OpenGuard {
    service: Arc<Service>,
    mode: OpenMode,
}

impl OpenGuard {
    /// Opens the service, or refuses with [`Status::ExclusiveAccess`] when an exclusive open is
    /// held, when an exclusive open is asked for while any open is held, or when `limit` opens
    /// (of any mode: a serial port's one) are held already.
    pub fn acquire(service: &Arc<Service>, mode: OpenMode, limit: Option<usize>) -> Result<OpenGuard, Status> {
        let mut state = service.arbitration.state.lock().unwrap_or_else(|e| e.into_inner());
        let held = state.shared + usize::from(state.exclusive);
        let busy = state.exclusive
            || (mode == OpenMode::Exclusive && state.shared > 0)
            || limit.is_some_and(|limit| held >= limit);
        if busy {
            return Err(Status::ExclusiveAccess);
        }
        match mode {
            OpenMode::Shared => state.shared += 1,
            OpenMode::Exclusive => state.exclusive = true,
        }
        Ok(OpenGuard {
            service: service.clone(),
            mode,
        })
    }

    /// The service held open.
    pub fn service(&self) -> &Arc<Service> {
        &self.service
    }

    /// The mode it is held in.
    pub fn mode(&self) -> OpenMode {
        self.mode
    }
}

impl Arbitration {
    /// Opens held: shared ones, plus one for an exclusive open.
    pub(super) fn held(&self) -> usize {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.shared + usize::from(state.exclusive)
    }

    /// Whether an exclusive open is held.
    pub(super) fn exclusive(&self) -> bool {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).exclusive
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        let mut state = self.service.arbitration.state.lock().unwrap_or_else(|e| e.into_inner());
        match self.mode {
            OpenMode::Shared => state.shared = state.shared.saturating_sub(1),
            OpenMode::Exclusive => state.exclusive = false,
        }
    }
}

#[cfg(test)]
mod tests {
    use portcullis_proto::property::Properties;

    use super::*;
    use crate::registry::Registry;

    fn service() -> Arc<Service> {
        let r = Registry::new();
        r.publish(Some(r.root()), "dev", "Thing", Properties::new(), None)
            .unwrap()
    }

    #[test]
    fn open_second_exclusive_is_refused_until_first_drops() {
        let s = service();
        let first = OpenGuard::acquire(&s, OpenMode::Exclusive, None).unwrap();
        assert_eq!(
            OpenGuard::acquire(&s, OpenMode::Exclusive, None).unwrap_err(),
            Status::ExclusiveAccess
        );
        assert_eq!(
            OpenGuard::acquire(&s, OpenMode::Shared, None).unwrap_err(),
            Status::ExclusiveAccess
        );
        drop(first);
        assert!(OpenGuard::acquire(&s, OpenMode::Exclusive, None).is_ok());
    }

    #[test]
    fn open_exclusive_refused_while_shared_held() {
        let s = service();
        let a = OpenGuard::acquire(&s, OpenMode::Shared, None).unwrap();
        let b = OpenGuard::acquire(&s, OpenMode::Shared, None).unwrap();
        assert_eq!(
            OpenGuard::acquire(&s, OpenMode::Exclusive, None).unwrap_err(),
            Status::ExclusiveAccess
        );
        drop(a);
        assert_eq!(
            OpenGuard::acquire(&s, OpenMode::Exclusive, None).unwrap_err(),
            Status::ExclusiveAccess
        );
        drop(b);
        assert!(OpenGuard::acquire(&s, OpenMode::Exclusive, None).is_ok());
    }

    #[test]
    fn open_limit_counts_every_mode() {
        let s = service();
        let one = OpenGuard::acquire(&s, OpenMode::Shared, Some(1)).unwrap();
        assert_eq!(
            OpenGuard::acquire(&s, OpenMode::Shared, Some(1)).unwrap_err(),
            Status::ExclusiveAccess,
            "a device that serves one user client at a time"
        );
        drop(one);
        assert!(OpenGuard::acquire(&s, OpenMode::Shared, Some(1)).is_ok());
    }
}
