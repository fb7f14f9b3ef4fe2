//! A broker run as a process of the release build (`cargo xtask bench` builds it), for the
//! benchmarks that measure it from outside: its CPU time and memory are its own.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// A broker process, killed when dropped.
pub(crate) struct Broker {
    child: Child,
    pub(crate) run_dir: PathBuf,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn binary() -> PathBuf {
    std::env::var_os("PORTCULLIS_BIN").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/portcullis"),
        PathBuf::from,
    )
}

impl Broker {
    /// Starts a broker on `config` (TOML text) with its run dir in `dir/name`, and waits for
    /// its gRPC socket.
    pub(crate) fn start(dir: &Path, name: &str, config: &str) -> Broker {
        Broker::start_binary(&binary(), dir, name, config)
    }

    /// [`Broker::start`] with another build of the broker (an earlier one, to compare with).
    pub(crate) fn start_binary(binary: &Path, dir: &Path, name: &str, config: &str) -> Broker {
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, config).unwrap();
        let run_dir = dir.join(name);
        let child = Command::new(binary)
            .args(["broker", "--config"])
            .arg(&path)
            .arg("--run-dir")
            .arg(&run_dir)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e} (cargo xtask bench builds it)", binary.display()));
        let socket = run_dir.join(portcullis_client::GRPC_SOCKET);
        Broker::serving(child, run_dir, &socket, name)
    }

    /// A bare tonic server answering `add` (the gRPC peer: no policy, no dispatch), in a
    /// process of its own (this program, re-executed with `--echo-grpc`) so that its memory can
    /// be read like a broker's. Its socket is `dir/name/echo.sock`.
    pub(crate) fn echo_peer(dir: &Path, name: &str) -> (Broker, PathBuf) {
        let run_dir = dir.join(name);
        std::fs::create_dir_all(&run_dir).unwrap();
        let socket = run_dir.join("echo.sock");
        let child = Command::new(std::env::current_exe().unwrap())
            .arg("--echo-grpc")
            .arg(&socket)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        (Broker::serving(child, run_dir, &socket, name), socket)
    }

    /// Waits for `child` to accept connections on `socket`.
    fn serving(mut child: Child, run_dir: PathBuf, socket: &Path, name: &str) -> Broker {
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("the {name} server ended before serving: {status}");
            }
            assert!(Instant::now() < deadline, "the {name} server did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        Broker { child, run_dir }
    }

    /// The process that serves clients (a sandboxed broker's privileged helper is its child).
    pub(crate) fn server_pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory of the serving process, in bytes.
    pub(crate) fn rss(&self) -> u64 {
        self.status_bytes("VmRSS:")
    }

    /// The part of [`rss`](Broker::rss) that is shared memory mapped in (rings' pages, which
    /// their clients' memfds hold), in bytes.
    pub(crate) fn shared_rss(&self) -> u64 {
        self.status_bytes("RssShmem:")
    }

    /// A size `/proc/PID/status` gives in kB, in bytes (0 if it can't be read).
    fn status_bytes(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.server_pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    /// CPU time the serving process's threads have run, summed (`schedstat`, nanoseconds).
    pub(crate) fn cpu(&self) -> Duration {
        let pid = self.server_pid();
        let ns: u64 = std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
            .filter_map(|s| s.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()))
            .sum();
        Duration::from_nanos(ns)
    }

    /// The serving process's open descriptors.
    pub(crate) fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.server_pid())).map_or(0, Iterator::count)
    }

    /// The serving process's soft descriptor limit (`/proc/PID/limits`).
    pub(crate) fn fd_limit(&self) -> u64 {
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", self.server_pid())).unwrap_or_default();
        limits
            .lines()
            .find_map(|l| l.strip_prefix("Max open files"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(1024)
    }

    /// The serving process's threads.
    pub(crate) fn threads(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/task", self.server_pid())).map_or(0, Iterator::count)
    }
}
