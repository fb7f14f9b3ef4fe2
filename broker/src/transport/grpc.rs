//! gRPC (tonic): the `Broker` service, gRPC health and reflection — over a Unix socket for
//! local clients and, when configured, over TCP with mutual TLS for remote ones.
//!
//! A local connection's identity is taken from the kernel at accept time and travels with the
//! connection as tonic connect info; a connection whose identity cannot be established is
//! closed before any request is read. A TCP connection's identity is its client certificate,
//! verified in the handshake against the configured CA; a client without one never gets a
//! request through.

use std::{
    io,
    path::Path,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use portcullis_proto::{
    FILE_DESCRIPTOR_SET, Status,
    layout::AbiId,
    limits,
    pb::{self, broker_server::BrokerServer, client_message::Request, server_message::Kind},
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream, UnixListener, UnixStream},
    sync::{broadcast::error::RecvError, mpsc},
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Streaming,
    transport::{
        Certificate, Identity, ServerTlsConfig,
        server::{Connected, TcpConnectInfo},
    },
};

use crate::{
    registry::{Matching, OpenMode, Service, ServiceId},
    session::{Command, Core, CoreEvent, PeerIdentity, Refusal, Reply, Session, SessionEvent, Started, TlsPeer},
};

/// Responses and events queued to one session's client before the session waits for it to
/// read (back-pressure: a client that does not read stops being served, nobody else does).
const OUTBOUND_QUEUE: usize = 256;

/// Accepted connections waiting for their identity to be collected.
const ACCEPT_QUEUE: usize = 64;

/// The kernel's view of a connection's peer, as tonic connect info.
#[derive(Clone, Debug)]
pub struct Peer(pub Arc<PeerIdentity>);

/// A connection holding its place in the connection limit, with its connect info.
#[derive(Debug)]
pub struct Counted<S, I> {
    inner: S,
    info: I,
    /// Held for the connection's life: its place in the connection limit.
    _permit: tokio::sync::OwnedSemaphorePermit,
}

/// A Unix stream with its peer's identity.
pub type PeerStream = Counted<UnixStream, Peer>;

impl<S, I: Clone + Send + Sync + 'static> Connected for Counted<S, I> {
    type ConnectInfo = I;
    fn connect_info(&self) -> I {
        self.info.clone()
    }
}

impl<S: AsyncRead + Unpin, I: Unpin> AsyncRead for Counted<S, I> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin, I: Unpin> AsyncWrite for Counted<S, I> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepts connections and collects each peer's identity off the accept path.
fn incoming(core: Arc<Core>, listener: UnixListener) -> ReceiverStream<io::Result<PeerStream>> {
    let (tx, rx) = mpsc::channel(ACCEPT_QUEUE);
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let Some(permit) = core.admit_connection() else {
                tracing::debug!("gRPC connection refused: connection limit reached");
                drop(stream);
                continue;
            };
            let ready = tx.clone();
            tokio::spawn(async move {
                let cred = match stream.peer_cred() {
                    Ok(cred) => cred,
                    Err(e) => {
                        return tracing::warn!(error = %e, "no peer credentials; connection closed");
                    }
                };
                let peersec = crate::sys::peer_security_label(std::os::fd::AsFd::as_fd(&stream))
                    .inspect_err(|e| tracing::debug!(error = %e, "SO_PEERSEC unavailable"))
                    .ok()
                    .flatten();
                let identity = tokio::task::spawn_blocking(move || {
                    PeerIdentity::from_peer_cred(cred.uid(), cred.gid(), cred.pid(), peersec)
                })
                .await;
                match identity {
                    Ok(Ok(identity)) => {
                        let _ = ready
                            .send(Ok(PeerStream {
                                inner: stream,
                                info: Peer(Arc::new(identity)),
                                _permit: permit,
                            }))
                            .await;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "peer identity unavailable; connection closed")
                    }
                    Err(e) => tracing::error!(error = %e, "identity task failed"),
                }
            });
            if tx.is_closed() {
                break;
            }
        }
    });
    ReceiverStream::new(rx)
}

/// Why the gRPC transport stopped.
#[derive(Debug, thiserror::Error)]
pub enum GrpcError {
    /// Reflection could not be built from the descriptor sets.
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The socket could not be set up.
    #[error("{path}: {source}")]
    Socket {
        /// The socket path.
        path: String,
        /// The OS error.
        source: io::Error,
    },
}

/// Binds the gRPC Unix socket, connectable by every local user.
pub async fn bind(path: &Path) -> Result<UnixListener, GrpcError> {
    let err = |source| GrpcError::Socket {
        path: path.display().to_string(),
        source,
    };
    super::claim_socket_path(path).map_err(err)?;
    let listener = UnixListener::bind(path).map_err(err)?;
    super::open_to_all(path).map_err(err)?;
    Ok(listener)
}

