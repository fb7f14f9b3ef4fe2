//! The native protocol upgraded to the shared-memory ring: calls and completions travel
//! through shared memory and the kernel is entered only to sleep and wake. Blocking, for
//! threads that call a device thousands of times a second; one [`RingClient`] per thread.
//!
//! ```no_run
//! # fn demo() -> Result<(), portcullis_client::ClientError> {
//! use portcullis_client::ring::{RingClient, RingOptions};
//!
//! let mut ring = RingClient::connect(portcullis_client::default_run_dir(), RingOptions::default())?;
//! let sample = ring.find("sample0")?.first().map(|s| s.id).unwrap_or_default();
//! let handle = ring.open(sample, false)?;
//! // Pipelined: submit many, then collect (completions may come in any order).
//! let ids: Vec<u64> = (0..64).map(|i| ring.submit_call(handle, 0, &[i, 1], &[], 0)).collect::<Result<_, _>>()?;
//! ring.flush()?;
//! for _ in &ids {
//!     let response = ring.next_response()?;
//!     assert_eq!(response.status, 0);
//! }
//! # Ok(()) }
//! ```

use std::{
    collections::HashMap,
    io::{IoSlice, IoSliceMut},
    mem::MaybeUninit,
    os::fd::{AsFd, OwnedFd},
    path::Path,
    time::{Duration, Instant},
};

use portcullis_proto::{
    Status,
    frame::{
        Body, ClientFrame, Event, Hello, MAX_FRAME, PROTOCOL_VERSION, Request, RequestFrame, ResponseFrame,
        ServerFrame, ServiceSummary, encode, encode_to,
    },
    layout::AbiId,
    ring::{RingSize, WaitMode},
};
use portcullis_ring::{Consumer, Mapping, Producer, wake};
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer, SendFlags,
    SocketAddrUnix, SocketType,
};

use crate::{CallOutput, ClientError, NATIVE_SOCKET, native::MappedMemory};

/// How the ring is asked for and how this client waits.
#[derive(Clone, Copy, Debug)]
pub struct RingOptions {
    /// The struct ABI the client declares.
    pub abi: AbiId,
    /// Submission ring bytes (0: the broker's default).
    pub sq_size: u32,
    /// Completion ring bytes (0: the broker's default).
    pub cq_size: u32,
    /// How this client waits for completions.
    pub wait: WaitMode,
    /// How long an adaptive wait spins before it sleeps.
    pub spin: Duration,
}

impl Default for RingOptions {
    fn default() -> RingOptions {
        RingOptions {
            abi: AbiId::native(),
            sq_size: 0,
            cq_size: 0,
            wait: WaitMode::Adaptive,
            spin: Duration::from_micros(50),
        }
    }
}

/// A native session served through a shared-memory ring. The socket stays open beside the
/// ring: closing it (or this process dying) ends the session and releases everything.
#[derive(Debug)]
pub struct RingClient {
    sock: OwnedFd,
    memfd: OwnedFd,
    map: Mapping,
    sq: Producer,
    cq: Consumer,
    to_broker: OwnedFd,
    /// The descriptor the broker's rings make readable (this client's end of the doorbell
    /// pair); drained before each sleep.
    doorbell: OwnedFd,
    /// Sleeps on the doorbell (edge-triggered) and the socket.
    waiter: wake::Waiter,
    options: RingOptions,
    next_id: u64,
    unflushed: bool,
    parked: HashMap<u64, ResponseFrame>,
    events: Vec<Event>,
    record: Vec<u8>,
    buf: Vec<u8>,
    /// Where requests are encoded before they go to the ring.
    scratch: Box<[u8]>,
    /// The broker's own ABI, from its Welcome.
    broker_abi: Option<AbiId>,
}

fn io_err(e: impl std::fmt::Display) -> ClientError {
    ClientError::Protocol(e.to_string())
}

