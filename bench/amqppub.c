/*
 * amqppub: a minimal, fast AMQP 0-9-1 publisher for Rango benchmarks.
 *
 * One file, plain C, libc only. Built by bench/run.py with
 * `cc -O2 -o bench/out/amqppub bench/amqppub.c`.
 *
 * Connects (PLAIN auth), opens channel 1, declares the topic exchange as Rango
 * and the trading engine do (non-durable), publishes --events messages to
 * --key at --rate messages per second (0: as fast as the broker takes them),
 * closes the connection (connection.close-ok means the broker has taken every
 * publish) and prints one JSON line.
 *
 * Each body is JSON of exactly --size bytes: {"t":<unix ns>,"s":<seq>,"p":"xxx..."}
 * (--book: the padding is order-book-like levels, "1002.31 17.0402,...", that
 * deflate about as real book snapshots do)
 * where t is CLOCK_REALTIME when the message is written to the socket buffer and s
 * counts from --seq-start (1). Messages due at the same moment go out in one write.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static const char *host = "127.0.0.1";
static int port = 5672;
static const char *user = "guest", *pass = "guest", *vhost = "/";
static const char *exchange = "peatio.events.ranger";
static const char *routing_key = "public.bench.trades";
static long long events = 1000;
static double rate = 0;
static int body_size = 100;
static int book_pad = 0; /* --book: pad with order-book levels instead of 'x' */
static uint32_t lcg = 12345;
static long long seq_start = 1;
static int batch_max = 256;

static int fd;
static uint32_t frame_max = 131072;
static uint16_t heartbeat;

typedef struct {
    uint8_t *p;
    size_t len, cap;
} buf_t;

static void die(const char *msg) {
    fprintf(stderr, "amqppub: %s\n", msg);
    exit(1);
}
static void need(buf_t *b, size_t n) {
    if (b->len + n <= b->cap) return;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + n) cap *= 2;
    b->p = realloc(b->p, cap);
    if (!b->p) die("out of memory");
    b->cap = cap;
}
static void put8(buf_t *b, uint8_t v) {
    need(b, 1);
    b->p[b->len++] = v;
}
static void put16(buf_t *b, uint16_t v) {
    put8(b, (uint8_t)(v >> 8));
    put8(b, (uint8_t)v);
}
static void put32(buf_t *b, uint32_t v) {
    put16(b, (uint16_t)(v >> 16));
    put16(b, (uint16_t)v);
}
static void put64(buf_t *b, uint64_t v) {
    put32(b, (uint32_t)(v >> 32));
    put32(b, (uint32_t)v);
}
static void putmem(buf_t *b, const void *p, size_t n) {
    need(b, n);
    memcpy(b->p + b->len, p, n);
    b->len += n;
}
static void putshort(buf_t *b, const char *s) {
    size_t n = strlen(s);
    if (n > 255) die("short string too long");
    put8(b, (uint8_t)n);
    putmem(b, s, n);
}

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

static void write_all(const uint8_t *p, size_t n) {
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            perror("amqppub: write");
            exit(1);
        }
        p += w;
        n -= (size_t)w;
    }
}

static void read_exact(uint8_t *p, size_t n) {
    while (n) {
        ssize_t r = read(fd, p, n);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) die("connection closed by the broker");
        p += r;
        n -= (size_t)r;
    }
}

/* Append a frame (type, channel 0/1) around payload. */
static void frame(buf_t *out, uint8_t type, uint16_t channel, const buf_t *payload) {
    put8(out, type);
    put16(out, channel);
    put32(out, (uint32_t)payload->len);
    putmem(out, payload->p, payload->len);
    put8(out, 0xCE);
}

static void send_method(uint16_t channel, buf_t *payload) {
    buf_t out = {0};
    frame(&out, 1, channel, payload);
    write_all(out.p, out.len);
    free(out.p);
    payload->len = 0;
}

/* Read one frame; return its type; payload in *pl (reused). */
static uint8_t read_frame(buf_t *pl, uint16_t *channel) {
    uint8_t h[7];
    read_exact(h, 7);
    uint32_t size = ((uint32_t)h[3] << 24) | ((uint32_t)h[4] << 16) | ((uint32_t)h[5] << 8) | h[6];
    *channel = (uint16_t)((h[1] << 8) | h[2]);
    pl->len = 0;
    need(pl, size + 1);
    read_exact(pl->p, size + 1);
    if (pl->p[size] != 0xCE) die("bad frame end");
    pl->len = size;
    return h[0];
}

static void describe_close(const buf_t *pl) {
    /* class 10/20, method 50/40: reply-code short, reply-text shortstr */
    if (pl->len < 7) die("closed by the broker");
    unsigned code = (unsigned)((pl->p[4] << 8) | pl->p[5]);
    unsigned tl = pl->p[6];
    fprintf(stderr, "amqppub: closed by the broker: %u %.*s\n", code, (int)tl, pl->p + 7);
    exit(1);
}