/// Accepts TCP connections within the connection limit (TLS is tonic's, on top).
fn tcp_incoming(
    core: Arc<Core>,
    listener: TcpListener,
) -> ReceiverStream<io::Result<Counted<TcpStream, TcpConnectInfo>>> {
    let (tx, rx) = mpsc::channel(ACCEPT_QUEUE);
    tokio::spawn(async move {
        loop {
            let (stream, remote) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "TCP accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let Some(permit) = core.admit_connection() else {
                tracing::debug!(%remote, "TCP connection refused: connection limit reached");
                continue;
            };
            let _ = stream.set_nodelay(true);
            let info = TcpConnectInfo {
                local_addr: stream.local_addr().ok(),
                remote_addr: Some(remote),
            };
            let counted = Counted {
                inner: stream,
                info,
                _permit: permit,
            };
            if tx.send(Ok(counted)).await.is_err() {
                break;
            }
        }
    });
    ReceiverStream::new(rx)
}

/// The TLS files of `[tls]`, read.
pub fn server_tls(tls: &crate::config::TlsConfig) -> Result<ServerTlsConfig, GrpcError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| GrpcError::Socket {
            path: path.display().to_string(),
            source,
        })
    };
    Ok(ServerTlsConfig::new()
        .identity(Identity::from_pem(read(&tls.cert)?, read(&tls.key)?))
        .client_ca_root(Certificate::from_pem(read(&tls.client_ca)?))
        .client_auth_optional(false))
}

/// Serves `Broker`, health and reflection to TCP clients with verified certificates until
/// `shutdown` completes.
pub async fn serve_tls(
    core: Arc<Core>,
    listener: TcpListener,
    tls: ServerTlsConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), GrpcError> {
    let server = tonic::transport::Server::builder().tls_config(tls)?;
    router(core.clone(), server)
        .await?
        .serve_with_incoming_shutdown(tcp_incoming(core, listener), shutdown)
        .await?;
    Ok(())
}

/// Serves `Broker`, health and reflection on the listener until `shutdown` completes.
pub async fn serve(
    core: Arc<Core>,
    listener: UnixListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), GrpcError> {
    router(core.clone(), tonic::transport::Server::builder())
        .await?
        .serve_with_incoming_shutdown(incoming(core, listener), shutdown)
        .await?;
    Ok(())
}

/// The services, on a server builder.
async fn router(
    core: Arc<Core>,
    server: tonic::transport::Server,
) -> Result<tonic::transport::server::Router, GrpcError> {
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<BrokerServer<BrokerService>>().await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let broker = BrokerServer::new(BrokerService { core: core.clone() })
        .max_decoding_message_size(limits::MAX_GRPC_MESSAGE)
        .max_encoding_message_size(limits::MAX_GRPC_MESSAGE);
    Ok(server
        .max_concurrent_streams(Some(64))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(health)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?)
        .add_service(broker))
}

/// The `Broker` gRPC service.
#[derive(Debug)]
pub struct BrokerService {
    core: Arc<Core>,
}

/// The peer of an administrative call: root or the broker's own user, over a local socket.
fn admin<T>(req: &tonic::Request<T>, what: &str) -> Result<Arc<PeerIdentity>, tonic::Status> {
    let peer = peer_of(req)?;
    let own = rustix::process::geteuid().as_raw();
    if peer.tls.is_some() || (peer.uid != 0 && peer.uid != own) {
        tracing::warn!(uid = peer.uid, pid = ?peer.pid, "refused to {what}: not an administrator");
        return Err(tonic::Status::permission_denied(format!(
            "only root or the broker's own user may {what}"
        )));
    }
    Ok(peer)
}

/// The caller: the kernel's view of a local peer, or what a TCP peer's verified certificate says.
fn peer_of<T>(req: &tonic::Request<T>) -> Result<Arc<PeerIdentity>, tonic::Status> {
    if let Some(peer) = req.extensions().get::<Peer>() {
        return Ok(peer.0.clone());
    }
    let certs = req
        .peer_certs()
        .ok_or_else(|| tonic::Status::unauthenticated("the connection has no verified identity"))?;
    let leaf = certs
        .first()
        .ok_or_else(|| tonic::Status::unauthenticated("no client certificate"))?;
    let tls = TlsPeer::from_der(leaf).map_err(tonic::Status::unauthenticated)?;
    Ok(Arc::new(PeerIdentity::remote(tls)))
}

#[tonic::async_trait]
impl pb::broker_server::Broker for BrokerService {
    type SessionStream = ReceiverStream<Result<pb::ServerMessage, tonic::Status>>;

