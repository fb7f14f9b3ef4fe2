//! The net device: a TUN interface created when the broker starts (and gone when it stops: it is
//! not persistent). A reader task takes every packet the interface sends and gives each open
//! user client a copy, into a bounded queue of its own.

use std::{
    collections::{HashMap, VecDeque},
    os::fd::{AsFd, OwnedFd},
    sync::{
        Arc, LazyLock, Mutex,
        atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use portcullis_proto::Status;
use rustix::{
    fs::{Mode, OFlags},
    io::Errno,
    net::{AddressFamily, SocketFlags, SocketType},
};
use tokio::{io::unix::AsyncFd, sync::Notify, time::Instant};

use super::{
    methods::{LAYOUTS, MAX_TIMEOUT_MS, PACKET_MAX, QUEUE_BYTES, QUEUE_PACKETS, Selector, TABLE},
    sys,
};
use crate::{
    driver::{
        CallArgs, CallContext, CallOutput, CallResult, ClientKey, Completion, Driver, DriverError, DriverLive, Family,
        MethodSpec, NativeStruct,
    },
    registry::OpenMode,
};

/// The net family.
pub static FAMILY: LazyLock<Family> = LazyLock::new(|| Family::new("net", "NetDevice", LAYOUTS, &TABLE, &[]));

static INFO: LazyLock<NativeStruct> = LazyLock::new(|| NativeStruct::of(FAMILY.schema(), "net_info"));

/// One user client's packets.
#[derive(Debug, Default)]
struct Queue {
    packets: VecDeque<Vec<u8>>,
    bytes: usize,
    /// Packets dropped since the last `recv_packet` took one.
    dropped: u64,
    arrived: Arc<Notify>,
}

impl Queue {
    fn push(&mut self, packet: &[u8]) {
        if self.packets.len() >= QUEUE_PACKETS || self.bytes + packet.len() > QUEUE_BYTES {
            self.dropped += 1;
            return;
        }
        self.bytes += packet.len();
        self.packets.push_back(packet.to_vec());
        self.arrived.notify_one();
    }
}

/// The user clients' queues, and the buffer packets are read into.
#[derive(Debug)]
struct State {
    queues: HashMap<ClientKey, Queue>,
    buf: Vec<u8>,
}

/// What the TUN reader and the calls share: packets are taken from the interface by whoever
/// comes first — a `recv_packet` finding its queue empty, or the reader task woken by the
/// interface — always under the one lock, so that every queue sees them in order.
#[derive(Debug)]
struct Shared {
    name: String,
    tun: Arc<OwnedFd>,
    state: Mutex<State>,
    /// Set when the service terminates or the interface goes away: ends the reader and every
    /// waiting call.
    stopped: tokio::sync::watch::Sender<bool>,
    /// A call started waiting: the reader must watch the interface now.
    wanted: Notify,
    /// How many times calls pumped the interface (the reader steps aside while they do).
    call_pumps: AtomicU64,
}

/// Packets one pump takes at most before it lets others have the lock.
const PUMP_BATCH: usize = 64;

/// How long the reader leaves the interface to the calls once they take its packets first.
const STAND_ASIDE: Duration = Duration::from_millis(1);

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads what the interface has (up to a batch) into every queue, stopping early once
    /// `until`'s queue holds a packet. Returns the packets read and whether the interface said
    /// it has no more. An error ends the device: waiting calls learn it is gone.
    fn pump(&self, state: &mut State, until: Option<ClientKey>) -> Result<(usize, bool), DriverError> {
        let State { queues, buf } = state;
        for read in 0..PUMP_BATCH {
            match rustix::io::read(&*self.tun, &mut buf[..]) {
                Ok(n) => {
                    let packet = buf.get(..n).unwrap_or_default();
                    for queue in queues.values_mut() {
                        queue.push(packet);
                    }
                    if until
                        .and_then(|c| queues.get(&c))
                        .is_some_and(|q| !q.packets.is_empty())
                    {
                        return Ok((read + 1, false));
                    }
                }
                Err(Errno::AGAIN) => return Ok((read, true)),
                Err(Errno::INTR) => {}
                Err(e) => {
                    let error = failure(&self.name, "read", e);
                    if !self.stopped.send_replace(true) {
                        tracing::warn!(interface = self.name, error = %error, "the TUN interface fails; the device stops");
                    }
                    return Err(error);
                }
            }
        }
        Ok((PUMP_BATCH, false))
    }
}

/// One TUN interface.
#[derive(Debug)]
pub struct NetDevice {
    name: String,
    shared: Arc<Shared>,
    /// For the interface ioctls.
    control: OwnedFd,
    /// The MTU last read from the interface (`send_packet` reads it again only when a packet
    /// exceeds it; `get_info` and `set_mtu` refresh it).
    mtu: AtomicU32,
    waiting: Arc<AtomicUsize>,
}

fn bad(message: impl Into<String>) -> DriverError {
    DriverError::new(Status::BadArgument, message)
}

/// A TUN descriptor whose interface was deleted says `EBADFD` (or `EIO`): the device is gone.
fn failure(name: &str, what: &str, e: Errno) -> DriverError {
    if e == Errno::BADFD || e == Errno::IO || e == Errno::NODEV || e == Errno::NXIO {
        return DriverError::new(Status::NoDevice, format!("interface {name} went away: {what}: {e}"));
    }
    DriverError::new(Status::Internal, format!("interface {name}: {what}: {e}"))
}

/// Creates the TUN interface `name` (down, not persistent: it goes with the descriptor, which
/// is non-blocking and close-on-exec); returns the descriptor and the name the kernel gave it.
pub fn open_tun(name: &str) -> Result<(OwnedFd, String), String> {
    let tun = rustix::fs::open(
        "/dev/net/tun",
        OFlags::RDWR | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("/dev/net/tun: {e}"))?;
    let given = sys::tun_set_iff(tun.as_fd(), name).map_err(|e| match e {
        Errno::BUSY => format!("interface {name} exists already (another program owns it)"),
        Errno::INVAL => format!("{name:?} is not an interface name (1 to 15 bytes)"),
        e => format!("cannot create TUN interface {name}: {e}"),
    })?;
    Ok((tun, given))
}

impl NetDevice {
    /// Creates the TUN interface `name` (down) and starts its reader. Needs a tokio runtime.
    pub fn create(name: &str) -> Result<NetDevice, String> {
        let (tun, given) = open_tun(name)?;
        let control = rustix::net::socket_with(AddressFamily::INET, SocketType::DGRAM, SocketFlags::CLOEXEC, None)
            .map_err(|e| format!("interface control socket: {e}"))?;
        let mtu = sys::mtu(control.as_fd(), &given).map_err(|e| format!("interface {given}: SIOCGIFMTU: {e}"))?;
        let shared = Arc::new(Shared {
            name: given.clone(),
            tun: Arc::new(tun),
            state: Mutex::new(State {
                queues: HashMap::new(),
                buf: vec![0u8; PACKET_MAX as usize],
            }),
            stopped: tokio::sync::watch::Sender::new(false),
            wanted: Notify::new(),
            call_pumps: AtomicU64::new(0),
        });
        // Registered here, in the runtime, so that a failure is the device's.
        let watch = watch_tun(&shared).map_err(|e| format!("/dev/net/tun: {e}"))?;
        let waiting = Arc::new(AtomicUsize::new(0));
        tokio::spawn(reader(shared.clone(), watch, waiting.clone()));
        Ok(NetDevice {
            name: given,
            shared,
            control,
            mtu: AtomicU32::new(mtu),
            waiting,
        })
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn failed(&self, what: &str, e: Errno) -> DriverError {
        failure(&self.name, what, e)
    }

    fn get_info(&self) -> CallResult {
        let fd = self.control.as_fd();
        let index = sys::index(fd, &self.name).map_err(|e| self.failed("SIOCGIFINDEX", e))?;
        let mtu = self.read_mtu()?;
        let flags = sys::flags(fd, &self.name).map_err(|e| self.failed("SIOCGIFFLAGS", e))?;
        let mut out = INFO.build(&[
            ("ifindex", u64::from(index)),
            ("mtu", u64::from(mtu)),
            ("flags", u64::from(flags)),
        ]);
        let name = self.name.as_bytes();
        if let Some(dst) = out.get_mut(..name.len().min(15)) {
            dst.copy_from_slice(name.get(..dst.len()).unwrap_or_default());
        }
        Ok(CallOutput {
            scalars: vec![],
            struct_out: out,
        })
    }

    fn set_up(&self, up: bool) -> CallResult {
        let fd = self.control.as_fd();
        let flags = sys::flags(fd, &self.name).map_err(|e| self.failed("SIOCGIFFLAGS", e))?;
        let up_flag = libc::IFF_UP as u16;
        let flags = if up { flags | up_flag } else { flags & !up_flag };
        sys::set_flags(fd, &self.name, flags).map_err(|e| self.failed("SIOCSIFFLAGS", e))?;
        Ok(CallOutput::default())
    }

    fn set_mtu(&self, mtu: u64) -> CallResult {
        // IPv4's minimum datagram (68) up to what one packet can be.
        if !(68..=u64::from(PACKET_MAX)).contains(&mtu) {
            return Err(bad(format!("mtu {mtu}: 68 to {PACKET_MAX}")));
        }
        sys::set_mtu(self.control.as_fd(), &self.name, mtu as u32).map_err(|e| match e {
            Errno::INVAL => bad(format!("interface {} refuses mtu {mtu}", self.name)),
            e => self.failed("SIOCSIFMTU", e),
        })?;
        self.read_mtu()?;
        Ok(CallOutput::default())
    }

    /// The interface's MTU, read now (and remembered).
    fn read_mtu(&self) -> Result<u32, DriverError> {
        let mtu = sys::mtu(self.control.as_fd(), &self.name).map_err(|e| self.failed("SIOCGIFMTU", e))?;
        self.mtu.store(mtu, Ordering::Relaxed);
        Ok(mtu)
    }

    fn send_packet(&self, packet: &[u8]) -> CallResult {
        // The MTU remembered serves while packets fit it; one that does not is measured against
        // the interface's MTU of now (raised since, perhaps, by another program).
        if packet.len() > self.mtu.load(Ordering::Relaxed) as usize {
            let mtu = self.read_mtu()?;
            if packet.len() > mtu as usize {
                return Err(bad(format!("a packet of {} bytes exceeds the MTU {mtu}", packet.len())));
            }
        }
        // A TUN write takes the whole packet at once, or nothing (a full queue: EAGAIN).
        match rustix::io::write(&*self.shared.tun, packet) {
            Ok(n) => Ok(CallOutput {
                scalars: vec![n as u64],
                struct_out: vec![],
            }),
            Err(Errno::AGAIN) => Err(DriverError::new(
                Status::NoMemory,
                format!("interface {} has no room for the packet now", self.name),
            )),
            Err(Errno::INVAL) => Err(bad("the kernel refused the packet (not a valid IP packet)")),
            Err(e) => Err(self.failed("write", e)),
        }
    }

    fn recv_packet(&self, client: ClientKey, timeout_ms: u64, room: usize) -> Completion {
        if timeout_ms > MAX_TIMEOUT_MS {
            return Completion::Ready(Err(bad(format!("timeout_ms {timeout_ms}: at most {MAX_TIMEOUT_MS}"))));
        }
        // A packet queued, or waiting on the interface, is answered now.
        let arrived = match take(&self.shared, client, room) {
            Taken::Done(result) => return Completion::Ready(result),
            Taken::Empty(arrived) => arrived,
        };
        let shared = self.shared.clone();
        let waiting = Waiting::new(&self.waiting);
        // The reader may have left the interface to the calls: this one waits, so it must watch.
        self.shared.wanted.notify_one();
        let mut stopped = self.shared.stopped.subscribe();
        let deadline = Instant::now() + Duration::from_millis(timeout_ms);
        Completion::Pending(Box::pin(async move {
            let _waiting = waiting;
            loop {
                let notified = arrived.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if *stopped.borrow_and_update() {
                    return Err(gone(&shared.name));
                }
                tokio::select! {
                    () = &mut notified => {}
                    () = tokio::time::sleep_until(deadline) => {
                        return Err(DriverError::new(Status::Timeout, "no packet arrived before the timeout"));
                    }
                    _ = stopped.changed() => {}
                }
                match take(&shared, client, room) {
                    Taken::Done(result) => return result,
                    // The same notifier: a user client's queue lives as long as it does.
                    Taken::Empty(_) => {}
                }
            }
        }))
    }
}

fn gone(name: &str) -> DriverError {
    DriverError::new(Status::NoDevice, format!("interface {name} went away"))
}

enum Taken {
    Done(CallResult),
    /// Nothing for the client yet: wait for this.
    Empty(Arc<Notify>),
}

/// The client's next packet: from its queue, or else from the interface (pumped now).
fn take(shared: &Shared, client: ClientKey, room: usize) -> Taken {
    let mut state = shared.state();
    let mut pumped = false;
    loop {
        let Some(queue) = state.queues.get_mut(&client) else {
            return Taken::Done(Err(DriverError::new(Status::Aborted, "the user client closed")));
        };
        if let Some(packet) = queue.packets.pop_front() {
            queue.bytes -= packet.len();
            let dropped = std::mem::take(&mut queue.dropped);
            if packet.len() > room {
                return Taken::Done(Err(bad(format!(
                    "a {}-byte packet does not fit the {room} bytes given for it (it is dropped)",
                    packet.len()
                ))));
            }
            return Taken::Done(Ok(CallOutput {
                scalars: vec![dropped],
                struct_out: packet,
            }));
        }
        if *shared.stopped.borrow() {
            return Taken::Done(Err(gone(&shared.name)));
        }
        if pumped {
            return Taken::Empty(queue.arrived.clone());
        }
        pumped = true;
        shared.call_pumps.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = shared.pump(&mut state, Some(client)) {
            return Taken::Done(Err(e));
        }
    }
}

/// Counts a waiting call for as long as it waits.
struct Waiting(Arc<AtomicUsize>);

impl Waiting {
    fn new(counter: &Arc<AtomicUsize>) -> Waiting {
        counter.fetch_add(1, Ordering::Relaxed);
        Waiting(counter.clone())
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

type Watch = AsyncFd<Arc<OwnedFd>>;

/// Registers the interface with the runtime. An interface deleted under the descriptor shows
/// as an error on it (EPOLLERR), which only an `ERROR` interest hears.
fn watch_tun(shared: &Shared) -> std::io::Result<Watch> {
    let interest = tokio::io::Interest::READABLE | tokio::io::Interest::ERROR;
    crate::sys::async_fd_shared(shared.tun.clone(), interest)
}

/// Takes the packets the interface sends when no call is there to take them, until the device
/// terminates or the interface goes away (then every waiting call ends `NO_DEVICE`).
///
/// Calls take packets themselves (`recv_packet` pumps the interface when its queue is empty),
/// and a reader woken for every packet would only race them for the lock, a context switch
/// per packet. So when the reader finds that calls pumped since it last looked, and none
/// waits, it stands aside: it leaves the interface unwatched (packets wait in the kernel's own
/// bounded queue) and looks again a moment later, or at once when a call starts waiting.
async fn reader(shared: Arc<Shared>, mut watch: Watch, waiting: Arc<AtomicUsize>) {
    let mut stop = shared.stopped.subscribe();
    let mut call_pumps = shared.call_pumps.load(Ordering::Relaxed);
    loop {
        let interest = tokio::io::Interest::READABLE | tokio::io::Interest::ERROR;
        let ready = tokio::select! {
            ready = watch.ready(interest) => ready,
            _ = stop.wait_for(|t| *t) => return,
        };
        let Ok(mut guard) = ready else { return };
        let pumped = match shared.state.try_lock() {
            Ok(mut state) => shared.pump(&mut state, None),
            Err(std::sync::TryLockError::Poisoned(e)) => shared.pump(&mut e.into_inner(), None),
            // A call holds the lock: it is pumping.
            Err(std::sync::TryLockError::WouldBlock) => Ok((0, false)),
        };
        let (read, drained) = match pumped {
            Ok(p) => p,
            Err(_) => return,
        };
        let calls_pumped = std::mem::replace(&mut call_pumps, shared.call_pumps.load(Ordering::Relaxed)) != call_pumps;
        if waiting.load(Ordering::Relaxed) > 0 || (read > 0 && !calls_pumped) {
            if drained {
                // Wait for the interface to say there is more.
                guard.clear_ready();
            } else {
                // A batch taken, more there: others get the lock first.
                tokio::task::yield_now().await;
            }
            continue;
        }
        // The calls take the packets, and none waits: stand aside.
        drop(guard);
        drop(watch);
        tokio::select! {
            () = tokio::time::sleep(STAND_ASIDE) => {}
            () = shared.wanted.notified() => {}
            _ = stop.wait_for(|t| *t) => return,
        }
        watch = match watch_tun(&shared) {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(interface = shared.name, error = %e, "cannot watch the TUN interface; the device stops");
                shared.stopped.send_replace(true);
                return;
            }
        };
    }
}

impl Driver for NetDevice {
    fn family(&self) -> &'static Family {
        &FAMILY
    }

    fn call(&self, ctx: &CallContext<'_>, spec: &MethodSpec, args: CallArgs) -> Completion {
        let Some(selector) = Selector::from_u32(spec.selector) else {
            return Completion::Ready(Err(DriverError::new(
                Status::Internal,
                format!("no net method {}", spec.selector),
            )));
        };
        Completion::Ready(match selector {
            Selector::GetInfo => self.get_info(),
            Selector::SetUp => self.set_up(true),
            Selector::SetDown => self.set_up(false),
            Selector::SetMtu => {
                let [mtu] = args.scalars();
                self.set_mtu(mtu)
            }
            Selector::SendPacket => self.send_packet(&args.struct_in),
            Selector::RecvPacket => {
                let [timeout_ms] = args.scalars();
                return self.recv_packet(ctx.client, timeout_ms, args.struct_out_cap);
            }
        })
    }

    fn opened(&self, client: ClientKey, _mode: OpenMode) -> Result<(), DriverError> {
        self.shared.state().queues.insert(client, Queue::default());
        Ok(())
    }

    fn closed(&self, client: ClientKey) {
        let queue = self.shared.state().queues.remove(&client);
        if let Some(queue) = queue {
            queue.arrived.notify_waiters();
        }
    }

    fn terminate(&self) {
        self.shared.stopped.send_replace(true);
    }

    fn live(&self) -> DriverLive {
        DriverLive {
            opens: self.shared.state().queues.len(),
            waiting: self.waiting.load(Ordering::Relaxed),
        }
    }
}

impl Drop for NetDevice {
    fn drop(&mut self) {
        // The reader holds the TUN descriptor too: stop it, so that the interface goes when the
        // device does.
        self.shared.stopped.send_replace(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_table_and_layout_are_valid() {
        assert_eq!(FAMILY.methods().rows().len(), TABLE.len());
        assert_eq!(INFO.size(), 28);
        assert_eq!(
            TABLE.iter().filter_map(|r| r.privilege).collect::<Vec<_>>(),
            ["net.admin"; 3]
        );
    }

    #[test]
    fn a_queue_holds_its_bound_and_counts_what_overflows() {
        let mut q = Queue::default();
        for _ in 0..QUEUE_PACKETS + 10 {
            q.push(&[0u8; 100]);
        }
        assert_eq!((q.packets.len(), q.dropped), (QUEUE_PACKETS, 10));
        let mut big = Queue::default();
        for _ in 0..20 {
            big.push(&vec![0u8; 60_000]);
        }
        assert!(big.bytes <= QUEUE_BYTES && big.dropped == 20 - big.packets.len() as u64);
    }
}
