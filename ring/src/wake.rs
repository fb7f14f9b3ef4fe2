//! Sleeping and waking. A side about to sleep sets its `*_sleeping` word, re-checks for work,
//! and only then waits; a side that publishes work checks the other's word after a fence and
//! rings the other's eventfd only when it is set. The two fences make the pair a Dekker
//! handshake: either the sleeper sees the work, or the waker sees the flag.
//!
//! The broker never reads the eventfd the client rings (an edge-triggered epoll reports each
//! write), so a client that drains it or makes it blocking cannot stall the broker.

use std::{
    io,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    sync::atomic::{AtomicU32, Ordering, fence},
    time::Duration,
};

use rustix::event::{EventfdFlags, PollFd, PollFlags, Timespec, epoll};

/// A new eventfd, non-blocking and close-on-exec.
pub fn eventfd() -> io::Result<OwnedFd> {
    Ok(rustix::event::eventfd(
        0,
        EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK,
    )?)
}

/// Rings an eventfd: adds 1 without blocking (a full counter already means "wake up").
pub fn ring(fd: impl AsFd) {
    let _ = rustix::io::write(fd, &1u64.to_ne_bytes());
}

/// Rings `fd` if the other side says it sleeps. Call after publishing.
pub fn wake_if_sleeping(sleeping: &AtomicU32, fd: impl AsFd) -> bool {
    fence(Ordering::SeqCst);
    if sleeping.load(Ordering::Relaxed) != 0 {
        ring(fd);
        return true;
    }
    false
}

/// Announces sleep in `sleeping`, re-checks `ready`, and waits with `wait` only if there is
/// still nothing to do.
pub fn sleep_unless(sleeping: &AtomicU32, ready: impl FnOnce() -> bool, wait: impl FnOnce()) {
    sleeping.store(1u32.to_le(), Ordering::Relaxed);
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

/// Waits until `fd` is readable or `timeout` passes, then drains it. For the client's eventfd,
/// which only the client reads.
pub fn wait_and_drain(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<()> {
    let mut fds = [PollFd::new(&fd, PollFlags::IN)];
    match rustix::event::poll(&mut fds, Some(&timespec(timeout))) {
        Ok(_) | Err(rustix::io::Errno::INTR) => {}
        Err(e) => return Err(e.into()),
    }
    let mut counter = [0u8; 8];
    let _ = rustix::io::read(fd, &mut counter);
    Ok(())
}

/// The broker's wait: the client's eventfd, edge-triggered and never read, and a private
/// eventfd the broker's own tasks ring (completions, events, the socket's end).
#[derive(Debug)]
pub struct BrokerWaiter {
    epoll: OwnedFd,
    private: OwnedFd,
}

const CLIENT: u64 = 0;
const PRIVATE: u64 = 1;

impl BrokerWaiter {
    /// Watches `client` (the eventfd the client rings).
    pub fn new(client: impl AsFd) -> io::Result<BrokerWaiter> {
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        let private = eventfd()?;
        epoll::add(
            &epoll,
            client,
            epoll::EventData::new_u64(CLIENT),
            epoll::EventFlags::IN | epoll::EventFlags::ET,
        )?;
        epoll::add(
            &epoll,
            &private,
            epoll::EventData::new_u64(PRIVATE),
            epoll::EventFlags::IN,
        )?;
        Ok(BrokerWaiter { epoll, private })
    }

    /// The private eventfd, for the broker's tasks to [`ring`].
    pub fn private(&self) -> BorrowedFd<'_> {
        self.private.as_fd()
    }

    /// A duplicate of the private eventfd, for tasks that outlive a borrow.
    pub fn private_clone(&self) -> io::Result<OwnedFd> {
        self.private.try_clone()
    }

    /// Waits for either eventfd, or `timeout`.
    pub fn wait(&self, timeout: Duration) -> io::Result<()> {
        let mut events = Vec::with_capacity(2);
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
        Ok(())
    }
}
