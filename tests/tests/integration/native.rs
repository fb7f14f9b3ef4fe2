//! The native protocol on `native.sock`: a whole session, structs in a declared ABI, and every
//! kind of malformed input getting its status or a closed session while others are served.

use portcullis_proto::{
    Status,
    frame::{ClientFrame, Hello, MAX_FRAME, PROTOCOL_VERSION, Request, RequestFrame, ServerFrame, encode},
    layout::AbiId,
};
use portcullis_tests::{
    Broker,
    client::{NATIVE_SOCKET, native::NativeSession},
    dma_pattern, fnv1a,
};
use tokio_seqpacket::UnixSeqpacket;

async fn open_sample(broker: &Broker, abi: AbiId) -> (NativeSession, u64) {
    let mut s = NativeSession::connect(broker.run_dir(), abi).await.unwrap();
    let sample = s.find("sample0").await.unwrap();
    assert_eq!(sample.len(), 1);
    let handle = s.open(sample[0].id, false).await.unwrap();
    (s, handle)
}

async fn assert_still_serving(broker: &Broker) {
    let (mut s, h) = open_sample(broker, AbiId::native()).await;
    assert_eq!(s.call(h, 0, &[40, 2], &[], 0).await.unwrap().scalars, vec![42]);
}

#[tokio::test]
async fn native_session_calls_sample_methods() {
    let broker = Broker::start();
    let (mut s, h) = open_sample(&broker, AbiId::native()).await;
    assert_eq!(s.call(h, 0, &[2, 3], &[], 0).await.unwrap().scalars, vec![5]);
    assert_eq!(s.call(h, 1, &[], b"hello", 4096).await.unwrap().struct_out, b"hello");
    let info = s.call(h, 2, &[], &[], 16).await.unwrap().struct_out;
    assert_eq!(u32::from_ne_bytes(info[0..4].try_into().unwrap()), 1);
    let err = s.call(h, 5, &[], &[], 0).await;
    assert!(err.is_ok(), "root holds sample.admin: {err:?}");
    s.close(h).await.unwrap();
    assert_eq!(
        s.call(h, 0, &[1, 1], &[], 0).await.unwrap_err().status(),
        Some(Status::NotOpen)
    );
}

#[tokio::test]
async fn native_get_info_arrives_in_the_clients_byte_order() {
    let broker = Broker::start();
    let (mut s, h) = open_sample(&broker, AbiId::S390x).await;
    // The client learns the broker's own ABI (not its own) from the Welcome.
    assert_eq!(s.broker_abi(), Some(AbiId::native()));
    let info = s.call(h, 2, &[], &[], 16).await.unwrap().struct_out;
    assert_eq!(
        u32::from_be_bytes(info[0..4].try_into().unwrap()),
        1,
        "version, big-endian"
    );
    assert_eq!(
        u32::from_be_bytes(info[4..8].try_into().unwrap()),
        1,
        "current opens, big-endian"
    );
}

#[tokio::test]
async fn native_struct_of_wrong_size_for_declared_abi_is_bad_argument() {
    let broker = Broker::start();
    let (mut s, h) = open_sample(&broker, AbiId::I386).await;
    // sample_record is 144 bytes natively but 112 for i386: the native size is refused.
    let err = s.call(h, 7, &[], &[0; 144], 4096).await.unwrap_err();
    assert_eq!(err.status(), Some(Status::BadArgument), "{err}");
    let ok = s.call(h, 7, &[], &[0; 112], 4096).await.unwrap();
    assert_eq!(ok.struct_out.len(), 112);
    // A bool byte of 2 inside the struct (flag is at offset 56 for i386).
    let mut bad = vec![0u8; 112];
    bad[56] = 2;
    assert_eq!(
        s.call(h, 7, &[], &bad, 4096).await.unwrap_err().status(),
        Some(Status::BadArgument)
    );
    // The session goes on.
    assert_eq!(s.call(h, 0, &[1, 2], &[], 0).await.unwrap().scalars, vec![3]);
}

