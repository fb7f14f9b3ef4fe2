//! Assembling a broker from its configuration and running it until it is told to stop.

use std::{
    future::Future,
    io,
    path::{Path, PathBuf},
    sync::Arc,
};

use portcullis_proto::{GRPC_SOCKET, NATIVE_SOCKET};

use crate::{
    bus::{self, BusError, hotplug::Hotplug, netlink::UeventSocket, sysfs::Sysfs},
    config::{self, Config, ConfigError},
    registry::personality::Personalities,
    session::{Core, DecisionLog},
    transport::{
        grpc::{self, GrpcError},
        native::{self, NativeError},
    },
};

/// What `portcullis broker` was asked to run.
#[derive(Debug)]
pub struct BrokerOptions {
    /// Config file; `None` for the embedded default.
    pub config: Option<PathBuf>,
    /// Policy file or directory; overrides the config's; `None` for the config's or the default.
    pub policy: Option<PathBuf>,
    /// Where the sockets live.
    pub run_dir: PathBuf,
    /// Decision log file; overrides the config's.
    pub decision_log: Option<PathBuf>,
    /// Listening sockets systemd passed (socket activation), served instead of binding.
    pub activated: Option<crate::systemd::Activated>,
    /// Stop once no client has been connected for this long (with socket activation: systemd
    /// starts the broker again at the next connection).
    pub exit_idle: Option<std::time::Duration>,
}

/// What the broker runs from: its files and build, for `portcullis qualify`'s install checklist
/// (`stats` reports it).
#[derive(Clone, Debug, Default)]
pub struct Install {
    /// The configuration file (`None`: the embedded default).
    pub config: Option<PathBuf>,
    /// The driver personalities directory, if any.
    pub drivers: Option<PathBuf>,
    /// The broker's executable, as it was at start.
    pub binary: Option<PathBuf>,
    /// Whether this is an optimized release build.
    pub release: bool,
}

static INSTALL: std::sync::OnceLock<Install> = std::sync::OnceLock::new();

/// What this broker runs from (set when it starts).
pub fn install() -> Option<&'static Install> {
    INSTALL.get()
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// In the run dir: the TLS listener's address once bound (useful with `listen = "…:0"`).
pub const TLS_ADDR_FILE: &str = "tls.addr";

