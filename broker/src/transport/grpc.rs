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
    io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream, UnixListener, UnixStream},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc},
    task::JoinSet,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};
use tonic::{Streaming, transport::server::Connected};

use crate::{
    registry::{Matching, OpenMode, Service, ServiceId},
    session::{
        Command, Core, CoreEvent, Live, Missed, PeerIdentity, Refusal, Reply, Session, SessionEvent, Started, TlsPeer,
        accounts::ConnectionSlot,
    },
    throttle::{Throttle, throttled_info},
};

/// Accepted connections handed to tonic but not yet taken by it.
const ACCEPT_QUEUE: usize = 64;

/// Connections over a limit that are still answered (every call: `RESOURCE_EXHAUSTED` with the
/// reason) so that the client can say why; more are closed at once.
const REFUSING: usize = 32;

/// How long a connection over a limit is kept to say why.
const REFUSAL_LINGER: Duration = Duration::from_secs(2);

/// What every HTTP/2 client sends first.
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Connection-level log lines (refused at a limit, handshake failed or timed out), which a
/// flood could otherwise multiply without bound.
static CONNECTION_LOG: Throttle = Throttle::new(20, Duration::from_secs(1));

/// How a connection reached tonic: the identity its calls are served under, or why it is
/// refused (every call is answered `RESOURCE_EXHAUSTED` with the reason; then it is closed).
#[derive(Clone, Debug)]
pub enum Peer {
    /// The kernel's view of a local peer, or a TCP peer's verified certificate.
    Known(Arc<PeerIdentity>),
    /// Over a limit.
    Refused(Arc<str>),
}

/// A connection with its identity, holding its connection slot, that has passed its handshake
/// (the TLS handshake for TCP, and the HTTP/2 preface, which it replays to tonic).
pub struct Conn<S> {
    inner: S,
    /// The preface, read ahead; served before anything else.
    replay: &'static [u8],
    info: Peer,
    /// A refused connection ends then, whatever the client does.
    linger: Option<Pin<Box<tokio::time::Sleep>>>,
    _slot: Option<ConnectionSlot>,
    _refusing: Option<OwnedSemaphorePermit>,
}

impl<S> std::fmt::Debug for Conn<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").field("info", &self.info).finish_non_exhaustive()
    }
}

impl<S> Conn<S> {
    fn lingered(&mut self, cx: &mut Context<'_>) -> bool {
        self.linger.as_mut().is_some_and(|l| l.as_mut().poll(cx).is_ready())
    }
}

