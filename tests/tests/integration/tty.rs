//! The tty family on real ptys: the test holds the master side, the "hardware"; the broker owns
//! the follower, as it would a serial port.

use std::{os::fd::OwnedFd, path::PathBuf};

use portcullis_client::{OpenMode, Session, Status, UserClient};
use portcullis_tests::{Broker, BrokerSetup, NOBODY};

const POLICY: &str = r#"
[[principal]]
name = "local"

[[principal]]
name = "root"
uid = [0]

[[rule]]
id = "tty-use"
effect = "allow"
principals = ["local"]
service = { class = "TtyDevice" }
methods = ["*"]

[[rule]]
id = "tty-break"
effect = "allow"
principals = ["root"]
service = { class = "TtyDevice" }
privileges = ["tty.break"]
"#;

/// A pty pair: the master (the test's end) and the follower's path.
fn pty() -> (OwnedFd, PathBuf) {
    use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC).unwrap();
    grantpt(&master).unwrap();
    unlockpt(&master).unwrap();
    let name = ptsname(&master, Vec::new()).unwrap();
    (master, PathBuf::from(name.to_str().unwrap()))
}

fn broker_on(follower: &std::path::Path) -> Broker {
    let config = format!(
        "[[device]]\nname = \"tty0\"\ndriver = \"tty\"\npath = \"{}\"\n",
        follower.display()
    );
    Broker::with(BrokerSetup {
        config: Some(&config),
        policy: Some(POLICY),
        ..BrokerSetup::default()
    })
}

/// `tty_line` in this build's layout: baud, data bits, parity, stop bits, flow.
fn line(baud: u32, stop_bits: u8, flow: u8) -> Vec<u8> {
    let mut bytes = baud.to_ne_bytes().to_vec();
    bytes.extend([8, 0, stop_bits, flow]);
    bytes
}

/// Reads from the master until `want` bytes came (the test's "hardware" side).
fn master_reads(master: &OwnedFd, want: usize) -> Vec<u8> {
    let mut got = Vec::new();
    while got.len() < want {
        let mut buf = [0u8; 256];
        let n = rustix::io::read(master, &mut buf).unwrap();
        got.extend_from_slice(&buf[..n]);
    }
    got
}

async fn open(broker: &Broker) -> (Session, UserClient) {
    broker.open("tty0", OpenMode::Shared).await
}

#[tokio::test(flavor = "multi_thread")]
async fn tty_bytes_cross_between_a_client_and_the_hardware() {
    let (master, follower) = pty();
    let broker = broker_on(&follower);
    let (session, tty) = open(&broker).await;
    let out = session
        .call_named(&tty, "write", &[1000], b"hello, hardware")
        .await
        .unwrap();
    assert_eq!(out.scalars, vec![15]);
    assert_eq!(master_reads(&master, 15), b"hello, hardware");
    // A read pends until the hardware sends something.
    let reading = session.call_named(&tty, "read", &[64, 60_000], &[]);
    tokio::pin!(reading);
    loop {
        tokio::select! {
            early = &mut reading => panic!("read answered before any byte came: {early:?}"),
            () = tokio::task::yield_now() => {}
        }
        if broker.stats()["driver_waiting"] == 1 {
            break;
        }
    }
    rustix::io::write(&master, b"from the wire").unwrap();
    assert_eq!(reading.await.unwrap().struct_out, b"from the wire");
    // Nothing more: a short read times out.
    let quiet = session.call_named(&tty, "read", &[64, 10], &[]).await.unwrap_err();
    assert_eq!(quiet.status(), Some(Status::Timeout));
}