/// Why the broker could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// Configuration or policy is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A device could not be published.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The driver personalities have errors (`portcullis driver lint` shows the same).
    #[error("driver personalities:\n{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Personalities(Vec<portcullis_policy::SourceError>),
    /// The run dir could not be prepared.
    #[error("run dir {path}: {source}")]
    RunDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The decision log could not be opened.
    #[error("decision log {path}: {source}")]
    DecisionLog {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The sandbox could not be entered.
    #[error(transparent)]
    Sandbox(#[from] crate::sandbox::SandboxError),
    /// The TLS listener could not be bound.
    #[error("TLS listener {addr}: {source}")]
    Listen {
        /// The configured address.
        addr: std::net::SocketAddr,
        /// The OS error.
        source: io::Error,
    },
    /// The gRPC transport failed.
    #[error(transparent)]
    Grpc(#[from] GrpcError),
    /// The native transport could not start.
    #[error(transparent)]
    Native(#[from] NativeError),
    /// A transport task failed.
    #[error("transport task: {0}")]
    Task(String),
}

/// Builds the core: policy loaded, the virtual bus and its devices published.
pub fn build_core(config: &Config, policy: Option<&Path>) -> Result<Arc<Core>, BrokerError> {
    let policy_path = policy_path(config, policy);
    let policy_path = policy_path.as_deref();
    let policy = config::load_policy_trusted(policy_path)?;
    // The parse's own memory (the text, its TOML tree) is free now: hand it back.
    crate::sys::release_free_memory();
    tracing::info!(source = %policy_path.map_or("embedded default".into(), |p| p.display().to_string()), rules = policy.rule_count(), revision = policy.revision(), "policy loaded");
    let max_connections = config.max_connections.unwrap_or(config::DEFAULT_MAX_CONNECTIONS);
    let core = Core::with_limits(
        policy,
        policy_path.map(Path::to_path_buf),
        max_connections,
        config.limits,
    );
    core.power().configure(&config.power);
    bus::publish(&core, config)?;
    // The broker's own power domain (IOPMrootDomain): policy decides who sees and opens it.
    core.publish(
        Some(core.registry().root()),
        "power",
        crate::drivers::power::FAMILY.class,
        Default::default(),
        Some(Arc::new(crate::drivers::power::PowerDomain::new(core.power().clone()))),
    )
    .map_err(BusError::from)?;
    Ok(core)
}

/// Makes the run dir ready. A new one is created mode 0755 (every local user may reach the
/// sockets, which are the doors; the policy is the gate) and given to `owner` (the serving
/// process's uid), which then removes its sockets when it stops. One that exists is used as it
/// is — its mode and owner are never changed — but refused when it is a symbolic link,
/// belongs to another user than the one starting the broker or its service user, or others
/// may write it (they could replace the sockets).
fn prepare_run_dir(dir: &Path, owner: u32) -> Result<(), BrokerError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let err = |source| BrokerError::RunDir {
        path: dir.to_path_buf(),
        source,
    };
    let refuse = |why: String| err(io::Error::new(io::ErrorKind::InvalidInput, why));
    let starter = crate::sandbox::starter_uid();
    match std::fs::symlink_metadata(dir) {
        Ok(meta) if meta.file_type().is_symlink() => Err(refuse(
            "is a symbolic link: the broker serves only in a directory named as itself".into(),
        )),
        Ok(meta) if !meta.is_dir() => Err(refuse("is not a directory".into())),
        Ok(meta) => {
            if meta.uid() != starter && meta.uid() != owner {
                return Err(refuse(format!(
                    "belongs to uid {}, not the broker's uid {starter}{}: another user could replace the sockets",
                    meta.uid(),
                    if owner == starter {
                        String::new()
                    } else {
                        format!(" or its service user's {owner}")
                    }
                )));
            }
            if meta.mode() & 0o022 != 0 {
                return Err(refuse(format!(
                    "is writable by others (mode {:o}): they could replace the sockets; chmod go-w it",
                    meta.mode() & 0o7777
                )));
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(parent) = dir.parent() {
                std::fs::create_dir_all(parent).map_err(err)?;
            }
            std::fs::DirBuilder::new().mode(0o755).create(dir).map_err(err)?;
            // The umask may have taken bits away: set the mode on the directory just created,
            // through a descriptor that refuses to follow a link swapped in meanwhile.
            let fd = rustix::fs::open(
                dir,
                rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )
            .map_err(|e| err(e.into()))?;
            rustix::fs::fchmod(&fd, rustix::fs::Mode::from_raw_mode(0o755)).map_err(|e| err(e.into()))?;
            if owner != starter {
                let gid = crate::sandbox::serving_ids().map(|(_, g)| rustix::process::Gid::from_raw(g));
                rustix::fs::fchown(&fd, Some(rustix::process::Uid::from_raw(owner)), gid).map_err(|e| err(e.into()))?;
            }
            Ok(())
        }
        Err(e) => Err(err(e)),
    }
}

/// The drivers' state directory in the run dir ([`crate::drivers::state`]): made when missing
/// (mode 0700), kept when a broker before this one left it, and given to the serving process's
/// user either way; a link or anything but a directory in its place is refused.
fn prepare_state_dir(run_dir: &Path, owner: u32) -> Result<PathBuf, BrokerError> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = run_dir.join(crate::drivers::state::STATE_DIR);
    let err = |source| BrokerError::RunDir {
        path: dir.clone(),
        source,
    };
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(err(e)),
    }
    let fd = rustix::fs::open(
        &dir,
        rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| err(e.into()))?;
    rustix::fs::fchmod(&fd, rustix::fs::Mode::from_raw_mode(0o700)).map_err(|e| err(e.into()))?;
    if rustix::fs::fstat(&fd).map_err(|e| err(e.into()))?.st_uid != owner {
        let gid = crate::sandbox::serving_ids().map(|(_, g)| rustix::process::Gid::from_raw(g));
        rustix::fs::fchown(&fd, Some(rustix::process::Uid::from_raw(owner)), gid).map_err(|e| err(e.into()))?;
    }
    Ok(dir)
}

/// The broker's async runtime: a worker per CPU, I/O and timers, and each thread's seccomp
/// filter added as it starts (benchmarks serve on the same).
pub fn runtime() -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_start(crate::sandbox::thread_started)
        .build()
}

