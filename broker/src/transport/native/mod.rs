//! The native protocol: `AF_UNIX` `SOCK_SEQPACKET`, one postcard frame per packet (see
//! `portcullis_proto::frame` and docs/PROTOCOL.md), served through the same session core as
//! gRPC. The client's `Hello` declares its ABI; structs then travel in that ABI's layout.
//!
//! A client that breaks the protocol (a frame before `Hello`, an undecodable, oversized or
//! non-canonical frame, an unknown ABI or version) gets a `Goodbye` with the reason and its
//! session is closed; everyone else is served on.

mod codec;
mod pool;
mod ring;

#[doc(hidden)]
pub use ring::fuzz_ring;
pub use ring::pin_to;

use std::{
    io,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::Path,
    sync::{Arc, Mutex},
    task::Poll,
    time::Duration,
};

use portcullis_proto::{
    Status,
    frame::{
        Body, ClientFrame, MAX_FRAME, PROTOCOL_VERSION, Request, RequestFrame, ResponseFrame, ServerFrame, encode,
    },
    layout::AbiId,
};
use tokio::sync::mpsc;
use tokio_seqpacket::{UnixSeqpacket, UnixSeqpacketListener, ancillary::AncillaryMessageWriter};

use crate::{
    config::RingConfig,
    session::{Core, Missed, PeerIdentity, Refusal, Session, Started},
    throttle::{Throttle, throttled_info},
};

/// Connection-level log lines (refused at a limit, closed for breaking the protocol), which a
/// flood of connections could otherwise multiply without bound.
static CONNECTION_LOG: Throttle = Throttle::new(20, Duration::from_secs(1));

/// Why the native transport could not start.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct NativeError {
    /// The socket path.
    pub path: String,
    /// The OS error.
    pub source: io::Error,
}

/// Binds the native socket, connectable by every local user.
pub fn bind(path: &Path) -> Result<UnixSeqpacketListener, NativeError> {
    let err = |source| NativeError {
        path: path.display().to_string(),
        source,
    };
    super::claim_socket_path(path).map_err(err)?;
    let listener = UnixSeqpacketListener::bind(path).map_err(err)?;
    super::open_to_all(path).map_err(err)?;
    Ok(listener)
}

/// The native listener from a socket the service manager passed (already bound and listening).
pub fn listener_from(fd: std::os::fd::OwnedFd) -> Result<UnixSeqpacketListener, NativeError> {
    let err = |source| NativeError {
        path: "the socket systemd passed".into(),
        source,
    };
    rustix::io::ioctl_fionbio(&fd, true).map_err(|e| err(e.into()))?;
    UnixSeqpacketListener::try_from(fd).map_err(err)
}

/// Serves connections until `shutdown` completes; rings as `ring` says.
pub async fn serve(
    core: Arc<Core>,
    mut listener: UnixSeqpacketListener,
    ring: RingConfig,
    shutdown: impl Future<Output = ()>,
) {
    // The ring pool's threads and epoll now, so that they count in the broker's baseline
    // rather than appear with the first ring.
    if ring.wait != portcullis_proto::ring::WaitMode::Spin
        && ring.max_rings > 0
        && let Err(e) = pool::Pool::get(&ring)
    {
        tracing::warn!(error = %e, "cannot start the ring threads now: the first ring tries again");
    }
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => {
                    tokio::spawn(connection(core.clone(), conn, ring));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "native accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        }
    }
}

/// The end of a connection: a `Goodbye` to send, or nothing (the peer left).
struct Close {
    status: Status,
    reason: String,
}

impl Close {
    fn protocol(reason: impl Into<String>) -> Close {
        Close {
            status: Status::ProtocolError,
            reason: reason.into(),
        }
    }
}

