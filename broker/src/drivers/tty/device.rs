//! The tty device: the node opened once (non-blocking, `O_NOCTTY`), put in raw mode, served to
//! one user client at a time, whose line settings are restored when it closes; the device's own
//! settings are restored when the broker lets it go.

use std::{
    collections::HashMap,
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{
        Arc, LazyLock, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use portcullis_proto::Status;
use rustix::{
    fs::OFlags,
    io::Errno,
    termios::{ControlModes, InputModes, OptionalActions, QueueSelector, Termios},
};
use tokio::{io::unix::AsyncFd, sync::watch, time::Instant};

use super::{
    methods::{IO_MAX, LAYOUTS, MAX_BREAK_MS, MAX_TIMEOUT_MS, Selector, TABLE, modem},
    sys,
};
use crate::{
    driver::{
        CallArgs, CallContext, CallOutput, CallResult, ClientKey, Completion, Driver, DriverError, DriverLive,
        DriverNotice, Family, MethodSpec, NativeStruct, PowerChange,
    },
    drivers::node::{self, NodeKind},
    registry::OpenMode,
};

/// The tty family.
pub static FAMILY: LazyLock<Family> = LazyLock::new(|| Family::new("tty", "TtyDevice", LAYOUTS, &TABLE, &[]));

static LINE: LazyLock<NativeStruct> = LazyLock::new(|| NativeStruct::of(FAMILY.schema(), "tty_line"));

/// One tty.
#[derive(Debug)]
pub struct TtyDevice {
    path: PathBuf,
    fd: Arc<AsyncFd<OwnedFd>>,
    /// The settings the device had before the broker opened it.
    original: Termios,
    /// Each open user client's settings at its open, restored when it closes.
    saved: Mutex<HashMap<ClientKey, Termios>>,
    opens: AtomicUsize,
    /// Calls waiting on the device.
    waiting: Arc<AtomicUsize>,
    /// Of them, writes whose bytes the device has not all taken yet.
    writing: Arc<AtomicUsize>,
    /// Set when the service terminates: waiting calls end with `ABORTED`.
    terminated: watch::Sender<bool>,
    /// The line settings when the machine went to sleep, restored on wake.
    asleep: Mutex<Option<Termios>>,
    /// Where the device's own settings are kept in the run dir while the broker holds it.
    state_key: Option<String>,
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

fn bad(message: impl Into<String>) -> DriverError {
    DriverError::new(Status::BadArgument, message)
}

impl TtyDevice {
    /// Opens the tty at `path` and puts it in raw mode. Needs a tokio runtime.
    pub fn open(path: &Path) -> Result<TtyDevice, String> {
        TtyDevice::open_node(path, None)
    }

    /// [`TtyDevice::open`], for a node the kernel announced with device number `expect`: the
    /// node must be that device, and not a link to it.
    pub fn open_node(path: &Path, expect: Option<u64>) -> Result<TtyDevice, String> {
        let fd = node::open(path, NodeKind::Tty, OFlags::RDWR | OFlags::NONBLOCK, expect)?;
        let now = rustix::termios::tcgetattr(&fd).map_err(|e| format!("{}: not a tty ({e})", path.display()))?;
        // A broker killed while it held the device left its settings from before: those are
        // the device's own, not the raw mode it was left in.
        let key = rustix::fs::fstat(&fd)
            .map(|st| {
                format!(
                    "tty-{}-{}",
                    rustix::fs::major(st.st_rdev),
                    rustix::fs::minor(st.st_rdev)
                )
            })
            .ok();
        let left = key
            .as_deref()
            .and_then(crate::drivers::state::read)
            .and_then(|text| parse_settings(&text, &now));
        let original = match left {
            Some(original) => {
                tracing::info!(tty = %path.display(), "restoring the line settings a killed broker left the device without");
                original
            }
            None => {
                if let Some(key) = &key {
                    crate::drivers::state::write(key, &settings_text(&now));
                }
                now
            }
        };
        let mut raw = original.clone();
        raw.make_raw();
        raw.control_modes |= ControlModes::CLOCAL | ControlModes::CREAD;
        rustix::termios::tcsetattr(&fd, OptionalActions::Now, &raw)
            .map_err(|e| format!("{}: cannot set raw mode: {e}", path.display()))?;
        let fd = crate::sys::async_fd(fd).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(TtyDevice {
            path: path.to_path_buf(),
            fd: Arc::new(fd),
            original,
            saved: Mutex::new(HashMap::new()),
            opens: AtomicUsize::new(0),
            waiting: Arc::new(AtomicUsize::new(0)),
            writing: Arc::new(AtomicUsize::new(0)),
            terminated: watch::Sender::new(false),
            asleep: Mutex::new(None),
            state_key: key,
        })
    }

    fn raw_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.get_ref().as_fd()
    }

    /// A system call's failure as a status: a tty that hung up is gone (`NO_DEVICE`).
    fn failed(&self, what: &str, e: Errno) -> DriverError {
        failure(&self.path, what, e)
    }

    fn get_line(&self) -> CallResult {
        let t = rustix::termios::tcgetattr(self.raw_fd()).map_err(|e| self.failed("tcgetattr", e))?;
        let c = t.control_modes;
        let data_bits = match c & ControlModes::CSIZE {
            x if x == ControlModes::CS5 => 5,
            x if x == ControlModes::CS6 => 6,
            x if x == ControlModes::CS7 => 7,
            _ => 8,
        };
        let parity = match (c.contains(ControlModes::PARENB), c.contains(ControlModes::PARODD)) {
            (false, _) => 0,
            (true, true) => 1,
            (true, false) => 2,
        };
        let flow = if c.contains(crtscts()) {
            1
        } else if t.input_modes.contains(InputModes::IXON) {
            2
        } else {
            0
        };
        let out = LINE.build(&[
            ("baud", u64::from(t.output_speed())),
            ("data_bits", data_bits),
            ("parity", parity),
            ("stop_bits", if c.contains(ControlModes::CSTOPB) { 2 } else { 1 }),
            ("flow", flow),
        ]);
        Ok(CallOutput {
            scalars: vec![],
            struct_out: out,
        })
    }

    fn set_line(&self, line: &[u8]) -> CallResult {
        let baud = LINE.get(line, "baud");
        let size = match LINE.get(line, "data_bits") {
            5 => ControlModes::CS5,
            6 => ControlModes::CS6,
            7 => ControlModes::CS7,
            8 => ControlModes::CS8,
            other => return Err(bad(format!("data_bits {other}: 5, 6, 7 or 8"))),
        };
        let parity = match LINE.get(line, "parity") {
            0 => ControlModes::empty(),
            1 => ControlModes::PARENB | ControlModes::PARODD,
            2 => ControlModes::PARENB,
            other => return Err(bad(format!("parity {other}: 0 none, 1 odd, 2 even"))),
        };
        let stop = match LINE.get(line, "stop_bits") {
            1 => ControlModes::empty(),
            2 => ControlModes::CSTOPB,
            other => return Err(bad(format!("stop_bits {other}: 1 or 2"))),
        };
        let (hardware, software) = match LINE.get(line, "flow") {
            0 => (false, false),
            1 => (true, false),
            2 => (false, true),
            other => return Err(bad(format!("flow {other}: 0 none, 1 RTS/CTS, 2 XON/XOFF"))),
        };
        if !(1..=4_000_000).contains(&baud) {
            return Err(bad(format!("baud {baud}: 1 to 4000000")));
        }
        let before = rustix::termios::tcgetattr(self.raw_fd()).map_err(|e| self.failed("tcgetattr", e))?;
        let mut t = before.clone();
        t.set_speed(baud as u32)
            .map_err(|e| bad(format!("baud {baud}: the device refuses it ({e})")))?;
        let mut c = t.control_modes
            - (ControlModes::CSIZE | ControlModes::PARENB | ControlModes::PARODD | ControlModes::CSTOPB | crtscts());
        c |= size | parity | stop;
        if hardware {
            c |= crtscts();
        }
        t.control_modes = c;
        t.input_modes.set(InputModes::IXON | InputModes::IXOFF, software);
        rustix::termios::tcsetattr(self.raw_fd(), OptionalActions::Now, &t).map_err(|e| self.failed("tcsetattr", e))?;
        // tcsetattr succeeds when any of the changes took: read back what the device kept, and
        // refuse (restoring the settings before) what it did not.
        let kept = self.get_line()?.struct_out;
        let refused: Vec<String> = ["baud", "data_bits", "parity", "stop_bits", "flow"]
            .into_iter()
            .filter(|f| LINE.get(&kept, f) != LINE.get(line, f))
            .map(|f| format!("{f} {} (it keeps {})", LINE.get(line, f), LINE.get(&kept, f)))
            .collect();
        if !refused.is_empty() {
            let _ = rustix::termios::tcsetattr(self.raw_fd(), OptionalActions::Now, &before);
            return Err(DriverError::new(
                Status::Unsupported,
                format!(
                    "{} does not support {} (a pty is always 8 data bits, no parity)",
                    self.path.display(),
                    refused.join(", ")
                ),
            ));
        }
        Ok(CallOutput::default())
    }

    fn get_modem(&self) -> CallResult {
        let bits = sys::modem_bits(self.raw_fd()).map_err(|e| self.modem_failed(e))?;
        let map = [
            (libc::TIOCM_DTR, modem::DTR),
            (libc::TIOCM_RTS, modem::RTS),
            (libc::TIOCM_CTS, modem::CTS),
            (libc::TIOCM_DSR, modem::DSR),
            (libc::TIOCM_CAR, modem::DCD),
            (libc::TIOCM_RNG, modem::RI),
        ];
        let out = map
            .iter()
            .filter(|(tiocm, _)| bits & tiocm != 0)
            .fold(0, |acc, (_, ours)| acc | ours);
        Ok(CallOutput {
            scalars: vec![out],
            struct_out: vec![],
        })
    }

    fn set_modem(&self, bits: u64, mask: u64) -> CallResult {
        let settable = modem::DTR | modem::RTS;
        if mask & !settable != 0 {
            return Err(bad(format!("mask {mask:#x}: only DTR (1) and RTS (2) can be set")));
        }
        let tiocm = |ours: u64| {
            (if ours & modem::DTR != 0 { libc::TIOCM_DTR } else { 0 })
                | (if ours & modem::RTS != 0 { libc::TIOCM_RTS } else { 0 })
        };
        let (raise, lower) = (tiocm(bits & mask), tiocm(!bits & mask));
        if raise != 0 {
            sys::modem_set(self.raw_fd(), raise).map_err(|e| self.modem_failed(e))?;
        }
        if lower != 0 {
            sys::modem_clear(self.raw_fd(), lower).map_err(|e| self.modem_failed(e))?;
        }
        Ok(CallOutput::default())
    }

    fn modem_failed(&self, e: Errno) -> DriverError {
        if e == Errno::NOTTY || e == Errno::INVAL {
            return DriverError::new(
                Status::Unsupported,
                format!("{} has no modem lines (a pty has none)", self.path.display()),
            );
        }
        self.failed("modem lines", e)
    }

    fn flush(&self, queue: u64) -> CallResult {
        let selector = match queue {
            0 => QueueSelector::IFlush,
            1 => QueueSelector::OFlush,
            2 => QueueSelector::IOFlush,
            other => return Err(bad(format!("queue {other}: 0 input, 1 output, 2 both"))),
        };
        rustix::termios::tcflush(self.raw_fd(), selector).map_err(|e| self.failed("tcflush", e))?;
        Ok(CallOutput::default())
    }

    /// What every asynchronous method needs: the descriptor, the path for messages, its
    /// counter while it waits, and the termination signal.
    fn pending(&self) -> Pending {
        Pending {
            fd: self.fd.clone(),
            path: self.path.clone(),
            _waiting: Waiting::new(&self.waiting),
            _writing: None,
            terminated: self.terminated.subscribe(),
        }
    }

    /// A pending write, counted as one until its bytes are all taken (sleep waits for it).
    fn pending_write(&self) -> Pending {
        Pending {
            _writing: Some(Waiting::new(&self.writing)),
            ..self.pending()
        }
    }
}

/// The `CRTSCTS` flag (hardware flow control), which `rustix` does not name.
fn crtscts() -> ControlModes {
    ControlModes::from_bits_retain(libc::CRTSCTS)
}

fn failure(path: &Path, what: &str, e: Errno) -> DriverError {
    if e == Errno::IO || e == Errno::NXIO || e == Errno::NODEV {
        return DriverError::new(
            Status::NoDevice,
            format!("{} went away (hung up): {what}: {e}", path.display()),
        );
    }
    DriverError::new(Status::Internal, format!("{}: {what}: {e}", path.display()))
}

fn timeout_ms(ms: u64) -> Result<Duration, DriverError> {
    if ms > MAX_TIMEOUT_MS {
        return Err(bad(format!("timeout_ms {ms}: at most {MAX_TIMEOUT_MS}")));
    }
    Ok(Duration::from_millis(ms))
}

/// An asynchronous method's hold on the device.
struct Pending {
    fd: Arc<AsyncFd<OwnedFd>>,
    path: PathBuf,
    _waiting: Waiting,
    _writing: Option<Waiting>,
    terminated: watch::Receiver<bool>,
}

impl Pending {
    fn aborted() -> DriverError {
        DriverError::new(Status::NoDevice, "the tty went away (its service was terminated)")
    }

    /// Writes all of `bytes`, or as much as the device takes before `deadline`.
    async fn write(mut self, bytes: Vec<u8>, mut written: usize, deadline: Instant) -> CallResult {
        while written < bytes.len() {
            let ready = tokio::select! {
                ready = self.fd.writable() => ready,
                () = tokio::time::sleep_until(deadline) => break,
                _ = self.terminated.wait_for(|t| *t) => return Err(Pending::aborted()),
            };
            let mut guard = ready.map_err(|e| DriverError::new(Status::Internal, e.to_string()))?;
            let rest = bytes.get(written..).unwrap_or_default();
            match guard.try_io(|fd| rustix::io::write(fd.get_ref(), rest).map_err(std::io::Error::from)) {
                Ok(Ok(n)) => written += n,
                Ok(Err(e)) => {
                    return Err(failure(
                        &self.path,
                        "write",
                        Errno::from_io_error(&e).unwrap_or(Errno::IO),
                    ));
                }
                Err(_would_block) => {}
            }
        }
        if written == 0 && !bytes.is_empty() {
            return Err(DriverError::new(
                Status::Timeout,
                "the tty took nothing before the timeout",
            ));
        }
        Ok(CallOutput {
            scalars: vec![written as u64],
            struct_out: vec![],
        })
    }

    /// Reads what arrives first, up to `max` bytes, by `deadline`.
    async fn read(mut self, max: usize, deadline: Instant) -> CallResult {
        let mut buf = vec![0u8; max];
        loop {
            let ready = tokio::select! {
                ready = self.fd.readable() => ready,
                () = tokio::time::sleep_until(deadline) => {
                    return Err(DriverError::new(Status::Timeout, "no bytes arrived before the timeout"));
                }
                _ = self.terminated.wait_for(|t| *t) => return Err(Pending::aborted()),
            };
            let mut guard = ready.map_err(|e| DriverError::new(Status::Internal, e.to_string()))?;
            match guard.try_io(|fd| rustix::io::read(fd.get_ref(), &mut buf).map_err(std::io::Error::from)) {
                // End of file on a tty: it hung up.
                Ok(Ok(0)) => return Err(failure(&self.path, "read", Errno::IO)),
                Ok(Ok(n)) => {
                    buf.truncate(n);
                    return Ok(CallOutput {
                        scalars: vec![],
                        struct_out: buf,
                    });
                }
                Ok(Err(e)) => {
                    return Err(failure(
                        &self.path,
                        "read",
                        Errno::from_io_error(&e).unwrap_or(Errno::IO),
                    ));
                }
                Err(_would_block) => {}
            }
        }
    }

    /// Waits until the output queue is empty, by `deadline` (polling `TIOCOUTQ`: the kernel
    /// offers no readiness for "sent").
    async fn drain(mut self, deadline: Instant) -> CallResult {
        let mut nap = Duration::from_micros(200);
        loop {
            let queued =
                sys::output_queued(self.fd.get_ref().as_fd()).map_err(|e| failure(&self.path, "TIOCOUTQ", e))?;
            if queued == 0 {
                return Ok(CallOutput::default());
            }
            tokio::select! {
                () = tokio::time::sleep(nap) => {}
                () = tokio::time::sleep_until(deadline) => {
                    return Err(DriverError::new(Status::Timeout, format!("{queued} bytes still queued at the timeout")));
                }
                _ = self.terminated.wait_for(|t| *t) => return Err(Pending::aborted()),
            }
            nap = (nap * 2).min(Duration::from_millis(20));
        }
    }

    /// Holds a break for `duration`; the break ends whatever ends the call.
    async fn send_break(mut self, duration: Duration) -> CallResult {
        struct Break<'a>(&'a AsyncFd<OwnedFd>);
        impl Drop for Break<'_> {
            fn drop(&mut self) {
                let _ = sys::set_break(self.0.get_ref().as_fd(), false);
            }
        }
        sys::set_break(self.fd.get_ref().as_fd(), true).map_err(|e| failure(&self.path, "TIOCSBRK", e))?;
        let _held = Break(&self.fd);
        tokio::select! {
            () = tokio::time::sleep(duration) => Ok(CallOutput::default()),
            _ = self.terminated.wait_for(|t| *t) => Err(Pending::aborted()),
        }
    }
}

