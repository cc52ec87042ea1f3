/*
 * roomcast fan-out benchmark: the load client.
 *
 * One process, one thread, epoll (level-triggered), non-blocking sockets.
 * Meant to run pinned to its own core (`taskset -c 1`).
 *
 *   loadclient --port P --conns N --rooms R [--room-prefix X] [--user-prefix U]
 *              [--src-ips K] [--connect-concurrency C] [--progress-file F]
 *              [--ready-timeout S] [--max-seconds S]
 *
 * Connection i joins room "<prefix><i % R>" (so R rooms of N/R members).
 * Once every connection got its `joined`, it prints one line
 *   READY {"conns":N,...}
 * and then reads. Commands on stdin (one per line):
 *   stats                      -> one JSON line of progress
 *   report <expected> <ms>     -> keep reading until every connection has
 *                                 received seq 1..expected or <ms> elapsed,
 *                                 then print the result JSON line and exit.
 *   quit                       -> exit now.
 * It also exits by itself after --max-seconds (bounded run).
 *
 * Server frames parsed: unmasked (masked ones too), FIN text frames with 7/16/64
 * bit lengths, several frames per read and frames split across reads; ping is
 * answered with a masked pong; close is counted. For every
 * {"type":"message","data":{...}} it extracts "seq" and "pub_ns" (CLOCK_MONOTONIC
 * ns, what Python's time.monotonic_ns() returns), checks per-connection seq
 * continuity with a bitmap, and records publish->client latency in a log-linear
 * histogram (HDR style: 128 sub-buckets per power of two, <1% error).
 *
 * --progress-file: a file whose first 8 bytes the client keeps equal to the
 * number of distinct deliveries so far (mmap, one store per read): the
 * publisher reads it to bound the messages in flight at max rate.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

#define RBUF_SIZE (1 << 20)
#define SUB_BITS 7
#define SUB_COUNT (1 << SUB_BITS)
#define HIST_SIZE (64 * SUB_COUNT)

enum { ST_CONNECTING, ST_HANDSHAKE, ST_JOINING, ST_JOINED, ST_CLOSED };

typedef struct {
    int fd;
    int state;
    int room;
    char *pend;          /* partial frame (or partial HTTP response) carried to the next read */
    size_t pend_len, pend_cap;
    char *out;           /* unsent bytes (handshake, join, pong): tiny, rare */
    size_t out_len;
    uint64_t last_seq;
    uint64_t distinct;
    uint64_t dup, ooo, gap_events;
    uint8_t *seen;
    uint64_t seen_bytes;
    uint64_t frames;
    int close_code;
} conn_t;

static conn_t *conns;
static int nconns, nrooms;
static const char *room_prefix = "r";
static const char *user_prefix = "bench";
static const char *host = "127.0.0.1";
static int port;
static int epfd;
static int src_ips = 1;
static int connect_concurrency = 256;
static double ready_timeout_s = 120.0;
static double max_seconds = 600.0;
static volatile uint64_t *progress;
static char *rbuf;

static uint64_t hist[HIST_SIZE];
static uint64_t hist_count, hist_max, hist_min = UINT64_MAX;
static uint64_t deliveries, dups, ooos, messages_bad, other_frames, errors_frames, pings, closes, conn_failures;
static uint64_t reads_total, bytes_total;
static uint64_t t_first_recv, t_last_recv, t_start;
static int joined_count, open_count, connecting_now, next_to_connect;
static int first_errors_printed;

static inline uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void die(const char *msg) {
    perror(msg);
    exit(2);
}

/* ---- histogram ------------------------------------------------------------ */

static inline int hist_index(uint64_t v) {
    if (v < SUB_COUNT) return (int)v;
    int msb = 63 - __builtin_clzll(v);
    int shift = msb - SUB_BITS;
    return (shift + 1) * SUB_COUNT + (int)((v >> shift) & (SUB_COUNT - 1));
}

