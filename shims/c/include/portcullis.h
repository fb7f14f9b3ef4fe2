/* libportcullis: the C client of the Portcullis device broker (native protocol).
 *
 * C99, libc only. The client's struct ABI is detected at compile time and declared to the
 * broker in the Hello, so structs are passed in this platform's own layout: compile the
 * driver headers (<portcullis/sample.h>, …) and pass their structs as they are.
 *
 * Return values: PC_SUCCESS (0), a broker status (> 0, the same numbers on every transport),
 * or PC_ERR_SYSTEM (-1) with errno set. After a refusal, pc_last_message() says why and
 * pc_last_rule() names the deciding policy rule (empty when policy did not decide).
 */
#ifndef PORTCULLIS_H
#define PORTCULLIS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Status numbers: fixed forever, equal to the broker's. */
enum pc_status {
    PC_SUCCESS = 0,
    PC_BAD_ARGUMENT = 1,
    PC_NOT_PRIVILEGED = 2,
    PC_EXCLUSIVE_ACCESS = 3,
    PC_NO_DEVICE = 4,
    PC_UNSUPPORTED = 5,
    PC_NO_MEMORY = 6,
    PC_TIMEOUT = 7,
    PC_ABORTED = 8,
    PC_RATE_LIMITED = 9,
    PC_OVERFLOW = 10,
    PC_NOT_OPEN = 11,
    PC_PROTOCOL_ERROR = 12,
    PC_INTERNAL = 13,
    PC_NOT_WRITABLE = 14,
    PC_ASLEEP = 15,
    /* The library's own, never a broker's (negative): */
    /* a system call failed; see errno. */
    PC_ERR_SYSTEM = -1,
    /* the library refused the arguments (pc_last_message says why); nothing was sent. */
    PC_ERR_USAGE = -2,
    /* the call RAN (its effects happened), but its outputs did not fit the room the caller gave:
     * what fit was written, and the counts say how much there was. */
    PC_ERR_OUTPUT_ROOM = -3,
    /* pc_invoke_finish: the call has not completed yet; it is still in flight. */
    PC_ERR_IN_FLIGHT = -4
};
/* A broker status says what the broker decided. PC_BAD_ARGUMENT, PC_NOT_PRIVILEGED, … are
 * refusals: the method did not run. PC_OVERFLOW is the exception, and says the method ran: an
 * output does not fit (a value this ABI's type cannot hold; a packet larger than the room
 * given), so it is withheld. Each driver header lists, per method, every status its calls can
 * end with (PC_<FAMILY>_<METHOD>_STATUSES, tested with PC_STATUS_IN) and what each of the
 * driver's own means there; the broker never ends a call with a status outside that list. */
#define PC_STATUS_BIT(s) (1ul << (s))
#define PC_STATUS_IN(mask, s) ((s) >= 0 && (s) < 32 && (((mask) >> (s)) & 1ul) != 0)

/* The ABI wire numbers (the broker's closed list). PC_ABI is this build's. */
enum pc_abi {
    PC_ABI_X86_64 = 0, PC_ABI_I386 = 1, PC_ABI_X32 = 2, PC_ABI_ARMHF = 3, PC_ABI_AARCH64 = 4,
    PC_ABI_POWERPC = 5, PC_ABI_PPC64 = 6, PC_ABI_PPC64LE = 7, PC_ABI_S390X = 8, PC_ABI_RISCV64 = 9,
    PC_ABI_MIPS = 10, PC_ABI_MIPSEL = 11, PC_ABI_M68K = 12, PC_ABI_SH4 = 13, PC_ABI_HPPA = 14,
    PC_ABI_SPARC64 = 15
};

