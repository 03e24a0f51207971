/*
 * loadclient: a cheap epoll websocket load client for Rango benchmarks.
 *
 * One file, plain C; one thread, level-triggered epoll. Built by bench/run.py with
 * `cc -O2 -o bench/out/loadclient bench/loadclient.c -lssl -lcrypto`.
 *
 * Modes
 *   subscribe     open N connections to ws://HOST:PORT/PATH?stream=S (at most
 *                 --inflight handshakes at a time, so the server's accept backlog
 *                 is never overrun), print {"event":"ready",...} once every
 *                 connection is open (or failed), then read frames until stdin
 *                 closes, SIGTERM/SIGINT, or --duration seconds after ready.
 *                 Event frames are counted per connection; a `"t":<unix ns>` field
 *                 in the payload gives a latency sample (now - t, CLOCK_REALTIME);
 *                 a `"s":<n>` field is a per-event sequence checked for gaps and
 *                 reordering. Commands on stdin, one per line:
 *                   report   print the counters since the last reset (JSON line)
 *                   reset    zero the counters (sequence tracking restarts at s=1)
 *                   quit     print the final report and exit (as does EOF)
 *   idle          as subscribe, but only holds the connections (answers pings).
 *   connect-rate  for --duration seconds keep --concurrency connections cycling
 *                 through connect, upgrade (until the 101), close; print the
 *                 upgrades per second and failures.
 *
 * --tls speaks wss:// (OpenSSL, non-blocking on the same epoll loop): a full
 * handshake per connection (no session resumption, as a new visitor's browser),
 * no certificate verification (the server's CertificateVerify signature is still
 * checked by TLS 1.3 itself). Without --tls no OpenSSL function is called.
 * The server's Sec-WebSocket-Accept is not verified: a 101 status is enough.
 * Compressed frames (RSV1, after `--header 'Sec-WebSocket-Extensions: permessage-deflate'`)
 * are counted as events without being inflated or parsed.
 * Server frames are unmasked; pings are answered with masked pongs; the first
 * text frame of a connection (the `subscribed` answer) is not an event.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

#define RBUF_SIZE (1u << 20) /* largest frame we accept, and the read size */
#define MAX_EVENTS 1024
#define HANDSHAKE_TIMEOUT_NS (15LL * 1000000000LL)

enum { M_SUBSCRIBE, M_IDLE, M_CONNECT_RATE };
enum { S_FREE, S_CONNECTING, S_HANDSHAKE, S_OPEN, S_CLOSING, S_DONE, S_TLS };

/* ---- options ---- */
static int mode = M_SUBSCRIBE;
static const char *host = "127.0.0.1";
static int port = 8080;
static const char *path = "/public";
static char streams[4096];
static long nconns = 1000;
static long inflight = 500;
static long concurrency = 100;
static double duration = 0;
static int src_ips = 1;
static int close_ws = 1; /* connect-rate: 1 = websocket close handshake, 0 = RST */
static const char *extra_header = NULL;
static int send_frames = 0; /* --send-frames N: a subscribe, then N-1 text pings, once open */
static int use_stdin = 1;
static int use_tls = 0;      /* --tls: wss:// */
static SSL_CTX *tls_ctx;
static double ready_timeout = 120;

/* ---- histogram: log-linear, 64 sub-buckets per power of two (~1.5 %) ---- */
#define HSUB 128
#define HBUCKETS (HSUB + 64 * 64)
typedef struct {
    uint64_t b[HBUCKETS];
    uint64_t count, max;
    double sum;
} hist_t;

static inline int hidx(uint64_t v) {
    if (v < HSUB) return (int)v;
    int msb = 63 - __builtin_clzll(v);
    int shift = msb - 6;
    int idx = HSUB + (shift - 1) * 64 + (int)((v >> shift) - 64);
    return idx < HBUCKETS ? idx : HBUCKETS - 1;
}
static inline double hval(int idx) {
    if (idx < HSUB) return idx;
    int shift = (idx - HSUB) / 64 + 1;
    uint64_t m = (uint64_t)((idx - HSUB) % 64 + 64);
    return (double)(m << shift) + (double)(1ULL << shift) / 2.0;
}
static inline void hadd(hist_t *h, uint64_t v) {
    h->b[hidx(v)]++;
    h->count++;
    h->sum += (double)v;
    if (v > h->max) h->max = v;
}
static double hpct(const hist_t *h, double p) {
    if (!h->count) return 0;
    uint64_t want = (uint64_t)(p / 100.0 * (double)h->count);
    if (want >= h->count) want = h->count - 1;
    uint64_t seen = 0;
    for (int i = 0; i < HBUCKETS; i++) {
        seen += h->b[i];
        if (seen > want) {
            double v = hval(i);
            return v > (double)h->max ? (double)h->max : v;
        }
    }
    return (double)h->max;
}