/// Ends a session with a `Goodbye`: sends it, stops sending, and reads what the client still
/// sends (for at most a second) so that closing does not reset the connection before the
/// client has read why.
async fn goodbye(conn: &UnixSeqpacket, status: Status, reason: String) {
    if send(
        conn,
        &ServerFrame::Goodbye {
            status: status.code(),
            reason,
        },
    )
    .await
    .is_err()
    {
        return;
    }
    let _ = conn.shutdown(std::net::Shutdown::Write);
    // What the client still sends is read into a buffer on the stack of each poll, not one
    // kept in this future (every connection's task is as large as its largest future).
    let drain = std::future::poll_fn(|cx| {
        let mut sink = [0u8; 512];
        loop {
            match conn.poll_recv(cx, &mut sink) {
                Poll::Ready(Ok(info)) if info.bytes_read() > 0 => {}
                Poll::Ready(_) => return Poll::Ready(()),
                Poll::Pending => return Poll::Pending,
            }
        }
    });
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}

async fn send(conn: &UnixSeqpacket, frame: &ServerFrame) -> io::Result<()> {
    send_with(conn, frame, &[]).await
}

/// Sends a frame, with descriptors as `SCM_RIGHTS` when there are any. Polled by hand so that
/// the room for the descriptors is on the stack of each poll: a connection's task keeps the
/// state of its largest future, and the socket's own `send_with_ancillary` future would keep
/// it (about 500 bytes) in every idle connection.
async fn send_with(conn: &UnixSeqpacket, frame: &ServerFrame, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let bytes = encode(frame).ok_or_else(|| io::Error::other("frame too large to encode"))?;
    std::future::poll_fn(|cx| {
        if fds.is_empty() {
            return conn.poll_send(cx, &bytes);
        }
        let mut space = [0u8; 128];
        let mut ancillary = AncillaryMessageWriter::new(&mut space);
        ancillary
            .add_fds(fds)
            .map_err(|_| io::Error::other("no room for the descriptors"))?;
        conn.poll_send_with_ancillary(cx, &bytes, &mut ancillary)
    })
    .await
    .map(drop)
}

/// Serves one connection. The handshake and the goodbye run boxed, so that what a connection's
/// task keeps for as long as it lives is only the state of its session loop: a task is as large
/// as the largest future it may hold, and every one of an idle crowd's connections pays for it.
pub(super) async fn connection(core: Arc<Core>, conn: UnixSeqpacket, ring: RingConfig) {
    let cred = match conn.peer_cred() {
        Ok(cred) => cred,
        Err(e) => return tracing::warn!(error = %e, "native: no peer credentials; connection closed"),
    };
    let _slot = match core.accounts().connect_local(cred.uid()) {
        Ok(slot) => slot,
        Err(refusal) => {
            throttled_info!(CONNECTION_LOG, uid = cred.uid(), reason = %refusal, "native connection refused at a limit");
            return Box::pin(goodbye(&conn, Status::NoMemory, refusal.to_string())).await;
        }
    };
    let cred = super::Cred {
        uid: cred.uid(),
        gid: cred.gid(),
        pid: cred.pid(),
    };
    let (peer, ended, conn) = match Box::pin(handshake(&core, &conn, cred)).await {
        Handshake::Done(peer, abi) => match serve_session(Served::new(&core, &peer, abi, conn, ring)).await {
            (ended, Some(back)) => (peer, ended, back),
            (_, None) => return,
        },
        Handshake::Broken(peer, close) => (peer, Some(close), conn),
        Handshake::Gone => return,
    };
    if let Some(close) = ended {
        throttled_info!(CONNECTION_LOG, uid = peer.uid, pid = %peer.pid_text(), status = %close.status, reason = %close.reason, "native session closed by the broker");
        Box::pin(goodbye(&conn, close.status, close.reason)).await;
    }
}

/// How a connection's handshake ended.
enum Handshake {
    /// The peer, and the ABI its `Hello` declared; the `Welcome` is sent.
    Done(Arc<PeerIdentity>, AbiId),
    /// The peer broke the protocol: it is told why.
    Broken(Arc<PeerIdentity>, Close),
    /// The connection ends without a word (no identity, or the peer is gone).
    Gone,
}

