//! Rust client for the Portcullis device broker.
//!
//! A [`Client`] connects to a broker's gRPC socket; a [`Session`] is one bidirectional stream on
//! it: everything opened through a session is released by the broker when the session ends,
//! however it ends. [`blocking`] wraps the same API for programs without an async runtime.
//!
//! ```no_run
//! # async fn demo() -> Result<(), portcullis_client::ClientError> {
//! use portcullis_client::{Client, OpenMode, matching};
//!
//! let client = Client::connect(portcullis_client::default_run_dir()).await?;
//! let session = client.session().await?;
//! let service = session.find_one(matching::by_name("sample0")).await?;
//! let sample = session.open(service.id, OpenMode::Shared).await?;
//! let out = session.call_named(&sample, "add", &[2, 3], &[]).await?;
//! assert_eq!(out.scalars, vec![5]);
//! # Ok(()) }
//! ```
//!
//! Refusals carry the broker's [`Status`] and, for policy refusals, the deciding rule.

#![forbid(unsafe_code)]

pub mod blocking;
pub mod devices;
pub mod native;
pub mod ring;
mod session;

use std::{
    env, io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use hyper_util::rt::TokioIo;
pub use portcullis_proto::{Status, pb};
use portcullis_proto::{limits, pb::broker_client::BrokerClient};
pub use session::{CallOutput, Session, UserClient};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

pub use portcullis_proto::{GRPC_SOCKET, NATIVE_SOCKET};

/// Environment variable naming the run dir.
pub const RUN_DIR_ENV: &str = "PORTCULLIS_RUN_DIR";

/// Open modes.
pub use portcullis_proto::pb::OpenMode;

/// Where the system broker (run as root) serves.
pub const SYSTEM_RUN_DIR: &str = "/run/portcullis";

/// Where a client finds the broker, like the D-Bus system bus, with the same rule in the Rust
/// and C clients: `$PORTCULLIS_RUN_DIR` when set; else a broker of the user's own where one
/// serves (`$XDG_RUNTIME_DIR/portcullis` holds its socket); else the system broker,
/// `/run/portcullis`.
pub fn default_run_dir() -> PathBuf {
    find_run_dir(env::var_os(RUN_DIR_ENV), own_run_dir(), |dir| {
        dir.join(GRPC_SOCKET).exists() || dir.join(NATIVE_SOCKET).exists()
    })
}

/// The rule of [`default_run_dir`], given what it reads: `$PORTCULLIS_RUN_DIR`, the user's own
/// run dir, and whether a broker's socket is in a directory.
fn find_run_dir(named: Option<std::ffi::OsString>, own: Option<PathBuf>, serves: impl Fn(&Path) -> bool) -> PathBuf {
    if let Some(dir) = named.filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    match own {
        Some(own) if serves(&own) => own,
        _ => PathBuf::from(SYSTEM_RUN_DIR),
    }
}

/// Where a broker run by this user serves: `/run/portcullis` for root (its broker is the
/// system's), else `$XDG_RUNTIME_DIR/portcullis`; `None` without `XDG_RUNTIME_DIR` (a shared
/// directory like `/tmp` is never used: another user could take the name first).
pub fn own_run_dir() -> Option<PathBuf> {
    own_run_dir_of(rustix::process::geteuid().is_root(), env::var_os("XDG_RUNTIME_DIR"))
}

fn own_run_dir_of(root: bool, xdg: Option<std::ffi::OsString>) -> Option<PathBuf> {
    if root {
        return Some(PathBuf::from(SYSTEM_RUN_DIR));
    }
    xdg.filter(|d| !d.is_empty())
        .map(|dir| Path::new(&dir).join("portcullis"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_dir_named_wins_then_own_broker_then_system() {
        let own = Some(PathBuf::from("/run/user/1000/portcullis"));
        assert_eq!(
            find_run_dir(Some("/srv/pc".into()), own.clone(), |_| true),
            PathBuf::from("/srv/pc")
        );
        assert_eq!(
            find_run_dir(None, own.clone(), |d| d == Path::new("/run/user/1000/portcullis")),
            PathBuf::from("/run/user/1000/portcullis")
        );
        // No broker of the user's own: the system broker, with no option at all.
        assert_eq!(find_run_dir(None, own, |_| false), PathBuf::from(SYSTEM_RUN_DIR));
        assert_eq!(
            find_run_dir(Some("".into()), None, |_| true),
            PathBuf::from(SYSTEM_RUN_DIR)
        );
    }

    #[test]
    fn own_run_dir_is_never_a_shared_directory() {
        assert_eq!(own_run_dir_of(true, None), Some(PathBuf::from(SYSTEM_RUN_DIR)));
        assert_eq!(
            own_run_dir_of(false, Some("/run/user/1000".into())),
            Some(PathBuf::from("/run/user/1000/portcullis"))
        );
        assert_eq!(own_run_dir_of(false, None), None, "no /tmp fallback");
        assert_eq!(own_run_dir_of(false, Some("".into())), None);
    }
}

/// Why a socket could not be reached, in words that say what to do.
fn unreachable(path: &Path, error: &io::Error) -> String {
    let path = path.display();
    match error.kind() {
        io::ErrorKind::NotFound => format!(
            "no broker at {path}: the socket does not exist. Start one (`portcullis broker`), or say where one serves with --run-dir DIR or PORTCULLIS_RUN_DIR"
        ),
        io::ErrorKind::ConnectionRefused => format!(
            "no broker is listening on {path}: the socket is left from a broker that stopped. Start it again, or say where another serves with --run-dir DIR or PORTCULLIS_RUN_DIR"
        ),
        io::ErrorKind::PermissionDenied => format!(
            "permission denied on {path}: uid {} may not reach that socket (the mode of the socket or of a directory above it). Ask the broker's administrator, or use a broker of your own (--run-dir DIR)",
            rustix::process::geteuid().as_raw()
        ),
        _ => format!("cannot connect to {path}: {error}"),
    }
}

/// What went wrong talking to the broker.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The broker refused the request.
    #[error("{status}: {message}{}", rule.as_ref().map(|r| format!(" (rule {r:?})")).unwrap_or_default())]
    Refused {
        /// The status.
        status: Status,
        /// The broker's reason.
        message: String,
        /// The policy rule that decided, for policy refusals.
        rule: Option<String>,
    },
    /// The socket could not be reached: no broker there, a stale socket, or no permission
    /// (the message says which, and what to do).
    #[error("{message}")]
    Unreachable {
        /// The socket path.
        path: PathBuf,
        /// Why, and what to do.
        message: String,
    },
    /// The socket was reached but the connection failed.
    #[error("cannot connect to {path}: {source}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: tonic::transport::Error,
    },
    /// The broker serves as many connections as it may (overall, or for this user), and said so.
    #[error("the broker refused the connection: {0}")]
    Busy(String),
    /// The TCP/TLS endpoint could not be reached, or the handshake failed.
    #[error("cannot connect to {endpoint}: {source}")]
    ConnectTls {
        /// The address.
        endpoint: String,
        /// Why.
        source: tonic::transport::Error,
    },
    /// A gRPC-level failure.
    #[error("gRPC: {}: {}", .0.code(), .0.message())]
    Rpc(tonic::Status),
    /// The session ended (broker stopped or connection lost).
    #[error("the session ended")]
    Disconnected,
    /// The broker sent something this client does not understand.
    #[error("protocol: {0}")]
    Protocol(String),
    /// Nothing matched a lookup.
    #[error("not found: {0}")]
    NotFound(String),
}

impl From<tonic::Status> for ClientError {
    fn from(status: tonic::Status) -> ClientError {
        // The broker answers RESOURCE_EXHAUSTED on a connection it serves only to say it is
        // over a connection limit.
        if status.code() == tonic::Code::ResourceExhausted {
            return ClientError::Busy(status.message().to_string());
        }
        ClientError::Rpc(status)
    }
}

impl ClientError {
    /// Connecting to the socket at `path` failed.
    pub fn unreachable(path: &Path, error: &io::Error) -> ClientError {
        ClientError::Unreachable {
            path: path.to_path_buf(),
            message: unreachable(path, error),
        }
    }

    /// The broker's status, for refusals.
    pub fn status(&self) -> Option<Status> {
        match self {
            ClientError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// `Ok` for success, else the refusal, from a response's status, message and rule.
    pub(crate) fn check_reply(status: Status, message: String, rule: String) -> Result<(), ClientError> {
        if status == Status::Success {
            return Ok(());
        }
        Err(ClientError::Refused {
            status,
            message,
            rule: Some(rule).filter(|r| !r.is_empty()),
        })
    }

    /// The deciding policy rule, for policy refusals.
    pub fn rule(&self) -> Option<&str> {
        match self {
            ClientError::Refused { rule, .. } => rule.as_deref(),
            _ => None,
        }
    }
}

/// Matching dictionaries.
pub mod matching {
    use portcullis_proto::pb::Matching;

    /// Services named `name`.
    pub fn by_name(name: &str) -> Matching {
        Matching {
            name: name.to_string(),
            ..Matching::default()
        }
    }

    /// Services of class `class`.
    pub fn by_class(class: &str) -> Matching {
        Matching {
            class: class.to_string(),
            ..Matching::default()
        }
    }

    /// Every service.
    pub fn all() -> Matching {
        Matching::default()
    }
}

/// A gRPC channel to a Unix socket. The socket is connected once first, so that a failure
/// says why (no broker, a stale socket, no permission).
pub async fn uds_channel(path: &Path) -> Result<Channel, ClientError> {
    let first = UnixStream::connect(path)
        .await
        .map_err(|e| ClientError::unreachable(path, &e))?;
    let first = Arc::new(Mutex::new(Some(first)));
    let socket = path.to_path_buf();
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let (socket, first) = (socket.clone(), first.clone());
            async move {
                let ready = first.lock().unwrap_or_else(|e| e.into_inner()).take();
                let stream = match ready {
                    Some(stream) => stream,
                    None => UnixStream::connect(socket).await?,
                };
                Ok::<_, io::Error>(TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|source| ClientError::Connect {
            path: path.to_path_buf(),
            source,
        })
}

/// What a client needs for mutual TLS (PEM).
#[derive(Clone, Debug)]
pub struct TlsOptions {
    /// The CA that signed the broker's certificate.
    pub ca_pem: Vec<u8>,
    /// This client's certificate (its identity to the policy: SAN URI, SAN DNS, CN).
    pub cert_pem: Vec<u8>,
    /// This client's private key.
    pub key_pem: Vec<u8>,
    /// The name in the broker's certificate (SAN DNS).
    pub server_name: String,
}

/// A connection to a broker.
#[derive(Clone, Debug)]
pub struct Client {
    grpc: BrokerClient<Channel>,
}

impl Client {
    /// Connects to the broker serving `run_dir`.
    pub async fn connect(run_dir: impl AsRef<Path>) -> Result<Client, ClientError> {
        Client::connect_socket(&run_dir.as_ref().join(GRPC_SOCKET)).await
    }

    /// Connects to a broker's gRPC socket.
    pub async fn connect_socket(path: &Path) -> Result<Client, ClientError> {
        Ok(Client::over(uds_channel(path).await?))
    }

    /// Connects to a broker's TCP listener with mutual TLS: `addr` is `host:port`, `tls` the
    /// CA that signed the broker's certificate, this client's certificate and key, and the name
    /// the broker's certificate carries.
    pub async fn connect_tls(addr: &str, tls: &TlsOptions) -> Result<Client, ClientError> {
        let endpoint = format!("https://{addr}");
        let err = |source| ClientError::ConnectTls {
            endpoint: endpoint.clone(),
            source,
        };
        let config = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&tls.ca_pem))
            .identity(tonic::transport::Identity::from_pem(&tls.cert_pem, &tls.key_pem))
            .domain_name(tls.server_name.clone());
        let channel = Endpoint::from_shared(endpoint.clone())
            .map_err(err)?
            .tls_config(config)
            .map_err(err)?
            .connect()
            .await
            .map_err(err)?;
        Ok(Client::over(channel))
    }

    fn over(channel: Channel) -> Client {
        let grpc = BrokerClient::new(channel)
            .max_decoding_message_size(limits::MAX_GRPC_MESSAGE)
            .max_encoding_message_size(limits::MAX_GRPC_MESSAGE);
        Client { grpc }
    }

    /// The services matching the dictionary that this task may see (no session needed).
    pub async fn list_services(&self, matching: pb::Matching) -> Result<Vec<pb::ServiceInfo>, ClientError> {
        let response = self
            .grpc
            .clone()
            .list_services(pb::ListServicesRequest {
                matching: Some(matching),
            })
            .await?;
        Ok(response.into_inner().services)
    }

    /// Asks the broker to reload its policy (root or the broker's own user only). Returns the
    /// new policy generation and its rule count; a refused reload is `ClientError::Rpc` with the
    /// errors in its message.
    pub async fn reload_policy(&self) -> Result<(u64, u32), ClientError> {
        let response = self
            .grpc
            .clone()
            .reload_policy(pb::ReloadPolicyRequest { dry_run: false })
            .await?
            .into_inner();
        Ok((response.generation, response.rules))
    }

    /// What a reload would do, changing nothing: the revision the policy files now hold, and
    /// every live user client whose grant it would change (root or the broker's own user only).
    /// A policy that would be refused is `ClientError::Rpc` with the errors.
    pub async fn reload_policy_dry_run(&self) -> Result<pb::ReloadPolicyResponse, ClientError> {
        Ok(self
            .grpc
            .clone()
            .reload_policy(pb::ReloadPolicyRequest { dry_run: true })
            .await?
            .into_inner())
    }

    /// Every nub the kernel's buses published, each with how driver matching went for it
    /// (`candidates`; root or the broker's own user only).
    pub async fn list_nubs(&self) -> Result<Vec<pb::ServiceInfo>, ClientError> {
        Ok(self
            .grpc
            .clone()
            .list_nubs(pb::ListNubsRequest {})
            .await?
            .into_inner()
            .services)
    }

    /// What the broker holds for its clients (root or the broker's own user only).
    pub async fn stats(&self) -> Result<pb::StatsResponse, ClientError> {
        Ok(self.grpc.clone().stats(pb::StatsRequest {}).await?.into_inner())
    }

    /// The machine's power state as the broker's drivers have it, after doing `action` (sleep,
    /// wake, or nothing; root or the broker's own user only).
    pub async fn power(&self, action: pb::power_request::Action) -> Result<pb::PowerStatus, ClientError> {
        Ok(self
            .grpc
            .clone()
            .power(pb::PowerRequest { action: action.into() })
            .await?
            .into_inner())
    }

    /// Starts a session.
    pub async fn session(&self) -> Result<Session, ClientError> {
        Session::start(self.grpc.clone()).await
    }
}
