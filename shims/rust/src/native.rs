//! The native protocol (`SOCK_SEQPACKET`, postcard frames), for clients that want the shorter
//! path or declare a foreign struct ABI. Requests are sent one at a time; events that arrive
//! meanwhile are kept for [`NativeSession::take_events`].

use std::{os::fd::OwnedFd, path::Path};

use portcullis_proto::{
    Status,
    frame::{
        Body, ClientFrame, Event, Hello, MAX_FRAME, PROTOCOL_VERSION, Request, RequestFrame, ServerFrame,
        ServiceSummary, encode,
    },
    layout::AbiId,
};
use tokio_seqpacket::{UnixSeqpacket, ancillary::OwnedAncillaryMessage};

use crate::{CallOutput, ClientError, NATIVE_SOCKET};

/// One native session.
#[derive(Debug)]
pub struct NativeSession {
    conn: UnixSeqpacket,
    next_id: u64,
    buf: Vec<u8>,
    events: Vec<Event>,
    /// A descriptor that came with the last frame (memory mappings).
    fd: Option<OwnedFd>,
    /// The broker's own ABI, from its Welcome (`None` for a number this client does not know).
    broker_abi: Option<AbiId>,
}

/// Memory mapped from a driver: the descriptor to `mmap`, and what it is.
#[derive(Debug)]
pub struct MappedMemory {
    /// The descriptor (read-only unless `writable`).
    pub fd: OwnedFd,
    /// Memory type id.
    pub memory_type: u32,
    /// Size in bytes.
    pub size: u64,
    /// Whether the descriptor allows writing.
    pub writable: bool,
}

impl NativeSession {
    /// Connects to the broker serving `run_dir` and says `Hello` with `abi`.
    pub async fn connect(run_dir: impl AsRef<Path>, abi: AbiId) -> Result<NativeSession, ClientError> {
        let path = run_dir.as_ref().join(NATIVE_SOCKET);
        let conn = UnixSeqpacket::connect(&path)
            .await
            .map_err(|e| ClientError::unreachable(&path, &e))?;
        let mut session = NativeSession {
            conn,
            next_id: 1,
            buf: vec![0; MAX_FRAME + 1],
            events: Vec::new(),
            fd: None,
            broker_abi: None,
        };
        session
            .send(&ClientFrame::Hello(Hello {
                version: PROTOCOL_VERSION,
                abi: abi as u8,
            }))
            .await?;
        match session.receive().await? {
            ServerFrame::Welcome { abi, .. } => {
                session.broker_abi = AbiId::from_wire(abi);
                Ok(session)
            }
            other => Err(unexpected(other)),
        }
    }

    /// The broker's own ABI, from its Welcome: whether a value this client sends wraps or
    /// overflows on the way depends on it. `None` for a number this client does not know.
    pub fn broker_abi(&self) -> Option<AbiId> {
        self.broker_abi
    }

    async fn send(&self, frame: &ClientFrame) -> Result<(), ClientError> {
        let bytes = encode(frame).ok_or_else(|| ClientError::Protocol("frame too large".into()))?;
        self.conn
            .send(&bytes)
            .await
            .map(drop)
            .map_err(|_| ClientError::Disconnected)
    }

    async fn receive(&mut self) -> Result<ServerFrame, ClientError> {
        let mut space = [0u8; 64];
        let (info, ancillary) = self
            .conn
            .recv_with_ancillary(&mut self.buf, &mut space)
            .await
            .map_err(|_| ClientError::Disconnected)?;
        self.fd = None;
        for message in ancillary.into_messages() {
            if let OwnedAncillaryMessage::FileDescriptors(fds) = message {
                // One is expected; any others are closed as they drop.
                for fd in fds {
                    self.fd.get_or_insert(fd);
                }
            }
        }
        if info.bytes_read() == 0 {
            return Err(ClientError::Disconnected);
        }
        let bytes = self.buf.get(..info.bytes_read()).unwrap_or_default();
        match ServerFrame::decode(bytes).map_err(|e| ClientError::Protocol(e.to_string()))? {
            ServerFrame::Goodbye { status, reason } => Err(ClientError::Refused {
                status: Status::from_code(status).unwrap_or(Status::ProtocolError),
                message: format!("session closed by the broker: {reason}"),
                rule: None,
            }),
            frame => Ok(frame),
        }
    }