/// Who the peer is (within the handshake timeout), its `Hello`, and the broker's `Welcome`.
async fn handshake(core: &Core, conn: &UnixSeqpacket, cred: super::Cred) -> Handshake {
    let timeout = core.accounts().limits().handshake_timeout();
    let Ok(peer) = tokio::time::timeout(timeout, super::identify(core, conn, cred)).await else {
        throttled_info!(
            CONNECTION_LOG,
            uid = cred.uid,
            "native: identity not read within the handshake timeout; connection closed"
        );
        return Handshake::Gone;
    };
    let peer = match peer {
        Ok(peer) => Arc::new(peer),
        Err(e) => {
            throttled_info!(CONNECTION_LOG, uid = cred.uid, error = %e, "native: peer identity unavailable; connection closed");
            return Handshake::Gone;
        }
    };
    let abi = match hello(conn, timeout).await {
        Ok(abi) => abi,
        Err(close) => return Handshake::Broken(peer, close),
    };
    let welcome = ServerFrame::Welcome {
        version: PROTOCOL_VERSION,
        abi: AbiId::native() as u8,
    };
    match send(conn, &welcome).await {
        Ok(()) => Handshake::Done(peer, abi),
        Err(_) => Handshake::Gone,
    }
}

thread_local! {
    /// The receive buffer of the connections this worker thread serves: a frame is received
    /// and decoded within one poll, so a connection holds no buffer of its own while it waits
    /// (a `MAX_FRAME` buffer per idle connection was most of its memory).
    static SCRATCH: std::cell::RefCell<Box<[u8]>> = std::cell::RefCell::new(vec![0u8; MAX_FRAME + 1].into_boxed_slice());
}

/// Receives and decodes one frame. `Ok(None)`: the peer closed the connection.
async fn receive(conn: &UnixSeqpacket) -> Result<Option<ClientFrame>, Close> {
    std::future::poll_fn(|cx| {
        SCRATCH.with_borrow_mut(|buf| {
            let info = match conn.poll_recv(cx, buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(info)) => info,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(Close::protocol(format!("receive failed: {e}")))),
            };
            Poll::Ready(decode(buf, info.bytes_read(), info.truncated()))
        })
    })
    .await
}

fn decode(buf: &[u8], len: usize, truncated: bool) -> Result<Option<ClientFrame>, Close> {
    if truncated {
        return Err(Close::protocol(format!("frame exceeds the {MAX_FRAME}-byte limit")));
    }
    if len == 0 {
        return Ok(None);
    }
    let bytes = buf.get(..len).unwrap_or_default();
    crate::capture::record("native_frame", bytes);
    ClientFrame::decode(bytes)
        .map(Some)
        .map_err(|e| Close::protocol(e.to_string()))
}

async fn hello(conn: &UnixSeqpacket, timeout: Duration) -> Result<AbiId, Close> {
    let first = tokio::time::timeout(timeout, receive(conn))
        .await
        .map_err(|_| Close::protocol(format!("no Hello within {} ms", timeout.as_millis())))??;
    match first {
        Some(ClientFrame::Hello(hello)) => {
            if hello.version != PROTOCOL_VERSION {
                return Err(Close {
                    status: Status::Unsupported,
                    reason: format!(
                        "protocol version {} is not supported (this broker speaks {PROTOCOL_VERSION})",
                        hello.version
                    ),
                });
            }
            AbiId::from_wire(hello.abi).ok_or_else(|| Close {
                status: Status::Unsupported,
                reason: format!("ABI {} is not in the list", hello.abi),
            })
        }
        Some(ClientFrame::Request(_)) => Err(Close::protocol("a request before Hello")),
        None => Err(Close::protocol("closed before Hello")),
    }
}

