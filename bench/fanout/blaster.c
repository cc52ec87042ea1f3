/*
 * roomcast fan-out benchmark: two trivial C WebSocket servers in one file.
 *
 *   blaster --port P --mode blast --expect-conns N --duration S [--batch M]
 *   blaster --port P --mode redis --redis-port RP [--redis-host 127.0.0.1]
 *
 * Both serve just enough of PROTOCOL.md for the load client: the upgrade at
 * GET /ws (Sec-WebSocket-Accept computed), {"type":"join","room":"x"} answered
 * with {"type":"joined","room":"x","seq":0}, pings answered with pongs.
 *
 * blast: the sink for measuring the load client's own ceiling. Once
 *   --expect-conns sockets joined, each room gets batches of M pre-formatted
 *   message frames (~200-byte events with seq 1, 2, 3... and pub_ns), one
 *   buffer written to every member socket, the next batch as soon as every
 *   member's previous one was fully written (the kernel socket buffer is the
 *   flow control). After --duration every room is topped up to the same count,
 *   and one JSON line {"per_room":K,...} is printed.
 *
 * redis: the "C, epoll, one write() of the same buffer per socket per
 *   message" reference server: SUBSCRIBE room:<id> on a room's first join
 *   (joined is sent once Redis confirmed it), and for every pub/sub message
 *   the frame {"type":"message","data":<payload>} is built once and written
 *   with one write() per member socket. No coalescing: one write per message.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_PENDING (256u << 20)

/* ---- SHA-1 (RFC 3174), for Sec-WebSocket-Accept only ------------------------ */

static uint32_t rol(uint32_t v, int n) { return (v << n) | (v >> (32 - n)); }

static void sha1(const uint8_t *msg, size_t len, uint8_t out[20]) {
    uint32_t h[5] = {0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0};
    size_t total = ((len + 8) / 64 + 1) * 64;
    uint8_t *buf = calloc(total, 1);
    memcpy(buf, msg, len);
    buf[len] = 0x80;
    uint64_t bits = (uint64_t)len * 8;
    for (int i = 0; i < 8; i++) buf[total - 1 - i] = (uint8_t)(bits >> (8 * i));
    for (size_t off = 0; off < total; off += 64) {
        uint32_t w[80];
        for (int i = 0; i < 16; i++)
            w[i] = (uint32_t)buf[off + 4 * i] << 24 | (uint32_t)buf[off + 4 * i + 1] << 16 | (uint32_t)buf[off + 4 * i + 2] << 8 |
                   buf[off + 4 * i + 3];
        for (int i = 16; i < 80; i++) w[i] = rol(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
        uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4];
        for (int i = 0; i < 80; i++) {
            uint32_t f, k;
            if (i < 20) f = (b & c) | (~b & d), k = 0x5A827999;
            else if (i < 40) f = b ^ c ^ d, k = 0x6ED9EBA1;
            else if (i < 60) f = (b & c) | (b & d) | (c & d), k = 0x8F1BBCDC;
            else f = b ^ c ^ d, k = 0xCA62C1D6;
            uint32_t t = rol(a, 5) + f + e + k + w[i];
            e = d, d = c, c = rol(b, 30), b = a, a = t;
        }
        h[0] += a, h[1] += b, h[2] += c, h[3] += d, h[4] += e;
    }
    free(buf);
    for (int i = 0; i < 5; i++)
        for (int j = 0; j < 4; j++) out[4 * i + j] = (uint8_t)(h[i] >> (24 - 8 * j));
}

