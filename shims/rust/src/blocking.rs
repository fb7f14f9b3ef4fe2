//! The same API without async: each call blocks the calling thread. A small private runtime
//! (one worker thread) keeps the connection serviced between calls.

use std::{path::Path, sync::Arc};

use portcullis_proto::pb;
use tokio::runtime::Runtime;

use crate::{CallOutput, ClientError, UserClient};

fn runtime() -> Result<Arc<Runtime>, ClientError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("portcullis-client")
        .enable_all()
        .build()
        .map(Arc::new)
        .map_err(|e| ClientError::Protocol(format!("cannot start the client runtime: {e}")))
}

/// A blocking connection to a broker.
#[derive(Debug)]
pub struct Client {
    runtime: Arc<Runtime>,
    inner: crate::Client,
}

impl Client {
    /// Connects to the broker serving `run_dir`.
    pub fn connect(run_dir: impl AsRef<Path>) -> Result<Client, ClientError> {
        let runtime = runtime()?;
        let inner = runtime.block_on(crate::Client::connect(run_dir))?;
        Ok(Client { runtime, inner })
    }

    /// The services matching the dictionary that this task may see.
    pub fn list_services(&self, matching: pb::Matching) -> Result<Vec<pb::ServiceInfo>, ClientError> {
        self.runtime.block_on(self.inner.list_services(matching))
    }

    /// Starts a session.
    pub fn session(&self) -> Result<Session, ClientError> {
        let inner = self.runtime.block_on(self.inner.session())?;
        Ok(Session {
            runtime: self.runtime.clone(),
            inner,
        })
    }
}

/// A blocking session; see [`crate::Session`].
#[derive(Debug)]
pub struct Session {
    runtime: Arc<Runtime>,
    inner: crate::Session,
}

impl Session {
    /// See [`crate::Session::find_services`].
    pub fn find_services(&self, matching: pb::Matching) -> Result<Vec<pb::ServiceInfo>, ClientError> {
        self.runtime.block_on(self.inner.find_services(matching))
    }

    /// See [`crate::Session::find_one`].
    pub fn find_one(&self, matching: pb::Matching) -> Result<pb::ServiceInfo, ClientError> {
        self.runtime.block_on(self.inner.find_one(matching))
    }

    /// See [`crate::Session::open`].
    pub fn open(&self, service_id: u64, mode: pb::OpenMode) -> Result<UserClient, ClientError> {
        self.runtime.block_on(self.inner.open(service_id, mode))
    }

    /// See [`crate::Session::close`].
    pub fn close(&self, user_client: &UserClient) -> Result<(), ClientError> {
        self.runtime.block_on(self.inner.close(user_client))
    }

    /// See [`crate::Session::call`].
    pub fn call(
        &self,
        handle: u64,
        selector: u32,
        scalars: &[u64],
        struct_in: &[u8],
        struct_out_len: u32,
    ) -> Result<CallOutput, ClientError> {
        self.runtime
            .block_on(self.inner.call(handle, selector, scalars, struct_in, struct_out_len))
    }

    /// See [`crate::Session::call_named`].
    pub fn call_named(
        &self,
        user_client: &UserClient,
        name: &str,
        scalars: &[u64],
        struct_in: &[u8],
    ) -> Result<CallOutput, ClientError> {
        self.runtime
            .block_on(self.inner.call_named(user_client, name, scalars, struct_in))
    }

    /// See [`crate::Session::watch_matching`].
    pub fn watch_matching(&self, matching: pb::Matching) -> Result<Vec<pb::ServiceInfo>, ClientError> {
        self.runtime.block_on(self.inner.watch_matching(matching))
    }

    /// See [`crate::Session::subscribe`].
    pub fn subscribe(&self, service_ids: &[u64]) -> Result<(), ClientError> {
        self.runtime.block_on(self.inner.subscribe(service_ids))
    }

    /// See [`crate::Session::next_event`].
    pub fn next_event(&self) -> Option<pb::Event> {
        self.runtime.block_on(self.inner.next_event())
    }
}
