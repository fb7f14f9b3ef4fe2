//! Harness for integration tests: each test starts the real `portcullis` binary on its own
//! temporary run dir and talks to it over its real sockets.
//!
//! The binary is built once (`cargo xtask test` builds it and passes `PORTCULLIS_BIN`); every
//! test reuses it.

#![forbid(unsafe_code)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    missing_debug_implementations
)]

use std::{
    fs,
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

mod system_bus;

pub use portcullis_client as client;
use portcullis_client::{Client, GRPC_SOCKET, OpenMode, Session, UserClient, matching};
pub use system_bus::{SystemBus, system_bus};

/// The `portcullis` binary under test.
pub fn bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("PORTCULLIS_BIN") {
        return PathBuf::from(bin);
    }
    let fallback = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/portcullis");
    assert!(
        fallback.exists(),
        "no broker binary: run `cargo xtask test`, or `cargo build -p portcullis-cli --features fault-injection` first, or set PORTCULLIS_BIN"
    );
    fallback
}

/// A temporary directory every user may enter and read (mode 0755), for the files a broker
/// reads: a root broker's serving process runs as its service user, which reads the policy
/// after the split, as it would read `/etc/portcullis`.
pub fn tempdir() -> tempfile::TempDir {
    tempdir_named(".tmp")
}

/// [`tempdir`] with a name that starts with `prefix`.
pub fn tempdir_named(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .permissions(fs::Permissions::from_mode(0o755))
        .tempdir()
        .unwrap()
}

/// The uid tests use for an unprivileged client (nobody).
pub const NOBODY: u32 = 65534;

/// A running broker on a private run dir; killed when dropped.
pub struct Broker {
    child: Child,
    dir: tempfile::TempDir,
    /// How it was started, to start it again on the same run dir.
    launch: Launch,
}

/// A broker's command line, environment and directory.
struct Launch {
    program: std::ffi::OsString,
    args: Vec<std::ffi::OsString>,
    env: Vec<(std::ffi::OsString, Option<std::ffi::OsString>)>,
    dir: Option<PathBuf>,
}

impl Launch {
    fn of(cmd: &Command) -> Launch {
        Launch {
            program: cmd.get_program().to_owned(),
            args: cmd.get_args().map(ToOwned::to_owned).collect(),
            env: cmd
                .get_envs()
                .map(|(k, v)| (k.to_owned(), v.map(ToOwned::to_owned)))
                .collect(),
            dir: cmd.get_current_dir().map(Path::to_path_buf),
        }
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args);
        for (k, v) in &self.env {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        if let Some(dir) = &self.dir {
            cmd.current_dir(dir);
        }
        cmd
    }
}

/// What to start a broker with.
#[derive(Default)]
pub struct BrokerSetup<'a> {
    /// Config file text; `None` for the embedded default.
    pub config: Option<&'a str>,
    /// Policy file text; `None` for the config's or the embedded default.
    pub policy: Option<&'a str>,
    /// More arguments for `portcullis broker`.
    pub args: &'a [&'a str],
    /// `RUST_LOG` for the broker [default: debug].
    pub log_level: Option<&'a str>,
    /// A command the broker runs under (`["unshare", "--net", "--"]`: a network namespace of
    /// its own); it must exec the broker, so that the broker's pid is the child's.
    pub wrapper: &'a [&'a str],
    /// How `--policy` names the policy file: `None` for its absolute path; otherwise this
    /// spelling (`policy.toml`, `./policy.toml`), with the broker started in the test's
    /// directory.
    pub policy_spelling: Option<&'a str>,
    /// Driver personalities: written to `drivers.d/test.toml` beside the config, which must
    /// say `drivers = "drivers.d"`.
    pub personalities: Option<&'a str>,
    /// Start the broker as this uid (gid the same, no supplementary groups) instead of root;
    /// the test's directory is then that uid's.
    pub run_as: Option<u32>,
    /// More environment for the broker (`DBUS_SYSTEM_BUS_ADDRESS`).
    pub env: &'a [(&'a str, &'a str)],
}