/* ---- connections ---- */
typedef struct {
    int fd;
    uint8_t state;
    uint8_t subscribed; /* the first text frame (subscribed answer) was seen */
    uint8_t counted_closed;
    uint32_t plen, pcap; /* leftover bytes of a partial frame / response */
    uint8_t *pbuf;
    SSL *ssl; /* --tls only */
    int64_t started_ns;
    uint64_t frames;
    int64_t last_s;
} conn_t;

static conn_t *conns;
static long nslots;
static int ep;
static uint8_t *rbuf;
static volatile sig_atomic_t stop_flag;
static struct sockaddr_in server_addr;
static char request[8192];
static size_t request_len;

/* counters (subscribe/idle) */
static long n_started, n_open, n_failed, n_subscribed, n_closed_frame, n_eof, n_reset,
    n_handshake_fail, n_non101, n_timeout;
static int ready_printed;
static int64_t ready_ns, t0_ns;
/* resettable */
static uint64_t frames_total, other_frames, pings, bytes_total, seq_gaps, seq_missing, seq_ooo,
    no_ts;
static int64_t first_frame_ns, last_frame_ns;
static hist_t lat; /* microseconds */
/* connect-rate */
static uint64_t cr_ok, cr_fail_connect, cr_fail_reset, cr_fail_eof, cr_fail_status, cr_timeout,
    cr_fail_tls;
static long n_tls_fail;
static uint64_t cr_src_counter;

static inline int64_t now_real(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}
static inline int64_t now_mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void on_signal(int sig) {
    (void)sig;
    stop_flag = 1;
}

static void raise_nofile(long want) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0) return;
    if ((long)rl.rlim_cur >= want) return;
    struct rlimit nrl = rl;
    nrl.rlim_cur = (rlim_t)want;
    if ((long)nrl.rlim_max < want) nrl.rlim_max = (rlim_t)want;
    if (setrlimit(RLIMIT_NOFILE, &nrl) != 0) {
        nrl.rlim_cur = rl.rlim_max; /* not privileged: as far as allowed */
        nrl.rlim_max = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &nrl);
        if ((long)rl.rlim_max < want)
            fprintf(stderr, "loadclient: RLIMIT_NOFILE hard limit %ld < %ld\n",
                    (long)rl.rlim_max, want);
    }
}

/* ---- connection life cycle ---- */

static void conn_free_buf(conn_t *c) {
    free(c->pbuf);
    c->pbuf = NULL;
    c->plen = c->pcap = 0;
}

static void conn_close(conn_t *c, int abortive) {
    if (c->fd >= 0) {
        if (abortive) {
            struct linger lg = {1, 0};
            setsockopt(c->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
        }
        close(c->fd); /* also removes it from the epoll set */
    }
    if (c->ssl) {
        SSL_free(c->ssl); /* the socket BIO does not close the descriptor */
        c->ssl = NULL;
    }
    c->fd = -1;
    conn_free_buf(c);
    c->state = S_DONE;
}

static int conn_start(long slot) {
    conn_t *c = &conns[slot];
    memset(c, 0, sizeof *c);
    c->fd = -1;
    c->started_ns = now_mono();
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        c->state = S_DONE;
        return -1;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (src_ips > 1) {
        struct sockaddr_in src = {0};
        src.sin_family = AF_INET;
        src.sin_addr.s_addr = htonl(0x7f000001u + (uint32_t)(cr_src_counter++ % (uint64_t)src_ips));
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        if (bind(fd, (struct sockaddr *)&src, sizeof src) != 0) {
            close(fd);
            c->state = S_DONE;
            return -1;
        }
    }
    int r = connect(fd, (struct sockaddr *)&server_addr, sizeof server_addr);
    if (r != 0 && errno != EINPROGRESS) {
        close(fd);
        c->state = S_DONE;
        return -1;
    }
    c->fd = fd;
    c->state = S_CONNECTING;
    struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN, .data.u64 = (uint64_t)slot};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    return 0;
}

static void set_events(conn_t *c, long slot, uint32_t events) {
    struct epoll_event ev = {.events = events, .data.u64 = (uint64_t)slot};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
}

static void keep_leftover(conn_t *c, const uint8_t *p, size_t n) {
    if (n > c->pcap) {
        size_t cap = c->pcap ? c->pcap : 256;
        while (cap < n) cap *= 2;
        uint8_t *nb = realloc(c->pbuf, cap);
        if (!nb) abort();
        c->pbuf = nb;
        c->pcap = (uint32_t)cap;
    }
    if (n) memmove(c->pbuf, p, n);
    c->plen = (uint32_t)n;
}

/* ---- I/O: plain read()/write(), or OpenSSL's on the same descriptor ---- */

static ssize_t tls_result(conn_t *c, int r) {
    int e = SSL_get_error(c->ssl, r);
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
        errno = EAGAIN;
        return -1;
    }
    ERR_clear_error();
    if (e == SSL_ERROR_ZERO_RETURN) return 0; /* close_notify, or EOF (IGNORE_UNEXPECTED_EOF) */
    if (e != SSL_ERROR_SYSCALL || !errno) errno = ECONNRESET;
    return -1;
}