#if defined(__x86_64__) && defined(__ILP32__)
#define PC_ABI PC_ABI_X32
#elif defined(__x86_64__)
#define PC_ABI PC_ABI_X86_64
#elif defined(__i386__)
#define PC_ABI PC_ABI_I386
#elif defined(__aarch64__) && !defined(__AARCH64EB__)
#define PC_ABI PC_ABI_AARCH64
#elif defined(__arm__) && defined(__ARM_PCS_VFP) && !defined(__ARMEB__)
#define PC_ABI PC_ABI_ARMHF
#elif defined(__powerpc64__) && defined(__LITTLE_ENDIAN__)
#define PC_ABI PC_ABI_PPC64LE
#elif defined(__powerpc64__)
#define PC_ABI PC_ABI_PPC64
#elif defined(__powerpc__)
#define PC_ABI PC_ABI_POWERPC
#elif defined(__s390x__)
#define PC_ABI PC_ABI_S390X
#elif defined(__riscv) && __riscv_xlen == 64
#define PC_ABI PC_ABI_RISCV64
#elif defined(__mips__) && defined(_ABIO32) && _MIPS_SIM == _ABIO32 && defined(__MIPSEB__)
#define PC_ABI PC_ABI_MIPS
#elif defined(__mips__) && defined(_ABIO32) && _MIPS_SIM == _ABIO32 && defined(__MIPSEL__)
#define PC_ABI PC_ABI_MIPSEL
#elif defined(__m68k__)
#define PC_ABI PC_ABI_M68K
#elif defined(__sh__) && defined(__LITTLE_ENDIAN__)
#define PC_ABI PC_ABI_SH4
#elif defined(__hppa__) && !defined(__LP64__)
#define PC_ABI PC_ABI_HPPA
#elif defined(__sparc__) && defined(__arch64__)
#define PC_ABI PC_ABI_SPARC64
#else
#error "libportcullis: this ABI is not in the broker's list"
#endif

/* A connection. Not thread-safe: it holds one request in flight and the buffers for it. Use a
 * connection per thread (each is its own session, with its own user clients), or serialize
 * every call on one connection with a lock of your own. pc_disconnect frees it: no other
 * thread may be using it then. */
typedef struct pc_conn pc_conn;

/* A service as discovery shows it. Longer names are cut (and still NUL-terminated). */
typedef struct pc_service {
    uint64_t id;
    uint64_t parent;
    char name[64];
    char class_name[64];
} pc_service;

enum pc_event_kind {
    PC_EVENT_PUBLISHED = 0,
    PC_EVENT_TERMINATED = 1,
    PC_EVENT_NOTIFICATION = 2,
    PC_EVENT_USER_CLIENT_CLOSED = 3,
    PC_EVENT_LOST = 4,
    /* the machine is going to sleep: calls wait for wake (or end PC_ASLEEP) */
    PC_EVENT_WILL_SLEEP = 5,
    /* the machine has woken: the devices are back, with their settings */
    PC_EVENT_HAS_WOKEN = 6
};

typedef struct pc_event {
    int kind;            /* enum pc_event_kind */
    uint64_t service;    /* published, terminated, notification */
    uint64_t handle;     /* user client closed */
    uint64_t value;      /* notification value; lost: count */
    int status;          /* user client closed */
    char kind_name[32];  /* notification kind */
    char text[128];      /* service name, notification detail, or reason */
} pc_event;

/* Connects to the broker serving run_dir and declares this build's ABI. run_dir NULL: the rule
 * every client follows: $PORTCULLIS_RUN_DIR when set; else a broker of this user's own where one
 * serves ($XDG_RUNTIME_DIR/portcullis holds its socket); else the system broker, /run/portcullis.
 * The socket, and every descriptor the library receives, is close-on-exec. */
int pc_connect(const char *run_dir, pc_conn **out);

/* Ends the session: the broker releases everything it held. Always frees conn. */
void pc_disconnect(pc_conn *conn);

/* Services matching class_name and name (NULL or "" matches any) that this task may see.
 * Writes up to cap of them to out and the number found to *count (which may exceed cap). */
