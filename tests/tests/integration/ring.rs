//! The shared-memory ring: every sample method through it, many clients pipelining, and
//! hostile clients (bytes flipped under the broker, garbage in the header, indices past the
//! ring, a client that never reads completions, one that blocks and never drains its doorbell,
//! a client killed mid-batch). After each, a fresh client is served and `portcullis stats`
//! shows nothing left behind.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use portcullis_proto::{
    Status,
    frame::{Event, Request},
    ring::WaitMode,
};
use portcullis_ring::{queue::store_word, wake};
use portcullis_tests::{
    Broker, BrokerSetup,
    client::{
        ClientError,
        ring::{RingClient, RingOptions},
    },
    dma_pattern, fnv1a,
};

fn ring_client(broker: &Broker) -> (RingClient, u64) {
    ring_client_with(broker, RingOptions::default())
}

fn ring_client_with(broker: &Broker, options: RingOptions) -> (RingClient, u64) {
    let mut ring = RingClient::connect(broker.run_dir(), options).unwrap();
    let sample = ring.find("sample0").unwrap();
    assert_eq!(sample.len(), 1);
    let handle = ring.open(sample[0].id, false).unwrap();
    (ring, handle)
}

/// An `echo` of 4,000 bytes of `fill` (answered with as many): fills rings quickly.
fn echo_4k(handle: u64, fill: u8) -> Request {
    Request::Call {
        handle,
        selector: 1,
        scalars: vec![],
        struct_in: vec![fill; 4000],
        struct_out_len: 4096,
    }
}

fn assert_fresh_client_served(broker: &Broker) {
    let (mut ring, h) = ring_client(broker);
    assert_eq!(ring.call(h, 0, &[40, 2], &[], 0).unwrap().scalars, vec![42]);
}

#[test]
fn ring_serves_every_sample_method() {
    let broker = Broker::start();
    let baseline = broker.baseline_fds();
    let (mut ring, h) = ring_client(&broker);
    // The broker's ABI, from its Welcome.
    assert_eq!(ring.broker_abi(), Some(portcullis_proto::layout::AbiId::native()));
    // add, echo, get_info
    assert_eq!(ring.call(h, 0, &[2, 3], &[], 0).unwrap().scalars, vec![5]);
    assert_eq!(
        ring.call(h, 1, &[], b"hello ring", 4096).unwrap().struct_out,
        b"hello ring"
    );
    let big: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
    assert_eq!(ring.call(h, 1, &[], &big, 4096).unwrap().struct_out, big);
    let info = ring.call(h, 2, &[], &[], 16).unwrap().struct_out;
    assert_eq!(u32::from_ne_bytes(info[0..4].try_into().unwrap()), 1, "version");
    // wait_event (asynchronous) completes after fire_event: out of order.
    let waiter = ring.submit_call(h, 3, &[10_000], &[], 0).unwrap();
    let fire = ring.submit_call(h, 4, &[77], &[], 0).unwrap();
    let first = ring.next_response().unwrap();
    assert_eq!(first.id, fire, "fire_event answers first");
    let waited = ring.wait(waiter).unwrap();
    assert_eq!(waited.status, 0);
    assert!(matches!(waited.body, portcullis_proto::frame::Body::Call { ref scalars, .. } if scalars == &[77]));
    // wait_event that times out.
    let timeout = ring.call(h, 3, &[10], &[], 0).unwrap_err();
    assert_eq!(timeout.status(), Some(Status::Timeout));
    // reset (root holds sample.admin)
    ring.call(h, 5, &[], &[], 0).unwrap();
    // transform_record in the native layout (144 bytes): u8_ + 1.
    let out = ring.call(h, 7, &[], &[0; 144], 4096).unwrap().struct_out;
    assert_eq!((out.len(), out[0]), (144, 1));
    // checksum_dma: the dma memory is mapped over the socket, filled, and summed through the ring.
    let dma = ring.map_memory(h, 1).unwrap();
    assert_eq!((dma.size, dma.writable), (1 << 20, true));
    let pattern = dma_pattern();
    rustix::io::pwrite(&dma.fd, &pattern, 0).unwrap();
    assert_eq!(
        ring.call(h, 8, &[0, 1 << 20], &[], 0).unwrap().scalars,
        vec![fnv1a(&pattern)]
    );
    // Refusals come back through the ring too.
    assert_eq!(
        ring.call(h, 6, &[], &[], 0).unwrap_err().status(),
        Some(Status::BadArgument)
    );
    assert_eq!(
        ring.call(h, 0, &[1], &[], 0).unwrap_err().status(),
        Some(Status::BadArgument)
    );
    // Memory cannot be mapped through the ring (descriptors don't travel in shared memory).
    let id = ring
        .submit(Request::MapMemory {
            handle: h,
            memory_type: 1,
        })
        .unwrap();
    assert_eq!(ring.wait(id).unwrap().status, Status::Unsupported.code());
    ring.close(h).unwrap();
    assert_eq!(
        ring.call(h, 0, &[1, 1], &[], 0).unwrap_err().status(),
        Some(Status::NotOpen)
    );
    drop(dma);
    drop(ring);
    broker.assert_no_leaks(baseline);
}