static inline ssize_t conn_read(conn_t *c, uint8_t *buf, size_t n) {
    if (!c->ssl) return read(c->fd, buf, n);
    int r = SSL_read(c->ssl, buf, n > (1u << 30) ? (1 << 30) : (int)n);
    return r > 0 ? r : tls_result(c, r);
}

static inline ssize_t conn_write(conn_t *c, const void *buf, size_t n) {
    if (!c->ssl) return write(c->fd, buf, n);
    int r = SSL_write(c->ssl, buf, (int)n);
    return r > 0 ? r : tls_result(c, r);
}

static void send_masked(conn_t *c, uint8_t opcode, const uint8_t *payload, size_t n) {
    uint8_t f[2 + 4 + 125];
    if (n > 125) n = 125;
    f[0] = 0x80 | opcode;
    f[1] = 0x80 | (uint8_t)n;
    uint8_t mask[4] = {0x12, 0x34, 0x56, 0x78};
    memcpy(f + 2, mask, 4);
    for (size_t i = 0; i < n; i++) f[6 + i] = payload[i] ^ mask[i & 3];
    ssize_t w = conn_write(c, f, 6 + n);
    (void)w;
}

static inline int64_t parse_num_after(const uint8_t *p, size_t n, const char *key, size_t klen,
                                      int *found) {
    const uint8_t *k = memmem(p, n, key, klen);
    *found = 0;
    if (!k) return 0;
    const uint8_t *q = k + klen, *end = p + n;
    while (q < end && *q == ' ') q++;
    int64_t v = 0;
    int digits = 0;
    while (q < end && *q >= '0' && *q <= '9') {
        v = v * 10 + (*q - '0');
        q++;
        digits++;
    }
    *found = digits > 0;
    return v;
}

static void on_text(conn_t *c, const uint8_t *p, size_t n, int64_t now, int compressed) {
    if (mode == M_CONNECT_RATE) return;
    if (compressed) {
        /* permessage-deflate (RSV1): an event frame, counted but not inflated, so
         * the client's cost stays a frame's, not zlib's. No latency or sequence. */
        c->frames++;
        frames_total++;
        if (!first_frame_ns) first_frame_ns = now;
        last_frame_ns = now;
        no_ts++;
        return;
    }
    if (n >= 10 && memcmp(p, "{\"success\"", 10) == 0) {
        if (!c->subscribed) {
            c->subscribed = 1;
            n_subscribed++;
        } else {
            other_frames++;
        }
        return;
    }
    if (n >= 8 && memcmp(p, "{\"error\"", 8) == 0) {
        other_frames++;
        return;
    }
    if (n == 4 && memcmp(p, "pong", 4) == 0) {
        other_frames++;
        return;
    }
    c->frames++;
    frames_total++;
    if (!first_frame_ns) first_frame_ns = now;
    last_frame_ns = now;
    if (mode != M_SUBSCRIBE) return;
    int found;
    int64_t t = parse_num_after(p, n, "\"t\":", 4, &found);
    if (found) {
        int64_t d = now - t;
        hadd(&lat, d > 0 ? (uint64_t)(d / 1000) : 0);
    } else {
        no_ts++;
    }
    int64_t s = parse_num_after(p, n, "\"s\":", 4, &found);
    if (found) {
        if (s == c->last_s + 1) {
            c->last_s = s;
        } else if (s > c->last_s + 1) {
            seq_gaps++;
            seq_missing += (uint64_t)(s - c->last_s - 1);
            c->last_s = s;
        } else {
            seq_ooo++;
        }
    }
}

static void conn_lost(conn_t *c, int how) {
    /* how: 0 close frame, 1 EOF, 2 reset/error */
    if (c->state == S_OPEN && !c->counted_closed && mode != M_CONNECT_RATE) {
        c->counted_closed = 1;
        if (how == 0) n_closed_frame++;
        else if (how == 1) n_eof++;
        else n_reset++;
        n_open--;
    }
    conn_close(c, 0);
}

/* Parse complete frames in p[0..n); return bytes consumed, or -1 if the connection closed. */
static ssize_t parse_frames(conn_t *c, uint8_t *p, size_t n, int64_t now) {
    size_t off = 0;
    while (n - off >= 2) {
        uint8_t *f = p + off;
        size_t avail = n - off;
        uint8_t op = f[0] & 0x0f;
        int masked = f[1] & 0x80;
        uint64_t len = f[1] & 0x7f;
        size_t hdr = 2;
        if (len == 126) {
            if (avail < 4) break;
            len = ((uint64_t)f[2] << 8) | f[3];
            hdr = 4;
        } else if (len == 127) {
            if (avail < 10) break;
            len = 0;
            for (int i = 0; i < 8; i++) len = (len << 8) | f[2 + i];
            hdr = 10;
        }
        if (masked) hdr += 4;
        if (len > RBUF_SIZE - 16) {
            fprintf(stderr, "loadclient: frame of %" PRIu64 " bytes is too large\n", len);
            conn_lost(c, 2);
            return -1;
        }
        if (avail < hdr + len) break;
        uint8_t *payload = f + hdr;
        if (masked) {
            uint8_t *m = f + hdr - 4;
            for (uint64_t i = 0; i < len; i++) payload[i] ^= m[i & 3];
        }
        off += hdr + len;
        switch (op) {
        case 0x1:
        case 0x2:
        case 0x0:
            on_text(c, payload, (size_t)len, now, (f[0] & 0x40) != 0);
            break;
        case 0x9:
            pings++;
            send_masked(c, 0xA, payload, (size_t)len);
            break;
        case 0xA:
            break;
        case 0x8:
            if (mode == M_CONNECT_RATE) break; /* read on until the server closes TCP */
            conn_lost(c, 0);
            return -1;
        default:
            break;
        }
    }
    return (ssize_t)off;
}