int pc_find_services(pc_conn *conn, const char *class_name, const char *name, pc_service *out, size_t cap,
                     size_t *count);

/* IOServiceAddMatchingNotification: from now on, PC_EVENT_PUBLISHED and PC_EVENT_TERMINATED events
 * for services of this class and name (NULL or "" matches any) whose text properties equal the
 * given ones (`properties` holds n_properties key/value pairs: key0, value0, key1, …), among the
 * services the policy lets this task see. Like pc_find_services, fills `out` with the matching
 * services there are now — so that a device plugged in meanwhile is never missed. At most 16
 * per connection (PC_NO_MEMORY past that). */
int pc_watch_matching(pc_conn *conn, const char *class_name, const char *name, const char *const *properties,
                      size_t n_properties, pc_service *out, size_t cap, size_t *count);

/* Opens a user client on the service (admission by policy); exclusive != 0 for an exclusive open. */
int pc_open(pc_conn *conn, uint64_t service, int exclusive, uint64_t *handle);

/* Closes a user client; its pending calls complete with PC_ABORTED. */
int pc_close(pc_conn *conn, uint64_t handle);

/* A method call's inputs and outputs, for pc_invoke: one size type throughout. Set the inputs
 * and rooms; pc_invoke sets n_scalars_out and struct_out_len. Zero it first (= {0}) so that
 * fields added later start empty. */
typedef struct pc_call_args {
    uint32_t selector;
    const uint64_t *scalars_in; /* n_scalars_in values */
    size_t n_scalars_in;
    const void *struct_in; /* struct_in_len bytes, in this ABI's layout */
    size_t struct_in_len;
    uint64_t *scalars_out; /* room for scalars_out_room values */
    size_t scalars_out_room;
    size_t n_scalars_out; /* out: how many the method returned (more than the room: PC_ERR_OUTPUT_ROOM) */
    void *struct_out;     /* room for struct_out_room bytes */
    size_t struct_out_room;
    size_t struct_out_len; /* out: the bytes written */
} pc_call_args;

/* Calls a method: args says what goes in and where what comes out goes. PC_ERR_USAGE (nothing
 * sent) for a length without a buffer; PC_ERR_OUTPUT_ROOM when the method ran and returned more
 * scalars than there was room for (those that fit are written). Blocks until the method
 * completes, asynchronous methods included. */
int pc_invoke(pc_conn *conn, uint64_t handle, pc_call_args *args);

/* Starts a call and returns at once, with its id in *call: one connection can have a
 * wait_event or a tty read pending and keep calling. The outputs are written to args when the
 * response arrives — during any later function on this connection — so args and its buffers
 * must stay valid until pc_invoke_finish has returned the call's status. At most 1024 calls in
 * flight per connection (then PC_ERR_USAGE). */
int pc_invoke_start(pc_conn *conn, uint64_t handle, pc_call_args *args, uint64_t *call);

/* The status of a call started with pc_invoke_start, once it has completed: waits up to
 * timeout_ms for it (0: only looks; -1: forever), handling whatever else arrives meanwhile (other
 * calls complete, events are queued). PC_ERR_IN_FLIGHT: not complete yet (ask again). Any other
 * status is the call's own (PC_TIMEOUT included: a wait_event that timed out) and ends it: its
 * id is forgotten. */
int pc_invoke_finish(pc_conn *conn, uint64_t call, int timeout_ms);

/* For an event loop: a descriptor to poll for reading while calls are in flight or events are
 * awaited. Call pc_poll_prepare just before each poll: 1 means something is there already (do
 * not poll; call pc_invoke_finish or pc_next_event with timeout 0), 0 that the descriptor will
 * become readable when something arrives. When it does, call them with timeout 0. The
 * descriptor is the socket, or with the ring the doorbell the broker rings. */
int pc_poll_prepare(pc_conn *conn);
int pc_poll_fd(const pc_conn *conn);

