//! A hostile local client, for the integration tests: it does what an attacker on the machine
//! would try against the broker, and prints one JSON object saying what worked. The tests run
//! it as another uid and assert on that report.
//!
//! - `registers RUN_DIR`: maps the sample device's read-only `registers` memory and tries every
//!   way to change it: reopening `/proc/self/fd/N` read-write, a shared writable mapping,
//!   `write`, `ftruncate`, `fallocate`, adding seals.
//! - `dma RUN_DIR`: maps its `dma` memory, tries to add every seal (one would stop the broker
//!   emptying it), closes the user client and reports what is left.
//! - `exec RUN_DIR PROGRAM`: connects, says `Hello`, then `exec`s PROGRAM with the connection
//!   (`PROGRAM resume FD`): a process that became another program after it connected.
//! - `resume FD`: over an inherited connection, finds and opens `sample0`, and reports the
//!   answer and the goodbye that follows.
//! - `hold RUN_DIR N`: opens up to N native connections, reports how many it got and why the
//!   next was refused, and holds them until its standard input closes.
//! - `rings RUN_DIR N`: sets up to N shared-memory rings, each on a connection of its own,
//!   reports how many it got and why the next was refused, and holds them until its standard
//!   input closes.
//! - `map RUN_DIR N`: opens up to N user clients of `sample0` and maps each one's 1 MiB `dma`
//!   memory, reports how many mappings it got and why the next was refused, and holds them
//!   until its standard input closes.
//! - `pending RUN_DIR CALLS LIMIT`: starts CALLS `wait_event` calls over two gRPC sessions,
//!   reports the answers of the CALLS - LIMIT that come back at once, and holds the rest until
//!   its standard input closes.
//! - `cloexec RUN_DIR`: a gRPC session, a native session with both memory types mapped and a
//!   ring: reports how many descriptors the Rust client opened and how many of them an `exec`
//!   would hand on (not close-on-exec).
//! - `udp-echo ADDR:PORT [COUNT]`: binds a UDP socket, prints that it is ready, sends each of
//!   the first COUNT (1) datagrams it gets back to its sender, and reports the last.
//! - `unread RUN_DIR`: subscribes to every event on a gRPC session (with a tiny HTTP/2 window)
//!   and then never reads it; on a line on its standard input it calls `add` on another session
//!   and reports the answer; it ends when its standard input closes.

#![deny(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::{
    os::fd::{AsFd, AsRawFd, OwnedFd},
    path::Path,
};

use portcullis_client::native::NativeSession;
use portcullis_proto::{
    frame::{Body, ClientFrame, Request, RequestFrame, ServerFrame, encode},
    layout::AbiId,
};
use rustix::{
    fs::{FallocateFlags, Mode, OFlags, SealFlags},
    io::Errno,
};
use serde_json::{Map, Value, json};
use tokio_seqpacket::UnixSeqpacket;

const REGISTERS: u32 = 0;
const DMA: u32 = 1;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let report = match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["registers", run_dir] => registers(Path::new(run_dir)).await,
        ["dma", run_dir] => dma(Path::new(run_dir)).await,
        ["exec", run_dir, program] => exec(Path::new(run_dir), program).await,
        ["resume", fd] => resume(fd.parse().expect("a descriptor number")).await,
        ["hold", run_dir, n] => hold(Path::new(run_dir), n.parse().expect("a count")).await,
        ["rings", run_dir, n] => rings(Path::new(run_dir), n.parse().expect("a count")).await,
        ["map", run_dir, n] => map(Path::new(run_dir), n.parse().expect("a count")).await,
        ["pending", run_dir, calls, limit] => {
            pending(
                Path::new(run_dir),
                calls.parse().expect("a count"),
                limit.parse().expect("a count"),
            )
            .await
        }
        ["unread", run_dir] => unread(Path::new(run_dir)).await,
        ["cloexec", run_dir] => cloexec(Path::new(run_dir)).await,
        ["udp-echo", addr] => udp_echo(addr, 1),
        ["udp-echo", addr, count] => udp_echo(addr, count.parse().expect("a count")),
        _ => {
            eprintln!(
                "usage: hostile_client registers|dma|unread RUN_DIR | exec RUN_DIR PROGRAM | resume FD | hold RUN_DIR N | pending RUN_DIR CALLS LIMIT"
            );
            std::process::exit(2);
        }
    };
    println!("{report}");
}

/// Prints a report at once (the test reads it while this process holds what it holds).
fn say(report: &Value) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{report}");
    let _ = out.flush();
}

/// Waits until standard input closes (the test says so by dropping it).
async fn until_stdin_closes() {
    let _ = tokio::task::spawn_blocking(|| {
        let mut sink = String::new();
        while std::io::stdin().read_line(&mut sink).is_ok_and(|n| n > 0) {}
    })
    .await;
}

