//! One user cannot starve the others: connection slots per uid and for administrators, pending
//! calls and unread messages per uid, a handshake deadline for every transport; and a broker
//! told to stop stops, whoever is connected.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::process::CommandExt,
    path::PathBuf,
    process::{Child, ChildStdin, Command, Stdio},
    time::{Duration, Instant},
};

use portcullis_client::{ClientError, OpenMode, Status, pb};
use portcullis_proto::{frame::ServerFrame, layout::AbiId};
use portcullis_tests::{Broker, BrokerSetup, NOBODY, bin, stdout_ok};
use serde_json::Value;

/// A hostile client running as `uid`, holding what it took until dropped.
struct Held {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl Held {
    fn start(broker: &Broker, uid: u32, args: &[&str]) -> Held {
        let program = broker.copy_program(&PathBuf::from(env!("CARGO_BIN_EXE_hostile_client")), "hostile_client");
        let mut child = portcullis_tests::spawn_retrying_busy(
            Command::new(program)
                .args(args)
                .uid(uid)
                .gid(uid)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped()),
        );
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Held {
            stdin: child.stdin.take(),
            child,
            lines,
        }
    }

    /// The next report it prints.
    fn report(&mut self) -> Value {
        let line = self.lines.next().expect("the client ended without a report").unwrap();
        serde_json::from_str(&line).unwrap()
    }

    fn say(&mut self, line: &str) {
        writeln!(self.stdin.as_mut().unwrap(), "{line}").unwrap();
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

fn run_dir(broker: &Broker) -> String {
    broker.run_dir().to_str().unwrap().to_string()
}

#[test]
fn one_uid_cannot_take_every_connection_and_root_keeps_its_slots() {
    let broker = Broker::with(BrokerSetup {
        config: Some(
            "max_connections = 6\n[limits]\nmax_connections_per_uid = 3\nreserved_connections = 2\n[[device]]\nname = \"sample0\"\ndriver = \"sample\"\n",
        ),
        ..BrokerSetup::default()
    });
    let dir = run_dir(&broker);
    let mut nobody = Held::start(&broker, NOBODY, &["hold", &dir, "4"]);
    let report = nobody.report();
    assert_eq!(report["held"], 3, "{report}");
    let refused = report["refused"].as_str().unwrap();
    assert!(refused.contains("uid 65534 already holds 3 connections"), "{refused}");
    // Over gRPC the same uid hears why, and what to do.
    let ls = broker.cli_as(NOBODY, &["ls"]);
    assert_eq!(ls.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&ls.stderr);
    assert!(
        stderr.contains("the broker refused the connection: uid 65534 already holds 3 connections")
            && stderr.contains("max_connections_per_uid"),
        "{stderr}"
    );
    // Another uid is unaffected, up to the slots kept for administrators.
    let mut other = Held::start(&broker, NOBODY - 1, &["hold", &dir, "2"]);
    let report = other.report();
    assert_eq!(report["held"], 1, "{report}");
    assert!(
        report["refused"]
            .as_str()
            .unwrap()
            .contains("2 of them kept for root and the broker's own user"),
        "{report}"
    );
    // Root still gets in: the statistics say who holds what.
    let stats = broker.stats();
    assert_eq!(stats["sessions"], 4, "{stats}");
    drop(nobody);
    drop(other);
    broker.assert_no_leaks(broker.baseline_fds());
    assert!(broker.log().contains("native connection refused at a limit"));
}

/// Scheduling policy of thread `tid` of `pid` (field 41 of its `stat`; 5 is `SCHED_IDLE`).
fn policy(pid: u32, tid: &str) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).unwrap();
    let after_name = stat.rsplit_once(')').unwrap().1;
    after_name.split_whitespace().nth(38).unwrap().parse().unwrap()
}

