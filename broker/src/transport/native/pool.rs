//! The threads that serve sleeping rings: one epoll instance for every ring, and
//! `ring.threads` threads that take turns on whichever ring is ready.
//!
//! Each ring registers two descriptors, its doorbell (rung by the client) and its private
//! eventfd (rung by the broker's tasks), level-triggered and `EPOLLONESHOT`, both under the
//! ring's key. A thread that gets an event for a ring takes the ring's lock without waiting: a
//! ring already being served needs no second thread, and the event can be dropped, because the
//! thread serving it re-arms both descriptors after it lets the lock go, and a descriptor that
//! is still readable then (a wake-up that came during the turn) fires again at once. Re-arming
//! after unlocking, never before, is what makes that so: an event delivered while the lock is
//! held is one the holder will re-arm.
//!
//! A busy ring gives its thread back after [`super::ring`]'s time slice with its private
//! eventfd rung, so that it queues behind the rings already waiting; an idle ring holds no
//! thread and is woken by nothing but its descriptors.

use std::{
    collections::HashMap,
    io,
    os::fd::OwnedFd,
    panic::AssertUnwindSafe,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
};

use portcullis_proto::Status;
use rustix::event::epoll;

use super::ring::{Turn, Worker};
use crate::config::RingConfig;

/// The broker's ring pool, started with the first ring that sleeps.
static POOL: Mutex<Option<Arc<Pool>>> = Mutex::new(None);

pub(super) struct Pool {
    epoll: OwnedFd,
    rings: Mutex<HashMap<u64, Arc<Slot>>>,
    next: AtomicU64,
}

/// A ring in the pool: its worker while the ring lives, and the two descriptors it is woken
/// by (kept here too, so that a late re-arm names a descriptor still open: never a number
/// reused by another ring).
struct Slot {
    worker: Mutex<Option<Worker>>,
    bell: Arc<OwnedFd>,
    wake: Arc<OwnedFd>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Readable, and reported to one thread until re-armed.
fn interest() -> epoll::EventFlags {
    epoll::EventFlags::IN | epoll::EventFlags::ONESHOT
}

impl Pool {
    /// The broker's pool, started (`ring.threads` threads, pinned to `ring.cpu` if set) the
    /// first time.
    pub(super) fn get(options: &RingConfig) -> io::Result<Arc<Pool>> {
        let mut pool = lock(&POOL);
        if let Some(pool) = &*pool {
            return Ok(pool.clone());
        }
        let new = Arc::new(Pool {
            epoll: epoll::create(epoll::CreateFlags::CLOEXEC)?,
            rings: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
        });
        let threads = options.threads();
        for index in 0..threads {
            let serving = new.clone();
            let cpu = options.cpu;
            let spawned = std::thread::Builder::new()
                .name(format!("ring-pool-{index}"))
                .spawn(move || {
                    if let Some(cpu) = cpu {
                        super::pin_to(cpu);
                    }
                    crate::sandbox::enter_role(crate::sandbox::seccomp::Role::Ring);
                    serving.serve();
                });
            match spawned {
                Ok(_) => {}
                Err(e) if index == 0 => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, started = index, wanted = threads, "fewer ring threads than configured");
                    break;
                }
            }
        }
        *pool = Some(new.clone());
        Ok(new)
    }

    /// Takes a ring; its first turn comes at once.
    pub(super) fn add(&self, worker: Worker) -> io::Result<()> {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        let slot = Arc::new(Slot {
            bell: worker.bell.clone(),
            wake: worker.wake.clone(),
            worker: Mutex::new(Some(worker)),
        });
        lock(&self.rings).insert(key, slot.clone());
        let data = epoll::EventData::new_u64(key);
        let registered = epoll::add(&self.epoll, &*slot.bell, data, interest())
            .and_then(|()| epoll::add(&self.epoll, &*slot.wake, data, interest()));
        if let Err(e) = registered {
            self.forget(key, &slot);
            return Err(e.into());
        }
        if let Err(e) = portcullis_ring::wake::ring(&*slot.wake) {
            self.forget(key, &slot);
            return Err(e);
        }
        Ok(())
    }

    fn serve(&self) {
        let mut events = Vec::with_capacity(1);
        loop {
            events.clear();
            match epoll::wait(&self.epoll, rustix::buffer::spare_capacity(&mut events), None) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => {
                    tracing::error!(error = %e, "a ring thread cannot wait: it stops");
                    return;
                }
            }
            for event in &events {
                self.take_turn(event.data.u64());
            }
        }
    }

    /// One turn on ring `key`, unless another thread is on it or it has ended.
    fn take_turn(&self, key: u64) {
        let Some(slot) = lock(&self.rings).get(&key).cloned() else {
            return;
        };
        let Ok(mut held) = slot.worker.try_lock() else {
            return;
        };
        let Some(worker) = held.as_mut() else {
            return;
        };
        let turn = std::panic::catch_unwind(AssertUnwindSafe(|| worker.turn()))
            .unwrap_or_else(|_| Turn::Ended(Some((Status::Internal, "the ring's worker failed".to_string()))));
        match turn {
            Turn::Parked => {
                drop(held);
                let data = epoll::EventData::new_u64(key);
                for fd in [&slot.bell, &slot.wake] {
                    // A ring that ended meanwhile is no longer registered (ENOENT).
                    let _ = epoll::modify(&self.epoll, &**fd, data, interest());
                }
            }
            Turn::Ended(reason) => {
                let worker = held.take();
                drop(held);
                self.forget(key, &slot);
                if let Some(worker) = worker {
                    worker.finish(reason);
                }
            }
        }
    }

    fn forget(&self, key: u64, slot: &Slot) {
        lock(&self.rings).remove(&key);
        for fd in [&slot.bell, &slot.wake] {
            let _ = epoll::delete(&self.epoll, &**fd);
        }
    }
}
