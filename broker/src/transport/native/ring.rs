//! The shared-memory ring (layout: `portcullis_proto::ring`; memory: `portcullis-ring`).
//!
//! A ring's worker copies each submission out of the mapping once, decodes and validates the
//! copy, executes it on the session, and writes completions (responses and events) to the
//! completion ring. The mapping is hostile: an index past the ring, a record that claims more
//! than was published, or a record that is not a request ends this session (a `Goodbye` in the
//! ring and on the socket, and a log line); other sessions don't notice.
//!
//! Rings that sleep (`adaptive`, `sleep`) are served in turns by a bounded pool of threads
//! ([`super::pool`]): a turn runs while the ring has work, spins for `spin_us`, and parks the
//! ring until its doorbell or the broker's own eventfd is rung, so an idle ring costs no thread
//! and no CPU, however many there are. A ring that never sleeps (`spin`) has a thread of its own.
//!
//! Memory stays bounded when a client stops reading completions: completions wait in a
//! backlog of at most [`BACKLOG_BYTES`], and while anything waits no new submission is taken,
//! so the client's own submission ring fills and it is the client that waits. Asynchronous
//! completions are bounded by the per-session pending-call limit, events by the inbox.

use std::{
    collections::VecDeque,
    os::fd::OwnedFd,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use portcullis_proto::{
    Status,
    frame::{ClientFrame, Event, MAX_FRAME, Request, RequestFrame, ServerFrame, encode, encode_to},
    ring::{RingError, RingSize, WaitMode},
};
use portcullis_ring::{Consumer, Mapping, Producer, wake};
use tokio::sync::{Semaphore, oneshot};

use super::codec;
use crate::{
    config::RingConfig,
    session::{Core, Live, Refusal, Session, Started, accounts::Held},
};

/// Most submissions taken per wake-up before completions are flushed.
const BATCH: usize = 256;
/// Most completion bytes waiting for room in the completion ring.
const BACKLOG_BYTES: usize = 256 << 10;
/// Frames (asynchronous completions, events) queued for the ring thread.
const INBOX: usize = 1024;
/// Longest a pool thread serves one busy ring before it lets the others have a turn.
const SLICE: Duration = Duration::from_millis(1);

thread_local! {
    /// The submission being decoded and the completion being encoded, per serving thread
    /// rather than per ring: an idle ring holds no buffer.
    static BUFFERS: std::cell::RefCell<Buffers> = std::cell::RefCell::new(Buffers {
        record: Vec::new(),
        scratch: vec![0; MAX_FRAME].into_boxed_slice(),
    });
}

struct Buffers {
    /// The submission being decoded, copied out of the ring.
    record: Vec<u8>,
    /// Where completions are encoded before they go to the ring.
    scratch: Box<[u8]>,
}

/// Frames (asynchronous completions, events) on their way to a ring's thread, at most
/// [`INBOX`]. Not a tokio channel: one allocates its first block of 32 slots and its
/// cache-padded state when it is made (about 1.5 KiB), which every idle ring kept; this queue
/// allocates when a frame comes. Closed when the ring's worker goes: frames are refused then.
#[derive(Debug)]
struct Inbox {
    frames: Mutex<VecDeque<Vec<u8>>>,
    /// Free places: a sender takes one per frame, the worker gives it back when it takes it.
    room: Semaphore,
}

impl Inbox {
    fn new() -> Arc<Inbox> {
        Arc::new(Inbox {
            frames: Mutex::new(VecDeque::new()),
            room: Semaphore::new(INBOX),
        })
    }

    fn frames(&self) -> MutexGuard<'_, VecDeque<Vec<u8>>> {
        self.frames.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues `frame` if there is room; `false` if the inbox is full or closed.
    fn try_push(&self, frame: Vec<u8>) -> bool {
        self.room.try_acquire().map(|place| self.fill(place, frame)).is_ok()
    }

    /// Queues `frame` once there is room; `false` if the inbox is closed.
    async fn push(&self, frame: Vec<u8>) -> bool {
        self.room.acquire().await.map(|place| self.fill(place, frame)).is_ok()
    }

    /// Puts `frame` in the place taken for it, which `pop` gives back.
    fn fill(&self, place: tokio::sync::SemaphorePermit<'_>, frame: Vec<u8>) {
        place.forget();
        self.frames().push_back(frame);
    }

    /// The oldest frame, its place given back. Without a lock while nothing is queued: a
    /// spinning ring looks at every pass.
    fn pop(&self) -> Option<Vec<u8>> {
        if self.is_empty() {
            return None;
        }
        let mut frames = self.frames();
        let frame = frames.pop_front()?;
        if frames.is_empty() && frames.capacity() > 8 {
            // A burst's room goes back once it is over: an idle ring keeps room for 8 frames
            // at most (192 bytes), not for the most it ever had queued.
            frames.shrink_to(8);
        }
        drop(frames);
        self.room.add_permits(1);
        Some(frame)
    }

    /// Whether no frame is queued or on its way (a sender holding a place it has not filled
    /// yet counts as one on its way). One atomic load.
    fn is_empty(&self) -> bool {
        self.room.available_permits() == INBOX || self.room.is_closed()
    }

    /// No more frames: senders waiting for room, and later ones, are refused.
    fn close(&self) {
        self.room.close();
        self.frames().clear();
    }
}

/// The tokio side's handle on a running ring.
#[derive(Debug)]
pub(super) struct RingHandle {
    inbox: Arc<Inbox>,
    wake: Arc<OwnedFd>,
    closed: Arc<AtomicBool>,
    ended: Option<oneshot::Receiver<Option<(Status, String)>>>,
    lost: u64,
}

/// What `EnableRing` answers: the sizes, and the memfd and the client's end of the doorbell
/// socket pair (twice: the descriptor it rings the broker on, and the one it waits on).
pub(super) struct Enabled {
    pub(super) handle: RingHandle,
    pub(super) sq_size: u32,
    pub(super) cq_size: u32,
    pub(super) fds: [OwnedFd; 3],
}

/// Creates a ring for `session` and hands it to the pool (or, for `spin`, a thread of its own).
pub(super) fn start(
    core: &Core,
    session: &Arc<Mutex<Session>>,
    sq_size: u32,
    cq_size: u32,
    options: RingConfig,
) -> Result<Enabled, Refusal> {
    let bad = |e: RingError| Refusal::new(Status::BadArgument, e.to_string());
    let sq = RingSize::requested(sq_size).map_err(bad)?;
    let cq = RingSize::requested(cq_size).map_err(bad)?;
    let live = core.admit_ring(options.max_rings).ok_or_else(|| {
        Refusal::new(
            Status::NoMemory,
            format!(
                "the broker serves at most {} rings at once; stay on the socket",
                options.max_rings
            ),
        )
    })?;
    let account = session
        .lock()
        .map(|s| s.account().clone())
        .map_err(|_| Refusal::new(Status::Internal, "the session was poisoned"))?;
    let held = account.take_ring().ok_or_else(|| {
        Refusal::new(
            Status::NoMemory,
            format!(
                "{} already holds {} rings, the most one user may (limits.max_rings_per_uid); stay on the socket",
                account.key(),
                account.limits().max_rings_per_uid
            ),
        )
    })?;
    let os = |e: std::io::Error| Refusal::new(Status::NoMemory, format!("cannot create the ring: {e}"));
    let peer = session
        .lock()
        .map(|s| (s.peer().uid, s.peer().pid_text()))
        .unwrap_or_default();
    let Built {
        mut worker,
        client_fds,
        inbox,
        wake,
        closed,
    } = Worker::build(session.clone(), sq, cq, options, (live, Some(held))).map_err(os)?;
    let (ended_tx, ended) = oneshot::channel();
    worker.ended = Some(ended_tx);
    worker.peer = peer;
    if options.wait == WaitMode::Spin {
        std::thread::Builder::new()
            .name(format!("ring-{}", worker.peer.0))
            .spawn(move || {
                if let Some(cpu) = options.cpu {
                    pin_to(cpu);
                }
                crate::sandbox::enter_role(crate::sandbox::seccomp::Role::Ring);
                worker.serve_alone();
            })
            .map_err(os)?;
    } else {
        super::pool::Pool::get(&options)
            .and_then(|pool| pool.add(worker))
            .map_err(os)?;
    }
    Ok(Enabled {
        handle: RingHandle {
            inbox,
            wake,
            closed,
            ended: Some(ended),
            lost: 0,
        },
        sq_size: sq.get(),
        cq_size: cq.get(),
        fds: client_fds,
    })
}

/// Pins the calling thread to one CPU; a CPU this machine lacks is logged and ignored.
pub fn pin_to(cpu: usize) {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    if let Err(e) = rustix::thread::sched_setaffinity(None, &set) {
        tracing::warn!(cpu, error = %e, "cannot pin the ring thread");
    }
}

impl RingHandle {
    /// Queues frames (events) for the completion ring. Frames that find the inbox full are
    /// counted and reported as one `Lost` event once there is room again.
    pub(super) fn deliver(&mut self, frames: impl IntoIterator<Item = ServerFrame>) {
        for frame in frames {
            if self.lost > 0 {
                let lost = ServerFrame::Event(Event::Lost { count: self.lost });
                match encode(&lost).map(|b| self.inbox.try_push(b)) {
                    Some(true) => self.lost = 0,
                    _ => {
                        self.lost += 1;
                        continue;
                    }
                }
            }
            match encode(&frame).map(|b| self.inbox.try_push(b)) {
                Some(true) => {}
                _ => self.lost += 1,
            }
        }
        ring_private(&self.wake);
    }

    /// Resolves when the ring's thread has ended by itself: `Some((status, reason))` when the
    /// client broke the ring or its session must end.
    pub(super) async fn ended(&mut self) -> Option<(Status, String)> {
        match self.ended.as_mut() {
            Some(ended) => {
                let reason = ended.await.ok().flatten();
                self.ended = None;
                reason
            }
            None => std::future::pending().await,
        }
    }

    /// Stops the thread and waits until it has released the ring.
    pub(super) async fn stop(mut self) {
        self.closed.store(true, Ordering::Release);
        ring_private(&self.wake);
        if let Some(ended) = self.ended.take()
            && tokio::time::timeout(Duration::from_secs(5), ended).await.is_err()
        {
            tracing::error!("a ring thread did not stop within 5 s");
        }
    }
}

/// Why a ring ends.
#[derive(Debug, thiserror::Error)]
enum Broken {
    /// An index or record header is wrong.
    #[error(transparent)]
    Ring(#[from] RingError),
    /// A record that does not decode as a request.
    #[error("submission record: {0}")]
    Record(String),
    /// The session must end (its process became another program).
    #[error("{0}")]
    Session(Refusal),
    /// The client's doorbell cannot be rung.
    #[error("the client's doorbell: {0}")]
    Doorbell(std::io::Error),
}

impl Broken {
    fn status(&self) -> Status {
        match self {
            Broken::Session(refusal) => refusal.status,
            Broken::Ring(_) | Broken::Record(_) => Status::ProtocolError,
            Broken::Doorbell(_) => Status::Internal,
        }
    }
}

/// What a turn on a ring ended with.
pub(super) enum Turn {
    /// Nothing to do, or another ring's turn: serve again once the doorbell or the private
    /// eventfd is readable.
    Parked,
    /// The ring is over: `Some((status, reason))` when the client broke it.
    Ended(Option<(Status, String)>),
}

pub(super) struct Worker {
    map: Mapping,
    sq: Consumer,
    cq: Producer,
    /// The broker's end of the doorbell socket pair (the client has the other): the client
    /// rings the broker through it, and the broker the client.
    pub(super) bell: Arc<OwnedFd>,
    session: Arc<Mutex<Session>>,
    inbox: Arc<Inbox>,
    /// The broker's private eventfd: its tasks ring it when they queue a frame or close the
    /// ring.
    pub(super) wake: Arc<OwnedFd>,
    closed: Arc<AtomicBool>,
    backlog: VecDeque<Vec<u8>>,
    backlog_bytes: usize,
    options: RingConfig,
    runtime: tokio::runtime::Handle,
    /// Told why the ring ended, once it has.
    ended: Option<oneshot::Sender<Option<(Status, String)>>>,
    /// The client's uid and pid, for the log.
    peer: (u32, String),
    /// Counts the ring in the broker's total and against its identity's bound.
    _live: (Live, Option<Held>),
}

impl Drop for Worker {
    /// The ring is over: frames still on their way to it are refused, not kept.
    fn drop(&mut self) {
        self.inbox.close();
    }
}

/// A new ring's worker, and what the client and the tokio side keep of it.
struct Built {
    worker: Worker,
    /// The memfd, and the client's end of the doorbell pair twice.
    client_fds: [OwnedFd; 3],
    inbox: Arc<Inbox>,
    wake: Arc<OwnedFd>,
    closed: Arc<AtomicBool>,
}

impl Worker {
    /// Creates the ring's memory and eventfds and a worker to serve it for `session`.
    fn build(
        session: Arc<Mutex<Session>>,
        sq: RingSize,
        cq: RingSize,
        options: RingConfig,
        live: (Live, Option<Held>),
    ) -> std::io::Result<Built> {
        let (memfd, map) = Mapping::create(sq, cq)?;
        let (bell, client_bell) = wake::broker_doorbell()?;
        let wake = Arc::new(wake::eventfd()?);
        // The client's doorbell, third in `EnableRing`'s answer, is its end of the same pair.
        let client_fds = [memfd, client_bell.try_clone()?, client_bell];
        let inbox = Inbox::new();
        let closed = Arc::new(AtomicBool::new(false));
        let worker = Worker {
            sq: Consumer::new("submission", sq),
            cq: Producer::new("completion", cq),
            map,
            bell: Arc::new(bell),
            session,
            inbox: inbox.clone(),
            wake: wake.clone(),
            closed: closed.clone(),
            backlog: VecDeque::new(),
            backlog_bytes: 0,
            options,
            runtime: tokio::runtime::Handle::current(),
            ended: None,
            peer: (0, String::new()),
            _live: live,
        };
        Ok(Built {
            worker,
            client_fds,
            inbox,
            wake,
            closed,
        })
    }

    /// Serves until there is nothing to do (after spinning `spin_us` in `adaptive`), another
    /// ring should have a turn (after [`SLICE`] of work, in a pool), or the ring is over. A
    /// parked ring has announced its sleep: the client rings its doorbell for what it
    /// publishes next.
    pub(super) fn turn(&mut self) -> Turn {
        let _runtime = self.runtime.enter();
        wake::wake_up(&self.map.header().broker_sleeping.0);
        let spin = Duration::from_micros(self.options.spin_us);
        let pooled = self.options.wait != WaitMode::Spin;
        let started = Instant::now();
        // When the ring went idle; the clock is read only once there is nothing to do.
        let mut idle_since: Option<Instant> = None;
        loop {
            if self.closed.load(Ordering::Acquire) {
                return Turn::Ended(None);
            }
            match self.step() {
                Err(broken) => {
                    let (status, reason) = (broken.status(), broken.to_string());
                    self.goodbye(status, &reason);
                    return Turn::Ended(Some((status, reason)));
                }
                Ok(true) => {
                    idle_since = None;
                    if pooled && started.elapsed() >= SLICE {
                        // Still busy: the private eventfd stays readable, so the ring comes
                        // round again after the others waiting.
                        ring_private(&self.wake);
                        return Turn::Parked;
                    }
                    continue;
                }
                Ok(false) => {}
            }
            let sleep = match self.options.wait {
                WaitMode::Spin => false,
                WaitMode::Sleep => true,
                WaitMode::Adaptive => idle_since.get_or_insert_with(Instant::now).elapsed() >= spin,
            };
            if !sleep {
                std::hint::spin_loop();
                continue;
            }
            // What is unread was rung before this sleep was announced: its work is seen by the
            // check below. What is rung after stays readable and serves the ring again.
            wake::drain_broker(&*self.bell);
            wake::drain(&*self.wake);
            let header = self.map.header();
            let (sq, cq, inbox, closed) = (&self.sq, &self.cq, &self.inbox, &self.closed);
            let backlog = !self.backlog.is_empty();
            // Queued events are work only while the backlog has room for them: a client that
            // never drains its ring must not keep a thread spinning.
            let takes_inbox = self.backlog_bytes < BACKLOG_BYTES;
            let waiting_for = if backlog { wake::ON_ROOM } else { wake::ON_RECORDS };
            let parked = wake::park_unless(&header.broker_sleeping.0, waiting_for, || {
                closed.load(Ordering::Acquire)
                    || (takes_inbox && !inbox.is_empty())
                    || if backlog {
                        cq.head_moved(&header.cq_head.0)
                    } else {
                        sq.has_more(&header.sq_tail.0)
                    }
            });
            if parked {
                return Turn::Parked;
            }
        }
    }

    /// Serves on this thread alone (a `spin` ring), waiting on the two descriptors whenever
    /// the ring parks.
    fn serve_alone(mut self) {
        loop {
            match self.turn() {
                Turn::Ended(reason) => return self.finish(reason),
                Turn::Parked => {
                    use rustix::event::{PollFd, PollFlags};
                    let mut fds = [
                        PollFd::new(&*self.bell, PollFlags::IN),
                        PollFd::new(&*self.wake, PollFlags::IN),
                    ];
                    if let Err(e) = rustix::event::poll(&mut fds, None)
                        && e != rustix::io::Errno::INTR
                    {
                        tracing::error!(error = %e, "a ring thread cannot wait");
                        return self.finish(Some((Status::Internal, format!("the ring cannot wait: {e}"))));
                    }
                }
            }
        }
    }

    /// Logs why the ring ended, tells the socket side and lets the ring go.
    pub(super) fn finish(mut self, reason: Option<(Status, String)>) {
        if let Some((status, reason)) = &reason {
            tracing::warn!(uid = self.peer.0, pid = %self.peer.1, %status, %reason, "ring session ended");
        }
        if let Some(ended) = self.ended.take() {
            let _ = ended.send(reason);
        }
    }

    /// One pass: take queued frames, take submissions (unless completions wait), flush
    /// completions. Returns whether anything moved.
    fn step(&mut self) -> Result<bool, Broken> {
        let mut progress = false;
        while self.backlog_bytes < BACKLOG_BYTES {
            match self.inbox.pop() {
                Some(frame) => {
                    self.push_backlog(frame);
                    progress = true;
                }
                None => break,
            }
        }
        let mut pushed = false;
        if self.backlog.is_empty() {
            progress |= self.take_submissions(&mut pushed)?;
        }
        let header = self.map.header();
        while let Some(front) = self.backlog.front() {
            if !self.cq.push(self.map.cq(), &header.cq_head.0, front)? {
                break;
            }
            self.backlog_bytes -= front.len();
            self.backlog.pop_front();
            pushed = true;
        }
        if pushed && self.cq.publish(&header.cq_tail.0) {
            wake::wake_if(&header.client_sleeping.0, wake::ON_RECORDS, || {
                wake::ring_client(&*self.bell)
            })
            .map_err(Broken::Doorbell)?;
            progress = true;
        }
        Ok(progress)
    }

    /// Executes submissions; their completions go straight to the completion ring while it
    /// has room (`pushed` says so), to the backlog after that.
    fn take_submissions(&mut self, pushed: &mut bool) -> Result<bool, Broken> {
        BUFFERS.with_borrow_mut(|buffers| self.take_submissions_with(pushed, buffers))
    }

    fn take_submissions_with(&mut self, pushed: &mut bool, buffers: &mut Buffers) -> Result<bool, Broken> {
        let header = self.map.header();
        let mut taken = 0;
        let mut session: Option<MutexGuard<'_, Session>> = None;
        let mut out = Outbox {
            backlog: &mut self.backlog,
            bytes: &mut self.backlog_bytes,
            cq: &mut self.cq,
            map: &self.map,
            pushed,
            scratch: &mut buffers.scratch,
        };
        let record = &mut buffers.record;
        while taken < BATCH && *out.bytes < BACKLOG_BYTES {
            if !self.sq.pop(self.map.sq(), &header.sq_tail.0, record)? {
                break;
            }
            taken += 1;
            if crate::capture::enabled() {
                crate::capture::record("ring_records", &fuzz_seed(record));
            }
            let frame = ClientFrame::decode(record).map_err(|e| Broken::Record(e.to_string()))?;
            let ClientFrame::Request(RequestFrame { id, request }) = frame else {
                return Err(Broken::Record("a Hello inside the ring".into()));
            };
            let session = match &mut session {
                Some(s) => s,
                None => session.insert(super::locked(&self.session)),
            };
            execute(session, id, request, &mut out, &self.inbox, &self.wake);
            if let Some(ended) = session.end_reason() {
                let ended = Broken::Session(ended.clone());
                // The refusal itself must reach the client before the goodbye.
                self.sq.publish(&header.sq_head.0);
                return Err(ended);
            }
        }
        if taken > 0 {
            self.sq.publish(&header.sq_head.0);
            wake::wake_if(&header.client_sleeping.0, wake::ON_ROOM, || {
                wake::ring_client(&*self.bell)
            })
            .map_err(Broken::Doorbell)?;
        }
        Ok(taken > 0)
    }

    fn push_backlog(&mut self, frame: Vec<u8>) {
        self.backlog_bytes += frame.len();
        self.backlog.push_back(frame);
    }

    /// Best effort: a `Goodbye` in the completion ring before it is abandoned.
    fn goodbye(&mut self, status: Status, reason: &str) {
        let header = self.map.header();
        // Completions already written go first.
        while let Some(front) = self.backlog.front() {
            if !matches!(self.cq.push(self.map.cq(), &header.cq_head.0, front), Ok(true)) {
                break;
            }
            self.backlog_bytes -= front.len();
            self.backlog.pop_front();
        }
        let frame = ServerFrame::Goodbye {
            status: status.code(),
            reason: reason.to_string(),
        };
        let header = self.map.header();
        if let Some(bytes) = encode(&frame)
            && matches!(self.cq.push(self.map.cq(), &header.cq_head.0, &bytes), Ok(true))
        {
            self.cq.publish(&header.cq_tail.0);
            if let Err(e) = wake::ring_client(&*self.bell) {
                tracing::debug!(error = %e, "the goodbye's wake-up could not be rung");
            }
        }
    }
}

/// Where completions go: encoded in the scratch buffer, then straight into the completion
/// ring while nothing waits in the backlog and the ring has room (no allocation, one copy),
/// into the backlog otherwise, so that they stay in order.
struct Outbox<'a> {
    backlog: &'a mut VecDeque<Vec<u8>>,
    bytes: &'a mut usize,
    cq: &'a mut Producer,
    map: &'a Mapping,
    /// Whether anything was pushed to the completion ring (not yet published).
    pushed: &'a mut bool,
    scratch: &'a mut [u8],
}

impl Outbox<'_> {
    fn frame(&mut self, frame: &ServerFrame) {
        let Some(bytes) = encode_to(frame, self.scratch) else {
            tracing::error!("a completion too large to encode was dropped");
            return;
        };
        // An error (a corrupt head) leaves the frame to the backlog, whose flush meets the same
        // error and ends the ring.
        if self.backlog.is_empty()
            && matches!(
                self.cq.push(self.map.cq(), &self.map.header().cq_head.0, bytes),
                Ok(true)
            )
        {
            *self.pushed = true;
            return;
        }
        *self.bytes += bytes.len();
        self.backlog.push_back(bytes.to_vec());
    }
}