static inline uint64_t hist_value(int idx) { /* upper bound of a bucket */
    if (idx < SUB_COUNT) return (uint64_t)idx;
    int shift = idx / SUB_COUNT - 1;
    uint64_t sub = (uint64_t)(idx % SUB_COUNT) | SUB_COUNT;
    return ((sub + 1) << shift) - 1;
}

static inline void hist_record(uint64_t v) {
    int i = hist_index(v);
    if (i >= HIST_SIZE) i = HIST_SIZE - 1;
    hist[i]++;
    hist_count++;
    if (v > hist_max) hist_max = v;
    if (v < hist_min) hist_min = v;
}

static double hist_pct(double p) {
    if (!hist_count) return 0;
    uint64_t want = (uint64_t)(p / 100.0 * (double)hist_count + 0.5);
    if (want < 1) want = 1;
    uint64_t acc = 0;
    for (int i = 0; i < HIST_SIZE; i++) {
        acc += hist[i];
        if (acc >= want) {
            uint64_t v = hist_value(i);
            return (double)(v < hist_max ? v : hist_max);
        }
    }
    return (double)hist_max;
}

/* ---- output ---------------------------------------------------------------- */

static void queue_out(conn_t *c, const char *data, size_t len);

static void flush_out(conn_t *c) {
    while (c->out_len) {
        ssize_t n = write(c->fd, c->out, c->out_len);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR) break;
            c->out_len = 0;
            return;
        }
        memmove(c->out, c->out + n, c->out_len - (size_t)n);
        c->out_len -= (size_t)n;
    }
    struct epoll_event ev = {.events = EPOLLIN | (c->out_len ? EPOLLOUT : 0), .data.u32 = (uint32_t)(c - conns)};
    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
}

static void queue_out(conn_t *c, const char *data, size_t len) {
    if (c->out_len == 0) {
        ssize_t n = write(c->fd, data, len);
        if (n == (ssize_t)len) return;
        if (n < 0) n = 0;
        data += n;
        len -= (size_t)n;
    }
    c->out = realloc(c->out, c->out_len + len);
    memcpy(c->out + c->out_len, data, len);
    c->out_len += len;
    flush_out(c);
}

static uint32_t rng_state = 0x9e3779b9u;
static inline uint32_t rng(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 17;
    rng_state ^= rng_state << 5;
    return rng_state;
}

/* A masked client frame (RFC 6455 5.3). Payloads here are < 126 bytes. */
static void send_frame(conn_t *c, int opcode, const char *payload, size_t len) {
    char buf[256];
    if (len > 125) len = 125;
    uint32_t key = rng();
    buf[0] = (char)(0x80 | opcode);
    buf[1] = (char)(0x80 | len);
    memcpy(buf + 2, &key, 4);
    const uint8_t *k = (const uint8_t *)&key;
    for (size_t i = 0; i < len; i++) buf[6 + i] = (char)(payload[i] ^ k[i & 3]);
    queue_out(c, buf, 6 + len);
}

/* ---- connection setup --------------------------------------------------------- */

static void start_connect(int i) {
    conn_t *c = &conns[i];
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket (raise ulimit -n?)");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (src_ips > 1) {
        /* Spread source addresses over 127.0.0.x so more than one port range
         * of connections fits (the destination is always 127.0.0.1). */
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        struct sockaddr_in src = {.sin_family = AF_INET};
        src.sin_addr.s_addr = htonl(0x7f000001u + (uint32_t)(i % src_ips));
        if (bind(fd, (struct sockaddr *)&src, sizeof src) < 0) die("bind source");
    }
    struct sockaddr_in dst = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, host, &dst.sin_addr);
    c->fd = fd;
    c->state = ST_CONNECTING;
    c->room = i % nrooms;
    int r = connect(fd, (struct sockaddr *)&dst, sizeof dst);
    if (r < 0 && errno != EINPROGRESS) die("connect");
    struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN, .data.u32 = (uint32_t)i};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl");
    connecting_now++;
}