#[tokio::test(flavor = "multi_thread")]
async fn tty_line_settings_take_effect_and_are_restored_when_the_client_closes() {
    let (master, follower) = pty();
    let broker = broker_on(&follower);
    let (session, tty) = open(&broker).await;
    let at_open = session.call_named(&tty, "get_line", &[], &[]).await.unwrap().struct_out;
    // The Rust client's typed form reads the same struct.
    let typed = session.tty_get_line(&tty).await.unwrap();
    assert_eq!(typed.to_bytes(), at_open);
    assert_eq!(
        (typed.data_bits, typed.parity),
        (8, portcullis_client::devices::parity::NONE)
    );
    session
        .call_named(&tty, "set_line", &[], &line(57_600, 2, 1))
        .await
        .unwrap();
    // The kernel's termios of the pair says so.
    let t = rustix::termios::tcgetattr(&master).unwrap();
    assert_eq!(t.output_speed(), 57_600);
    assert!(t.control_modes.contains(rustix::termios::ControlModes::CSTOPB));
    assert!(t.control_modes.bits() & libc::CRTSCTS != 0);
    // A pty can't do 7 data bits: refused, naming it.
    let mut seven = line(9600, 1, 0);
    seven[4] = 7;
    let refused = session.call_named(&tty, "set_line", &[], &seven).await.unwrap_err();
    assert_eq!(refused.status(), Some(Status::Unsupported), "{refused}");
    session.close(&tty).await.unwrap();
    let (again, tty) = open(&broker).await;
    assert_eq!(
        again.call_named(&tty, "get_line", &[], &[]).await.unwrap().struct_out,
        at_open,
        "the closed client's settings were undone"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tty_serves_one_user_client_at_a_time_and_modem_lines_are_unsupported_on_a_pty() {
    let (_master, follower) = pty();
    let broker = broker_on(&follower);
    let (session, tty) = open(&broker).await;
    let client = broker.client().await;
    let other = client.session().await.unwrap();
    let busy = other.open(tty.service.id, OpenMode::Shared).await.unwrap_err();
    assert_eq!(busy.status(), Some(Status::ExclusiveAccess), "{busy}");
    let modem = session.call_named(&tty, "get_modem", &[], &[]).await.unwrap_err();
    assert_eq!(modem.status(), Some(Status::Unsupported), "{modem}");
    session.close(&tty).await.unwrap();
    assert!(other.open(tty.service.id, OpenMode::Shared).await.is_ok());
}

#[tokio::test(flavor = "multi_thread")]
async fn tty_send_break_needs_the_privilege_and_flush_and_drain_work() {
    let (_master, follower) = pty();
    let broker = broker_on(&follower);
    let refused = broker.cli_as(NOBODY, &["call", "tty0", "send_break", "--scalar", "10"]);
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("NOT_PRIVILEGED") && stderr.contains("tty.break"),
        "{stderr}"
    );
    let (session, tty) = open(&broker).await;
    session.call_named(&tty, "send_break", &[10], &[]).await.unwrap();
    session.call_named(&tty, "flush", &[2], &[]).await.unwrap();
    session.call_named(&tty, "write", &[1000], b"x").await.unwrap();
    session.call_named(&tty, "drain", &[1000], &[]).await.unwrap();
    let wrong = session.call_named(&tty, "flush", &[3], &[]).await.unwrap_err();
    assert_eq!(wrong.status(), Some(Status::BadArgument));
}

#[tokio::test(flavor = "multi_thread")]
async fn tty_that_hangs_up_mid_read_is_no_device() {
    let (master, follower) = pty();
    let broker = broker_on(&follower);
    let baseline = broker.baseline_fds();
    let (session, tty) = open(&broker).await;
    {
        let reading = session.call_named(&tty, "read", &[64, 60_000], &[]);
        tokio::pin!(reading);
        loop {
            tokio::select! {
                early = &mut reading => panic!("read answered early: {early:?}"),
                () = tokio::task::yield_now() => {}
            }
            if broker.stats()["driver_waiting"] == 1 {
                break;
            }
        }
        drop(master);
        let gone = reading.await.unwrap_err();
        assert_eq!(gone.status(), Some(Status::NoDevice), "{gone}");
    }
    drop(session);
    broker.assert_no_leaks(baseline);
}

#[test]
fn a_tty_device_that_is_not_a_tty_is_refused_at_start() {
    for (path, says) in [
        ("/dev/null", "character device 1:3, not a tty character device"),
        ("/nonexistent/tty", "No such file"),
    ] {
        let dir = portcullis_tests::tempdir();
        let config = dir.path().join("c.toml");
        std::fs::write(
            &config,
            format!("[[device]]\nname = \"tty0\"\ndriver = \"tty\"\npath = \"{path}\"\n"),
        )
        .unwrap();
        let out = std::process::Command::new(portcullis_tests::bin())
            .args(["broker", "--run-dir"])
            .arg(dir.path().join("run"))
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("device \"tty0\" (tty)") && stderr.contains(says),
            "{stderr}"
        );
    }
}

#[test]
fn the_cli_speaks_the_tty_by_field_name() {
    let (_master, follower) = pty();
    let broker = broker_on(&follower);
    let got = portcullis_tests::stdout_ok(&broker.cli(&["call", "tty0", "get_line"]));
    assert!(
        got.contains("baud = ") && got.contains("data_bits = 8\n") && got.contains("parity = none\n"),
        "{got}"
    );
    let set = broker.cli(&[
        "call",
        "tty0",
        "set_line",
        "--field",
        "baud=115200",
        "--field",
        "flow=rtscts",
    ]);
    portcullis_tests::stdout_ok(&set);
    let json = portcullis_tests::stdout_ok(&broker.cli(&["call", "tty0", "get_line", "--json"]));
    let record: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(record["fields"]["stop_bits"], 1, "{record}");
    let refused = broker.cli(&["call", "tty0", "set_line", "--field", "parity=even"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("UNSUPPORTED"));
    let wrong = broker.cli(&["call", "tty0", "set_line", "--field", "speed=9600"]);
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("has no field \"speed\""));
}
