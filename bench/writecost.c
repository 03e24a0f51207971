/*
 * writecost: what one small loopback TCP write() costs on this machine.
 *
 * Opens N connected loopback TCP socket pairs, forks a reader that drains the
 * client ends with epoll (like bench/loadclient), and writes --size bytes to
 * each server end in turn, --rounds times, --gap-us apart. Prints one JSON line
 * with the writer's CPU per write() — the floor under any server that sends one
 * frame per write — and the reader's CPU per byte. Built and run by
 * `bench/run.py calibrate`; plain C, libc only.
 *
 * Rounds start GAP_US apart (a fixed schedule, like events published at a fixed
 * rate). Each message carries its round's start time, and the reader records
 * receive time minus that for every message: the latency floor of the latency row
 * (a server with no work of its own and no broker hop, writing each client in
 * turn, read by an epoll client on the same cores).
 *
 * usage: writecost N ROUNDS GAP_US SIZE
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <stdint.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double secs(struct timeval tv) { return (double)tv.tv_sec + (double)tv.tv_usec / 1e6; }

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

#define HIST_US 1000000 /* 1 µs buckets up to 1 s */

static double percentile(const uint32_t *hist, long count, double p) {
    long rank = (long)((double)count * p / 100.0), seen = 0;
    for (long i = 0; i < HIST_US; i++) {
        seen += hist[i];
        if (seen > rank) return (double)i / 1000.0;
    }
    return (double)HIST_US / 1000.0;
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: writecost N ROUNDS GAP_US SIZE\n");
        return 2;
    }
    int n = atoi(argv[1]), rounds = atoi(argv[2]), gap_us = atoi(argv[3]), size = atoi(argv[4]);
    if (n < 1 || rounds < 1 || size < 8 || size > 65536) return 2;
    struct rlimit rl = {(rlim_t)(2 * n + 64), (rlim_t)(2 * n + 64)};
    setrlimit(RLIMIT_NOFILE, &rl);
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(0x7f000001);
    if (bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 4096)) {
        perror("listen");
        return 1;
    }
    socklen_t l = sizeof a;
    getsockname(ls, (struct sockaddr *)&a, &l);
    int *cl = malloc((size_t)n * sizeof(int)), *sv = malloc((size_t)n * sizeof(int)), one = 1;
    for (int i = 0; i < n; i++) {
        cl[i] = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(cl[i], (struct sockaddr *)&a, sizeof a)) {
            perror("connect");
            return 1;
        }
        sv[i] = accept(ls, 0, 0);
        setsockopt(sv[i], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    double *shared = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    long want = (long)n * rounds * size;
    pid_t pid = fork();
    if (pid == 0) {
        int ep = epoll_create1(0);
        for (int i = 0; i < n; i++) {
            struct epoll_event e = {.events = EPOLLIN, .data.fd = cl[i]};
            epoll_ctl(ep, EPOLL_CTL_ADD, cl[i], &e);
        }
        static char buf[1 << 16];
        struct epoll_event ev[1024];
        uint32_t *hist = calloc(HIST_US, sizeof *hist);
        long total = 0, reads = 0, count = 0;
        /* Messages are read whole or several at once: a message never straddles
           two reads when the reader keeps up, and any remainder is skipped. */
        while (total < want) {
            int k = epoll_wait(ep, ev, 1024, 5000);
            if (k <= 0) break;
            for (int j = 0; j < k; j++) {
                ssize_t r = read(ev[j].data.fd, buf, sizeof buf);
                if (r <= 0) continue;
                total += r, reads++;
                int64_t now = now_ns();
                for (ssize_t off = 0; off + size <= r; off += size) {
                    int64_t sent;
                    memcpy(&sent, buf + off, sizeof sent);
                    int64_t us = (now - sent) / 1000;
                    hist[us < 0 ? 0 : us >= HIST_US ? HIST_US - 1 : us]++;
                    count++;
                }
            }
        }
        struct rusage ru;
        getrusage(RUSAGE_SELF, &ru);
        shared[0] = secs(ru.ru_utime) + secs(ru.ru_stime);
        shared[1] = (double)reads;
        shared[2] = percentile(hist, count, 50);
        shared[3] = percentile(hist, count, 99);
        shared[4] = percentile(hist, count, 99.9);
        _exit(0);
    }
    char *msg = malloc((size_t)size);
    memset(msg, 'x', (size_t)size);
    struct rusage r0, r1;
    struct timespec t0, t1;
    getrusage(RUSAGE_SELF, &r0);
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int64_t start = now_ns();
    for (int r = 0; r < rounds; r++) {
        int64_t due = start + (int64_t)r * gap_us * 1000;
        int64_t wait = due - now_ns();
        if (wait > 0) {
            struct timespec ts = {wait / 1000000000LL, wait % 1000000000LL};
            nanosleep(&ts, NULL);
        }
        int64_t round_start = now_ns();
        memcpy(msg, &round_start, sizeof round_start);
        for (int i = 0; i < n; i++)
            if (write(sv[i], msg, (size_t)size) != size) perror("write");
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    getrusage(RUSAGE_SELF, &r1);
    waitpid(pid, NULL, 0);
    double user = secs(r1.ru_utime) - secs(r0.ru_utime), sys = secs(r1.ru_stime) - secs(r0.ru_stime);
    long writes = (long)n * rounds;
    printf("{\"sockets\":%d,\"rounds\":%d,\"gap_us\":%d,\"size\":%d,\"writes\":%ld,"
           "\"writer_user_s\":%.3f,\"writer_system_s\":%.3f,\"us_per_write\":%.3f,"
           "\"reader_cpu_s\":%.3f,\"reader_reads\":%.0f,\"us_reader_per_write\":%.3f,"
           "\"wall_s\":%.3f,\"latency_ms\":{\"p50\":%.3f,\"p99\":%.3f,\"p999\":%.3f}}\n",
           n, rounds, gap_us, size, writes, user, sys, (user + sys) / (double)writes * 1e6, shared[0],
           shared[1], shared[0] / (double)writes * 1e6,
           (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9, shared[2],
           shared[3], shared[4]);
    return 0;
}
