//! The net device: a TUN interface created when the broker starts (and gone when it stops: it is
//! not persistent). A reader task takes every packet the interface sends and gives each open
//! user client a copy, into a bounded queue of its own.

use std::{
    collections::{HashMap, VecDeque},
    os::fd::{AsFd, BorrowedFd, OwnedFd},
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
    methods::{
        BATCH_MAX, LAYOUTS, MAX_TIMEOUT_MS, MEMORY_TYPES, PACKET_MAX, PACKETS, QUEUE_BYTES, QUEUE_PACKETS,
        RECORD_HEADER, Selector, TABLE,
    },
    sys,
};
use crate::{
    driver::{
        Backing, CallArgs, CallContext, CallOutput, CallResult, ClientKey, Completion, Driver, DriverError, DriverLive,
        Family, MemoryType, MethodSpec, NativeStruct, PowerChange, memory,
    },
    registry::OpenMode,
};

/// The net family.
pub static FAMILY: LazyLock<Family> = LazyLock::new(|| Family::new("net", "NetDevice", LAYOUTS, &TABLE, &MEMORY_TYPES));

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
    fn pop(&mut self) -> Option<Vec<u8>> {
        let packet = self.packets.pop_front()?;
        self.bytes -= packet.len();
        Some(packet)
    }

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
    /// The records a `recv_packets` gathers, kept from call to call (a batch's worth of fresh
    /// memory each time would be paid in page faults).
    records: Vec<u8>,
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
    /// How many receive calls came (the reader steps aside while they come: they read the
    /// interface themselves whenever their queue is short).
    receives: AtomicU64,
}

/// Packets one pump takes at most before it lets others have the lock.
const PUMP_BATCH: usize = 64;