/* Wait for the method (cls, mth), ignoring heartbeats; die on close. */
static void expect_method(uint16_t cls, uint16_t mth, buf_t *pl) {
    for (;;) {
        uint16_t ch;
        uint8_t type = read_frame(pl, &ch);
        if (type == 8) continue;
        if (type != 1 || pl->len < 4) die("unexpected frame from the broker");
        uint16_t c = (uint16_t)((pl->p[0] << 8) | pl->p[1]);
        uint16_t m = (uint16_t)((pl->p[2] << 8) | pl->p[3]);
        if (c == cls && m == mth) return;
        if ((c == 10 && m == 50) || (c == 20 && m == 40)) describe_close(pl);
        fprintf(stderr, "amqppub: ignoring method %u.%u\n", c, m);
    }
}

/* Drain whatever the broker sent meanwhile (heartbeats; a close is fatal). */
static void poll_broker(buf_t *pl) {
    struct pollfd p = {.fd = fd, .events = POLLIN};
    while (poll(&p, 1, 0) > 0 && (p.revents & (POLLIN | POLLHUP | POLLERR))) {
        uint16_t ch;
        uint8_t type = read_frame(pl, &ch);
        if (type == 1 && pl->len >= 4) {
            uint16_t c = (uint16_t)((pl->p[0] << 8) | pl->p[1]);
            uint16_t m = (uint16_t)((pl->p[2] << 8) | pl->p[3]);
            if ((c == 10 && m == 50) || (c == 20 && m == 40)) describe_close(pl);
        }
    }
}

static void handshake(void) {
    buf_t pl = {0}, m = {0};
    write_all((const uint8_t *)"AMQP\x00\x00\x09\x01", 8);
    expect_method(10, 10, &pl); /* connection.start */
    /* connection.start-ok */
    put16(&m, 10);
    put16(&m, 11);
    put32(&m, 0); /* client-properties: empty table */
    putshort(&m, "PLAIN");
    size_t ul = strlen(user), pw = strlen(pass);
    put32(&m, (uint32_t)(ul + pw + 2));
    put8(&m, 0);
    putmem(&m, user, ul);
    put8(&m, 0);
    putmem(&m, pass, pw);
    putshort(&m, "en_US");
    send_method(0, &m);
    expect_method(10, 30, &pl); /* connection.tune */
    if (pl.len < 12) die("short tune");
    uint16_t channel_max = (uint16_t)((pl.p[4] << 8) | pl.p[5]);
    uint32_t fmax = ((uint32_t)pl.p[6] << 24) | ((uint32_t)pl.p[7] << 16) |
                    ((uint32_t)pl.p[8] << 8) | pl.p[9];
    heartbeat = (uint16_t)((pl.p[10] << 8) | pl.p[11]);
    if (fmax) frame_max = fmax;
    put16(&m, 10);
    put16(&m, 31);
    put16(&m, channel_max);
    put32(&m, frame_max);
    put16(&m, heartbeat);
    send_method(0, &m);
    put16(&m, 10);
    put16(&m, 40);
    putshort(&m, vhost);
    putshort(&m, "");
    put8(&m, 0);
    send_method(0, &m);
    expect_method(10, 41, &pl); /* open-ok */
    put16(&m, 20);
    put16(&m, 10);
    putshort(&m, "");
    send_method(1, &m);
    expect_method(20, 11, &pl); /* channel.open-ok */
    /* exchange.declare: topic, not durable, not auto-delete (as Rango declares it) */
    put16(&m, 40);
    put16(&m, 10);
    put16(&m, 0);
    putshort(&m, exchange);
    putshort(&m, "topic");
    put8(&m, 0);
    put32(&m, 0);
    send_method(1, &m);
    expect_method(40, 11, &pl);
    free(pl.p);
    free(m.p);
}

