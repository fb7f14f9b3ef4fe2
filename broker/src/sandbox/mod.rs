//! The broker's sandbox: a broker started as root splits, before it serves anyone, into a
//! small privileged [`helper`] and the serving process, which then gives up everything — its
//! uid (for `[sandbox] user`), every capability, the right to gain any (`no_new_privs`), the
//! file system outside its run dir and what it reads (Landlock), and every system call its
//! thread's role does not need ([`seccomp`]). A broker started by another user runs without
//! the helper, and says once what that costs.
//!
//! The order, in [`start_helper`] and [`confine`]: configuration and personalities are read
//! (as root); the helper is forked while the process has one thread; the serving process then
//! does what still needs root (TLS key, run dir, decision log, the TCP listener), becomes the
//! user, restricts its file system, installs the main thread's filter, and only then starts the
//! async runtime — whose threads add their own filters ([`thread_started`]).

pub mod helper;
mod privileges;
pub mod protocol;
pub mod seccomp;

use std::{os::fd::OwnedFd, path::PathBuf, sync::OnceLock};

use serde::Deserialize;

use self::{
    helper::{Client, Grants},
    protocol::{ProcessState, Request, Response},
    seccomp::{Filters, Role},
};

/// `[sandbox]` in the configuration.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxConfig {
    /// Split into helper and serving process and confine the serving process [default: true].
    /// `false` serves as whoever started the broker, with every privilege it has: for
    /// measuring the sandbox's cost, never in production.
    pub enabled: bool,
    /// The user the serving process becomes when the broker starts as root [default:
    /// `portcullis`, and `nobody` — with a warning — when there is no such user].
    pub user: Option<String>,
    /// Seccomp filters per thread role [default: true].
    pub seccomp: bool,
    /// Landlock: no file system beyond the run dir and what the broker reads [default: true].
    pub landlock: bool,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            enabled: true,
            user: None,
            seccomp: true,
            landlock: true,
        }
    }
}

/// The user a root broker serves as when the configuration names none.
pub const DEFAULT_USER: &str = "portcullis";

/// Why the sandbox could not be entered: the broker does not start.
#[derive(Debug, thiserror::Error)]
#[error("sandbox: {0}")]
pub struct SandboxError(pub String);

/// The helper, seen from the serving process.
#[derive(Debug)]
struct HelperProcess {
    client: Client,
    pid: u32,
    pidfd: OwnedFd,
}

static STARTER: OnceLock<u32> = OnceLock::new();
static HELPER: OnceLock<HelperProcess> = OnceLock::new();
static FILTERS: OnceLock<Filters> = OnceLock::new();
static LANDLOCK: OnceLock<String> = OnceLock::new();
static SERVING: OnceLock<(u32, u32)> = OnceLock::new();

/// The uid that started the broker: root, or the user running it. Its administrator (with
/// root): the user the serving process becomes is a service account, not a person, and
/// administers nothing.
pub fn starter_uid() -> u32 {
    *STARTER.get_or_init(|| rustix::process::geteuid().as_raw())
}

/// The helper's client, in a serving process that has one.
pub(crate) fn helper() -> Option<&'static Client> {
    HELPER.get().map(|h| &h.client)
}

/// The uid and gid the serving process will run as (after [`start_helper`]).
pub fn serving_ids() -> Option<(u32, u32)> {
    SERVING.get().copied()
}

/// Step one, before any thread exists: records who started the broker and, for a root
/// broker with the sandbox on, resolves the serving user and forks the helper with what it
/// may open (`grants`). A broker not started as root gets no helper and logs what that costs.
pub fn start_helper(config: &SandboxConfig, grants: impl FnOnce() -> Grants) -> Result<(), SandboxError> {
    let starter = starter_uid();
    if config.seccomp && config.enabled {
        let filters = Filters::compile().map_err(SandboxError)?;
        let _ = FILTERS.set(filters);
    }
    if !config.enabled {
        tracing::warn!(
            uid = starter,
            "the sandbox is off ([sandbox] enabled = false): the broker serves with every privilege it was started with"
        );
        return Ok(());
    }
    if starter != 0 {
        tracing::warn!(
            uid = starter,
            "not started as root: no privileged helper. The broker opens only the device nodes and TUN interfaces uid {starter} may open itself, and reads the executable (exe, exe_sha256 in the policy) only of its own uid's processes: rules that need another user's executable never match"
        );
        let _ = SERVING.set((starter, rustix::process::getegid().as_raw()));
        return Ok(());
    }
    let ids = serving_user(config)?;
    let _ = SERVING.set(ids);
    let grants = grants();
    let (ours, theirs) = rustix::net::socketpair(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::SEQPACKET,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )
    .map_err(|e| SandboxError(format!("socketpair: {e}")))?;
    let parent = rustix::process::getpid();
    match crate::sys::fork_single_threaded().map_err(|e| SandboxError(format!("starting the helper: {e}")))? {
        None => {
            drop(ours);
            helper_main(theirs, parent, &grants)
        }
        Some(pid) => {
            drop(theirs);
            let pidfd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())
                .map_err(|e| SandboxError(format!("pidfd of the helper: {e}")))?;
            let pid = pid.as_raw_nonzero().get() as u32;
            tracing::info!(pid, "privileged helper started");
            let _ = HELPER.set(HelperProcess {
                client: Client::new(ours),
                pid,
                pidfd,
            });
            Ok(())
        }
    }
}