static void fill_connects(void) {
    while (next_to_connect < nconns && connecting_now < connect_concurrency) start_connect(next_to_connect++);
}

static void mark_closed(conn_t *c, int code) {
    if (c->state == ST_CLOSED) return;
    if (c->state == ST_CONNECTING || c->state == ST_HANDSHAKE || c->state == ST_JOINING) {
        connecting_now--;
        conn_failures++;
    } else {
        open_count--;
    }
    c->state = ST_CLOSED;
    c->close_code = code;
    closes++;
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    if (first_errors_printed < 5) {
        first_errors_printed++;
        fprintf(stderr, "loadclient: connection %d closed (code %d)\n", (int)(c - conns), code);
    }
}

static void send_handshake(conn_t *c) {
    char req[512];
    int idx = (int)(c - conns);
    int n = snprintf(req, sizeof req,
                     "GET /ws?user=%s-%d HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
                     user_prefix, idx, host, port);
    c->state = ST_HANDSHAKE;
    queue_out(c, req, (size_t)n);
}

static void send_join(conn_t *c) {
    char msg[200];
    int n = snprintf(msg, sizeof msg, "{\"type\":\"join\",\"room\":\"%s%d\"}", room_prefix, c->room);
    c->state = ST_JOINING;
    send_frame(c, 1, msg, (size_t)n);
}

/* ---- frame handling -------------------------------------------------------------- */

static inline const char *find(const char *hay, size_t hlen, const char *needle, size_t nlen) {
    return memmem(hay, hlen, needle, nlen);
}

/* The number after `"key"` + optional spaces + ':' + optional spaces. */
static inline int json_uint_after(const char *p, const char *end, const char *key, size_t klen, uint64_t *out) {
    const char *k = find(p, (size_t)(end - p), key, klen);
    if (!k) return 0;
    k += klen;
    while (k < end && (*k == ' ' || *k == ':')) k++;
    if (k >= end || *k < '0' || *k > '9') return 0;
    uint64_t v = 0;
    while (k < end && *k >= '0' && *k <= '9') v = v * 10 + (uint64_t)(*k++ - '0');
    *out = v;
    return 1;
}

static void on_message(conn_t *c, const char *p, size_t len, uint64_t now) {
    const char *end = p + len;
    uint64_t seq, pub;
    if (!json_uint_after(p, end, "\"seq\"", 5, &seq)) {
        messages_bad++;
        return;
    }
    if (json_uint_after(p, end, "\"pub_ns\"", 8, &pub) && now > pub) hist_record(now - pub);
    uint64_t byte = seq >> 3;
    if (byte >= c->seen_bytes) {
        uint64_t nb = c->seen_bytes ? c->seen_bytes : 64;
        while (nb <= byte) nb *= 2;
        c->seen = realloc(c->seen, nb);
        memset(c->seen + c->seen_bytes, 0, nb - c->seen_bytes);
        c->seen_bytes = nb;
    }
    uint8_t bit = (uint8_t)(1u << (seq & 7));
    if (c->seen[byte] & bit) {
        c->dup++;
        dups++;
        return;
    }
    c->seen[byte] |= bit;
    if (seq > c->last_seq) {
        if (seq != c->last_seq + 1) c->gap_events++;
        c->last_seq = seq;
    } else {
        c->ooo++;  /* new, but below one already seen: late */
        ooos++;
    }
    c->distinct++;
    deliveries++;
    if (!t_first_recv) t_first_recv = now;
    t_last_recv = now;
}

