//! The driver model: the [`Driver`] trait every device family implements, and the method table
//! (IOExternalMethodDispatch) the session core checks before a driver runs.

pub mod memory;
#[allow(unsafe_code)]
pub mod region;
mod table;

pub use table::{MethodSpec, MethodTable, SizeRange, TableError};

use std::{fmt, future::Future, os::fd::OwnedFd, pin::Pin, sync::Arc};

use portcullis_proto::Status;

use crate::registry::{OpenMode, ServiceId};

/// One user client, as a driver knows it: unique for the broker's life, so a driver can keep
/// per-client state (a tty's saved line settings, a network device's packet queue) between
/// [`Driver::opened`] and [`Driver::closed`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientKey(pub u64);

/// A driver kind as tools know it, with no device behind it: the class its services publish
/// as, its method table, struct layouts and memory types. Policy checks, `portcullis schema`,
/// the C headers and every instance of the kind share one.
#[derive(Debug)]
pub struct Family {
    /// The `driver` a config's `[[device]]` names (`tty`).
    pub kind: &'static str,
    /// The class its services publish as (`TtyDevice`).
    pub class: &'static str,
    schema: portcullis_proto::layout::Schema,
    table: MethodTable,
    memory_types: &'static [MemoryType],
}

impl Family {
    /// Builds a family from its constant description. The description is part of the program:
    /// each family's unit tests check it, so an invalid one is a bug, reported by a panic at
    /// first use.
    pub fn new(
        kind: &'static str,
        class: &'static str,
        layouts: &str,
        rows: &[MethodSpec],
        memory_types: &'static [MemoryType],
    ) -> Family {
        let schema =
            portcullis_proto::layout::Schema::from_toml(layouts).unwrap_or_else(|e| panic!("{kind} layouts: {e}"));
        let table = MethodTable::with_schema(rows, &schema).unwrap_or_else(|e| panic!("{kind} method table: {e}"));
        Family {
            kind,
            class,
            schema,
            table,
            memory_types,
        }
    }

    /// The method table.
    pub fn methods(&self) -> &MethodTable {
        &self.table
    }

    /// The struct layouts the table names.
    pub fn schema(&self) -> &portcullis_proto::layout::Schema {
        &self.schema
    }

    /// The memory types its devices export.
    pub fn memory_types(&self) -> &'static [MemoryType] {
        self.memory_types
    }
}

/// Arguments of one call, already checked against the method table: the scalar count is exactly
/// the table's, the struct length within its bounds, and `struct_out_cap` within the output bound.
#[derive(Clone, Debug, Default)]
pub struct CallArgs {
    /// Scalar inputs (exactly `scalar_in` of them).
    pub scalars: Vec<u64>,
    /// Struct input (within `struct_in` bounds).
    pub struct_in: Vec<u8>,
    /// The most struct output bytes the client accepts (at most `struct_out.max`).
    pub struct_out_cap: usize,
}

impl CallArgs {
    /// The first `N` scalars. The table check guarantees the count; a driver asks for exactly its
    /// method's `scalar_in`.
    pub fn scalars<const N: usize>(&self) -> [u64; N] {
        let mut out = [0u64; N];
        for (o, s) in out.iter_mut().zip(&self.scalars) {
            *o = *s;
        }
        out
    }
}

/// What a method returns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CallOutput {
    /// Scalar outputs (exactly `scalar_out` of them; the core checks).
    pub scalars: Vec<u64>,
    /// Struct output (within `struct_out` bounds and the caller's capacity; the core checks).
    pub struct_out: Vec<u8>,
}

/// A refusal or failure from a driver.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {message}")]
pub struct DriverError {
    /// The status the client sees.
    pub status: Status,
    /// Why, in words.
    pub message: String,
}

impl DriverError {
    /// A driver error with this status.
    pub fn new(status: Status, message: impl Into<String>) -> DriverError {
        DriverError {
            status,
            message: message.into(),
        }
    }
}

/// The result of a method.
pub type CallResult = Result<CallOutput, DriverError>;

/// A struct of a family's schema in the broker's own layout, read and written by field name:
/// drivers never spell offsets out. Fields are integers of any width (or `bool`).
#[derive(Debug)]
pub struct NativeStruct {
    layout: portcullis_proto::layout::StructLayout,
}

