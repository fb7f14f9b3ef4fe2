//! The one typed command set every transport speaks to the session core. A transport decodes
//! its wire format into a [`Command`], hands it to [`Session::execute`], and encodes the
//! [`Reply`] (now, or when an asynchronous method completes).

use std::{fmt, future::Future, os::fd::OwnedFd, pin::Pin, sync::Arc};

use super::{CallStarted, Refusal, Session};
use crate::{
    driver::{CallOutput, MemoryType},
    registry::{Matching, OpenMode, Service, ServiceId},
};

/// A request, whatever transport carried it.
#[derive(Clone, Debug)]
pub enum Command {
    /// IOServiceGetMatchingServices.
    FindServices(Matching),
    /// IOServiceOpen.
    Open {
        /// The service.
        service: ServiceId,
        /// Shared or exclusive.
        mode: OpenMode,
    },
    /// IOServiceClose.
    Close {
        /// The user client.
        handle: u64,
    },
    /// IOConnectCallMethod.
    Call {
        /// The user client.
        handle: u64,
        /// The method.
        selector: u32,
        /// Scalar inputs.
        scalars: Vec<u64>,
        /// Struct input, in the session's ABI.
        struct_in: Vec<u8>,
        /// Most struct output bytes the client accepts.
        struct_out_len: u32,
    },
    /// Interest notifications for these services (all visible ones when empty).
    Subscribe(Vec<ServiceId>),
    /// IOServiceAddMatchingNotification: publications and terminations of services matching
    /// the dictionary; replies with the matching services there are now.
    WatchMatching(Matching),
    /// clientMemoryForType: a descriptor for a memory type (transports that can pass one).
    MapMemory {
        /// The user client.
        handle: u64,
        /// The memory type.
        memory_type: u32,
    },
}

/// A command's result.
#[derive(Debug)]
pub enum Reply {
    /// Matching services the task may see.
    Found(Vec<Arc<Service>>),
    /// A user client was opened.
    Opened {
        /// Its handle.
        handle: u64,
        /// Its service.
        service: Arc<Service>,
        /// Privileges its grant holds.
        privileges: Vec<String>,
    },
    /// A method's outputs, in the session's ABI.
    Called(CallOutput),
    /// Done, nothing to return.
    Done,
    /// Memory to map: the descriptor travels beside the reply.
    Mapped {
        /// The client's descriptor.
        fd: OwnedFd,
        /// The type.
        memory_type: MemoryType,
    },
}

/// A command's outcome: now, or later for asynchronous methods.
pub enum Started {
    /// Complete.
    Now(Result<Reply, Refusal>),
    /// Completes with the future (which ends with `Aborted` if its user client goes away).
    Later(Pin<Box<dyn Future<Output = Result<Reply, Refusal>> + Send>>),
}

impl fmt::Debug for Started {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Started::Now(r) => f.debug_tuple("Now").field(r).finish(),
            Started::Later(_) => f.write_str("Later(..)"),
        }
    }
}

impl Session {
    /// Executes one command.
    pub fn execute(&mut self, command: Command) -> Started {
        self.touch();
        if let Some(ended) = self.end_reason() {
            return Started::Now(Err(ended.clone()));
        }
        let now = match command {
            Command::FindServices(matching) => Ok(Reply::Found(self.find_services(&matching))),
            Command::Open { service, mode } => {
                self.open_user_client(service, mode)
                    .map(|(handle, service, privileges)| Reply::Opened {
                        handle,
                        service,
                        privileges,
                    })
            }
            Command::Close { handle } => self.close_user_client(handle).map(|()| Reply::Done),
            Command::Subscribe(services) => self.subscribe(&services).map(|()| Reply::Done),
            Command::WatchMatching(matching) => self.watch_matching(matching).map(Reply::Found),
            Command::MapMemory { handle, memory_type } => self
                .map_memory(handle, memory_type)
                .map(|(fd, memory_type)| Reply::Mapped { fd, memory_type }),
            Command::Call {
                handle,
                selector,
                scalars,
                struct_in,
                struct_out_len,
            } => match self.call(handle, selector, scalars, struct_in, struct_out_len) {
                Ok(CallStarted::Ready(out)) => Ok(Reply::Called(out)),
                Ok(CallStarted::Pending(future)) => {
                    return Started::Later(Box::pin(async move { future.await.map(Reply::Called) }));
                }
                Err(refusal) => Err(refusal),
            },
        };
        Started::Now(now)
    }
}
