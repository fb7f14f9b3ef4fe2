/* The ABI-matrix client: built by each ABI's real cross compiler, run under qemu-user against
 * one broker. It calls add, echo, get_info and transform_record with edge values and checks
 * every returned field, including that padding bytes come back zero.
 *   client RUN_DIR        prints "ok: N checks on ABI" and exits 0, or lists failures, exit 1
 *   client RUN_DIR ring   the same over the shared-memory ring ("ok: N checks on ABI over the ring")
 *   client RUN_DIR sleeping-ring CALLS
 *                         CALLS adds through a ring that sleeps (PC_RING_SLEEP), each under 50 ms */
#define _POSIX_C_SOURCE 200809L
#include <float.h>
#include <limits.h>
#include <math.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <portcullis.h>
#include <portcullis/sample.h>

static const char *const abi_names[] = {"x86_64", "i386",   "x32",     "armhf",   "aarch64", "powerpc",
                                        "ppc64",  "ppc64le", "s390x",  "riscv64", "mips",    "mipsel",
                                        "m68k",   "sh4",     "hppa",   "sparc64"};

static int checks, failures;

#define CHECK(cond, ...)                                         \
    do {                                                         \
        checks++;                                                \
        if (!(cond)) {                                           \
            failures++;                                          \
            printf("FAIL line %d: %s: ", __LINE__, #cond);       \
            printf(__VA_ARGS__);                                 \
            printf("\n");                                        \
        }                                                        \
    } while (0)

static pc_conn *conn;
static uint64_t handle;

static int call_add(uint64_t a, uint64_t b, uint64_t *sum) {
    uint64_t in[2];
    uint32_t n = 1;
    in[0] = a;
    in[1] = b;
    return pc_call(conn, handle, PC_SAMPLE_ADD, in, 2, sum, &n, NULL, 0, NULL, NULL);
}

static int transform(const struct sample_record *in, struct sample_record *out) {
    size_t len = sizeof *out;
    int rc;
    memset(out, 0xEE, sizeof *out);
    rc = pc_call(conn, handle, PC_SAMPLE_TRANSFORM_RECORD, NULL, 0, NULL, NULL, in, sizeof *in, out, &len);
    if (rc == PC_SUCCESS) CHECK(len == sizeof *out, "got %lu bytes", (unsigned long)len);
    return rc;
}

/* What the broker's transform (see the sample driver) gives for `in`, on a 64-bit broker. */
static void expected(const struct sample_record *in, struct sample_record *exp) {
    int k;
    memset(exp, 0, sizeof *exp);
    exp->u8_ = (uint8_t)(in->u8_ + 1u);
    exp->i8_ = (int8_t)(uint8_t)((uint8_t)in->i8_ + 1u);
    exp->u16_ = (uint16_t)(in->u16_ + 1u);
    exp->i16_ = (int16_t)(uint16_t)((uint16_t)in->i16_ + 1u);
    exp->u32_ = in->u32_ + 1u;
    exp->i32_ = (int32_t)((uint32_t)in->i32_ + 1u);
    exp->u64_ = in->u64_ + 1u;
    exp->i64_ = (int64_t)((uint64_t)in->i64_ + 1u);
    exp->long_ = (long)((unsigned long)in->long_ + 1ul);
    exp->ulong_ = in->ulong_ + 1ul;
    exp->handle = in->handle + 1u;
    exp->f32_ = in->f32_ * 2.0f;
    exp->f64_ = in->f64_ * 2.0;
    exp->flag = !in->flag;
    for (k = 0; k < 13; k++) {
        char c = in->name[k];
        exp->name[k] = (char)(c >= 'a' && c <= 'z' ? c - 'a' + 'A' : c);
    }
    for (k = 0; k < 3; k++) {
        exp->inner[k].tag = (uint8_t)(in->inner[2 - k].tag + 1u);
        exp->inner[k].value = in->inner[2 - k].value;
    }
    exp->tail = (uint16_t)~in->tail;
}

static int same_float(double a, double b) { return (isnan(a) && isnan(b)) || a == b; }

/* Field by field, then the whole struct byte for byte (padding must be zero). */
static void check_record(const char *what, const struct sample_record *got, const struct sample_record *exp) {
    struct sample_record a = *got, b = *exp;
    int k;
    CHECK(got->u8_ == exp->u8_, "%s u8_ %u", what, (unsigned)got->u8_);
    CHECK(got->i8_ == exp->i8_, "%s i8_ %d", what, got->i8_);
    CHECK(got->u16_ == exp->u16_, "%s u16_ %u", what, (unsigned)got->u16_);
    CHECK(got->i16_ == exp->i16_, "%s i16_ %d", what, got->i16_);
    CHECK(got->u32_ == exp->u32_, "%s u32_ %lu", what, (unsigned long)got->u32_);
    CHECK(got->i32_ == exp->i32_, "%s i32_ %ld", what, (long)got->i32_);
    CHECK(got->u64_ == exp->u64_, "%s u64_ %llu", what, (unsigned long long)got->u64_);
    CHECK(got->i64_ == exp->i64_, "%s i64_ %lld", what, (long long)got->i64_);
    CHECK(got->long_ == exp->long_, "%s long_ %ld want %ld", what, got->long_, exp->long_);
    CHECK(got->ulong_ == exp->ulong_, "%s ulong_ %lu want %lu", what, got->ulong_, exp->ulong_);
    CHECK(got->handle == exp->handle, "%s handle", what);
    CHECK(same_float(got->f32_, exp->f32_), "%s f32_ %g want %g", what, (double)got->f32_, (double)exp->f32_);
    CHECK(same_float(got->f64_, exp->f64_), "%s f64_ %g want %g", what, got->f64_, exp->f64_);
    CHECK(got->flag == exp->flag, "%s flag", what);
    CHECK(memcmp(got->name, exp->name, 13) == 0, "%s name %.13s", what, got->name);
    for (k = 0; k < 3; k++) {
        CHECK(got->inner[k].tag == exp->inner[k].tag, "%s inner[%d].tag %u", what, k, (unsigned)got->inner[k].tag);
        CHECK(got->inner[k].value == exp->inner[k].value, "%s inner[%d].value", what, k);
    }
    CHECK(got->tail == exp->tail, "%s tail %u", what, (unsigned)got->tail);
    /* NaN payloads may differ between FPUs; compare everything else byte for byte. */
    if (isnan(a.f32_)) a.f32_ = b.f32_;
    if (isnan(a.f64_)) a.f64_ = b.f64_;
    CHECK(memcmp(&a, &b, sizeof a) == 0, "%s: bytes differ (padding not zero?)", what);
}

static void run_record(const char *what, const struct sample_record *in) {
    struct sample_record out, exp;
    int rc = transform(in, &out);
    CHECK(rc == PC_SUCCESS, "%s: %s: %s", what, pc_status_name(rc), pc_last_message(conn));
    if (rc != PC_SUCCESS) return;
    expected(in, &exp);
    check_record(what, &out, &exp);
}

/* A value at a long's top: overflows on 32-bit clients (the broker's long is 64-bit), wraps on
 * 64-bit ones. */
static void run_edge(const char *what, const struct sample_record *in) {
    struct sample_record out;
    int rc = transform(in, &out);
    if (sizeof(long) == 4 || sizeof(uintptr_t) == 4) {
        CHECK(rc == PC_OVERFLOW, "%s: want OVERFLOW, got %s", what, pc_status_name(rc));
        CHECK(PC_STATUS_IN(PC_SAMPLE_TRANSFORM_RECORD_STATUSES, rc), "%s: OVERFLOW is in the contract", what);
    } else {
        CHECK(rc == PC_SUCCESS, "%s: %s: %s", what, pc_status_name(rc), pc_last_message(conn));
        if (rc == PC_SUCCESS) {
            struct sample_record exp;
            expected(in, &exp);
            check_record(what, &out, &exp);
        }
    }
}

static void records(void) {
    struct sample_record r;
    int k;

    memset(&r, 0, sizeof r);
    r.u8_ = 7;
    r.i8_ = -7;
    r.u16_ = 700;
    r.i16_ = -700;
    r.u32_ = 70000;
    r.i32_ = -70000;
    r.u64_ = 7000000000ull;
    r.i64_ = -7000000000ll;
    r.long_ = -5;
    r.ulong_ = 5;
    r.handle = 0x1234;
    r.f32_ = 1.5f;
    r.f64_ = -2.25;
    r.flag = 1;
    memcpy(r.name, "portcullis", 10);
    for (k = 0; k < 3; k++) {
        r.inner[k].tag = (uint8_t)(10 + k);
        r.inner[k].value = 1000u * (uint64_t)(k + 1);
    }
    r.tail = 0x1234;
    run_record("typical", &r);

    memset(&r, 0, sizeof r);
    r.i8_ = INT8_MIN;
    r.i16_ = INT16_MIN;
    r.i32_ = INT32_MIN;
    r.i64_ = INT64_MIN;
    r.long_ = LONG_MIN;
    r.f32_ = -FLT_MAX;
    r.f64_ = -INFINITY;
    run_record("minimum values, empty name", &r);

    memset(&r, 0, sizeof r);
    r.u8_ = UINT8_MAX;
    r.i8_ = INT8_MAX;
    r.u16_ = UINT16_MAX;
    r.i16_ = INT16_MAX;
    r.u32_ = UINT32_MAX;
    r.i32_ = INT32_MAX;
    r.u64_ = UINT64_MAX;
    r.i64_ = INT64_MAX;
    r.long_ = LONG_MAX - 1;
    r.ulong_ = ULONG_MAX - 1;
    r.handle = UINTPTR_MAX - 1;
    r.f32_ = NAN;
    r.f64_ = INFINITY;
    r.flag = 1;
    memcpy(r.name, "abcdefghijklm", 13); /* full: no terminating NUL */
    for (k = 0; k < 3; k++) {
        r.inner[k].tag = UINT8_MAX;
        r.inner[k].value = UINT64_MAX - (uint64_t)k;
    }
    r.tail = UINT16_MAX;
    run_record("maximum values, full name", &r);

    memset(&r, 0, sizeof r);
    r.long_ = -1;
    r.f32_ = FLT_MAX;
    r.f64_ = NAN;
    run_record("negative long, float overflow to inf", &r);

    memset(&r, 0, sizeof r);
    r.long_ = LONG_MAX;
    run_edge("long at LONG_MAX", &r);
    memset(&r, 0, sizeof r);
    r.ulong_ = ULONG_MAX;
    run_edge("unsigned long at ULONG_MAX", &r);
    memset(&r, 0, sizeof r);
    r.handle = UINTPTR_MAX;
    run_edge("handle at UINTPTR_MAX", &r);
    if (sizeof(long) == 4) {
        struct sample_record out;
        memset(&r, 0, sizeof r);
        r.long_ = INT32_MAX;
        CHECK(transform(&r, &out) == PC_OVERFLOW, "a 32-bit long of INT32_MAX must be OVERFLOW, not wrapped");
    }

    {
        /* A bool byte that is not 0 or 1, and a struct of the wrong size. */
        unsigned char raw[sizeof(struct sample_record) + 1];
        struct sample_record out;
        size_t len = sizeof out;
        memset(raw, 0, sizeof raw);
        raw[offsetof(struct sample_record, flag)] = 2;
        CHECK(pc_call(conn, handle, PC_SAMPLE_TRANSFORM_RECORD, NULL, 0, NULL, NULL, raw, sizeof(struct sample_record), &out, &len) == PC_BAD_ARGUMENT, "bool byte 2");
        raw[offsetof(struct sample_record, flag)] = 0;
        len = sizeof out;
        CHECK(pc_call(conn, handle, PC_SAMPLE_TRANSFORM_RECORD, NULL, 0, NULL, NULL, raw, sizeof raw, &out, &len) == PC_BAD_ARGUMENT, "one byte too many");
        len = sizeof out;
        CHECK(pc_call(conn, handle, PC_SAMPLE_TRANSFORM_RECORD, NULL, 0, NULL, NULL, raw, sizeof raw - 2, &out, &len) == PC_BAD_ARGUMENT, "one byte too few");
    }
}

static void scalars_and_echo(void) {
    static unsigned char big[4097], back[4097];
    uint64_t sum = 1;
    size_t len;
    int k, rc;
    CHECK(call_add(2, 3, &sum) == PC_SUCCESS && sum == 5, "add 2 3");
    CHECK(call_add(UINT64_MAX, 1, &sum) == PC_SUCCESS && sum == 0, "add wraps");
    CHECK(call_add(1ull << 63, 1ull << 63, &sum) == PC_SUCCESS && sum == 0, "add top bits");
    CHECK(call_add(0x0123456789abcdefull, 0x1111111111111111ull, &sum) == PC_SUCCESS && sum == 0x123456789abcdf00ull, "add");
    for (k = 0; k < 4097; k++) big[k] = (unsigned char)(k * 31 + 7);
    {
        /* The one-struct form: add, then echo. */
        pc_call_args a = {0};
        uint64_t in[2] = {40, 2}, out[2] = {0, 0};
        a.selector = PC_SAMPLE_ADD;
        a.scalars_in = in;
        a.n_scalars_in = 2;
        a.scalars_out = out;
        a.scalars_out_room = 2;
        rc = pc_invoke(conn, handle, &a);
        CHECK(rc == PC_SUCCESS && a.n_scalars_out == 1 && out[0] == 42 && a.struct_out_len == 0, "pc_invoke add: %s", pc_status_name(rc));
        memset(&a, 0, sizeof a);
        a.selector = PC_SAMPLE_ECHO;
        a.struct_in = big;
        a.struct_in_len = 100;
        a.struct_out = back;
        a.struct_out_room = sizeof back;
        rc = pc_invoke(conn, handle, &a);
        CHECK(rc == PC_SUCCESS && a.struct_out_len == 100 && memcmp(big, back, 100) == 0 && a.n_scalars_out == 0, "pc_invoke echo: %s", pc_status_name(rc));
        a.struct_out = NULL;
        CHECK(pc_invoke(conn, handle, &a) == PC_ERR_USAGE, "pc_invoke: room without a buffer");
        CHECK(pc_invoke(conn, handle, NULL) == PC_ERR_USAGE, "pc_invoke: no arguments");
    }
    len = sizeof back;
    rc = pc_call(conn, handle, PC_SAMPLE_ECHO, NULL, 0, NULL, NULL, big, 4096, back, &len);
    CHECK(rc == PC_SUCCESS && len == 4096 && memcmp(big, back, 4096) == 0, "echo 4096: %s", pc_status_name(rc));
    len = sizeof back;
    rc = pc_call(conn, handle, PC_SAMPLE_ECHO, NULL, 0, NULL, NULL, big, 0, back, &len);
    CHECK(rc == PC_SUCCESS && len == 0, "echo empty");
    len = sizeof back;
    CHECK(pc_call(conn, handle, PC_SAMPLE_ECHO, NULL, 0, NULL, NULL, big, PC_SAMPLE_ECHO_STRUCT_IN_MAX + 1, back, &len) == PC_BAD_ARGUMENT, "echo past the header's bound");
    {
        /* The header's limit is the broker's: one more is refused before the driver runs. */
        uint64_t too_long = PC_SAMPLE_WAIT_EVENT_TIMEOUT_MS_MAX + 1ull, v = 0;
        uint32_t one = 1;
        rc = pc_call(conn, handle, PC_SAMPLE_WAIT_EVENT, &too_long, PC_SAMPLE_WAIT_EVENT_SCALARS_IN, &v, &one, NULL, 0, NULL, NULL);
        CHECK(rc == PC_BAD_ARGUMENT, "wait_event past the header's limit: %s", pc_status_name(rc));
    }
    {
        struct sample_info info;
        len = sizeof info;
        rc = pc_call(conn, handle, PC_SAMPLE_GET_INFO, NULL, 0, NULL, NULL, NULL, 0, &info, &len);
        CHECK(rc == PC_SUCCESS && len == sizeof info && info.version == 1 && info.current_opens >= 1 && info.calls_served >= 7,
              "get_info: %s version %lu opens %lu", pc_status_name(rc), (unsigned long)info.version, (unsigned long)info.current_opens);
    }
    CHECK(pc_call(conn, handle, 99, NULL, 0, NULL, NULL, NULL, 0, NULL, NULL) == PC_BAD_ARGUMENT, "unknown selector");
}

static uint64_t fnv1a(const unsigned char *p, size_t n) {
    uint64_t h = 0xcbf29ce484222325ull;
    size_t i;
    for (i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001b3ull;
    return h;
}

static uint32_t le32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* Mapped device memory: registers (read-only, little-endian contents) and dma (shared). */
static void memory(void) {
    void *regs = NULL, *dma = NULL;
    size_t regs_size = 0, dma_size = 0, k;
    int writable = -1, rc;
    rc = pc_map_memory(conn, handle, PC_SAMPLE_MEMORY_REGISTERS, &regs, &regs_size, &writable);
    CHECK(rc == PC_SUCCESS, "map registers: %s: %s", pc_status_name(rc), pc_last_message(conn));
    if (rc == PC_SUCCESS) {
        const unsigned char *r = regs;
        CHECK(regs_size == 4096 && writable == 0, "registers %lu bytes, writable %d", (unsigned long)regs_size, writable);
        CHECK(le32(r) == 1 && le32(r + 4) == 0x50435352u, "registers hold version and magic");
        CHECK(pc_unmap_memory(regs, regs_size) == PC_SUCCESS, "unmap registers");
    }
    rc = pc_map_memory(conn, handle, PC_SAMPLE_MEMORY_DMA, &dma, &dma_size, &writable);
    CHECK(rc == PC_SUCCESS, "map dma: %s: %s", pc_status_name(rc), pc_last_message(conn));
    if (rc == PC_SUCCESS) {
        unsigned char *d = dma;
        uint64_t in[2], sum = 0;
        uint32_t n = 1;
        CHECK(dma_size == 1u << 20 && writable == 1, "dma %lu bytes, writable %d", (unsigned long)dma_size, writable);
        for (k = 0; k < dma_size; k++) d[k] = (unsigned char)((k * 2654435761u) >> 13);
        in[0] = 0;
        in[1] = dma_size;
        rc = pc_call(conn, handle, PC_SAMPLE_CHECKSUM_DMA, in, 2, &sum, &n, NULL, 0, NULL, NULL);
        CHECK(rc == PC_SUCCESS && sum == fnv1a(d, dma_size), "checksum_dma of what this client wrote: %s", pc_status_name(rc));
        in[0] = 12345;
        in[1] = 777;
        n = 1;
        rc = pc_call(conn, handle, PC_SAMPLE_CHECKSUM_DMA, in, 2, &sum, &n, NULL, 0, NULL, NULL);
        CHECK(rc == PC_SUCCESS && sum == fnv1a(d + 12345, 777), "checksum_dma of a range");
        CHECK(pc_unmap_memory(dma, dma_size) == PC_SUCCESS, "unmap dma");
    }
    CHECK(pc_map_memory(conn, handle, 9, &dma, &dma_size, &writable) == PC_BAD_ARGUMENT, "unknown memory type");
}

/* Fires a notification with `value`; PC_SUCCESS and the count it completed. */
static int fire(uint64_t value) {
    uint64_t completed = 99;
    uint32_t n = 1;
    return pc_call(conn, handle, PC_SAMPLE_FIRE_EVENT, &value, 1, &completed, &n, NULL, 0, NULL, NULL);
}

/* Events: subscribe, fire, and the notification arrives through pc_next_event; a call that ran
 * though its output had no room says so; events come in order, a loss where it happened. */
static void events(uint64_t service) {
    pc_event ev;
    uint64_t value = 77, got = 0, expect, lost = 0, wait_ms = 300;
    uint32_t n = 0;
    int rc = pc_subscribe(conn, &service, 1);
    CHECK(rc == PC_SUCCESS, "subscribe: %s", pc_status_name(rc));
    CHECK(pc_next_event(conn, 0, &ev) == PC_TIMEOUT, "no event before the fire");
    rc = fire(4242);
    CHECK(rc == PC_SUCCESS, "fire_event: %s", pc_status_name(rc));
    rc = pc_wait_event(conn, 5000, &ev); /* the former name still works */
    CHECK(rc == PC_SUCCESS, "next event: %s", pc_status_name(rc));
    CHECK(ev.kind == PC_EVENT_NOTIFICATION && ev.service == service && ev.value == 4242 && strcmp(ev.kind_name, "event") == 0,
          "notification kind %d service %lu value %lu", ev.kind, (unsigned long)ev.service, (unsigned long)ev.value);

    /* No room for fire_event's output: it ran all the same (its notification comes), and the
     * status says so rather than a refusal. */
    rc = pc_call(conn, handle, PC_SAMPLE_FIRE_EVENT, &value, 1, NULL, &n, NULL, 0, NULL, NULL);
    CHECK(rc == PC_ERR_OUTPUT_ROOM && n == 1, "fire_event without room: %s, %u outputs", pc_status_name(rc), n);
    rc = pc_next_event(conn, 5000, &ev);
    CHECK(rc == PC_SUCCESS && ev.kind == PC_EVENT_NOTIFICATION && ev.value == 77, "the call ran: its event came (%s)", pc_status_name(rc));
    /* Arguments the library can check are checked before anything is sent. */
    n = 1;
    CHECK(pc_call(conn, handle, PC_SAMPLE_ADD, NULL, 2, &got, &n, NULL, 0, NULL, NULL) == PC_ERR_USAGE, "scalars without a buffer");

    /* A queue of 2, five notifications fired, then a call that waits while they arrive: the two
     * first queued, the rest lost, the loss delivered after them and before anything later. */
    CHECK(pc_set_event_queue(conn, 0) == PC_ERR_USAGE, "an empty queue is refused");
    CHECK(pc_set_event_queue(conn, 2) == PC_SUCCESS, "a queue of 2");
    for (value = 1; value <= 5; value++) CHECK(fire(value) == PC_SUCCESS, "fire %lu", (unsigned long)value);
    n = 1;
    rc = pc_call(conn, handle, PC_SAMPLE_WAIT_EVENT, &wait_ms, 1, &got, &n, NULL, 0, NULL, NULL);
    CHECK(rc == PC_TIMEOUT, "a wait while the events arrive: %s", pc_status_name(rc));
    CHECK(pc_set_event_queue(conn, 1) == PC_ERR_USAGE, "smaller than what is queued");
    for (expect = 1; expect <= 5;) {
        rc = pc_next_event(conn, 5000, &ev);
        if (rc != PC_SUCCESS) break;
        if (ev.kind == PC_EVENT_LOST) {
            CHECK(expect == 3 && lost == 0, "the loss comes after the two queued, once (at %lu)", (unsigned long)expect);
            lost = ev.value;
            expect += ev.value;
            continue;
        }
        CHECK(ev.kind == PC_EVENT_NOTIFICATION && ev.value == expect, "in order: %lu, expected %lu", (unsigned long)ev.value, (unsigned long)expect);
        expect++;
    }
    CHECK(rc == PC_SUCCESS && expect == 6 && lost >= 1, "five accounted for, %lu of them lost: %s", (unsigned long)lost, pc_status_name(rc));
    CHECK(fire(6) == PC_SUCCESS, "fire 6");
    rc = pc_next_event(conn, 5000, &ev);
    CHECK(rc == PC_SUCCESS && ev.kind == PC_EVENT_NOTIFICATION && ev.value == 6, "after the loss, the next one");
    CHECK(pc_set_event_queue(conn, 64) == PC_SUCCESS, "back to 64");
}

/* Calls in flight: a wait_event started, other calls made on the same connection meanwhile,
 * then fired from it; and an event loop that polls while another connection fires. */
static void async_calls(const char *run_dir, uint64_t service) {
    pc_call_args wait = {0}, sum = {0};
    pc_event ev;
    pc_conn *other = NULL;
    uint64_t timeout_ms = 5000, got = 0, in[2] = {20, 22}, total = 0, call = 0, h2 = 0, value = 9090, completed = 0;
    uint32_t one = 1;
    int rc, i;
    wait.selector = PC_SAMPLE_WAIT_EVENT;
    wait.scalars_in = &timeout_ms;
    wait.n_scalars_in = 1;
    wait.scalars_out = &got;
    wait.scalars_out_room = 1;
    rc = pc_invoke_start(conn, handle, &wait, &call);
    CHECK(rc == PC_SUCCESS, "start wait_event: %s", pc_status_name(rc));
    CHECK(pc_invoke_finish(conn, call, 0) == PC_ERR_IN_FLIGHT, "still in flight");
    sum.selector = PC_SAMPLE_ADD;
    sum.scalars_in = in;
    sum.n_scalars_in = 2;
    sum.scalars_out = &total;
    sum.scalars_out_room = 1;
    rc = pc_invoke(conn, handle, &sum);
    CHECK(rc == PC_SUCCESS && total == 42, "a call while another is in flight: %s", pc_status_name(rc));
    /* Fire until the waiter has been taken (its start may still be on its way). */
    for (i = 0; i < 100000 && completed == 0; i++) {
        rc = pc_call(conn, handle, PC_SAMPLE_FIRE_EVENT, &value, 1, &completed, &one, NULL, 0, NULL, NULL);
        if (rc != PC_SUCCESS) break;
    }
    CHECK(completed == 1, "fire completed the waiter (%s)", pc_status_name(rc));
    rc = pc_invoke_finish(conn, call, 5000);
    CHECK(rc == PC_SUCCESS && got == 9090 && wait.n_scalars_out == 1, "the started call's outputs: %s, %lu", pc_status_name(rc), (unsigned long)got);
    CHECK(pc_invoke_finish(conn, call, 0) == PC_ERR_USAGE, "a finished call is forgotten");

    /* An event loop: poll the connection's descriptor while another connection fires. */
    got = 0;
    rc = pc_invoke_start(conn, handle, &wait, &call);
    CHECK(rc == PC_SUCCESS, "start again: %s", pc_status_name(rc));
    if (pc_connect(run_dir, &other) != PC_SUCCESS || pc_open(other, service, 0, &h2) != PC_SUCCESS) {
        CHECK(0, "a second connection");
        return;
    }
    value = 4711;
    for (completed = 0, i = 0; i < 100000 && completed == 0; i++) {
        rc = pc_call(other, h2, PC_SAMPLE_FIRE_EVENT, &value, 1, &completed, &one, NULL, 0, NULL, NULL);
        if (rc != PC_SUCCESS) break;
    }
    CHECK(completed == 1, "the other connection completed the waiter (%s)", pc_status_name(rc));
    for (i = 0; i < 1000; i++) {
        while (pc_next_event(conn, 0, &ev) == PC_SUCCESS) {
        }
        if (pc_poll_prepare(conn) == 0) {
            struct pollfd pfd;
            pfd.fd = pc_poll_fd(conn);
            pfd.events = POLLIN;
            pfd.revents = 0;
            if (poll(&pfd, 1, 5000) != 1) {
                CHECK(0, "the descriptor became readable");
                break;
            }
        }
        rc = pc_invoke_finish(conn, call, 0);
        if (rc != PC_ERR_IN_FLIGHT) break;
    }
    CHECK(rc == PC_SUCCESS && got == 4711, "completed through the event loop: %s, %lu", pc_status_name(rc), (unsigned long)got);
    pc_disconnect(other);
}

/* wait_event (asynchronous): a timeout, then a completion fired by another process; and the
 * privileged reset (the matrix runs as root, which the default policy lets reset). */
static void async_and_reset(const char *run_dir, uint64_t service) {
    uint64_t timeout_ms = 20, value = 0;
    uint32_t n = 1;
    pid_t child;
    int rc = pc_call(conn, handle, PC_SAMPLE_WAIT_EVENT, &timeout_ms, 1, &value, &n, NULL, 0, NULL, NULL);
    CHECK(rc == PC_TIMEOUT, "wait_event without a fire: %s", pc_status_name(rc));
    CHECK(PC_STATUS_IN(PC_SAMPLE_WAIT_EVENT_STATUSES, rc), "TIMEOUT is in wait_event's contract");
    CHECK(!PC_STATUS_IN(PC_SAMPLE_ADD_STATUSES, PC_TIMEOUT) && !PC_STATUS_IN(PC_SAMPLE_ADD_STATUSES, PC_ERR_USAGE),
          "add can end with neither TIMEOUT nor a library error");
    child = fork();
    if (child == 0) {
        /* Fire until the parent's wait has taken it (fire_event reports how many it completed). */
        pc_conn *other;
        uint64_t h2, v = 31337, done = 0;
        uint32_t m = 1;
        int i;
        if (pc_connect(run_dir, &other) != PC_SUCCESS || pc_open(other, service, 0, &h2) != PC_SUCCESS) _exit(2);
        for (i = 0; i < 500 && done == 0; i++) {
            struct timespec pause = {0, 10000000L};
            nanosleep(&pause, NULL);
            m = 1;
            if (pc_call(other, h2, PC_SAMPLE_FIRE_EVENT, &v, 1, &done, &m, NULL, 0, NULL, NULL) != PC_SUCCESS) _exit(3);
        }
        pc_disconnect(other);
        _exit(done == 1 ? 0 : 4);
    }
    timeout_ms = 20000;
    n = 1;
    rc = pc_call(conn, handle, PC_SAMPLE_WAIT_EVENT, &timeout_ms, 1, &value, &n, NULL, 0, NULL, NULL);
    CHECK(rc == PC_SUCCESS && n == 1 && value == 31337, "wait_event completed: %s, value %lu", pc_status_name(rc),
          (unsigned long)value);
    if (child > 0) {
        int status = 0;
        waitpid(child, &status, 0);
        CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "the firing process: status %d", status);
    }
    rc = pc_call(conn, handle, PC_SAMPLE_RESET, NULL, 0, NULL, NULL, NULL, 0, NULL, NULL);
    CHECK(rc == PC_SUCCESS, "reset: %s", pc_status_name(rc));
}

static double ms_since(const struct timespec *t0) {
    struct timespec t1;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    return (double)(t1.tv_sec - t0->tv_sec) * 1e3 + (double)(t1.tv_nsec - t0->tv_nsec) / 1e6;
}

/* `calls` calls of add through a ring that sleeps between calls (the broker, in sleep mode,
 * sleeps too: every call rings its doorbell). The first call over 50 ms fails: a lost wake-up
 * shows as the broker's 500 ms nap. */
static int sleeping_ring(const char *run_dir, long calls) {
    pc_service found[4];
    size_t n = 0;
    long i;
    double slowest = 0;
    int rc = pc_connect(run_dir, &conn);
    if (rc == PC_SUCCESS) rc = pc_ring_enable(conn, 0, 0, PC_RING_SLEEP);
    if (rc == PC_SUCCESS) rc = pc_find_services(conn, NULL, "sample0", found, 4, &n);
    if (rc == PC_SUCCESS && n == 1) rc = pc_open(conn, found[0].id, 0, &handle);
    if (rc != PC_SUCCESS || n != 1) {
        printf("FAIL setting up the sleeping ring on %s: %s %s\n", abi_names[PC_ABI], pc_status_name(rc), conn ? pc_last_message(conn) : "");
        return 1;
    }
    for (i = 0; i < calls; i++) {
        struct timespec t0;
        uint64_t sum = 0;
        double took;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        rc = call_add((uint64_t)i, 1, &sum);
        took = ms_since(&t0);
        if (rc != PC_SUCCESS || sum != (uint64_t)i + 1) {
            printf("FAIL call %ld on %s: %s (%s), sum %llu\n", i, abi_names[PC_ABI], pc_status_name(rc), pc_last_message(conn), (unsigned long long)sum);
            return 1;
        }
        if (took > slowest) slowest = took;
        if (took > 50.0) {
            printf("FAIL sleeping ring call %ld of %ld took %.1f ms on %s\n", i + 1, calls, took, abi_names[PC_ABI]);
            return 1;
        }
    }
    pc_disconnect(conn);
    printf("ok: %ld sleeping ring calls on %s, slowest %.2f ms\n", calls, abi_names[PC_ABI], slowest);
    return 0;
}

int main(int argc, char **argv) {
    pc_service found[4];
    size_t n = 0;
    /* usage: client RUN_DIR [ring | sleeping-ring CALLS] */
    int ring = argc > 2 && strcmp(argv[2], "ring") == 0;
    int rc;
    if (argc > 3 && strcmp(argv[2], "sleeping-ring") == 0) return sleeping_ring(argv[1], strtol(argv[3], NULL, 10));
    rc = pc_connect(argc > 1 ? argv[1] : NULL, &conn);
    if (rc != PC_SUCCESS) {
        printf("FAIL connect: %s\n", pc_status_name(rc));
        return 1;
    }
    if (ring) {
        rc = pc_ring_enable(conn, 0, 0, PC_RING_ADAPTIVE);
        if (rc != PC_SUCCESS) {
            printf("FAIL ring: %s: %s\n", pc_status_name(rc), pc_last_message(conn));
            return 1;
        }
        CHECK(pc_ring_enable(conn, 0, 0, PC_RING_ADAPTIVE) == PC_ERR_USAGE, "a second ring is refused, locally");
        CHECK(pc_ring_active(conn) == 1, "the ring is active");
    }
    if (!ring) CHECK(pc_ring_active(conn) == 0, "no ring yet");
    if (getenv("PORTCULLIS_EXPECT_BROKER_ABI") != NULL)
        CHECK(pc_broker_abi(conn) == atoi(getenv("PORTCULLIS_EXPECT_BROKER_ABI")), "the broker's ABI: %d", pc_broker_abi(conn));
    rc = pc_find_services(conn, NULL, "sample0", found, 4, &n);
    CHECK(rc == PC_SUCCESS && n == 1, "find sample0: %s, %lu found", pc_status_name(rc), (unsigned long)n);
    if (n != 1) return 1;
    CHECK(strcmp(found[0].class_name, PC_SAMPLE_CLASS) == 0, "class %s", found[0].class_name);
    {
        /* A matching notification: the matching services now, by class and a text property. */
        static const char *const props[] = {"model", "demo"};
        static const char *const wrong[] = {"model", "no-such-model"};
        pc_service watched[4];
        size_t m = 0;
        rc = pc_watch_matching(conn, PC_SAMPLE_CLASS, NULL, props, 1, watched, 4, &m);
        CHECK(rc == PC_SUCCESS && m == 1 && watched[0].id == found[0].id, "watch_matching: %s, %lu found",
              pc_status_name(rc), (unsigned long)m);
        rc = pc_watch_matching(conn, PC_SAMPLE_CLASS, NULL, wrong, 1, watched, 4, &m);
        CHECK(rc == PC_SUCCESS && m == 0, "watch_matching another model: %s, %lu found", pc_status_name(rc),
              (unsigned long)m);
    }
    rc = pc_open(conn, found[0].id, 0, &handle);
    CHECK(rc == PC_SUCCESS, "open: %s", pc_status_name(rc));
    if (rc != PC_SUCCESS) return 1;
    scalars_and_echo();
    records();
    memory();
    events(found[0].id);
    async_calls(argc > 1 ? argv[1] : NULL, found[0].id);
    async_and_reset(argc > 1 ? argv[1] : NULL, found[0].id);
    CHECK(pc_close(conn, handle) == PC_SUCCESS, "close");
    {
        uint64_t sum = 0;
        CHECK(call_add(1, 1, &sum) == PC_NOT_OPEN, "closed handle");
        CHECK(call_add(1, 1, NULL) == PC_ERR_USAGE, "room for a sum, and no buffer: refused locally");
    }
    pc_disconnect(conn);
    if (failures) {
        printf("%d of %d checks failed on %s%s\n", failures, checks, abi_names[PC_ABI], ring ? " over the ring" : "");
        return 1;
    }
    printf("ok: %d checks on %s%s\n", checks, abi_names[PC_ABI], ring ? " over the ring" : "");
    return 0;
}
