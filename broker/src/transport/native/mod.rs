//! The native protocol: `AF_UNIX` `SOCK_SEQPACKET`, one postcard frame per packet (see
//! `portcullis_proto::frame` and docs/PROTOCOL.md), served through the same session core as
//! gRPC. The client's `Hello` declares its ABI; structs then travel in that ABI's layout.
//!
//! A client that breaks the protocol (a frame before `Hello`, an undecodable, oversized or
//! non-canonical frame, an unknown ABI or version) gets a `Goodbye` with the reason and its
//! session is closed; everyone else is served on.

mod codec;
mod ring;

#[doc(hidden)]
pub use ring::fuzz_ring;
pub use ring::pin_to;

use std::{
    io,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use portcullis_proto::{
    Status,
    frame::{
        Body, ClientFrame, MAX_FRAME, PROTOCOL_VERSION, Request, RequestFrame, ResponseFrame, ServerFrame, encode,
    },
    layout::AbiId,
};
use tokio::sync::{broadcast::error::RecvError, mpsc};
use tokio_seqpacket::{UnixSeqpacket, UnixSeqpacketListener, ancillary::AncillaryMessageWriter};

use crate::{
    config::RingConfig,
    session::{Core, PeerIdentity, Refusal, Session, Started},
};

/// How long a new connection may take to say `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Completed asynchronous calls queued for one connection.
const COMPLETION_QUEUE: usize = 256;

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

/// Serves connections until `shutdown` completes; rings as `ring` says.
pub async fn serve(
    core: Arc<Core>,
    mut listener: UnixSeqpacketListener,
    ring: RingConfig,
    shutdown: impl Future<Output = ()>,
) {
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
    let mut sink = [0u8; 512];
    let drain = async {
        while let Ok(info) = conn.recv(&mut sink).await {
            if info.bytes_read() == 0 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}

async fn send(conn: &UnixSeqpacket, frame: &ServerFrame) -> io::Result<()> {
    send_with(conn, frame, &[]).await
}

/// Sends a frame, with descriptors as `SCM_RIGHTS` when there are any.
async fn send_with(conn: &UnixSeqpacket, frame: &ServerFrame, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let bytes = encode(frame).ok_or_else(|| io::Error::other("frame too large to encode"))?;
    if fds.is_empty() {
        return conn.send(&bytes).await.map(drop);
    }
    let mut space = [0u8; 128];
    let mut ancillary = AncillaryMessageWriter::new(&mut space);
    ancillary
        .add_fds(fds)
        .map_err(|_| io::Error::other("no room for the descriptors"))?;
    conn.send_with_ancillary(&bytes, &mut ancillary).await.map(drop)
}

async fn connection(core: Arc<Core>, conn: UnixSeqpacket, ring: RingConfig) {
    let Some(_permit) = core.admit_connection() else {
        tracing::debug!("native connection refused: connection limit reached");
        let reason = format!(
            "the broker serves at most {} connections at once",
            core.max_connections()
        );
        return goodbye(&conn, Status::NoMemory, reason).await;
    };
    let peersec = crate::sys::peer_security_label(std::os::fd::AsFd::as_fd(&conn))
        .inspect_err(|e| tracing::debug!(error = %e, "SO_PEERSEC unavailable"))
        .ok()
        .flatten();
    let peer = match conn.peer_cred() {
        Ok(cred) => {
            tokio::task::spawn_blocking(move || {
                PeerIdentity::from_peer_cred(cred.uid(), cred.gid(), cred.pid(), peersec)
            })
            .await
        }
        Err(e) => return tracing::warn!(error = %e, "native: no peer credentials; connection closed"),
    };
    let peer = match peer {
        Ok(Ok(peer)) => Arc::new(peer),
        Ok(Err(e)) => return tracing::warn!(error = %e, "native: peer identity unavailable; connection closed"),
        Err(e) => return tracing::error!(error = %e, "native: identity task failed"),
    };
    let mut buf = vec![0u8; MAX_FRAME + 1];
    let ended = match hello(&conn, &mut buf).await {
        Ok(abi) => {
            let welcome = ServerFrame::Welcome {
                version: PROTOCOL_VERSION,
                abi: AbiId::native() as u8,
            };
            if send(&conn, &welcome).await.is_err() {
                return;
            }
            serve_session(
                Session::new(core.clone(), peer.clone(), abi),
                &core,
                &conn,
                &mut buf,
                ring,
            )
            .await
        }
        Err(close) => Some(close),
    };
    if let Some(close) = ended {
        tracing::info!(uid = peer.uid, pid = ?peer.pid, status = %close.status, reason = %close.reason, "native session closed by the broker");
        goodbye(&conn, close.status, close.reason).await;
    }
}

/// Receives one frame into `buf`. `Ok(None)`: the peer closed the connection.
async fn receive(conn: &UnixSeqpacket, buf: &mut [u8]) -> Result<Option<ClientFrame>, Close> {
    let info = conn
        .recv(buf)
        .await
        .map_err(|e| Close::protocol(format!("receive failed: {e}")))?;
    if info.truncated() {
        return Err(Close::protocol(format!("frame exceeds the {MAX_FRAME}-byte limit")));
    }
    let len = info.bytes_read();
    if len == 0 {
        return Ok(None);
    }
    let bytes = buf.get(..len).unwrap_or_default();
    crate::capture::record("native_frame", bytes);
    ClientFrame::decode(bytes)
        .map(Some)
        .map_err(|e| Close::protocol(e.to_string()))
}

async fn hello(conn: &UnixSeqpacket, buf: &mut [u8]) -> Result<AbiId, Close> {
    let first = tokio::time::timeout(HELLO_TIMEOUT, receive(conn, buf))
        .await
        .map_err(|_| Close::protocol("no Hello within 10 s"))??;
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
async fn serve_session(
    session: Session,
    core: &Core,
    conn: &UnixSeqpacket,
    buf: &mut [u8],
    ring_config: RingConfig,
) -> Option<Close> {
    let session = Arc::new(Mutex::new(session));
    let mut ring: Option<ring::RingHandle> = None;
    let ended = serve_socket(&session, core, conn, buf, ring_config, &mut ring).await;
    if let Some(ring) = ring {
        ring.stop().await;
    }
    ended
}

fn locked(session: &Mutex<Session>) -> std::sync::MutexGuard<'_, Session> {
    session.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn serve_socket(
    session: &Arc<Mutex<Session>>,
    core: &Core,
    conn: &UnixSeqpacket,
    buf: &mut [u8],
    ring_config: RingConfig,
    ring: &mut Option<ring::RingHandle>,
) -> Option<Close> {
    let mut events = core.subscribe();
    let (done_tx, mut done_rx) = mpsc::channel(COMPLETION_QUEUE);
    loop {
        let ring_ended = async {
            match ring.as_mut() {
                Some(r) => r.ended().await,
                None => std::future::pending().await,
            }
        };
        let out: Vec<(ServerFrame, Vec<OwnedFd>)> = tokio::select! {
            frame = receive(conn, buf) => match frame {
                Ok(Some(ClientFrame::Request(RequestFrame { id, request: Request::EnableRing { sq_size, cq_size } }))) => {
                    vec![enable_ring(core, session, ring, id, sq_size, cq_size, ring_config)]
                }
                Ok(Some(ClientFrame::Request(request))) => {
                    let id = request.id;
                    let Some(command) = codec::command(request.request) else { continue };
                    let mut session = locked(session);
                    let started = session.execute(command);
                    // Events the request caused (user clients a policy reload closed) come first.
                    let mut out: Vec<_> = session.take_outbox().into_iter().filter_map(|e| codec::event(e).map(|f| (f, Vec::new()))).collect();
                    match started {
                        Started::Now(result) => {
                            let (frame, fd) = codec::response(id, result);
                            out.push((frame, fd.into_iter().collect()));
                        }
                        Started::Later(pending) => {
                            let done_tx = done_tx.clone();
                            tokio::spawn(async move {
                                let _ = done_tx.send(codec::response(id, pending.await)).await;
                            });
                        }
                    }
                    out
                }
                Ok(Some(ClientFrame::Hello(_))) => return Some(Close::protocol("a second Hello")),
                Ok(None) => return None,
                Err(close) => return Some(close),
            },
            Some((frame, fd)) = done_rx.recv() => vec![(frame, fd.into_iter().collect())],
            reason = ring_ended => return reason.map(|reason| Close::protocol(format!("ring: {reason}"))),
            event = events.recv() => {
                let events = match event {
                    Ok(event) => locked(session).on_core_event(&event),
                    Err(RecvError::Lagged(n)) => locked(session).on_events_lost(n),
                    Err(RecvError::Closed) => return Some(Close { status: Status::Aborted, reason: "the broker is stopping".into() }),
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
        for (frame, fds) in out {
            let fds: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
            if send_with(conn, &frame, &fds).await.is_err() {
                return None;
            }
        }
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
            tracing::debug!(%refusal, "ring refused");
            (codec::response(id, Err(refusal)).0, Vec::new())
        }
    }
}