/// How long the reader leaves the interface to the calls once they take its packets first.
const STAND_ASIDE: Duration = Duration::from_millis(1);

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads what the interface has (up to a batch of packets), handing each to `each` with the
    /// queues, until `each` says it has enough. Returns the packets read and whether the
    /// interface said it has no more. An error ends the device: waiting calls learn it is gone.
    fn pump(
        &self,
        state: &mut State,
        mut each: impl FnMut(&mut HashMap<ClientKey, Queue>, &[u8]) -> bool,
    ) -> Result<(usize, bool), DriverError> {
        let State { queues, buf, .. } = state;
        for read in 0..PUMP_BATCH {
            match rustix::io::read(&*self.tun, &mut buf[..]) {
                Ok(n) => {
                    if each(queues, buf.get(..n).unwrap_or_default()) {
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

/// Gives every queue a copy.
fn to_every_queue(queues: &mut HashMap<ClientKey, Queue>, packet: &[u8]) -> bool {
    for queue in queues.values_mut() {
        queue.push(packet);
    }
    false
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
    /// The interface's MTU and whether it was up when the machine went to sleep, set again on
    /// wake.
    asleep: Mutex<Option<(u32, bool)>>,
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

/// [`open_tun`] by the privileged helper when the serving process has one (which makes only
/// the interfaces the configuration names, and attaches only to those a personality matches:
/// `ifindex`), else here.
fn tun_for(name: &str, ifindex: Option<u32>) -> Result<(OwnedFd, String), String> {
    use crate::sandbox::protocol::{Request, Response};
    let request = Request::OpenTun {
        name: name.to_string(),
        ifindex,
    };
    match crate::sandbox::ask(&request, None) {
        None => open_tun(name),
        Some(Ok((Response::Tun { name }, Some(fd)))) => Ok((fd, name)),
        Some(Ok((Response::Refused(why), _))) => Err(why),
        Some(Ok((other, _))) => Err(format!("the privileged helper answered {other:?}")),
        Some(Err(e)) => Err(e),
    }
}

/// A control socket for the interface ioctls (any socket family answers them; a Unix one
/// needs no network family the sandbox would have to allow).
fn control_socket() -> Result<OwnedFd, String> {
    rustix::net::socket_with(AddressFamily::UNIX, SocketType::DGRAM, SocketFlags::CLOEXEC, None)
        .map_err(|e| format!("interface control socket: {e}"))
}

/// Brings the interface of TUN descriptor `tun` up or down and/or sets its MTU (68 to
/// [`PACKET_MAX`]): what the privileged helper does for a serving process, which proves the
/// interface is its own by sending its descriptor.
pub(crate) fn set_link(tun: BorrowedFd<'_>, up: Option<bool>, mtu: Option<u32>) -> Result<(), String> {
    let name = sys::tun_get_iff(tun).map_err(|e| format!("not a TUN descriptor attached to an interface: {e}"))?;
    let control = control_socket()?;
    let fd = control.as_fd();
    if let Some(up) = up {
        let flags = sys::flags(fd, &name).map_err(|e| format!("interface {name}: SIOCGIFFLAGS: {e}"))?;
        let up_flag = libc::IFF_UP as u16;
        let flags = if up { flags | up_flag } else { flags & !up_flag };
        sys::set_flags(fd, &name, flags).map_err(|e| format!("interface {name}: SIOCSIFFLAGS: {e}"))?;
    }
    if let Some(mtu) = mtu {
        if !(68..=PACKET_MAX).contains(&mtu) {
            return Err(format!("mtu {mtu}: 68 to {PACKET_MAX}"));
        }
        sys::set_mtu(fd, &name, mtu).map_err(|e| match e {
            Errno::INVAL => format!("interface {name} refuses mtu {mtu}"),
            e => format!("interface {name}: SIOCSIFMTU: {e}"),
        })?;
    }
    Ok(())
}

impl NetDevice {
    /// Creates the TUN interface `name` (down) and starts its reader. Needs a tokio runtime.
    pub fn create(name: &str) -> Result<NetDevice, String> {
        let (tun, given) = tun_for(name, None)?;
        NetDevice::serve(tun, given, None)
    }

    /// Attaches to the persistent TUN interface `name` that the kernel announced with index
    /// `ifindex` (one another program created), and starts its reader. Refused when the name
    /// now names another interface — the one announced is gone — or a TAP, or one some other
    /// program holds open. Needs a tokio runtime.
    pub fn attach(name: &str, ifindex: u32) -> Result<NetDevice, String> {
        let (tun, given) = tun_for(name, Some(ifindex)).map_err(|e| {
            e.replace(
                "exists already (another program owns it)",
                "is held open by another program",
            )
        })?;
        NetDevice::serve(tun, given, Some(ifindex))
    }

    fn serve(tun: OwnedFd, given: String, ifindex: Option<u32>) -> Result<NetDevice, String> {
        let control = control_socket()?;
        if let Some(expected) = ifindex {
            let index =
                sys::index(control.as_fd(), &given).map_err(|e| format!("interface {given}: SIOCGIFINDEX: {e}"))?;
            if index != expected {
                // Dropping the descriptor removes what TUNSETIFF just made in its place.
                return Err(format!(
                    "interface {given} is index {index}, not the announced {expected}: the announced interface is gone"
                ));
            }
        }
        let mtu = sys::mtu(control.as_fd(), &given).map_err(|e| format!("interface {given}: SIOCGIFMTU: {e}"))?;
        let shared = Arc::new(Shared {
            name: given.clone(),
            tun: Arc::new(tun),
            state: Mutex::new(State {
                queues: HashMap::new(),
                buf: vec![0u8; PACKET_MAX as usize],
                records: Vec::new(),
            }),
            stopped: tokio::sync::watch::Sender::new(false),
            wanted: Notify::new(),
            receives: AtomicU64::new(0),
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
            asleep: Mutex::new(None),
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

    /// Asks the privileged helper to set the link (`Some`), when there is one.
    fn link_by_helper(&self, up: Option<bool>, mtu: Option<u32>) -> Option<CallResult> {
        use crate::sandbox::protocol::{Request, Response};
        let answer = crate::sandbox::ask(&Request::SetLink { up, mtu }, Some(self.shared.tun.as_fd()))?;
        Some(match answer {
            Ok((Response::Done, _)) => Ok(CallOutput::default()),
            Ok((Response::Refused(why), _)) if why.contains("refuses mtu") || why.starts_with("mtu ") => Err(bad(why)),
            Ok((Response::Refused(why), _)) => Err(DriverError::new(Status::Internal, why)),
            Ok((other, _)) => Err(DriverError::new(
                Status::Internal,
                format!("the privileged helper answered {other:?}"),
            )),
            Err(e) => Err(DriverError::new(Status::Internal, e)),
        })
    }

    fn set_up(&self, up: bool) -> CallResult {
        if let Some(result) = self.link_by_helper(Some(up), None) {
            return result;
        }
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
        if let Some(result) = self.link_by_helper(None, Some(mtu as u32)) {
            result?;
            self.read_mtu()?;
            return Ok(CallOutput::default());
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
        self.fits_mtu(packet.len())?;
        match rustix::io::write(&*self.shared.tun, packet) {
            Ok(n) => Ok(CallOutput {
                scalars: vec![n as u64],
                struct_out: vec![],
            }),
            Err(e) => Err(self.write_error(e)),
        }
    }

    /// Receives into `want`'s shape: at once when packets are queued or waiting on the
    /// interface, else when one arrives or at `timeout_ms`.
    fn receive(&self, client: ClientKey, timeout_ms: u64, want: Want) -> Completion {
        if timeout_ms > MAX_TIMEOUT_MS {
            return Completion::Ready(Err(bad(format!("timeout_ms {timeout_ms}: at most {MAX_TIMEOUT_MS}"))));
        }
        let arrived = match take(&self.shared, client, &want) {
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
                match take(&shared, client, &want) {
                    Taken::Done(result) => return result,
                    // The same notifier: a user client's queue lives as long as it does.
                    Taken::Empty(_) => {}
                }
            }
        }))
    }

    /// `recv_packets`: checks the batch's place in the client's `packets` memory.
    fn recv_packets(&self, ctx: &CallContext<'_>, [offset, room, max_count, timeout_ms]: [u64; 4]) -> Completion {
        let memory = match self.packets(ctx) {
            Ok(m) => m,
            Err(e) => return Completion::Ready(Err(e)),
        };
        if offset % RECORD_HEADER as u64 != 0 {
            return Completion::Ready(Err(bad(format!("offset {offset}: a multiple of {RECORD_HEADER}"))));
        }
        if offset.checked_add(room).is_none_or(|end| end > PACKETS.size) {
            return Completion::Ready(Err(bad(format!(
                "{room} bytes at offset {offset} do not fit the {}-byte packets memory",
                PACKETS.size
            ))));
        }
        if !(1..=BATCH_MAX).contains(&max_count) {
            return Completion::Ready(Err(bad(format!("max_count {max_count}: 1 to {BATCH_MAX}"))));
        }
        let want = Want::Batch {
            memory: memory.clone(),
            offset,
            room: room as usize,
            max: max_count as usize,
        };
        self.receive(ctx.client, timeout_ms, want)
    }

    /// The client's `packets` memory, mapped by the broker too.
    fn packets<'c>(&self, ctx: &'c CallContext<'_>) -> Result<&'c Backing, DriverError> {
        let mapped = ctx
            .memory(PACKETS.id)
            .ok_or_else(|| bad("map the packets memory type (0) first: batches travel through it"))?;
        Ok(&mapped.backing)
    }

    /// `send_packets`: the `count` records at `offset` of the client's `packets` memory, copied
    /// out once and checked and written to the interface from the copy. Stops at the first
    /// packet refused: its error when it is the first, else the number sent before it.
    fn send_packets(&self, ctx: &CallContext<'_>, [offset, count]: [u64; 2]) -> CallResult {
        let backing = self.packets(ctx)?;
        if !(1..=BATCH_MAX).contains(&count) {
            return Err(bad(format!("count {count}: 1 to {BATCH_MAX}")));
        }
        if offset % RECORD_HEADER as u64 != 0 || offset >= PACKETS.size {
            return Err(bad(format!(
                "offset {offset}: a multiple of {RECORD_HEADER} inside the {}-byte packets memory",
                PACKETS.size
            )));
        }
        // Records of packets up to the MTU, as many as asked for, copied at once.
        let per_record = record_span(self.mtu.load(Ordering::Relaxed) as usize) as u64;
        let scratch = SEND_SCRATCH.take();
        let mut records = Records::copy(&backing.fd, offset, count * per_record, scratch)?;
        let mut at = offset;
        let mut sent = 0u64;
        while sent < count {
            let left = (count - sent) * per_record;
            let step = records.packet(&backing.fd, at, left).and_then(|range| {
                let packet = records.bytes.get(range.clone()).unwrap_or_default();
                self.fits_mtu(packet.len())?;
                rustix::io::write(&*self.shared.tun, packet).map_err(|e| self.write_error(e))?;
                Ok(record_span(range.len()) as u64)
            });
            match step {
                Ok(span) => {
                    at += span;
                    sent += 1;
                }
                Err(e) if sent == 0 => return Err(e),
                Err(e) => {
                    tracing::debug!(interface = self.name, sent, error = %e, "a batch stops early");
                    break;
                }
            }
        }
        SEND_SCRATCH.set(records.bytes);
        Ok(CallOutput {
            scalars: vec![sent],
            struct_out: vec![],
        })
    }

    /// Refuses a packet larger than the MTU (the one remembered, or if it exceeds that, the
    /// interface's of now).
    fn fits_mtu(&self, len: usize) -> Result<(), DriverError> {
        if len > self.mtu.load(Ordering::Relaxed) as usize {
            let mtu = self.read_mtu()?;
            if len > mtu as usize {
                return Err(bad(format!("a packet of {len} bytes exceeds the MTU {mtu}")));
            }
        }
        Ok(())
    }

    fn write_error(&self, e: Errno) -> DriverError {
        match e {
            // A TUN write takes the whole packet at once, or nothing (a full queue: EAGAIN).
            Errno::AGAIN => DriverError::new(
                Status::NoMemory,
                format!("interface {} has no room for the packet now", self.name),
            ),
            Errno::INVAL => bad("the kernel refused the packet (not a valid IP packet)"),
            e => self.failed("write", e),
        }
    }
}

thread_local! {
    /// The buffer a `send_packets` copies its batch into, kept for the thread's next one.
    static SEND_SCRATCH: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// A private copy of part of a client's packets memory. Records are read and sent from the
/// copy, so what the client writes in its memory meanwhile changes nothing the broker checked.
struct Records {
    /// The memory offset of `bytes[0]`.
    start: u64,
    bytes: Vec<u8>,
}

impl Records {
    /// Copies up to `len` bytes from `offset` (less at the memory's end), into `bytes`.
    fn copy(fd: &OwnedFd, offset: u64, len: u64, mut bytes: Vec<u8>) -> Result<Records, DriverError> {
        let len = len.min(PACKETS.size.saturating_sub(offset));
        bytes.clear();
        bytes.resize(usize::try_from(len).map_err(|_| bad("length"))?, 0);
        let mut got = 0;
        while got < bytes.len() {
            match rustix::io::pread(fd, bytes.get_mut(got..).unwrap_or_default(), offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(Errno::INTR) => {}
                Err(e) => return Err(DriverError::new(Status::Internal, format!("packets memory: {e}"))),
            }
        }
        bytes.truncate(got);
        Ok(Records { start: offset, bytes })
    }

    /// Where, in the copy, the packet of the record at memory offset `at` lies; copies again
    /// from `at` (up to `ahead` bytes) when the copy ends before the record does.
    fn packet(&mut self, fd: &OwnedFd, at: u64, ahead: u64) -> Result<std::ops::Range<usize>, DriverError> {
        let mut fresh = false;
        loop {
            let rel = usize::try_from(at - self.start).map_err(|_| bad("offset"))?;
            let header = self.bytes.get(rel..rel + RECORD_HEADER);
            let packet = header.and_then(|h| match *h {
                [hi, lo, 0, 0] => Some(usize::from(u16::from_be_bytes([hi, lo]))),
                _ => None,
            });
            match (header, packet) {
                (Some(_), None) => {
                    return Err(bad(format!(
                        "the record at offset {at}: header bytes 2 and 3 must be zero"
                    )));
                }
                (Some(_), Some(0)) => return Err(bad(format!("the record at offset {at}: an empty packet"))),
                (Some(_), Some(len)) if rel + RECORD_HEADER + len <= self.bytes.len() => {
                    return Ok(rel + RECORD_HEADER..rel + RECORD_HEADER + len);
                }
                _ if fresh => {
                    return Err(bad(format!(
                        "the record at offset {at} does not fit the {}-byte packets memory",
                        PACKETS.size
                    )));
                }
                // A record longer than the copy reaches (a packet over the MTU, say): copy
                // again from it, once.
                _ => {
                    let need = RECORD_HEADER as u64 + u64::from(u16::MAX);
                    let bytes = std::mem::take(&mut self.bytes);
                    *self = Records::copy(fd, at, ahead.max(need), bytes)?;
                    fresh = true;
                }
            }
        }
    }
}

/// The bytes a record of a `len`-byte packet takes: header, packet, padding to 4.
fn record_span(len: usize) -> usize {
    (RECORD_HEADER + len).next_multiple_of(RECORD_HEADER)
}

fn gone(name: &str) -> DriverError {
    DriverError::new(Status::NoDevice, format!("interface {name} went away"))
}

/// What a receive takes, and where it puts it.
enum Want {
    /// One packet, as the struct output, of at most `room` bytes.
    One { room: usize },
    /// Up to `max` packets, as records in `room` bytes at `offset` of the client's memory.
    Batch {
        memory: Backing,
        offset: u64,
        room: usize,
        max: usize,
    },
}

/// The call took a packet that does not fit the room given for it: it ran (the packet is gone
/// from the queue, and counted as dropped with the next one delivered), so `OVERFLOW`, the
/// status that says the output was withheld, not `BAD_ARGUMENT`, which says nothing happened.
fn too_big(queue: &mut Queue, len: usize, room: usize) -> DriverError {
    queue.pop();
    queue.dropped += 1;
    DriverError::new(
        Status::Overflow,
        format!("a {len}-byte packet does not fit the {room} bytes given for it: it was dropped (and counted)"),
    )
}

/// The records of a `recv_packets`, as they are gathered.
struct Gather {
    records: Vec<u8>,
    count: usize,
    room: usize,
    max: usize,
}

impl Gather {
    fn full(&self) -> bool {
        self.count >= self.max
    }

    fn fits(&self, len: usize) -> bool {
        self.records.len() + record_span(len) <= self.room
    }

    fn add(&mut self, packet: &[u8]) {
        let len = u16::try_from(packet.len()).unwrap_or(u16::MAX);
        self.records.extend_from_slice(&len.to_be_bytes());
        self.records.extend_from_slice(&[0, 0]);
        self.records.extend_from_slice(packet);
        self.records
            .resize(self.records.len().next_multiple_of(RECORD_HEADER), 0);
        self.count += 1;
    }

    /// Takes from the front of `queue` what fits; a first packet that cannot fit is dropped
    /// and refused.
    fn drain_queue(&mut self, queue: &mut Queue) -> Result<(), DriverError> {
        while !self.full() {
            let Some(len) = queue.packets.front().map(Vec::len) else {
                break;
            };
            if !self.fits(len) {
                if self.count == 0 {
                    return Err(too_big(queue, record_span(len), self.room));
                }
                break;
            }
            let packet = queue.pop().unwrap_or_default();
            self.add(&packet);
        }
        Ok(())
    }
}

enum Taken {
    Done(CallResult),
    /// Nothing for the client yet: wait for this.
    Empty(Arc<Notify>),
}

/// The client's queue is gone: its user client closed. Because its interface went away, when
/// the driver has stopped: a service is terminated (the driver stopped) before its sessions
/// close their user clients, and a call waiting then must end `NO_DEVICE` whichever of the two
/// its waiter sees first.
fn closed(shared: &Shared) -> Taken {
    if *shared.stopped.borrow() {
        return Taken::Done(Err(gone(&shared.name)));
    }
    Taken::Done(Err(DriverError::new(Status::Aborted, "the user client closed")))
}

/// The client's next packets: from its queue, or else from the interface (read now).
fn take(shared: &Shared, client: ClientKey, want: &Want) -> Taken {
    shared.receives.fetch_add(1, Ordering::Relaxed);
    let mut state = shared.state();
    match want {
        Want::One { room } => take_one(shared, &mut state, client, *room),
        Want::Batch {
            memory,
            offset,
            room,
            max,
        } => {
            let mut records = std::mem::take(&mut state.records);
            records.clear();
            let mut gather = Gather {
                records,
                count: 0,
                room: *room,
                max: *max,
            };
            let taken = match take_batch(shared, &mut state, client, &mut gather) {
                Ok(Some(taken)) => taken,
                Ok(None) => Taken::Done(deliver_batch(&mut state, client, &gather, memory, *offset)),
                Err(e) => Taken::Done(Err(e)),
            };
            state.records = gather.records;
            taken
        }
    }
}

fn take_one(shared: &Shared, state: &mut State, client: ClientKey, room: usize) -> Taken {
    let mut pumped = false;
    loop {
        let Some(queue) = state.queues.get_mut(&client) else {
            return closed(shared);
        };
        if let Some(len) = queue.packets.front().map(Vec::len) {
            if len > room {
                return Taken::Done(Err(too_big(queue, len, room)));
            }
            let packet = queue.pop().unwrap_or_default();
            // Reported with the packet delivered (a refusal leaves it for the next call).
            let dropped = std::mem::take(&mut queue.dropped);
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
        let pumped = shared.pump(state, |queues, packet| {
            to_every_queue(queues, packet);
            queues.get(&client).is_some_and(|q| !q.packets.is_empty())
        });
        if let Err(e) = pumped {
            return Taken::Done(Err(e));
        }
    }
}

/// Gathers the client's queued packets, then, while room remains, the interface's: those go
/// straight into the records (the other clients' queues get their copies). `Ok(Some)` when
/// the call is answered otherwise (nothing yet, the client gone, the device gone).
fn take_batch(
    shared: &Shared,
    state: &mut State,
    client: ClientKey,
    gather: &mut Gather,
) -> Result<Option<Taken>, DriverError> {
    let Some(queue) = state.queues.get_mut(&client) else {
        return Ok(Some(closed(shared)));
    };
    gather.drain_queue(queue)?;
    if queue.packets.is_empty() && !gather.full() && !*shared.stopped.borrow() {
        // Until the batch is full, the interface has no more, or a packet did not fit (it
        // waits in the queue for the next call): a batch may be larger than one pump.
        loop {
            let (_, drained) = shared.pump(state, |queues, packet| {
                for (key, queue) in queues.iter_mut() {
                    if *key == client && queue.packets.is_empty() && !gather.full() && gather.fits(packet.len()) {
                        gather.add(packet);
                    } else {
                        queue.push(packet);
                    }
                }
                gather.full()
            })?;
            let queued = state.queues.get(&client).is_some_and(|q| !q.packets.is_empty());
            if drained || gather.full() || queued {
                break;
            }
        }
        // A first packet too big for the room stayed in the queue: dropped, and OVERFLOW.
        if gather.count == 0
            && let Some(queue) = state.queues.get_mut(&client)
        {
            gather.drain_queue(queue)?;
        }
    }
    if gather.count > 0 {
        return Ok(None);
    }
    if *shared.stopped.borrow() {
        return Err(gone(&shared.name));
    }
    Ok(Some(match state.queues.get(&client) {
        Some(queue) => Taken::Empty(queue.arrived.clone()),
        None => closed(shared),
    }))
}

/// Writes the gathered records into the client's memory (one system call: the kernel copies
/// them) and reports them.
fn deliver_batch(state: &mut State, client: ClientKey, gather: &Gather, memory: &Backing, offset: u64) -> CallResult {
    let mut put = 0;
    while put < gather.records.len() {
        put += rustix::io::pwrite(
            &*memory.fd,
            gather.records.get(put..).unwrap_or_default(),
            offset + put as u64,
        )
        .map_err(|e| DriverError::new(Status::Internal, format!("packets memory: {e}")))?;
    }
    let dropped = state
        .queues
        .get_mut(&client)
        .map_or(0, |q| std::mem::take(&mut q.dropped));
    Ok(CallOutput {
        scalars: vec![gather.count as u64, gather.records.len() as u64, dropped],
        struct_out: vec![],
    })
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
/// and a reader woken for every packet costs each packet a wake-up (the interface's writer pays
/// it) and races the calls for the lock. So when receive calls came since the reader last
/// looked, and none waits, it stands aside: it leaves the interface unwatched (packets wait in
/// the kernel's own bounded queue, for the calls to take) and looks again a moment later, or at
/// once when a call starts waiting.
async fn reader(shared: Arc<Shared>, mut watch: Watch, waiting: Arc<AtomicUsize>) {
    let mut stop = shared.stopped.subscribe();
    let mut receives = shared.receives.load(Ordering::Relaxed);
    loop {
        let interest = tokio::io::Interest::READABLE | tokio::io::Interest::ERROR;
        let ready = tokio::select! {
            ready = watch.ready(interest) => ready,
            _ = stop.wait_for(|t| *t) => return,
        };
        let Ok(mut guard) = ready else { return };
        let pumped = match shared.state.try_lock() {
            Ok(mut state) => shared.pump(&mut state, to_every_queue),
            Err(std::sync::TryLockError::Poisoned(e)) => shared.pump(&mut e.into_inner(), to_every_queue),
            // A call holds the lock: it is pumping.
            Err(std::sync::TryLockError::WouldBlock) => Ok((0, false)),
        };
        let (read, drained) = match pumped {
            Ok(p) => p,
            Err(_) => return,
        };
        let calls_came = std::mem::replace(&mut receives, shared.receives.load(Ordering::Relaxed)) != receives;
        if waiting.load(Ordering::Relaxed) > 0 || (read > 0 && !calls_came) {
            if drained {
                // Wait for the interface to say there is more.
                guard.clear_ready();
            } else {
                // A batch taken, more there: others get the lock first.
                tokio::task::yield_now().await;
            }
            continue;
        }
        // Calls take the packets, and none waits: stand aside.
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

    /// Going to sleep: the interface's configuration (MTU, up or down) is kept; on wake it is
    /// set again where it changed.
    fn power(&self, change: PowerChange, _deadline: std::time::Instant) -> Result<(), DriverError> {
        let up_flag = libc::IFF_UP as u16;
        match change {
            PowerChange::Sleep => {
                let mtu = self.read_mtu()?;
                let flags = sys::flags(self.control.as_fd(), &self.name).map_err(|e| self.failed("SIOCGIFFLAGS", e))?;
                *self.asleep.lock().unwrap_or_else(|e| e.into_inner()) = Some((mtu, flags & up_flag != 0));
            }
            PowerChange::Wake => {
                let saved = self.asleep.lock().unwrap_or_else(|e| e.into_inner()).take();
                if let Some((mtu, up)) = saved {
                    if self.read_mtu()? != mtu {
                        self.set_mtu(u64::from(mtu))?;
                    }
                    let flags =
                        sys::flags(self.control.as_fd(), &self.name).map_err(|e| self.failed("SIOCGIFFLAGS", e))?;
                    if (flags & up_flag != 0) != up {
                        self.set_up(up)?;
                    }
                }
            }
        }
        Ok(())
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
                let want = Want::One {
                    room: args.struct_out_cap,
                };
                return self.receive(ctx.client, timeout_ms, want);
            }
            Selector::SendPackets => self.send_packets(ctx, args.scalars()),
            Selector::RecvPackets => return self.recv_packets(ctx, args.scalars()),
        })
    }

    fn create_memory(&self, memory_type: &MemoryType) -> Result<Backing, DriverError> {
        if memory_type.id != PACKETS.id {
            return Err(bad(format!("no memory type {}", memory_type.id)));
        }
        let fd = memory::create_writable("portcullis-net-packets", PACKETS.size)
            .map_err(|e| DriverError::new(Status::NoMemory, format!("packets: {e}")))?;
        // Read and written with pread and pwrite: batches are copied whole, once.
        Ok(Backing {
            fd: Arc::new(fd),
            revocable: true,
            region: None,
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
