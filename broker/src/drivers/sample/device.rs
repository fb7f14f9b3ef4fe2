//! The sample device's state and method implementations.

use std::{
    sync::{
        Mutex,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use portcullis_proto::Status;
use tokio::sync::oneshot;

use portcullis_proto::layout::{AbiId, Elem, Scalar, StructLayout};

use super::methods::{
    DMA, LAYOUTS, MAX_WAIT_MS, MEMORY_TYPES, REGISTERS, REGISTERS_MAGIC, SAMPLE_VERSION, Selector, TABLE,
};
use std::{os::fd::OwnedFd, sync::Arc};

use crate::{
    driver::{
        Backing, CallArgs, CallContext, CallOutput, ClientKey, Completion, Driver, DriverError, DriverNotice, Family,
        MemoryType, MethodSpec, memory,
    },
    registry::OpenMode,
};

/// The sample family: its class, table, layouts and memory types.
pub static FAMILY: std::sync::LazyLock<Family> =
    std::sync::LazyLock::new(|| Family::new("sample", "SampleDevice", LAYOUTS, &TABLE, &MEMORY_TYPES));

/// One sample device.
#[derive(Debug)]
pub struct SampleDevice {
    /// `sample_record` in the broker's native layout.
    record: StructLayout,
    calls_served: AtomicU64,
    opens: AtomicU32,
    /// Pending `wait_event` calls by number. A waiting call removes its own entry when it ends
    /// however it ends (answered, timed out or cancelled), so registering and leaving cost the
    /// same with a hundred thousand waiters as with none.
    waiters: Arc<Waiters>,
    /// The `registers` page, shared by every user client (they get read-only descriptors).
    registers: Mutex<Option<Arc<OwnedFd>>>,
}

impl Default for SampleDevice {
    fn default() -> Self {
        SampleDevice::new()
    }
}

impl SampleDevice {
    /// A fresh device.
    pub fn new() -> SampleDevice {
        let schema = FAMILY.schema();
        let record = schema.layout(schema.index("sample_record").unwrap_or_default(), AbiId::native().abi());
        SampleDevice {
            record,
            calls_served: AtomicU64::new(0),
            opens: AtomicU32::new(0),
            waiters: Arc::default(),
            registers: Mutex::new(None),
        }
    }

    /// Pending `wait_event` calls still waiting.
    pub fn pending_waiters(&self) -> usize {
        self.waiters.lock().len()
    }

    fn info(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16);
        out.extend_from_slice(&SAMPLE_VERSION.to_ne_bytes());
        out.extend_from_slice(&self.opens.load(Ordering::Relaxed).to_ne_bytes());
        out.extend_from_slice(&self.calls_served.load(Ordering::Relaxed).to_ne_bytes());
        out
    }

    fn wait_event(&self, timeout_ms: u64) -> Completion {
        if timeout_ms > MAX_WAIT_MS {
            return Completion::Ready(Err(DriverError::new(
                Status::BadArgument,
                format!("timeout_ms must be at most {MAX_WAIT_MS}"),
            )));
        }
        let (tx, rx) = oneshot::channel();
        let waiting = Waiting::register(&self.waiters, tx);
        Completion::Pending(Box::pin(async move {
            let _waiting = waiting;
            match tokio::time::timeout(Duration::from_millis(timeout_ms), rx).await {
                Ok(Ok(value)) => Ok(CallOutput {
                    scalars: vec![value],
                    struct_out: vec![],
                }),
                Ok(Err(_)) => Err(DriverError::new(Status::NoDevice, "the device was terminated")),
                Err(_) => Err(DriverError::new(
                    Status::Timeout,
                    format!("no event within {timeout_ms} ms"),
                )),
            }
        }))
    }

    fn fire_event(&self, ctx: &CallContext<'_>, value: u64) -> u64 {
        let waiters = std::mem::take(&mut self.waiters.lock().pending);
        let completed = waiters.into_iter().filter_map(|(_, (_, w))| w.send(value).ok()).count() as u64;
        (ctx.notify)(DriverNotice {
            kind: "event",
            value,
            detail: format!("completed {completed} waiter(s)"),
        });
        completed
    }
}

/// The pending `wait_event` calls of one device.
#[derive(Debug, Default)]
struct Waiters(Mutex<WaiterMap>);

/// Each waiter is in a slot of a slab, with the id that tells it from a later waiter in the same
/// slot. A slab, not a hash map: the slot a waiter frees is the next one taken, so registering
/// and cancelling costs the same with 100,000 others waiting as with none (a hash map puts every
/// new id in a cold bucket of a table as big as the most that ever waited).
#[derive(Debug, Default)]
struct WaiterMap {
    next: u64,
    pending: slab::Slab<(u64, oneshot::Sender<u64>)>,
}

impl WaiterMap {
    fn len(&self) -> usize {
        self.pending.len()
    }
}

impl Waiters {
    fn lock(&self) -> std::sync::MutexGuard<'_, WaiterMap> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A registered waiter; leaves the device's map when dropped (a fired waiter already has, and
/// its slot may hold another waiter by then).
struct Waiting {
    waiters: Arc<Waiters>,
    slot: usize,
    id: u64,
}

impl Waiting {
    fn register(waiters: &Arc<Waiters>, tx: oneshot::Sender<u64>) -> Waiting {
        let mut map = waiters.lock();
        let id = map.next;
        map.next += 1;
        let slot = map.pending.insert((id, tx));
        Waiting {
            waiters: waiters.clone(),
            slot,
            id,
        }
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let mut map = self.waiters.lock();
        if map.pending.get(self.slot).is_some_and(|(id, _)| *id == self.id) {
            map.pending.remove(self.slot);
        }
    }
}

impl Driver for SampleDevice {
    fn family(&self) -> &'static Family {
        &FAMILY
    }

    fn create_memory(&self, memory_type: &MemoryType) -> Result<Backing, DriverError> {
        let failed = |e: std::io::Error| DriverError::new(Status::NoMemory, format!("{}: {e}", memory_type.name));
        match memory_type.id {
            id if id == REGISTERS.id => {
                let mut registers = self.registers.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(fd) = registers.as_ref() {
                    return Ok(Backing {
                        fd: fd.clone(),
                        revocable: false,
                        region: None,
                    });
                }
                let mut page = SAMPLE_VERSION.to_le_bytes().to_vec();
                page.extend_from_slice(&REGISTERS_MAGIC.to_le_bytes());
                let fd = memory::create_read_only("portcullis-sample-registers", REGISTERS.size, |fd| {
                    rustix::io::pwrite(fd, &page, 0).map(drop).map_err(Into::into)
                })
                .map_err(failed)?;
                let fd = Arc::new(fd);
                *registers = Some(fd.clone());
                Ok(Backing {
                    fd,
                    revocable: false,
                    region: None,
                })
            }
            id if id == DMA.id => {
                let fd = memory::create_writable("portcullis-sample-dma", DMA.size).map_err(failed)?;
                Ok(Backing {
                    fd: Arc::new(fd),
                    revocable: true,
                    region: None,
                })
            }
            other => Err(DriverError::new(Status::BadArgument, format!("no memory type {other}"))),
        }
    }

    fn call(&self, ctx: &CallContext<'_>, spec: &MethodSpec, args: CallArgs) -> Completion {
        self.calls_served.fetch_add(1, Ordering::Relaxed);
        let done = |scalars: Vec<u64>, struct_out: Vec<u8>| Completion::Ready(Ok(CallOutput { scalars, struct_out }));
        match Selector::from_u32(spec.selector) {
            Some(Selector::Add) => {
                let [a, b] = args.scalars();
                done(vec![a.wrapping_add(b)], vec![])
            }
            Some(Selector::Echo) => done(vec![], args.struct_in),
            Some(Selector::GetInfo) => done(vec![], self.info()),
            Some(Selector::WaitEvent) => {
                let [timeout_ms] = args.scalars();
                self.wait_event(timeout_ms)
            }
            Some(Selector::FireEvent) => {
                let [value] = args.scalars();
                done(vec![self.fire_event(ctx, value)], vec![])
            }
            Some(Selector::Reset) => {
                self.calls_served.store(0, Ordering::Relaxed);
                done(vec![], vec![])
            }
            Some(Selector::TransformRecord) => done(vec![], transform(&self.record, args.struct_in)),
            Some(Selector::ChecksumDma) => {
                let [offset, len] = args.scalars();
                Completion::Ready(checksum_dma(ctx, offset, len).map(|sum| CallOutput {
                    scalars: vec![sum],
                    struct_out: vec![],
                }))
            }
            None => Completion::Ready(Err(unknown(spec))),
        }
    }

    fn opened(&self, _client: ClientKey, _mode: OpenMode) -> Result<(), DriverError> {
        self.opens.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn closed(&self, _client: ClientKey) {
        self.opens.fetch_sub(1, Ordering::Relaxed);
    }

    fn terminate(&self) {
        // Dropping the senders completes every waiter with NO_DEVICE.
        self.waiters.lock().pending.clear();
    }

    fn live(&self) -> crate::driver::DriverLive {
        crate::driver::DriverLive {
            opens: self.opens.load(Ordering::Relaxed) as usize,
            waiting: self.pending_waiters(),
        }
    }
}

/// FNV-1a 64 of the calling user client's `dma[offset..offset + len]`, read with `pread` (the
/// broker never maps client-writable memory, so a client that shrinks the buffer gets an error,
/// not a fault in the broker).
fn checksum_dma(ctx: &CallContext<'_>, offset: u64, len: u64) -> Result<u64, DriverError> {
    let dma = ctx
        .memory(DMA.id)
        .ok_or_else(|| DriverError::new(Status::BadArgument, "map the dma memory type first"))?;
    let end = offset.checked_add(len).filter(|end| *end <= DMA.size);
    if end.is_none() {
        return Err(DriverError::new(
            Status::BadArgument,
            format!("{offset}+{len} is outside the {}-byte dma buffer", DMA.size),
        ));
    }
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut chunk = vec![0u8; 64 * 1024];
    let mut at = offset;
    while at < offset + len {
        let want = usize::try_from((offset + len - at).min(chunk.len() as u64)).unwrap_or(chunk.len());
        let buf = chunk.get_mut(..want).unwrap_or_default();
        let got = rustix::io::pread(&*dma.backing.fd, &mut *buf, at)
            .map_err(|e| DriverError::new(Status::Internal, format!("dma: {e}")))?;
        if got == 0 {
            return Err(DriverError::new(Status::BadArgument, "the dma buffer was truncated"));
        }
        for b in buf.get(..got).unwrap_or_default() {
            hash = (hash ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        at += got as u64;
    }
    Ok(hash)
}

/// The documented transform of a native `sample_record` (see `methods.rs`). The core has checked
/// the size, so every field is in bounds; `get_mut` keeps that a checked fact.
fn transform(record: &StructLayout, mut buf: Vec<u8>) -> Vec<u8> {
    for f in &record.fields {
        let Some(bytes) = buf.get_mut(f.offset as usize..(f.offset + f.size) as usize) else {
            continue;
        };
        match (f.name.as_str(), f.elem) {
            ("tail", _) => bytes.iter_mut().for_each(|b| *b = !*b),
            (_, Elem::Scalar(Scalar::F32)) => {
                let v = f32::from_ne_bytes(bytes.try_into().unwrap_or_default()) * 2.0;
                bytes.copy_from_slice(&v.to_ne_bytes());
            }
            (_, Elem::Scalar(Scalar::F64)) => {
                let v = f64::from_ne_bytes(bytes.try_into().unwrap_or_default()) * 2.0;
                bytes.copy_from_slice(&v.to_ne_bytes());
            }
            (_, Elem::Scalar(Scalar::Bool)) => bytes.iter_mut().for_each(|b| *b ^= 1),
            (_, Elem::Scalar(_)) => add_one(bytes),
            (_, Elem::Char) => bytes.make_ascii_uppercase(),
            (_, Elem::Struct(_)) => {
                // sample_inner[3]: reverse the elements, then + 1 on each tag (the first byte).
                let count = f.count.unwrap_or(1) as usize;
                let elem = bytes.len() / count.max(1);
                let elems: Vec<Vec<u8>> = bytes.chunks(elem).rev().map(<[u8]>::to_vec).collect();
                for (chunk, mut e) in bytes.chunks_mut(elem).zip(elems) {
                    if let Some(tag) = e.first_mut() {
                        *tag = tag.wrapping_add(1);
                    }
                    chunk.copy_from_slice(&e);
                }
            }
        }
    }
    buf
}

/// + 1 on a native-endian integer of any width, wrapping at that width.
fn add_one(bytes: &mut [u8]) {
    let little = cfg!(target_endian = "little");
    let order: Box<dyn Iterator<Item = &mut u8>> = if little {
        Box::new(bytes.iter_mut())
    } else {
        Box::new(bytes.iter_mut().rev())
    };
    for b in order {
        let (v, carry) = b.overflowing_add(1);
        *b = v;
        if !carry {
            break;
        }
    }
}

fn unknown(spec: &MethodSpec) -> DriverError {
    DriverError::new(
        Status::Internal,
        format!("sample device has no implementation for selector {}", spec.selector),
    )
}

/// Runs a completion to its result (tests).
#[cfg(test)]
async fn finish(c: Completion) -> crate::driver::CallResult {
    match c {
        Completion::Ready(r) => r,
        Completion::Pending(f) => f.await,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::registry::ServiceId;

    fn with_ctx<R>(f: impl FnOnce(&CallContext<'_>) -> R) -> (R, Vec<DriverNotice>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let notify = move |n: DriverNotice| sink.lock().unwrap().push(n);
        let ctx = CallContext {
            service: ServiceId(3),
            client: ClientKey(1),
            mode: OpenMode::Shared,
            memory: &[],
            notify: &notify,
        };
        let r = f(&ctx);
        let notices = seen.lock().unwrap().clone();
        (r, notices)
    }

    fn call(dev: &SampleDevice, ctx: &CallContext<'_>, sel: Selector, scalars: Vec<u64>, s: Vec<u8>) -> Completion {
        let (_, spec) = dev.methods().get(sel as u32).unwrap();
        let args = spec.check_args(scalars, s, u32::MAX).unwrap();
        dev.call(ctx, spec, args)
    }

    #[test]
    fn a_fired_waiter_leaving_does_not_take_a_later_waiter_in_its_slot() {
        let waiters = Arc::new(Waiters::default());
        let (tx, mut fired_rx) = tokio::sync::oneshot::channel();
        let fired = Waiting::register(&waiters, tx);
        // Fired: the map is emptied, and a new waiter takes the same slot.
        let taken = std::mem::take(&mut waiters.lock().pending);
        taken.into_iter().for_each(|(_, (_, tx))| tx.send(7).unwrap());
        let (tx, mut later_rx) = tokio::sync::oneshot::channel();
        let later = Waiting::register(&waiters, tx);
        assert_eq!(later.slot, fired.slot);
        drop(fired);
        assert_eq!(waiters.lock().len(), 1, "the later waiter is still registered");
        assert_eq!(fired_rx.try_recv(), Ok(7));
        // Cancelled: it leaves, and its slot is the next one taken.
        drop(later);
        assert_eq!(waiters.lock().len(), 0);
        assert!(later_rx.try_recv().is_err());
        let (tx, _rx) = tokio::sync::oneshot::channel();
        assert_eq!(Waiting::register(&waiters, tx).slot, 0);
    }

    #[test]
    fn sample_table_is_valid() {
        let schema = portcullis_proto::layout::Schema::from_toml(LAYOUTS).unwrap();
        assert!(crate::driver::MethodTable::with_schema(&TABLE, &schema).is_ok());
        assert_eq!(FAMILY.methods().rows().len(), TABLE.len());
        assert_eq!(TABLE.iter().filter(|r| r.privilege.is_some()).count(), 1);
    }

    #[tokio::test]
    async fn sample_add_wraps() {
        let dev = SampleDevice::new();
        let (c, _) = with_ctx(|ctx| call(&dev, ctx, Selector::Add, vec![u64::MAX, 2], vec![]));
        assert_eq!(finish(c).await.unwrap().scalars, vec![1]);
    }

    #[tokio::test]
    async fn sample_get_info_counts_calls_and_opens() {
        let dev = SampleDevice::new();
        dev.opened(ClientKey(1), OpenMode::Shared).unwrap();
        let (c, _) = with_ctx(|ctx| {
            let _ = call(&dev, ctx, Selector::Add, vec![1, 2], vec![]);
            call(&dev, ctx, Selector::GetInfo, vec![], vec![])
        });
        let info = finish(c).await.unwrap().struct_out;
        assert_eq!(info.len(), 16);
        assert_eq!(u32::from_ne_bytes(info[0..4].try_into().unwrap()), SAMPLE_VERSION);
        assert_eq!(u32::from_ne_bytes(info[4..8].try_into().unwrap()), 1);
        assert_eq!(u64::from_ne_bytes(info[8..16].try_into().unwrap()), 2);
    }

    #[tokio::test]
    async fn sample_fire_completes_waiters_and_notifies() {
        let dev = SampleDevice::new();
        let (pending, _) = with_ctx(|ctx| call(&dev, ctx, Selector::WaitEvent, vec![10_000], vec![]));
        assert_eq!(dev.pending_waiters(), 1);
        let (fired, notices) = with_ctx(|ctx| call(&dev, ctx, Selector::FireEvent, vec![42], vec![]));
        assert_eq!(finish(fired).await.unwrap().scalars, vec![1]);
        assert_eq!(finish(pending).await.unwrap().scalars, vec![42]);
        assert_eq!(
            notices,
            vec![DriverNotice {
                kind: "event",
                value: 42,
                detail: "completed 1 waiter(s)".into()
            }]
        );
    }

    #[tokio::test]
    async fn sample_wait_times_out() {
        let dev = SampleDevice::new();
        let (pending, _) = with_ctx(|ctx| call(&dev, ctx, Selector::WaitEvent, vec![1], vec![]));
        assert_eq!(finish(pending).await.unwrap_err().status, Status::Timeout);
    }

    #[tokio::test]
    async fn sample_wait_too_long_is_bad_argument() {
        let dev = SampleDevice::new();
        // The table refuses it before the driver runs…
        let (_, spec) = dev.methods().get(Selector::WaitEvent as u32).unwrap();
        let e = spec.check_args(vec![MAX_WAIT_MS + 1], vec![], u32::MAX).unwrap_err();
        assert_eq!(e.status, Status::BadArgument);
        assert!(spec.check_args(vec![MAX_WAIT_MS], vec![], u32::MAX).is_ok());
        // …and the driver, called without the table, refuses it too.
        let args = crate::driver::CallArgs {
            scalars: vec![MAX_WAIT_MS + 1],
            struct_in: vec![],
            struct_out_cap: 0,
        };
        let (c, _) = with_ctx(|ctx| dev.call(ctx, spec, args));
        assert_eq!(finish(c).await.unwrap_err().status, Status::BadArgument);
    }

    #[tokio::test]
    async fn sample_cancelled_waiter_is_pruned_and_terminate_ends_waiters_with_no_device() {
        let dev = SampleDevice::new();
        let (cancelled, _) = with_ctx(|ctx| call(&dev, ctx, Selector::WaitEvent, vec![10_000], vec![]));
        drop(cancelled);
        assert_eq!(dev.pending_waiters(), 0);
        let (pending, _) = with_ctx(|ctx| call(&dev, ctx, Selector::WaitEvent, vec![10_000], vec![]));
        dev.terminate();
        assert_eq!(finish(pending).await.unwrap_err().status, Status::NoDevice);
    }
}