impl NativeStruct {
    /// The native layout of struct `name` of `schema`. Family schemas are constants checked by
    /// their tests: a missing struct is a bug, reported by a panic at first use.
    pub fn of(schema: &portcullis_proto::layout::Schema, name: &str) -> NativeStruct {
        let index = schema
            .index(name)
            .unwrap_or_else(|| panic!("no struct {name} in the family's schema"));
        NativeStruct {
            layout: schema.layout(index, portcullis_proto::layout::AbiId::native().abi()),
        }
    }

    /// Its size.
    pub fn size(&self) -> usize {
        self.layout.size as usize
    }

    fn field(&self, name: &str) -> Option<(usize, usize)> {
        self.layout
            .fields
            .iter()
            .find(|f| f.name == name)
            .map(|f| (f.offset as usize, f.size as usize))
    }

    /// Field `name` of `bytes` (a buffer of this struct's size; the core has checked), zero-
    /// extended.
    pub fn get(&self, bytes: &[u8], name: &str) -> u64 {
        let Some(field) = self.field(name).and_then(|(at, len)| bytes.get(at..at + len)) else {
            return 0;
        };
        let mut word = [0u8; 8];
        let start = if cfg!(target_endian = "little") {
            0
        } else {
            8 - field.len()
        };
        if let Some(dst) = word.get_mut(start..start + field.len()) {
            dst.copy_from_slice(field);
        }
        u64::from_ne_bytes(word)
    }

    /// Sets field `name` of `bytes` to the low bytes of `value`.
    pub fn set(&self, bytes: &mut [u8], name: &str, value: u64) {
        let Some(field) = self.field(name).and_then(|(at, len)| bytes.get_mut(at..at + len)) else {
            return;
        };
        let word = value.to_ne_bytes();
        let start = if cfg!(target_endian = "little") {
            0
        } else {
            8 - field.len()
        };
        if let Some(src) = word.get(start..start + field.len()) {
            field.copy_from_slice(src);
        }
    }

    /// A zeroed buffer of this struct's size with these fields set.
    pub fn build(&self, fields: &[(&str, u64)]) -> Vec<u8> {
        let mut bytes = vec![0u8; self.size()];
        for (name, value) in fields {
            self.set(&mut bytes, name, *value);
        }
        bytes
    }
}

/// Runs driver code so that a panic in it (a bug in one driver) is an error for the broker to
/// handle — end the call with `INTERNAL`, terminate that one service — never the end of the
/// session or the broker. Returns the panic's message.
pub(crate) fn contained<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|panic| panic_message(&*panic))
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".to_string())
}

/// A driver's pending completion whose panic, wherever it is polled, resolves it with the
/// panic's message instead of unwinding through the broker.
pub(crate) struct Contained(pub(crate) Pin<Box<dyn Future<Output = CallResult> + Send>>);

impl Future for Contained {
    type Output = Result<CallResult, String>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.0.as_mut().poll(cx))) {
            Ok(std::task::Poll::Ready(result)) => std::task::Poll::Ready(Ok(result)),
            Ok(std::task::Poll::Pending) => std::task::Poll::Pending,
            Err(panic) => std::task::Poll::Ready(Err(panic_message(&*panic))),
        }
    }
}

/// A method's completion: now, or later (asynchronous methods).
pub enum Completion {
    /// Completed synchronously.
    Ready(CallResult),
    /// Completes when the future does. Dropping it cancels the call.
    Pending(Pin<Box<dyn Future<Output = CallResult> + Send>>),
}

impl fmt::Debug for Completion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Completion::Ready(r) => f.debug_tuple("Ready").field(r).finish(),
            Completion::Pending(_) => f.write_str("Pending(..)"),
        }
    }
}

/// An interest message a driver posts about its service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriverNotice {
    /// Short kind (`event`).
    pub kind: &'static str,
    /// A value the kind defines.
    pub value: u64,
    /// Words for people.
    pub detail: String,
}

/// A memory type a driver exports (clientMemoryForType).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryType {
    /// The number clients ask for.
    pub id: u32,
    /// The name policy and headers use.
    pub name: &'static str,
    /// Size in bytes.
    pub size: u64,
    /// Whether clients may write it.
    pub writable: bool,
    /// What is in it, with its layout and byte order (the generated headers carry this).
    pub contents: &'static str,
}