impl Broker {
    /// A broker on the embedded defaults.
    pub fn start() -> Broker {
        Broker::with(BrokerSetup::default())
    }

    /// A broker with this config and policy.
    pub fn with(setup: BrokerSetup<'_>) -> Broker {
        // Unprivileged test clients must reach the run dir and a copy of the binary.
        let dir = tempdir_named("portcullis-test-");
        let setpriv;
        let wrapper = match setup.run_as {
            Some(uid) => {
                rustix::fs::chown(
                    dir.path(),
                    Some(rustix::process::Uid::from_raw(uid)),
                    Some(rustix::process::Gid::from_raw(uid)),
                )
                .unwrap();
                setpriv = [
                    "setpriv".to_string(),
                    format!("--reuid={uid}"),
                    format!("--regid={uid}"),
                    "--clear-groups".to_string(),
                    "--".to_string(),
                ];
                setpriv.iter().map(String::as_str).collect::<Vec<_>>()
            }
            None => setup.wrapper.to_vec(),
        };
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(bin());
                cmd
            }
            None => Command::new(bin()),
        };
        cmd.arg("broker").arg("--run-dir").arg(dir.path().join("run"));
        if let Some(personalities) = setup.personalities {
            let drivers = dir.path().join("drivers.d");
            fs::create_dir(&drivers).unwrap();
            fs::write(drivers.join("test.toml"), personalities).unwrap();
        }
        if let Some(config) = setup.config {
            let path = dir.path().join("config.toml");
            fs::write(&path, config).unwrap();
            cmd.arg("--config").arg(path);
        }
        if let Some(policy) = setup.policy {
            let path = dir.path().join("policy.toml");
            fs::write(&path, policy).unwrap();
            match setup.policy_spelling {
                Some(spelling) => cmd.current_dir(dir.path()).arg("--policy").arg(spelling),
                None => cmd.arg("--policy").arg(path),
            };
        }
        cmd.args(setup.args);
        let log = fs::File::create(dir.path().join("broker.log")).unwrap();
        cmd.envs(setup.env.iter().copied());
        cmd.env("RUST_LOG", setup.log_level.unwrap_or("debug"))
            .stdout(Stdio::null())
            .stderr(log);
        let launch = Launch::of(&cmd);
        let child = cmd.spawn().unwrap();
        let mut broker = Broker { child, dir, launch };
        broker.wait_ready();
        broker
    }

    fn wait_ready(&mut self) {
        let socket = self.socket();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("broker exited with {status} before serving:\n{}", self.log());
            }
            // The broker listens on its native socket before its gRPC socket: both serve now.
            // Probing the native socket too would leave that connection in the descriptors a
            // test counts first, for as long as the broker takes to see it close.
            if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("broker did not serve {} within 20 s:\n{}", socket.display(), self.log());
    }

    /// Kills the broker with `SIGKILL` (its helper dies with it) and waits for it to end: no
    /// chance to clean up, as a crash or the OOM killer would leave things.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the broker again, as it was first started, on the same run dir (after [`kill`]).
    ///
    /// [`kill`]: Broker::kill
    pub fn restart(&mut self) {
        let log = fs::File::options()
            .append(true)
            .open(self.dir.path().join("broker.log"))
            .unwrap();
        let mut cmd = self.launch.command();
        cmd.stdout(Stdio::null()).stderr(log);
        self.child = cmd.spawn().unwrap();
        self.wait_ready();
    }

    /// `portcullis stats --json`: what the broker holds for its clients.
    pub fn stats(&self) -> serde_json::Value {
        let out = self.cli(&["stats", "--json"]);
        serde_json::from_str(&stdout_ok(&out)).unwrap()
    }

    /// Waits (up to 10 s) until the broker holds nothing for any client — no session, user
    /// client, mapping, pending call, open or ring — and no more descriptors than `baseline_fds`
    /// (the figure before the clients came). Panics with the last statistics otherwise.
    pub fn assert_no_leaks(&self, baseline_fds: u64) {
        if let Err(held) = self.released(baseline_fds, Duration::from_secs(10)) {
            panic!("{held}\n{}", self.log());
        }
    }

    /// Waits up to `bound` until the broker holds nothing for any client and no more
    /// descriptors than `baseline_fds`; otherwise says what it still holds.
    pub fn released(&self, baseline_fds: u64, bound: Duration) -> Result<(), String> {
        let deadline = Instant::now() + bound;
        loop {
            let s = self.stats();
            let held = [
                "sessions",
                "user_clients",
                "mappings",
                "pending_calls",
                "service_opens",
                "driver_opens",
                "driver_waiting",
                "rings",
                "queued_messages",
            ]
            .iter()
            .map(|k| s[*k].as_u64().unwrap_or(u64::MAX))
            .sum::<u64>();
            // The stats request itself holds one connection while it is answered.
            let fds = s["open_fds"].as_u64().unwrap_or(u64::MAX);
            if held == 0 && fds <= baseline_fds {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "the broker still holds resources {bound:?} after its clients went (baseline {baseline_fds} fds): {s}"
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Drives `call` until the broker counts one call waiting in a driver (`driver_waiting`);
    /// panics if the call is answered first.
    pub async fn until_driver_waits<F>(&self, mut call: std::pin::Pin<&mut F>)
    where
        F: std::future::Future,
        F::Output: std::fmt::Debug,
    {
        loop {
            tokio::select! {
                early = &mut call => panic!("answered early: {early:?}"),
                () = tokio::task::yield_now() => {}
            }
            if self.stats()["driver_waiting"] == 1 {
                return;
            }
        }
    }

    /// Descriptors the idle broker holds (while answering the stats request).
    pub fn baseline_fds(&self) -> u64 {
        self.stats()["open_fds"].as_u64().unwrap()
    }

    /// The broker's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `program ARGS` in the broker's network namespace (`nsenter --net`).
    pub fn in_netns(&self, program: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/proc/{}/ns/net", self.pid()))
            .arg("--")
            .arg(program)
            .args(args);
        cmd
    }

    /// The policy file the broker was started with (`BrokerSetup::policy`).
    pub fn policy_path(&self) -> PathBuf {
        self.dir.path().join("policy.toml")
    }

    /// Sends a signal to the broker process.
    pub fn signal(&self, signal: rustix::process::Signal) {
        rustix::process::kill_process(rustix::process::Pid::from_child(&self.child), signal).unwrap();
    }

    /// The run dir.
    pub fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    /// The gRPC socket.
    pub fn socket(&self) -> PathBuf {
        self.run_dir().join(GRPC_SOCKET)
    }

    /// What the broker logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("broker.log")).unwrap_or_default()
    }

    /// Waits for the broker process to exit (at most `bound`, a bound on a hang: a broker that
    /// is still running then fails the test) and returns its exit status.
    pub fn wait_exit(&mut self, bound: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + bound;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the broker was still running after {bound:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether the broker process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Whether the broker process is still running, without reaping it (`kill -0`).
    pub fn is_running_ref(&self) -> bool {
        rustix::process::test_kill_process(rustix::process::Pid::from_child(&self.child)).is_ok()
    }

    /// An async client.
    pub async fn client(&self) -> Client {
        Client::connect(self.run_dir()).await.unwrap()
    }

    /// A new session with the named service open in `mode`.
    pub async fn open(&self, service: &str, mode: OpenMode) -> (Session, UserClient) {
        let session = self.client().await.session().await.unwrap();
        let info = session.find_one(matching::by_name(service)).await.unwrap();
        let user_client = session.open(info.id, mode).await.unwrap();
        (session, user_client)
    }

    /// `portcullis ARGS --run-dir RUN_DIR`, as this (root) process.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_command(bin(), args).output().unwrap()
    }

    /// The CLI as a command, for tests that need it running in the background.
    pub fn cli_command(&self, bin: PathBuf, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .arg("--run-dir")
            .arg(self.run_dir())
            .env_remove("RUST_LOG");
        cmd
    }

    /// `portcullis ARGS` run as another uid (gid the same, no supplementary groups), from a
    /// copy of the binary that uid can execute.
    pub fn cli_as(&self, uid: u32, args: &[&str]) -> Output {
        let copy = self.copy_program(&bin(), "portcullis");
        let mut cmd = self.cli_command(copy, args);
        // std drops supplementary groups (setgroups(0)) when root sets a uid.
        cmd.uid(uid).gid(uid);
        output_retrying_busy(&mut cmd)
    }

    /// A copy of `program` in the broker's private directory (which every uid may read), named
    /// `name`: a program another uid can run, and a file of its own (its own inode).
    pub fn copy_program(&self, program: &Path, name: &str) -> PathBuf {
        let copy = self.dir.path().join(name);
        if !copy.exists() {
            let partial = self.dir.path().join(format!(".{name}.partial"));
            fs::copy(program, &partial).unwrap();
            fs::set_permissions(&partial, fs::Permissions::from_mode(0o755)).unwrap();
            fs::rename(&partial, &copy).unwrap();
        }
        copy
    }

    /// `program ARGS` run as `uid` (gid the same, no supplementary groups).
    pub fn run_as(&self, uid: u32, program: &Path, args: &[&str]) -> Output {
        let mut cmd = Command::new(program);
        cmd.args(args).uid(uid).gid(uid).env_remove("RUST_LOG");
        output_retrying_busy(&mut cmd)
    }

    /// A directory private to this broker's test, readable by every uid.
    pub fn private_dir(&self) -> &Path {
        self.dir.path()
    }
}

/// A child process a test spawned, killed and reaped when dropped: a test that fails midway
/// leaves no helper waiting behind it (and holding whatever it entered, a network namespace).
#[derive(Debug)]
pub struct Reaped(pub std::process::Child);

impl std::ops::Deref for Reaped {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- broker log ---\n{}", self.log());
            return;
        }
        // Every test holds every driver to its method contracts: a status its table does not
        // list reached no client (the broker made it INTERNAL), and fails the test here.
        let log = self.log();
        if let Some(line) = log.lines().find(|l| l.contains("its method table does not list")) {
            panic!("a driver broke its method contract: {line}\n--- broker log ---\n{log}");
        }
    }
}