impl Driver for TtyDevice {
    fn family(&self) -> &'static Family {
        &FAMILY
    }

    fn open_limit(&self) -> Option<usize> {
        Some(1)
    }

    fn call(&self, ctx: &CallContext<'_>, spec: &MethodSpec, args: CallArgs) -> Completion {
        let ready = Completion::Ready;
        let Some(selector) = Selector::from_u32(spec.selector) else {
            return ready(Err(DriverError::new(
                Status::Internal,
                format!("no tty method {}", spec.selector),
            )));
        };
        match selector {
            Selector::GetLine => ready(self.get_line()),
            Selector::SetLine => ready(self.set_line(&args.struct_in)),
            Selector::GetModem => ready(self.get_modem()),
            Selector::SetModem => {
                let [bits, mask] = args.scalars();
                ready(self.set_modem(bits, mask))
            }
            Selector::Flush => {
                let [queue] = args.scalars();
                ready(self.flush(queue))
            }
            Selector::Write => {
                let [ms] = args.scalars();
                let deadline = match timeout_ms(ms) {
                    Ok(t) => Instant::now() + t,
                    Err(e) => return ready(Err(e)),
                };
                // What the device takes now is written now; only the rest waits.
                let written = match rustix::io::write(self.raw_fd(), &args.struct_in) {
                    Ok(n) => n,
                    Err(Errno::AGAIN) => 0,
                    Err(e) => return ready(Err(self.failed("write", e))),
                };
                if written == args.struct_in.len() {
                    return ready(Ok(CallOutput {
                        scalars: vec![written as u64],
                        struct_out: vec![],
                    }));
                }
                Completion::Pending(Box::pin(self.pending_write().write(args.struct_in, written, deadline)))
            }
            Selector::Read => {
                let [max_len, ms] = args.scalars();
                let room = (IO_MAX as usize).min(args.struct_out_cap);
                if max_len == 0 || max_len as usize > room {
                    return ready(Err(bad(format!("max_len {max_len}: 1 to {room}"))));
                }
                let deadline = match timeout_ms(ms) {
                    Ok(t) => Instant::now() + t,
                    Err(e) => return ready(Err(e)),
                };
                // Bytes already there are answered now; only an empty tty waits.
                let mut buf = vec![0u8; max_len as usize];
                match rustix::io::read(self.raw_fd(), &mut buf) {
                    Ok(0) => ready(Err(self.failed("read", Errno::IO))),
                    Ok(n) => {
                        buf.truncate(n);
                        ready(Ok(CallOutput {
                            scalars: vec![],
                            struct_out: buf,
                        }))
                    }
                    Err(Errno::AGAIN) => Completion::Pending(Box::pin(self.pending().read(max_len as usize, deadline))),
                    Err(e) => ready(Err(self.failed("read", e))),
                }
            }
            Selector::Drain => {
                let [ms] = args.scalars();
                match timeout_ms(ms) {
                    Ok(t) => Completion::Pending(Box::pin(self.pending().drain(Instant::now() + t))),
                    Err(e) => ready(Err(e)),
                }
            }
            Selector::SendBreak => {
                let [ms] = args.scalars();
                if ms == 0 || ms > MAX_BREAK_MS {
                    return ready(Err(bad(format!("duration_ms {ms}: 1 to {MAX_BREAK_MS}"))));
                }
                (ctx.notify)(DriverNotice {
                    kind: "break",
                    value: ms,
                    detail: format!("a {ms} ms break on {}", self.path.display()),
                });
                Completion::Pending(Box::pin(self.pending().send_break(Duration::from_millis(ms))))
            }
        }
    }

    fn opened(&self, client: ClientKey, _mode: OpenMode) -> Result<(), DriverError> {
        let now = rustix::termios::tcgetattr(self.raw_fd()).map_err(|e| self.failed("tcgetattr", e))?;
        self.saved.lock().unwrap_or_else(|e| e.into_inner()).insert(client, now);
        self.opens.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn closed(&self, client: ClientKey) {
        self.opens.fetch_sub(1, Ordering::Relaxed);
        let saved = self.saved.lock().unwrap_or_else(|e| e.into_inner()).remove(&client);
        if let Some(settings) = saved
            && let Err(e) = rustix::termios::tcsetattr(self.raw_fd(), OptionalActions::Now, &settings)
        {
            tracing::warn!(tty = %self.path.display(), error = %e, "could not restore the line settings of a closed user client");
        }
    }

    fn terminate(&self) {
        self.terminated.send_replace(true);
    }

    /// Going to sleep: the writes in progress and the output queued go out first (by the
    /// deadline), and the line settings are kept; on wake they are set again, whatever the
    /// device lost meanwhile.
    fn power(&self, change: PowerChange, deadline: std::time::Instant) -> Result<(), DriverError> {
        let fd = self.raw_fd();
        match change {
            PowerChange::Sleep => {
                let mut nap = Duration::from_micros(200);
                loop {
                    let queued = sys::output_queued(fd).map_err(|e| self.failed("TIOCOUTQ", e))?;
                    let writes = self.writing.load(Ordering::Relaxed);
                    if queued == 0 && writes == 0 {
                        break;
                    }
                    if std::time::Instant::now() >= deadline {
                        return Err(DriverError::new(
                            Status::Timeout,
                            format!(
                                "{writes} writes in progress and {queued} bytes still queued for the device at the deadline"
                            ),
                        ));
                    }
                    // The kernel offers no readiness for "sent": poll TIOCOUTQ, as `drain` does.
                    std::thread::sleep(nap);
                    nap = (nap * 2).min(Duration::from_millis(20));
                }
                let settings = rustix::termios::tcgetattr(fd).map_err(|e| self.failed("tcgetattr", e))?;
                *self.asleep.lock().unwrap_or_else(|e| e.into_inner()) = Some(settings);
            }
            PowerChange::Wake => {
                let saved = self.asleep.lock().unwrap_or_else(|e| e.into_inner()).take();
                if let Some(settings) = saved {
                    rustix::termios::tcsetattr(fd, OptionalActions::Now, &settings)
                        .map_err(|e| self.failed("tcsetattr", e))?;
                }
            }
        }
        Ok(())
    }

    fn live(&self) -> DriverLive {
        DriverLive {
            opens: self.opens.load(Ordering::Relaxed),
            waiting: self.waiting.load(Ordering::Relaxed),
        }
    }
}