/// Serves requests until the peer leaves (`None`) or breaks the protocol. After `EnableRing`
/// the ring's thread serves the ring beside this loop, which goes on serving the socket and
/// forwards events to the ring; the socket's end stops the ring and releases everything.
///
/// The loop runs on the foreground workers while its identity holds no more connections than
/// `limits.foreground_connections_per_uid`, and on the background workers (idle priority)
/// while it holds more — moving when that changes, between two requests. Returns the
/// connection, for the goodbye (`None` if it was lost with a failed task).
async fn serve_session(mut state: Box<Served>) -> (Option<Close>, Option<UnixSeqpacket>) {
    let mut background = false;
    let ended = loop {
        let step = match (background, crate::server::background()) {
            (true, Some(workers)) => {
                let moved = workers
                    .spawn(async move {
                        let _counted = state.core.accounts().serving_in_background();
                        let mut state = rehomed(state)?;
                        let step = serve_socket(&mut state, true).await;
                        Ok::<_, std::io::Error>((state, step))
                    })
                    .await;
                match moved {
                    Ok(Ok((back, step))) => {
                        // Back on the foreground workers: registered with their reactor again.
                        state = match rehomed(back) {
                            Ok(state) => state,
                            Err(e) => return lost(&e),
                        };
                        step
                    }
                    Ok(Err(e)) => return lost(&e),
                    Err(e) => {
                        // The connection went with the task.
                        tracing::error!(error = %e, "a session's background task failed");
                        return (None, None);
                    }
                }
            }
            _ => serve_socket(&mut state, false).await,
        };
        match step {
            Ok(ended) => break ended,
            Err(Move) if crate::server::background().is_some() => background = !background,
            // Nowhere to move to: stay.
            Err(Move) => {}
        }
    };
    if let Some(ring) = state.ring.take() {
        ring.stop().await;
    }
    (ended, Some(state.conn))
}

/// The connection registered with the reactor of the runtime this runs on (the one about to
/// serve it): a connection served by the background workers must not wake the foreground
/// workers' reactor at every request (with a thousand connections in the background, that
/// reactor did the work of all of them).
fn rehomed(mut state: Box<Served>) -> std::io::Result<Box<Served>> {
    state.conn = UnixSeqpacket::try_from(OwnedFd::from(state.conn))?;
    Ok(state)
}

/// A connection that could not be registered again: it ends (its session with it).
fn lost(e: &std::io::Error) -> (Option<Close>, Option<UnixSeqpacket>) {
    tracing::warn!(error = %e, "a connection could not move between the foreground and background workers: it ends");
    (None, None)
}

fn locked(session: &Mutex<Session>) -> std::sync::MutexGuard<'_, Session> {
    session.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Completed asynchronous calls, with the descriptor each answer carries.
type Done = (ServerFrame, Option<OwnedFd>);

/// A connection's session loop, owned, so that it can run on the foreground workers or the
/// background ones and move between them.
struct Served {
    session: Arc<Mutex<Session>>,
    core: Arc<Core>,
    conn: UnixSeqpacket,
    ring_config: RingConfig,
    ring: Option<ring::RingHandle>,
    events: crate::session::EventReceiver,
    /// Completed asynchronous calls queued for this connection.
    done: Completions,
}

impl Served {
    /// A new session on `conn`, boxed. Made outside the connection's future: a `Session` built
    /// in it would keep its room there (about 500 bytes) for as long as the connection lives,
    /// and a value moved into an async function is kept twice in its future (the argument and
    /// the local it becomes).
    fn new(
        core: &Arc<Core>,
        peer: &Arc<PeerIdentity>,
        abi: AbiId,
        conn: UnixSeqpacket,
        ring_config: RingConfig,
    ) -> Box<Served> {
        let mut session = Session::new(core.clone(), peer.clone(), abi);
        let events = session.take_events();
        Box::new(Served {
            session: Arc::new(Mutex::new(session)),
            events,
            core: core.clone(),
            conn,
            ring_config,
            ring: None,
            done: Completions::new(core.accounts().limits().max_queued_messages_per_session),
        })
    }
}