/// Runs `cmd` (taken by value or by reference) to completion and fails the test, with its
/// stderr, unless it succeeds.
pub fn run_ok(mut cmd: impl std::borrow::BorrowMut<Command>) {
    let cmd = cmd.borrow_mut();
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `cmd` to completion. A test thread that forks while a copied program is being written
/// holds its write descriptor until that child execs: exec then fails with ETXTBSY for a moment.
/// That, and only that, is retried.
pub fn output_retrying_busy(cmd: &mut Command) -> Output {
    retrying_busy(cmd, Command::output)
}

/// `cmd.spawn()`, retried while the program is busy (as [`output_retrying_busy`]).
pub fn spawn_retrying_busy(cmd: &mut Command) -> std::process::Child {
    retrying_busy(cmd, Command::spawn)
}

/// Runs `run` on `cmd` until the kernel stops answering `ETXTBSY`: a program just copied is
/// busy while any process forked by another test thread in the meantime still holds the copy's
/// write descriptor (until that process execs).
fn retrying_busy<T>(cmd: &mut Command, run: impl Fn(&mut Command) -> std::io::Result<T>) -> T {
    for _ in 0..100 {
        match run(cmd) {
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::TXTBSY.raw_os_error()) => {
                std::thread::sleep(Duration::from_millis(20));
            }
            result => return result.unwrap(),
        }
    }
    panic!("{cmd:?} stayed busy (ETXTBSY)")
}