static int handshake_response(conn_t *c, uint8_t *p, size_t n, size_t *consumed) {
    /* 1: complete 101, 0: need more, -1: refused */
    uint8_t *end = memmem(p, n, "\r\n\r\n", 4);
    if (!end) {
        if (n > 16384) return -1;
        return 0;
    }
    *consumed = (size_t)(end + 4 - p);
    (void)c;
    if (n >= 12 && memcmp(p, "HTTP/1.1 101", 12) == 0) return 1;
    return -1;
}

static void maybe_ready(void);

/* The server closed (how: 1 EOF, 2 reset or error): count it by mode and state. */
static void on_lost(conn_t *c, int how) {
    if (mode == M_CONNECT_RATE) {
        if (c->state != S_CLOSING) {
            if (how == 1) cr_fail_eof++;
            else cr_fail_reset++;
        }
        conn_close(c, 0);
        return;
    }
    if (c->state != S_OPEN) {
        n_failed++;
        n_handshake_fail++;
        conn_close(c, 0);
        maybe_ready();
        return;
    }
    conn_lost(c, how);
}

/* One read (plain), or SSL_read until OpenSSL wants more bytes from the socket
 * or the buffer is nearly full (TLS); returns 1 when OpenSSL may still hold
 * bytes the kernel no longer signals (epoll would not wake us for them). */
static int read_once(long slot) {
    conn_t *c = &conns[slot];
    size_t have = c->plen;
    if (have) memcpy(rbuf, c->pbuf, have);
    ssize_t r = conn_read(c, rbuf + have, RBUF_SIZE - have);
    int more = 0, ended = 0; /* ended: 1 EOF, 2 error, after the bytes before it */
    if (r < 0) {
        if (errno == EAGAIN || errno == EINTR) return 0;
        goto lost_reset;
    }
    if (r == 0) goto lost_eof;
    if (c->ssl) {
        /* read_ahead: one read() may have brought several records; take those
         * buffered (SSL_read returns one record at a time) without another read(). */
        while (SSL_has_pending(c->ssl)) {
            if (RBUF_SIZE - have - (size_t)r < 16384 + 64) {
                more = 1; /* the rest after these frames are parsed */
                break;
            }
            ssize_t m = conn_read(c, rbuf + have + r, RBUF_SIZE - have - (size_t)r);
            if (m <= 0) {
                if (m == 0) ended = 1;
                else if (errno != EAGAIN && errno != EINTR) ended = 2;
                break; /* EAGAIN: a partial record, the rest comes with the next epoll event */
            }
            r += m;
        }
    }
    bytes_total += (uint64_t)r;
    int64_t now = now_real();
    size_t n = have + (size_t)r;
    size_t off = 0;
    if (c->state == S_HANDSHAKE) {
        size_t consumed = 0;
        int h = handshake_response(c, rbuf, n, &consumed);
        if (h == 0) {
            keep_leftover(c, rbuf, n);
            if (ended) {
                on_lost(c, ended);
                return 0;
            }
            return more;
        }
        if (h < 0) {
            if (mode == M_CONNECT_RATE) {
                cr_fail_status++;
            } else {
                n_failed++;
                n_non101++;
                if (n_failed <= 3)
                    fprintf(stderr, "loadclient: upgrade refused: %.*s\n",
                            (int)(memchr(rbuf, '\r', n) ? (uint8_t *)memchr(rbuf, '\r', n) - rbuf
                                                        : (long)(n < 80 ? n : 80)),
                            rbuf);
            }
            conn_close(c, mode == M_CONNECT_RATE && !close_ws);
            if (mode != M_CONNECT_RATE) maybe_ready();
            return 0;
        }
        off = consumed;
        if (mode == M_CONNECT_RATE) {
            cr_ok++;
            hadd(&lat, (uint64_t)((now_mono() - c->started_ns) / 1000));
            if (!close_ws) {
                conn_close(c, 1);
                return 0;
            }
            static const uint8_t code[2] = {0x03, 0xe8}; /* 1000 */
            send_masked(c, 0x8, code, 2);
            c->state = S_CLOSING;
        } else {
            c->state = S_OPEN;
            n_open++;
            if (send_frames > 0) {
                /* As a browser page does after the upgrade: a subscribe frame, then a
                 * few more (text pings, answered "pong"); then the connection idles. */
                static const char sub[] = "{\"event\":\"subscribe\",\"streams\":[\"benchusd.kline-1m\"]}";
                send_masked(c, 0x1, (const uint8_t *)sub, sizeof sub - 1);
                for (int i = 1; i < send_frames; i++)
                    send_masked(c, 0x1, (const uint8_t *)"ping", 4);
            }
        }
    }
    ssize_t used = parse_frames(c, rbuf + off, n - off, now);
    if (used < 0) return 0; /* closed */
    off += (size_t)used;
    keep_leftover(c, rbuf + off, n - off);
    if (ended) {
        on_lost(c, ended);
        return 0;
    }
    if (mode != M_CONNECT_RATE) maybe_ready();
    return more;
lost_eof:
    on_lost(c, 1);
    return 0;
lost_reset:
    on_lost(c, 2);
    return 0;
}