/// The configured user's (or the default's) uid and gid; never root's.
fn serving_user(config: &SandboxConfig) -> Result<(u32, u32), SandboxError> {
    let named = config.user.as_deref();
    let ids = match privileges::lookup(named.unwrap_or(DEFAULT_USER)).map_err(SandboxError)? {
        Some(ids) => ids,
        None if named.is_none() => {
            let ids = privileges::lookup("nobody")
                .map_err(SandboxError)?
                .unwrap_or((65534, 65534));
            tracing::warn!(
                uid = ids.0,
                "there is no user {DEFAULT_USER}: serving as nobody, whom other programs share. Make one (`useradd --system --no-create-home --shell /usr/sbin/nologin {DEFAULT_USER}`) or name one with [sandbox] user"
            );
            ids
        }
        None => {
            return Err(SandboxError(format!(
                "[sandbox] user = {:?}: no such user",
                named.unwrap_or_default()
            )));
        }
    };
    if ids.0 == 0 {
        return Err(SandboxError(
            "[sandbox] user names root: the serving process must not be root".into(),
        ));
    }
    Ok(ids)
}

/// The helper process: dies with its parent, keeps three capabilities, installs its filter,
/// serves, exits.
fn helper_main(sock: OwnedFd, parent: rustix::process::Pid, grants: &Grants) -> ! {
    use std::os::fd::AsRawFd;
    let fail = |what: &str, e: &dyn std::fmt::Display| -> ! {
        tracing::error!(error = %e, "privileged helper: {what}");
        std::process::exit(1)
    };
    if let Err(e) = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL)) {
        fail("PR_SET_PDEATHSIG", &e);
    }
    // The parent may have died before the line above: then no signal will come.
    if rustix::process::getppid() != Some(parent) {
        std::process::exit(0);
    }
    crate::sys::ignore_stop_signals();
    if let Err(e) = rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable) {
        fail("PR_SET_DUMPABLE", &e);
    }
    crate::sys::close_fds_except(&[0, 1, 2, sock.as_raw_fd()]);
    if let Err(e) = privileges::keep_only(&privileges::HELPER_CAPS) {
        fail("capabilities", &e);
    }
    if let Err(e) = rustix::thread::set_no_new_privs(true) {
        fail("no_new_privs", &e);
    }
    if let Some(filters) = FILTERS.get()
        && let Err(e) = filters.apply(Role::Helper)
    {
        fail("seccomp", &e);
    }
    tracing::debug!("privileged helper serving");
    helper::serve(&sock, grants);
    std::process::exit(0)
}

/// Step two, still before any thread exists: the serving process becomes its user (a root
/// broker), drops every capability, sets `no_new_privs`, loses the file system but `writes`
/// (its run dir: read-write) and `reads` (read-only), and installs the main thread's seccomp
/// filter.
pub fn confine(config: &SandboxConfig, writes: &[PathBuf], reads: &[PathBuf]) -> Result<(), SandboxError> {
    if !config.enabled {
        let _ = LANDLOCK.set("off".into());
        return Ok(());
    }
    match (starter_uid(), SERVING.get()) {
        (0, Some(&(uid, gid))) => privileges::become_user(uid, gid).map_err(SandboxError)?,
        _ => {
            privileges::keep_only(&[]).map_err(SandboxError)?;
            rustix::thread::set_no_new_privs(true).map_err(|e| SandboxError(format!("no_new_privs: {e}")))?;
        }
    }
    let landlock = if config.landlock {
        restrict_file_system(writes, reads).map_err(SandboxError)?
    } else {
        "off".into()
    };
    tracing::info!(landlock = %landlock, "file system restricted");
    let _ = LANDLOCK.set(landlock);
    if let Some(filters) = FILTERS.get() {
        filters.apply(Role::Main).map_err(SandboxError)?;
    }
    Ok(())
}

