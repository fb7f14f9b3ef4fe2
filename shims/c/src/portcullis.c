/* libportcullis: the native protocol (docs/PROTOCOL.md) over AF_UNIX SOCK_SEQPACKET.
 * Frames are postcard: LEB128 varints for integers and lengths, one byte for u8 and bool,
 * varint enum tags, length-prefixed strings and byte arrays. */
#define _POSIX_C_SOURCE 200809L

#include "portcullis.h"

#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define PC_PROTOCOL_VERSION 1u
#define PC_MAX_FRAME (65536u + 4096u)
#define PC_EVENT_QUEUE 64u /* the default; pc_set_event_queue changes it */
#define PC_MAX_PENDING 1024u /* calls in flight per connection (pc_invoke_start) */

/* A call started with pc_invoke_start: its outputs go to args when its response arrives. */
struct pc_pending {
    uint64_t id;
    pc_call_args *args;
    int done, status;
    char message[256];
    char rule[128];
};

struct pc_conn {
    int fd;
    uint64_t next_id;
    unsigned char *in;  /* PC_MAX_FRAME + 1: a larger packet shows as truncated */
    unsigned char *out; /* PC_MAX_FRAME */
    char message[256];
    char rule[128];
    pc_event *events; /* a circular queue of ev_cap */
    size_t ev_cap, ev_head, ev_len;
    uint64_t ev_lost; /* events lost after every queued one: delivered as one LOST after them */
    int broker_abi;   /* the Welcome's */
    struct pc_pending *pending; /* calls started with pc_invoke_start, not yet finished */
    size_t n_pending, pending_cap;
    int fd_in;       /* the first descriptor that came with the last frame, or -1 */
    int fd_more[2];  /* the second and third (the broker's doorbell, ours), or -1 */
    struct pc_ring {
        unsigned char *base; /* NULL until pc_ring_enable */
        size_t len;
        uint32_t sq_size, cq_size;
        uint32_t sq_tail, cq_head; /* ours; the shared copies are only written */
        int efd_broker, efd_client; /* our end of the doorbell socket pair: the one we ring on, the one we wait on */
        int wait;
        int bell_errno; /* set when the broker's doorbell failed: the ring is unusable */
    } ring;
};

/* ---- the shared-memory ring (proto/src/ring.rs, docs/PROTOCOL.md) ------------------------ */

static void set_message(pc_conn *c, const char *m);

#define RING_HEADER 4096u
#define RING_SQ_TAIL 64u
#define RING_SQ_HEAD 128u
#define RING_CQ_TAIL 192u
#define RING_CQ_HEAD 256u
#define RING_BROKER_SLEEPING 320u
#define RING_CLIENT_SLEEPING 384u
#define RING_SPIN_NS 50000L

/* Control words are little-endian whatever this machine is. */
static uint32_t le32(uint32_t v) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    return __builtin_bswap32(v);
#else
    return v;
#endif
}

static uint32_t *ring_word(pc_conn *c, size_t off) { return (uint32_t *)(void *)(c->ring.base + off); }
static uint32_t ring_load(pc_conn *c, size_t off) { return le32(__atomic_load_n(ring_word(c, off), __ATOMIC_ACQUIRE)); }
static void ring_store(pc_conn *c, size_t off, uint32_t v) { __atomic_store_n(ring_word(c, off), le32(v), __ATOMIC_RELEASE); }

/* Rings the broker's doorbell: one byte, whatever its value, never blocking and never raising
 * SIGPIPE. A full socket (EAGAIN) is already a wake-up: the broker empties it before it sleeps.
 * 0, or an errno (EPIPE: the broker has let the ring go). */
static int ring_bell(int fd) {
    static const unsigned char one = 1;
    ssize_t n;
    do n = send(fd, &one, 1, MSG_DONTWAIT | MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    if (n >= 0 || errno == EAGAIN || errno == EWOULDBLOCK) return 0;
    return errno;
}

/* The bits of a *_sleeping word: what the sleeper waits for. */
#define RING_ON_RECORDS 1u /* a tail published */
#define RING_ON_ROOM 2u    /* a head published */

/* Wakes the broker if it sleeps waiting for `what` (after a fence that pairs with its own).
 * A doorbell that fails makes the ring unusable: remembered, and reported by ring_broken. */
static void ring_wake_broker(pc_conn *c, uint32_t what) {
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (le32(__atomic_load_n(ring_word(c, RING_BROKER_SLEEPING), __ATOMIC_RELAXED)) & what) {
        int e = ring_bell(c->ring.efd_broker);
        if (e != 0 && c->ring.bell_errno == 0) c->ring.bell_errno = e;
    }
}

/* PC_ERR_SYSTEM (errno set, message saying so) once the broker's doorbell has failed. */
static int ring_broken(pc_conn *c) {
    char m[160];
    if (c->ring.bell_errno == 0) return PC_SUCCESS;
    snprintf(m, sizeof m, "the broker's doorbell cannot be rung (%s): the ring is unusable", strerror(c->ring.bell_errno));
    set_message(c, m);
    errno = c->ring.bell_errno;
    return PC_ERR_SYSTEM;
}

/* Copies n bytes into (to = 1) or out of a ring at index, wrapping at its end. */
static void ring_copy(unsigned char *ring, uint32_t size, uint32_t index, unsigned char *buf, size_t n, int to) {
    size_t at = index & (size - 1u), first = n < size - at ? n : size - at;
    if (to) {
        memcpy(ring + at, buf, first);
        memcpy(ring, buf + first, n - first);
    } else {
        memcpy(buf, ring + at, first);
        memcpy(buf + first, ring, n - first);
    }
}

static long elapsed_ns(const struct timespec *since) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (long)(now.tv_sec - since->tv_sec) * 1000000000L + (now.tv_nsec - since->tv_nsec);
}

/* Publishes one submission record. One request is in flight at a time, so room frees as soon
 * as the broker takes the previous one. */