    async fn session(
        &self,
        req: tonic::Request<Streaming<pb::ClientMessage>>,
    ) -> Result<tonic::Response<Self::SessionStream>, tonic::Status> {
        let peer = peer_of(&req)?;
        let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
        tokio::spawn(run_session(
            Session::new(self.core.clone(), peer, AbiId::native()),
            self.core.clone(),
            req.into_inner(),
            tx,
        ));
        Ok(tonic::Response::new(ReceiverStream::new(rx)))
    }

    async fn reload_policy(
        &self,
        req: tonic::Request<pb::ReloadPolicyRequest>,
    ) -> Result<tonic::Response<pb::ReloadPolicyResponse>, tonic::Status> {
        let peer = admin(&req, "reload the policy")?;
        tracing::info!(uid = peer.uid, pid = ?peer.pid, "policy reload requested");
        match self.core.reload_policy() {
            Ok((generation, rules)) => Ok(tonic::Response::new(pb::ReloadPolicyResponse {
                generation,
                rules: u32::try_from(rules).unwrap_or(u32::MAX),
            })),
            Err(e) => Err(tonic::Status::failed_precondition(e.to_string())),
        }
    }

    async fn stats(
        &self,
        req: tonic::Request<pb::StatsRequest>,
    ) -> Result<tonic::Response<pb::StatsResponse>, tonic::Status> {
        admin(&req, "read the broker's statistics")?;
        let s = self.core.stats();
        let n = |v: usize| v as u64;
        Ok(tonic::Response::new(pb::StatsResponse {
            services: n(s.services),
            sessions: n(s.sessions),
            user_clients: n(s.user_clients),
            mappings: n(s.mappings),
            pending_calls: n(s.pending_calls),
            service_opens: n(s.service_opens),
            driver_opens: n(s.driver_opens),
            driver_waiting: n(s.driver_waiting),
            rings: n(s.rings),
            open_fds: n(s.open_fds),
        }))
    }

    async fn list_services(
        &self,
        req: tonic::Request<pb::ListServicesRequest>,
    ) -> Result<tonic::Response<pb::ListServicesResponse>, tonic::Status> {
        let peer = peer_of(&req)?;
        let matching = Matching::try_from(req.into_inner().matching)
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        let services = self
            .core
            .find_services(&peer, AbiId::native(), &matching)
            .iter()
            .map(|s| s.info(AbiId::native()))
            .collect();
        Ok(tonic::Response::new(pb::ListServicesResponse { services }))
    }
}

type Outbound = mpsc::Sender<Result<pb::ServerMessage, tonic::Status>>;

/// Serves one session until the client's stream ends or its connection drops; then the session
/// is dropped, releasing everything it held.
async fn run_session(mut session: Session, core: Arc<Core>, mut inbound: Streaming<pb::ClientMessage>, tx: Outbound) {
    let mut events = core.subscribe();
    // With traffic recording on: this session's messages, as one `grpc_request` seed.
    let mut recorded: Option<Vec<u8>> = crate::capture::enabled().then(Vec::new);
    loop {
        tokio::select! {
            message = inbound.message() => match message {
                Ok(Some(message)) => {
                    if let Some(rec) = recorded.as_mut().filter(|r| r.len() < 64 * 1024) {
                        let _ = prost::Message::encode_length_delimited(&message, rec);
                    }
                    let reply = handle(&mut session, message, &tx);
                    // Events the request caused (user clients a policy reload closed) come first.
                    let out = session.take_outbox().into_iter().filter_map(event_message).chain(reply);
                    if send_all(&tx, out).await.is_err() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(status) => {
                    // Tell the client why its stream ends (an oversized or undecodable message).
                    tracing::debug!(%status, "session stream failed");
                    let _ = tx.send(Err(status)).await;
                    break;
                }
            },
            event = events.recv() => {
                let out = match event {
                    Ok(event) => session.on_core_event(&event),
                    Err(RecvError::Lagged(n)) => session.on_events_lost(n),
                    Err(RecvError::Closed) => break,
                };
                if send_all(&tx, out.into_iter().filter_map(event_message)).await.is_err() {
                    break;
                }
            }
            () = tx.closed() => break,
        }
    }
    if let Some(rec) = recorded.filter(|r| !r.is_empty()) {
        crate::capture::record("grpc_request", &rec);
    }
}

/// Sends messages in order; `Err` when the client has gone.
async fn send_all(tx: &Outbound, messages: impl Iterator<Item = pb::ServerMessage>) -> Result<(), ()> {
    for message in messages {
        tx.send(Ok(message)).await.map_err(drop)?;
    }
    Ok(())
}

/// Handles one request. Returns the response to send now; an asynchronous call's response is
/// sent by its own task when it completes.
fn handle(session: &mut Session, message: pb::ClientMessage, tx: &Outbound) -> Option<pb::ServerMessage> {
    let id = message.request_id;
    let started = match command(message.request) {
        Ok(command) => session.execute(command),
        Err(refusal) => Started::Now(Err(refusal)),
    };
    match started {
        Started::Now(result) => Some(response(id, result)),
        Started::Later(pending) => {
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = tx.send(Ok(response(id, pending.await))).await;
            });
            None
        }
    }
}

