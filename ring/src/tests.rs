use std::sync::atomic::Ordering;

use portcullis_proto::ring::{MAGIC, RingError, RingSize};

use crate::{Consumer, Mapping, Producer, queue::store_word};

fn ring() -> Mapping {
    let size = RingSize::requested(0).unwrap();
    Mapping::create(size, size).unwrap().1
}

#[test]
fn mapping_header_is_written_little_endian() {
    let m = ring();
    assert_eq!(u32::from_le(m.header().magic.load(Ordering::Relaxed)), MAGIC);
    assert_eq!(
        u32::from_le(m.header().sq_size.load(Ordering::Relaxed)),
        m.sq_size().get()
    );
}

#[test]
fn records_round_trip_in_order() {
    let m = ring();
    let h = m.header();
    let mut p = Producer::new("sq", m.sq_size());
    let mut c = Consumer::new("sq", m.sq_size());
    for n in 1..=50usize {
        let payload: Vec<u8> = (0..n).map(|i| (i * 7 + n) as u8).collect();
        assert!(p.push(m.sq(), &h.sq_head.0, &payload).unwrap());
    }
    let mut out = Vec::new();
    assert!(!c.pop(m.sq(), &h.sq_tail.0, &mut out).unwrap(), "nothing published yet");
    p.publish(&h.sq_tail.0);
    for n in 1..=50usize {
        assert!(c.pop(m.sq(), &h.sq_tail.0, &mut out).unwrap());
        let want: Vec<u8> = (0..n).map(|i| (i * 7 + n) as u8).collect();
        assert_eq!(out, want);
    }
    assert!(!c.pop(m.sq(), &h.sq_tail.0, &mut out).unwrap());
}

#[test]
fn records_wrap_around_the_end_and_full_ring_pushes_back() {
    let m = ring();
    let h = m.header();
    let size = m.sq_size().get() as usize;
    let mut p = Producer::new("sq", m.sq_size());
    let mut c = Consumer::new("sq", m.sq_size());
    let payload = vec![0xabu8; 1000];
    let mut out = Vec::new();
    let mut pushed = 0usize;
    while p.push(m.sq(), &h.sq_head.0, &payload).unwrap() {
        pushed += 1;
    }
    assert_eq!(pushed, size / 1008, "a full ring refuses, never overwrites");
    p.publish(&h.sq_tail.0);
    // Consume half, free it, and push across the end of the ring.
    for _ in 0..pushed / 2 {
        assert!(c.pop(m.sq(), &h.sq_tail.0, &mut out).unwrap());
    }
    c.publish(&h.sq_head.0);
    let mut wrapped = 0;
    for i in 0..pushed / 2 {
        let record = vec![i as u8; 1000];
        assert!(p.push(m.sq(), &h.sq_head.0, &record).unwrap());
        wrapped += 1;
    }
    p.publish(&h.sq_tail.0);
    for _ in 0..pushed - pushed / 2 {
        assert!(c.pop(m.sq(), &h.sq_tail.0, &mut out).unwrap());
        assert_eq!(out, payload);
    }
    for i in 0..wrapped {
        assert!(c.pop(m.sq(), &h.sq_tail.0, &mut out).unwrap());
        assert_eq!(out, vec![i as u8; 1000]);
    }
}

#[test]
fn consumer_tail_past_the_ring_is_an_error() {
    let m = ring();
    let h = m.header();
    let mut c = Consumer::new("sq", m.sq_size());
    store_word(&h.sq_tail.0, m.sq_size().get() + 8);
    let err = c.pop(m.sq(), &h.sq_tail.0, &mut Vec::new()).unwrap_err();
    assert!(matches!(err, RingError::Index { .. }), "{err}");
}

#[test]
fn consumer_length_beyond_published_is_an_error() {
    let m = ring();
    let h = m.header();
    let mut p = Producer::new("sq", m.sq_size());
    assert!(p.push(m.sq(), &h.sq_head.0, &[1, 2, 3]).unwrap());
    p.publish(&h.sq_tail.0);
    // The client rewrites the header word to claim more bytes than it published.
    m.sq()[0].store(u64::from_ne_bytes([200, 0, 0, 0, 0, 0, 0, 0]), Ordering::Relaxed);
    let mut c = Consumer::new("sq", m.sq_size());
    let err = c.pop(m.sq(), &h.sq_tail.0, &mut Vec::new()).unwrap_err();
    assert!(matches!(err, RingError::Record { .. }), "{err}");
}

#[test]
fn producer_head_ahead_of_tail_is_an_error() {
    let m = ring();
    let h = m.header();
    let mut p = Producer::new("cq", m.cq_size());
    let record = vec![0u8; 4000];
    while p.push(m.cq(), &h.cq_head.0, &record).unwrap() {}
    // A full ring makes the producer read the head; a head beyond the tail is corruption.
    store_word(&h.cq_head.0, 0x1000_0000);
    assert!(p.push(m.cq(), &h.cq_head.0, &record).is_err());
}

#[test]
fn producer_record_larger_than_ring_is_an_error() {
    let m = ring();
    let mut p = Producer::new("cq", m.cq_size());
    let huge = vec![0u8; m.cq_size().get() as usize];
    assert!(p.push(m.cq(), &m.header().cq_head.0, &huge).is_err());
}

#[test]
fn map_of_a_short_file_is_refused() {
    let size = RingSize::requested(0).unwrap();
    let fd = rustix::fs::memfd_create("short", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&fd, 4096).unwrap();
    assert!(Mapping::map(&fd, size, size).is_err());
}