#[test]
fn ring_events_arrive_as_completions() {
    let broker = Broker::start();
    let (mut ring, h) = ring_client(&broker);
    ring.request(Request::Subscribe { services: vec![] }).unwrap();
    ring.call(h, 4, &[5], &[], 0).unwrap();
    // fire_event notifies subscribers; the notification travels through the completion ring.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if ring
            .take_events()
            .iter()
            .any(|e| matches!(e, Event::Notification { value: 5, .. }))
        {
            break;
        }
        assert!(Instant::now() < deadline, "no notification through the ring");
        ring.call(h, 0, &[0, 0], &[], 0).unwrap();
    }
}

#[test]
fn ring_sixteen_clients_pipeline_100k_calls_each() {
    const CLIENTS: u64 = 16;
    const CALLS: u64 = 100_000;
    const WINDOW: u64 = 256;
    let broker = Broker::start();
    let baseline = broker.baseline_fds();
    std::thread::scope(|scope| {
        for c in 0..CLIENTS {
            let broker = &broker;
            scope.spawn(move || {
                let (mut ring, h) = ring_client(broker);
                let mut expected: HashMap<u64, u64> = HashMap::new();
                let (mut sent, mut answered) = (0u64, 0u64);
                while answered < CALLS {
                    while sent < CALLS && sent - answered < WINDOW {
                        let id = ring.submit_call(h, 0, &[sent, c << 32], &[], 0).unwrap();
                        expected.insert(id, sent + (c << 32));
                        sent += 1;
                    }
                    let r = ring.next_response().unwrap();
                    let want = expected.remove(&r.id).expect("a response to a request sent");
                    assert_eq!(r.status, 0);
                    assert!(
                        matches!(r.body, portcullis_proto::frame::Body::Call { ref scalars, .. } if scalars == &[want]),
                        "client {c}: {r:?} != {want}"
                    );
                    answered += 1;
                }
                assert!(expected.is_empty());
            });
        }
    });
    broker.assert_no_leaks(baseline);
}

#[test]
fn ring_bytes_flipped_under_the_broker_never_crash_it() {
    let broker = Broker::start();
    let baseline = broker.baseline_fds();
    for round in 0..4u64 {
        let (mut ring, h) = ring_client(&broker);
        let stop = AtomicBool::new(false);
        let map = ring.map_again().unwrap();
        let outcome = std::thread::scope(|scope| {
            let map = &map;
            let stop = &stop;
            scope.spawn(move || {
                // xorshift over the whole submission ring, while requests are in flight.
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ round;
                let words = map.sq();
                while !stop.load(Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let w = &words[(x as usize >> 8) % words.len().min(64)];
                    w.fetch_xor(1 << (x % 64), Ordering::Relaxed);
                }
            });
            let mut outcome = Ok(0u32);
            for i in 0..20_000u64 {
                match ring.call(h, 0, &[i, 1], &[], 0) {
                    Ok(out) => {
                        assert_eq!(out.scalars.len(), 1, "a well-formed answer");
                        if let Ok(n) = outcome.as_mut() {
                            *n += 1;
                        }
                    }
                    // The broker refused what it decoded (a flipped selector, handle, count).
                    Err(ClientError::Refused { status, .. }) if status != Status::ProtocolError => {}
                    Err(e) => {
                        outcome = Err(e);
                        break;
                    }
                }
            }
            stop.store(true, Ordering::Relaxed);
            outcome
        });
        match outcome {
            Ok(n) => assert!(n > 0),
            // A corrupted record ends only this session, with the reason.
            Err(e) => assert_eq!(e.status(), Some(Status::ProtocolError), "{e}"),
        }
        drop(ring);
        assert_fresh_client_served(&broker);
    }
    assert!(broker.is_running_ref());
    broker.assert_no_leaks(baseline);
}