static void on_text(conn_t *c, const char *p, size_t len, uint64_t now) {
    if (len >= 17 && memcmp(p, "{\"type\":\"message\"", 17) == 0) {
        on_message(c, p, len, now);
        return;
    }
    /* Generic path (other servers may put spaces after ':' or reorder keys). */
    const char *end = p + len;
    const char *t = find(p, len, "\"type\"", 6);
    if (!t) {
        other_frames++;
        return;
    }
    t += 6;
    while (t < end && (*t == ' ' || *t == ':')) t++;
    if (end - t >= 9 && memcmp(t, "\"message\"", 9) == 0) {
        on_message(c, p, len, now);
    } else if (end - t >= 8 && memcmp(t, "\"joined\"", 8) == 0) {
        if (c->state == ST_JOINING) {
            c->state = ST_JOINED;
            joined_count++;
            open_count++;
            connecting_now--;
        }
    } else {
        if (end - t >= 7 && memcmp(t, "\"error\"", 7) == 0) errors_frames++;
        else other_frames++;
        if (first_errors_printed < 5) {
            first_errors_printed++;
            fprintf(stderr, "loadclient: unexpected frame: %.*s\n", (int)(len > 200 ? 200 : len), p);
        }
    }
}

/* Parse whole frames from buf; returns the bytes consumed. */
static size_t parse_frames(conn_t *c, char *buf, size_t len, uint64_t now) {
    size_t off = 0;
    while (len - off >= 2) {
        uint8_t b0 = (uint8_t)buf[off], b1 = (uint8_t)buf[off + 1];
        int masked = b1 & 0x80;
        uint64_t plen = b1 & 0x7f;
        size_t hdr = 2;
        if (plen == 126) {
            if (len - off < 4) break;
            plen = ((uint64_t)(uint8_t)buf[off + 2] << 8) | (uint8_t)buf[off + 3];
            hdr = 4;
        } else if (plen == 127) {
            if (len - off < 10) break;
            plen = 0;
            for (int i = 0; i < 8; i++) plen = (plen << 8) | (uint8_t)buf[off + 2 + i];
            hdr = 10;
        }
        if (masked) hdr += 4;
        if (len - off < hdr || len - off - hdr < plen) break;
        char *payload = buf + off + hdr;
        if (masked) {
            const uint8_t *k = (const uint8_t *)buf + off + hdr - 4;
            for (uint64_t i = 0; i < plen; i++) payload[i] ^= (char)k[i & 3];
        }
        int opcode = b0 & 0x0f;
        c->frames++;
        if (opcode == 1) {
            on_text(c, payload, (size_t)plen, now);
        } else if (opcode == 9) {
            pings++;
            send_frame(c, 10, payload, (size_t)plen);
        } else if (opcode == 8) {
            int code = plen >= 2 ? (((uint8_t)payload[0] << 8) | (uint8_t)payload[1]) : 1005;
            off += hdr + plen;
            mark_closed(c, code);
            return off;
        } else if (opcode != 10) {
            other_frames++;
        }
        off += hdr + plen;
    }
    return off;
}

static void on_data(conn_t *c, char *data, size_t n, uint64_t now) {
    if (c->state == ST_HANDSHAKE) {
        /* Accumulate the HTTP response until its blank line. */
        if (c->pend_len + n > c->pend_cap) {
            c->pend_cap = c->pend_len + n + 4096;
            c->pend = realloc(c->pend, c->pend_cap);
        }
        memcpy(c->pend + c->pend_len, data, n);
        c->pend_len += n;
        char *eoh = memmem(c->pend, c->pend_len, "\r\n\r\n", 4);
        if (!eoh) return;
        if (c->pend_len < 12 || memcmp(c->pend + 9, "101", 3) != 0) {
            if (first_errors_printed < 5) {
                first_errors_printed++;
                fprintf(stderr, "loadclient: upgrade refused: %.*s\n", (int)(eoh - c->pend), c->pend);
            }
            mark_closed(c, -1);
            return;
        }
        size_t rest = c->pend_len - (size_t)(eoh + 4 - c->pend);
        memmove(c->pend, eoh + 4, rest);
        c->pend_len = rest;
        send_join(c);
        if (c->pend_len) {
            size_t used = parse_frames(c, c->pend, c->pend_len, now);
            if (c->state == ST_CLOSED) return;
            memmove(c->pend, c->pend + used, c->pend_len - used);
            c->pend_len -= used;
        }
        return;
    }
    if (c->pend_len) {
        if (c->pend_len + n > c->pend_cap) {
            c->pend_cap = (c->pend_len + n) * 2;
            c->pend = realloc(c->pend, c->pend_cap);
        }
        memcpy(c->pend + c->pend_len, data, n);
        c->pend_len += n;
        size_t used = parse_frames(c, c->pend, c->pend_len, now);
        if (c->state == ST_CLOSED) return;
        memmove(c->pend, c->pend + used, c->pend_len - used);
        c->pend_len -= used;
        return;
    }
    size_t used = parse_frames(c, data, n, now);
    if (c->state == ST_CLOSED) return;
    if (used < n) {
        size_t rest = n - used;
        if (rest > c->pend_cap) {
            c->pend_cap = rest + 4096;
            c->pend = realloc(c->pend, c->pend_cap);
        }
        memcpy(c->pend, data + used, rest);
        c->pend_len = rest;
    }
}