static void base64(const uint8_t *in, size_t len, char *out) {
    static const char t[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t o = 0;
    for (size_t i = 0; i < len; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16 | (i + 1 < len ? (uint32_t)in[i + 1] << 8 : 0) | (i + 2 < len ? in[i + 2] : 0);
        out[o++] = t[(v >> 18) & 63];
        out[o++] = t[(v >> 12) & 63];
        out[o++] = i + 1 < len ? t[(v >> 6) & 63] : '=';
        out[o++] = i + 2 < len ? t[v & 63] : '=';
    }
    out[o] = 0;
}

/* ---- state ------------------------------------------------------------------------- */

typedef struct {
    int fd;
    int open;      /* upgraded */
    int room;      /* -1: none */
    char *in;
    size_t in_len, in_cap;
    char *out;     /* unsent bytes, in order */
    size_t out_off, out_len, out_cap;
} conn_t;

typedef struct {
    char *name;
    int *members;
    int n, cap;
    int *waiting;  /* redis mode: joins waiting for the SUBSCRIBE confirmation */
    int nw, wcap;
    int subscribed;
    uint64_t seq;  /* blast mode */
    int blocked;   /* members with unsent bytes */
} room_t;

static conn_t **conns;  /* by fd */
static int conns_cap;
static room_t *rooms;
static int nrooms, rooms_cap;
static int *room_index;  /* open addressing, -1 empty */
static int room_index_cap = 1 << 16;
static int epfd, lfd, rfd = -1;
static const char *mode = "blast";
static int expect_conns, batch = 16, joined_total, blasting, stopping, done_printed;
static double duration_s = 5.0;
static uint64_t blast_start, blast_deadline, target;
static uint64_t writes, partial_writes, bytes_written, frames_written, redis_msgs;
static char *rin;
static size_t rin_len, rin_cap;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void die(const char *m) {
    perror(m);
    exit(2);
}

static uint32_t hash(const char *s, size_t n) {
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++) h = (h ^ (uint8_t)s[i]) * 16777619u;
    return h;
}

static int room_find(const char *name, size_t n, int create) {
    uint32_t h = hash(name, n) & (uint32_t)(room_index_cap - 1);
    for (;;) {
        int r = room_index[h];
        if (r < 0) break;
        if (strlen(rooms[r].name) == n && memcmp(rooms[r].name, name, n) == 0) return r;
        h = (h + 1) & (uint32_t)(room_index_cap - 1);
    }
    if (!create) return -1;
    if (nrooms * 2 >= room_index_cap) {
        fprintf(stderr, "blaster: too many rooms\n");
        exit(2);
    }
    if (nrooms == rooms_cap) {
        rooms_cap = rooms_cap ? rooms_cap * 2 : 64;
        rooms = realloc(rooms, sizeof(room_t) * (size_t)rooms_cap);
    }
    room_t *rm = &rooms[nrooms];
    memset(rm, 0, sizeof *rm);
    rm->name = strndup(name, n);
    room_index[h] = nrooms;
    return nrooms++;
}

static void set_events(conn_t *c, int want_out) {
    struct epoll_event ev = {.events = EPOLLIN | (want_out ? EPOLLOUT : 0), .data.fd = c->fd};
    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
}

static void close_conn(conn_t *c);

/* Write buf to c now if nothing is queued, else queue it behind what is. Returns 1 if queued bytes remain. */
static int send_buf(conn_t *c, const char *buf, size_t len) {
    if (c->out_len == c->out_off) {
        ssize_t n = write(c->fd, buf, len);
        writes++;
        if (n == (ssize_t)len) {
            bytes_written += len;
            return 0;
        }
        if (n < 0) {
            if (errno != EAGAIN && errno != EINTR) {
                close_conn(c);
                return 0;
            }
            n = 0;
        }
        partial_writes++;
        bytes_written += (size_t)n;
        buf += n;
        len -= (size_t)n;
        c->out_off = c->out_len = 0;
        set_events(c, 1);
    }
    if (c->out_len + len > c->out_cap) {
        if (c->out_off) {
            memmove(c->out, c->out + c->out_off, c->out_len - c->out_off);
            c->out_len -= c->out_off;
            c->out_off = 0;
        }
        if (c->out_len + len > MAX_PENDING) {
            fprintf(stderr, "blaster: slow consumer fd %d cut\n", c->fd);
            close_conn(c);
            return 0;
        }
        if (c->out_len + len > c->out_cap) {
            c->out_cap = (c->out_len + len) * 2;
            c->out = realloc(c->out, c->out_cap);
        }
    }
    memcpy(c->out + c->out_len, buf, len);
    c->out_len += len;
    return 1;
}