/// Reports how many it holds and why the next was refused, then holds them until standard input
/// closes.
async fn report_and_hold<T>(held: Vec<T>, refused: Value) -> Value {
    say(&json!({ "held": held.len(), "refused": refused }));
    until_stdin_closes().await;
    json!({ "released": held.len() })
}

async fn hold(run_dir: &Path, n: usize) -> Value {
    let mut held = Vec::new();
    let mut refused = Value::Null;
    for _ in 0..n {
        match NativeSession::connect(run_dir, AbiId::native()).await {
            Ok(session) => held.push(session),
            Err(e) => {
                refused = e.to_string().into();
                break;
            }
        }
    }
    report_and_hold(held, refused).await
}

async fn rings(run_dir: &Path, n: usize) -> Value {
    let mut held = Vec::new();
    let mut refused = Value::Null;
    for _ in 0..n {
        let dir = run_dir.to_path_buf();
        let ring = tokio::task::spawn_blocking(move || {
            portcullis_client::ring::RingClient::connect(dir, portcullis_client::ring::RingOptions::default())
        })
        .await
        .unwrap();
        match ring {
            Ok(ring) => held.push(ring),
            Err(e) => {
                refused = e.to_string().into();
                break;
            }
        }
    }
    report_and_hold(held, refused).await
}

async fn map(run_dir: &Path, n: usize) -> Value {
    let mut session = NativeSession::connect(run_dir, AbiId::native()).await.unwrap();
    let sample = session.find("sample0").await.unwrap().remove(0);
    let mut held = Vec::new();
    let mut refused = Value::Null;
    for _ in 0..n {
        let handle = session.open(sample.id, false).await.unwrap();
        match session.map_memory(handle, DMA).await {
            Ok(memory) => held.push(memory),
            Err(e) => {
                refused = e.to_string().into();
                break;
            }
        }
    }
    report_and_hold(held, refused).await
}

async fn pending(run_dir: &Path, calls: usize, limit: usize) -> Value {
    let client = portcullis_client::Client::connect(run_dir).await.unwrap();
    let mut sessions = Vec::new();
    let mut handles = Vec::new();
    for _ in 0..2 {
        let session = client.session().await.unwrap();
        let sample = session
            .find_one(portcullis_client::matching::by_name("sample0"))
            .await
            .unwrap();
        handles.push(
            session
                .open(sample.id, portcullis_client::OpenMode::Shared)
                .await
                .unwrap(),
        );
        sessions.push(std::sync::Arc::new(session));
    }
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    for i in 0..calls {
        let (session, handle) = (sessions[i % 2].clone(), handles[i % 2].handle);
        let done_tx = done_tx.clone();
        tokio::spawn(async move {
            // wait_event (selector 3) for ten minutes: it pends unless refused.
            let result = session.call(handle, 3, &[600_000], &[], 0).await;
            let _ = done_tx.send(result.err().map(|e| e.to_string()));
        });
    }
    let mut refusals = Vec::new();
    while refusals.len() < calls.saturating_sub(limit) {
        match done_rx.recv().await {
            Some(Some(refusal)) => refusals.push(refusal),
            Some(None) => return json!({ "error": "a wait_event completed" }),
            None => break,
        }
    }
    refusals.sort();
    refusals.dedup();
    say(&json!({ "refused": calls.saturating_sub(limit), "reasons": refusals }));
    until_stdin_closes().await;
    drop(sessions);
    json!({ "done": true })
}

fn udp_echo(addr: &str, count: usize) -> Value {
    let socket = std::net::UdpSocket::bind(addr).unwrap();
    say(&json!({ "ready": addr }));
    let mut buf = [0u8; 2048];
    let mut last = json!(null);
    for _ in 0..count {
        let (n, from) = socket.recv_from(&mut buf).unwrap();
        socket.send_to(&buf[..n], from).unwrap();
        last = json!({ "got": String::from_utf8_lossy(&buf[..n]), "from": from.to_string() });
    }
    last
}