fn refusal(id: u64, status: Status, message: &str) -> ServerFrame {
    codec::response(id, Err(Refusal::new(status, message))).0
}

/// Executes one request from the ring; its completion goes to the backlog now, or through
/// the inbox when an asynchronous method completes.
fn execute(
    session: &mut Session,
    id: u64,
    request: Request,
    out: &mut Outbox<'_>,
    inbox: &Arc<Inbox>,
    wake: &Arc<OwnedFd>,
) {
    let command = match request {
        Request::EnableRing { .. } => {
            return out.frame(&refusal(id, Status::BadArgument, "the ring is already enabled"));
        }
        Request::MapMemory { .. } => {
            return out.frame(&refusal(
                id,
                Status::Unsupported,
                "descriptors cannot travel through the ring: map memory over the socket",
            ));
        }
        request => match codec::command(request) {
            Some(command) => command,
            None => return out.frame(&refusal(id, Status::Unsupported, "not over the ring")),
        },
    };
    let started = session.execute(command);
    for event in session.take_outbox() {
        if let Some(frame) = codec::event(event) {
            out.frame(&frame);
        }
    }
    match started {
        Started::Now(result) => out.frame(&codec::response(id, result).0),
        Started::Later(pending) => {
            let inbox = inbox.clone();
            let wake = wake.clone();
            tokio::spawn(async move {
                let frame = codec::response(id, pending.await).0;
                if let Some(bytes) = encode(&frame)
                    && inbox.push(bytes).await
                {
                    ring_private(&wake);
                }
            });
        }
    }
}

