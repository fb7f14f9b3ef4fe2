//! One session: a bidirectional stream with requests matched to responses by id.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use portcullis_proto::{
    Status,
    pb::{self, broker_client::BrokerClient, client_message::Request, response::Result as R, server_message::Kind},
};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::ClientError;

/// Requests queued to the broker before `call` waits.
const REQUEST_QUEUE: usize = 256;
/// Events buffered for the application; past this, events are counted as lost.
const EVENT_QUEUE: usize = 1024;

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<pb::Response>>>>;

/// Why the broker ended the session, once it has said (its `Goodbye`).
type Farewell = Arc<Mutex<Option<(Status, String)>>>;

/// An open user client: the handle, its service and what the grant holds.
#[derive(Clone, Debug)]
pub struct UserClient {
    /// The broker's handle for it, unique in the session.
    pub handle: u64,
    /// The service, with its method table.
    pub service: pb::ServiceInfo,
    /// Privileges the grant holds.
    pub privileges: Vec<String>,
}

impl UserClient {
    /// The method table row named `name`.
    pub fn method(&self, name: &str) -> Option<&pb::MethodInfo> {
        self.service.methods.iter().find(|m| m.name == name)
    }
}

/// A method's results.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CallOutput {
    /// Scalar outputs.
    pub scalars: Vec<u64>,
    /// Struct output.
    pub struct_out: Vec<u8>,
}

/// One session with the broker. Dropping it ends the session; the broker then releases every
/// user client, open and pending call it held.
#[derive(Debug)]
pub struct Session {
    tx: mpsc::Sender<pb::ClientMessage>,
    pending: Pending,
    events: tokio::sync::Mutex<mpsc::Receiver<pb::Event>>,
    events_lost: Arc<AtomicU64>,
    next_id: AtomicU64,
    reader: tokio::task::JoinHandle<()>,
    farewell: Farewell,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Session {
    pub(crate) async fn start(mut grpc: BrokerClient<Channel>) -> Result<Session, ClientError> {
        let (tx, rx) = mpsc::channel(REQUEST_QUEUE);
        let mut inbound = grpc.session(ReceiverStream::new(rx)).await?.into_inner();
        let pending: Pending = Arc::default();
        let (event_tx, event_rx) = mpsc::channel(EVENT_QUEUE);
        let events_lost = Arc::new(AtomicU64::new(0));
        let farewell: Farewell = Arc::default();
        let reader = tokio::spawn({
            let pending = pending.clone();
            let events_lost = events_lost.clone();
            let farewell = farewell.clone();
            async move {
                while let Ok(Some(message)) = inbound.message().await {
                    match message.kind {
                        Some(Kind::Response(response)) => {
                            let waiter = pending
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .remove(&response.request_id);
                            if let Some(waiter) = waiter {
                                let _ = waiter.send(response);
                            }
                        }
                        Some(Kind::Event(event)) => {
                            if let Some(pb::event::Kind::Goodbye(bye)) = &event.kind {
                                let status = Status::try_from(bye.status).unwrap_or(Status::ProtocolError);
                                *farewell.lock().unwrap_or_else(|e| e.into_inner()) =
                                    Some((status, bye.reason.clone()));
                            }
                            let lost = event_tx.try_send(event).is_err();
                            events_lost.fetch_add(u64::from(lost), Ordering::Relaxed);
                        }
                        None => {}
                    }
                }
                // The stream ended: every waiter sees its sender dropped.
                pending.lock().unwrap_or_else(|e| e.into_inner()).clear();
            }
        });
        Ok(Session {
            tx,
            pending,
            events: tokio::sync::Mutex::new(event_rx),
            events_lost,
            next_id: AtomicU64::new(1),
            reader,
            farewell,
        })
    }

    /// The session has ended: why, when the broker said so.
    fn ended(&self) -> ClientError {
        match self.farewell.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            Some((status, reason)) => ClientError::Refused {
                status,
                message: format!("session closed by the broker: {reason}"),
                rule: None,
            },
            None => ClientError::Disconnected,
        }
    }

