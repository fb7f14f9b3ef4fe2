//! The net family on a real TUN interface, in a network namespace the test makes for the broker
//! (`unshare --net`): a packet a client sends leaves on the TUN, reaches a UDP socket in that
//! namespace, and the reply comes back to the client. Addresses are 192.0.2.0/24 (TEST-NET-1)
//! inside that namespace only: nothing leaves it.

use std::{
    io::{BufRead, BufReader, Lines},
    process::{ChildStdout, Stdio},
};

use portcullis_client::{
    OpenMode, Status,
    devices::packet_records,
    native::{MappedMemory, NativeSession},
};
use portcullis_proto::layout::AbiId;
use portcullis_tests::{Broker, BrokerSetup, NOBODY, Reaped, run_ok};

const POLICY: &str = r#"
[[principal]]
name = "local"

[[principal]]
name = "root"
uid = [0]

[[rule]]
id = "net-use"
effect = "allow"
principals = ["local"]
service = { class = "NetDevice" }
methods = ["*"]
memory = ["packets"]

[[rule]]
id = "net-admin"
effect = "allow"
principals = ["root"]
service = { class = "NetDevice" }
privileges = ["net.admin"]
"#;

fn broker() -> Broker {
    Broker::with(BrokerSetup {
        config: Some("[[device]]\nname = \"net0\"\ndriver = \"net\"\ninterface = \"pc0\"\n"),
        policy: Some(POLICY),
        wrapper: &["unshare", "--net", "--"],
        ..BrokerSetup::default()
    })
}

/// The one's-complement sum of 16-bit words (the IPv4 header checksum).
fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 UDP datagram (no UDP checksum, which IPv4 allows).
fn udp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, payload: &[u8]) -> Vec<u8> {
    let total = (20 + 8 + payload.len()) as u16;
    let mut p = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 17, 0, 0];
    p[2..4].copy_from_slice(&total.to_be_bytes());
    p.extend(src);
    p.extend(dst);
    let sum = checksum(&p);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p.extend(sport.to_be_bytes());
    p.extend(dport.to_be_bytes());
    p.extend((8 + payload.len() as u16).to_be_bytes());
    p.extend([0, 0]);
    p.extend(payload);
    p
}

