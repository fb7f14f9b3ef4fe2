//! Sleeping and waking. A side about to sleep sets its `*_sleeping` word, re-checks for work,
//! and only then waits; a side that publishes work checks the other's word after a fence and
//! rings the other's doorbell only when it is set. The two fences make the pair a Dekker
//! handshake: either the sleeper sees the work, or the waker sees the flag.
//!
//! Each side empties its own doorbell before it announces sleep, and waits on it
//! level-triggered: whatever is unread is a wake-up not yet taken, so a full doorbell (a write
//! that fails with `EAGAIN`) already means "wake up". The bytes rung carry no meaning: no byte
//! order, no count.
//!
//! The doorbells are the two ends of one Unix stream socket pair ([`broker_doorbell`]): the
//! broker keeps one end, the client gets the other, and each side rings the other by sending a
//! byte on its own end (`MSG_DONTWAIT | MSG_NOSIGNAL`: never blocking whatever the
//! descriptor's flags, and an error rather than `SIGPIPE` once the other side has let the ring
//! go) and empties its own end before it sleeps. The two ends are two open files: nothing the
//! client does to its end (clearing `O_NONBLOCK`, reading it, filling it) touches the broker's,
//! which the broker only reads and writes with `MSG_DONTWAIT`. One descriptor per ring on the
//! broker's side, where there were three.
//!
//! The socket replaced eventfds: a descriptor passed to the client shares its open file
//! description, and with it `O_NONBLOCK`, and Linux has no per-call non-blocking eventfd write
//! (`RWF_NOWAIT` gives `EOPNOTSUPP`), so a client that cleared `O_NONBLOCK` on a shared eventfd
//! and wrote it full would make the broker's next wake-up block; and a client under qemu-user
//! wrote the 8-byte value in its own byte order (2^56 for a big-endian 1), so a counter never
//! read filled after 255 rings and every later ring was lost. [`doorbell`] (a pipe) remains for
//! a side that wakes its own threads.

use std::{
    io,
    os::fd::{AsFd, OwnedFd},
    sync::atomic::{AtomicU32, Ordering, fence},
    time::Duration,
};

use rustix::event::{EventfdFlags, Timespec, epoll};

/// A new eventfd, non-blocking and close-on-exec.
pub fn eventfd() -> io::Result<OwnedFd> {
    Ok(rustix::event::eventfd(
        0,
        EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK,
    )?)
}

/// Rings a doorbell of this side's making, an eventfd or the write end of a [`doorbell`] pipe
/// (both non-blocking descriptions that only this side holds): writes a `u64` 1. A full
/// counter or pipe already means "wake up"; any other failure is returned.
pub fn ring(fd: impl AsFd) -> io::Result<()> {
    ring_with(|| rustix::io::write(&fd, &1u64.to_ne_bytes()))
}

/// Rings with `write`, again when interrupted: a full doorbell (`EAGAIN`) is already rung.
fn ring_with(mut write: impl FnMut() -> rustix::io::Result<usize>) -> io::Result<()> {
    loop {
        match write() {
            Ok(_) | Err(rustix::io::Errno::AGAIN) => return Ok(()),
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// The broker's doorbell: a Unix stream socket pair, non-blocking and close-on-exec,
/// `(broker's end, client's end)`.
pub fn broker_doorbell() -> io::Result<(OwnedFd, OwnedFd)> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    Ok(rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )?)
}

/// Rings the broker's doorbell from the client's end: sends one byte without blocking and
/// without `SIGPIPE`. A full socket already means "wake up" (the broker empties it before it
/// sleeps); any other failure (the broker has let the ring go: `EPIPE`) is returned.
pub fn ring_broker(fd: impl AsFd) -> io::Result<()> {
    use rustix::net::SendFlags;
    ring_with(|| rustix::net::send(&fd, &[1], SendFlags::DONTWAIT | SendFlags::NOSIGNAL))
}

/// Rings the client's doorbell from the broker's end of the pair, as [`ring_broker`] does the
/// other way: a full socket (a client that never empties its end) already means "wake up";
/// `EPIPE` means the client has closed its end.
pub fn ring_client(fd: impl AsFd) -> io::Result<()> {
    ring_broker(fd)
}

/// Empties the broker's end of its doorbell, never blocking (`MSG_DONTWAIT`, whatever the
/// flags), and at most 64 KiB at a time: what a flooding client leaves makes the next wait
/// return at once, which costs only that client's ring thread.
pub fn drain_broker(fd: impl AsFd) {
    use rustix::net::RecvFlags;
    let mut buf = [0u8; 4096];
    for _ in 0..16 {
        match rustix::net::recv(&fd, &mut buf, RecvFlags::DONTWAIT) {
            Ok((n, _)) if n == buf.len() => {}
            Err(rustix::io::Errno::INTR) => {}
            _ => return,
        }
    }
}

/// Empties the client's end of the doorbell pair, never blocking (`MSG_DONTWAIT`, whatever the
/// flags the client left on it), as [`drain_broker`] does the broker's.
pub fn drain_client(fd: impl AsFd) {
    drain_broker(fd);
}

/// A doorbell pipe, non-blocking and close-on-exec at both ends: `(read end, write end)`. The
/// waker keeps the write end and a copy of the read end (never read: the pipe always has a
/// reader, so a write never raises `SIGPIPE`); the sleeper gets the read end and
/// [`drain`]s it before it sleeps.
pub fn doorbell() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::pipe::pipe_with(
        rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK,
    )?)
}

