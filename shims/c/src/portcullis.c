/* libportcullis: the native protocol (docs/PROTOCOL.md) over AF_UNIX SOCK_SEQPACKET.
 * Frames are postcard: LEB128 varints for integers and lengths, one byte for u8 and bool,
 * varint enum tags, length-prefixed strings and byte arrays. */
#define _POSIX_C_SOURCE 200809L

#include "portcullis.h"

#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define PC_PROTOCOL_VERSION 1u
#define PC_MAX_FRAME (65536u + 4096u)
#define PC_EVENT_QUEUE 64u

struct pc_conn {
    int fd;
    uint64_t next_id;
    unsigned char *in;  /* PC_MAX_FRAME + 1: a larger packet shows as truncated */
    unsigned char *out; /* PC_MAX_FRAME */
    char message[256];
    char rule[128];
    pc_event events[PC_EVENT_QUEUE];
    size_t ev_head, ev_len;
    uint64_t ev_lost;
    int fd_in; /* a descriptor that came with the last frame, or -1 */
};

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

static void queue_event(pc_conn *c, const pc_event *e) {
    if (c->ev_len == PC_EVENT_QUEUE) {
        c->ev_lost++;
        return;
    }
    c->events[(c->ev_head + c->ev_len) % PC_EVENT_QUEUE] = *e;
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
    default:
        r->bad = 1;
    }
    return r->bad ? PC_PROTOCOL_ERROR : PC_SUCCESS;
}

/* Receives one frame, waiting up to timeout_ms (-1: forever). Events are queued and 0 is
 * returned; a response returns 1 with *r at its body, *id and *status set, the message and
 * rule stored. Errors: PC_TIMEOUT, PC_PROTOCOL_ERROR, PC_ERR_SYSTEM, or a Goodbye's status. */