/// Rings the ring thread's private eventfd (the broker's own: a failure is a bug, logged).
fn ring_private(fd: &OwnedFd) {
    if let Err(e) = wake::ring(fd) {
        tracing::error!(error = %e, "cannot wake a ring thread");
    }
}

/// A `ring_records` seed holding one record: the tail word, then the record as it lies in a ring.
fn fuzz_seed(payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    let mut seed = portcullis_proto::ring::record_span(len).to_ne_bytes().to_vec();
    seed.extend_from_slice(&portcullis_proto::ring::header(len));
    seed.extend_from_slice(payload);
    seed.resize(4 + portcullis_proto::ring::record_span(len) as usize, 0);
    seed
}

/// Fuzzing: `data` (tail word, then ring contents) as the submission ring of a ring served by
/// the real worker, stepped until it has nothing left to do or ends the ring. Returns the
/// completion records it wrote.
#[doc(hidden)]
pub fn fuzz_ring(core: &Core, session: Session, data: &[u8]) -> Vec<Vec<u8>> {
    let Some((tail, contents)) = data.split_first_chunk::<4>() else {
        return Vec::new();
    };
    let Ok(size) = RingSize::requested(portcullis_proto::ring::MIN_RING) else {
        return Vec::new();
    };
    let Some(live) = core.admit_ring(usize::MAX) else {
        return Vec::new();
    };
    let Ok(Built { mut worker, .. }) = Worker::build(
        Arc::new(Mutex::new(session)),
        size,
        size,
        RingConfig::default(),
        (live, None),
    ) else {
        return Vec::new();
    };
    for (word, chunk) in worker.map.sq().iter().zip(contents.chunks(8)) {
        let mut bytes = [0u8; 8];
        bytes.get_mut(..chunk.len()).unwrap_or_default().copy_from_slice(chunk);
        word.store(u64::from_ne_bytes(bytes), Ordering::Relaxed);
    }
    worker
        .map
        .header()
        .sq_tail
        .0
        .store(u32::from_ne_bytes(*tail), Ordering::Release);
    let mut completions = Vec::new();
    let mut reader = Consumer::new("completion", size);
    for _ in 0..64 {
        let progress = match worker.step() {
            Ok(progress) => progress,
            Err(broken) => {
                worker.goodbye(broken.status(), &broken.to_string());
                false
            }
        };
        let header = worker.map.header();
        let mut record = Vec::new();
        while matches!(reader.pop(worker.map.cq(), &header.cq_tail.0, &mut record), Ok(true)) {
            completions.push(std::mem::take(&mut record));
        }
        reader.publish(&header.cq_head.0);
        if !progress {
            break;
        }
    }
    completions
}