static void send_text(conn_t *c, const char *payload, size_t len) {
    char hdr[10];
    size_t h;
    hdr[0] = (char)0x81;
    if (len < 126) hdr[1] = (char)len, h = 2;
    else if (len < 65536) hdr[1] = 126, hdr[2] = (char)(len >> 8), hdr[3] = (char)len, h = 4;
    else {
        hdr[1] = 127;
        for (int i = 0; i < 8; i++) hdr[2 + i] = (char)((uint64_t)len >> (56 - 8 * i));
        h = 10;
    }
    char *buf = malloc(h + len);
    memcpy(buf, hdr, h);
    memcpy(buf + h, payload, len);
    send_buf(c, buf, h + len);
    free(buf);
}

static void room_remove(room_t *rm, int fd, int was_blocked) {
    for (int i = 0; i < rm->n; i++)
        if (rm->members[i] == fd) {
            rm->members[i] = rm->members[--rm->n];
            break;
        }
    for (int i = 0; i < rm->nw; i++)
        if (rm->waiting[i] == fd) {
            rm->waiting[i] = rm->waiting[--rm->nw];
            break;
        }
    if (was_blocked && rm->blocked > 0) rm->blocked--;
}

static void close_conn(conn_t *c) {
    int fd = c->fd;
    if (c->room >= 0) room_remove(&rooms[c->room], fd, c->out_len > c->out_off);
    epoll_ctl(epfd, EPOLL_CTL_DEL, fd, NULL);
    close(fd);
    free(c->in);
    free(c->out);
    free(c);
    conns[fd] = NULL;
}

static void redis_send(const char *cmd, const char *arg, size_t alen) {
    char buf[512];
    int n = snprintf(buf, sizeof buf, "*2\r\n$%zu\r\n%s\r\n$%zu\r\n", strlen(cmd), cmd, alen);
    memcpy(buf + n, arg, alen);
    n += (int)alen;
    memcpy(buf + n, "\r\n", 2);
    n += 2;
    /* Tiny commands on an otherwise idle direction: retry the rare EAGAIN. */
    for (int off = 0; off < n;) {
        ssize_t w = write(rfd, buf + off, (size_t)(n - off));
        if (w < 0 && (errno == EAGAIN || errno == EINTR)) continue;
        if (w <= 0) die("redis write");
        off += (int)w;
    }
}

static void joined(conn_t *c, room_t *rm) {
    char msg[300];
    int n = snprintf(msg, sizeof msg, "{\"type\":\"joined\",\"room\":\"%s\",\"seq\":0}", rm->name);
    send_text(c, msg, (size_t)n);
}

static void on_join(conn_t *c, const char *name, size_t n) {
    if (c->room >= 0) {
        joined(c, &rooms[c->room]);
        return;
    }
    int r = room_find(name, n, 1);
    room_t *rm = &rooms[r];
    c->room = r;
    if (!strcmp(mode, "redis") && !rm->subscribed) {
        if (rm->nw == rm->wcap) {
            rm->wcap = rm->wcap ? rm->wcap * 2 : 8;
            rm->waiting = realloc(rm->waiting, sizeof(int) * (size_t)rm->wcap);
        }
        rm->waiting[rm->nw++] = c->fd;
        if (rm->nw == 1 && rm->n == 0) {
            char ch[300];
            int cl = snprintf(ch, sizeof ch, "room:%s", rm->name);
            redis_send("SUBSCRIBE", ch, (size_t)cl);
        }
        return;
    }
    if (rm->n == rm->cap) {
        rm->cap = rm->cap ? rm->cap * 2 : 8;
        rm->members = realloc(rm->members, sizeof(int) * (size_t)rm->cap);
    }
    rm->members[rm->n++] = c->fd;
    joined(c, rm);
    joined_total++;
    if (!strcmp(mode, "blast") && !blasting && expect_conns && joined_total >= expect_conns) {
        blasting = 1;
        blast_start = now_ns();
        blast_deadline = blast_start + (uint64_t)(duration_s * 1e9);
    }
}