#[test]
fn two_mappings_of_one_memfd_share_records() {
    let size = RingSize::requested(0).unwrap();
    let (fd, broker) = Mapping::create(size, size).unwrap();
    let client = Mapping::map(&fd, size, size).unwrap();
    let mut p = Producer::new("sq", size);
    assert!(p.push(client.sq(), &client.header().sq_head.0, b"hello ring").unwrap());
    p.publish(&client.header().sq_tail.0);
    let mut c = Consumer::new("sq", size);
    let mut out = Vec::new();
    assert!(c.pop(broker.sq(), &broker.header().sq_tail.0, &mut out).unwrap());
    assert_eq!(out, b"hello ring");
}

#[test]
fn the_broker_doorbell_means_nothing_by_its_bytes_and_never_fills_up() {
    use std::time::Duration;
    let (bell, client) = crate::wake::broker_doorbell().unwrap();
    let waiter = crate::wake::Waiter::new(&bell).unwrap();
    // What sank big-endian clients under qemu-user: each ring an 8-byte 1 in the client's byte
    // order (2^56 read little-endian), ~2.5 a wake-up. An eventfd's counter filled after 255;
    // this doorbell is emptied before each sleep, and any bytes wake it.
    for round in 0..1_000 {
        crate::wake::drain_broker(&bell);
        assert!(!readable(&bell), "round {round}: empty after draining");
        rustix::io::write(&client, &1u64.to_be_bytes()).unwrap();
        let start = std::time::Instant::now();
        waiter.wait(Duration::from_secs(5)).unwrap();
        assert!(
            start.elapsed() < Duration::from_secs(4),
            "round {round}: woken by the ring"
        );
    }
    // A hostile client makes its end blocking and floods it: a ring still never blocks (the
    // full socket is `EAGAIN`, already a wake-up), and the broker's end stays non-blocking.
    let flags = rustix::fs::fcntl_getfl(&client).unwrap();
    rustix::fs::fcntl_setfl(&client, flags - rustix::fs::OFlags::NONBLOCK).unwrap();
    let (done, finished) = std::sync::mpsc::channel();
    let ringer = std::thread::spawn(move || {
        let rung = (0..100_000).all(|_| crate::wake::ring_broker(&client).is_ok());
        let _ = done.send(rung);
        client
    });
    assert!(
        finished.recv_timeout(Duration::from_secs(30)).expect("a ring blocked"),
        "every ring of a full doorbell is fine"
    );
    let client = ringer.join().unwrap();
    assert!(readable(&bell));
    for _ in 0..1_000 {
        crate::wake::drain_broker(&bell);
    }
    assert!(!readable(&bell), "drained, in bounded steps");
    // Once the broker lets the ring go, a ring is an error, not a SIGPIPE.
    drop(waiter);
    drop(bell);
    let e = crate::wake::ring_broker(&client).unwrap_err();
    assert_eq!(
        rustix::io::Errno::from_io_error(&e),
        Some(rustix::io::Errno::PIPE),
        "{e}"
    );
}

/// Whether `fd` has bytes to read now.
fn readable(fd: &std::os::fd::OwnedFd) -> bool {
    let mut fds = [rustix::event::PollFd::new(fd, rustix::event::PollFlags::IN)];
    rustix::event::poll(&mut fds, Some(&rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 })).unwrap() == 1
}

#[test]
fn doorbell_ring_never_blocks_whatever_the_sleeper_does_with_its_end() {
    use std::time::{Duration, Instant};
    let (reader, writer) = crate::wake::doorbell().unwrap();
    // The sleeper makes its end blocking, never drains, and cannot write through it.
    let flags = rustix::fs::fcntl_getfl(&reader).unwrap();
    rustix::fs::fcntl_setfl(&reader, flags - rustix::fs::OFlags::NONBLOCK).unwrap();
    assert!(rustix::io::write(&reader, &1u64.to_ne_bytes()).is_err());
    // Far more rings than the pipe holds: each returns at once (a full pipe is EAGAIN). On a
    // thread, so that a ring that blocked fails the test instead of hanging it.
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let start = Instant::now();
        for _ in 0..100_000 {
            crate::wake::ring(&writer).unwrap();
        }
        let full = rustix::io::write(&writer, &1u64.to_ne_bytes()).is_err();
        let _ = done.send((start.elapsed(), full));
    });
    let (took, full) = finished.recv_timeout(Duration::from_secs(30)).expect("a ring blocked");
    assert!(took < Duration::from_secs(10), "100,000 rings took {took:?}");
    assert!(full, "the pipe filled up");
    drop(reader);
}

#[test]
fn waiter_wakes_on_a_doorbell_rung_after_it_was_drained() {
    use std::time::{Duration, Instant};
    let (reader, writer) = crate::wake::doorbell().unwrap();
    let waiter = crate::wake::Waiter::new(&reader).unwrap();
    for _ in 0..10_000 {
        crate::wake::ring(&writer).unwrap();
    }
    crate::wake::drain(&reader);
    let mut byte = [0u8; 1];
    assert!(rustix::io::read(&reader, &mut byte).is_err(), "drained to empty");
    // A stale edge may end the first wait at once; after that, only a ring ends one early.
    let _ = waiter.wait(Duration::from_millis(1)).unwrap();
    let start = Instant::now();
    let _ = waiter.wait(Duration::from_millis(200)).unwrap();
    assert!(start.elapsed() >= Duration::from_millis(150), "no ring, so the timeout");
    let ringer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        crate::wake::ring(&writer).unwrap();
        writer
    });
    let start = Instant::now();
    let _ = waiter.wait(Duration::from_secs(5)).unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "woken by the ring, not the timeout"
    );
    drop(ringer.join().unwrap());
}