static void on_readable(long slot) {
    while (read_once(slot) && conns[slot].fd >= 0) {
    }
}

static void send_request(long slot);

static void handshake_failed(conn_t *c) {
    if (mode == M_CONNECT_RATE) {
        cr_fail_tls++;
    } else {
        n_failed++;
        n_handshake_fail++;
        n_tls_fail++;
        if (n_tls_fail <= 3) {
            char err[256];
            ERR_error_string_n(ERR_peek_last_error(), err, sizeof err);
            fprintf(stderr, "loadclient: TLS handshake failed: %s\n", err);
        }
    }
    ERR_clear_error();
    conn_close(c, 0);
    if (mode != M_CONNECT_RATE) maybe_ready();
}

/* One step of the non-blocking TLS handshake; on completion, the upgrade request. */
static void tls_step(long slot) {
    conn_t *c = &conns[slot];
    int r = SSL_do_handshake(c->ssl);
    if (r == 1) {
        send_request(slot);
        return;
    }
    int e = SSL_get_error(c->ssl, r);
    if (e == SSL_ERROR_WANT_READ) set_events(c, slot, EPOLLIN);
    else if (e == SSL_ERROR_WANT_WRITE) set_events(c, slot, EPOLLOUT);
    else handshake_failed(c);
}

static void on_writable(long slot) {
    conn_t *c = &conns[slot];
    if (c->state != S_CONNECTING) return;
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err) {
        if (mode == M_CONNECT_RATE) {
            cr_fail_connect++;
        } else {
            n_failed++;
            n_handshake_fail++;
            if (n_failed <= 3) fprintf(stderr, "loadclient: connect: %s\n", strerror(err));
        }
        conn_close(c, 0);
        if (mode != M_CONNECT_RATE) maybe_ready();
        return;
    }
    if (use_tls) {
        c->ssl = SSL_new(tls_ctx);
        if (!c->ssl || !SSL_set_fd(c->ssl, c->fd)) abort();
        SSL_set_connect_state(c->ssl);
        c->state = S_TLS;
        tls_step(slot);
        return;
    }
    send_request(slot);
}

/* The upgrade request, once connected (and, with --tls, the TLS handshake done). */
static void send_request(long slot) {
    conn_t *c = &conns[slot];
    ssize_t w = conn_write(c, request, request_len);
    if (w != (ssize_t)request_len) {
        if (mode == M_CONNECT_RATE) cr_fail_connect++;
        else {
            n_failed++;
            n_handshake_fail++;
        }
        conn_close(c, 0);
        if (mode != M_CONNECT_RATE) maybe_ready();
        return;
    }
    c->state = S_HANDSHAKE;
    set_events(c, slot, EPOLLIN);
}

/* ---- reports ---- */

static void print_latency(FILE *o, const hist_t *h) {
    fprintf(o,
            "{\"count\":%" PRIu64 ",\"mean\":%.3f,\"p50\":%.3f,\"p90\":%.3f,\"p99\":%.3f,"
            "\"p999\":%.3f,\"max\":%.3f}",
            h->count, h->count ? h->sum / (double)h->count / 1000.0 : 0.0, hpct(h, 50) / 1000.0,
            hpct(h, 90) / 1000.0, hpct(h, 99) / 1000.0, hpct(h, 99.9) / 1000.0,
            (double)h->max / 1000.0);
}