static void on_client_text(conn_t *c, const char *p, size_t len) {
    const char *end = p + len;
    const char *t = memmem(p, len, "\"join\"", 6);
    if (!t) return;
    const char *r = memmem(p, len, "\"room\"", 6);
    if (!r) return;
    r += 6;
    while (r < end && (*r == ' ' || *r == ':')) r++;
    if (r >= end || *r != '"') return;
    r++;
    const char *q = memchr(r, '"', (size_t)(end - r));
    if (!q) return;
    on_join(c, r, (size_t)(q - r));
}

static void on_client_data(conn_t *c) {
    if (!c->open) {
        char *eoh = memmem(c->in, c->in_len, "\r\n\r\n", 4);
        if (!eoh) return;
        *eoh = 0;
        char *k = strcasestr(c->in, "Sec-WebSocket-Key:");
        if (!k) {
            close_conn(c);
            return;
        }
        k += 18;
        while (*k == ' ') k++;
        char *ke = k;
        while (*ke && *ke != '\r') ke++;
        char buf[128];
        int kl = (int)(ke - k);
        if (kl > 64) kl = 64;
        int bl = snprintf(buf, sizeof buf, "%.*s258EAFA5-E914-47DA-95CA-C5AB0DC85B11", kl, k);
        uint8_t dg[20];
        sha1((uint8_t *)buf, (size_t)bl, dg);
        char acc[40];
        base64(dg, 20, acc);
        char resp[256];
        int n = snprintf(resp, sizeof resp,
                         "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         "Sec-WebSocket-Accept: %s\r\n\r\n",
                         acc);
        send_buf(c, resp, (size_t)n);
        c->open = 1;
        size_t used = (size_t)(eoh + 4 - c->in);
        memmove(c->in, c->in + used, c->in_len - used);
        c->in_len -= used;
    }
    size_t off = 0;
    while (c->in_len - off >= 2) {
        uint8_t *b = (uint8_t *)c->in + off;
        uint64_t plen = b[1] & 0x7f;
        size_t hdr = 2;
        if (plen == 126) {
            if (c->in_len - off < 4) break;
            plen = (uint64_t)b[2] << 8 | b[3];
            hdr = 4;
        } else if (plen == 127) {
            if (c->in_len - off < 10) break;
            plen = 0;
            for (int i = 0; i < 8; i++) plen = plen << 8 | b[2 + i];
            hdr = 10;
        }
        int masked = b[1] & 0x80;
        if (masked) hdr += 4;
        if (c->in_len - off < hdr + plen) break;
        char *pl = c->in + off + hdr;
        if (masked)
            for (uint64_t i = 0; i < plen; i++) pl[i] ^= (char)b[hdr - 4 + (i & 3)];
        int op = b[0] & 0x0f;
        off += hdr + plen;
        if (op == 1) on_client_text(c, pl, (size_t)plen);
        else if (op == 9) {
            char pong[130];
            pong[0] = (char)0x8a;
            pong[1] = (char)(plen > 125 ? 125 : plen);
            memcpy(pong + 2, pl, (size_t)(uint8_t)pong[1]);
            send_buf(c, pong, 2 + (size_t)(uint8_t)pong[1]);
        } else if (op == 8) {
            close_conn(c);
            return;
        }
    }
    memmove(c->in, c->in + off, c->in_len - off);
    c->in_len -= off;
}

/* ---- blast mode -------------------------------------------------------------------- */

static char *bbuf;
static size_t bbuf_cap;