/// Writes `value` into the header word at `offset`, wakes the broker, and returns how the
/// next call ends.
fn poke_then_call(broker: &Broker, offset: usize, value: u32) -> Result<(), ClientError> {
    let (mut ring, h) = ring_client(broker);
    ring.call(h, 0, &[1, 1], &[], 0).unwrap();
    let header = ring.mapping().header();
    let word = match offset {
        0 => &header.magic,
        4 => &header.version,
        8 => &header.sq_size,
        12 => &header.cq_size,
        64 => &header.sq_tail.0,
        128 => &header.sq_head.0,
        192 => &header.cq_tail.0,
        256 => &header.cq_head.0,
        320 => &header.broker_sleeping.0,
        384 => &header.client_sleeping.0,
        _ => unreachable!(),
    };
    store_word(word, value);
    wake::ring_broker(ring.broker_doorbell()).unwrap();
    // The broker reads only the client's words (sq_tail, cq_head, client_sleeping); garbage in
    // the others is ignored, garbage in the indices ends the session. A garbage tail is
    // answered at once with a Goodbye (a call now would write the tail over it).
    let result = if offset == 64 {
        ring.next_response()
            .map(|r| panic!("a response to a garbage tail: {r:?}"))
    } else {
        ring.call(h, 0, &[2, 2], &[], 0)
            .map(|out| assert_eq!(out.scalars, vec![4]))
    };
    drop(ring);
    assert_fresh_client_served(broker);
    result
}

#[test]
fn ring_garbage_in_every_header_field_is_survived() {
    let broker = Broker::start();
    let baseline = broker.baseline_fds();
    for offset in [0, 4, 8, 12, 320, 384] {
        for value in [0, 0xdead_beef, u32::MAX] {
            // Words nobody trusts (sizes are fixed at setup) and the sleep flags: served on.
            poke_then_call(&broker, offset, value).unwrap_or_else(|e| panic!("offset {offset} = {value:#x}: {e}"));
        }
    }
    for offset in [128, 192] {
        for value in [0, 0xdead_beef, u32::MAX] {
            // Words the broker writes: it keeps its own copy and never reads them back. The
            // client that scribbled on them may trip over its own garbage, but the broker
            // neither ends the session nor stops serving.
            match poke_then_call(&broker, offset, value) {
                Ok(()) | Err(ClientError::Protocol(_)) => {}
                Err(e) => panic!("offset {offset} = {value:#x}: {e}"),
            }
        }
    }
    for offset in [64] {
        for value in [0xdead_beef, 0x7fff_fff8, u32::MAX, 12] {
            // Indices past the ring: that session ends with PROTOCOL_ERROR; the broker goes on.
            let err = poke_then_call(&broker, offset, value)
                .err()
                .unwrap_or_else(|| panic!("offset {offset} = {value:#x} was accepted"));
            assert_eq!(
                err.status(),
                Some(Status::ProtocolError),
                "offset {offset} = {value:#x}: {err}"
            );
        }
    }
    // The completion head is read when the broker needs room: fill the completion ring
    // behind a garbage head and the session ends the same way.
    for value in [0xdead_beef, 0x7fff_fff8, u32::MAX, 12] {
        let (mut ring, h) = ring_client(&broker);
        ring.call(h, 0, &[1, 1], &[], 0).unwrap();
        store_word(&ring.mapping().header().cq_head.0, value);
        let echo = echo_4k(h, 7);
        // Two rounds of 60 4-KiB echoes: the second needs the room the first took.
        for round in 0..2 {
            for _ in 0..60 {
                assert!(ring.try_submit(echo.clone()).unwrap().is_some());
            }
            ring.flush().unwrap();
            if round == 0 {
                // The broker has taken the first round (and filled the completion ring with it)
                // when its submission head reaches the tail.
                let header = ring.mapping().header();
                let deadline = Instant::now() + Duration::from_secs(20);
                while u32::from_le(header.sq_head.0.load(Ordering::Acquire))
                    != u32::from_le(header.sq_tail.0.load(Ordering::Acquire))
                {
                    assert!(Instant::now() < deadline, "the broker never took the first round");
                    std::thread::yield_now();
                }
            }
        }
        // Reading completions now would write a good head over the garbage: first let the
        // broker, out of room, read the garbage and end the ring.
        let deadline = Instant::now() + Duration::from_secs(20);
        while broker.stats()["rings"] != 0 {
            assert!(Instant::now() < deadline, "the broker never read the garbage head");
        }
        let err = loop {
            match ring.next_response() {
                Ok(r) => assert_eq!(r.status, 0),
                Err(e) => break e,
            }
        };
        assert_eq!(err.status(), Some(Status::ProtocolError), "cq_head = {value:#x}: {err}");
        drop(ring);
        assert_fresh_client_served(&broker);
    }
    assert!(broker.log().contains("completion index"), "the reason is logged");
    assert!(broker.log().contains("ring session ended"), "the reason is logged");
    broker.assert_no_leaks(baseline);
}