/// The session command a request carries.
pub(crate) fn command(request: Option<Request>) -> Result<Command, Refusal> {
    Ok(
        match request.ok_or_else(|| Refusal::new(Status::ProtocolError, "the message carries no request"))? {
            Request::FindServices(find) => Command::FindServices(
                Matching::try_from(find.matching).map_err(|e| Refusal::new(Status::BadArgument, e.to_string()))?,
            ),
            Request::OpenUserClient(open) => Command::Open {
                service: ServiceId(open.service_id),
                mode: open_mode(open.mode)?,
            },
            Request::CloseUserClient(close) => Command::Close { handle: close.handle },
            Request::Subscribe(sub) => Command::Subscribe(sub.service_ids.iter().map(|i| ServiceId(*i)).collect()),
            Request::Call(call) => Command::Call {
                handle: call.handle,
                selector: call.selector,
                scalars: call.scalars,
                struct_in: call.struct_in,
                struct_out_len: call.struct_out_len,
            },
        },
    )
}

fn open_mode(mode: i32) -> Result<OpenMode, Refusal> {
    match pb::OpenMode::try_from(mode) {
        Ok(pb::OpenMode::Shared) => Ok(OpenMode::Shared),
        Ok(pb::OpenMode::Exclusive) => Ok(OpenMode::Exclusive),
        Err(_) => Err(Refusal::new(Status::BadArgument, format!("unknown open mode {mode}"))),
    }
}

pub(crate) fn response(request_id: u64, result: Result<Reply, Refusal>) -> pb::ServerMessage {
    use pb::response::Result as R;
    let native = AbiId::native();
    let result = match result {
        // No gRPC request maps memory: descriptors need the native socket.
        Ok(Reply::Mapped { .. }) => Err(Refusal::new(
            Status::Unsupported,
            "mapping memory needs the native transport",
        )),
        other => other,
    };
    let response = match result {
        Ok(reply) => {
            let result = match reply {
                Reply::Found(services) => R::Found(pb::FoundServices {
                    services: services.iter().map(|s| s.info(native)).collect(),
                }),
                Reply::Opened {
                    handle,
                    service,
                    privileges,
                } => R::Opened(pb::UserClientOpened {
                    handle,
                    service: Some(service.info(native)),
                    privileges,
                }),
                Reply::Called(out) => R::Call(pb::CallResult {
                    scalars: out.scalars,
                    struct_out: out.struct_out,
                }),
                Reply::Done | Reply::Mapped { .. } => R::Done(pb::Empty {}),
            };
            pb::Response {
                request_id,
                status: pb::StatusCode::Success.into(),
                result: Some(result),
                ..Default::default()
            }
        }
        Err(refusal) => {
            tracing::debug!(request_id, %refusal, "request refused");
            pb::Response {
                request_id,
                status: pb::StatusCode::from(refusal.status).into(),
                message: refusal.message,
                rule: refusal.rule.unwrap_or_default(),
                result: None,
            }
        }
    };
    pb::ServerMessage {
        kind: Some(Kind::Response(response)),
    }
}

/// The wire form of an event; `None` for events that only concern the broker itself.
fn event_message(event: SessionEvent) -> Option<pb::ServerMessage> {
    use pb::event::Kind as E;
    let kind = match event {
        SessionEvent::Core(CoreEvent::PolicyReloaded { .. }) => return None,
        SessionEvent::Core(CoreEvent::Published(service)) => E::Published(pb::ServicePublished {
            service: Some(service.info(AbiId::native())),
        }),
        SessionEvent::Core(CoreEvent::Terminated { id, name }) => {
            E::Terminated(pb::ServiceTerminated { service_id: id.0, name })
        }
        SessionEvent::Core(CoreEvent::Notice { service, notice }) => E::Notification(notification(&service, notice)),
        SessionEvent::UserClientClosed { handle, status, reason } => E::UserClientClosed(pb::UserClientClosed {
            handle,
            status: pb::StatusCode::from(status).into(),
            reason,
        }),
        SessionEvent::Lost(count) => E::Lost(pb::EventsLost { count }),
    };
    Some(pb::ServerMessage {
        kind: Some(Kind::Event(pb::Event { kind: Some(kind) })),
    })
}

fn notification(service: &Service, notice: crate::driver::DriverNotice) -> pb::Notification {
    pb::Notification {
        service_id: service.id().0,
        service_name: service.name().to_string(),
        kind: notice.kind.to_string(),
        value: notice.value,
        detail: notice.detail,
    }
}