int main(int argc, char **argv) {
    static struct option opts[] = {{"host", 1, 0, 'h'},     {"port", 1, 0, 'p'},
                                   {"user", 1, 0, 'u'},     {"password", 1, 0, 'w'},
                                   {"vhost", 1, 0, 'v'},    {"exchange", 1, 0, 'x'},
                                   {"key", 1, 0, 'k'},      {"events", 1, 0, 'n'},
                                   {"rate", 1, 0, 'r'},     {"size", 1, 0, 'z'},
                                   {"seq-start", 1, 0, 's'}, {"batch", 1, 0, 'b'},
                                   {"book", 0, 0, 'B'},      {0, 0, 0, 0}};
    int o;
    while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (o) {
        case 'h': host = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 'u': user = optarg; break;
        case 'w': pass = optarg; break;
        case 'v': vhost = optarg; break;
        case 'x': exchange = optarg; break;
        case 'k': routing_key = optarg; break;
        case 'n': events = atoll(optarg); break;
        case 'r': rate = atof(optarg); break;
        case 'z': body_size = atoi(optarg); break;
        case 's': seq_start = atoll(optarg); break;
        case 'b': batch_max = atoi(optarg) > 0 ? atoi(optarg) : 1; break;
        case 'B': book_pad = 1; break;
        default:
            fprintf(stderr,
                    "usage: amqppub [--host H] [--port P] [--user U] [--password W] [--vhost V]\n"
                    "  --exchange X --key RK --events N [--rate R (0: max)] [--size 100]\n"
                    "  [--seq-start 1] [--batch 256] [--book]\n");
            return 2;
        }
    }
    if (body_size < 48) body_size = 48;
    signal(SIGPIPE, SIG_IGN);
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &a.sin_addr) != 1) die("--host must be an IPv4 address");
    fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        perror("amqppub: connect");
        return 1;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    handshake();

    /* Pre-build the constant parts of one message: method frame, header frame. */
    buf_t method = {0}, mp = {0};
    put16(&mp, 60);
    put16(&mp, 40);
    put16(&mp, 0);
    putshort(&mp, exchange);
    putshort(&mp, routing_key);
    put8(&mp, 0);
    frame(&method, 1, 1, &mp);
    buf_t header = {0}, hp = {0};
    put16(&hp, 60);
    put16(&hp, 0);
    put64(&hp, (uint64_t)body_size);
    put16(&hp, 0);
    frame(&header, 2, 1, &hp);
    size_t msg_len = method.len + header.len + 7 + (size_t)body_size + 1;

    buf_t out = {0}, in = {0};
    need(&out, msg_len * (size_t)batch_max);
    char body[65536];
    if (body_size > (int)sizeof body - 1) die("--size too large");

    long long sent = 0;
    int64_t start = now_mono();
    int64_t first_ns = 0, last_ns = 0;
    int64_t last_io = start;
    while (sent < events) {
        long long n;
        if (rate > 0) {
            int64_t now = now_mono();
            long long due = (long long)((double)(now - start) * rate / 1e9) + 1;
            if (due > events) due = events;
            if (due <= sent) {
                int64_t at = start + (int64_t)((double)sent * 1e9 / rate);
                struct timespec ts = {.tv_sec = at / 1000000000LL, .tv_nsec = at % 1000000000LL};
                clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
                continue;
            }
            n = due - sent;
            if (n > batch_max) n = batch_max;
        } else {
            n = events - sent;
            if (n > batch_max) n = batch_max;
        }
        out.len = 0;
        int64_t t = now_real();
        for (long long i = 0; i < n; i++) {
            int len = snprintf(body, sizeof body, "{\"t\":%" PRId64 ",\"s\":%lld,\"p\":\"", t,
                               seq_start + sent + i);
            int pad = body_size - len - 2;
            if (pad < 0) die("--size too small");
            memset(body + len, 'x', (size_t)pad);
            if (book_pad) {
                /* Levels like an order book's, prices walking, amounts varied:
                 * compresses about as real snapshots do (not as 'x' does). */
                int at = len, price = 100000 + (int)(lcg % 1000);
                while (at + 24 < len + pad) {
                    lcg = lcg * 1103515245u + 12345u;
                    price += 1 + (int)((lcg >> 16) % 3);
                    at += snprintf(body + at, 24, "%d.%02d %u.%04u,", price / 100, price % 100,
                                   (lcg >> 8) % 50, (lcg >> 4) % 10000);
                }
                body[at] = 'x'; /* snprintf's NUL: the rest stays 'x' */
            }
            memcpy(body + len + pad, "\"}", 2);
            putmem(&out, method.p, method.len);
            putmem(&out, header.p, header.len);
            put8(&out, 3);
            put16(&out, 1);
            put32(&out, (uint32_t)body_size);
            putmem(&out, body, (size_t)body_size);
            put8(&out, 0xCE);
        }
        if (!first_ns) first_ns = t;
        write_all(out.p, out.len);
        last_ns = now_real();
        sent += n;
        int64_t now = now_mono();
        if (now - last_io > 200000000LL) { /* every 200 ms: heartbeats, errors */
            poll_broker(&in);
            last_io = now;
        }
    }
    int64_t end_pub = now_mono();
    /* connection.close; close-ok comes after the broker has handled every publish */
    buf_t m = {0};
    put16(&m, 10);
    put16(&m, 50);
    put16(&m, 200);
    putshort(&m, "bye");
    put16(&m, 0);
    put16(&m, 0);
    send_method(0, &m);
    for (;;) {
        uint16_t ch;
        uint8_t type = read_frame(&in, &ch);
        if (type != 1 || in.len < 4) continue;
        uint16_t c = (uint16_t)((in.p[0] << 8) | in.p[1]);
        uint16_t mm = (uint16_t)((in.p[2] << 8) | in.p[3]);
        if (c == 10 && mm == 51) break;
        if (c == 10 && mm == 50) describe_close(&in);
        if (c == 20 && mm == 40) describe_close(&in);
    }
    int64_t close_ok_ns = now_real();
    close(fd);
    double secs = (double)(end_pub - start) / 1e9;
    printf("{\"published\":%lld,\"first_ns\":%" PRId64 ",\"last_ns\":%" PRId64
           ",\"close_ok_ns\":%" PRId64 ",\"seconds\":%.6f,\"rate\":%.1f,\"target_rate\":%.1f,"
           "\"size\":%d,\"key\":\"%s\",\"heartbeat\":%u}\n",
           sent, first_ns, last_ns, close_ok_ns, secs, secs > 0 ? (double)sent / secs : 0.0, rate,
           body_size, routing_key, heartbeat);
    return 0;
}