static int ring_push(pc_conn *c, const unsigned char *p, size_t n) {
    uint32_t span = 8u + (uint32_t)((n + 7u) & ~(size_t)7u);
    unsigned char hdr[8] = {0};
    static const unsigned char zeros[8] = {0};
    unsigned char *sq = c->ring.base + RING_HEADER;
    if (ring_broken(c) != PC_SUCCESS) return PC_ERR_SYSTEM;
    for (;;) {
        uint32_t used = c->ring.sq_tail - ring_load(c, RING_SQ_HEAD);
        if (used > c->ring.sq_size) {
            set_message(c, "the broker's submission head is past the ring");
            return PC_PROTOCOL_ERROR;
        }
        if (c->ring.sq_size - used >= span) break;
        sched_yield();
    }
    hdr[0] = (unsigned char)n;
    hdr[1] = (unsigned char)(n >> 8);
    hdr[2] = (unsigned char)(n >> 16);
    hdr[3] = (unsigned char)(n >> 24);
    ring_copy(sq, c->ring.sq_size, c->ring.sq_tail, hdr, 8, 1);
    ring_copy(sq, c->ring.sq_size, c->ring.sq_tail + 8u, (unsigned char *)p, n, 1);
    ring_copy(sq, c->ring.sq_size, c->ring.sq_tail + 8u + (uint32_t)n, (unsigned char *)zeros, span - 8u - n, 1);
    c->ring.sq_tail += span;
    ring_store(c, RING_SQ_TAIL, c->ring.sq_tail);
    ring_wake_broker(c, RING_ON_RECORDS);
    return ring_broken(c);
}

/* Takes the next completion record into c->in: 1 with its length, 0 when none is published,
 * or an error for a record that cannot be right. */
static int ring_pop(pc_conn *c, size_t *len) {
    unsigned char hdr[8];
    uint32_t tail = ring_load(c, RING_CQ_TAIL), used = tail - c->ring.cq_head, n;
    unsigned char *cq = c->ring.base + RING_HEADER + c->ring.sq_size;
    /* Records published before the doorbell failed (a Goodbye, say) are still delivered. */
    if (used == 0) return ring_broken(c) == PC_SUCCESS ? 0 : PC_ERR_SYSTEM;
    if (used > c->ring.cq_size || used % 8u != 0) {
        set_message(c, "the completion tail is past the ring");
        return PC_PROTOCOL_ERROR;
    }
    ring_copy(cq, c->ring.cq_size, c->ring.cq_head, hdr, 8, 0);
    n = (uint32_t)hdr[0] | (uint32_t)hdr[1] << 8 | (uint32_t)hdr[2] << 16 | (uint32_t)hdr[3] << 24;
    if (n == 0 || n > PC_MAX_FRAME || (hdr[4] | hdr[5] | hdr[6] | hdr[7]) != 0 || 8u + ((n + 7u) & ~7u) > used) {
        set_message(c, "a completion record that cannot be right");
        return PC_PROTOCOL_ERROR;
    }
    ring_copy(cq, c->ring.cq_size, c->ring.cq_head + 8u, c->in, n, 0);
    c->ring.cq_head += 8u + ((n + 7u) & ~7u);
    ring_store(c, RING_CQ_HEAD, c->ring.cq_head);
    ring_wake_broker(c, RING_ON_ROOM);
    *len = n;
    return 1;
}

/* Waits until a completion is published (1), the socket has a frame (2), or the timeout
 * passes (PC_TIMEOUT). Spins first unless told to sleep; sleeps on the doorbell pipe the broker
 * writes, and empties it on waking. */
static int ring_wait(pc_conn *c, int timeout_ms) {
    struct timespec start;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (;;) {
        long spent = elapsed_ns(&start);
        struct pollfd pfd[2];
        int ready, left;
        if (ring_load(c, RING_CQ_TAIL) != c->ring.cq_head) return 1;
        if (timeout_ms >= 0 && spent / 1000000L >= timeout_ms) return PC_TIMEOUT;
        if (c->ring.wait == PC_RING_SPIN || (c->ring.wait == PC_RING_ADAPTIVE && spent < RING_SPIN_NS)) continue;
        __atomic_store_n(ring_word(c, RING_CLIENT_SLEEPING), le32(RING_ON_RECORDS), __ATOMIC_RELAXED);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (ring_load(c, RING_CQ_TAIL) != c->ring.cq_head) {
            __atomic_store_n(ring_word(c, RING_CLIENT_SLEEPING), 0, __ATOMIC_RELAXED);
            return 1;
        }
        pfd[0].fd = c->ring.efd_client;
        pfd[1].fd = c->fd;
        pfd[0].events = pfd[1].events = POLLIN;
        pfd[0].revents = pfd[1].revents = 0;
        left = timeout_ms < 0 ? 1000 : timeout_ms - (int)(spent / 1000000L);
        ready = poll(pfd, 2, left < 1000 ? left : 1000);
        __atomic_store_n(ring_word(c, RING_CLIENT_SLEEPING), 0, __ATOMIC_RELAXED);
        if (ready > 0 && pfd[0].revents) {
            unsigned char drained[512];
            /* MSG_DONTWAIT: never blocks, whatever the descriptor's flags. */
            ssize_t got = recv(c->ring.efd_client, drained, sizeof drained, MSG_DONTWAIT);
            (void)got; /* what is left makes the next poll return at once */
        }
        if (ready > 0 && pfd[1].revents && ring_load(c, RING_CQ_TAIL) == c->ring.cq_head) return 2;
    }
}

static void ring_release(pc_conn *c) {
    if (c->ring.base != NULL) munmap(c->ring.base, c->ring.len);
    if (c->ring.base != NULL) {
        close(c->ring.efd_broker);
        close(c->ring.efd_client);
    }
    c->ring.base = NULL;
}

/* ---- encoding ---------------------------------------------------------------------------- */

struct wr {
    unsigned char *p;
    size_t len, cap;
    int overflow;
};