/// The descriptors open now.
fn open_fds() -> std::collections::BTreeSet<i32> {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

async fn cloexec(run_dir: &Path) -> Value {
    let before = open_fds();
    let client = portcullis_client::Client::connect(run_dir).await.unwrap();
    let session = client.session().await.unwrap();
    let (mut native, handle) = open_sample(run_dir).await;
    let registers = native.map_memory(handle, REGISTERS).await.unwrap();
    let dma = native.map_memory(handle, DMA).await.unwrap();
    let ring = tokio::task::spawn_blocking({
        let run_dir = run_dir.to_path_buf();
        move || {
            portcullis_client::ring::RingClient::connect(run_dir, portcullis_client::ring::RingOptions::default())
                .unwrap()
        }
    })
    .await
    .unwrap();
    let mut inheritable = Vec::new();
    let mut opened: Vec<i32> = open_fds().difference(&before).copied().collect();
    opened.retain(|fd| std::path::Path::new(&format!("/proc/self/fd/{fd}")).exists());
    for fd in &opened {
        // O_CLOEXEC in the flags the kernel shows for the descriptor. (One that closed since it
        // was listed, as the listing's own directory descriptor does, is not the client's.)
        let Ok(flags) = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")) else {
            continue;
        };
        let cloexec = flags
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
            .is_some_and(|f| f & 0o2000000 != 0);
        if !cloexec {
            let what = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap_or_default();
            inheritable.push(format!("{fd} {}", what.display()));
        }
    }
    drop((ring, registers, dma, native, session, client));
    json!({ "opened": opened.len(), "inheritable": inheritable })
}

async fn unread(run_dir: &Path) -> Value {
    use hyper_util::rt::TokioIo;
    use portcullis_proto::pb::{self, broker_client::BrokerClient, client_message::Request as R};
    let socket = run_dir.join(portcullis_client::GRPC_SOCKET);
    // A 1 KiB stream window: once that much is unread, the broker can send this stream nothing.
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .initial_stream_window_size(1024)
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(socket).await?)) }
        }))
        .await
        .unwrap();
    let mut grpc = BrokerClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::ClientMessage {
        request_id: 1,
        request: Some(R::Subscribe(pb::Subscribe {
            service_ids: Vec::new(),
        })),
    })
    .await
    .unwrap();
    let mut stream = grpc
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    // The subscription's answer, then nothing more is read from this stream.
    let answered = stream.message().await.unwrap().is_some();
    say(&json!({ "subscribed": answered }));
    let other = portcullis_client::Client::connect(run_dir).await.unwrap();
    let session = other.session().await.unwrap();
    let sample = session
        .find_one(portcullis_client::matching::by_name("sample0"))
        .await
        .unwrap();
    let sample = session
        .open(sample.id, portcullis_client::OpenMode::Shared)
        .await
        .unwrap();
    let mut line = String::new();
    let reader = tokio::task::spawn_blocking(move || std::io::stdin().read_line(&mut line).map(|n| n > 0));
    if matches!(reader.await, Ok(Ok(true))) {
        let result = session.call_named(&sample, "add", &[2, 3], &[]).await;
        say(&json!({ "add": result.map(|o| o.scalars).map_err(|e| e.to_string()) }));
    }
    until_stdin_closes().await;
    drop((stream, tx));
    json!({ "done": true })
}

/// One attempt's outcome: `"ok"`, or the errno's name.
fn outcome<T>(result: Result<T, Errno>) -> Value {
    match result {
        Ok(_) => "ok".into(),
        Err(e) => format!("{e:?}").into(),
    }
}

async fn open_sample(run_dir: &Path) -> (NativeSession, u64) {
    let mut session = NativeSession::connect(run_dir, AbiId::native()).await.unwrap();
    let sample = session.find("sample0").await.unwrap().remove(0);
    let handle = session.open(sample.id, false).await.unwrap();
    (session, handle)
}

/// A shared mapping of `fd` with `prot`, unmapped at once: whether the kernel allows it.
#[allow(unsafe_code)]
fn map_shared(fd: impl AsFd, len: usize, prot: rustix::mm::ProtFlags) -> Result<(), Errno> {
    // SAFETY: a new mapping at an address the kernel picks, never dereferenced, unmapped before
    // anything else could refer to it.
    unsafe {
        let at = rustix::mm::mmap(std::ptr::null_mut(), len, prot, rustix::mm::MapFlags::SHARED, fd, 0)?;
        rustix::mm::munmap(at, len)
    }
}