static void report(const char *event) {
    uint64_t fmin = UINT64_MAX, fmax = 0, zero = 0;
    long counted = 0;
    for (long i = 0; i < nslots; i++) {
        conn_t *c = &conns[i];
        if (c->state != S_OPEN && !c->counted_closed) continue;
        counted++;
        if (c->frames < fmin) fmin = c->frames;
        if (c->frames > fmax) fmax = c->frames;
        if (!c->frames) zero++;
    }
    if (!counted) fmin = 0;
    FILE *o = stdout;
    fprintf(o,
            "{\"event\":\"%s\",\"mode\":\"%s\",\"connections\":%ld,\"open\":%ld,\"failed\":%ld,"
            "\"failed_handshake\":%ld,\"failed_non101\":%ld,\"failed_timeout\":%ld,"
            "\"subscribed\":%ld,\"closed_by_server\":%ld,\"closed_frame\":%ld,\"closed_eof\":%ld,"
            "\"closed_reset\":%ld,\"frames\":%" PRIu64 ",\"frames_min\":%" PRIu64
            ",\"frames_max\":%" PRIu64 ",\"conns_without_frames\":%" PRIu64
            ",\"other_frames\":%" PRIu64 ",\"pings\":%" PRIu64 ",\"bytes\":%" PRIu64
            ",\"first_frame_ns\":%" PRId64 ",\"last_frame_ns\":%" PRId64 ",\"now_ns\":%" PRId64
            ",\"ready_seconds\":%.3f,\"latency_ms\":",
            event, mode == M_IDLE ? "idle" : "subscribe", nconns, n_open, n_failed,
            n_handshake_fail, n_non101, n_timeout, n_subscribed,
            n_closed_frame + n_eof + n_reset, n_closed_frame, n_eof, n_reset, frames_total, fmin,
            fmax, zero, other_frames, pings, bytes_total, first_frame_ns, last_frame_ns,
            now_real(), ready_ns ? (double)(ready_ns - t0_ns) / 1e9 : -1.0);
    print_latency(o, &lat);
    fprintf(o,
            ",\"seq\":{\"gaps\":%" PRIu64 ",\"missing\":%" PRIu64 ",\"out_of_order\":%" PRIu64
            "},\"frames_without_t\":%" PRIu64 "}\n",
            seq_gaps, seq_missing, seq_ooo, no_ts);
    fflush(o);
}

static void reset_counters(void) {
    frames_total = other_frames = pings = bytes_total = seq_gaps = seq_missing = seq_ooo = 0;
    no_ts = 0;
    first_frame_ns = last_frame_ns = 0;
    memset(&lat, 0, sizeof lat);
    for (long i = 0; i < nslots; i++) {
        conns[i].frames = 0;
        conns[i].last_s = 0;
    }
}

static void maybe_ready(void) {
    if (ready_printed) return;
    if (n_started < nconns) return;
    if (n_open + n_failed + n_closed_frame + n_eof + n_reset < nconns) return;
    if (mode == M_SUBSCRIBE && n_subscribed < n_open) return;
    ready_printed = 1;
    ready_ns = now_mono();
    report("ready");
}

/* ---- stdin commands ---- */
static char cmdbuf[4096];
static size_t cmdlen;

static int on_stdin(void) {
    /* returns 1 to stop */
    ssize_t r = read(0, cmdbuf + cmdlen, sizeof cmdbuf - 1 - cmdlen);
    if (r <= 0) {
        if (r < 0 && (errno == EAGAIN || errno == EINTR)) return 0;
        return 1;
    }
    cmdlen += (size_t)r;
    char *nl;
    while ((nl = memchr(cmdbuf, '\n', cmdlen))) {
        *nl = 0;
        char *line = cmdbuf;
        int stop = 0;
        if (!strcmp(line, "report")) report("report");
        else if (!strcmp(line, "reset")) reset_counters();
        else if (!strcmp(line, "quit")) stop = 1;
        size_t used = (size_t)(nl + 1 - cmdbuf);
        memmove(cmdbuf, nl + 1, cmdlen - used);
        cmdlen -= used;
        if (stop) return 1;
    }
    if (cmdlen >= sizeof cmdbuf - 1) cmdlen = 0;
    return 0;
}

/* ---- main loops ---- */

static void build_request(void) {
    char target[6144];
    if (streams[0]) {
        snprintf(target, sizeof target, "%s%sstream=%s", path, strchr(path, '?') ? "&" : "?",
                 streams);
    } else {
        snprintf(target, sizeof target, "%s", path);
    }
    request_len = (size_t)snprintf(
        request, sizeof request,
        "GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n%s%s\r\n",
        target, host, port, extra_header ? extra_header : "", extra_header ? "\r\n" : "");
}