impl Drop for TtyDevice {
    fn drop(&mut self) {
        // The device as the broker found it.
        if rustix::termios::tcsetattr(self.raw_fd(), OptionalActions::Now, &self.original).is_ok()
            && let Some(key) = &self.state_key
        {
            crate::drivers::state::remove(key);
        }
    }
}

/// The control characters a state file keeps, in its order.
const CODES: [rustix::termios::SpecialCodeIndex; 17] = {
    use rustix::termios::SpecialCodeIndex as I;
    [
        I::VINTR,
        I::VQUIT,
        I::VERASE,
        I::VKILL,
        I::VEOF,
        I::VTIME,
        I::VMIN,
        I::VSWTC,
        I::VSTART,
        I::VSTOP,
        I::VSUSP,
        I::VEOL,
        I::VREPRINT,
        I::VDISCARD,
        I::VWERASE,
        I::VLNEXT,
        I::VEOL2,
    ]
};

/// Line settings as the run dir keeps them: one line of numbers.
fn settings_text(t: &Termios) -> String {
    let codes: Vec<String> = CODES.iter().map(|i| t.special_codes[*i].to_string()).collect();
    format!(
        "portcullis-termios 1 {} {} {} {} {} {} {} {}\n",
        t.input_modes.bits(),
        t.output_modes.bits(),
        t.control_modes.bits(),
        t.local_modes.bits(),
        t.line_discipline,
        t.input_speed(),
        t.output_speed(),
        codes.join(",")
    )
}