/// Sends raw packets and returns the broker's last frame (a Goodbye, for protocol errors).
async fn raw(broker: &Broker, packets: &[Vec<u8>]) -> Option<ServerFrame> {
    let conn = UnixSeqpacket::connect(broker.run_dir().join(NATIVE_SOCKET))
        .await
        .unwrap();
    for p in packets {
        let _ = conn.send(p).await;
    }
    let mut buf = vec![0u8; MAX_FRAME + 1];
    let mut last = None;
    loop {
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), conn.recv(&mut buf))
            .await
            .expect("broker hung")
            .ok()?
            .bytes_read();
        if n == 0 {
            return last;
        }
        last = Some(ServerFrame::decode(&buf[..n]).unwrap());
    }
}

fn hello(abi: u8) -> Vec<u8> {
    encode(&ClientFrame::Hello(Hello {
        version: PROTOCOL_VERSION,
        abi,
    }))
    .unwrap()
}

fn goodbye(frame: Option<ServerFrame>) -> (u32, String) {
    match frame {
        Some(ServerFrame::Goodbye { status, reason }) => (status, reason),
        other => panic!("expected Goodbye, got {other:?}"),
    }
}

#[tokio::test]
async fn native_protocol_violations_close_only_that_session() {
    let broker = Broker::start();
    let add = encode(&ClientFrame::Request(RequestFrame {
        id: 1,
        request: Request::Call {
            handle: 1,
            selector: 0,
            scalars: vec![1, 2],
            struct_in: vec![],
            struct_out_len: 0,
        },
    }))
    .unwrap();
    let cases: Vec<(&str, Vec<Vec<u8>>, Status, &str)> = vec![
        (
            "frame before Hello",
            vec![add.clone()],
            Status::ProtocolError,
            "before Hello",
        ),
        ("ABI not in the list", vec![hello(99)], Status::Unsupported, "ABI 99"),
        (
            "unknown protocol version",
            vec![encode(&ClientFrame::Hello(Hello { version: 9, abi: 0 })).unwrap()],
            Status::Unsupported,
            "version 9",
        ),
        (
            "truncated frame",
            vec![hello(0), add[..add.len() - 2].to_vec()],
            Status::ProtocolError,
            "undecodable",
        ),
        (
            "unknown frame kind",
            vec![hello(0), vec![7, 1, 2]],
            Status::ProtocolError,
            "undecodable",
        ),
        (
            "unknown request kind",
            vec![hello(0), vec![1, 1, 9]],
            Status::ProtocolError,
            "undecodable",
        ),
        (
            "non-canonical varint",
            vec![hello(0), vec![1, 0x81, 0x00, 2, 1]],
            Status::ProtocolError,
            "canonical",
        ),
        (
            "overlong varint",
            vec![
                hello(0),
                vec![
                    1, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01, 2, 1,
                ],
            ],
            Status::ProtocolError,
            "undecodable",
        ),
        (
            "bool byte not 0 or 1",
            vec![hello(0), vec![1, 1, 1, 3, 2]],
            Status::ProtocolError,
            "undecodable",
        ),
        (
            "trailing bytes",
            vec![hello(0), [add.clone(), vec![0]].concat()],
            Status::ProtocolError,
            "after the end",
        ),
        (
            "second Hello",
            vec![hello(0), hello(0)],
            Status::ProtocolError,
            "second Hello",
        ),
        (
            "oversized frame",
            vec![hello(0), vec![0; MAX_FRAME + 1]],
            Status::ProtocolError,
            "exceeds",
        ),
        (
            "empty packet before Hello",
            vec![vec![]],
            Status::ProtocolError,
            "before Hello",
        ),
    ];
    for (what, packets, status, says) in cases {
        let (code, reason) = goodbye(raw(&broker, &packets).await);
        assert_eq!(Status::from_code(code), Some(status), "{what}: {reason}");
        assert!(reason.contains(says), "{what}: {reason:?} should say {says:?}");
        assert!(broker.is_running_ref(), "{what}: broker died");
        assert_still_serving(&broker).await;
    }
    assert!(broker.log().contains("native session closed by the broker"));
}