/// While a uid holds more connections than `foreground_connections_per_uid` (1), its
/// connections are served by the background workers, which run at idle priority, over both
/// local transports; an administrator's never are.
#[test]
fn a_uids_connections_beyond_its_first_are_served_by_idle_priority_workers() {
    let broker = Broker::start();
    let dir = run_dir(&broker);
    let mut nobody = Held::start(&broker, NOBODY, &["hold", &dir, "3"]);
    assert_eq!(nobody.report()["held"], 3);
    let mut root = Held::start(&broker, 0, &["hold", &dir, "3"]);
    assert_eq!(root.report()["held"], 3);
    // Its connections move to the background as their loops start — the second and third; the
    // first too if its loop started after the second came, else with its next request. Root's
    // never do.
    let deadline = Instant::now() + Duration::from_secs(10);
    let moved = loop {
        let background = broker.stats()["background"].as_u64().unwrap();
        if background >= 2 {
            break background;
        }
        assert!(Instant::now() < deadline, "{}", broker.stats());
        std::thread::yield_now();
    };
    assert!(
        moved <= 3,
        "an administrator's connections stay in the foreground: {moved}"
    );
    // A gRPC client of the same uid is its fourth connection: served in the background too.
    let ls = broker.cli_as(NOBODY, &["ls"]);
    assert!(ls.status.success(), "{}", String::from_utf8_lossy(&ls.stderr));
    assert!(String::from_utf8_lossy(&ls.stdout).contains("sample0"));
    // The background workers exist and run at idle priority.
    let tasks: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", broker.pid()))
        .unwrap()
        .map(|t| t.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let background: Vec<&String> = tasks
        .iter()
        .filter(|t| {
            std::fs::read_to_string(format!("/proc/{}/task/{t}/comm", broker.pid()))
                .is_ok_and(|c| c.trim() == "pc-background")
        })
        .collect();
    assert!(!background.is_empty());
    for tid in background {
        assert_eq!(
            policy(broker.pid(), tid),
            5,
            "pc-background thread {tid} is not SCHED_IDLE"
        );
    }
    drop(nobody);
    drop(root);
    broker.assert_no_leaks(broker.baseline_fds());
    assert_eq!(broker.stats()["background"], 0);
}

#[test]
fn one_uid_cannot_take_every_ring_or_map_unbounded_memory() {
    let broker = Broker::with(BrokerSetup {
        config: Some(
            "[ring]\nmax_rings = 8\nwait = \"sleep\"\n[limits]\nmax_rings_per_uid = 3\nmax_mapped_bytes_per_uid = 3145728\n[[device]]\nname = \"sample0\"\ndriver = \"sample\"\n",
        ),
        ..BrokerSetup::default()
    });
    let baseline = broker.baseline_fds();
    let dir = run_dir(&broker);
    // Rings: three, then NO_MEMORY naming the limit; another uid still gets its own.
    let mut nobody = Held::start(&broker, NOBODY, &["rings", &dir, "5"]);
    let report = nobody.report();
    assert_eq!(report["held"], 3, "{report}");
    let refused = report["refused"].as_str().unwrap();
    assert!(
        refused.contains("NO_MEMORY")
            && refused.contains("uid 65534 already holds 3 rings")
            && refused.contains("max_rings_per_uid"),
        "{refused}"
    );
    let mut other = Held::start(&broker, NOBODY - 1, &["rings", &dir, "3"]);
    assert_eq!(other.report()["held"], 3);
    assert_eq!(broker.stats()["rings"], 6);
    drop(nobody);
    drop(other);
    broker.assert_no_leaks(baseline);
    // Mapped memory: three 1 MiB dma mappings, then NO_MEMORY; released with the user clients.
    let mut nobody = Held::start(&broker, NOBODY, &["map", &dir, "5"]);
    let report = nobody.report();
    assert_eq!(report["held"], 3, "{report}");
    let refused = report["refused"].as_str().unwrap();
    assert!(
        refused.contains("NO_MEMORY") && refused.contains("max_mapped_bytes_per_uid"),
        "{refused}"
    );
    let mut other = Held::start(&broker, NOBODY - 1, &["map", &dir, "3"]);
    assert_eq!(other.report()["held"], 3);
    drop(nobody);
    let mut again = Held::start(&broker, NOBODY, &["map", &dir, "3"]);
    assert_eq!(
        again.report()["held"],
        3,
        "released with the user clients that held them"
    );
    drop(again);
    drop(other);
    broker.assert_no_leaks(baseline);
}

#[test]
fn pending_calls_are_bounded_per_uid_and_others_are_unaffected() {
    let broker = Broker::with(BrokerSetup {
        config: Some("[limits]\nmax_pending_calls_per_uid = 40\n[[device]]\nname = \"sample0\"\ndriver = \"sample\"\n"),
        ..BrokerSetup::default()
    });
    let dir = run_dir(&broker);
    let mut nobody = Held::start(&broker, NOBODY, &["pending", &dir, "50", "40"]);
    let report = nobody.report();
    assert_eq!(report["refused"], 10, "{report}");
    let reasons = report["reasons"].as_array().unwrap();
    assert_eq!(reasons.len(), 1, "{report}");
    let reason = reasons[0].as_str().unwrap();
    assert!(
        reason.starts_with("NO_MEMORY") && reason.contains("uid 65534 has 40 calls pending"),
        "{reason}"
    );
    assert_eq!(broker.stats()["pending_calls"], 40);
    // Root's calls still pend: another uid's bound is its own.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let (session, sample) = broker.open("sample0", OpenMode::Shared).await;
        let wait = session.call_named(&sample, "wait_event", &[600_000], &[]);
        tokio::pin!(wait);
        // It is pending once the broker counts it.
        loop {
            tokio::select! {
                early = &mut wait => panic!("wait_event answered at once: {early:?}"),
                () = tokio::task::yield_now() => {}
            }
            if broker.stats()["pending_calls"] == 41 {
                break;
            }
        }
        session.call_named(&sample, "fire_event", &[7], &[]).await.unwrap();
        assert_eq!(wait.await.unwrap().scalars, vec![7]);
    });
    drop(nobody);
    broker.assert_no_leaks(broker.baseline_fds());
}