impl<S> Connected for Conn<S> {
    type ConnectInfo = Peer;
    fn connect_info(&self) -> Peer {
        self.info.clone()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Conn<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.lingered(cx) {
            return Poll::Ready(Ok(()));
        }
        if !self.replay.is_empty() {
            let n = self.replay.len().min(buf.remaining());
            let (now, later) = self.replay.split_at(n);
            buf.put_slice(now);
            self.replay = later;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Conn<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.lingered(cx) {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
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
        if self.lingered(cx) {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// What [`preface`] says of a client that closed before sending one.
const EARLY_EOF: &str = "closed before its HTTP/2 preface";

/// Reads the HTTP/2 preface; anything else is not a gRPC client.
async fn preface<S: AsyncRead + Unpin>(stream: &mut S) -> io::Result<()> {
    let mut got = [0u8; PREFACE.len()];
    stream.read_exact(&mut got).await.map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => io::Error::new(io::ErrorKind::UnexpectedEof, EARLY_EOF),
        _ => e,
    })?;
    if &got == PREFACE {
        Ok(())
    } else {
        Err(io::Error::new(io::ErrorKind::InvalidData, "not an HTTP/2 client"))
    }
}

/// `stream`, registered with `runtime`'s reactor instead of the current one's.
fn rehome(stream: UnixStream, runtime: &tokio::runtime::Handle) -> std::io::Result<UnixStream> {
    let stream = stream.into_std()?;
    let _inside = runtime.enter();
    UnixStream::from_std(stream)
}

/// Accepts local connections: each gets its uid's connection slot, its identity and its
/// HTTP/2 preface read within the handshake timeout, off the accept path; a connection over a
/// limit is told why on its first call.
///
/// Two streams: the connections served in the foreground, and those of a uid beyond its first
/// `limits.foreground_connections_per_uid`, for the server on the background workers.
fn incoming(core: Arc<Core>, listener: UnixListener) -> (LocalIncoming, LocalIncoming) {
    let (tx, rx) = mpsc::channel(ACCEPT_QUEUE);
    let (background_tx, background_rx) = mpsc::channel(ACCEPT_QUEUE);
    let refusing = Arc::new(Semaphore::new(REFUSING));
    tokio::spawn(async move {
        loop {
            let mut stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                break;
            }
            let (core, ready, refusing) = (core.clone(), tx.clone(), refusing.clone());
            let background = background_tx.clone();
            tokio::spawn(async move {
                let cred = match stream.peer_cred() {
                    Ok(cred) => super::Cred {
                        uid: cred.uid(),
                        gid: cred.gid(),
                        pid: cred.pid(),
                    },
                    Err(e) => return tracing::warn!(error = %e, "no peer credentials; connection closed"),
                };
                let mut slot = match core.accounts().connect_local(cred.uid) {
                    Ok(slot) => slot,
                    Err(refusal) => {
                        throttled_info!(CONNECTION_LOG, uid = cred.uid, reason = %refusal, "gRPC connection refused at a limit");
                        if let Some(conn) = refused(stream, refusal.to_string(), &refusing).await {
                            let _ = ready.send(Ok(conn)).await;
                        }
                        return;
                    }
                };
                let handshake = core.accounts().limits().handshake_timeout();
                let admitted = tokio::time::timeout(handshake, async {
                    let identity = super::identify(&core, &stream, cred).await?;
                    preface(&mut stream).await.map_err(|e| e.to_string())?;
                    Ok::<_, String>(identity)
                })
                .await;
                match admitted {
                    Ok(Ok(identity)) => {
                        let (ready, stream) = match crate::server::background().filter(|_| slot.background()) {
                            Some(workers) => {
                                slot.serve_in_background();
                                // Registered with the background workers' reactor: served
                                // there, it must not wake the foreground's at every request.
                                match rehome(stream, workers) {
                                    Ok(stream) => (background, stream),
                                    Err(e) => {
                                        return tracing::warn!(error = %e, "a gRPC connection could not move to the background workers; closed");
                                    }
                                }
                            }
                            None => (ready, stream),
                        };
                        let conn = Conn {
                            inner: stream,
                            replay: PREFACE,
                            info: Peer::Known(Arc::new(identity)),
                            linger: None,
                            _slot: Some(slot),
                            _refusing: None,
                        };
                        let _ = ready.send(Ok(conn)).await;
                    }
                    // The client left before saying anything (a probe): nothing to report.
                    Ok(Err(e)) if e == EARLY_EOF => {
                        tracing::debug!(uid = cred.uid, "gRPC connection closed before its preface")
                    }
                    Ok(Err(e)) => throttled_info!(CONNECTION_LOG, uid = cred.uid, error = %e, "gRPC connection closed"),
                    Err(_) => throttled_info!(
                        CONNECTION_LOG,
                        uid = cred.uid,
                        timeout_ms = handshake.as_millis(),
                        "gRPC connection closed: no HTTP/2 preface within the handshake timeout"
                    ),
                }
            });
        }
    });
    (ReceiverStream::new(rx), ReceiverStream::new(background_rx))
}

/// Accepted local connections, ready to serve.
type LocalIncoming = ReceiverStream<io::Result<Conn<UnixStream>>>;

/// A connection over a limit, kept for a moment so that its first call learns why; `None`
/// when too many such are being answered already, or it is not an HTTP/2 client.
async fn refused<S: AsyncRead + Unpin>(mut stream: S, reason: String, refusing: &Arc<Semaphore>) -> Option<Conn<S>> {
    let permit = refusing.clone().try_acquire_owned().ok()?;
    tokio::time::timeout(REFUSAL_LINGER, preface(&mut stream))
        .await
        .ok()?
        .ok()?;
    Some(Conn {
        inner: stream,
        replay: PREFACE,
        info: Peer::Refused(reason.into()),
        linger: Some(Box::pin(tokio::time::sleep(REFUSAL_LINGER))),
        _slot: None,
        _refusing: Some(permit),
    })
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
    /// The TLS certificate, key or client CA could not be used.
    #[error("{path}: {message}")]
    Tls {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
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

/// The gRPC listener from a socket the service manager passed (already bound and listening).
pub fn listener_from(fd: std::os::fd::OwnedFd) -> Result<UnixListener, GrpcError> {
    let err = |source| GrpcError::Socket {
        path: "the socket systemd passed".into(),
        source,
    };
    let std = std::os::unix::net::UnixListener::from(fd);
    std.set_nonblocking(true).map_err(err)?;
    UnixListener::from_std(std).map_err(err)
}

/// Accepts TCP connections within the connection limit; each completes its TLS handshake
/// (a client certificate that chains to the configured CA) and sends its HTTP/2 preface within
/// the handshake timeout, off the accept path.
fn tcp_incoming(
    core: Arc<Core>,
    listener: TcpListener,
    acceptor: TlsAcceptor,
) -> ReceiverStream<io::Result<Conn<TlsStream<TcpStream>>>> {
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
            if tx.is_closed() {
                break;
            }
            let slot = match core.accounts().connect_remote() {
                Ok(slot) => slot,
                Err(refusal) => {
                    throttled_info!(CONNECTION_LOG, %remote, reason = %refusal, "TCP connection refused at a limit");
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let (ready, acceptor) = (tx.clone(), acceptor.clone());
            let handshake = core.accounts().limits().handshake_timeout();
            tokio::spawn(async move {
                let admitted = tokio::time::timeout(handshake, async {
                    let mut tls = acceptor
                        .accept(stream)
                        .await
                        .map_err(|e| format!("TLS handshake: {e}"))?;
                    let leaf = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .ok_or("no client certificate")?;
                    let peer = TlsPeer::from_der(leaf)?;
                    preface(&mut tls).await.map_err(|e| e.to_string())?;
                    Ok::<_, String>((tls, peer))
                })
                .await;
                match admitted {
                    Ok(Ok((tls, peer))) => {
                        let conn = Conn {
                            inner: tls,
                            replay: PREFACE,
                            info: Peer::Known(Arc::new(PeerIdentity::remote(peer))),
                            linger: None,
                            _slot: Some(slot),
                            _refusing: None,
                        };
                        let _ = ready.send(Ok(conn)).await;
                    }
                    Ok(Err(e)) => throttled_info!(CONNECTION_LOG, %remote, error = %e, "TCP connection closed"),
                    Err(_) => {
                        throttled_info!(CONNECTION_LOG, %remote, timeout_ms = handshake.as_millis(), "TCP connection closed: TLS handshake and HTTP/2 preface not done within the handshake timeout")
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// The TLS acceptor of `[tls]`: the broker's certificate and key, client certificates required
/// and verified against `client_ca`, HTTP/2 only.
pub fn server_tls(tls: &crate::config::TlsConfig) -> Result<TlsAcceptor, GrpcError> {
    use tokio_rustls::rustls::{
        RootCertStore, ServerConfig,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
        server::WebPkiClientVerifier,
    };
    let pem = |path: &Path, e: tokio_rustls::rustls::pki_types::pem::Error| GrpcError::Tls {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let certs = CertificateDer::pem_file_iter(&tls.cert)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| pem(&tls.cert, e))?;
    let key = PrivateKeyDer::from_pem_file(&tls.key).map_err(|e| pem(&tls.key, e))?;
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(&tls.client_ca).map_err(|e| pem(&tls.client_ca, e))? {
        roots
            .add(ca.map_err(|e| pem(&tls.client_ca, e))?)
            .map_err(|e| GrpcError::Tls {
                path: tls.client_ca.display().to_string(),
                message: e.to_string(),
            })?;
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let invalid = |e: tokio_rustls::rustls::Error| GrpcError::Tls {
        path: tls.cert.display().to_string(),
        message: e.to_string(),
    };
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| GrpcError::Tls {
            path: tls.client_ca.display().to_string(),
            message: e.to_string(),
        })?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(invalid)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(invalid)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Serves `Broker`, health and reflection to TCP clients with verified certificates until
/// `shutdown` completes.
pub async fn serve_tls(
    core: Arc<Core>,
    listener: TcpListener,
    tls: TlsAcceptor,
    shutdown: impl Future<Output = ()>,
) -> Result<(), GrpcError> {
    router(core.clone(), tonic::transport::Server::builder())
        .await?
        .serve_with_incoming_shutdown(tcp_incoming(core, listener, tls), shutdown)
        .await?;
    Ok(())
}

/// Serves `Broker`, health and reflection on the listener until `shutdown` completes.
pub async fn serve(
    core: Arc<Core>,
    listener: UnixListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), GrpcError> {
    let (foreground, background) = incoming(core.clone(), listener);
    // The same services on the background workers, for the connections routed there; they stop
    // when the foreground server does.
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let behind = router(core.clone(), tonic::transport::Server::builder())
        .await?
        .serve_with_incoming_shutdown(background, async move {
            let _ = stopped.wait_for(|s| *s).await;
        });
    let behind = match crate::server::background() {
        Some(workers) => workers.spawn(behind),
        None => tokio::spawn(behind),
    };
    let result = router(core, tonic::transport::Server::builder())
        .await?
        .serve_with_incoming_shutdown(foreground, async {
            shutdown.await;
            let _ = stop.send(true);
        })
        .await;
    // However the foreground server ended.
    let _ = stop.send(true);
    let _ = stop_background(behind).await;
    result?;
    Ok(())
}

/// Waits for the background server to finish its connections (it was told to stop with the
/// foreground one).
async fn stop_background(server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>) -> Result<(), ()> {
    match server.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "the background gRPC server failed");
            Err(())
        }
        Err(e) => {
            tracing::error!(error = %e, "the background gRPC server task failed");
            Err(())
        }
    }
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
    let own = crate::sandbox::starter_uid();
    if peer.tls.is_some() || (peer.uid != 0 && peer.uid != own) {
        tracing::warn!(uid = peer.uid, pid = %peer.pid_text(), "refused to {what}: not an administrator");
        return Err(tonic::Status::permission_denied(format!(
            "only root or the broker's own user may {what}"
        )));
    }
    Ok(peer)
}

/// The caller: the kernel's view of a local peer, or what a TCP peer's verified certificate
/// says; a connection over a limit is told which.
fn peer_of<T>(req: &tonic::Request<T>) -> Result<Arc<PeerIdentity>, tonic::Status> {
    match req.extensions().get::<Peer>() {
        Some(Peer::Known(peer)) => Ok(peer.clone()),
        Some(Peer::Refused(reason)) => Err(tonic::Status::resource_exhausted(reason.to_string())),
        None => Err(tonic::Status::unauthenticated(
            "the connection has no verified identity",
        )),
    }
}

#[tonic::async_trait]
impl pb::broker_server::Broker for BrokerService {
    type SessionStream = Pin<Box<dyn Stream<Item = Result<pb::ServerMessage, tonic::Status>> + Send>>;

    async fn session(
        &self,
        req: tonic::Request<Streaming<pb::ClientMessage>>,
    ) -> Result<tonic::Response<Self::SessionStream>, tonic::Status> {
        let peer = peer_of(&req)?;
        // Responses and events queued to this session's client before the session waits for
        // it to read (back-pressure: a client that does not read stops being served, nobody
        // else does; the events it misses meanwhile are counted and told).
        let queue = self.core.accounts().limits().max_queued_messages_per_session;
        let (tx, rx) = mpsc::channel::<Outgoing>(queue);
        tokio::spawn(run_session(Box::new(SessionTask {
            session: Session::new(self.core.clone(), peer, AbiId::native()),
            core: self.core.clone(),
            inbound: req.into_inner(),
            tx,
        })));
        // A message stops counting against its account when tonic takes it to send.
        let stream = ReceiverStream::new(rx).map(|(_queued, message)| message.map(|m| *m));
        Ok(tonic::Response::new(Box::pin(stream)))
    }

    async fn reload_policy(
        &self,
        req: tonic::Request<pb::ReloadPolicyRequest>,
    ) -> Result<tonic::Response<pb::ReloadPolicyResponse>, tonic::Status> {
        let peer = admin(&req, "reload the policy")?;
        if req.get_ref().dry_run {
            tracing::info!(uid = peer.uid, pid = %peer.pid_text(), "policy reload dry run requested");
            let (revision, changes) = self
                .core
                .reload_dry_run()
                .map_err(|e| tonic::Status::failed_precondition(e.to_string()))?;
            let status = self.core.policy_status();
            return Ok(tonic::Response::new(pb::ReloadPolicyResponse {
                generation: status.generation,
                rules: u32::try_from(status.rules).unwrap_or(u32::MAX),
                revision,
                would_change: changes
                    .into_iter()
                    .map(|c| pb::GrantChange {
                        uid: c.uid,
                        pid: c.pid,
                        service: c.service,
                        handle: c.handle,
                        change: c.change,
                    })
                    .collect(),
            }));
        }
        tracing::info!(uid = peer.uid, pid = %peer.pid_text(), "policy reload requested");
        match self.core.reload_policy() {
            Ok((generation, rules)) => Ok(tonic::Response::new(pb::ReloadPolicyResponse {
                generation,
                rules: u32::try_from(rules).unwrap_or(u32::MAX),
                revision: self.core.policy().revision().to_string(),
                would_change: Vec::new(),
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
            queued_messages: n(s.queued_messages),
            connections: n(s.connections),
            background_connections: n(s.background_connections),
            threads: n(s.threads),
            rss_bytes: s.rss_bytes,
            power: Some(power_status(&self.core.power().status())),
            install: crate::server::install().map(|i| {
                let text =
                    |p: &Option<std::path::PathBuf>| p.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
                pb::BrokerInstall {
                    config: text(&i.config),
                    drivers: text(&i.drivers),
                    binary: text(&i.binary),
                    release: i.release,
                    version: env!("CARGO_PKG_VERSION").to_string(),
                }
            }),
            policy: Some(policy_status(&self.core.policy_status())),
            sandbox: tokio::task::spawn_blocking(crate::sandbox::report)
                .await
                .unwrap_or_default()
                .into_iter()
                .map(|(role, p)| pb::ProcessSandbox {
                    role,
                    pid: p.pid,
                    uids: p.uids.to_vec(),
                    cap_effective: p.cap_eff,
                    cap_permitted: p.cap_prm,
                    cap_bounding: p.cap_bnd,
                    cap_ambient: p.cap_amb,
                    no_new_privs: p.no_new_privs,
                    seccomp: p.seccomp,
                    seccomp_filters: p.seccomp_filters,
                    landlock: p.landlock,
                })
                .collect(),
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

    async fn list_nubs(
        &self,
        req: tonic::Request<pb::ListNubsRequest>,
    ) -> Result<tonic::Response<pb::ListServicesResponse>, tonic::Status> {
        admin(&req, "list the nubs")?;
        let services = self
            .core
            .registry()
            .find(&Matching::default())
            .iter()
            .filter(|s| crate::bus::is_kernel_internal(s.class()))
            .map(|s| s.info(AbiId::native()))
            .collect();
        Ok(tonic::Response::new(pb::ListServicesResponse { services }))
    }

    async fn power(
        &self,
        req: tonic::Request<pb::PowerRequest>,
    ) -> Result<tonic::Response<pb::PowerStatus>, tonic::Status> {
        use pb::power_request::Action;
        let action = Action::try_from(req.get_ref().action)
            .map_err(|_| tonic::Status::invalid_argument("unknown power action"))?;
        let status = match action {
            Action::Status => {
                admin(&req, "read the power state")?;
                self.core.power().status()
            }
            Action::Sleep => {
                let peer = admin(&req, "put the devices to sleep")?;
                tracing::info!(uid = peer.uid, pid = %peer.pid_text(), "sleep requested");
                crate::power::sleep(&self.core, crate::power::Source::Admin).await
            }
            Action::Wake => {
                let peer = admin(&req, "wake the devices")?;
                tracing::info!(uid = peer.uid, pid = %peer.pid_text(), "wake requested");
                crate::power::wake(&self.core, crate::power::Source::Admin).await
            }
        };
        Ok(tonic::Response::new(power_status(&status)))
    }
}

/// The power state on the wire.
fn power_status(p: &crate::power::PowerStatus) -> pb::PowerStatus {
    pb::PowerStatus {
        asleep: p.asleep,
        sleeps: p.sleeps,
        wakes: p.wakes,
        last_source: p.last_source.clone(),
        order: p.order.clone(),
        failures: p.failures.clone(),
        logind: p.logind,
        assertions: p.assertions as u64,
        waiting_calls: p.waiting_calls as u64,
    }
}

/// The running policy on the wire.
fn policy_status(p: &crate::session::PolicyStatus) -> pb::PolicyStatus {
    pb::PolicyStatus {
        revision: p.revision.clone(),
        generation: p.generation,
        mode: if p.audit { "audit" } else { "enforce" }.into(),
        files: p.files.iter().map(|f| f.display().to_string()).collect(),
        rules: u32::try_from(p.rules).unwrap_or(u32::MAX),
        last_reload: p.last_reload.as_ref().map(|r| pb::ReloadRecord {
            time: r.time,
            accepted: r.accepted,
            revision: r.revision.clone(),
            error: r.error.clone(),
            generation: r.generation,
        }),
    }
}

/// A message for the client, counted against its account while it waits in the queue. Boxed:
/// a message is 280 bytes inline and the queue allocates its slots 32 at a time, so every idle
/// session would hold 9 KiB of empty slots.
type Outgoing = (Live, Result<Box<pb::ServerMessage>, tonic::Status>);
type Outbound = mpsc::Sender<Outgoing>;

/// What a session's task serves: boxed, so that the task keeps one pointer to it. A value moved
/// into an async function is kept twice in its future (the argument and the local it becomes),
/// and every idle session paid for both copies.
pub(super) struct SessionTask {
    session: Session,
    core: Arc<Core>,
    inbound: Streaming<pb::ClientMessage>,
    tx: Outbound,
}

/// Serves one session until the client's stream ends, its connection drops, or the broker
/// stops; then the session is dropped, releasing everything it held.
///
/// The task's size is that of the largest state it can be in, and it lasts as long as the
/// session: what only a closing session does (the shutdown's wait, the goodbye) runs boxed,
/// and messages travel boxed, as the queue takes them.
pub(super) async fn run_session(mut task: Box<SessionTask>) {
    let SessionTask {
        session,
        core,
        inbound,
        tx,
    } = &mut *task;
    let mut events = session.take_events();
    // Asynchronous calls in flight, each sending its own response when it completes.
    let mut calls = JoinSet::new();
    // Events left out because the account's queue was full, told to the client once there is room.
    let mut lost = 0u64;
    // With traffic recording on: this session's messages, as one `grpc_request` seed.
    let mut recorded: Option<Vec<u8>> = crate::capture::enabled().then(Vec::new);
    let goodbye = loop {
        tokio::select! {
            message = inbound.message() => match message {
                Ok(Some(message)) => {
                    if let Some(rec) = recorded.as_mut().filter(|r| r.len() < 64 * 1024) {
                        let _ = prost::Message::encode_length_delimited(&message, rec);
                    }
                    let reply = handle(session, message, tx, &mut calls);
                    // Events the request caused (user clients a policy reload closed) come first.
                    let out = session
                        .take_outbox()
                        .into_iter()
                        .filter_map(event_message)
                        .map(Box::new)
                        .chain(reply);
                    if send_all(tx, session, out).await.is_err() {
                        break None;
                    }
                    if let Some(ended) = session.end_reason() {
                        break Some((ended.status, ended.message.clone()));
                    }
                }
                Ok(None) => break None,
                Err(status) => {
                    // Tell the client why its stream ends (an oversized or undecodable message).
                    tracing::debug!(%status, "session stream failed");
                    let _ = tx.send((Live::new(&session.account().queued), Err(status))).await;
                    break None;
                }
            },
            event = events.recv() => {
                let out = match event {
                    Ok(event) => session.on_core_event(&event),
                    Err(Missed::Lagged(n)) => session.on_events_lost(n),
                    Err(Missed::Closed) => break None,
                };
                if send_events(tx, session, out, &mut lost).await.is_err() {
                    break None;
                }
            }
            Some(_) = calls.join_next(), if !calls.is_empty() => {}
            () = crate::session::idle(session.idle_deadline()) => {
                if let Some(idle) = session.idle_close() {
                    tracing::debug!(uid = session.peer().uid, "idle gRPC session closed");
                    break Some((idle.status, idle.message));
                }
            }
            () = core.stopping() => {
                Box::pin(finish_for_shutdown(session, core, &mut calls)).await;
                break Some((Status::Aborted, "the broker is stopping".to_string()));
            }
            () = tx.closed() => break None,
        }
    };
    if let Some((status, reason)) = goodbye {
        let message = Box::new(goodbye_message(status, reason));
        let _ = send_all(tx, session, std::iter::once(message)).await;
    }
    if let Some(rec) = recorded.filter(|r| !r.is_empty()) {
        crate::capture::record("grpc_request", &rec);
    }
}

/// The broker is stopping: no more requests are read; calls in flight may finish within the
/// shutdown deadline (their responses are sent), then the rest are aborted.
async fn finish_for_shutdown(session: &mut Session, core: &Core, calls: &mut JoinSet<()>) {
    let deadline = core.accounts().limits().shutdown_timeout();
    if tokio::time::timeout(deadline, async { while calls.join_next().await.is_some() {} })
        .await
        .is_err()
    {
        // Their user clients closed, the calls end with ABORTED, which their tasks send.
        session.close_all("the broker is stopping");
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while calls.join_next().await.is_some() {}
        })
        .await;
    }
}

/// Sends responses in order; `Err` when the client has gone.
async fn send_all(
    tx: &Outbound,
    session: &Session,
    messages: impl Iterator<Item = Box<pb::ServerMessage>>,
) -> Result<(), ()> {
    for message in messages {
        // A place in the queue first, then the message: the wait does not hold it.
        let permit = tx.reserve().await.map_err(drop)?;
        permit.send((Live::new(&session.account().queued), Ok(message)));
    }
    Ok(())
}

/// Sends events while the account's queue and the session's have room; the others are
/// counted in `lost` and the client is told how many with the next event that fits. `Err` when
/// the client has gone.
async fn send_events(tx: &Outbound, session: &Session, events: Vec<SessionEvent>, lost: &mut u64) -> Result<(), ()> {
    // Queues one message without waiting: `false` when the account or the session is full.
    let queue = |message: pb::ServerMessage| -> Result<bool, ()> {
        let Some(room) = session.account().take_queued() else {
            return Ok(false);
        };
        match tx.try_send((room, Ok(Box::new(message)))) {
            Ok(()) => Ok(true),
            Err(mpsc::error::TrySendError::Full(_)) => Ok(false),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(()),
        }
    };
    for message in events.into_iter().filter_map(event_message) {
        if *lost > 0 {
            let note = event_message(SessionEvent::Lost(*lost)).ok_or(())?;
            if !queue(note)? {
                *lost += 1;
                continue;
            }
            *lost = 0;
        }
        if !queue(message)? {
            if *lost == 0 {
                crate::throttle::throttled_info!(LOST_LOG, uid = session.peer().uid, pid = %session.peer().pid_text(), "a session's client does not read: events dropped (limits.max_queued_messages_per_uid or max_queued_messages_per_session), and it is told how many");
            }
            *lost += 1;
        }
    }
    Ok(())
}

/// Sessions whose client left events unread, logged at this rate at most.
static LOST_LOG: crate::throttle::Throttle = crate::throttle::Throttle::new(10, Duration::from_secs(1));

/// Handles one request. Returns the response to send now; an asynchronous call's response is
/// sent by its own task (in `calls`) when it completes.
fn handle(
    session: &mut Session,
    message: pb::ClientMessage,
    tx: &Outbound,
    calls: &mut JoinSet<()>,
) -> Option<Box<pb::ServerMessage>> {
    let id = message.request_id;
    let started = match command(message.request) {
        Ok(command) => session.execute(command),
        Err(refusal) => Started::Now(Err(refusal)),
    };
    match started {
        Started::Now(result) => Some(Box::new(response(id, result))),
        Started::Later(pending) => {
            let tx = tx.clone();
            let queued = session.account().queued.clone();
            calls.spawn(async move {
                let response = response(id, pending.await);
                let _ = tx.send((Live::new(&queued), Ok(Box::new(response)))).await;
            });
            None
        }
    }
}

/// The last message of a session the broker ends: why.
fn goodbye_message(status: Status, reason: String) -> pb::ServerMessage {
    pb::ServerMessage {
        kind: Some(Kind::Event(pb::Event {
            kind: Some(pb::event::Kind::Goodbye(pb::Goodbye {
                status: pb::StatusCode::from(status).into(),
                reason,
            })),
        })),
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
            Request::WatchMatching(watch) => Command::WatchMatching(
                Matching::try_from(watch.matching).map_err(|e| Refusal::new(Status::BadArgument, e.to_string()))?,
            ),
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
        SessionEvent::Core(CoreEvent::WillSleep) => E::WillSleep(pb::WillSleep {}),
        SessionEvent::Core(CoreEvent::HasWoken) => E::HasWoken(pb::HasWoken {}),
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