#[test]
fn ring_record_claiming_more_than_published_ends_the_session() {
    let broker = Broker::start();
    let baseline = broker.baseline_fds();
    let (ring, _h) = ring_client(&broker);
    let map = ring.mapping();
    let header = map.header();
    // A record header claiming 4 KiB, behind a tail that publishes 16 bytes, at the broker's head.
    let head = u32::from_le(header.sq_head.0.load(Ordering::Acquire));
    let at = (head as usize % map.sq_size().get() as usize) / 8;
    map.sq()[at].store(u64::from_ne_bytes([0, 16, 0, 0, 0, 0, 0, 0]), Ordering::Relaxed);
    store_word(&header.sq_tail.0, head.wrapping_add(16));
    wake::ring_broker(ring.broker_doorbell()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !broker.log().contains("only 8 published") {
        assert!(Instant::now() < deadline, "no logged reason:\n{}", broker.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(ring);
    assert_fresh_client_served(&broker);
    broker.assert_no_leaks(baseline);
}

#[test]
fn ring_client_that_never_reads_completions_cannot_block_or_grow_the_broker() {
    let broker = Broker::start();
    let baseline = broker.baseline_fds();
    let (mut ring, h) = ring_client(&broker);
    let rss = |pid: u32| -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap().to_string();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    let echo = echo_4k(h, 0x5a);
    let mut submitted = 0u32;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last_head = u32::MAX;
    let mut stalled_since = Instant::now();
    let mut rss_at_stall = None;
    loop {
        // Submit whatever fits; never consume a completion.
        while ring.try_submit(echo.clone()).unwrap().is_some() {
            submitted += 1;
        }
        ring.flush().unwrap();
        let head = u32::from_le(ring.mapping().header().sq_head.0.load(Ordering::Acquire));
        if head != last_head {
            last_head = head;
            stalled_since = Instant::now();
        } else if stalled_since.elapsed() > Duration::from_millis(500) {
            // The broker stopped taking submissions: its completion ring and its bounded
            // backlog are full. Its memory stays put however long the client pushes.
            let now = rss(broker.pid());
            match rss_at_stall {
                None => {
                    rss_at_stall = Some(now);
                    stalled_since = Instant::now();
                }
                Some(before) => {
                    assert!(now < before + 8 * 1024, "broker RSS grew from {before} to {now} KiB");
                    break;
                }
            }
        }
        assert!(Instant::now() < deadline, "the broker never pushed back");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Completion ring (256 KiB) + backlog (256 KiB) + submission ring (256 KiB) of 4 KiB echoes.
    assert!(
        submitted > 150,
        "{submitted} requests went in before the broker pushed back"
    );
    // Meanwhile the broker serves everyone else, promptly.
    let started = Instant::now();
    assert_fresh_client_served(&broker);
    assert!(started.elapsed() < Duration::from_secs(2));
    // And the stalled client, once it reads, gets every answer.
    let mut answered = 0;
    while answered < submitted {
        let r = ring.next_response().unwrap();
        assert_eq!(r.status, 0);
        answered += 1;
    }
    drop(ring);
    broker.assert_no_leaks(baseline);
}

#[test]
fn ring_client_that_blocks_and_never_drains_its_doorbell_cannot_stall_the_broker() {
    let broker = Broker::start();
    let baseline = broker.baseline_fds();
    let spin = RingOptions {
        wait: WaitMode::Spin,
        ..RingOptions::default()
    };
    let (mut ring, h) = ring_client_with(&broker, spin);
    // What would stall a broker sharing an eventfd with its client: make it blocking, fill it.
    // The doorbell is the client's end of a socket pair: made blocking, it is still the
    // client's own open file, and what it writes only rings the broker.
    let bell = ring.doorbell();
    let flags = rustix::fs::fcntl_getfl(bell).unwrap();
    rustix::fs::fcntl_setfl(bell, flags - rustix::fs::OFlags::NONBLOCK).unwrap();
    assert_eq!(rustix::io::write(bell, &(u64::MAX - 1).to_ne_bytes()).unwrap(), 8);
    // Claim to sleep, so that the broker rings at every completion, and never drain (a spinning
    // client never does): the socket fills and the broker must not care.
    store_word(&ring.mapping().header().client_sleeping.0, wake::ON_RECORDS);
    // One call at a time, so that every completion is published (and rung) on its own.
    let calls = 30_000u64;
    for i in 0..calls {
        assert_eq!(ring.call(h, 0, &[i, 1], &[], 0).unwrap().scalars, [i + 1]);
    }
    // Every completion was rung, but fewer bytes wait than rings: the socket filled, and the
    // broker went on.
    let queued = rustix::io::ioctl_fionread(ring.doorbell()).unwrap();
    assert!(
        queued > 0 && queued < calls,
        "the broker's rings filled the doorbell ({queued} bytes for {calls} rings)"
    );
    assert_fresh_client_served(&broker);
    drop(ring);
    broker.assert_no_leaks(baseline);
    assert!(!broker.log().contains("did not stop"), "{}", broker.log());
}

#[test]
fn ring_client_that_fills_and_blocks_the_brokers_doorbell_cannot_stall_it_or_lose_a_wake_up() {
    // The broker sleeps whenever idle: every call below rings its doorbell.
    let broker = Broker::with(BrokerSetup {
        config: Some("[ring]\nwait = \"sleep\"\n[[device]]\nname = \"sample0\"\ndriver = \"sample\"\n"),
        ..BrokerSetup::default()
    });
    let baseline = broker.baseline_fds();
    let sleepy = RingOptions {
        wait: WaitMode::Sleep,
        ..RingOptions::default()
    };
    let (mut ring, h) = ring_client_with(&broker, sleepy);
    // Its end made blocking, and filled with what a big-endian client's eventfd write was.
    let bell = ring.broker_doorbell();
    let flags = rustix::fs::fcntl_getfl(bell).unwrap();
    rustix::fs::fcntl_setfl(bell, flags - rustix::fs::OFlags::NONBLOCK).unwrap();
    let mut filled = 0usize;
    while let Ok(n) = rustix::net::send(bell, &1u64.to_be_bytes(), rustix::net::SendFlags::DONTWAIT) {
        filled += n;
    }
    assert!(filled > 8, "the doorbell filled after {filled} bytes");
    // Every call is answered promptly: a lost wake-up would cost the broker's 500 ms nap.
    let mut slowest = Duration::ZERO;
    for i in 0..3_000u64 {
        let start = Instant::now();
        assert_eq!(ring.call(h, 0, &[i, 1], &[], 0).unwrap().scalars, [i + 1]);
        slowest = slowest.max(start.elapsed());
    }
    assert!(slowest < Duration::from_millis(50), "the slowest call took {slowest:?}");
    assert_fresh_client_served(&broker);
    drop(ring);
    broker.assert_no_leaks(baseline);
}

#[test]
fn ring_client_killed_mid_batch_releases_everything() {
    let broker = Broker::start();
    let baseline = broker.baseline_fds();
    for _ in 0..3 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ring_batch"))
            .arg(broker.run_dir())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "submitting");
        let stats = broker.stats();
        assert!(stats["rings"].as_u64().unwrap() >= 1, "{stats}");
        child.kill().unwrap();
        child.wait().unwrap();
        assert_fresh_client_served(&broker);
        broker.assert_no_leaks(baseline);
    }
}

#[test]
fn ring_is_refused_beyond_max_rings_and_the_socket_still_serves() {
    let broker = Broker::with(BrokerSetup {
        config: Some("[ring]\nmax_rings = 1\n[[device]]\nname = \"sample0\"\ndriver = \"sample\"\n"),
        ..BrokerSetup::default()
    });
    let (_first, _) = ring_client(&broker);
    let err = RingClient::connect(broker.run_dir(), RingOptions::default()).unwrap_err();
    assert_eq!(err.status(), Some(Status::NoMemory), "{err}");
}

#[test]
fn ring_spin_and_sleep_modes_serve() {
    for wait in ["spin", "sleep"] {
        let config = format!("[ring]\nwait = \"{wait}\"\n[[device]]\nname = \"sample0\"\ndriver = \"sample\"\n");
        let broker = Broker::with(BrokerSetup {
            config: Some(&config),
            ..BrokerSetup::default()
        });
        for client_wait in [WaitMode::Spin, WaitMode::Sleep, WaitMode::Adaptive] {
            let (mut ring, h) = ring_client_with(
                &broker,
                RingOptions {
                    wait: client_wait,
                    ..RingOptions::default()
                },
            );
            for i in 0..1000 {
                assert_eq!(ring.call(h, 0, &[i, 1], &[], 0).unwrap().scalars, vec![i + 1]);
            }
        }
    }
}

/// The names of the serving process's threads that serve rings.
fn ring_threads(broker: &Broker) -> Vec<String> {
    let stats = broker.stats();
    let pid = stats["sandbox"]
        .as_array()
        .and_then(|processes| processes.iter().find(|p| p["role"] == "serving"))
        .and_then(|p| p["pid"].as_u64())
        .expect("stats name the serving process");
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_string())
        .filter(|name| name.starts_with("ring-"))
        .collect();
    names.sort();
    names
}

/// Whether this kernel's pidfds are pidfs files, each process's with an inode of its own (Linux
/// 6.9 on), rather than sharing one anonymous inode.
fn pidfs() -> bool {
    let ino = |pid: u32| {
        let pid = rustix::process::Pid::from_raw(pid as i32).unwrap();
        let fd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).unwrap();
        rustix::fs::fstat(&fd).unwrap().st_ino
    };
    ino(std::process::id()) != ino(std::os::unix::process::parent_id())
}