/// Events the tests below fire.
const EVENTS: u64 = 400;

/// A broker with the sample device and `limit` in `[limits]`, and a client of uid nobody that
/// subscribed to every event and reads nothing more.
fn unread_reader(limit: &str) -> (Broker, Held) {
    let config = format!("[limits]\n{limit}\n[[device]]\nname = \"sample0\"\ndriver = \"sample\"\n");
    let broker = Broker::with(BrokerSetup {
        config: Some(&config),
        ..BrokerSetup::default()
    });
    let dir = run_dir(&broker);
    let mut nobody = Held::start(&broker, NOBODY, &["unread", &dir]);
    assert_eq!(nobody.report()["subscribed"], true);
    (broker, nobody)
}

#[test]
fn unread_messages_are_bounded_per_uid_and_others_still_hear_everything() {
    let (broker, mut nobody) = unread_reader("max_queued_messages_per_uid = 64");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let (watcher, _) = broker.open("sample0", OpenMode::Shared).await;
        watcher.subscribe(&[]).await.unwrap();
        let (session, sample) = broker.open("sample0", OpenMode::Shared).await;
        for value in 0..EVENTS {
            session.call_named(&sample, "fire_event", &[value], &[]).await.unwrap();
        }
        // The root watcher hears every one of them.
        let mut heard = 0;
        while heard < EVENTS {
            let event = watcher.next_event().await.expect("the session ended");
            if let Some(pb::event::Kind::Notification(n)) = event.kind {
                assert_eq!(n.value, heard);
                heard += 1;
            }
        }
        assert_eq!(watcher.events_lost(), 0);
    });
    // The reader that never reads holds its uid's bound of messages, no more.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let queued = broker.stats()["queued_messages"].as_u64().unwrap();
        assert!(queued <= 64, "{queued} messages queued for one uid");
        if queued == 64 {
            break;
        }
        assert!(Instant::now() < deadline, "the queue never filled: {queued}");
        std::thread::yield_now();
    }
    // At its bound, that uid's calls are refused with NO_MEMORY, on any of its sessions.
    nobody.say("call");
    let report = nobody.report();
    let refusal = report["add"]["Err"].as_str().unwrap_or_default();
    assert!(
        refusal.starts_with("NO_MEMORY") && refusal.contains("messages queued"),
        "{report}"
    );
    drop(nobody);
    broker.assert_no_leaks(broker.baseline_fds());
}