/// Landlock: read-write beneath `writes`, read-only beneath `reads` and what every process
/// reads (`/etc` for users and groups, the libraries NSS loads, `/proc`, `/sys`); nothing
/// else. Best effort: a kernel without Landlock leaves it unenforced, and says so.
fn restrict_file_system(writes: &[PathBuf], reads: &[PathBuf]) -> Result<String, String> {
    use landlock::{
        ABI, Access, AccessFs, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus, path_beneath_rules,
    };
    let abi = ABI::V3;
    let mut read_only: Vec<PathBuf> = ["/etc", "/usr", "/lib", "/lib64", "/proc", "/sys"]
        .iter()
        .map(PathBuf::from)
        .filter(|p| p.exists())
        .collect();
    read_only.extend(reads.iter().filter(|p| p.exists()).cloned());
    let status = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .and_then(|r| r.create())
        .and_then(|r| r.add_rules(path_beneath_rules(&read_only, AccessFs::from_read(abi))))
        .and_then(|r| r.add_rules(path_beneath_rules(writes, AccessFs::from_all(abi))))
        .and_then(|r| r.restrict_self())
        .map_err(|e| format!("landlock: {e}"))?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => "enforced".into(),
        RulesetStatus::PartiallyEnforced => "partially enforced (an older kernel's Landlock)".into(),
        RulesetStatus::NotEnforced => "not enforced (the kernel has no Landlock)".into(),
    })
}

/// Called as every async-runtime thread starts: adds the worker filter (once per thread; a
/// thread started by a runtime thread already has it).
pub fn thread_started() {
    enter_role(Role::Worker);
}

/// Adds `role`'s filter to the calling thread, unless it has it already (the thread was
/// started by one that had it).
pub fn enter_role(role: Role) {
    let Some(filters) = FILTERS.get() else {
        return;
    };
    // A runtime thread started by another runtime thread inherited the worker filter on top of
    // the main thread's.
    if role == Role::Worker && seccomp::filters_on_this_thread() > 1 {
        return;
    }
    if let Err(e) = filters.apply(role) {
        tracing::error!(error = %e, "a thread runs without its role's seccomp filter (the main thread's still applies)");
    }
}

/// Completes when the helper has exited (never, without one): the serving process stops then.
pub async fn helper_exited() {
    let Some(helper) = HELPER.get() else {
        return std::future::pending().await;
    };
    let Ok(fd) = helper.pidfd.try_clone() else {
        return std::future::pending().await;
    };
    match crate::sys::async_fd(fd) {
        Ok(watch) => {
            let _ = watch.readable().await;
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the helper");
            std::future::pending::<()>().await;
        }
    }
}

/// This process's sandbox as `/proc/self/status` shows it (the seccomp filter count is the
/// calling thread's).
pub fn state_of_self() -> ProcessState {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| -> &str {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
            .map_or("", str::trim)
    };
    let hex = |name: &str| u64::from_str_radix(field(name), 16).unwrap_or(u64::MAX);
    let mut uids = [u32::MAX; 4];
    for (slot, value) in uids.iter_mut().zip(field("Uid").split_whitespace()) {
        *slot = value.parse().unwrap_or(u32::MAX);
    }
    ProcessState {
        pid: std::process::id(),
        uids,
        cap_eff: hex("CapEff"),
        cap_prm: hex("CapPrm"),
        cap_bnd: hex("CapBnd"),
        cap_amb: hex("CapAmb"),
        no_new_privs: field("NoNewPrivs") == "1",
        seccomp: field("Seccomp").parse().unwrap_or(0),
        seccomp_filters: seccomp::filters_on_this_thread(),
        landlock: LANDLOCK.get().cloned().unwrap_or_else(|| "off".into()),
    }
}

/// The sandbox of the serving process and of its helper, for `portcullis stats`.
pub fn report() -> Vec<(String, ProcessState)> {
    let mut out = vec![("serving".to_string(), state_of_self())];
    if let Some(helper) = HELPER.get() {
        let state = match helper.client.call(&Request::Status, None) {
            Ok((Response::Status(state), _)) => state,
            _ => ProcessState {
                pid: helper.pid,
                landlock: "unknown: the helper did not answer".into(),
                ..ProcessState::default()
            },
        };
        out.push(("helper".to_string(), state));
    }
    out
}

/// Asks the helper, when there is one; `None` without.
pub(crate) fn ask(
    request: &Request,
    fd: Option<std::os::fd::BorrowedFd<'_>>,
) -> Option<Result<(Response, Option<OwnedFd>), String>> {
    let client = helper()?;
    Some(
        client
            .call(request, fd)
            .map_err(|e| format!("the privileged helper: {e}")),
    )
}

/// Makes a forbidden system call in this process: its errno, 0 if it was allowed (when the
/// process survives it).
#[cfg(feature = "fault-injection")]
pub fn make_forbidden(call: protocol::Forbidden) -> i32 {
    match crate::sys::forbidden_call(call) {
        Ok(()) => 0,
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}

/// Has the helper make a forbidden system call (test-only builds): its errno, 0 if allowed;
/// `None` without a helper.
#[cfg(feature = "fault-injection")]
pub fn helper_forbidden(call: protocol::Forbidden) -> Option<i32> {
    match ask(&Request::Forbidden { call }, None)? {
        Ok((Response::Errno(errno), _)) => Some(errno),
        _ => Some(-1),
    }
}