/// The broker's doorbell could not be rung: the broker has let the ring go (its end is closed),
/// or something else is wrong with the descriptor.
fn doorbell_err(e: std::io::Error) -> ClientError {
    match rustix::io::Errno::from_io_error(&e) {
        Some(rustix::io::Errno::PIPE | rustix::io::Errno::CONNRESET) => ClientError::Disconnected,
        _ => ClientError::Protocol(format!("the broker's doorbell: {e}")),
    }
}

/// A blocking `SOCK_SEQPACKET` exchange: one frame out, one frame (and its descriptors) in.
fn send_frame(sock: &OwnedFd, frame: &ClientFrame) -> Result<(), ClientError> {
    let bytes = encode(frame).ok_or_else(|| ClientError::Protocol("frame too large".into()))?;
    rustix::net::sendmsg(
        sock,
        &[IoSlice::new(&bytes)],
        &mut SendAncillaryBuffer::default(),
        SendFlags::NOSIGNAL,
    )
    .map(drop)
    .map_err(|_| ClientError::Disconnected)
}

fn recv_frame(sock: &OwnedFd, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> Result<ServerFrame, ClientError> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = rustix::net::recvmsg(sock, &mut [IoSliceMut::new(buf)], &mut control, RecvFlags::CMSG_CLOEXEC)
        .map_err(|_| ClientError::Disconnected)?;
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    if got.bytes == 0 {
        return Err(ClientError::Disconnected);
    }
    let bytes = buf.get(..got.bytes).unwrap_or_default();
    match ServerFrame::decode(bytes).map_err(io_err)? {
        ServerFrame::Goodbye { status, reason } => Err(goodbye(status, reason)),
        frame => Ok(frame),
    }
}

fn goodbye(status: u32, reason: String) -> ClientError {
    ClientError::Refused {
        status: Status::from_code(status).unwrap_or(Status::ProtocolError),
        message: format!("session closed by the broker: {reason}"),
        rule: None,
    }
}

fn check(response: ResponseFrame) -> Result<Body, ClientError> {
    let status = Status::from_code(response.status)
        .ok_or_else(|| ClientError::Protocol(format!("unknown status {}", response.status)))?;
    ClientError::check_reply(status, response.message, response.rule)?;
    Ok(response.body)
}

/// A socket request before the ring exists (Hello, EnableRing) or beside it (map memory).
fn socket_request(
    sock: &OwnedFd,
    buf: &mut [u8],
    events: &mut Vec<Event>,
    id: u64,
    request: Request,
    fds: &mut Vec<OwnedFd>,
) -> Result<Body, ClientError> {
    send_frame(sock, &ClientFrame::Request(RequestFrame { id, request }))?;
    loop {
        match recv_frame(sock, buf, fds)? {
            ServerFrame::Response(r) if r.id == id => return check(r),
            ServerFrame::Event(e) => events.push(e),
            other => return Err(ClientError::Protocol(format!("unexpected frame {other:?}"))),
        }
    }
}

