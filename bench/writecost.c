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
 * usage: writecost N ROUNDS GAP_US SIZE
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
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

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: writecost N ROUNDS GAP_US SIZE\n");
        return 2;
    }
    int n = atoi(argv[1]), rounds = atoi(argv[2]), gap_us = atoi(argv[3]), size = atoi(argv[4]);
    if (n < 1 || rounds < 1 || size < 1 || size > 65536) return 2;
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
        long total = 0, reads = 0;
        while (total < want) {
            int k = epoll_wait(ep, ev, 1024, 5000);
            if (k <= 0) break;
            for (int j = 0; j < k; j++) {
                ssize_t r = read(ev[j].data.fd, buf, sizeof buf);
                if (r > 0) total += r, reads++;
            }
        }
        struct rusage ru;
        getrusage(RUSAGE_SELF, &ru);
        shared[0] = secs(ru.ru_utime) + secs(ru.ru_stime);
        shared[1] = (double)reads;
        _exit(0);
    }
    char *msg = malloc((size_t)size);
    memset(msg, 'x', (size_t)size);
    struct rusage r0, r1;
    struct timespec t0, t1;
    getrusage(RUSAGE_SELF, &r0);
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int r = 0; r < rounds; r++) {
        for (int i = 0; i < n; i++)
            if (write(sv[i], msg, (size_t)size) != size) perror("write");
        if (gap_us) usleep((useconds_t)gap_us);
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    getrusage(RUSAGE_SELF, &r1);
    waitpid(pid, NULL, 0);
    double user = secs(r1.ru_utime) - secs(r0.ru_utime), sys = secs(r1.ru_stime) - secs(r0.ru_stime);
    long writes = (long)n * rounds;
    printf("{\"sockets\":%d,\"rounds\":%d,\"gap_us\":%d,\"size\":%d,\"writes\":%ld,"
           "\"writer_user_s\":%.3f,\"writer_system_s\":%.3f,\"us_per_write\":%.3f,"
           "\"reader_cpu_s\":%.3f,\"reader_reads\":%.0f,\"us_reader_per_write\":%.3f,"
           "\"wall_s\":%.3f}\n",
           n, rounds, gap_us, size, writes, user, sys, (user + sys) / (double)writes * 1e6, shared[0],
           shared[1], shared[0] / (double)writes * 1e6,
           (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9);
    return 0;
}