static void w_byte(struct wr *w, unsigned char b) {
    if (w->len < w->cap) w->p[w->len++] = b;
    else w->overflow = 1;
}

static void w_varint(struct wr *w, uint64_t v) {
    while (v >= 0x80) {
        w_byte(w, (unsigned char)(v | 0x80));
        v >>= 7;
    }
    w_byte(w, (unsigned char)v);
}

static void w_bytes(struct wr *w, const void *data, size_t n) {
    w_varint(w, n);
    if (n == 0) return;
    if (data == NULL || w->cap - w->len < n) {
        w->overflow = 1;
        return;
    }
    memcpy(w->p + w->len, data, n);
    w->len += n;
}

static void w_str(struct wr *w, const char *s) { w_bytes(w, s, s ? strlen(s) : 0); }

/* ---- decoding (every read is bounds-checked; any fault sets bad) ------------------------- */

struct rd {
    const unsigned char *p;
    size_t len, pos;
    int bad;
};

static uint64_t r_varint(struct rd *r, unsigned max_bytes) {
    uint64_t v = 0;
    unsigned i;
    for (i = 0; i < max_bytes; i++) {
        unsigned char b;
        if (r->pos >= r->len) break;
        b = r->p[r->pos++];
        v |= (uint64_t)(b & 0x7f) << (7 * i);
        if (!(b & 0x80)) return v;
    }
    r->bad = 1;
    return 0;
}

static uint64_t r_u64(struct rd *r) { return r_varint(r, 10); }

static uint32_t r_u32(struct rd *r) {
    uint64_t v = r_varint(r, 5);
    if (v > UINT32_MAX) r->bad = 1;
    return (uint32_t)v;
}

static unsigned char r_byte(struct rd *r) {
    if (r->pos >= r->len) {
        r->bad = 1;
        return 0;
    }
    return r->p[r->pos++];
}

static const unsigned char *r_bytes(struct rd *r, size_t *n) {
    uint64_t len = r_u64(r);
    const unsigned char *at;
    if (r->bad || len > r->len - r->pos) {
        r->bad = 1;
        *n = 0;
        return NULL;
    }
    at = r->p + r->pos;
    r->pos += (size_t)len;
    *n = (size_t)len;
    return at;
}

/* A string into dst (cut to cap - 1 bytes, always NUL-terminated). */
static void r_str(struct rd *r, char *dst, size_t cap) {
    size_t n, keep;
    const unsigned char *s = r_bytes(r, &n);
    keep = n < cap - 1 ? n : cap - 1;
    if (s && keep) memcpy(dst, s, keep);
    dst[s ? keep : 0] = '\0';
}

/* ---- frames ------------------------------------------------------------------------------ */

static void set_message(pc_conn *c, const char *m) {
    snprintf(c->message, sizeof c->message, "%s", m);
    c->rule[0] = '\0';
}

static int send_frame(pc_conn *c, const struct wr *w) {
    ssize_t n;
    if (w->overflow) {
        errno = EMSGSIZE;
        return PC_ERR_SYSTEM;
    }
    do n = send(c->fd, w->p, w->len, MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    return n == (ssize_t)w->len ? PC_SUCCESS : PC_ERR_SYSTEM;
}

/* Queues an event that arrived while the caller was busy. When the queue is full the event is
 * lost, and so is every later one until the loss has been delivered: the LOST event then stands
 * exactly where the gap is, after every event queued before it. */
static void queue_event(pc_conn *c, const pc_event *e) {
    if (c->ev_lost || c->ev_len == c->ev_cap) {
        c->ev_lost++;
        return;
    }
    c->events[(c->ev_head + c->ev_len) % c->ev_cap] = *e;
    c->ev_len++;
}

static int parse_event(struct rd *r, pc_event *e) {
    memset(e, 0, sizeof *e);
    e->kind = (int)r_u32(r);
    switch (e->kind) {
    case PC_EVENT_PUBLISHED:
        e->service = r_u64(r);
        (void)r_u64(r); /* parent */
        r_str(r, e->text, sizeof e->text);
        r_str(r, e->kind_name, sizeof e->kind_name); /* class */
        break;
    case PC_EVENT_TERMINATED:
        e->service = r_u64(r);
        r_str(r, e->text, sizeof e->text);
        break;
    case PC_EVENT_NOTIFICATION:
        e->service = r_u64(r);
        r_str(r, e->kind_name, sizeof e->kind_name);
        e->value = r_u64(r);
        r_str(r, e->text, sizeof e->text);
        break;
    case PC_EVENT_USER_CLIENT_CLOSED:
        e->handle = r_u64(r);
        e->status = (int)r_u32(r);
        r_str(r, e->text, sizeof e->text);
        break;
    case PC_EVENT_LOST:
        e->value = r_u64(r);
        break;
    case PC_EVENT_WILL_SLEEP:
    case PC_EVENT_HAS_WOKEN:
        break;
    default:
        r->bad = 1;
    }
    return r->bad ? PC_PROTOCOL_ERROR : PC_SUCCESS;
}

/* Receives one frame, waiting up to timeout_ms (-1: forever). Events are queued and 0 is
 * returned; a response returns 1 with *r at its body, *id and *status set, the message and
 * rule stored. Errors: PC_TIMEOUT, PC_PROTOCOL_ERROR, PC_ERR_SYSTEM, or a Goodbye's status. */
static int parse_frame(pc_conn *c, size_t n, struct rd *r, uint64_t *id, int *status);
static int socket_frame(pc_conn *c, int timeout_ms, struct rd *r, uint64_t *id, int *status);

/* The next frame: from the completion ring when one is enabled (unless socket is set), else
 * from the socket. 1: a response (*id, *status; r at its body); 0: an event (queued);
 * otherwise a status (a Goodbye's, PC_TIMEOUT, an error). */
static int next_frame_on(pc_conn *c, int timeout_ms, struct rd *r, uint64_t *id, int *status, int socket) {
    size_t n = 0;
    int rc;
    if (c->ring.base == NULL || socket) return socket_frame(c, timeout_ms, r, id, status);
    for (;;) {
        rc = ring_pop(c, &n);
        if (rc == 1) return parse_frame(c, n, r, id, status);
        if (rc != 0) return rc;
        rc = ring_wait(c, timeout_ms);
        if (rc == 2) return socket_frame(c, 0, r, id, status);
        if (rc != 1) return rc;
    }
}

static int next_frame(pc_conn *c, int timeout_ms, struct rd *r, uint64_t *id, int *status) {
    return next_frame_on(c, timeout_ms, r, id, status, 0);
}

static int socket_frame(pc_conn *c, int timeout_ms, struct rd *r, uint64_t *id, int *status) {
    struct pollfd pfd;
    ssize_t n;
    pfd.fd = c->fd;
    pfd.events = POLLIN;
    pfd.revents = 0;
    for (;;) {
        int ready = poll(&pfd, 1, timeout_ms);
        if (ready < 0 && errno == EINTR) continue;
        if (ready < 0) return PC_ERR_SYSTEM;
        if (ready == 0) return PC_TIMEOUT;
        break;
    }
    {
        struct msghdr msg;
        struct iovec iov;
        union {
            struct cmsghdr align;
            char space[CMSG_SPACE(sizeof(int) * 4)];
        } control;
        struct cmsghdr *cm;
        memset(&msg, 0, sizeof msg);
        iov.iov_base = c->in;
        iov.iov_len = PC_MAX_FRAME + 1;
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.space;
        msg.msg_controllen = sizeof control.space;
        do n = recvmsg(c->fd, &msg, MSG_CMSG_CLOEXEC);
        while (n < 0 && errno == EINTR);
        if (c->fd_in >= 0) close(c->fd_in);
        if (c->fd_more[0] >= 0) close(c->fd_more[0]);
        if (c->fd_more[1] >= 0) close(c->fd_more[1]);
        c->fd_in = c->fd_more[0] = c->fd_more[1] = -1;
        for (cm = n >= 0 ? CMSG_FIRSTHDR(&msg) : NULL; cm != NULL; cm = CMSG_NXTHDR(&msg, cm)) {
            if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS) {
                size_t k, count = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
                for (k = 0; k < count; k++) {
                    int fd;
                    memcpy(&fd, CMSG_DATA(cm) + k * sizeof(int), sizeof fd);
                    if (c->fd_in < 0) c->fd_in = fd;
                    else if (c->fd_more[0] < 0) c->fd_more[0] = fd;
                    else if (c->fd_more[1] < 0) c->fd_more[1] = fd;
                    else close(fd); /* at most three are ever expected */
                }
            }
        }
    }
    if (n < 0) return PC_ERR_SYSTEM;
    if (n == 0) {
        errno = ECONNRESET;
        set_message(c, "the broker closed the connection");
        return PC_ERR_SYSTEM;
    }
    if ((size_t)n > PC_MAX_FRAME) {
        set_message(c, "oversized frame from the broker");
        return PC_PROTOCOL_ERROR;
    }
    return parse_frame(c, (size_t)n, r, id, status);
}