/// [`settings_text`] read back over `base` (the device's settings now), or `None` when the
/// text is not exactly that form.
fn parse_settings(text: &str, base: &Termios) -> Option<Termios> {
    use rustix::termios::{LocalModes, OutputModes};
    let mut words = text.trim_end().split(' ');
    if (words.next()?, words.next()?) != ("portcullis-termios", "1") {
        return None;
    }
    let mut number = || words.next()?.parse::<u64>().ok();
    let (iflag, oflag, cflag, lflag) = (number()?, number()?, number()?, number()?);
    let (line, ispeed, ospeed) = (number()?, number()?, number()?);
    let codes: Vec<u8> = words
        .next()?
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    if words.next().is_some() {
        return None;
    }
    let mut t = base.clone();
    t.input_modes = InputModes::from_bits_retain(iflag.try_into().ok()?);
    t.output_modes = OutputModes::from_bits_retain(oflag.try_into().ok()?);
    t.control_modes = ControlModes::from_bits_retain(cflag.try_into().ok()?);
    t.local_modes = LocalModes::from_bits_retain(lflag.try_into().ok()?);
    t.line_discipline = line.try_into().ok()?;
    if codes.len() != CODES.len() {
        return None;
    }
    for (i, code) in CODES.iter().zip(codes) {
        t.special_codes[*i] = code;
    }
    t.set_input_speed(ispeed.try_into().ok()?).ok()?;
    t.set_output_speed(ospeed.try_into().ok()?).ok()?;
    Some(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::ServiceId;

    /// A pty pair: the master end (the test's "hardware") and the follower's path.
    fn pty() -> (OwnedFd, PathBuf) {
        use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
        let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC).unwrap();
        grantpt(&master).unwrap();
        unlockpt(&master).unwrap();
        let name = ptsname(&master, Vec::new()).unwrap();
        (master, PathBuf::from(name.to_str().unwrap()))
    }

    #[test]
    fn tty_settings_text_round_trips_and_anything_else_is_refused() {
        let (master, _) = pty();
        let mut t = rustix::termios::tcgetattr(&master).unwrap();
        t.set_speed(57_600).unwrap();
        t.special_codes[rustix::termios::SpecialCodeIndex::VMIN] = 3;
        let text = settings_text(&t);
        let mut raw = t.clone();
        raw.make_raw();
        raw.set_speed(9600).unwrap();
        let back = parse_settings(&text, &raw).unwrap();
        assert_eq!(settings_text(&back), text);
        assert_eq!(back.output_speed(), 57_600);
        for bad in [
            "",
            "portcullis-termios 2 1 2 3 4 0 9600 9600 0",
            &text.replace(" 1 ", " x "),
            &format!("{} 9", text.trim_end()),
        ] {
            assert!(parse_settings(bad, &raw).is_none(), "{bad:?}");
        }
    }

    fn call(dev: &TtyDevice, selector: Selector, scalars: Vec<u64>, s: Vec<u8>) -> Completion {
        let (_, spec) = dev.methods().get(selector as u32).unwrap();
        let args = spec.check_args(scalars, s, u32::MAX).unwrap();
        let notify = |_: DriverNotice| {};
        let ctx = CallContext {
            service: ServiceId(1),
            client: ClientKey(1),
            mode: OpenMode::Shared,
            memory: &[],
            notify: &notify,
        };
        dev.call(&ctx, spec, args)
    }

    async fn finish(c: Completion) -> CallResult {
        match c {
            Completion::Ready(r) => r,
            Completion::Pending(f) => f.await,
        }
    }

    #[test]
    fn tty_table_and_layout_are_valid() {
        assert_eq!(FAMILY.methods().rows().len(), TABLE.len());
        assert_eq!(LINE.size(), 8);
        assert_eq!(
            TABLE.iter().filter_map(|r| r.privilege).collect::<Vec<_>>(),
            ["tty.break"]
        );
    }

    #[tokio::test]
    async fn tty_line_settings_round_trip_and_bad_values_are_refused() {
        let (_master, path) = pty();
        let dev = TtyDevice::open(&path).unwrap();
        let line = LINE.build(&[
            ("baud", 19200),
            ("data_bits", 8),
            ("parity", 0),
            ("stop_bits", 2),
            ("flow", 1),
        ]);
        finish(call(&dev, Selector::SetLine, vec![], line.clone()))
            .await
            .unwrap();
        let got = finish(call(&dev, Selector::GetLine, vec![], vec![]))
            .await
            .unwrap()
            .struct_out;
        assert_eq!(got, line);
        // A pty keeps 8 data bits and no parity whatever it is told: refused, and nothing changes.
        let mut seven_even = line.clone();
        LINE.set(&mut seven_even, "data_bits", 7);
        LINE.set(&mut seven_even, "parity", 2);
        LINE.set(&mut seven_even, "baud", 9600);
        let err = finish(call(&dev, Selector::SetLine, vec![], seven_even))
            .await
            .unwrap_err();
        assert_eq!(err.status, Status::Unsupported, "{err}");
        assert!(
            err.message.contains("data_bits 7 (it keeps 8), parity 2 (it keeps 0)"),
            "{err}"
        );
        let got = finish(call(&dev, Selector::GetLine, vec![], vec![]))
            .await
            .unwrap()
            .struct_out;
        assert_eq!(got, line, "the refused settings were undone, baud included");
        for (field, value) in [
            ("data_bits", 9),
            ("parity", 3),
            ("stop_bits", 3),
            ("flow", 7),
            ("baud", 0),
        ] {
            let mut wrong = line.clone();
            LINE.set(&mut wrong, field, value);
            let err = finish(call(&dev, Selector::SetLine, vec![], wrong)).await.unwrap_err();
            assert_eq!(err.status, Status::BadArgument, "{field}");
        }
    }

    #[tokio::test]
    async fn tty_modem_lines_on_a_pty_are_unsupported() {
        let (_master, path) = pty();
        let dev = TtyDevice::open(&path).unwrap();
        let err = finish(call(&dev, Selector::GetModem, vec![], vec![]))
            .await
            .unwrap_err();
        assert_eq!(err.status, Status::Unsupported, "{err}");
        let err = finish(call(&dev, Selector::SetModem, vec![1, 4], vec![]))
            .await
            .unwrap_err();
        assert_eq!(err.status, Status::BadArgument, "CTS cannot be set: {err}");
    }

    #[tokio::test]
    async fn tty_read_times_out_and_a_hangup_is_no_device() {
        let (master, path) = pty();
        let dev = TtyDevice::open(&path).unwrap();
        let err = finish(call(&dev, Selector::Read, vec![16, 1], vec![]))
            .await
            .unwrap_err();
        assert_eq!(err.status, Status::Timeout);
        let pending = call(&dev, Selector::Read, vec![16, 60_000], vec![]);
        drop(master);
        let err = finish(pending).await.unwrap_err();
        assert_eq!(err.status, Status::NoDevice, "{err}");
    }

    #[tokio::test]
    async fn tty_restores_a_clients_settings_when_it_closes_and_the_devices_when_dropped() {
        let (master, path) = pty();
        let before = rustix::termios::tcgetattr(&master).unwrap();
        let dev = TtyDevice::open(&path).unwrap();
        dev.opened(ClientKey(9), OpenMode::Exclusive).unwrap();
        let at_open = finish(call(&dev, Selector::GetLine, vec![], vec![]))
            .await
            .unwrap()
            .struct_out;
        let changed = LINE.build(&[
            ("baud", 300),
            ("data_bits", 8),
            ("parity", 0),
            ("stop_bits", 2),
            ("flow", 2),
        ]);
        finish(call(&dev, Selector::SetLine, vec![], changed.clone()))
            .await
            .unwrap();
        assert_eq!(
            finish(call(&dev, Selector::GetLine, vec![], vec![]))
                .await
                .unwrap()
                .struct_out,
            changed
        );
        dev.closed(ClientKey(9));
        assert_eq!(
            finish(call(&dev, Selector::GetLine, vec![], vec![]))
                .await
                .unwrap()
                .struct_out,
            at_open
        );
        drop(dev);
        let after = rustix::termios::tcgetattr(&master).unwrap();
        assert_eq!(after.local_modes, before.local_modes, "raw mode undone");
        assert_eq!(after.output_speed(), before.output_speed());
    }
}