static void on_event(uint32_t idx, uint32_t events) {
    conn_t *c = &conns[idx];
    if (c->state == ST_CLOSED) return;
    if (c->state == ST_CONNECTING) {
        if (events & (EPOLLOUT | EPOLLERR | EPOLLHUP)) {
            int err = 0;
            socklen_t el = sizeof err;
            getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &el);
            if (err) {
                if (first_errors_printed < 5) {
                    first_errors_printed++;
                    fprintf(stderr, "loadclient: connect failed: %s\n", strerror(err));
                }
                mark_closed(c, -2);
                return;
            }
            struct epoll_event ev = {.events = EPOLLIN, .data.u32 = idx};
            epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
            send_handshake(c);
        }
        return;
    }
    if ((events & EPOLLOUT) && c->out_len) flush_out(c);
    if (events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
        ssize_t n = read(c->fd, rbuf, RBUF_SIZE);
        if (n > 0) {
            uint64_t now = now_ns();
            reads_total++;
            bytes_total += (uint64_t)n;
            on_data(c, rbuf, (size_t)n, now);
            if (progress) *progress = deliveries;
        } else if (n == 0 || (errno != EAGAIN && errno != EINTR)) {
            mark_closed(c, n == 0 ? -3 : -4);
        }
    }
}

/* ---- reporting --------------------------------------------------------------------- */