static int parse_frame(pc_conn *c, size_t n, struct rd *r, uint64_t *id, int *status) {
    unsigned tag;
    r->p = c->in;
    r->len = n;
    r->pos = 0;
    r->bad = 0;
    tag = r_u32(r);
    switch (tag) {
    case 0: /* Welcome: not expected after the handshake */
        return PC_PROTOCOL_ERROR;
    case 1: /* Response */
        *id = r_u64(r);
        *status = (int)r_u32(r);
        r_str(r, c->message, sizeof c->message);
        r_str(r, c->rule, sizeof c->rule);
        return r->bad ? PC_PROTOCOL_ERROR : 1;
    case 2: { /* Event */
        pc_event e;
        if (parse_event(r, &e) != PC_SUCCESS) return PC_PROTOCOL_ERROR;
        queue_event(c, &e);
        return 0;
    }
    case 3: { /* Goodbye */
        int st = (int)r_u32(r);
        r_str(r, c->message, sizeof c->message);
        c->rule[0] = '\0';
        return r->bad || st == 0 ? PC_PROTOCOL_ERROR : st;
    }
    default:
        set_message(c, "unknown frame from the broker");
        return PC_PROTOCOL_ERROR;
    }
}

/* Starts a Request frame: tag 1, a fresh id, the request tag. */
static uint64_t begin_request(pc_conn *c, struct wr *w, unsigned request_tag) {
    uint64_t id = c->next_id++;
    w->p = c->out;
    w->len = 0;
    w->cap = PC_MAX_FRAME;
    w->overflow = 0;
    w_byte(w, 1);
    w_varint(w, id);
    w_varint(w, request_tag);
    return id;
}

/* Sends the request (through the ring when one is enabled, unless socket is set) and waits
 * for its response; on success *r is at the body. */
static int complete_pending(pc_conn *c, uint64_t id, int status, struct rd *r);

/* Sends a request: through the ring when one is enabled (unless socket is set), else on the
 * socket. */
static int send_request(pc_conn *c, const struct wr *w, int socket) {
    if (c->ring.base == NULL || socket) return send_frame(c, w);
    if (w->overflow) {
        errno = EMSGSIZE;
        return PC_ERR_SYSTEM;
    }
    return ring_push(c, w->p, w->len);
}

static int exchange_on(pc_conn *c, struct wr *w, uint64_t id, struct rd *r, int socket) {
    int rc = send_request(c, w, socket);
    if (rc != PC_SUCCESS) return rc;
    for (;;) {
        uint64_t got = 0;
        int status = 0;
        rc = next_frame_on(c, -1, r, &got, &status, socket);
        if (rc == 0) continue;
        if (rc != 1) return rc;
        if (got != id) {
            /* A call started earlier completes meanwhile. */
            rc = complete_pending(c, got, status, r);
            if (rc != PC_SUCCESS) return rc;
            continue;
        }
        return status;
    }
}