#[tokio::test]
async fn native_client_that_vanishes_mid_call_releases_its_opens() {
    let broker = Broker::start();
    {
        let mut s = NativeSession::connect(broker.run_dir(), AbiId::native()).await.unwrap();
        let sample = s.find("sample0").await.unwrap();
        s.open(sample[0].id, true).await.unwrap();
    }
    // The exclusive open was released with the connection.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    loop {
        let mut s = NativeSession::connect(broker.run_dir(), AbiId::native()).await.unwrap();
        let sample = s.find("sample0").await.unwrap();
        match s.open(sample[0].id, true).await {
            Ok(_) => break,
            Err(e) => assert!(std::time::Instant::now() < deadline, "still held: {e}"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn policy_matches_the_declared_abi() {
    let policy = r#"
[[principal]]
name = "legacy-32bit"
abi = ["i386", "armhf"]

[[rule]]
id = "legacy-sample"
effect = "allow"
principals = ["legacy-32bit"]
service = { class = "SampleDevice" }
methods = ["add"]
"#;
    let broker = Broker::with(portcullis_tests::BrokerSetup {
        policy: Some(policy),
        ..Default::default()
    });
    let (mut s, h) = open_sample(&broker, AbiId::I386).await;
    assert_eq!(s.call(h, 0, &[1, 2], &[], 0).await.unwrap().scalars, vec![3]);
    let mut native = NativeSession::connect(broker.run_dir(), AbiId::X86_64).await.unwrap();
    let sample = native.find("sample0").await.unwrap();
    let denied = native.open(sample[0].id, false).await.unwrap_err();
    assert_eq!(
        (denied.status(), denied.rule()),
        (Some(Status::NotPrivileged), Some("default deny"))
    );
}

#[tokio::test]
async fn map_memory_registers_are_read_only_and_dma_is_shared() {
    let broker = Broker::start();
    let (mut s, h) = open_sample(&broker, AbiId::native()).await;

    let regs = s.map_memory(h, 0).await.unwrap();
    assert_eq!((regs.size, regs.writable), (4096, false));
    let mut head = [0u8; 8];
    rustix::io::pread(&regs.fd, &mut head, 0).unwrap();
    assert_eq!(u32::from_le_bytes(head[0..4].try_into().unwrap()), 1, "version");
    assert_eq!(u32::from_le_bytes(head[4..8].try_into().unwrap()), 0x5043_5352, "magic");
    // Read-only is enforced by the descriptor, not by documentation.
    let mode = rustix::fs::fcntl_getfl(&regs.fd).unwrap() & rustix::fs::OFlags::RWMODE;
    assert_eq!(mode, rustix::fs::OFlags::RDONLY);
    assert!(rustix::io::pwrite(&regs.fd, b"x", 0).is_err());

    let dma = s.map_memory(h, 1).await.unwrap();
    assert_eq!((dma.size, dma.writable), (1 << 20, true));
    let pattern = dma_pattern();
    rustix::io::pwrite(&dma.fd, &pattern, 0).unwrap();
    // The broker reads what the client wrote: the bytes are shared.
    assert_eq!(
        s.call(h, 8, &[0, 1 << 20], &[], 0).await.unwrap().scalars,
        vec![fnv1a(&pattern)]
    );
    assert_eq!(
        s.call(h, 8, &[1000, 5000], &[], 0).await.unwrap().scalars,
        vec![fnv1a(&pattern[1000..6000])]
    );
    // Out of range, and a type the driver does not have.
    assert_eq!(
        s.call(h, 8, &[1 << 20, 1], &[], 0).await.unwrap_err().status(),
        Some(Status::BadArgument)
    );
    assert_eq!(
        s.call(h, 8, &[u64::MAX, 2], &[], 0).await.unwrap_err().status(),
        Some(Status::BadArgument)
    );
    assert_eq!(
        s.map_memory(h, 9).await.unwrap_err().status(),
        Some(Status::BadArgument)
    );
    // Mapping dma again gives the same memory.
    let again = s.map_memory(h, 1).await.unwrap();
    let mut first = [0u8; 4];
    rustix::io::pread(&again.fd, &mut first, 0).unwrap();
    assert_eq!(first, pattern[0..4]);
    // The buffer cannot be grown by the client.
    assert!(rustix::fs::ftruncate(&dma.fd, 2 << 20).is_err());

    // Closing the user client releases (empties) its dma memory: every page punched out.
    s.close(h).await.unwrap();
    assert_eq!(rustix::fs::fstat(&dma.fd).unwrap().st_blocks, 0, "dma revoked on close");
    let mut back = [1u8; 4];
    rustix::io::pread(&dma.fd, &mut back, 0).unwrap();
    assert_eq!(back, [0; 4], "what the client wrote is gone");
}

#[tokio::test]
async fn map_memory_is_released_on_disconnect_and_forbidden_by_policy() {
    let broker = Broker::start();
    let dma = {
        let (mut s, h) = open_sample(&broker, AbiId::native()).await;
        s.map_memory(h, 1).await.unwrap()
    };
    // The session's end is the user client's: its dma memory is emptied, every page punched
    // out.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while rustix::fs::fstat(&dma.fd).unwrap().st_blocks != 0 {
        assert!(std::time::Instant::now() < deadline, "dma not revoked after disconnect");
        tokio::task::yield_now().await;
    }

    let policy = r#"
[[principal]]
name = "everyone"

[[rule]]
id = "sample"
effect = "allow"
principals = ["everyone"]
methods = ["*"]
memory = ["registers"]
"#;
    let broker = Broker::with(portcullis_tests::BrokerSetup {
        policy: Some(policy),
        ..Default::default()
    });
    let (mut s, h) = open_sample(&broker, AbiId::native()).await;
    assert!(s.map_memory(h, 0).await.is_ok());
    let denied = s.map_memory(h, 1).await.unwrap_err();
    assert_eq!(
        (denied.status(), denied.rule()),
        (Some(Status::NotPrivileged), Some("default deny"))
    );
    // Without a dma mapping, checksum_dma says so.
    assert_eq!(
        s.call(h, 8, &[0, 1], &[], 0).await.unwrap_err().status(),
        Some(Status::BadArgument)
    );
}

#[tokio::test]
async fn connections_over_the_limit_are_refused_and_slots_come_back() {
    let config = "max_connections = 3\n\n[[device]]\nname = \"sample0\"\ndriver = \"sample\"\n";
    let broker = Broker::with(portcullis_tests::BrokerSetup {
        config: Some(config),
        ..Default::default()
    });
    // The harness's readiness probe may still hold a slot for a moment: take three with retries.
    let mut held = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while held.len() < 3 {
        match NativeSession::connect(broker.run_dir(), AbiId::native()).await {
            Ok(s) => held.push(s),
            Err(e) => assert!(std::time::Instant::now() < deadline, "no slot: {e}"),
        }
    }
    // The fourth native client is told why.
    let refused = NativeSession::connect(broker.run_dir(), AbiId::native())
        .await
        .unwrap_err();
    assert_eq!(refused.status(), Some(Status::NoMemory), "{refused}");
    assert!(refused.to_string().contains("at most 3 connections"), "{refused}");
    // A gRPC connection shares the same budget: refused too.
    let grpc = portcullis_tests::client::Client::connect(broker.run_dir()).await;
    let listed = match grpc {
        Ok(client) => client
            .list_services(portcullis_tests::client::matching::all())
            .await
            .is_ok(),
        Err(_) => false,
    };
    assert!(!listed, "a gRPC connection over the limit must not be served");
    // A slot freed is a slot usable.
    drop(held.pop());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match NativeSession::connect(broker.run_dir(), AbiId::native()).await {
            Ok(mut s) => {
                assert_eq!(s.find("sample0").await.unwrap().len(), 1);
                break;
            }
            Err(e) => assert!(std::time::Instant::now() < deadline, "slot not released: {e}"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn argument_constraints_apply_to_scalars_lengths_and_translated_fields() {
    let policy = r#"
[[principal]]
name = "all"

[[rule]]
id = "limited"
effect = "allow"
principals = ["all"]
service = { class = "SampleDevice" }
methods = ["add", "echo", "fire_event", "transform_record"]
args.add.a = { max = 100 }
args.echo.len = { max = 8 }
args.fire_event.value = { one_of = [1, 2] }
args.transform_record.u32_ = { mask = 0xff }
args.transform_record.long_ = { min = -5, max = 5 }
args.transform_record.name = { prefix = "ok" }
"#;
    let broker = Broker::with(portcullis_tests::BrokerSetup {
        policy: Some(policy),
        ..Default::default()
    });
    let (mut s, h) = open_sample(&broker, AbiId::I386).await;
    let refused = |e: portcullis_tests::client::ClientError, says: &str| {
        assert_eq!(
            (e.status(), e.rule()),
            (Some(Status::NotPrivileged), Some("limited")),
            "{e}"
        );
        assert!(e.to_string().contains(says), "{e} should say {says:?}");
    };
    assert_eq!(s.call(h, 0, &[100, 1], &[], 0).await.unwrap().scalars, vec![101]);
    refused(s.call(h, 0, &[101, 1], &[], 0).await.unwrap_err(), "argument a = 101");
    assert!(s.call(h, 1, &[], &[0; 8], 64).await.is_ok());
    refused(s.call(h, 1, &[], &[0; 9], 64).await.unwrap_err(), "argument len = 9");
    assert!(s.call(h, 4, &[2], &[], 0).await.is_ok());
    refused(s.call(h, 4, &[3], &[], 0).await.unwrap_err(), "not one of");

    // sample_record for i386 (112 bytes): u32_ at 8, long_ (4 bytes) at 32, name at 57.
    let record = |u32_: u32, long_: i32, name: &[u8]| {
        let mut r = vec![0u8; 112];
        r[8..12].copy_from_slice(&u32_.to_le_bytes());
        r[32..36].copy_from_slice(&long_.to_le_bytes());
        r[57..57 + name.len()].copy_from_slice(name);
        r
    };
    assert!(s.call(h, 7, &[], &record(0xff, -5, b"okay"), 4096).await.is_ok());
    refused(
        s.call(h, 7, &[], &record(0x100, 0, b"ok"), 4096).await.unwrap_err(),
        "outside 0xff",
    );
    // The i386 long -6 is sign-extended before the check, so it is below -5, not a huge number.
    refused(
        s.call(h, 7, &[], &record(1, -6, b"ok"), 4096).await.unwrap_err(),
        "argument long_ = -6",
    );
    refused(
        s.call(h, 7, &[], &record(1, 0, b"no"), 4096).await.unwrap_err(),
        "does not start with \"ok\"",
    );
}

#[tokio::test]
async fn rate_limit_refuses_calls_over_the_rule_and_refills() {
    let policy = "[[principal]]\nname = \"all\"\n[[rule]]\nid = \"slow\"\neffect = \"allow\"\nprincipals = [\"all\"]\nmethods = [\"add\"]\nrate = \"20/s\"\n";
    let broker = Broker::with(portcullis_tests::BrokerSetup {
        policy: Some(policy),
        ..Default::default()
    });
    let (mut s, h) = open_sample(&broker, AbiId::native()).await;
    let began = std::time::Instant::now();
    let mut allowed = 0u32;
    let mut limited = None;
    for _ in 0..100 {
        match s.call(h, 0, &[1, 1], &[], 0).await {
            Ok(_) => allowed += 1,
            Err(e) => {
                limited = Some(e);
                break;
            }
        }
    }
    // A burst of 20, plus what refilled while it was spent (20 a second): never more.
    let spent = began.elapsed().as_secs_f64();
    let limited = limited.expect("never rate limited");
    assert_eq!(
        (limited.status(), limited.rule()),
        (Some(Status::RateLimited), Some("slow"))
    );
    assert!(
        allowed >= 20 && f64::from(allowed) <= 20.0 + spent * 20.0 + 1.0,
        "{allowed} calls before the limit in {spent:.3} s (burst 20, 20/s)"
    );
    // Another user client of another session has a bucket of its own.
    let (mut other, oh) = open_sample(&broker, AbiId::native()).await;
    assert!(other.call(oh, 0, &[1, 1], &[], 0).await.is_ok());
    // The bucket refills: calls go through again, and over any stretch of time no more than the
    // rate allows (counted against the time measured, however loaded the machine).
    let emptied = std::time::Instant::now();
    let (mut served, mut refused) = (0u32, 0u32);
    while served < 5 {
        match s.call(h, 0, &[1, 1], &[], 0).await {
            Ok(_) => served += 1,
            Err(e) => {
                assert_eq!(e.status(), Some(Status::RateLimited), "{e}");
                refused += 1;
            }
        }
        assert!(
            emptied.elapsed() < std::time::Duration::from_secs(20),
            "the bucket never refilled"
        );
        tokio::task::yield_now().await;
    }
    let waited = emptied.elapsed().as_secs_f64();
    assert!(
        f64::from(served) <= waited * 20.0 + 1.0,
        "{served} calls served in {waited:.3} s at 20/s"
    );
    assert!(
        refused > 0,
        "the bucket was empty: calls were refused before it refilled"
    );
}