/// The background workers: the connections of a uid that holds more than
/// `limits.foreground_connections_per_uid` are served here, by a thread at idle priority
/// (`SCHED_IDLE`, which a process may choose without privilege), so that they run only when no
/// other client's work wants the CPU. Started at the first such connection; one worker (the
/// less CPU the background may take at once, the less it feeds a flooder); never stopped
/// (their connections end with the process). `None` if it could not be started (every
/// connection is then served in the foreground).
pub fn background() -> Option<&'static tokio::runtime::Handle> {
    static BACKGROUND: std::sync::OnceLock<Option<tokio::runtime::Runtime>> = std::sync::OnceLock::new();
    BACKGROUND
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .thread_name("pc-background")
                .on_thread_start(|| {
                    if let Err(e) = crate::sys::idle_priority() {
                        tracing::warn!(error = %e, "a background worker runs at normal priority");
                    }
                    crate::sandbox::thread_started();
                })
                .build()
                .inspect_err(|e| {
                    tracing::error!(error = %e, "cannot start the background workers: every connection is served in the foreground");
                })
                .ok()
        })
        .as_ref()
        .map(tokio::runtime::Runtime::handle)
}

/// A broker ready to run: what needed privilege is done, and the process is confined.
pub struct Prepared {
    options: BrokerOptions,
    config: Config,
    personalities: Option<Personalities>,
    decision_log: Option<(PathBuf, std::fs::File)>,
    tls: Option<(std::net::TcpListener, tokio_rustls::TlsAcceptor)>,
    /// The gRPC and native sockets, bound (not listening) — unless the service manager passed
    /// them.
    bound: (Option<std::os::fd::OwnedFd>, Option<std::os::fd::OwnedFd>),
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("options", &self.options)
            .field("tls", &self.tls.as_ref().map(|(l, _)| l.local_addr().ok()))
            .finish_non_exhaustive()
    }
}