static size_t build_batch(room_t *rm, int count) {
    size_t need = (size_t)count * 320;
    if (need > bbuf_cap) {
        bbuf_cap = need * 2;
        bbuf = realloc(bbuf, bbuf_cap);
    }
    uint64_t pub = now_ns();
    size_t off = 0;
    static const char pad[] = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor";
    for (int i = 0; i < count; i++) {
        uint64_t seq = ++rm->seq;
        char *payload = bbuf + off + 4;
        int n = snprintf(payload, 300,
                         "{\"type\":\"message\",\"data\":{\"id\":\"b-%" PRIu64 "\",\"room\":\"%s\",\"seq\":%" PRIu64
                         ",\"user\":\"blaster\",\"body\":\"%s\",\"client_msg_id\":\"c-%" PRIu64
                         "\",\"ts\":1732650000123,\"pub_ns\":%" PRIu64 ",\"extra\":{\"k\":\"v\"}}}",
                         seq, rm->name, seq, pad, seq, pub);
        /* Header is 4 bytes (126 + 16-bit length) when >= 126, else shift down by 2. */
        if (n >= 126) {
            bbuf[off] = (char)0x81, bbuf[off + 1] = 126, bbuf[off + 2] = (char)(n >> 8), bbuf[off + 3] = (char)n;
            off += 4 + (size_t)n;
        } else {
            memmove(bbuf + off + 2, payload, (size_t)n);
            bbuf[off] = (char)0x81, bbuf[off + 1] = (char)n;
            off += 2 + (size_t)n;
        }
    }
    frames_written += (uint64_t)count;
    return off;
}

static void blast_round(void) {
    uint64_t now = now_ns();
    if (!stopping && now >= blast_deadline) {
        stopping = 1;
        for (int r = 0; r < nrooms; r++)
            if (rooms[r].seq > target) target = rooms[r].seq;
    }
    int all_done = 1;
    for (int r = 0; r < nrooms; r++) {
        room_t *rm = &rooms[r];
        if (rm->n == 0) continue;
        if (stopping && rm->seq >= target) {
            if (rm->blocked) all_done = 0;
            continue;
        }
        all_done = 0;
        if (rm->blocked) continue;
        int count = batch;
        if (stopping && rm->seq + (uint64_t)count > target) count = (int)(target - rm->seq);
        size_t len = build_batch(rm, count);
        for (int i = 0; i < rm->n; i++) {
            conn_t *c = conns[rm->members[i]];
            if (c && send_buf(c, bbuf, len)) rm->blocked++;
        }
    }
    if (stopping && all_done && !done_printed) {
        done_printed = 1;
        blasting = 0;
        printf("{\"per_room\":%" PRIu64 ",\"rooms\":%d,\"conns\":%d,\"batch\":%d,\"writes\":%" PRIu64 ",\"partial_writes\":%" PRIu64
               ",\"bytes\":%" PRIu64 ",\"elapsed_s\":%.3f}\n",
               target, nrooms, joined_total, batch, writes, partial_writes, bytes_written, (now_ns() - blast_start) / 1e9);
        fflush(stdout);
    }
}

/* ---- redis mode ----------------------------------------------------------------------- */

static char *fbuf;
static size_t fbuf_cap;

static void fan_out(const char *channel, size_t clen, const char *payload, size_t plen) {
    if (clen < 5 || memcmp(channel, "room:", 5) != 0) return;
    int r = room_find(channel + 5, clen - 5, 0);
    if (r < 0) return;
    room_t *rm = &rooms[r];
    static const char head[] = "{\"type\":\"message\",\"data\":";
    size_t len = sizeof head - 1 + plen + 1;
    size_t need = len + 10;
    if (need > fbuf_cap) {
        fbuf_cap = need * 2;
        fbuf = realloc(fbuf, fbuf_cap);
    }
    size_t h;
    fbuf[0] = (char)0x81;
    if (len < 126) fbuf[1] = (char)len, h = 2;
    else if (len < 65536) fbuf[1] = 126, fbuf[2] = (char)(len >> 8), fbuf[3] = (char)len, h = 4;
    else {
        fbuf[1] = 127;
        for (int i = 0; i < 8; i++) fbuf[2 + i] = (char)((uint64_t)len >> (56 - 8 * i));
        h = 10;
    }
    memcpy(fbuf + h, head, sizeof head - 1);
    memcpy(fbuf + h + sizeof head - 1, payload, plen);
    fbuf[h + len - 1] = '}';
    for (int i = 0; i < rm->n; i++) {
        conn_t *c = conns[rm->members[i]];
        if (c) send_buf(c, fbuf, h + len);
    }
    redis_msgs++;
}