/// One session that never reads holds at most `max_queued_messages_per_session` messages,
/// however much its uid may queue; its uid's other sessions are served, and the events it
/// missed are logged (at a bounded rate).
#[test]
fn unread_messages_are_bounded_per_session() {
    let (broker, mut nobody) = unread_reader("max_queued_messages_per_session = 16");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let (session, sample) = broker.open("sample0", OpenMode::Shared).await;
        for value in 0..EVENTS {
            session.call_named(&sample, "fire_event", &[value], &[]).await.unwrap();
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let queued = broker.stats()["queued_messages"].as_u64().unwrap();
        assert!(queued <= 16, "{queued} messages queued for one session");
        if queued == 16
            && broker
                .log()
                .contains("events dropped (limits.max_queued_messages_per_uid or max_queued_messages_per_session)")
        {
            break;
        }
        assert!(Instant::now() < deadline, "the session's queue never filled: {queued}");
        std::thread::yield_now();
    }
    // The same uid's other session is served: the bound was the session's, not the uid's.
    nobody.say("call");
    assert_eq!(nobody.report()["add"]["Ok"], serde_json::json!([5]));
    drop(nobody);
    broker.assert_no_leaks(broker.baseline_fds());
}

#[test]
fn a_grpc_connection_that_never_sends_its_preface_is_closed() {
    let broker = Broker::with(BrokerSetup {
        config: Some("[limits]\nhandshake_timeout_ms = 200\n[[device]]\nname = \"sample0\"\ndriver = \"sample\"\n"),
        ..BrokerSetup::default()
    });
    let mut silent = std::os::unix::net::UnixStream::connect(broker.socket()).unwrap();
    // Waits for the broker to close it (a read of 0 bytes); the test's own timeout is a bound
    // on a hang, far from the 200 ms deadline.
    silent.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut byte = [0u8; 1];
    let n = std::io::Read::read(&mut silent, &mut byte).expect("closed by the broker, not timed out");
    assert_eq!(n, 0);
    assert!(broker.log().contains("no HTTP/2 preface within the handshake timeout"));
    // Served clients are unaffected.
    assert_eq!(
        stdout_ok(&broker.cli(&["call", "sample0", "add", "--scalar", "2", "--scalar", "3"])).trim(),
        "5"
    );
}

