/* The device families from a client of another ABI, built by that ABI's cross compiler and run
 * under qemu-user: a tty write/read round trip through a pty, a block device's geometry and
 * blocks read through the mapped dma memory, a UDP packet through a TUN and its reply. Prints
 * what it got, one line each; the test (tests/tests/integration/abi_matrix.rs) plays the
 * hardware and checks every value. Every status is checked against the method's contract in
 * the generated header (PC_<FAMILY>_<METHOD>_STATUSES), and the driver-specific refusals the
 * header lists are provoked: a pty's modem lines (UNSUPPORTED), a write through a shared open
 * (NOT_WRITABLE).
 *
 * usage: devices RUN_DIR [ring] */
#define _POSIX_C_SOURCE 200809L

#include <portcullis.h>
#include <portcullis/block.h>
#include <portcullis/net.h>
#include <portcullis/tty.h>

#include <stdio.h>
#include <string.h>

static const char *const abi_names[] = {"x86_64", "i386",   "x32",     "armhf",   "aarch64", "powerpc",
                                        "ppc64",  "ppc64le", "s390x",  "riscv64", "mips",    "mipsel",
                                        "m68k",   "sh4",     "hppa",   "sparc64"};

static pc_conn *conn;
static int failures;

#define FAIL(...)                 \
    do {                          \
        printf("FAIL ");          \
        printf(__VA_ARGS__);      \
        printf(": %s\n", pc_last_message(conn)); \
        failures++;               \
    } while (0)

/* A status the method's header does not list is a broken contract. */
#define CONTRACT(mask, rc, what)                                                        \
    do {                                                                                \
        if (!PC_STATUS_IN(mask, rc)) FAIL("%s: %s is not in its contract", what, pc_status_name(rc)); \
    } while (0)

static int open_named(const char *name, int exclusive, uint64_t *handle) {
    pc_service found[2];
    size_t n = 0;
    int rc = pc_find_services(conn, NULL, name, found, 2, &n);
    if (rc != PC_SUCCESS || n != 1) {
        FAIL("find %s: %s", name, pc_status_name(rc));
        return -1;
    }
    rc = pc_open(conn, found[0].id, exclusive, handle);
    if (rc != PC_SUCCESS) {
        FAIL("open %s: %s", name, pc_status_name(rc));
        return -1;
    }
    return 0;
}

static void tty(void) {
    uint64_t handle, written[1], modem[1];
    char hello[64], got[65];
    size_t got_len = 64;
    struct tty_line line;
    int rc;
    if (open_named("tty0", 0, &handle) != 0) return;
    rc = pc_tty_get_line(conn, handle, &line);
    CONTRACT(PC_TTY_GET_LINE_STATUSES, rc, "get_line");
    if (rc != PC_SUCCESS) FAIL("get_line: %s", pc_status_name(rc));
    else printf("tty line: baud %lu data %u parity %u\n", (unsigned long)line.baud, line.data_bits, line.parity);
    snprintf(hello, sizeof hello, "hello from %s\n", abi_names[PC_ABI]);
    rc = pc_tty_write(conn, handle, 5000, hello, strlen(hello), written);
    CONTRACT(PC_TTY_WRITE_STATUSES, rc, "write");
    if (rc != PC_SUCCESS || written[0] != strlen(hello)) FAIL("write: %s", pc_status_name(rc));
    rc = pc_tty_read(conn, handle, 64, 20000, got, &got_len);
    CONTRACT(PC_TTY_READ_STATUSES, rc, "read");
    if (rc != PC_SUCCESS) {
        FAIL("read: %s", pc_status_name(rc));
    } else {
        got[got_len] = '\0';
        printf("tty read: %s", got);
    }
    /* A pty has no modem lines: the header lists UNSUPPORTED for get_modem, and says why. */
    rc = pc_tty_get_modem(conn, handle, modem);
    CONTRACT(PC_TTY_GET_MODEM_STATUSES, rc, "get_modem");
    printf("tty get_modem: %s\n", pc_status_name(rc));
    pc_close(conn, handle);
}