/// Empties the read end of a doorbell pipe, without blocking while it is non-blocking. Done
/// before announcing sleep, so that a ring that comes later stays readable.
pub fn drain(fd: impl AsFd) {
    let mut buf = [0u8; 512];
    while matches!(rustix::io::read(&fd, &mut buf), Ok(n) if n == buf.len()) {}
}

/// A `*_sleeping` bit: wake me when the other side publishes records (a tail).
pub const ON_RECORDS: u32 = 1;
/// A `*_sleeping` bit: wake me when the other side frees room (a head).
pub const ON_ROOM: u32 = 2;

/// Rings with `ring` if the other side sleeps waiting for `what` (`ON_RECORDS` after
/// publishing a tail, `ON_ROOM` after publishing a head). Returns whether it rang.
pub fn wake_if(sleeping: &AtomicU32, what: u32, ring: impl FnOnce() -> io::Result<()>) -> io::Result<bool> {
    fence(Ordering::SeqCst);
    if u32::from_le(sleeping.load(Ordering::Relaxed)) & what != 0 {
        ring()?;
        return Ok(true);
    }
    Ok(false)
}

/// Announces sleep in `sleeping` (the bits of what would wake it), re-checks `ready`, and
/// waits with `wait` only if there is still nothing to do.
pub fn sleep_unless(sleeping: &AtomicU32, waiting_for: u32, ready: impl FnOnce() -> bool, wait: impl FnOnce()) {
    if park_unless(sleeping, waiting_for, ready) {
        wait();
    }
    wake_up(sleeping);
}

/// The first half of [`sleep_unless`], for a side that sleeps by returning (a ring served by a
/// pool of threads): announces sleep in `sleeping` and re-checks `ready`. Returns `true` when
/// there is still nothing to do: the announcement stands, and the doorbell will be rung for
/// what comes next. Returns `false`, the announcement withdrawn, when there is work.
pub fn park_unless(sleeping: &AtomicU32, waiting_for: u32, ready: impl FnOnce() -> bool) -> bool {
    sleeping.store(waiting_for.to_le(), Ordering::Relaxed);
    fence(Ordering::SeqCst);
    if ready() {
        wake_up(sleeping);
        return false;
    }
    true
}

/// Withdraws a sleep announcement: this side is running and will look for work before it
/// sleeps again, so the other side need not ring.
pub fn wake_up(sleeping: &AtomicU32) {
    sleeping.store(0, Ordering::Relaxed);
}

fn timespec(timeout: Duration) -> Timespec {
    Timespec {
        tv_sec: i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
        tv_nsec: i64::from(timeout.subsec_nanos()),
    }
}

/// A wait on this side's doorbell, level-triggered (the sleeper empties it before it announces
/// sleep: what is unread is a wake-up not yet taken), plus a private eventfd this side's own
/// threads ring, plus any descriptors watched (the client watches its socket).
#[derive(Debug)]
pub struct Waiter {
    epoll: OwnedFd,
    private: OwnedFd,
}

const DOORBELL: u64 = 0;
const PRIVATE: u64 = 1;
const WATCHED: u64 = 2;

impl Waiter {
    /// Also wakes when `fd` is readable; [`Waiter::wait`] then says so.
    pub fn watch(&self, fd: impl AsFd) -> io::Result<()> {
        epoll::add(
            &self.epoll,
            fd,
            epoll::EventData::new_u64(WATCHED),
            epoll::EventFlags::IN,
        )?;
        Ok(())
    }

    /// Watches `doorbell` (the one the other side rings).
    pub fn new(doorbell: impl AsFd) -> io::Result<Waiter> {
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        let private = eventfd()?;
        epoll::add(
            &epoll,
            doorbell,
            epoll::EventData::new_u64(DOORBELL),
            epoll::EventFlags::IN,
        )?;
        epoll::add(
            &epoll,
            &private,
            epoll::EventData::new_u64(PRIVATE),
            epoll::EventFlags::IN,
        )?;
        Ok(Waiter { epoll, private })
    }

    /// A duplicate of the private eventfd, for this side's tasks to [`ring`].
    pub fn private_clone(&self) -> io::Result<OwnedFd> {
        self.private.try_clone()
    }

    /// Waits for either eventfd, a watched descriptor, or `timeout`. Returns whether a watched
    /// descriptor is readable.
    pub fn wait(&self, timeout: Duration) -> io::Result<bool> {
        let mut events = Vec::with_capacity(3);
        match epoll::wait(
            &self.epoll,
            rustix::buffer::spare_capacity(&mut events),
            Some(&timespec(timeout)),
        ) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
        if events.iter().any(|e| e.data.u64() == PRIVATE) {
            let mut counter = [0u8; 8];
            let _ = rustix::io::read(&self.private, &mut counter);
        }
        Ok(events.iter().any(|e| e.data.u64() == WATCHED))
    }
}