/// Stdout of a successful run, or a panic with everything it printed.
pub fn stdout_ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "command failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// A native connection, straight on the socket with no client library, that has said `Hello`
/// (this build's ABI) and been welcomed.
pub async fn native_hello(run_dir: &Path) -> tokio_seqpacket::UnixSeqpacket {
    use portcullis_proto::{
        frame::{ClientFrame, Hello, PROTOCOL_VERSION, ServerFrame, encode},
        layout::AbiId,
    };
    let conn = tokio_seqpacket::UnixSeqpacket::connect(run_dir.join(portcullis_client::NATIVE_SOCKET))
        .await
        .unwrap();
    let hello = ClientFrame::Hello(Hello {
        version: PROTOCOL_VERSION,
        abi: AbiId::native() as u8,
    });
    conn.send(&encode(&hello).unwrap()).await.unwrap();
    let welcome = next_frame(&conn).await;
    assert!(matches!(welcome, ServerFrame::Welcome { .. }), "{welcome:?}");
    conn
}

/// The next frame the broker sends on a raw native connection.
pub async fn next_frame(conn: &tokio_seqpacket::UnixSeqpacket) -> portcullis_proto::frame::ServerFrame {
    let mut buf = vec![0u8; portcullis_proto::frame::MAX_FRAME + 1];
    let n = conn.recv(&mut buf).await.unwrap().bytes_read();
    portcullis_proto::frame::ServerFrame::decode(&buf[..n]).unwrap()
}