static void on_subscribed(const char *channel, size_t clen) {
    if (clen < 5) return;
    int r = room_find(channel + 5, clen - 5, 0);
    if (r < 0) return;
    room_t *rm = &rooms[r];
    rm->subscribed = 1;
    for (int i = 0; i < rm->nw; i++) {
        conn_t *c = conns[rm->waiting[i]];
        if (!c) continue;
        if (rm->n == rm->cap) {
            rm->cap = rm->cap ? rm->cap * 2 : 8;
            rm->members = realloc(rm->members, sizeof(int) * (size_t)rm->cap);
        }
        rm->members[rm->n++] = c->fd;
        joined(c, rm);
        joined_total++;
    }
    rm->nw = 0;
}

/* Parse one RESP value of the forms we get; returns bytes used, 0 if incomplete.
 * For arrays of bulk strings, fills up to 3 (ptr,len). */
static size_t parse_reply(const char *p, size_t n, const char **v, size_t *vl, int *nv) {
    const char *end = p + n;
    const char *nl = memchr(p, '\n', n);
    if (!nl) return 0;
    *nv = 0;
    if (*p != '*') return (size_t)(nl + 1 - p); /* +OK, :1, -ERR...: skip */
    long count = strtol(p + 1, NULL, 10);
    const char *q = nl + 1;
    for (long i = 0; i < count; i++) {
        if (q >= end) return 0;
        const char *l = memchr(q, '\n', (size_t)(end - q));
        if (!l) return 0;
        if (*q == '$') {
            long bl = strtol(q + 1, NULL, 10);
            const char *data = l + 1;
            if (end - data < bl + 2) return 0;
            if (i < 3) v[i] = data, vl[i] = (size_t)bl, *nv = (int)i + 1;
            q = data + bl + 2;
        } else {
            if (i < 3) v[i] = q + 1, vl[i] = (size_t)(l - 1 - (q + 1)), *nv = (int)i + 1;
            q = l + 1;
        }
    }
    return (size_t)(q - p);
}

static void on_redis_data(void) {
    for (;;) {
        if (rin_cap - rin_len < 65536) {
            rin_cap = rin_cap ? rin_cap * 2 : (1 << 20);
            rin = realloc(rin, rin_cap);
        }
        ssize_t n = read(rfd, rin + rin_len, rin_cap - rin_len);
        if (n == 0) {
            fprintf(stderr, "blaster: redis closed the connection\n");
            exit(1);
        }
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR) break;
            die("redis read");
        }
        rin_len += (size_t)n;
        size_t off = 0;
        for (;;) {
            const char *v[3];
            size_t vl[3];
            int nv;
            size_t used = parse_reply(rin + off, rin_len - off, v, vl, &nv);
            if (!used) break;
            off += used;
            if (nv == 3 && vl[0] == 7 && !memcmp(v[0], "message", 7)) fan_out(v[1], vl[1], v[2], vl[2]);
            else if (nv >= 2 && vl[0] == 9 && !memcmp(v[0], "subscribe", 9)) on_subscribed(v[1], vl[1]);
        }
        memmove(rin, rin + off, rin_len - off);
        rin_len -= off;
        if ((size_t)n < 65536) break;  /* one read per wakeup unless the socket had more */
    }
}

/* ---- main -------------------------------------------------------------------------------- */