#[test]
fn sigterm_with_clients_connected_says_goodbye_and_exits_zero() {
    let mut broker = Broker::with(BrokerSetup {
        config: Some("[limits]\nshutdown_timeout_ms = 500\n[[device]]\nname = \"sample0\"\ndriver = \"sample\"\n"),
        ..BrokerSetup::default()
    });
    // A bare connection that sends nothing, and one that sent only half a preface.
    let _bare = std::os::unix::net::UnixStream::connect(broker.socket()).unwrap();
    let mut half = std::os::unix::net::UnixStream::connect(broker.socket()).unwrap();
    half.write_all(b"PRI * HTTP/2.0").unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (session, sample, native) = runtime.block_on(async {
        let (session, sample) = broker.open("sample0", OpenMode::Shared).await;
        let native = portcullis_tests::native_hello(&broker.run_dir()).await;
        (session, sample, native)
    });
    let waiting = runtime.spawn({
        let session = std::sync::Arc::new(session);
        let handle = sample.handle;
        let s = session.clone();
        async move {
            let result = s.call(handle, 3, &[600_000], &[], 0).await;
            // After the aborted call, the session's last event says why it ends.
            let mut goodbye = None;
            while let Some(event) = s.next_event().await {
                if let Some(pb::event::Kind::Goodbye(bye)) = event.kind {
                    goodbye = Some(bye);
                }
            }
            (result, goodbye)
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while broker.stats()["pending_calls"] != 1 {
        assert!(Instant::now() < deadline, "the call never pended");
        std::thread::yield_now();
    }
    broker.signal(rustix::process::Signal::TERM);
    let status = broker.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{status}\n{}", broker.log());
    let (result, goodbye) = runtime.block_on(waiting).unwrap();
    let aborted = result.unwrap_err();
    assert_eq!(aborted.status(), Some(Status::Aborted), "{aborted}");
    let goodbye = goodbye.expect("a goodbye event");
    assert_eq!(goodbye.reason, "the broker is stopping");
    let frame = runtime.block_on(portcullis_tests::next_frame(&native));
    assert!(
        matches!(&frame, ServerFrame::Goodbye { status, reason } if *status == Status::Aborted.code() && reason == "the broker is stopping"),
        "{frame:?}"
    );
    assert!(broker.log().contains("broker stopped"));
}

#[test]
fn clients_say_why_they_cannot_connect() {
    let broker = Broker::start();
    let portcullis = broker.copy_program(&bin(), "portcullis");
    let ls =
        |uid: u32, dir: &std::path::Path| broker.run_as(uid, &portcullis, &["ls", "--run-dir", dir.to_str().unwrap()]);
    let missing = broker.private_dir().join("nowhere");
    let out = ls(0, &missing);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the socket does not exist") && stderr.contains("portcullis broker"),
        "{stderr}"
    );
    // A socket file left by a broker that stopped.
    let stale = broker.private_dir().join("stale");
    std::fs::create_dir_all(&stale).unwrap();
    drop(std::os::unix::net::UnixListener::bind(stale.join(portcullis_client::GRPC_SOCKET)).unwrap());
    let out = ls(0, &stale);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no broker is listening"), "{stderr}");
    // A directory nobody may enter.
    let closed = broker.private_dir().join("closed");
    std::fs::create_dir_all(&closed).unwrap();
    std::os::unix::net::UnixListener::bind(closed.join(portcullis_client::GRPC_SOCKET)).unwrap();
    std::fs::set_permissions(&closed, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let out = ls(NOBODY, &closed);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("permission denied") && stderr.contains("uid 65534"),
        "{stderr}"
    );
    let native = tokio::runtime::Runtime::new().unwrap().block_on(async {
        portcullis_client::native::NativeSession::connect(&missing, AbiId::native())
            .await
            .unwrap_err()
    });
    assert!(
        matches!(&native, ClientError::Unreachable { message, .. } if message.contains("does not exist")),
        "{native}"
    );
}

/// A session that sends nothing and holds nothing is closed at `limits.idle_timeout_ms`, over
/// both transports, with TIMEOUT; one that holds a user client stays, although it connected
/// first (so it would have been closed first, were holding nothing not the rule).
#[tokio::test(flavor = "multi_thread")]
async fn idle_sessions_holding_nothing_are_closed_and_those_holding_something_stay() {
    let broker = Broker::with(BrokerSetup {
        config: Some("[limits]\nidle_timeout_ms = 300\n[[device]]\nname = \"sample0\"\ndriver = \"sample\"\n"),
        ..BrokerSetup::default()
    });
    let baseline = broker.baseline_fds();
    let (holder, sample) = broker.open("sample0", OpenMode::Shared).await;
    let client = broker.client().await;
    let idle = client.session().await.unwrap();
    let native = portcullis_tests::native_hello(&broker.run_dir()).await;
    let goodbye = loop {
        let event = idle.next_event().await.expect("a goodbye before the stream ends");
        if let Some(pb::event::Kind::Goodbye(g)) = event.kind {
            break g;
        }
    };
    assert_eq!(goodbye.status, pb::StatusCode::Timeout as i32, "{goodbye:?}");
    assert!(goodbye.reason.contains("idle_timeout_ms"), "{goodbye:?}");
    let frame = portcullis_tests::next_frame(&native).await;
    assert!(
        matches!(&frame, ServerFrame::Goodbye { status, reason } if *status == Status::Timeout as u32 && reason.contains("held nothing")),
        "{frame:?}"
    );
    // The session holding a user client is still served.
    let sum = holder.call_named(&sample, "add", &[2, 3], &[]).await.unwrap();
    assert_eq!(sum.scalars, vec![5]);
    drop((holder, sample, idle, client, native));
    broker.assert_no_leaks(baseline);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_holds_at_most_the_configured_user_clients() {
    let broker = Broker::with(BrokerSetup {
        config: Some(
            "[limits]\nmax_user_clients_per_session = 2\n[[device]]\nname = \"sample0\"\ndriver = \"sample\"\n",
        ),
        ..BrokerSetup::default()
    });
    let mut s = portcullis_client::native::NativeSession::connect(broker.run_dir(), AbiId::native())
        .await
        .unwrap();
    let sample = s.find("sample0").await.unwrap().remove(0);
    let first = s.open(sample.id, false).await.unwrap();
    s.open(sample.id, false).await.unwrap();
    let third = s.open(sample.id, false).await.unwrap_err();
    assert_eq!(third.status(), Some(Status::NoMemory), "{third}");
    assert!(third.to_string().contains("max_user_clients_per_session"), "{third}");
    // Closing one makes room; another session has its own.
    s.close(first).await.unwrap();
    s.open(sample.id, false).await.unwrap();
    let mut other = portcullis_client::native::NativeSession::connect(broker.run_dir(), AbiId::native())
        .await
        .unwrap();
    other.open(sample.id, false).await.unwrap();
}