#[test]
fn sleeping_rings_share_a_bounded_pool_of_threads() {
    let broker = Broker::with(BrokerSetup {
        config: Some(
            "[limits]\nmax_rings_per_uid = 200\n[ring]\nwait = \"adaptive\"\nthreads = 2\nmax_rings = 200\n[[device]]\nname = \"sample0\"\ndriver = \"sample\"\n",
        ),
        ..BrokerSetup::default()
    });
    let baseline = broker.baseline_fds();
    // The pool is there before any ring, in the baseline.
    let pool = ring_threads(&broker);
    assert_eq!(pool, ["ring-pool-0", "ring-pool-1"]);
    let mut rings: Vec<_> = (0..150).map(|_| ring_client(&broker)).collect();
    // Every ring served, in any order, by the same two threads.
    for round in 0..3u64 {
        for (i, (ring, h)) in rings.iter_mut().enumerate() {
            let i = i as u64;
            assert_eq!(ring.call(*h, 0, &[i, round], &[], 0).unwrap().scalars, [i + round]);
        }
    }
    assert_eq!(broker.stats()["rings"], 150);
    assert_eq!(ring_threads(&broker), pool, "no thread per ring");
    // Three descriptors per ring session in the broker: the connection, the broker's end of the
    // doorbell pair and its own eventfd; and one pidfd for this process, whose 150 connections
    // share it where pidfds are pidfs files (each has its own elsewhere).
    let pidfds = if pidfs() { 1 } else { 150 };
    let fds = broker.stats()["open_fds"].as_u64().unwrap();
    assert_eq!(fds - baseline, 150 * 3 + pidfds, "descriptors per ring");
    drop(rings);
    broker.assert_no_leaks(baseline);
    assert_eq!(ring_threads(&broker), pool);
}