static void block(void) {
    uint64_t handle, bytes[1], hash = 0xcbf29ce484222325ull;
    struct block_geometry geometry;
    void *dma;
    size_t size, i;
    int writable, rc;
    if (open_named("disk0", 0, &handle) != 0) return;
    rc = pc_block_get_geometry(conn, handle, &geometry);
    CONTRACT(PC_BLOCK_GET_GEOMETRY_STATUSES, rc, "get_geometry");
    if (rc != PC_SUCCESS) {
        FAIL("get_geometry: %s", pc_status_name(rc));
        return;
    }
    printf("block geometry: size %llu logical %lu read_only %d\n", (unsigned long long)geometry.size_bytes,
           (unsigned long)geometry.logical_block, geometry.read_only ? 1 : 0);
    rc = pc_map_memory(conn, handle, PC_BLOCK_MEMORY_DMA, &dma, &size, &writable);
    if (rc != PC_SUCCESS) {
        FAIL("map dma: %s", pc_status_name(rc));
        return;
    }
    rc = pc_block_read_blocks(conn, handle, 8, 4, 512, bytes);
    CONTRACT(PC_BLOCK_READ_BLOCKS_STATUSES, rc, "read_blocks");
    if (rc != PC_SUCCESS || bytes[0] != 2048) {
        FAIL("read_blocks: %s", pc_status_name(rc));
    } else {
        for (i = 0; i < 2048; i++) hash = (hash ^ ((const unsigned char *)dma)[512 + i]) * 0x100000001b3ull;
        printf("block fnv: %016llx\n", (unsigned long long)hash);
    }
    /* Writing through a shared open: the header lists NOT_WRITABLE for write_blocks. */
    rc = pc_block_write_blocks(conn, handle, 8, 1, 0, bytes);
    CONTRACT(PC_BLOCK_WRITE_BLOCKS_STATUSES, rc, "write_blocks");
    printf("block shared write_blocks: %s\n", pc_status_name(rc));
    pc_unmap_memory(dma, size);
    pc_close(conn, handle);
}

/* The ones' complement sum of big-endian 16-bit words. */
static unsigned short checksum(const unsigned char *p, size_t n) {
    unsigned long sum = 0;
    size_t i;
    for (i = 0; i + 1 < n; i += 2) sum += (unsigned long)(p[i] << 8 | p[i + 1]);
    while (sum > 0xffff) sum = (sum & 0xffff) + (sum >> 16);
    return (unsigned short)~sum;
}

static void net(void) {
    unsigned char packet[128], reply[2048];
    char payload[64];
    uint64_t handle, sent[1], dropped[1];
    size_t len, plen, reply_len;
    unsigned short sum, sport = (unsigned short)(40000 + PC_ABI);
    int tries, rc;
    if (open_named("net0", 0, &handle) != 0) return;
    snprintf(payload, sizeof payload, "abi %s", abi_names[PC_ABI]);
    plen = strlen(payload);
    len = 28 + plen;
    memset(packet, 0, sizeof packet);
    packet[0] = 0x45;
    packet[2] = (unsigned char)(len >> 8);
    packet[3] = (unsigned char)len;
    packet[6] = 0x40; /* don't fragment */
    packet[8] = 64;   /* ttl */
    packet[9] = 17;   /* udp */
    packet[12] = 192; packet[13] = 0; packet[14] = 2; packet[15] = 2;
    packet[16] = 192; packet[17] = 0; packet[18] = 2; packet[19] = 1;
    sum = checksum(packet, 20);
    packet[10] = (unsigned char)(sum >> 8);
    packet[11] = (unsigned char)sum;
    packet[20] = (unsigned char)(sport >> 8);
    packet[21] = (unsigned char)sport;
    packet[22] = 7777 >> 8;
    packet[23] = 7777 & 0xff;
    packet[24] = (unsigned char)((8 + plen) >> 8);
    packet[25] = (unsigned char)(8 + plen);
    memcpy(packet + 28, payload, plen);
    rc = pc_net_send_packet(conn, handle, packet, len, sent);
    CONTRACT(PC_NET_SEND_PACKET_STATUSES, rc, "send_packet");
    if (rc != PC_SUCCESS || sent[0] != len) {
        FAIL("send_packet: %s", pc_status_name(rc));
        return;
    }
    for (tries = 0; tries < 64; tries++) {
        reply_len = sizeof reply;
        rc = pc_net_recv_packet(conn, handle, 20000, dropped, reply, &reply_len);
        CONTRACT(PC_NET_RECV_PACKET_STATUSES, rc, "recv_packet");
        if (rc != PC_SUCCESS) {
            FAIL("recv_packet: %s", pc_status_name(rc));
            return;
        }
        /* The UDP reply to our port, among whatever else the interface sends. */
        if (reply_len > 28 && reply[0] >> 4 == 4 && reply[9] == 17 && reply[12] == 192 && reply[15] == 1 &&
            (reply[22] << 8 | reply[23]) == sport) {
            printf("net reply: %.*s\n", (int)(reply_len - 28), (const char *)reply + 28);
            pc_close(conn, handle);
            return;
        }
    }
    FAIL("no reply among %d packets", tries);
}

int main(int argc, char **argv) {
    int ring = argc > 2 && strcmp(argv[2], "ring") == 0;
    int rc = pc_connect(argc > 1 ? argv[1] : NULL, &conn);
    if (rc != PC_SUCCESS) {
        printf("FAIL connect: %s\n", pc_status_name(rc));
        return 1;
    }
    if (ring && (rc = pc_ring_enable(conn, 0, 0, PC_RING_ADAPTIVE)) != PC_SUCCESS) {
        FAIL("ring: %s", pc_status_name(rc));
        return 1;
    }
    tty();
    block();
    net();
    pc_disconnect(conn);
    printf("%s: devices on %s%s\n", failures ? "FAILED" : "ok", abi_names[PC_ABI], ring ? " over the ring" : "");
    return failures ? 1 : 0;
}