static void print_stats(void) {
    uint64_t min_last = UINT64_MAX;
    for (int i = 0; i < nconns; i++)
        if (conns[i].last_seq < min_last) min_last = conns[i].last_seq;
    printf("{\"deliveries\":%" PRIu64 ",\"open\":%d,\"closes\":%" PRIu64 ",\"min_last_seq\":%" PRIu64
           ",\"t_last_recv_ns\":%" PRIu64 "}\n",
           deliveries, open_count, closes, min_last == UINT64_MAX ? 0 : min_last, t_last_recv);
    fflush(stdout);
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static void print_report(uint64_t expected, int timed_out, uint64_t waited_ns) {
    uint64_t lost = 0, undelivered_tail = 0, closed_conns = 0, gap_events = 0;
    uint64_t *counts = malloc(sizeof(uint64_t) * (size_t)(nconns ? nconns : 1));
    for (int i = 0; i < nconns; i++) {
        conn_t *c = &conns[i];
        counts[i] = c->distinct;
        gap_events += c->gap_events;
        if (c->state == ST_CLOSED) closed_conns++;
        /* Missing seqs below the highest one received: lost (a later one came).
         * Missing seqs above it: not (yet) delivered when the wait ended. */
        uint64_t below = c->last_seq > expected ? expected : c->last_seq;
        uint64_t have_below = 0;
        if (c->seen) {
            for (uint64_t s = 1; s <= below; s++)
                if (c->seen[s >> 3] & (1u << (s & 7))) have_below++;
        }
        lost += below - have_below;
        undelivered_tail += expected - below;
    }
    qsort(counts, (size_t)nconns, sizeof(uint64_t), cmp_u64);
    uint64_t csum = 0;
    for (int i = 0; i < nconns; i++) csum += counts[i];
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu_s = (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
    printf("{\"deliveries\":%" PRIu64 ",\"expected_per_conn\":%" PRIu64 ",\"expected\":%" PRIu64 ",\"lost\":%" PRIu64
           ",\"undelivered\":%" PRIu64 ",\"dup\":%" PRIu64 ",\"out_of_order\":%" PRIu64 ",\"gap_events\":%" PRIu64
           ",\"bad_messages\":%" PRIu64 ",\"error_frames\":%" PRIu64 ",\"other_frames\":%" PRIu64 ",\"pings\":%" PRIu64
           ",\"conns\":%d,\"closed_conns\":%" PRIu64 ",\"conn_failures\":%" PRIu64 ",\"timed_out\":%s"
           ",\"latency_us\":{\"count\":%" PRIu64 ",\"min\":%.1f,\"p50\":%.1f,\"p90\":%.1f,\"p99\":%.1f,\"p99_9\":%.1f,\"max\":%.1f}"
           ",\"per_conn\":{\"min\":%" PRIu64 ",\"p50\":%" PRIu64 ",\"max\":%" PRIu64 ",\"mean\":%.1f}"
           ",\"t_first_recv_ns\":%" PRIu64 ",\"t_last_recv_ns\":%" PRIu64 ",\"report_wait_ms\":%.1f"
           ",\"reads\":%" PRIu64 ",\"bytes\":%" PRIu64 ",\"client_cpu_s\":%.3f,\"elapsed_s\":%.3f}\n",
           deliveries, expected, expected * (uint64_t)nconns, lost, undelivered_tail, dups, ooos, gap_events, messages_bad,
           errors_frames, other_frames, pings, nconns, closed_conns, conn_failures, timed_out ? "true" : "false", hist_count,
           hist_count ? hist_min / 1e3 : 0.0, hist_pct(50) / 1e3, hist_pct(90) / 1e3, hist_pct(99) / 1e3, hist_pct(99.9) / 1e3,
           hist_max / 1e3, nconns ? counts[0] : 0, nconns ? counts[nconns / 2] : 0, nconns ? counts[nconns - 1] : 0,
           nconns ? (double)csum / nconns : 0.0, t_first_recv, t_last_recv, waited_ns / 1e6, reads_total, bytes_total, cpu_s,
           (now_ns() - t_start) / 1e9);
    fflush(stdout);
    free(counts);
}

static int all_received(uint64_t expected) {
    for (int i = 0; i < nconns; i++)
        if (conns[i].state != ST_CLOSED && conns[i].distinct < expected) return 0;
    return 1;
}

/* ---- main ----------------------------------------------------------------------------- */

static void usage(void) {
    fprintf(stderr,
            "usage: loadclient --port P --conns N --rooms R [--host 127.0.0.1] [--room-prefix r] [--user-prefix bench]\n"
            "                  [--src-ips K] [--connect-concurrency C] [--progress-file F] [--ready-timeout S] [--max-seconds S]\n");
    exit(2);
}

int main(int argc, char **argv) {
    const char *progress_file = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) usage();
        if (!strcmp(a, "--port")) port = atoi(v);
        else if (!strcmp(a, "--host")) host = v;
        else if (!strcmp(a, "--conns")) nconns = atoi(v);
        else if (!strcmp(a, "--rooms")) nrooms = atoi(v);
        else if (!strcmp(a, "--room-prefix")) room_prefix = v;
        else if (!strcmp(a, "--user-prefix")) user_prefix = v;
        else if (!strcmp(a, "--src-ips")) src_ips = atoi(v);
        else if (!strcmp(a, "--connect-concurrency")) connect_concurrency = atoi(v);
        else if (!strcmp(a, "--progress-file")) progress_file = v;
        else if (!strcmp(a, "--ready-timeout")) ready_timeout_s = atof(v);
        else if (!strcmp(a, "--max-seconds")) max_seconds = atof(v);
        else usage();
        i++;
    }
    if (port <= 0 || nconns <= 0 || nrooms <= 0) usage();
    signal(SIGPIPE, SIG_IGN);
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    if (progress_file) {
        int pfd = open(progress_file, O_RDWR | O_CREAT, 0644);
        if (pfd < 0 || ftruncate(pfd, 4096) < 0) die("progress file");
        void *m = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, pfd, 0);
        if (m == MAP_FAILED) die("mmap progress");
        progress = (volatile uint64_t *)m;
        *progress = 0;
    }
    rbuf = malloc(RBUF_SIZE);
    conns = calloc((size_t)nconns, sizeof(conn_t));
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0) die("epoll_create1");
    struct epoll_event sev = {.events = EPOLLIN, .data.u32 = UINT32_MAX};
    epoll_ctl(epfd, EPOLL_CTL_ADD, 0, &sev);

    t_start = now_ns();
    uint64_t hard_deadline = t_start + (uint64_t)(max_seconds * 1e9);
    uint64_t ready_deadline = t_start + (uint64_t)(ready_timeout_s * 1e9);
    int ready = 0;
    int reporting = 0;
    uint64_t report_expected = 0, report_deadline = 0, report_start = 0, last_check_ns = 0;
    char line[256];
    size_t line_len = 0;
    struct epoll_event evs[512];
    fill_connects();
    for (;;) {
        int n = epoll_wait(epfd, evs, 512, 20);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int i = 0; i < n; i++) {
            uint32_t idx = evs[i].data.u32;
            if (idx == UINT32_MAX) {
                ssize_t r = read(0, line + line_len, sizeof line - 1 - line_len);
                if (r <= 0) {
                    epoll_ctl(epfd, EPOLL_CTL_DEL, 0, NULL); /* stdin closed: keep the deadline */
                    continue;
                }
                line_len += (size_t)r;
                line[line_len] = 0;
                char *nl;
                while ((nl = strchr(line, '\n'))) {
                    *nl = 0;
                    if (!strncmp(line, "stats", 5)) print_stats();
                    else if (!strncmp(line, "quit", 4)) return 0;
                    else if (!strncmp(line, "report", 6)) {
                        unsigned long long e = 0;
                        double ms = 0;
                        sscanf(line + 6, "%llu %lf", &e, &ms);
                        reporting = 1;
                        report_expected = e;
                        report_start = now_ns();
                        report_deadline = report_start + (uint64_t)(ms * 1e6);
                    }
                    size_t used = (size_t)(nl + 1 - line);
                    memmove(line, nl + 1, line_len - used + 1);
                    line_len -= used;
                }
                if (line_len >= sizeof line - 1) line_len = 0;
                continue;
            }
            on_event(idx, evs[i].events);
        }
        fill_connects();
        uint64_t now = now_ns();
        if (!ready) {
            if (joined_count + (int)conn_failures >= nconns && next_to_connect >= nconns) {
                ready = 1;
                printf("READY {\"conns\":%d,\"joined\":%d,\"failed\":%" PRIu64 ",\"setup_ms\":%.1f}\n", nconns, joined_count,
                       conn_failures, (now - t_start) / 1e6);
                fflush(stdout);
            } else if (now > ready_deadline) {
                printf("NOTREADY {\"conns\":%d,\"joined\":%d,\"failed\":%" PRIu64 "}\n", nconns, joined_count, conn_failures);
                fflush(stdout);
                return 1;
            }
        }
        if (reporting && now - last_check_ns > 1000000) {
            last_check_ns = now;
            if (!(all_received(report_expected) || now > report_deadline)) goto not_yet;
            print_report(report_expected, now > report_deadline && !all_received(report_expected), now - report_start);
            return 0;
        }
    not_yet:
        if (now > hard_deadline) {
            fprintf(stderr, "loadclient: --max-seconds reached; exiting\n");
            print_report(report_expected, 1, 0);
            return 3;
        }
    }
}
