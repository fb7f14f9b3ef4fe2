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
//! The broker's doorbell is one end of a Unix stream socket pair; the client gets the other
//! end and rings by sending a byte (`MSG_DONTWAIT | MSG_NOSIGNAL`: never blocking whatever the
//! descriptor's flags, and an error rather than `SIGPIPE` once the broker has let the ring go).
//! The two ends are two open files: nothing the client does to its end (clearing
//! `O_NONBLOCK`, reading it) touches the broker's, which the broker reads only with
//! `MSG_DONTWAIT`. It replaced an eventfd, whose 8-byte value a client under qemu-user wrote in
//! its own byte order (2^56 for a big-endian 1); the counter, never read, filled after 255
//! rings and every later ring was lost.
//!
//! The client's doorbell is a pipe ([`doorbell`]), not an eventfd: a descriptor passed to the
//! client shares its open file description, and with it `O_NONBLOCK`. A client that cleared
//! `O_NONBLOCK` on a shared eventfd and wrote it full would make the broker's next wake-up write
//! block (Linux has no per-call non-blocking eventfd write: `RWF_NOWAIT` gives `EOPNOTSUPP`).
//! A pipe's ends are two descriptions: the broker alone holds the write end, and the client's
//! read end cannot write.

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
    sleeping.store(waiting_for.to_le(), Ordering::Relaxed);
    fence(Ordering::SeqCst);
    if !ready() {
        wait();
    }
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