static int exchange(pc_conn *c, struct wr *w, uint64_t id, struct rd *r) { return exchange_on(c, w, id, r, 0); }

/* Reads a body's tag and checks it is the expected one. */
static int expect_body(struct rd *r, unsigned tag) {
    unsigned got = r_u32(r);
    return r->bad || got != tag ? PC_PROTOCOL_ERROR : PC_SUCCESS;
}

/* ---- API --------------------------------------------------------------------------------- */

/* The same rule as every client: $PORTCULLIS_RUN_DIR; else a broker of this user's own where one
 * serves ($XDG_RUNTIME_DIR/portcullis holds its socket; root's own is the system broker); else the
 * system broker, /run/portcullis. */
static int default_run_dir(char *out, size_t cap) {
    const char *env = getenv("PORTCULLIS_RUN_DIR");
    const char *xdg = getenv("XDG_RUNTIME_DIR");
    int n;
    if (env && *env) {
        n = snprintf(out, cap, "%s", env);
        return n > 0 && (size_t)n < cap ? 0 : -1;
    }
    if (geteuid() != 0 && xdg && *xdg) {
        n = snprintf(out, cap, "%s/portcullis/native.sock", xdg);
        if (n > 0 && (size_t)n < cap && access(out, F_OK) == 0) {
            n = snprintf(out, cap, "%s/portcullis", xdg);
            return n > 0 && (size_t)n < cap ? 0 : -1;
        }
    }
    n = snprintf(out, cap, "/run/portcullis");
    return n > 0 && (size_t)n < cap ? 0 : -1;
}