/// The memory behind a memory type, as the broker holds it: a file the broker may read and
/// write; the client gets a descriptor with no more rights than the type allows.
#[derive(Clone, Debug)]
pub struct Backing {
    /// The broker's full-access descriptor (a memfd).
    pub fd: Arc<OwnedFd>,
    /// Emptied when the user client that mapped it goes away, so a client that keeps its
    /// mapping past that finds nothing there.
    pub revocable: bool,
    /// The driver's own mapping of it, for device I/O straight into it (`None`: the driver
    /// reads and writes it through `fd`).
    pub region: Option<Arc<region::Region>>,
}

/// Memory a user client has mapped.
#[derive(Clone, Debug)]
pub struct Mapped {
    /// Which type.
    pub memory_type: MemoryType,
    /// Its backing.
    pub backing: Backing,
}

/// What a driver may use while it serves a call.
pub struct CallContext<'a> {
    /// The service being called.
    pub service: ServiceId,
    /// The calling user client.
    pub client: ClientKey,
    /// How the calling user client holds the service.
    pub mode: OpenMode,
    /// Posts an interest notification for the service to subscribers.
    pub notify: &'a (dyn Fn(DriverNotice) + Send + Sync),
    /// The memory the calling user client has mapped.
    pub memory: &'a [Mapped],
}

impl CallContext<'_> {
    /// The calling user client's mapping of memory type `id`.
    pub fn memory(&self, id: u32) -> Option<&Mapped> {
        self.memory.iter().find(|m| m.memory_type.id == id)
    }
}

impl fmt::Debug for CallContext<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallContext")
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

/// A device driver. The broker calls it only with arguments its method table admits and only
/// for clients the policy granted the method; a driver checks values, never counts or sizes.
pub trait Driver: Send + Sync + fmt::Debug {
    /// Its family: class, method table, layouts, memory types.
    fn family(&self) -> &'static Family;

    /// The family class the driver's services publish as (`SampleDevice`).
    fn class(&self) -> &'static str {
        self.family().class
    }

    /// The method table.
    fn methods(&self) -> &MethodTable {
        self.family().methods()
    }

    /// The struct layouts the method table names (empty when it names none).
    fn schema(&self) -> &portcullis_proto::layout::Schema {
        self.family().schema()
    }

    /// How many user clients may hold the device at once, whatever mode they ask for (a serial
    /// port: one); `None`: as open arbitration allows (many shared, or one exclusive).
    fn open_limit(&self) -> Option<usize> {
        None
    }

    /// Runs the method in row `spec` of the table.
    fn call(&self, ctx: &CallContext<'_>, spec: &MethodSpec, args: CallArgs) -> Completion;

    /// The memory types the driver exports.
    fn memory_types(&self) -> &[MemoryType] {
        self.family().memory_types()
    }

    /// Memory of type `id` for a user client mapping it for the first time.
    fn create_memory(&self, memory_type: &MemoryType) -> Result<Backing, DriverError> {
        Err(DriverError::new(
            Status::Unsupported,
            format!("no memory type {}", memory_type.id),
        ))
    }

    /// A user client opened the service (handleOpen); an error refuses the open.
    fn opened(&self, _client: ClientKey, _mode: OpenMode) -> Result<(), DriverError> {
        Ok(())
    }

    /// A user client closed the service (handleClose): release what it held.
    fn closed(&self, _client: ClientKey) {}

    /// The service is terminating: abort pending work.
    fn terminate(&self) {}

    /// The machine is going to sleep, or has woken (setPowerState). Called on a blocking thread
    /// in registry order — children before parents going down, parents first coming up — and
    /// never while driver code of a call runs: calls wait until the wake has run. A driver
    /// finishes its device's work before sleep (a block device flushes, a tty drains) and
    /// restores on wake what the device may have lost, by `deadline`.
    fn power(&self, _change: PowerChange, _deadline: std::time::Instant) -> Result<(), DriverError> {
        Ok(())
    }

    /// Live objects the driver holds for clients: user clients open on it, and calls waiting on
    /// it (for `portcullis stats` and leak checks).
    fn live(&self) -> DriverLive {
        DriverLive::default()
    }
}

/// A change of the machine's power, as a driver hears it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerChange {
    /// The machine is going to sleep.
    Sleep,
    /// The machine has woken.
    Wake,
}

/// What [`Driver::live`] counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DriverLive {
    /// User clients open (handleOpen without handleClose).
    pub opens: usize,
    /// Asynchronous calls waiting.
    pub waiting: usize,
}