#[tokio::test(flavor = "multi_thread")]
async fn a_packet_crosses_the_tun_to_a_udp_socket_and_the_reply_comes_back() {
    let broker = broker();
    let (session, net) = broker.open("net0", OpenMode::Shared).await;
    let info = session.call_named(&net, "get_info", &[], &[]).await.unwrap().struct_out;
    assert_eq!(&info[..4], b"pc0\0");
    let flags = u32::from_ne_bytes(info[24..28].try_into().unwrap());
    assert_eq!(flags & 1, 0, "created down");
    session.call_named(&net, "set_up", &[], &[]).await.unwrap();
    let typed = session.net_get_info(&net).await.unwrap();
    assert_eq!(typed.name, "pc0");
    assert!(typed.ifindex > 0 && typed.mtu >= 68);
    assert_eq!(typed.flags & portcullis_client::devices::NetInfo::UP, 1);
    run_ok(broker.in_netns("ip", &["addr", "add", "192.0.2.1/24", "dev", "pc0"]));
    let info = session.call_named(&net, "get_info", &[], &[]).await.unwrap().struct_out;
    assert_eq!(u32::from_ne_bytes(info[24..28].try_into().unwrap()) & 1, 1, "up");
    // A UDP socket in the namespace, the packet's destination.
    let (mut echo, mut lines) = udp_echo(&broker, 3);
    let ping = udp([192, 0, 2, 2], 5555, [192, 0, 2, 1], 7777, b"ping through the broker");
    let sent = session.call_named(&net, "send_packet", &[], &ping).await.unwrap();
    assert_eq!(sent.scalars, vec![ping.len() as u64]);
    // The reply, among whatever else the interface sends (IPv6 chatter, say).
    let reply = loop {
        let got = session.call_named(&net, "recv_packet", &[20_000], &[]).await.unwrap();
        let p = got.struct_out;
        if p.len() > 28 && p[0] >> 4 == 4 && p[9] == 17 && p[12..16] == [192, 0, 2, 1] {
            break p;
        }
    };
    assert_eq!(&reply[16..20], &[192, 0, 2, 2]);
    assert_eq!(&reply[20..22], &7777u16.to_be_bytes());
    assert_eq!(&reply[22..24], &5555u16.to_be_bytes());
    assert_eq!(&reply[28..], b"ping through the broker");
    // A reply larger than the room given for it: the call ran (the packet left the queue), so
    // OVERFLOW, not BAD_ARGUMENT; the next packet delivered counts it as dropped.
    let recv = net.method("recv_packet").unwrap().selector;
    let big = udp([192, 0, 2, 2], 5555, [192, 0, 2, 1], 7777, &[b'x'; 1000]);
    session.call_named(&net, "send_packet", &[], &big).await.unwrap();
    loop {
        // Smaller packets (IPv6 chatter) fit 200 bytes; the 1,028-byte reply does not.
        match session.call(net.handle, recv, &[20_000], &[], 200).await {
            Ok(small) => assert!(small.struct_out.len() <= 200),
            Err(e) => {
                assert_eq!(e.status(), Some(Status::Overflow), "{e}");
                assert!(e.to_string().contains("dropped"), "{e}");
                break;
            }
        }
    }
    let last = udp([192, 0, 2, 2], 5555, [192, 0, 2, 1], 7777, b"after the overflow");
    session.call_named(&net, "send_packet", &[], &last).await.unwrap();
    let mut first = true;
    loop {
        let got = session.call_named(&net, "recv_packet", &[20_000], &[]).await.unwrap();
        let dropped = if first { 1 } else { 0 };
        assert_eq!(
            got.scalars,
            vec![dropped],
            "the next packet delivered counts the one dropped"
        );
        first = false;
        let p = got.struct_out;
        if p.len() > 28 && p[0] >> 4 == 4 && p[9] == 17 && p[12..16] == [192, 0, 2, 1] {
            assert_eq!(&p[28..], b"after the overflow");
            break;
        }
    }
    let report: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(report["got"], "after the overflow");
    assert_eq!(report["from"], "192.0.2.2:5555");
    echo.wait().unwrap();
    // Oversized and malformed packets are refused, not sent.
    let mtu = u32::from_ne_bytes(info[20..24].try_into().unwrap()) as usize;
    let big = udp([192, 0, 2, 2], 1, [192, 0, 2, 1], 2, &vec![0; mtu]);
    let e = session.call_named(&net, "send_packet", &[], &big).await.unwrap_err();
    assert_eq!(e.status(), Some(Status::BadArgument), "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_interface_is_configured_only_with_net_admin_and_its_loss_is_no_device() {
    let broker = broker();
    let baseline = broker.baseline_fds();
    let refused = broker.cli_as(NOBODY, &["call", "net0", "set_mtu", "--scalar", "1280"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("NOT_PRIVILEGED") && stderr.contains("net.admin"),
        "{stderr}"
    );
    let (session, net) = broker.open("net0", OpenMode::Shared).await;
    session.call_named(&net, "set_mtu", &[1280], &[]).await.unwrap();
    let info = session.call_named(&net, "get_info", &[], &[]).await.unwrap().struct_out;
    assert_eq!(u32::from_ne_bytes(info[20..24].try_into().unwrap()), 1280);
    let e = session.call_named(&net, "set_mtu", &[10], &[]).await.unwrap_err();
    assert_eq!(e.status(), Some(Status::BadArgument));
    // Nothing arrives on a down interface: a short wait times out.
    let e = session.call_named(&net, "recv_packet", &[10], &[]).await.unwrap_err();
    assert_eq!(e.status(), Some(Status::Timeout));
    // The interface deleted under a waiting call: NO_DEVICE.
    {
        let waiting = session.call_named(&net, "recv_packet", &[60_000], &[]);
        tokio::pin!(waiting);
        broker.until_driver_waits(waiting.as_mut()).await;
        run_ok(broker.in_netns("ip", &["link", "del", "pc0"]));
        let gone = waiting.await.unwrap_err();
        assert_eq!(gone.status(), Some(Status::NoDevice), "{gone}");
    }
    let e = session.call_named(&net, "get_info", &[], &[]).await.unwrap_err();
    assert_eq!(e.status(), Some(Status::NoDevice), "{e}");
    drop(session);
    broker.assert_no_leaks(baseline);
}

/// Packets that arrive while no call waits are kept for every user client, each in a queue of
/// its own bounded to 256 packets; what overflows is counted and reported with the next packet.
#[tokio::test(flavor = "multi_thread")]
async fn packets_wait_per_client_in_bounded_queues_and_overflow_is_counted() {
    const SENT: u64 = 300;
    let broker = broker();
    let (first, a) = broker.open("net0", OpenMode::Shared).await;
    let (second, b) = broker.open("net0", OpenMode::Shared).await;
    // Only the test's packets: no IPv6 chatter on the interface.
    run_ok(broker.in_netns("sh", &["-c", "echo 1 > /proc/sys/net/ipv6/conf/pc0/disable_ipv6"]));
    run_ok(broker.in_netns("ip", &["addr", "add", "192.0.2.1/24", "dev", "pc0"]));
    first.call_named(&a, "set_up", &[], &[]).await.unwrap();
    // 300 datagrams routed out of the interface, sent while no call waits.
    let send = format!(
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\nfor i in range({SENT}):\n    s.sendto(i.to_bytes(4, 'big'), ('192.0.2.2', 9))\n"
    );
    run_ok(broker.in_netns("python3", &["-c", &send]));
    let (got_a, _) = drain(&first, &a, SENT).await;
    // By now every packet has left the kernel: the second client's queue holds what its bound
    // allowed, and says how many it lost.
    let (got_b, dropped_b) = drain(&second, &b, SENT).await;
    assert!(got_a >= got_b, "{got_a} {got_b}");
    assert!(got_b <= 256, "the queue's bound: {got_b}");
    assert_eq!(dropped_b, SENT - got_b);
    // Nothing more: the next wait times out.
    let e = second.call_named(&b, "recv_packet", &[10], &[]).await.unwrap_err();
    assert_eq!(e.status(), Some(Status::Timeout));
}

/// Receives until all `sent` packets are accounted for: received, or counted as dropped.
async fn drain(session: &portcullis_client::Session, net: &portcullis_client::UserClient, sent: u64) -> (u64, u64) {
    let (mut received, mut dropped) = (0u64, 0u64);
    while received + dropped < sent {
        let got = session.call_named(net, "recv_packet", &[20_000], &[]).await.unwrap();
        assert_eq!(got.struct_out.len(), 20 + 8 + 4, "one of the test's datagrams");
        received += 1;
        dropped += got.scalars[0];
    }
    assert_eq!(received + dropped, sent);
    (received, dropped)
}

const SEND_PACKETS: u32 = 6;
const RECV_PACKETS: u32 = 7;

/// Many packets per call, through the user client's `packets` memory: a batch sent leaves on
/// the TUN, the replies come back as a batch; every malformed batch is refused with a status.
#[tokio::test(flavor = "multi_thread")]
async fn batches_of_packets_cross_through_the_packets_memory() {
    let broker = broker();
    let (session, net) = broker.open("net0", OpenMode::Shared).await;
    run_ok(broker.in_netns("sh", &["-c", "echo 1 > /proc/sys/net/ipv6/conf/pc0/disable_ipv6"]));
    run_ok(broker.in_netns("ip", &["addr", "add", "192.0.2.1/24", "dev", "pc0"]));
    session.call_named(&net, "set_up", &[], &[]).await.unwrap();
    // The native client below is then the interface's only reader.
    session.close(&net).await.unwrap();

    let mut s = NativeSession::connect(broker.run_dir(), AbiId::native()).await.unwrap();
    let id = s.find("net0").await.unwrap().remove(0).id;
    let h = s.open(id, false).await.unwrap();
    // Without the memory: refused, saying what to do.
    let e = s.call(h, SEND_PACKETS, &[0, 1], &[], 0).await.unwrap_err();
    assert_eq!(e.status(), Some(Status::BadArgument), "{e}");
    assert!(e.to_string().contains("map the packets memory"), "{e}");
    let memory = s.map_memory(h, 0).await.unwrap();
    assert!(memory.writable);

    // Alone, with room for them all: the replies come in one or more batches.
    echo_batch(&broker, &mut s, h, &memory, 5000, 1 << 19).await;
    // With another reader, which gets its copies, and room for two replies at a time: over
    // several calls, none lost.
    let (other_session, other) = broker.open("net0", OpenMode::Shared).await;
    echo_batch(&broker, &mut s, h, &memory, 6000, 96).await;
    for i in 0..BATCH_COUNT {
        let copy = other_session
            .call_named(&other, "recv_packet", &[20_000], &[])
            .await
            .unwrap();
        assert_eq!(
            &copy.struct_out[22..24],
            &(6000 + i).to_be_bytes(),
            "the other reader's copy"
        );
    }

    // Malformed batches: a status each, nothing sent.
    let mut cases: Vec<(u32, Vec<u64>)> = vec![
        (SEND_PACKETS, vec![2, 1]),                   // unaligned record
        (SEND_PACKETS, vec![0, 0]),                   // no packets
        (SEND_PACKETS, vec![0, 1025]),                // too many
        (SEND_PACKETS, vec![1 << 20, 1]),             // past the end
        (SEND_PACKETS, vec![u64::MAX - 3, 1]),        // overflowing
        (RECV_PACKETS, vec![2, 64, 1, 0]),            // unaligned
        (RECV_PACKETS, vec![4, u64::MAX, 1, 0]),      // overflowing room
        (RECV_PACKETS, vec![0, (1 << 20) + 4, 1, 0]), // past the end
        (RECV_PACKETS, vec![0, 64, 0, 0]),            // no packets wanted
        (RECV_PACKETS, vec![0, 64, 1, 600_001]),      // too long a wait
    ];
    // A header claiming more than the memory holds, and one with its reserved bytes set.
    let end = (1u64 << 20) - 8;
    rustix::io::pwrite(&memory.fd, &[0xff, 0xff, 0, 0], end).unwrap();
    cases.push((SEND_PACKETS, vec![end, 1]));
    rustix::io::pwrite(&memory.fd, &[0, 20, 1, 0], 4096).unwrap();
    cases.push((SEND_PACKETS, vec![4096, 1]));
    for (selector, scalars) in cases {
        let e = s.call(h, selector, &scalars, &[], 0).await.unwrap_err();
        assert_eq!(e.status(), Some(Status::BadArgument), "{selector} {scalars:?}: {e}");
    }
    // A batch whose second packet exceeds the MTU: the first is sent, and the count says so.
    let mut partial = Vec::new();
    packet_records::push(&mut partial, &udp([192, 0, 2, 2], 1, [192, 0, 2, 1], 9, b"fits")).unwrap();
    packet_records::push(&mut partial, &udp([192, 0, 2, 2], 1, [192, 0, 2, 1], 9, &[0; 1600])).unwrap();
    rustix::io::pwrite(&memory.fd, &partial, 8192).unwrap();
    let sent = s.call(h, SEND_PACKETS, &[8192, 2], &[], 0).await.unwrap();
    assert_eq!(sent.scalars, vec![1]);
    // The first one alone over the MTU: its own status.
    let e = s.call(h, SEND_PACKETS, &[8192 + 4 + 32, 1], &[], 0).await.unwrap_err();
    assert_eq!(e.status(), Some(Status::BadArgument), "{e}");
    assert!(e.to_string().contains("exceeds the MTU"), "{e}");
    // The packet sent went to a port nobody listens on: the ICMP port unreachable (60 bytes)
    // comes back. A batch with room for less than its record ran (it took the packet): that is
    // OVERFLOW, and the next batch counts the packet as dropped.
    let e = s.call(h, RECV_PACKETS, &[0, 16, 1, 20_000], &[], 0).await.unwrap_err();
    assert_eq!(e.status(), Some(Status::Overflow), "{e}");
    assert!(e.to_string().contains("dropped"), "{e}");
    let sent = s.call(h, SEND_PACKETS, &[8192, 1], &[], 0).await.unwrap();
    assert_eq!(sent.scalars, vec![1]);
    let got = s.call(h, RECV_PACKETS, &[0, 4096, 1, 20_000], &[], 0).await.unwrap();
    assert_eq!(got.scalars[0], 1, "one packet: {:?}", got.scalars);
    assert_eq!(got.scalars[2], 1, "and the one dropped before it");
}

const BATCH_COUNT: u16 = 8;

/// A UDP echo on 192.0.2.1:7777 in the broker's network namespace that answers `count`
/// datagrams, ready, and its output after the "ready" line (a JSON report per datagram); killed
/// when dropped.
pub(crate) fn udp_echo(broker: &Broker, count: usize) -> (Reaped, Lines<BufReader<ChildStdout>>) {
    let program = broker.copy_program(
        std::path::Path::new(env!("CARGO_BIN_EXE_hostile_client")),
        "hostile_client",
    );
    let mut echo = Reaped(
        broker
            .in_netns(
                program.to_str().unwrap(),
                &["udp-echo", "192.0.2.1:7777", &count.to_string()],
            )
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(echo.stdout.take().unwrap()).lines();
    assert!(lines.next().unwrap().unwrap().contains("ready"));
    (echo, lines)
}

/// Sends a batch of `BATCH_COUNT` datagrams, from ports `base_port` on, to a UDP echo in the
/// namespace, and receives the replies as batches of records in `room` bytes of the packets
/// memory; checks they all came back, in order.
async fn echo_batch(broker: &Broker, s: &mut NativeSession, h: u64, memory: &MappedMemory, base_port: u16, room: u64) {
    const AT: u64 = 1 << 19;
    let (mut echo, _lines) = udp_echo(broker, usize::from(BATCH_COUNT));
    let mut batch = Vec::new();
    for i in 0..BATCH_COUNT {
        let payload = format!("batch {i}");
        packet_records::push(
            &mut batch,
            &udp([192, 0, 2, 2], base_port + i, [192, 0, 2, 1], 7777, payload.as_bytes()),
        )
        .unwrap();
    }
    rustix::io::pwrite(&memory.fd, &batch, 0).unwrap();
    let sent = s
        .call(h, SEND_PACKETS, &[0, u64::from(BATCH_COUNT)], &[], 0)
        .await
        .unwrap();
    assert_eq!(sent.scalars, vec![u64::from(BATCH_COUNT)]);
    let mut replies = Vec::new();
    let mut calls = 0;
    while replies.len() < usize::from(BATCH_COUNT) {
        let got = s.call(h, RECV_PACKETS, &[AT, room, 64, 20_000], &[], 0).await.unwrap();
        calls += 1;
        let [count, bytes, dropped] = got.scalars[..] else {
            panic!("{:?}", got.scalars)
        };
        assert_eq!(dropped, 0);
        assert!(bytes <= room, "{bytes} bytes in {room}");
        let mut records = vec![0u8; bytes as usize];
        rustix::io::pread(&memory.fd, &mut records, AT).unwrap();
        let packets = packet_records::parse(&records).unwrap();
        assert_eq!(packets.len() as u64, count);
        replies.extend(packets.into_iter().map(<[u8]>::to_vec));
    }
    if room < 128 {
        assert!(
            calls >= usize::from(BATCH_COUNT) / 2,
            "{room} bytes hold two replies at a time"
        );
    }
    for (i, reply) in replies.iter().enumerate() {
        assert_eq!(&reply[12..16], &[192, 0, 2, 1], "from the echo");
        assert_eq!(&reply[22..24], &(base_port + i as u16).to_be_bytes(), "in order");
        assert_eq!(&reply[28..], format!("batch {i}").as_bytes());
    }
    echo.wait().unwrap();
}