/// Everything before the runtime, in order: the configuration and personalities read; the
/// privileged helper forked (a root broker); what still needs the starting user's privilege
/// (the run dir, the decision log, the TLS key and listener); then the sandbox entered
/// ([`crate::sandbox::confine`]). Must run while the process has one thread.
pub fn prepare(options: BrokerOptions) -> Result<Prepared, BrokerError> {
    crate::sys::limit_allocator_arenas();
    // While the broker may still raise the hard limit (root, before the sandbox).
    let descriptors = crate::sys::raise_descriptor_limit();
    tracing::debug!(descriptors, "descriptor limit");
    // Before the sandbox, whose filters leave out the call that tells.
    let shared_pidfds = crate::session::identity::pidfds_are_pidfs();
    tracing::debug!(shared_pidfds, "a process's connections share one pidfd");
    let config = Config::load_trusted(options.config.as_deref())?;
    let _ = INSTALL.set(Install {
        config: options.config.as_deref().map(absolute),
        drivers: config.drivers.as_deref().map(absolute),
        binary: std::env::current_exe().ok(),
        release: !cfg!(debug_assertions),
    });
    let personalities = match (&config.drivers, config.discovery) {
        (_, Some(false)) => None,
        (Some(dir), _) => {
            Some(Personalities::load_dir(dir, crate::trust::enforced()).map_err(BrokerError::Personalities)?)
        }
        (None, _) => Some(Personalities::default()),
    };
    crate::sandbox::start_helper(&config.sandbox, || {
        crate::sandbox::helper::Grants::new(&config, personalities.clone().unwrap_or_default())
    })?;
    let owner = crate::sandbox::serving_ids().map_or_else(crate::sandbox::starter_uid, |(uid, _)| uid);
    prepare_run_dir(&options.run_dir, owner)?;
    crate::drivers::state::set_dir(&prepare_state_dir(&options.run_dir, owner)?);
    let decision_log = match options.decision_log.as_ref().or(config.decision_log.as_ref()) {
        Some(path) => Some((
            path.clone(),
            DecisionLog::open_file(path).map_err(|source| BrokerError::DecisionLog {
                path: path.clone(),
                source,
            })?,
        )),
        None => None,
    };
    // The TCP listener first, its address written, so that a client that sees the Unix
    // sockets also finds `tls.addr` (the sockets appearing is what clients take as ready).
    let tls = match &config.tls {
        Some(tls) => {
            let acceptor = grpc::server_tls(tls)?;
            let listen_err = |source| BrokerError::Listen {
                addr: tls.listen,
                source,
            };
            let listener = std::net::TcpListener::bind(tls.listen).map_err(listen_err)?;
            listener.set_nonblocking(true).map_err(listen_err)?;
            let local = listener.local_addr().map_err(listen_err)?;
            tracing::info!(tls = %local, "serving gRPC over TCP with mutual TLS");
            std::fs::write(options.run_dir.join(TLS_ADDR_FILE), local.to_string()).map_err(|source| {
                BrokerError::RunDir {
                    path: options.run_dir.clone(),
                    source,
                }
            })?;
            Some((listener, acceptor))
        }
        None => None,
    };
    // The Unix sockets, bound while the run dir may still need root to write.
    let socket_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BrokerError::RunDir { path, source }
    };
    let activated = options.activated.as_ref();
    let grpc_path = options.run_dir.join(GRPC_SOCKET);
    let native_path = options.run_dir.join(NATIVE_SOCKET);
    let bound = (
        match activated.and_then(|a| a.grpc.as_ref()) {
            Some(_) => None,
            None => Some(
                crate::transport::bind_unix(&grpc_path, rustix::net::SocketType::STREAM)
                    .map_err(socket_err(&grpc_path))?,
            ),
        },
        match activated.and_then(|a| a.native.as_ref()) {
            Some(_) => None,
            None => Some(
                crate::transport::bind_unix(&native_path, rustix::net::SocketType::SEQPACKET)
                    .map_err(socket_err(&native_path))?,
            ),
        },
    );
    // What the serving process reads from now on: the policy (and its directory, watched for
    // changes) and, when traffic is recorded for fuzzing, where it is written.
    let mut reads = Vec::new();
    if let Some(policy) = policy_path(&config, options.policy.as_deref()) {
        reads.push(policy.parent().map_or_else(|| policy.clone(), Path::to_path_buf));
        reads.push(policy);
    }
    let mut writes = vec![options.run_dir.clone()];
    if let Some(dir) = crate::capture::prepare_dir(owner) {
        writes.push(dir);
    }
    crate::sandbox::confine(&config.sandbox, &writes, &reads)?;
    Ok(Prepared {
        options,
        config,
        personalities,
        decision_log,
        tls,
        bound,
    })
}

/// The policy's path, absolute: the reload watcher and every later reload see the same file,
/// however it was spelled (`lab.toml`, `./lab.toml`, `$PWD/lab.toml`).
fn policy_path(config: &Config, policy: Option<&Path>) -> Option<PathBuf> {
    policy
        .or(config.policy.as_deref())
        .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()))
}