async fn registers(run_dir: &Path) -> Value {
    use rustix::mm::ProtFlags;
    let (mut session, handle) = open_sample(run_dir).await;
    let mapped = session.map_memory(handle, REGISTERS).await.unwrap();
    let (fd, size) = (mapped.fd, usize::try_from(mapped.size).unwrap());
    let proc_path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    let mut report = Map::new();
    let reopened = rustix::fs::open(&proc_path, OFlags::RDWR | OFlags::CLOEXEC, Mode::empty());
    report.insert("reopen_rw".into(), outcome(reopened.as_ref().map(drop).map_err(|e| *e)));
    // Whatever descriptor it holds (a writable reopen, if that worked), nothing may change the
    // memory.
    let target: OwnedFd = match reopened {
        Ok(rw) => rw,
        Err(_) => fd.try_clone().unwrap(),
    };
    report.insert(
        "mmap_shared_write".into(),
        outcome(map_shared(&target, size, ProtFlags::READ | ProtFlags::WRITE)),
    );
    report.insert("write".into(), outcome(rustix::io::pwrite(&target, b"owned", 0)));
    report.insert("ftruncate_shrink".into(), outcome(rustix::fs::ftruncate(&target, 0)));
    report.insert(
        "ftruncate_grow".into(),
        outcome(rustix::fs::ftruncate(&target, (size * 2) as u64)),
    );
    report.insert(
        "fallocate_grow".into(),
        outcome(rustix::fs::fallocate(
            &target,
            FallocateFlags::empty(),
            0,
            (size * 2) as u64,
        )),
    );
    report.insert(
        "fallocate_punch".into(),
        outcome(rustix::fs::fallocate(
            &target,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            0,
            size as u64,
        )),
    );
    for (name, seal) in seals() {
        report.insert(
            format!("add_seal_{name}"),
            outcome(rustix::fs::fcntl_add_seals(&target, seal)),
        );
    }
    let mut first = [0u8; 8];
    rustix::io::pread(&fd, &mut first, 0).unwrap();
    report.insert("first_bytes".into(), hex(&first).into());
    report.insert("size".into(), rustix::fs::fstat(&fd).unwrap().st_size.into());
    Value::Object(report)
}

fn seals() -> [(&'static str, SealFlags); 6] {
    [
        ("seal", SealFlags::SEAL),
        ("shrink", SealFlags::SHRINK),
        ("grow", SealFlags::GROW),
        ("write", SealFlags::WRITE),
        ("future_write", SealFlags::FUTURE_WRITE),
        ("exec", SealFlags::EXEC),
    ]
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn dma(run_dir: &Path) -> Value {
    let (mut session, handle) = open_sample(run_dir).await;
    let mapped = session.map_memory(handle, DMA).await.unwrap();
    let fd = mapped.fd;
    rustix::io::pwrite(&fd, b"secret data", 0).unwrap();
    let mut report = Map::new();
    for (name, seal) in seals() {
        report.insert(
            format!("add_seal_{name}"),
            outcome(rustix::fs::fcntl_add_seals(&fd, seal)),
        );
    }
    session.close(handle).await.unwrap();
    let mut left = [0u8; 11];
    let read = rustix::io::pread(&fd, &mut left, 0).unwrap();
    report.insert(
        "blocks_after_close".into(),
        rustix::fs::fstat(&fd).unwrap().st_blocks.into(),
    );
    report.insert("read_after_close".into(), hex(&left[..read]).into());
    Value::Object(report)
}

async fn exec(run_dir: &Path, program: &str) -> Value {
    use std::os::unix::process::CommandExt;
    // The broker reads the peer's identity before it welcomes it.
    let conn = portcullis_tests::native_hello(run_dir).await;
    let fd = OwnedFd::from(conn);
    rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::empty()).unwrap();
    let error = std::process::Command::new(program)
        .arg("resume")
        .arg(fd.as_raw_fd().to_string())
        .exec();
    json!({ "exec_failed": error.to_string() })
}

/// Takes over descriptor `fd`, inherited across `exec`.
#[allow(unsafe_code)]
fn inherited(fd: i32) -> OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: `exec` mode passed this open descriptor to this process, which owns it and has
    // not used it; nothing else closes it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

async fn request(conn: &UnixSeqpacket, id: u64, request: Request) -> ServerFrame {
    let frame = ClientFrame::Request(RequestFrame { id, request });
    conn.send(&encode(&frame).unwrap()).await.unwrap();
    portcullis_tests::next_frame(conn).await
}

async fn resume(fd: i32) -> Value {
    let conn = UnixSeqpacket::try_from(inherited(fd)).unwrap();
    let found = request(
        &conn,
        1,
        Request::FindServices {
            class: String::new(),
            name: "sample0".into(),
        },
    )
    .await;
    let ServerFrame::Response(found) = found else {
        return json!({ "find": format!("{found:?}") });
    };
    let Body::Found(services) = found.body else {
        return json!({ "find_status": found.status });
    };
    let opened = request(
        &conn,
        2,
        Request::Open {
            service: services[0].id,
            exclusive: false,
        },
    )
    .await;
    let ServerFrame::Response(opened) = opened else {
        return json!({ "open": format!("{opened:?}") });
    };
    let mut report = json!({ "open_status": opened.status, "open_message": opened.message });
    if opened.status == 0 {
        return report;
    }
    if let ServerFrame::Goodbye { status, reason } = portcullis_tests::next_frame(&conn).await {
        report["goodbye_status"] = status.into();
        report["goodbye_reason"] = reason.into();
    }
    report
}