static int run_subscribe(void) {
    nslots = nconns;
    conns = calloc((size_t)nslots, sizeof *conns);
    for (long i = 0; i < nslots; i++) conns[i].fd = -1;
    struct epoll_event evs[MAX_EVENTS];
    if (use_stdin) {
        fcntl(0, F_SETFL, fcntl(0, F_GETFL) | O_NONBLOCK);
        struct epoll_event ev = {.events = EPOLLIN, .data.u64 = UINT64_MAX};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, 0, &ev) != 0) use_stdin = 0; /* e.g. a regular file */
    }
    t0_ns = now_mono();
    int64_t next_timeout_check = t0_ns + 1000000000LL;
    while (!stop_flag) {
        /* keep at most `inflight` handshakes going */
        long pending = n_started - (n_open + n_failed + n_closed_frame + n_eof + n_reset);
        while (n_started < nconns && pending < inflight) {
            if (conn_start(n_started) != 0) {
                n_failed++;
                n_handshake_fail++;
                if (n_failed <= 3) fprintf(stderr, "loadclient: socket/connect: %s\n",
                                           strerror(errno));
            }
            n_started++;
            pending++;
        }
        maybe_ready();
        int timeout = 100;
        int n = epoll_wait(ep, evs, MAX_EVENTS, timeout);
        if (n < 0 && errno != EINTR) {
            perror("epoll_wait");
            break;
        }
        for (int i = 0; i < n; i++) {
            uint64_t slot = evs[i].data.u64;
            if (slot == UINT64_MAX) {
                if (on_stdin()) stop_flag = 1;
                continue;
            }
            conn_t *c = &conns[slot];
            if (c->fd < 0) continue;
            if (c->state == S_CONNECTING) {
                if (evs[i].events & (EPOLLOUT | EPOLLERR | EPOLLHUP)) on_writable((long)slot);
                continue;
            }
            if (c->state == S_TLS) {
                tls_step((long)slot);
                continue;
            }
            if (evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) on_readable((long)slot);
        }
        int64_t now = now_mono();
        if (now >= next_timeout_check) {
            next_timeout_check = now + 1000000000LL;
            for (long i = 0; i < n_started; i++) {
                conn_t *c = &conns[i];
                if ((c->state == S_CONNECTING || c->state == S_TLS || c->state == S_HANDSHAKE) &&
                    c->fd >= 0 &&
                    now - c->started_ns > HANDSHAKE_TIMEOUT_NS) {
                    n_failed++;
                    n_timeout++;
                    conn_close(c, 1);
                }
            }
            maybe_ready();
            if (!ready_printed && now - t0_ns > (int64_t)(ready_timeout * 1e9)) {
                fprintf(stderr, "loadclient: not ready after %.0f s\n", ready_timeout);
                report("ready_timeout");
                ready_printed = 1;
                ready_ns = now;
            }
        }
        if (duration > 0 && ready_ns && now - ready_ns > (int64_t)(duration * 1e9)) break;
    }
    report("final");
    return 0;
}

static int run_connect_rate(void) {
    nslots = concurrency;
    conns = calloc((size_t)nslots, sizeof *conns);
    for (long i = 0; i < nslots; i++) {
        conns[i].fd = -1;
        conns[i].state = S_DONE;
    }
    struct epoll_event evs[MAX_EVENTS];
    if (duration <= 0) duration = 5;
    int64_t start = now_mono();
    int64_t deadline = start + (int64_t)(duration * 1e9);
    int64_t next_timeout_check = start + 1000000000LL;
    uint64_t attempts = 0;
    while (!stop_flag) {
        int64_t now = now_mono();
        if (now >= deadline) break;
        int restarted_fail = 0;
        for (long i = 0; i < nslots; i++) {
            if (conns[i].state == S_DONE) {
                attempts++;
                if (conn_start(i) != 0) {
                    cr_fail_connect++;
                    restarted_fail = 1;
                }
            }
        }
        int n = epoll_wait(ep, evs, MAX_EVENTS, restarted_fail ? 1 : 50);
        if (n < 0 && errno != EINTR) {
            perror("epoll_wait");
            break;
        }
        for (int i = 0; i < n; i++) {
            long slot = (long)evs[i].data.u64;
            conn_t *c = &conns[slot];
            if (c->fd < 0) continue;
            if (c->state == S_CONNECTING) {
                if (evs[i].events & (EPOLLOUT | EPOLLERR | EPOLLHUP)) on_writable(slot);
                continue;
            }
            if (c->state == S_TLS) {
                tls_step(slot);
                continue;
            }
            if (evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) on_readable(slot);
        }
        now = now_mono();
        if (now >= next_timeout_check) {
            next_timeout_check = now + 1000000000LL;
            for (long i = 0; i < nslots; i++) {
                conn_t *c = &conns[i];
                if (c->fd >= 0 && c->state != S_DONE && now - c->started_ns > HANDSHAKE_TIMEOUT_NS) {
                    if (c->state != S_CLOSING) cr_timeout++;
                    conn_close(c, 1);
                }
            }
        }
    }
    double secs = (double)(now_mono() - start) / 1e9;
    for (long i = 0; i < nslots; i++)
        if (conns[i].fd >= 0) conn_close(&conns[i], 1);
    uint64_t fails =
        cr_fail_connect + cr_fail_reset + cr_fail_eof + cr_fail_status + cr_timeout + cr_fail_tls;
    printf("{\"event\":\"final\",\"mode\":\"connect-rate\",\"seconds\":%.3f,\"concurrency\":%ld,"
           "\"close\":\"%s\",\"attempts\":%" PRIu64 ",\"upgrades\":%" PRIu64
           ",\"upgrades_per_s\":%.1f,\"failures\":%" PRIu64 ",\"fail_connect\":%" PRIu64
           ",\"fail_reset\":%" PRIu64 ",\"fail_eof\":%" PRIu64 ",\"fail_status\":%" PRIu64
           ",\"fail_timeout\":%" PRIu64 ",\"fail_tls\":%" PRIu64 ",\"tls\":%s,\"upgrade_ms\":",
           secs, concurrency, close_ws ? "ws" : "rst", attempts, cr_ok, (double)cr_ok / secs, fails,
           cr_fail_connect, cr_fail_reset, cr_fail_eof, cr_fail_status, cr_timeout, cr_fail_tls,
           use_tls ? "true" : "false");
    print_latency(stdout, &lat);
    printf("}\n");
    fflush(stdout);
    return 0;
}