    /// Sends a request and waits for its response; a non-success status is an error.
    pub async fn request(&self, request: Request) -> Result<R, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (waiter, response) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, waiter);
        if self
            .tx
            .send(pb::ClientMessage {
                request_id: id,
                request: Some(request),
            })
            .await
            .is_err()
        {
            self.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
            return Err(self.ended());
        }
        let response = response.await.map_err(|_| self.ended())?;
        let status = Status::try_from(response.status).map_err(|e| ClientError::Protocol(e.to_string()))?;
        ClientError::check_reply(status, response.message, response.rule)?;
        response
            .result
            .ok_or_else(|| ClientError::Protocol("a successful response without a result".into()))
    }

    /// The services matching the dictionary that this task may see.
    pub async fn find_services(&self, matching: pb::Matching) -> Result<Vec<pb::ServiceInfo>, ClientError> {
        match self
            .request(Request::FindServices(pb::FindServices {
                matching: Some(matching),
            }))
            .await?
        {
            R::Found(found) => Ok(found.services),
            other => Err(unexpected(&other)),
        }
    }

    /// The one service matching the dictionary (the first, if several do).
    pub async fn find_one(&self, matching: pb::Matching) -> Result<pb::ServiceInfo, ClientError> {
        let description = format!("{matching:?}");
        self.find_services(matching)
            .await?
            .into_iter()
            .next()
            .ok_or(ClientError::NotFound(description))
    }

    /// Opens a user client on the service (admission by policy, then a shared or exclusive open).
    pub async fn open(&self, service_id: u64, mode: pb::OpenMode) -> Result<UserClient, ClientError> {
        match self
            .request(Request::OpenUserClient(pb::OpenUserClient {
                service_id,
                mode: mode.into(),
            }))
            .await?
        {
            R::Opened(opened) => Ok(UserClient {
                handle: opened.handle,
                service: opened
                    .service
                    .ok_or_else(|| ClientError::Protocol("open without a service".into()))?,
                privileges: opened.privileges,
            }),
            other => Err(unexpected(&other)),
        }
    }

    /// Closes a user client; its pending calls complete with `Aborted`.
    pub async fn close(&self, user_client: &UserClient) -> Result<(), ClientError> {
        self.request(Request::CloseUserClient(pb::CloseUserClient {
            handle: user_client.handle,
        }))
        .await
        .map(drop)
    }

    /// Calls a method by selector.
    pub async fn call(
        &self,
        handle: u64,
        selector: u32,
        scalars: &[u64],
        struct_in: &[u8],
        struct_out_len: u32,
    ) -> Result<CallOutput, ClientError> {
        let call = pb::CallMethod {
            handle,
            selector,
            scalars: scalars.to_vec(),
            struct_in: struct_in.to_vec(),
            struct_out_len,
        };
        match self.request(Request::Call(call)).await? {
            R::Call(out) => Ok(CallOutput {
                scalars: out.scalars,
                struct_out: out.struct_out,
            }),
            other => Err(unexpected(&other)),
        }
    }

    /// Calls a method by name, accepting as much struct output as the method table allows.
    pub async fn call_named(
        &self,
        user_client: &UserClient,
        name: &str,
        scalars: &[u64],
        struct_in: &[u8],
    ) -> Result<CallOutput, ClientError> {
        let method = user_client
            .method(name)
            .ok_or_else(|| ClientError::NotFound(format!("method {name} of {}", user_client.service.name)))?;
        let out_len = method.struct_out.as_ref().map_or(0, |r| r.max);
        self.call(user_client.handle, method.selector, scalars, struct_in, out_len)
            .await
    }

    /// Subscribes to interest notifications for these services (all visible ones when empty).
    pub async fn subscribe(&self, service_ids: &[u64]) -> Result<(), ClientError> {
        self.request(Request::Subscribe(pb::Subscribe {
            service_ids: service_ids.to_vec(),
        }))
        .await
        .map(drop)
    }

    /// IOServiceAddMatchingNotification: from now on, a `published` event for every service
    /// matching the dictionary that this task may see, and a `terminated` event when it goes.
    /// Returns the matching services there are now, so that a device plugged in meanwhile is
    /// never missed: wait for a device with this, then [`Session::next_event`].
    pub async fn watch_matching(&self, matching: pb::Matching) -> Result<Vec<pb::ServiceInfo>, ClientError> {
        match self
            .request(Request::WatchMatching(pb::WatchMatching {
                matching: Some(matching),
            }))
            .await?
        {
            R::Found(found) => Ok(found.services),
            other => Err(unexpected(&other)),
        }
    }

    /// The next event, or `None` once the session has ended.
    pub async fn next_event(&self) -> Option<pb::Event> {
        self.events.lock().await.recv().await
    }

    /// Events dropped because the application did not take them fast enough.
    pub fn events_lost(&self) -> u64 {
        self.events_lost.load(Ordering::Relaxed)
    }
}

fn unexpected(result: &R) -> ClientError {
    ClientError::Protocol(format!("unexpected result {result:?}"))
}