#[cfg(test)]
mod tests {
    use super::{INBOX, Inbox};

    /// The inbox holds at most INBOX frames, gives them in order, makes room as they are taken,
    /// and refuses everything once closed, a sender waiting for room included.
    #[tokio::test]
    async fn the_inbox_is_bounded_ordered_and_closes() {
        let inbox = Inbox::new();
        assert!(inbox.is_empty());
        for i in 0..INBOX {
            assert!(inbox.try_push(i.to_le_bytes().to_vec()), "frame {i} refused");
        }
        assert!(!inbox.try_push(vec![0]), "a frame past the bound was taken");
        assert!(!inbox.is_empty());
        // A sender waiting for room gets it when the worker takes a frame.
        let waiting = tokio::spawn({
            let inbox = inbox.clone();
            async move { inbox.push(b"late".to_vec()).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "a sender went past a full inbox");
        assert_eq!(inbox.pop(), Some(0usize.to_le_bytes().to_vec()));
        assert!(waiting.await.unwrap(), "the waiting sender was refused");
        for i in 1..INBOX {
            assert_eq!(inbox.pop(), Some(i.to_le_bytes().to_vec()));
        }
        assert_eq!(inbox.pop(), Some(b"late".to_vec()));
        assert_eq!(inbox.pop(), None);
        assert!(inbox.is_empty());
        assert!(inbox.frames().capacity() <= 8, "an emptied inbox kept its burst's room");

        // Full again, a sender waiting: closing refuses it and every later frame.
        for _ in 0..INBOX {
            assert!(inbox.try_push(vec![1]));
        }
        let waiting = tokio::spawn({
            let inbox = inbox.clone();
            async move { inbox.push(vec![2]).await }
        });
        tokio::task::yield_now().await;
        inbox.close();
        assert!(!waiting.await.unwrap(), "a sender waiting on a closed inbox was taken");
        assert!(!inbox.try_push(vec![3]));
        assert!(!inbox.push(vec![4]).await);
        assert!(inbox.frames().is_empty(), "a closed inbox kept its frames");
        assert!(inbox.is_empty() && inbox.pop().is_none());
    }
}
