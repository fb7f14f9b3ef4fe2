//! Running under systemd: sockets passed as systemd passes them (`LISTEN_FDS`, `LISTEN_PID`,
//! `LISTEN_FDNAMES`, numbered from 3), readiness and stopping on `NOTIFY_SOCKET`, the watchdog,
//! and exit on idle with the next client's first request waiting in the backlog for the next
//! start.

use std::{
    os::{
        fd::{AsFd, AsRawFd, OwnedFd},
        unix::net::{UnixDatagram, UnixListener},
    },
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use portcullis_client::matching;
use portcullis_proto::frame::{ClientFrame, Hello, PROTOCOL_VERSION, ServerFrame, encode};
use portcullis_tests::{bin, next_frame};

/// The two listening sockets a `.socket` unit would hold, inheritable.
struct Sockets {
    grpc: UnixListener,
    native: OwnedFd,
}

impl Sockets {
    fn bind(dir: &Path) -> Sockets {
        use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType, bind, listen, socket_with};
        let grpc = UnixListener::bind(dir.join(portcullis_client::GRPC_SOCKET)).unwrap();
        let native = socket_with(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None).unwrap();
        bind(
            &native,
            &SocketAddrUnix::new(dir.join(portcullis_client::NATIVE_SOCKET)).unwrap(),
        )
        .unwrap();
        listen(&native, 16).unwrap();
        Sockets { grpc, native }
    }

    /// `portcullis broker` as systemd starts it: the sockets as descriptors 3 and 4, and the
    /// variables naming them for its pid (bash moves the descriptors, then execs the broker in
    /// its own process, so `$$` is the broker's pid).
    fn start(&self, run_dir: &Path, notify: &Path, extra: &[&str]) -> Running {
        let (g, n) = (self.grpc.as_raw_fd(), self.native.as_raw_fd());
        for fd in [self.grpc.as_fd(), self.native.as_fd()] {
            rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty()).unwrap();
        }
        let script = format!(
            "exec 200<&{g} 201<&{n}; exec {g}<&- {n}<&-; exec 3<&200 4<&201 200<&- 201<&-; \
             export LISTEN_PID=$$ LISTEN_FDS=2 LISTEN_FDNAMES=portcullis:portcullis; exec \"$0\" \"$@\""
        );
        let child = Command::new("bash")
            .arg("-c")
            .arg(script)
            .arg(bin())
            .args(["broker", "--run-dir"])
            .arg(run_dir)
            .args(extra)
            .env("NOTIFY_SOCKET", notify)
            .env("WATCHDOG_USEC", "200000")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Not inherited by anything else this test process starts.
        for fd in [self.grpc.as_fd(), self.native.as_fd()] {
            rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::CLOEXEC).unwrap();
        }
        Running(child)
    }
}

/// A broker process, killed if the test ends first.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The next notification the broker sends, within a bound.
fn notification(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = socket.recv(&mut buf).expect("a notification within 20 s");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn next_containing(socket: &UnixDatagram, what: &str) -> String {
    loop {
        let message = notification(socket);
        if message.contains(what) {
            return message;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn socket_activated_broker_notifies_serves_exits_idle_and_keeps_the_next_clients_request() {
    let dir = portcullis_tests::tempdir_named("portcullis-systemd-");
    let run_dir = dir.path().join("run");
    std::fs::create_dir(&run_dir).unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    // The serving process (the service user) sends to it, as to systemd's.
    std::fs::set_permissions(&notify_path, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    let sockets = Sockets::bind(&run_dir);
    let mut broker = sockets.start(&run_dir, &notify_path, &["--exit-idle-time", "2"]);
    assert!(next_containing(&notify, "READY=1").contains("STATUS=serving"));
    // The watchdog is pinged (WATCHDOG_USEC: every 100 ms).
    next_containing(&notify, "WATCHDOG=1");
    // Served on the sockets it was given.
    let client = portcullis_client::Client::connect(&run_dir).await.unwrap();
    let services = client.list_services(matching::all()).await.unwrap();
    assert!(services.iter().any(|s| s.name == "sample0"));
    drop(client);
    // Idle: it says it stops, and exits cleanly, leaving the sockets to their owner.
    next_containing(&notify, "STOPPING=1");
    let status = broker.0.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(run_dir.join(portcullis_client::GRPC_SOCKET).exists());
    assert!(run_dir.join(portcullis_client::NATIVE_SOCKET).exists());
    // A client connects while no broker runs: its Hello waits in the backlog...
    let conn = tokio_seqpacket::UnixSeqpacket::connect(run_dir.join(portcullis_client::NATIVE_SOCKET))
        .await
        .unwrap();
    let hello = ClientFrame::Hello(Hello {
        version: PROTOCOL_VERSION,
        abi: portcullis_proto::layout::AbiId::native() as u8,
    });
    conn.send(&encode(&hello).unwrap()).await.unwrap();
    // ...and the broker started for it (as systemd would) answers it.
    let _again = sockets.start(&run_dir, &notify_path, &[]);
    let welcome = next_frame(&conn).await;
    assert!(matches!(welcome, ServerFrame::Welcome { .. }), "{welcome:?}");
    next_containing(&notify, "READY=1");
}

#[test]
fn a_passed_socket_that_is_not_a_listening_unix_socket_is_refused() {
    let dir = portcullis_tests::tempdir();
    let notify_path = dir.path().join("notify.sock");
    let _notify = UnixDatagram::bind(&notify_path).unwrap();
    // A datagram socket where a listening stream or sequential-packet one belongs.
    let wrong = UnixDatagram::bind(dir.path().join("wrong.sock")).unwrap();
    let fd = wrong.as_raw_fd();
    rustix::io::fcntl_setfd(wrong.as_fd(), rustix::io::FdFlags::empty()).unwrap();
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "exec 200<&{fd}; exec {fd}<&-; exec 3<&200 200<&-; export LISTEN_PID=$$ LISTEN_FDS=1; exec \"$0\" \"$@\""
        ))
        .arg(bin())
        .args(["broker", "--run-dir"])
        .arg(dir.path().join("run"))
        .output()
        .unwrap();
    rustix::io::fcntl_setfd(wrong.as_fd(), rustix::io::FdFlags::CLOEXEC).unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is not a listening Unix socket"), "{stderr}");
}

/// The units shipped in `dist/systemd` are valid to systemd itself (`systemd-analyze verify`),
/// with `ExecStart` pointed at this build.
#[test]
fn the_shipped_units_verify() {
    let dist = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/systemd");
    let dir = portcullis_tests::tempdir();
    for unit in ["portcullis.socket", "portcullis.service"] {
        let text = std::fs::read_to_string(dist.join(unit)).unwrap();
        let text = text.replace("/usr/local/bin/portcullis", &bin().display().to_string());
        std::fs::write(dir.path().join(unit), text).unwrap();
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join("portcullis.socket"))
        .arg(dir.path().join("portcullis.service"))
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
}