static void usage(void) {
    fprintf(stderr,
            "usage: loadclient subscribe|idle|connect-rate [options]\n"
            "  --host H (127.0.0.1)  --port P (8080)  --path /public\n"
            "  --stream S            stream to subscribe (repeat or comma list)\n"
            "  --connections N       subscribe/idle: connections to open (1000)\n"
            "  --inflight K          subscribe/idle: handshakes at a time (500)\n"
            "  --concurrency C       connect-rate: connections cycling at once (100)\n"
            "  --duration D          seconds (subscribe: after ready; connect-rate: total)\n"
            "  --src-ips K           spread source addresses over 127.0.0.1..K\n"
            "  --close ws|rst        connect-rate: close handshake or abort (ws)\n"
            "  --header 'Name: v'    extra request header (e.g. Authorization)\n"
            "  --send-frames N       once open: a subscribe frame, then N-1 text pings\n"
            "  --tls                 wss:// (no certificate verification, no resumption)\n"
            "  --no-stdin            do not read commands from stdin\n"
            "  --ready-timeout S     give up waiting for all connections (120)\n");
    exit(2);
}

int main(int argc, char **argv) {
    if (argc < 2) usage();
    if (!strcmp(argv[1], "subscribe")) mode = M_SUBSCRIBE;
    else if (!strcmp(argv[1], "idle")) mode = M_IDLE;
    else if (!strcmp(argv[1], "connect-rate")) mode = M_CONNECT_RATE;
    else usage();
    static struct option opts[] = {
        {"host", 1, 0, 'h'},        {"port", 1, 0, 'p'},          {"path", 1, 0, 'P'},
        {"stream", 1, 0, 's'},      {"connections", 1, 0, 'n'},   {"inflight", 1, 0, 'i'},
        {"concurrency", 1, 0, 'c'}, {"duration", 1, 0, 'd'},      {"src-ips", 1, 0, 'S'},
        {"close", 1, 0, 'C'},       {"header", 1, 0, 'H'},        {"no-stdin", 0, 0, 'N'},
        {"ready-timeout", 1, 0, 'R'}, {"send-frames", 1, 0, 'F'}, {"tls", 0, 0, 'T'},
        {0, 0, 0, 0}};
    int o;
    optind = 2;
    while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (o) {
        case 'h': host = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 'P': path = optarg; break;
        case 's':
            if (streams[0]) strncat(streams, ",", sizeof streams - strlen(streams) - 1);
            strncat(streams, optarg, sizeof streams - strlen(streams) - 1);
            break;
        case 'n': nconns = atol(optarg); break;
        case 'i': inflight = atol(optarg); break;
        case 'c': concurrency = atol(optarg); break;
        case 'd': duration = atof(optarg); break;
        case 'S': src_ips = atoi(optarg) > 0 ? atoi(optarg) : 1; break;
        case 'C': close_ws = strcmp(optarg, "rst") != 0; break;
        case 'H': extra_header = optarg; break;
        case 'F': send_frames = atoi(optarg); break;
        case 'N': use_stdin = 0; break;
        case 'T': use_tls = 1; break;
        case 'R': ready_timeout = atof(optarg); break;
        default: usage();
        }
    }
    server_addr.sin_family = AF_INET;
    server_addr.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &server_addr.sin_addr) != 1) {
        fprintf(stderr, "loadclient: --host must be an IPv4 address\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    struct sigaction sa = {0};
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    raise_nofile((mode == M_CONNECT_RATE ? concurrency : nconns) + 64);
    rbuf = malloc(RBUF_SIZE);
    if (use_tls) {
        tls_ctx = SSL_CTX_new(TLS_client_method());
        if (!tls_ctx) abort();
        SSL_CTX_set_verify(tls_ctx, SSL_VERIFY_NONE, NULL);
        SSL_CTX_set_session_cache_mode(tls_ctx, SSL_SESS_CACHE_OFF);
        SSL_CTX_set_options(tls_ctx, SSL_OP_IGNORE_UNEXPECTED_EOF);
        /* one read() for several records; partial writes are never retried here */
        SSL_CTX_set_read_ahead(tls_ctx, 1);
        SSL_CTX_set_mode(tls_ctx, SSL_MODE_ENABLE_PARTIAL_WRITE |
                                      SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    }
    ep = epoll_create1(EPOLL_CLOEXEC);
    build_request();
    if (mode == M_CONNECT_RATE) return run_connect_rate();
    return run_subscribe();
}