/// Runs the broker until `shutdown` completes, then removes its sockets.
pub async fn run(prepared: Prepared, shutdown: impl Future<Output = ()>) -> Result<(), BrokerError> {
    let Prepared {
        options,
        config,
        personalities,
        decision_log,
        tls,
        bound,
    } = prepared;
    let core = build_core(&config, options.policy.as_deref())?;
    if let Some((path, file)) = decision_log {
        core.set_decision_log(DecisionLog::start(file, &path));
        tracing::info!(path = %path.display(), "logging decisions");
    }
    let hotplug = start_discovery(&core, personalities)?;
    let mut watchers = Vec::new();
    let grpc_path = options.run_dir.join(GRPC_SOCKET);
    let native_path = options.run_dir.join(NATIVE_SOCKET);
    let tls_addr_path = options.run_dir.join(TLS_ADDR_FILE);
    let tls_listener = match tls {
        Some((listener, acceptor)) => {
            let listener = tokio::net::TcpListener::from_std(listener).map_err(|source| BrokerError::Listen {
                addr: config
                    .tls
                    .as_ref()
                    .map_or_else(|| ([0, 0, 0, 0], 0).into(), |t| t.listen),
                source,
            })?;
            Some((listener, acceptor))
        }
        None => None,
    };
    let mut activated = options.activated.unwrap_or_default();
    let activated_paths = (activated.grpc.is_some(), activated.native.is_some());
    // Listening only now, confined: the first connection meets the sandbox.
    let listening = |fd: Option<std::os::fd::OwnedFd>, path: &Path| -> Result<std::os::fd::OwnedFd, BrokerError> {
        let err = |source| BrokerError::RunDir {
            path: path.to_path_buf(),
            source,
        };
        let fd = fd.ok_or_else(|| err(io::Error::other("no socket bound")))?;
        crate::transport::listen(&fd).map_err(err)?;
        Ok(fd)
    };
    // The native socket first: whoever waits for the gRPC socket to accept (scripts, the test
    // harness) finds both listening.
    let native_listener = match activated.native.take() {
        Some(fd) => native::listener_from(fd)?,
        None => native::listener_from(listening(bound.1, &native_path)?)?,
    };
    let grpc_listener = match activated.grpc.take() {
        Some(fd) => grpc::listener_from(fd)?,
        None => grpc::listener_from(listening(bound.0, &grpc_path)?)?,
    };
    tracing::info!(grpc = %grpc_path.display(), native = %native_path.display(), socket_activated = activated_paths.0 || activated_paths.1, "serving");
    crate::systemd::ready(&format!("serving {}", options.run_dir.display()));
    let watchdog = crate::systemd::spawn_watchdog();
    let idle_exit = async {
        match options.exit_idle {
            Some(idle) => crate::systemd::idle_for(core.clone(), idle).await,
            None => std::future::pending().await,
        }
    };
    // One shutdown signal stops both transports, gracefully.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    tokio::spawn(reload_on_sighup(core.clone()));
    if config.power.follow_logind {
        tokio::spawn(crate::power::logind::follow(core.clone()));
    }
    if let Some(source) = core.policy_source().filter(|_| config.watch_policy != Some(false)) {
        match watch_policy(core.clone(), source) {
            Ok(watcher) => watchers.push(watcher),
            Err(e) => {
                tracing::warn!(error = %e, path = %source.display(), "cannot watch the policy files; reload with SIGHUP or `portcullis policy reload`")
            }
        }
    }
    let native_task = tokio::spawn(native::serve(
        core.clone(),
        native_listener,
        config.ring,
        stopped(stop_rx.clone()),
    ));
    let tls_task = tls_listener.map(|(listener, server_tls)| {
        tokio::spawn(grpc::serve_tls(
            core.clone(),
            listener,
            server_tls,
            stopped(stop_rx.clone()),
        ))
    });
    let mut grpc_task = tokio::spawn(grpc::serve(core.clone(), grpc_listener, stopped(stop_rx)));
    let result = tokio::select! {
        result = &mut grpc_task => Some(result),
        () = shutdown => None,
        () = crate::sandbox::helper_exited() => {
            tracing::error!("the privileged helper exited: stopping (the serving process does not run without it)");
            None
        }
        () = idle_exit => {
            tracing::info!("no client for the idle time: stopping (the service manager starts the broker again at the next connection)");
            None
        }
    };
    crate::systemd::stopping("stopping");
    if let Some(watchdog) = watchdog {
        watchdog.abort();
    }
    // Stop accepting; every session lets its calls in flight finish (or aborts them at the
    // deadline), says goodbye and ends; the transports then finish. A client that holds its
    // connection open after that does not hold the broker: it stops at the deadline regardless.
    core.stop();
    let _ = stop_tx.send(true);
    let grace = core.accounts().limits().shutdown_timeout() + std::time::Duration::from_secs(2);
    let stopping = async {
        let result = match result {
            Some(result) => result,
            None => (&mut grpc_task).await,
        };
        let _ = native_task.await;
        if let Some(task) = tls_task {
            match task.await {
                Ok(Err(e)) => tracing::error!(error = %e, "the TLS listener failed"),
                Err(e) => tracing::error!(error = %e, "the TLS listener task failed"),
                Ok(Ok(())) => {}
            }
        }
        result
    };
    let result = match tokio::time::timeout(grace, stopping).await {
        Ok(result) => result,
        Err(_) => {
            tracing::warn!(
                grace_ms = grace.as_millis(),
                "connections still open at the shutdown deadline are dropped"
            );
            Ok(Ok(()))
        }
    };
    // Sockets the service manager passed are its to keep (clients wait in their backlog for
    // the next start); the broker removes only what it made.
    let made = [
        (!activated_paths.0).then_some(&grpc_path),
        (!activated_paths.1).then_some(&native_path),
        Some(&tls_addr_path),
    ];
    for path in made.into_iter().flatten() {
        let _ = std::fs::remove_file(path);
    }
    drop(watchers);
    if let Some((hotplug, thread)) = hotplug {
        hotplug.stop();
        let _ = tokio::task::spawn_blocking(move || thread.map(std::thread::JoinHandle::join)).await;
    }
    tracing::info!("broker stopped");
    result
        .map_err(|e| BrokerError::Task(e.to_string()))?
        .map_err(BrokerError::from)
}