/* The same as pc_invoke, as separate arguments (the first form, kept): scalars_out has room for
 * *n_out values and receives *n_out of them; struct_out has room for *struct_out_len bytes and
 * receives *struct_out_len of them. Any output pointer may be NULL when the method has no such
 * output. More scalar outputs than *n_out: PC_ERR_OUTPUT_ROOM (the call ran; *n_out says how
 * many there were). */
int pc_call(pc_conn *conn, uint64_t handle, uint32_t selector, const uint64_t *scalars_in, uint32_t n_in,
            uint64_t *scalars_out, uint32_t *n_out, const void *struct_in, size_t struct_in_len, void *struct_out,
            size_t *struct_out_len);

/* Maps memory type `memory_type` of the user client's service (clientMemoryForType). On success
 * *addr and *size describe a shared mapping, writable only if the type is (*writable says).
 * The broker empties read-write memory when the user client closes (what was written there is
 * gone; a mapping kept reads zeros): unmap when done. */
int pc_map_memory(pc_conn *conn, uint64_t handle, uint32_t memory_type, void **addr, size_t *size, int *writable);

/* How pc_ring_enable's connection waits for completions. */
enum pc_ring_wait {
    PC_RING_ADAPTIVE = 0, /* spin for about 50 µs, then sleep until the broker wakes us */
    PC_RING_SPIN = 1,     /* only spin (lowest latency; a core while waiting) */
    PC_RING_SLEEP = 2     /* only sleep */
};

/* Upgrades the connection to the shared-memory ring: from now on requests and responses (and
 * events) travel through shared memory; the socket stays open beside it and its closure ends
 * the session as before. sq_size and cq_size are ring bytes (0: the broker's default); wait is
 * an enum pc_ring_wait. pc_map_memory keeps using the socket (descriptors can't travel through
 * shared memory). PC_NO_MEMORY when the broker serves no more rings: the socket still works. */
int pc_ring_enable(pc_conn *conn, uint32_t sq_size, uint32_t cq_size, int wait);

/* Unmaps memory from pc_map_memory. */
int pc_unmap_memory(void *addr, size_t size);

/* Subscribes to events for these services (all visible ones when n == 0). */
int pc_subscribe(pc_conn *conn, const uint64_t *services, size_t n);

/* The next event: one queued while the caller was busy with calls, else the next to arrive
 * within timeout_ms (-1: forever); PC_TIMEOUT if none came. Events come in the order they
 * arrived. Events that arrive while the queue is full are lost, and so are later ones until the
 * loss is delivered: a PC_EVENT_LOST (value: how many) stands exactly where the gap is. (Not the
 * method `wait_event`, which a driver serves: this reads the connection's own queue.) */
int pc_next_event(pc_conn *conn, int timeout_ms, pc_event *event);

/* The same as pc_next_event: its former name, kept. */
int pc_wait_event(pc_conn *conn, int timeout_ms, pc_event *event);

/* Sizes the queue of events that arrive during calls (default 64). PC_ERR_USAGE for 0, or for
 * fewer than are queued now. */
int pc_set_event_queue(pc_conn *conn, size_t capacity);

/* The broker's own ABI (an enum pc_abi), from its Welcome: whether a value this client sends
 * wraps or overflows on the way depends on it. */
int pc_broker_abi(const pc_conn *conn);

/* 1 when the connection uses the shared-memory ring (pc_ring_enable succeeded), else 0. */
int pc_ring_active(const pc_conn *conn);

/* Why the last request was refused, and the deciding rule ("" if none). Valid until the next call. */
const char *pc_last_message(const pc_conn *conn);
const char *pc_last_rule(const pc_conn *conn);

/* "SUCCESS", "BAD_ARGUMENT", … for a status number. */
const char *pc_status_name(int status);

#ifdef __cplusplus
}
#endif

#endif /* PORTCULLIS_H */