int main(int argc, char **argv) {
    int port = 0, redis_port = 0;
    const char *redis_host = "127.0.0.1";
    const char *bind_host = "127.0.0.1";
    for (int i = 1; i + 1 < argc; i += 2) {
        const char *a = argv[i], *v = argv[i + 1];
        if (!strcmp(a, "--port")) port = atoi(v);
        else if (!strcmp(a, "--host")) bind_host = v;
        else if (!strcmp(a, "--mode")) mode = v;
        else if (!strcmp(a, "--expect-conns")) expect_conns = atoi(v);
        else if (!strcmp(a, "--duration")) duration_s = atof(v);
        else if (!strcmp(a, "--batch")) batch = atoi(v);
        else if (!strcmp(a, "--redis-port")) redis_port = atoi(v);
        else if (!strcmp(a, "--redis-host")) redis_host = v;
        else {
            fprintf(stderr, "usage: blaster --port P --mode blast|redis [--expect-conns N --duration S --batch M] [--redis-port RP]\n");
            return 2;
        }
    }
    if (batch < 1) batch = 1;
    signal(SIGPIPE, SIG_IGN);
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    conns_cap = (int)rl.rlim_cur + 16;
    conns = calloc((size_t)conns_cap, sizeof(conn_t *));
    room_index = malloc(sizeof(int) * (size_t)room_index_cap);
    memset(room_index, 0xff, sizeof(int) * (size_t)room_index_cap);
    epfd = epoll_create1(0);
    lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, bind_host, &a.sin_addr);
    if (bind(lfd, (struct sockaddr *)&a, sizeof a) < 0) die("bind");
    if (listen(lfd, 4096) < 0) die("listen");
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = lfd};
    epoll_ctl(epfd, EPOLL_CTL_ADD, lfd, &ev);
    if (!strcmp(mode, "redis")) {
        rfd = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in ra = {.sin_family = AF_INET, .sin_port = htons((uint16_t)redis_port)};
        inet_pton(AF_INET, redis_host, &ra.sin_addr);
        if (connect(rfd, (struct sockaddr *)&ra, sizeof ra) < 0) die("connect redis");
        setsockopt(rfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        fcntl(rfd, F_SETFL, fcntl(rfd, F_GETFL) | O_NONBLOCK);
        struct epoll_event rev = {.events = EPOLLIN, .data.fd = rfd};
        epoll_ctl(epfd, EPOLL_CTL_ADD, rfd, &rev);
        redis_send("SUBSCRIBE", "roomcast:control", 16);
    } else if (strcmp(mode, "blast") != 0) {
        fprintf(stderr, "blaster: --mode is blast or redis\n");
        return 2;
    }
    printf("blaster ready port=%d mode=%s\n", port, mode);
    fflush(stdout);
    struct epoll_event evs[512];
    for (;;) {
        int n = epoll_wait(epfd, evs, 512, blasting ? 0 : 50);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == lfd) {
                for (;;) {
                    int cfd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK);
                    if (cfd < 0) break;
                    if (cfd >= conns_cap) {
                        close(cfd);
                        continue;
                    }
                    setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    conn_t *c = calloc(1, sizeof *c);
                    c->fd = cfd;
                    c->room = -1;
                    conns[cfd] = c;
                    struct epoll_event cev = {.events = EPOLLIN, .data.fd = cfd};
                    epoll_ctl(epfd, EPOLL_CTL_ADD, cfd, &cev);
                }
                continue;
            }
            if (fd == rfd) {
                on_redis_data();
                continue;
            }
            conn_t *c = conns[fd];
            if (!c) continue;
            if (evs[i].events & EPOLLOUT) {
                while (c->out_off < c->out_len) {
                    ssize_t w = write(fd, c->out + c->out_off, c->out_len - c->out_off);
                    writes++;
                    if (w <= 0) break;
                    bytes_written += (size_t)w;
                    c->out_off += (size_t)w;
                }
                if (c->out_off == c->out_len) {
                    c->out_off = c->out_len = 0;
                    set_events(c, 0);
                    if (c->room >= 0 && rooms[c->room].blocked > 0) rooms[c->room].blocked--;
                }
            }
            if (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
                if (c->in_cap - c->in_len < 4096) {
                    c->in_cap = c->in_cap ? c->in_cap * 2 : 8192;
                    c->in = realloc(c->in, c->in_cap);
                }
                ssize_t r = read(fd, c->in + c->in_len, c->in_cap - c->in_len);
                if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) {
                    close_conn(c);
                    continue;
                }
                if (r > 0) {
                    c->in_len += (size_t)r;
                    on_client_data(c);
                }
            }
        }
        if (blasting) blast_round();
    }
}