/// The queue of a connection's completed asynchronous calls (`max_queued_messages_per_session`),
/// made at its first asynchronous call: a channel allocates its first block of slots when it
/// is made (32 answers, about 4 KiB), which an idle connection, or one whose calls all answer
/// at once, never needs.
struct Completions {
    capacity: usize,
    channel: Option<(mpsc::Sender<Done>, mpsc::Receiver<Done>)>,
}

impl Completions {
    fn new(capacity: usize) -> Completions {
        Completions {
            capacity,
            channel: None,
        }
    }

    /// Where a call in flight sends its answer.
    fn sender(&mut self) -> mpsc::Sender<Done> {
        let capacity = self.capacity;
        self.channel.get_or_insert_with(|| mpsc::channel(capacity)).0.clone()
    }

    /// The next answer; never ready while no call has gone asynchronous.
    async fn recv(&mut self) -> Option<Done> {
        match &mut self.channel {
            Some((_, rx)) => rx.recv().await,
            None => std::future::pending().await,
        }
    }

    /// The receiver of the answers still in flight, the sender kept here dropped (so that it
    /// ends when they have all answered); `None` if no call ever went asynchronous.
    fn take_in_flight(&mut self) -> Option<mpsc::Receiver<Done>> {
        self.channel.take().map(|(_, rx)| rx)
    }
}

/// The loop stopped because its identity's connections now belong elsewhere.
struct Move;

async fn serve_socket(state: &mut Served, background: bool) -> Result<Option<Close>, Move> {
    let Served {
        session,
        core,
        conn,
        ring_config,
        ring,
        events,
        done,
    } = state;
    let (core, ring_config) = (&**core, *ring_config);
    let account = locked(session).account().clone();
    loop {
        if account.over_foreground() != background {
            return Err(Move);
        }
        let ring_ended = async {
            match ring.as_mut() {
                Some(r) => r.ended().await,
                None => std::future::pending().await,
            }
        };
        let out: Vec<(ServerFrame, Vec<OwnedFd>)> = tokio::select! {
            frame = receive(conn) => match frame {
                Ok(Some(ClientFrame::Request(RequestFrame { id, request: Request::EnableRing { sq_size, cq_size } }))) => {
                    vec![enable_ring(core, session, ring, id, sq_size, cq_size, ring_config)]
                }
                Ok(Some(ClientFrame::Request(request))) => {
                    let id = request.id;
                    let Some(command) = codec::command(request.request) else { continue };
                    let (started, mut out, ended) = {
                        let mut session = locked(session);
                        let started = session.execute(command);
                        // Events the request caused (user clients a policy reload closed) come first.
                        let out: Vec<_> = session.take_outbox().into_iter().filter_map(|e| codec::event(e).map(|f| (f, Vec::new()))).collect();
                        (started, out, session.end_reason().cloned())
                    };
                    match started {
                        Started::Now(result) => {
                            let (frame, fd) = codec::response(id, result);
                            out.push((frame, fd.into_iter().collect()));
                        }
                        Started::Later(pending) => {
                            let done_tx = done.sender();
                            tokio::spawn(async move {
                                let _ = done_tx.send(codec::response(id, pending.await)).await;
                            });
                        }
                    }
                    if let Some(ended) = ended {
                        // The refusal first, then the goodbye.
                        send_all(conn, out).await;
                        return Ok(Some(Close { status: ended.status, reason: ended.message }));
                    }
                    out
                }
                Ok(Some(ClientFrame::Hello(_))) => return Ok(Some(Close::protocol("a second Hello"))),
                Ok(None) => return Ok(None),
                Err(close) => return Ok(Some(close)),
            },
            Some((frame, fd)) = done.recv() => vec![(frame, fd.into_iter().collect())],
            () = crate::session::idle(locked(session).idle_deadline()) => {
                if let Some(idle) = locked(session).idle_close() {
                    return Ok(Some(Close { status: idle.status, reason: idle.message }));
                }
                Vec::new()
            }
            reason = ring_ended => return Ok(reason.map(|(status, reason)| Close { status, reason: format!("ring: {reason}") })),
            () = core.stopping() => {
                // Boxed: the shutdown's state would otherwise be part of every idle connection's.
                return Ok(Some(Box::pin(finish_for_shutdown(session, core, conn, done.take_in_flight())).await));
            }
            event = events.recv() => {
                let events = match event {
                    Ok(event) => locked(session).on_core_event(&event),
                    Err(Missed::Lagged(n)) => locked(session).on_events_lost(n),
                    Err(Missed::Closed) => return Ok(Some(Close { status: Status::Aborted, reason: "the broker is stopping".into() })),
                };
                let frames = events.into_iter().filter_map(codec::event);
                match ring.as_mut() {
                    Some(ring) => {
                        ring.deliver(frames);
                        Vec::new()
                    }
                    None => frames.map(|f| (f, Vec::new())).collect(),
                }
            }
        };
        if !send_all(conn, out).await {
            return Ok(None);
        }
    }
}