impl RingClient {
    /// Connects to the broker serving `run_dir`, says `Hello`, and enables the ring.
    pub fn connect(run_dir: impl AsRef<Path>, options: RingOptions) -> Result<RingClient, ClientError> {
        let path = run_dir.as_ref().join(NATIVE_SOCKET);
        let sock = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )
        .map_err(io_err)?;
        let addr = SocketAddrUnix::new(&path).map_err(io_err)?;
        rustix::net::connect(&sock, &addr).map_err(|e| ClientError::unreachable(&path, &e.into()))?;
        let mut buf = vec![0u8; MAX_FRAME + 1];
        let mut fds = Vec::new();
        send_frame(
            &sock,
            &ClientFrame::Hello(Hello {
                version: PROTOCOL_VERSION,
                abi: options.abi as u8,
            }),
        )?;
        let broker_abi = match recv_frame(&sock, &mut buf, &mut fds)? {
            ServerFrame::Welcome { abi, .. } => AbiId::from_wire(abi),
            other => return Err(ClientError::Protocol(format!("unexpected frame {other:?}"))),
        };
        let mut events = Vec::new();
        let request = Request::EnableRing {
            sq_size: options.sq_size,
            cq_size: options.cq_size,
        };
        let (sq_size, cq_size) = match socket_request(&sock, &mut buf, &mut events, 0, request, &mut fds)? {
            Body::Ring { sq_size, cq_size } => (sq_size, cq_size),
            other => return Err(ClientError::Protocol(format!("unexpected {other:?}"))),
        };
        let [memfd, to_broker, doorbell]: [OwnedFd; 3] = fds.try_into().map_err(|fds: Vec<OwnedFd>| {
            ClientError::Protocol(format!("{} descriptors with the ring, not 3", fds.len()))
        })?;
        let sq = RingSize::requested(sq_size).map_err(io_err)?;
        let cq = RingSize::requested(cq_size).map_err(io_err)?;
        let map = Mapping::map(&memfd, sq, cq).map_err(io_err)?;
        let waiter = wake::Waiter::new(&doorbell).map_err(io_err)?;
        waiter.watch(&sock).map_err(io_err)?;
        Ok(RingClient {
            sock,
            memfd,
            map,
            sq: Producer::new("submission", sq),
            cq: Consumer::new("completion", cq),
            to_broker,
            doorbell,
            waiter,
            options,
            next_id: 1,
            unflushed: false,
            parked: HashMap::new(),
            events,
            record: Vec::new(),
            buf,
            scratch: vec![0; MAX_FRAME].into_boxed_slice(),
            broker_abi,
        })
    }

    /// The broker's own ABI, from its Welcome (see [`crate::native::NativeSession::broker_abi`]).
    pub fn broker_abi(&self) -> Option<AbiId> {
        self.broker_abi
    }

    /// Queues a request in the submission ring and returns its id. It is published at the
    /// next [`RingClient::flush`] (or wait); when the ring is full this publishes, takes
    /// completions aside and waits for room — a full ring is back-pressure, never a lost call.
    pub fn submit(&mut self, request: Request) -> Result<u64, ClientError> {
        let (id, len) = self.encode(request)?;
        let mut since = None;
        while !self.push(len)? {
            self.flush()?;
            // Take completions aside so the broker is never stuck on a full completion ring.
            if !self.drain_completions()? {
                self.wait_for(&mut since, wake::ON_ROOM, |c| {
                    c.sq.head_moved(&c.map.header().sq_head.0)
                })?;
            }
        }
        Ok(id)
    }

    /// Queues a request if the submission ring has room: `Ok(None)` when it is full. Never
    /// waits and never reads completions.
    pub fn try_submit(&mut self, request: Request) -> Result<Option<u64>, ClientError> {
        let (id, len) = self.encode(request)?;
        Ok(self.push(len)?.then_some(id))
    }

    /// Encodes the request's frame, under a fresh id, into the scratch buffer; returns the id
    /// and the frame's length.
    fn encode(&mut self, request: Request) -> Result<(u64, usize), ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let len = encode_to(&ClientFrame::Request(RequestFrame { id, request }), &mut self.scratch)
            .ok_or_else(|| ClientError::Protocol("request too large".into()))?
            .len();
        Ok((id, len))
    }

    /// Writes the encoded request (the first `len` scratch bytes) if it fits; published at the
    /// next flush.
    fn push(&mut self, len: usize) -> Result<bool, ClientError> {
        let header = self.map.header();
        let bytes = self.scratch.get(..len).unwrap_or_default();
        let pushed = self.sq.push(self.map.sq(), &header.sq_head.0, bytes).map_err(io_err)?;
        self.unflushed |= pushed;
        Ok(pushed)
    }

    /// Submits a method call (see [`RingClient::submit`]).
    pub fn submit_call(
        &mut self,
        handle: u64,
        selector: u32,
        scalars: &[u64],
        struct_in: &[u8],
        struct_out_len: u32,
    ) -> Result<u64, ClientError> {
        self.submit(Request::Call {
            handle,
            selector,
            scalars: scalars.to_vec(),
            struct_in: struct_in.to_vec(),
            struct_out_len,
        })
    }

    /// Publishes every queued request and wakes the broker if it sleeps. An error when the
    /// broker's doorbell cannot be rung (the broker has let the ring go).
    pub fn flush(&mut self) -> Result<(), ClientError> {
        if !self.unflushed {
            return Ok(());
        }
        self.unflushed = false;
        let header = self.map.header();
        if self.sq.publish(&header.sq_tail.0) {
            wake::wake_if(&header.broker_sleeping.0, wake::ON_RECORDS, || {
                wake::ring_broker(&self.to_broker)
            })
            .map_err(doorbell_err)?;
        }
        Ok(())
    }

    /// Moves every published completion out of the ring (responses parked by id, events
    /// kept). Returns whether there were any.
    fn drain_completions(&mut self) -> Result<bool, ClientError> {
        let mut any = false;
        while let Some(response) = self.pop_completion()? {
            self.parked.insert(response.id, response);
            any = true;
        }
        Ok(any)
    }

    /// The next response in the completion ring, if one is published (events are kept aside).
    fn pop_completion(&mut self) -> Result<Option<ResponseFrame>, ClientError> {
        loop {
            let header = self.map.header();
            if !self
                .cq
                .pop(self.map.cq(), &header.cq_tail.0, &mut self.record)
                .map_err(io_err)?
            {
                return Ok(None);
            }
            self.cq.publish(&header.cq_head.0);
            wake::wake_if(&header.broker_sleeping.0, wake::ON_ROOM, || {
                wake::ring_broker(&self.to_broker)
            })
            .map_err(doorbell_err)?;
            match ServerFrame::decode(&self.record).map_err(io_err)? {
                ServerFrame::Response(r) => return Ok(Some(r)),
                ServerFrame::Event(e) => self.events.push(e),
                ServerFrame::Goodbye { status, reason } => return Err(goodbye(status, reason)),
                other => return Err(ClientError::Protocol(format!("unexpected frame {other:?}"))),
            }
        }
    }

    /// Waits (spinning, then sleeping, as the options say) until `ready` or a completion is
    /// published. A `Goodbye` or the end of the socket while asleep ends the wait with an error.
    fn wait_for(
        &mut self,
        since: &mut Option<Instant>,
        also: u32,
        ready: impl Fn(&RingClient) -> bool,
    ) -> Result<(), ClientError> {
        let header = self.map.header();
        let published = |c: &RingClient| ready(c) || c.cq.has_more(&c.map.header().cq_tail.0);
        let sleep = match self.options.wait {
            WaitMode::Spin => false,
            WaitMode::Sleep => true,
            // The clock is read only once there is nothing to do.
            WaitMode::Adaptive => since.get_or_insert_with(Instant::now).elapsed() >= self.options.spin,
        };
        if !sleep {
            std::hint::spin_loop();
            return Ok(());
        }
        let mut socket_ready = false;
        wake::drain_client(&self.doorbell);
        wake::sleep_unless(
            &header.client_sleeping.0,
            wake::ON_RECORDS | also,
            || published(self),
            || socket_ready = self.waiter.wait(Duration::from_secs(1)).unwrap_or(true),
        );
        if socket_ready && !published(self) {
            // The broker speaks on the socket only to say goodbye or to forward an event.
            let mut fds = Vec::new();
            match recv_frame(&self.sock, &mut self.buf, &mut fds)? {
                ServerFrame::Event(e) => self.events.push(e),
                other => return Err(ClientError::Protocol(format!("unexpected frame {other:?}"))),
            }
        }
        *since = None;
        Ok(())
    }

    /// The next response, whichever request it answers (responses to asynchronous methods may
    /// overtake earlier ones). Publishes queued requests first.
    pub fn next_response(&mut self) -> Result<ResponseFrame, ClientError> {
        self.flush()?;
        if let Some(id) = self.parked.keys().next().copied()
            && let Some(r) = self.parked.remove(&id)
        {
            return Ok(r);
        }
        let mut since = None;
        loop {
            if let Some(r) = self.pop_completion()? {
                return Ok(r);
            }
            self.wait_for(&mut since, 0, |_| false)?;
        }
    }

    /// Waits for the response to request `id`; others that arrive meanwhile are kept.
    pub fn wait(&mut self, id: u64) -> Result<ResponseFrame, ClientError> {
        self.flush()?;
        let mut since = None;
        loop {
            if let Some(r) = self.parked.remove(&id) {
                return Ok(r);
            }
            match self.pop_completion()? {
                Some(r) if r.id == id => return Ok(r),
                Some(r) => {
                    self.parked.insert(r.id, r);
                }
                None => self.wait_for(&mut since, 0, |_| false)?,
            }
        }
    }

    /// Sends a request through the ring and waits for its response; a non-success status is
    /// an error.
    pub fn request(&mut self, request: Request) -> Result<Body, ClientError> {
        let id = self.submit(request)?;
        check(self.wait(id)?)
    }

    /// Services with this name (or all, for an empty name) that the task may see.
    pub fn find(&mut self, name: &str) -> Result<Vec<ServiceSummary>, ClientError> {
        match self.request(Request::FindServices {
            class: String::new(),
            name: name.to_string(),
        })? {
            Body::Found(services) => Ok(services),
            other => Err(ClientError::Protocol(format!("unexpected {other:?}"))),
        }
    }

    /// Opens a user client; returns its handle.
    pub fn open(&mut self, service: u64, exclusive: bool) -> Result<u64, ClientError> {
        match self.request(Request::Open { service, exclusive })? {
            Body::Opened { handle, .. } => Ok(handle),
            other => Err(ClientError::Protocol(format!("unexpected {other:?}"))),
        }
    }

    /// Calls a method and waits for it.
    pub fn call(
        &mut self,
        handle: u64,
        selector: u32,
        scalars: &[u64],
        struct_in: &[u8],
        struct_out_len: u32,
    ) -> Result<CallOutput, ClientError> {
        let id = self.submit_call(handle, selector, scalars, struct_in, struct_out_len)?;
        match check(self.wait(id)?)? {
            Body::Call { scalars, struct_out } => Ok(CallOutput { scalars, struct_out }),
            other => Err(ClientError::Protocol(format!("unexpected {other:?}"))),
        }
    }

    /// Closes a user client.
    pub fn close(&mut self, handle: u64) -> Result<(), ClientError> {
        self.request(Request::Close { handle }).map(drop)
    }

    /// Maps a driver memory type. Descriptors cannot travel through shared memory, so this
    /// one request goes over the socket.
    pub fn map_memory(&mut self, handle: u64, memory_type: u32) -> Result<MappedMemory, ClientError> {
        let mut fds = Vec::new();
        let id = self.next_id;
        self.next_id += 1;
        let request = Request::MapMemory { handle, memory_type };
        match socket_request(&self.sock, &mut self.buf, &mut self.events, id, request, &mut fds)? {
            Body::Mapped {
                memory_type,
                size,
                writable,
            } => Ok(MappedMemory {
                fd: fds
                    .into_iter()
                    .next()
                    .ok_or_else(|| ClientError::Protocol("a mapping without a descriptor".into()))?,
                memory_type,
                size,
                writable,
            }),
            other => Err(ClientError::Protocol(format!("unexpected {other:?}"))),
        }
    }

    /// Events received so far, oldest first.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// The ring's mapping, for tests that play a hostile client.
    #[doc(hidden)]
    pub fn mapping(&self) -> &Mapping {
        &self.map
    }

    /// A second mapping of the same ring, for tests that play a hostile client from another
    /// thread.
    #[doc(hidden)]
    pub fn map_again(&self) -> std::io::Result<Mapping> {
        Mapping::map(&self.memfd, self.map.sq_size(), self.map.cq_size())
    }

    /// The client's end of the broker's doorbell, for tests that play a hostile client.
    #[doc(hidden)]
    pub fn broker_doorbell(&self) -> std::os::fd::BorrowedFd<'_> {
        self.to_broker.as_fd()
    }

    /// The descriptor that wakes this client (its end of the doorbell pair), for tests that
    /// play a hostile client.
    #[doc(hidden)]
    pub fn doorbell(&self) -> std::os::fd::BorrowedFd<'_> {
        self.doorbell.as_fd()
    }
}