static int next_frame(pc_conn *c, int timeout_ms, struct rd *r, uint64_t *id, int *status) {
    struct pollfd pfd;
    ssize_t n;
    unsigned tag;
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
        do n = recvmsg(c->fd, &msg, 0);
        while (n < 0 && errno == EINTR);
        if (c->fd_in >= 0) close(c->fd_in);
        c->fd_in = -1;
        for (cm = n >= 0 ? CMSG_FIRSTHDR(&msg) : NULL; cm != NULL; cm = CMSG_NXTHDR(&msg, cm)) {
            if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS) {
                size_t k, count = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
                for (k = 0; k < count; k++) {
                    int fd;
                    memcpy(&fd, CMSG_DATA(cm) + k * sizeof(int), sizeof fd);
                    if (c->fd_in < 0) {
                        c->fd_in = fd;
                        (void)fcntl(fd, F_SETFD, FD_CLOEXEC);
                    } else {
                        close(fd); /* only one is ever expected */
                    }
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
    r->p = c->in;
    r->len = (size_t)n;
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

/* Sends the request and waits for its response; on success *r is at the body. */
static int exchange(pc_conn *c, struct wr *w, uint64_t id, struct rd *r) {
    int rc = send_frame(c, w);
    if (rc != PC_SUCCESS) return rc;
    for (;;) {
        uint64_t got = 0;
        int status = 0;
        rc = next_frame(c, -1, r, &got, &status);
        if (rc == 0) continue;
        if (rc != 1) return rc;
        if (got != id) return PC_PROTOCOL_ERROR;
        return status;
    }
}

/* Reads a body's tag and checks it is the expected one. */
static int expect_body(struct rd *r, unsigned tag) {
    unsigned got = r_u32(r);
    return r->bad || got != tag ? PC_PROTOCOL_ERROR : PC_SUCCESS;
}

/* ---- API --------------------------------------------------------------------------------- */

static int default_run_dir(char *out, size_t cap) {
    const char *env = getenv("PORTCULLIS_RUN_DIR");
    const char *xdg = getenv("XDG_RUNTIME_DIR");
    int n;
    if (env && *env) n = snprintf(out, cap, "%s", env);
    else if (geteuid() == 0) n = snprintf(out, cap, "/run/portcullis");
    else if (xdg && *xdg) n = snprintf(out, cap, "%s/portcullis", xdg);
    else n = snprintf(out, cap, "/tmp/portcullis-%lu", (unsigned long)geteuid());
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
    c->next_id = 1;
    c->fd_in = -1;
    c->fd = socket(AF_UNIX, SOCK_SEQPACKET, 0);
    if (c->in == NULL || c->out == NULL || c->fd < 0 || connect(c->fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
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
            (void)r_byte(&r);
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
    free(c->in);
    free(c->out);
    free(c);
}

int pc_find_services(pc_conn *c, const char *class_name, const char *name, pc_service *out, size_t cap,
                     size_t *count) {
    struct wr w;
    struct rd r;
    uint64_t id = begin_request(c, &w, 0);
    uint64_t n, i;
    int rc;
    w_str(&w, class_name);
    w_str(&w, name);
    rc = exchange(c, &w, id, &r);
    if (rc != PC_SUCCESS) return rc;
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

int pc_call(pc_conn *c, uint64_t handle, uint32_t selector, const uint64_t *scalars_in, uint32_t n_in,
            uint64_t *scalars_out, uint32_t *n_out, const void *struct_in, size_t struct_in_len, void *struct_out,
            size_t *struct_out_len) {
    struct wr w;
    struct rd r;
    uint64_t id = begin_request(c, &w, 3);
    uint64_t n, i;
    size_t out_len = struct_out && struct_out_len ? *struct_out_len : 0, got_len;
    uint32_t out_cap = n_out ? *n_out : 0;
    const unsigned char *got;
    int rc;
    w_varint(&w, handle);
    w_varint(&w, selector);
    w_varint(&w, n_in);
    for (i = 0; i < n_in; i++) w_varint(&w, scalars_in[i]);
    w_bytes(&w, struct_in, struct_in_len);
    w_varint(&w, out_len > UINT32_MAX ? UINT32_MAX : out_len);
    rc = exchange(c, &w, id, &r);
    if (rc != PC_SUCCESS) return rc;
    if (expect_body(&r, 3) != PC_SUCCESS) return PC_PROTOCOL_ERROR;
    n = r_u64(&r);
    if (n > out_cap) {
        set_message(c, "more scalar outputs than the caller has room for");
        return PC_BAD_ARGUMENT;
    }
    for (i = 0; i < n; i++) scalars_out[i] = r_u64(&r);
    got = r_bytes(&r, &got_len);
    if (r.bad || got_len > out_len) return PC_PROTOCOL_ERROR;
    if (got_len) memcpy(struct_out, got, got_len);
    if (n_out) *n_out = (uint32_t)n;
    if (struct_out_len) *struct_out_len = got_len;
    return PC_SUCCESS;
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
    rc = exchange(c, &w, id, &r);
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

int pc_unmap_memory(void *addr, size_t size) { return munmap(addr, size) == 0 ? PC_SUCCESS : PC_ERR_SYSTEM; }

int pc_wait_event(pc_conn *c, int timeout_ms, pc_event *event) {
    for (;;) {
        struct rd r;
        uint64_t id;
        int status, rc;
        if (c->ev_lost) {
            memset(event, 0, sizeof *event);
            event->kind = PC_EVENT_LOST;
            event->value = c->ev_lost;
            c->ev_lost = 0;
            return PC_SUCCESS;
        }
        if (c->ev_len) {
            *event = c->events[c->ev_head];
            c->ev_head = (c->ev_head + 1) % PC_EVENT_QUEUE;
            c->ev_len--;
            return PC_SUCCESS;
        }
        rc = next_frame(c, timeout_ms, &r, &id, &status);
        if (rc == 1) return PC_PROTOCOL_ERROR; /* a response nobody waits for */
        if (rc != 0) return rc;
    }
}

const char *pc_last_message(const pc_conn *c) { return c->message; }

const char *pc_last_rule(const pc_conn *c) { return c->rule; }

const char *pc_status_name(int status) {
    static const char *const names[] = {"SUCCESS",       "BAD_ARGUMENT", "NOT_PRIVILEGED", "EXCLUSIVE_ACCESS",
                                        "NO_DEVICE",     "UNSUPPORTED",  "NO_MEMORY",      "TIMEOUT",
                                        "ABORTED",       "RATE_LIMITED", "OVERFLOW",       "NOT_OPEN",
                                        "PROTOCOL_ERROR", "INTERNAL"};
    if (status == PC_ERR_SYSTEM) return "SYSTEM_ERROR";
    if (status < 0 || (size_t)status >= sizeof names / sizeof names[0]) return "UNKNOWN";
    return names[status];
}