int pc_connect(const char *run_dir, pc_conn **out) {
    struct sockaddr_un addr;
    char dir[sizeof addr.sun_path];
    pc_conn *c;
    struct wr w;
    struct rd r;
    int n, rc;
    unsigned tag;
    *out = NULL;
    if (run_dir == NULL) {
        if (default_run_dir(dir, sizeof dir) != 0) {
            errno = ENAMETOOLONG;
            return PC_ERR_SYSTEM;
        }
        run_dir = dir;
    }
    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    n = snprintf(addr.sun_path, sizeof addr.sun_path, "%s/native.sock", run_dir);
    if (n < 0 || (size_t)n >= sizeof addr.sun_path) {
        errno = ENAMETOOLONG;
        return PC_ERR_SYSTEM;
    }
    c = calloc(1, sizeof *c);
    if (c == NULL) return PC_ERR_SYSTEM;
    c->in = malloc(PC_MAX_FRAME + 1);
    c->out = malloc(PC_MAX_FRAME);
    c->events = malloc(PC_EVENT_QUEUE * sizeof *c->events);
    c->ev_cap = PC_EVENT_QUEUE;
    c->broker_abi = -1;
    c->next_id = 1;
    c->fd_in = c->fd_more[0] = c->fd_more[1] = -1;
    /* Close-on-exec, like every descriptor this library holds: a program that forks and execs
     * must not hand its session (and the rights the policy gave it) to what it runs. */
    c->fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (c->in == NULL || c->out == NULL || c->events == NULL || c->fd < 0 || connect(c->fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
        int saved = errno;
        pc_disconnect(c);
        errno = saved;
        return PC_ERR_SYSTEM;
    }
    /* Hello { version, abi } */
    w.p = c->out;
    w.len = 0;
    w.cap = PC_MAX_FRAME;
    w.overflow = 0;
    w_byte(&w, 0);
    w_varint(&w, PC_PROTOCOL_VERSION);
    w_byte(&w, (unsigned char)PC_ABI);
    rc = send_frame(c, &w);
    if (rc == PC_SUCCESS) {
        uint64_t id;
        int status;
        /* Welcome, or a Goodbye with the reason. */
        rc = next_frame(c, 10000, &r, &id, &status);
        if (rc == PC_PROTOCOL_ERROR && r.len > 0 && r.p[0] == 0) {
            r.pos = 0;
            tag = r_u32(&r);
            (void)r_u32(&r);
            c->broker_abi = r_byte(&r);
            rc = r.bad || tag != 0 ? PC_PROTOCOL_ERROR : PC_SUCCESS;
        } else if (rc >= 0) {
            rc = rc == PC_SUCCESS || rc == 1 ? PC_PROTOCOL_ERROR : rc;
        }
    }
    if (rc != PC_SUCCESS) {
        int saved = errno;
        pc_disconnect(c);
        errno = saved;
        return rc;
    }
    *out = c;
    return PC_SUCCESS;
}

void pc_disconnect(pc_conn *c) {
    if (c == NULL) return;
    if (c->fd >= 0) close(c->fd);
    if (c->fd_in >= 0) close(c->fd_in);
    if (c->fd_more[0] >= 0) close(c->fd_more[0]);
    if (c->fd_more[1] >= 0) close(c->fd_more[1]);
    ring_release(c);
    free(c->in);
    free(c->out);
    free(c->events);
    free(c->pending);
    free(c);
}

/* A `Found` body: every service, the first `cap` of them copied out. */
static int read_found(struct rd *rp, pc_service *out, size_t cap, size_t *count) {
    struct rd r = *rp;
    uint64_t n, i;
    if (expect_body(&r, 1) != PC_SUCCESS) return PC_PROTOCOL_ERROR;
    n = r_u64(&r);
    for (i = 0; i < n && !r.bad; i++) {
        pc_service s;
        s.id = r_u64(&r);
        s.parent = r_u64(&r);
        r_str(&r, s.name, sizeof s.name);
        r_str(&r, s.class_name, sizeof s.class_name);
        if (i < cap && out) out[i] = s;
    }
    if (r.bad) return PC_PROTOCOL_ERROR;
    if (count) *count = (size_t)n;
    return PC_SUCCESS;
}

int pc_find_services(pc_conn *c, const char *class_name, const char *name, pc_service *out, size_t cap,
                     size_t *count) {
    struct wr w;
    struct rd r;
    uint64_t id = begin_request(c, &w, 0);
    int rc;
    w_str(&w, class_name);
    w_str(&w, name);
    rc = exchange(c, &w, id, &r);
    if (rc != PC_SUCCESS) return rc;
    return read_found(&r, out, cap, count);
}

int pc_watch_matching(pc_conn *c, const char *class_name, const char *name, const char *const *properties,
                      size_t n_properties, pc_service *out, size_t cap, size_t *count) {
    struct wr w;
    struct rd r;
    uint64_t id = begin_request(c, &w, 7);
    size_t i;
    int rc;
    w_str(&w, class_name);
    w_str(&w, name);
    w_varint(&w, n_properties);
    for (i = 0; i < n_properties; i++) {
        w_str(&w, properties[2 * i]);
        w_str(&w, properties[2 * i + 1]);
    }
    rc = exchange(c, &w, id, &r);
    if (rc != PC_SUCCESS) return rc;
    return read_found(&r, out, cap, count);
}

int pc_open(pc_conn *c, uint64_t service, int exclusive, uint64_t *handle) {
    struct wr w;
    struct rd r;
    uint64_t id = begin_request(c, &w, 1);
    int rc;
    w_varint(&w, service);
    w_byte(&w, exclusive ? 1 : 0);
    rc = exchange(c, &w, id, &r);
    if (rc != PC_SUCCESS) return rc;
    if (expect_body(&r, 2) != PC_SUCCESS) return PC_PROTOCOL_ERROR;
    *handle = r_u64(&r);
    (void)r_u64(&r);
    return r.bad ? PC_PROTOCOL_ERROR : PC_SUCCESS;
}

int pc_close(pc_conn *c, uint64_t handle) {
    struct wr w;
    struct rd r;
    uint64_t id = begin_request(c, &w, 2);
    w_varint(&w, handle);
    return exchange(c, &w, id, &r);
}

/* Checks a call's arguments and encodes its request into w; returns its id in *id. */
static int begin_call(pc_conn *c, uint64_t handle, pc_call_args *a, struct wr *w, uint64_t *id) {
    size_t i;
    /* What the library can check is checked before anything is sent. */
    if (a == NULL || (a->n_scalars_in && a->scalars_in == NULL) || (a->struct_in_len && a->struct_in == NULL) ||
        (a->scalars_out_room && a->scalars_out == NULL) || (a->struct_out_room && a->struct_out == NULL)) {
        set_message(c, "an input or output with a length but no buffer: nothing was sent");
        return PC_ERR_USAGE;
    }
    if (a->n_scalars_in > UINT32_MAX || a->struct_in_len > PC_MAX_FRAME) {
        set_message(c, "more input than a request can carry: nothing was sent");
        return PC_ERR_USAGE;
    }
    a->n_scalars_out = 0;
    a->struct_out_len = 0;
    *id = begin_request(c, w, 3);
    w_varint(w, handle);
    w_varint(w, a->selector);
    w_varint(w, a->n_scalars_in);
    for (i = 0; i < a->n_scalars_in; i++) w_varint(w, a->scalars_in[i]);
    w_bytes(w, a->struct_in, a->struct_in_len);
    w_varint(w, a->struct_out_room > UINT32_MAX ? UINT32_MAX : a->struct_out_room);
    return PC_SUCCESS;
}

/* Takes a successful call response's outputs (r at its body) into a. */
static int take_outputs(pc_conn *c, struct rd *r, pc_call_args *a) {
    uint64_t n, i;
    size_t got_len;
    const unsigned char *got;
    if (expect_body(r, 3) != PC_SUCCESS) return PC_PROTOCOL_ERROR;
    n = r_u64(r);
    if (r->bad || n > PC_MAX_FRAME) return PC_PROTOCOL_ERROR;
    for (i = 0; i < n; i++) {
        uint64_t v = r_u64(r);
        if (i < a->scalars_out_room) a->scalars_out[i] = v;
    }
    got = r_bytes(r, &got_len);
    if (r->bad || got_len > a->struct_out_room) return PC_PROTOCOL_ERROR;
    if (got_len) memcpy(a->struct_out, got, got_len);
    a->n_scalars_out = (size_t)n;
    a->struct_out_len = got_len;
    if (n > a->scalars_out_room) {
        char m[160];
        snprintf(m, sizeof m, "the call ran: it returned %llu scalar outputs, and the caller had room for %lu (those were written)",
                 (unsigned long long)n, (unsigned long)a->scalars_out_room);
        set_message(c, m);
        return PC_ERR_OUTPUT_ROOM;
    }
    return PC_SUCCESS;
}

int pc_invoke(pc_conn *c, uint64_t handle, pc_call_args *a) {
    struct wr w;
    struct rd r;
    uint64_t id;
    int rc = begin_call(c, handle, a, &w, &id);
    if (rc != PC_SUCCESS) return rc;
    rc = exchange(c, &w, id, &r);
    if (rc != PC_SUCCESS) return rc;
    return take_outputs(c, &r, a);
}

/* The pending call with this id, or NULL. */
static struct pc_pending *pending_call(pc_conn *c, uint64_t id) {
    size_t i;
    for (i = 0; i < c->n_pending; i++)
        if (c->pending[i].id == id) return &c->pending[i];
    return NULL;
}

/* A response for a call other than the one being waited for: a pending call's, completed now
 * (its outputs written to its args), or a protocol error. */
static int complete_pending(pc_conn *c, uint64_t id, int status, struct rd *r) {
    struct pc_pending *p = pending_call(c, id);
    if (p == NULL || p->done) {
        set_message(c, "a response to no call in flight");
        return PC_PROTOCOL_ERROR;
    }
    p->status = status == PC_SUCCESS ? take_outputs(c, r, p->args) : status;
    memcpy(p->message, c->message, sizeof p->message);
    memcpy(p->rule, c->rule, sizeof p->rule);
    p->done = 1;
    return PC_SUCCESS;
}

int pc_invoke_start(pc_conn *c, uint64_t handle, pc_call_args *a, uint64_t *call) {
    struct wr w;
    uint64_t id;
    int rc;
    if (call == NULL) {
        set_message(c, "no place for the call's id: nothing was sent");
        return PC_ERR_USAGE;
    }
    if (c->n_pending == c->pending_cap) {
        size_t cap = c->pending_cap ? c->pending_cap * 2 : 8;
        struct pc_pending *grown;
        if (cap > PC_MAX_PENDING) {
            set_message(c, "too many calls in flight on this connection: nothing was sent");
            return PC_ERR_USAGE;
        }
        grown = realloc(c->pending, cap * sizeof *grown);
        if (grown == NULL) return PC_ERR_SYSTEM;
        c->pending = grown;
        c->pending_cap = cap;
    }
    rc = begin_call(c, handle, a, &w, &id);
    if (rc == PC_SUCCESS) rc = send_request(c, &w, 0);
    if (rc != PC_SUCCESS) return rc;
    memset(&c->pending[c->n_pending], 0, sizeof c->pending[0]);
    c->pending[c->n_pending].id = id;
    c->pending[c->n_pending].args = a;
    c->n_pending++;
    *call = id;
    return PC_SUCCESS;
}

int pc_invoke_finish(pc_conn *c, uint64_t call, int timeout_ms) {
    struct timespec start;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (;;) {
        struct pc_pending *p = pending_call(c, call);
        struct rd r;
        uint64_t got = 0;
        int status = 0, rc, left;
        if (p == NULL) {
            set_message(c, "no such call in flight");
            return PC_ERR_USAGE;
        }
        if (p->done) {
            rc = p->status;
            memcpy(c->message, p->message, sizeof c->message);
            memcpy(c->rule, p->rule, sizeof c->rule);
            *p = c->pending[--c->n_pending];
            return rc;
        }
        left = timeout_ms < 0 ? -1 : timeout_ms - (int)(elapsed_ns(&start) / 1000000L);
        if (timeout_ms >= 0 && left < 0) left = 0;
        rc = next_frame(c, left, &r, &got, &status);
        if (rc == PC_TIMEOUT) {
            set_message(c, "the call has not completed yet");
            return PC_ERR_IN_FLIGHT;
        }
        if (rc == 0) continue;
        if (rc != 1) return rc;
        rc = complete_pending(c, got, status, &r);
        if (rc != PC_SUCCESS) return rc;
    }
}

int pc_poll_prepare(pc_conn *c) {
    size_t i;
    if (c->ev_len || c->ev_lost) return 1;
    for (i = 0; i < c->n_pending; i++)
        if (c->pending[i].done) return 1;
    if (c->ring.base == NULL) return 0;
    /* Empty the doorbell (what is in it was rung for what has been taken), ask the broker to
     * ring it for the next completion, then look once more: a completion published before the
     * request was seen would not ring. */
    {
        unsigned char drained[512];
        while (recv(c->ring.efd_client, drained, sizeof drained, MSG_DONTWAIT) == (ssize_t)sizeof drained) {
        }
    }
    __atomic_store_n(ring_word(c, RING_CLIENT_SLEEPING), le32(RING_ON_RECORDS), __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return ring_load(c, RING_CQ_TAIL) != c->ring.cq_head;
}

int pc_poll_fd(const pc_conn *c) { return c->ring.base != NULL ? c->ring.efd_client : c->fd; }

int pc_call(pc_conn *c, uint64_t handle, uint32_t selector, const uint64_t *scalars_in, uint32_t n_in,
            uint64_t *scalars_out, uint32_t *n_out, const void *struct_in, size_t struct_in_len, void *struct_out,
            size_t *struct_out_len) {
    pc_call_args a;
    int rc;
    memset(&a, 0, sizeof a);
    a.selector = selector;
    a.scalars_in = scalars_in;
    a.n_scalars_in = n_in;
    a.scalars_out = scalars_out;
    a.scalars_out_room = n_out ? *n_out : 0;
    a.struct_in = struct_in;
    a.struct_in_len = struct_in_len;
    a.struct_out = struct_out;
    a.struct_out_room = struct_out_len ? *struct_out_len : 0;
    if (struct_out == NULL) a.struct_out_room = 0;
    rc = pc_invoke(c, handle, &a);
    if (rc == PC_SUCCESS || rc == PC_ERR_OUTPUT_ROOM) {
        if (n_out) *n_out = (uint32_t)a.n_scalars_out;
        if (struct_out_len) *struct_out_len = a.struct_out_len;
    }
    return rc;
}

int pc_subscribe(pc_conn *c, const uint64_t *services, size_t n) {
    struct wr w;
    struct rd r;
    uint64_t id = begin_request(c, &w, 4);
    size_t i;
    w_varint(&w, n);
    for (i = 0; i < n; i++) w_varint(&w, services[i]);
    return exchange(c, &w, id, &r);
}

int pc_map_memory(pc_conn *c, uint64_t handle, uint32_t memory_type, void **addr, size_t *size, int *writable) {
    struct wr w;
    struct rd r;
    uint64_t id = begin_request(c, &w, 5), length;
    unsigned char rw;
    void *at;
    int rc, fd;
    w_varint(&w, handle);
    w_varint(&w, memory_type);
    /* Descriptors cannot travel through shared memory: this request always uses the socket. */
    rc = exchange_on(c, &w, id, &r, 1);
    if (rc != PC_SUCCESS) return rc;
    if (expect_body(&r, 4) != PC_SUCCESS) return PC_PROTOCOL_ERROR;
    (void)r_u32(&r);
    length = r_u64(&r);
    rw = r_byte(&r);
    fd = c->fd_in;
    c->fd_in = -1;
    if (r.bad || rw > 1 || fd < 0 || length == 0 || length > SIZE_MAX) {
        if (fd >= 0) close(fd);
        set_message(c, "a mapping reply without a usable descriptor");
        return PC_PROTOCOL_ERROR;
    }
    at = mmap(NULL, (size_t)length, PROT_READ | (rw ? PROT_WRITE : 0), MAP_SHARED, fd, 0);
    close(fd);
    if (at == MAP_FAILED) return PC_ERR_SYSTEM;
    *addr = at;
    *size = (size_t)length;
    if (writable) *writable = rw;
    return PC_SUCCESS;
}

int pc_ring_enable(pc_conn *c, uint32_t sq_size, uint32_t cq_size, int wait) {
    struct wr w;
    struct rd r;
    uint64_t id, len;
    uint32_t sq, cq;
    void *at;
    int rc, memfd;
    if (c->ring.base != NULL) {
        set_message(c, "the ring is already enabled: nothing was sent");
        return PC_ERR_USAGE;
    }
    if (wait != PC_RING_ADAPTIVE && wait != PC_RING_SPIN && wait != PC_RING_SLEEP) {
        set_message(c, "wait is not an enum pc_ring_wait: nothing was sent");
        return PC_ERR_USAGE;
    }
    id = begin_request(c, &w, 6);
    w_varint(&w, sq_size);
    w_varint(&w, cq_size);
    rc = exchange_on(c, &w, id, &r, 1);
    if (rc != PC_SUCCESS) return rc;
    if (expect_body(&r, 5) != PC_SUCCESS) return PC_PROTOCOL_ERROR;
    sq = r_u32(&r);
    cq = r_u32(&r);
    memfd = c->fd_in;
    len = (uint64_t)RING_HEADER + sq + cq;
    if (r.bad || memfd < 0 || c->fd_more[0] < 0 || c->fd_more[1] < 0 || sq < 4096u || cq < 4096u ||
        (sq & (sq - 1u)) != 0 || (cq & (cq - 1u)) != 0 || len > SIZE_MAX) {
        set_message(c, "a ring reply without usable descriptors or sizes");
        return PC_PROTOCOL_ERROR;
    }
    at = mmap(NULL, (size_t)len, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
    if (at == MAP_FAILED) return PC_ERR_SYSTEM;
    close(memfd);
    c->fd_in = -1;
    c->ring.base = at;
    c->ring.len = (size_t)len;
    c->ring.sq_size = sq;
    c->ring.cq_size = cq;
    c->ring.sq_tail = c->ring.cq_head = 0;
    c->ring.efd_broker = c->fd_more[0];
    c->ring.efd_client = c->fd_more[1];
    c->fd_more[0] = c->fd_more[1] = -1;
    c->ring.wait = wait;
    c->ring.bell_errno = 0;
    return PC_SUCCESS;
}

int pc_unmap_memory(void *addr, size_t size) { return munmap(addr, size) == 0 ? PC_SUCCESS : PC_ERR_SYSTEM; }

int pc_next_event(pc_conn *c, int timeout_ms, pc_event *event) {
    struct timespec start;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (;;) {
        struct rd r;
        uint64_t id;
        int status, rc, left;
        if (c->ev_len) {
            *event = c->events[c->ev_head];
            c->ev_head = (c->ev_head + 1) % c->ev_cap;
            c->ev_len--;
            return PC_SUCCESS;
        }
        if (c->ev_lost) {
            memset(event, 0, sizeof *event);
            event->kind = PC_EVENT_LOST;
            event->value = c->ev_lost;
            c->ev_lost = 0;
            return PC_SUCCESS;
        }
        /* What is left of the timeout: responses to started calls may come first. */
        left = timeout_ms < 0 ? -1 : timeout_ms - (int)(elapsed_ns(&start) / 1000000L);
        if (timeout_ms >= 0 && left < 0) left = 0;
        rc = next_frame(c, left, &r, &id, &status);
        if (rc == 1) {
            /* A started call's response (any other is a response nobody waits for). */
            rc = complete_pending(c, id, status, &r);
            if (rc != PC_SUCCESS) return rc;
            continue;
        }
        if (rc != 0) return rc;
    }
}

int pc_wait_event(pc_conn *c, int timeout_ms, pc_event *event) { return pc_next_event(c, timeout_ms, event); }

int pc_set_event_queue(pc_conn *c, size_t capacity) {
    pc_event *events;
    size_t i;
    if (capacity == 0 || capacity < c->ev_len || capacity > SIZE_MAX / sizeof *events) {
        set_message(c, "the event queue holds at least one event, and at least those queued now");
        return PC_ERR_USAGE;
    }
    events = malloc(capacity * sizeof *events);
    if (events == NULL) return PC_ERR_SYSTEM;
    for (i = 0; i < c->ev_len; i++) events[i] = c->events[(c->ev_head + i) % c->ev_cap];
    free(c->events);
    c->events = events;
    c->ev_cap = capacity;
    c->ev_head = 0;
    return PC_SUCCESS;
}

int pc_broker_abi(const pc_conn *c) { return c->broker_abi; }

int pc_ring_active(const pc_conn *c) { return c->ring.base != NULL; }

const char *pc_last_message(const pc_conn *c) { return c->message; }

const char *pc_last_rule(const pc_conn *c) { return c->rule; }

const char *pc_status_name(int status) {
    static const char *const names[] = {"SUCCESS",       "BAD_ARGUMENT", "NOT_PRIVILEGED", "EXCLUSIVE_ACCESS",
                                        "NO_DEVICE",     "UNSUPPORTED",  "NO_MEMORY",      "TIMEOUT",
                                        "ABORTED",       "RATE_LIMITED", "OVERFLOW",       "NOT_OPEN",
                                        "PROTOCOL_ERROR", "INTERNAL",   "NOT_WRITABLE", "ASLEEP"};
    if (status == PC_ERR_SYSTEM) return "SYSTEM_ERROR";
    if (status == PC_ERR_USAGE) return "USAGE_ERROR";
    if (status == PC_ERR_OUTPUT_ROOM) return "OUTPUT_ROOM";
    if (status == PC_ERR_IN_FLIGHT) return "IN_FLIGHT";
    if (status < 0 || (size_t)status >= sizeof names / sizeof names[0]) return "UNKNOWN";
    return names[status];
}