/// A loop device over a temporary file, attached for a test and detached when dropped (also
/// when the test fails): the only block device a test may touch is one it made.
pub struct LoopDevice {
    /// The device node (`/dev/loopN`).
    pub path: PathBuf,
    /// The file behind it.
    pub file: PathBuf,
    _dir: tempfile::TempDir,
}

impl LoopDevice {
    /// A loop device over a file holding `contents`; read-only when `read_only`.
    pub fn attach(contents: &[u8], read_only: bool) -> LoopDevice {
        LoopDevice::attach_in(None, contents, read_only)
    }

    /// [`LoopDevice::attach`], its file in a new directory under `parent` (so that a driver
    /// personality can match the files of one test by their path).
    pub fn attach_in(parent: Option<&Path>, contents: &[u8], read_only: bool) -> LoopDevice {
        let mut builder = tempfile::Builder::new();
        builder.prefix("portcullis-loop-");
        let dir = match parent {
            Some(parent) => builder.tempdir_in(parent),
            None => builder.tempdir(),
        }
        .unwrap();
        let file = dir.path().join("disk.img");
        fs::write(&file, contents).unwrap();
        let mut cmd = Command::new("losetup");
        cmd.args(["--find", "--show"]);
        if read_only {
            cmd.arg("--read-only");
        }
        let out = cmd.arg(&file).output().unwrap();
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let path = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        LoopDevice { path, file, _dir: dir }
    }
}

impl LoopDevice {
    /// The media goes while the broker holds the device: a detach (which the kernel defers
    /// while the device is open: it happens when the last holder closes it), then the file
    /// emptied and the size read again (`LOOP_SET_CAPACITY`), which the kernel announces as a
    /// `change` of a device with no media.
    pub fn pull_media(&self) {
        for args in [&["--detach"][..], &["--set-capacity"][..]] {
            if args == ["--set-capacity"] {
                fs::File::options()
                    .write(true)
                    .open(&self.file)
                    .unwrap()
                    .set_len(0)
                    .unwrap();
            }
            let out = Command::new("losetup").args(args).arg(&self.path).output().unwrap();
            // Once the broker has let go, the deferred detach may already have happened.
            assert!(
                out.status.success() || args == ["--set-capacity"],
                "losetup {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// The kernel name (`loop3`).
    pub fn name(&self) -> String {
        self.path.file_name().unwrap().to_string_lossy().into_owned()
    }

    /// Whether the loop device is still attached to this test's file.
    pub fn attached(&self) -> bool {
        fs::read_to_string(format!("/sys/block/{}/loop/backing_file", self.name()))
            .is_ok_and(|f| f.trim_end() == self.file.to_string_lossy())
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        if !self.attached() {
            return;
        }
        let out = Command::new("losetup").arg("--detach").arg(&self.path).output();
        if !out.as_ref().is_ok_and(|o| o.status.success()) {
            eprintln!("could not detach {}: {out:?}", self.path.display());
        }
    }
}

/// FNV-1a 64, what the sample device's `checksum_dma` computes.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A 1 MiB pattern for the sample device's dma memory: no two neighbouring bytes alike.
pub fn dma_pattern() -> Vec<u8> {
    (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}