/// Sends frames (with their descriptors) in order, until one fails.
async fn send_all(conn: &UnixSeqpacket, out: Vec<(ServerFrame, Vec<OwnedFd>)>) -> bool {
    // By reference: a frame taken out of the vector would be kept inline in this future.
    for (frame, fds) in &out {
        let fds: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
        if send_with(conn, frame, &fds).await.is_err() {
            return false;
        }
    }
    true
}

/// The broker is stopping: nothing more is read; calls in flight may finish within the
/// shutdown deadline (their responses are sent), then the rest are aborted (`ABORTED`
/// responses); the caller then says goodbye.
async fn finish_for_shutdown(
    session: &Mutex<Session>,
    core: &Core,
    conn: &UnixSeqpacket,
    in_flight: Option<mpsc::Receiver<Done>>,
) -> Close {
    // Every call in flight holds a sender: when all have answered, `recv` says `None`.
    if let Some(mut done_rx) = in_flight {
        let deadline = tokio::time::Instant::now() + core.accounts().limits().shutdown_timeout();
        let mut aborted = false;
        loop {
            tokio::select! {
                next = done_rx.recv() => match next {
                    Some((frame, fd)) => {
                        if !send_all(conn, vec![(frame, fd.into_iter().collect())]).await {
                            break;
                        }
                    }
                    None => break,
                },
                () = tokio::time::sleep_until(deadline), if !aborted => {
                    aborted = true;
                    locked(session).close_all("the broker is stopping");
                }
            }
        }
    }
    Close {
        status: Status::Aborted,
        reason: "the broker is stopping".into(),
    }
}

/// Answers `EnableRing`: the ring's sizes and its three descriptors, or a refusal.
fn enable_ring(
    core: &Core,
    session: &Arc<Mutex<Session>>,
    ring: &mut Option<ring::RingHandle>,
    id: u64,
    sq_size: u32,
    cq_size: u32,
    config: RingConfig,
) -> (ServerFrame, Vec<OwnedFd>) {
    if ring.is_some() {
        let refusal = Refusal::new(Status::BadArgument, "the ring is already enabled");
        return (codec::response(id, Err(refusal)).0, Vec::new());
    }
    match ring::start(core, session, sq_size, cq_size, config) {
        Ok(enabled) => {
            *ring = Some(enabled.handle);
            let frame = ServerFrame::Response(ResponseFrame {
                id,
                status: Status::Success.code(),
                message: String::new(),
                rule: String::new(),
                body: Body::Ring {
                    sq_size: enabled.sq_size,
                    cq_size: enabled.cq_size,
                },
            });
            (frame, enabled.fds.into())
        }
        Err(refusal) => {
            let uid = session.lock().map(|s| s.peer().uid).unwrap_or(u32::MAX);
            throttled_info!(CONNECTION_LOG, uid, status = %refusal.status, reason = %refusal.message, "ring refused");
            (codec::response(id, Err(refusal)).0, Vec::new())
        }
    }
}
