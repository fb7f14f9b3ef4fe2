//! The net device: a TUN interface created when the broker starts (and gone when it stops: it is
//! not persistent). A reader task takes every packet the interface sends and gives each open
//! user client a copy, into a bounded queue of its own.

use std::{
    collections::{HashMap, VecDeque},
    os::fd::{AsFd, OwnedFd},
    sync::{
        Arc, LazyLock, Mutex,
        atomic::{AtomicUsize, Ordering},
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

type Queues = Arc<Mutex<HashMap<ClientKey, Queue>>>;

/// One TUN interface.
#[derive(Debug)]
pub struct NetDevice {
    name: String,
    tun: Arc<AsyncFd<OwnedFd>>,
    /// For the interface ioctls.
    control: OwnedFd,
    queues: Queues,
    waiting: Arc<AtomicUsize>,
    /// Set when the service terminates or the interface goes away: ends the reader and every
    /// waiting call.
    stopped: Arc<tokio::sync::watch::Sender<bool>>,
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

impl NetDevice {
    /// Creates the TUN interface `name` (down) and starts its reader. Needs a tokio runtime.
    pub fn create(name: &str) -> Result<NetDevice, String> {
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
        let control = rustix::net::socket_with(AddressFamily::INET, SocketType::DGRAM, SocketFlags::CLOEXEC, None)
            .map_err(|e| format!("interface control socket: {e}"))?;
        let tun = Arc::new(crate::sys::async_fd(tun).map_err(|e| format!("/dev/net/tun: {e}"))?);
        let queues: Queues = Arc::default();
        let stopped = Arc::new(tokio::sync::watch::Sender::new(false));
        tokio::spawn(reader(given.clone(), tun.clone(), queues.clone(), stopped.clone()));
        Ok(NetDevice {
            name: given,
            tun,
            control,
            queues,
            waiting: Arc::new(AtomicUsize::new(0)),
            stopped,
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
        let mtu = sys::mtu(fd, &self.name).map_err(|e| self.failed("SIOCGIFMTU", e))?;
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
        Ok(CallOutput::default())
    }

    fn send_packet(&self, packet: &[u8]) -> CallResult {
        let mtu = sys::mtu(self.control.as_fd(), &self.name).map_err(|e| self.failed("SIOCGIFMTU", e))?;
        if packet.len() > mtu as usize {
            return Err(bad(format!("a packet of {} bytes exceeds the MTU {mtu}", packet.len())));
        }
        // A TUN write takes the whole packet at once, or nothing (a full queue: EAGAIN).
        match rustix::io::write(self.tun.get_ref(), packet) {
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
        let arrived = {
            let queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
            match queues.get(&client) {
                Some(q) => q.arrived.clone(),
                None => {
                    return Completion::Ready(Err(DriverError::new(Status::NotOpen, "no queue for this user client")));
                }
            }
        };
        let (queues, name) = (self.queues.clone(), self.name.clone());
        let waiting = Waiting::new(&self.waiting);
        let mut stopped = self.stopped.subscribe();
        let deadline = Instant::now() + Duration::from_millis(timeout_ms);
        Completion::Pending(Box::pin(async move {
            let _waiting = waiting;
            loop {
                let notified = arrived.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                {
                    let mut queues = queues.lock().unwrap_or_else(|e| e.into_inner());
                    let queue = queues
                        .get_mut(&client)
                        .ok_or_else(|| DriverError::new(Status::Aborted, "the user client closed"))?;
                    if let Some(packet) = queue.packets.pop_front() {
                        queue.bytes -= packet.len();
                        let dropped = std::mem::take(&mut queue.dropped);
                        if packet.len() > room {
                            return Err(bad(format!(
                                "a {}-byte packet does not fit the {room} bytes given for it (it is dropped)",
                                packet.len()
                            )));
                        }
                        return Ok(CallOutput {
                            scalars: vec![dropped],
                            struct_out: packet,
                        });
                    }
                }
                if *stopped.borrow_and_update() {
                    return Err(DriverError::new(
                        Status::NoDevice,
                        format!("interface {name} went away"),
                    ));
                }
                tokio::select! {
                    () = &mut notified => {}
                    () = tokio::time::sleep_until(deadline) => {
                        return Err(DriverError::new(Status::Timeout, "no packet arrived before the timeout"));
                    }
                    _ = stopped.changed() => {}
                }
            }
        }))
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

/// Reads every packet the interface sends and queues a copy for each open user client, until
/// the device terminates or the interface goes away (then every waiting call ends `NO_DEVICE`).
async fn reader(
    name: String,
    tun: Arc<AsyncFd<OwnedFd>>,
    queues: Queues,
    stopped: Arc<tokio::sync::watch::Sender<bool>>,
) {
    let mut buf = vec![0u8; PACKET_MAX as usize];
    let mut stop = stopped.subscribe();
    loop {
        // An interface deleted under the descriptor shows as an error on it (EPOLLERR), which
        // only an `ERROR` interest hears.
        let interest = tokio::io::Interest::READABLE | tokio::io::Interest::ERROR;
        let ready = tokio::select! {
            ready = tun.ready(interest) => ready,
            _ = stop.wait_for(|t| *t) => return,
        };
        let Ok(mut guard) = ready else { return };
        match guard.try_io(|fd| rustix::io::read(fd.get_ref(), &mut buf).map_err(std::io::Error::from)) {
            Ok(Ok(n)) => {
                let packet = buf.get(..n).unwrap_or_default();
                for queue in queues.lock().unwrap_or_else(|e| e.into_inner()).values_mut() {
                    queue.push(packet);
                }
            }
            Ok(Err(e)) => {
                let e = Errno::from_io_error(&e).unwrap_or(Errno::IO);
                tracing::warn!(interface = name, error = %failure(&name, "read", e), "the TUN reader stops");
                // Waiting calls learn the device is gone.
                stopped.send_replace(true);
                return;
            }
            Err(_would_block) => {}
        }
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
        self.queues
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(client, Queue::default());
        Ok(())
    }

    fn closed(&self, client: ClientKey) {
        let queue = self.queues.lock().unwrap_or_else(|e| e.into_inner()).remove(&client);
        if let Some(queue) = queue {
            queue.arrived.notify_waiters();
        }
    }

    fn terminate(&self) {
        self.stopped.send_replace(true);
    }

    fn live(&self) -> DriverLive {
        DriverLive {
            opens: self.queues.lock().map_or(0, |q| q.len()),
            waiting: self.waiting.load(Ordering::Relaxed),
        }
    }
}

impl Drop for NetDevice {
    fn drop(&mut self) {
        // The reader holds the TUN descriptor too: stop it, so that the interface goes when the
        // device does.
        self.stopped.send_replace(true);
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