    /// Sends a request and waits for its response; a non-success status is an error.
    pub async fn request(&mut self, request: Request) -> Result<Body, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        self.send(&ClientFrame::Request(RequestFrame { id, request })).await?;
        loop {
            match self.receive().await? {
                ServerFrame::Response(r) if r.id == id => {
                    let status = Status::from_code(r.status)
                        .ok_or_else(|| ClientError::Protocol(format!("unknown status {}", r.status)))?;
                    ClientError::check_reply(status, r.message, r.rule)?;
                    return Ok(r.body);
                }
                ServerFrame::Event(e) => self.events.push(e),
                other => return Err(unexpected(other)),
            }
        }
    }

    /// Services with this name (or all, for an empty name) that the task may see.
    pub async fn find(&mut self, name: &str) -> Result<Vec<ServiceSummary>, ClientError> {
        match self
            .request(Request::FindServices {
                class: String::new(),
                name: name.to_string(),
            })
            .await?
        {
            Body::Found(services) => Ok(services),
            other => Err(ClientError::Protocol(format!("unexpected {other:?}"))),
        }
    }

    /// IOServiceAddMatchingNotification: from now on, `Published` and `Terminated` events for
    /// services of this class and name (empty matches any) whose text properties equal these,
    /// among those the task may see. Returns the matching services there are now.
    pub async fn watch_matching(
        &mut self,
        class: &str,
        name: &str,
        properties: &[(&str, &str)],
    ) -> Result<Vec<ServiceSummary>, ClientError> {
        let request = Request::WatchMatching {
            class: class.to_string(),
            name: name.to_string(),
            properties: properties
                .iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect(),
        };
        match self.request(request).await? {
            Body::Found(services) => Ok(services),
            other => Err(ClientError::Protocol(format!("unexpected {other:?}"))),
        }
    }

    /// Opens a user client; returns its handle.
    pub async fn open(&mut self, service: u64, exclusive: bool) -> Result<u64, ClientError> {
        match self.request(Request::Open { service, exclusive }).await? {
            Body::Opened { handle, .. } => Ok(handle),
            other => Err(ClientError::Protocol(format!("unexpected {other:?}"))),
        }
    }

    /// Calls a method; structs are in the ABI given at connect.
    pub async fn call(
        &mut self,
        handle: u64,
        selector: u32,
        scalars: &[u64],
        struct_in: &[u8],
        struct_out_len: u32,
    ) -> Result<CallOutput, ClientError> {
        let request = Request::Call {
            handle,
            selector,
            scalars: scalars.to_vec(),
            struct_in: struct_in.to_vec(),
            struct_out_len,
        };
        match self.request(request).await? {
            Body::Call { scalars, struct_out } => Ok(CallOutput { scalars, struct_out }),
            other => Err(ClientError::Protocol(format!("unexpected {other:?}"))),
        }
    }

    /// Maps a driver memory type (clientMemoryForType): returns the descriptor to `mmap`.
    pub async fn map_memory(&mut self, handle: u64, memory_type: u32) -> Result<MappedMemory, ClientError> {
        match self.request(Request::MapMemory { handle, memory_type }).await? {
            Body::Mapped {
                memory_type,
                size,
                writable,
            } => {
                let fd = self
                    .fd
                    .take()
                    .ok_or_else(|| ClientError::Protocol("a mapping without a descriptor".into()))?;
                Ok(MappedMemory {
                    fd,
                    memory_type,
                    size,
                    writable,
                })
            }
            other => Err(ClientError::Protocol(format!("unexpected {other:?}"))),
        }
    }

    /// Closes a user client.
    pub async fn close(&mut self, handle: u64) -> Result<(), ClientError> {
        self.request(Request::Close { handle }).await.map(drop)
    }

    /// Events received so far, oldest first.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }
}

fn unexpected(frame: ServerFrame) -> ClientError {
    ClientError::Protocol(format!("unexpected frame {frame:?}"))
}