/// The kernel's bus: personalities loaded (a root broker refuses files others could change),
/// the uevent socket opened before sysfs is read (so that nothing happening in between is
/// missed), a nub published and matched per device, then events followed on a thread.
type Discovery = (Arc<Hotplug>, Option<std::thread::JoinHandle<()>>);

fn start_discovery(core: &Arc<Core>, personalities: Option<Personalities>) -> Result<Option<Discovery>, BrokerError> {
    let Some(personalities) = personalities else {
        tracing::info!("discovery is off: no kernel device is published");
        return Ok(None);
    };
    let socket = match UeventSocket::open() {
        Ok(socket) => Some(socket),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen to the kernel's device events: devices present at start are served, hotplug is not");
            None
        }
    };
    let hotplug = Hotplug::new(core.clone(), personalities, Sysfs::default())?;
    let started = std::time::Instant::now();
    hotplug.enumerate();
    tracing::info!(
        nubs = hotplug.nub_count(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "kernel devices published and matched"
    );
    let thread = match socket {
        Some(socket) => Some(hotplug.listen(socket).map_err(|e| BrokerError::Bus(BusError::Io(e)))?),
        None => None,
    };
    Ok(Some((hotplug, thread)))
}

/// Reloads the policy on every SIGHUP.
async fn reload_on_sighup(core: Arc<Core>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hangups) = signal(SignalKind::hangup()) else {
        return tracing::warn!("cannot handle SIGHUP; reload with `portcullis policy reload`");
    };
    while hangups.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading the policy");
        let _ = core.reload_policy();
    }
}

/// How long the policy files must be quiet before a change is reloaded (editors write in steps).
const SETTLE: std::time::Duration = std::time::Duration::from_millis(200);

/// Reloads the policy when a file of it changes. The directory is watched (for a single file,
/// its directory), so that editors that replace a file by renaming are seen too.
fn watch_policy(core: Arc<Core>, source: &Path) -> notify::Result<notify::RecommendedWatcher> {
    use notify::{RecursiveMode, Watcher};
    let source = std::path::absolute(source).unwrap_or_else(|_| source.to_path_buf());
    let (dir, only) = if source.is_dir() {
        (source.clone(), None)
    } else {
        (
            source.parent().map_or_else(|| PathBuf::from("/"), Path::to_path_buf),
            source.file_name().map(std::ffi::OsStr::to_os_string),
        )
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event {
            let relevant = event.kind.is_modify() || event.kind.is_create() || event.kind.is_remove();
            // The watch is on the one directory: a file of it is known by its name, however
            // the watcher spells the directory.
            let ours = only
                .as_ref()
                .is_none_or(|name| event.paths.iter().any(|p| p.file_name() == Some(name.as_os_str())));
            if relevant && ours {
                let _ = tx.send(());
            }
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            // Let the writes settle, then reload once for all of them.
            tokio::time::sleep(SETTLE).await;
            while rx.try_recv().is_ok() {}
            tracing::info!("policy files changed: reloading");
            let _ = core.reload_policy();
        }
    });
    Ok(watcher)
}
