/*
 * icpload: a small ICPv2 (RFC 2186) load generator and fake neighbour, for
 * benchmarks/icp_bench.py.  Linux only; loopback only.
 *
 * Load mode (default):
 *
 *   icpload -s SRC_IP -d DST_IP:PORT -t SECONDS [-w WINDOW] [-W WARMUP]
 *           [-m hit|miss|mix] [-H HITFILE] [-p MISS_PREFIX] [-T LOST_MS]
 *
 *   Sends ICP QUERY datagrams from SRC_IP (an ephemeral port) to DST_IP:PORT
 *   and keeps WINDOW queries outstanding.  Replies are matched to queries by
 *   request number; a query unanswered after LOST_MS is counted as lost and
 *   its slot reused.  Hit queries cycle through the URLs of HITFILE (one a
 *   line); miss queries use a URL never sent before (MISS_PREFIX followed by
 *   a counter).  "mix" alternates hit and miss.  Replies that arrive during
 *   the first WARMUP seconds are not counted.  Prints one "key=value" line a
 *   field: sent, replies, lost, strays, seconds, qps, p50_us, p90_us,
 *   p99_us, max_us, and the reply count for each opcode (op_HIT, op_MISS...).
 *
 * Responder mode:
 *
 *   icpload -R -a FIRST_IP -n COUNT -P PORT [-t SECONDS]
 *
 *   Binds UDP and TCP port PORT on COUNT consecutive addresses starting at
 *   FIRST_IP (e.g. 127.0.1.1 .. 127.0.1.64).  Every ICP QUERY is answered
 *   with MISS (request number and URL echoed, version 2, no options).  TCP
 *   connections are accepted and closed at once (enough for a proxy's
 *   liveness probe).  Exits after SECONDS (default 3600) or on SIGTERM.
 *   Prints "ready" on stdout once every socket is bound, and
 *   "queries=N" (queries answered so far) on each SIGUSR1.
 *
 * Every loop is bounded in time.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define HEADER 20
#define MAX_URL 8192
#define MAX_DGRAM 16384
#define BATCH 64
#define HIST_US 1000000 /* 1 us buckets up to 1 s; later goes in the last */

enum { OP_QUERY = 1, OP_HIT = 2, OP_MISS = 3, OP_ERR = 4, OP_NOFETCH = 21, OP_DENIED = 22 };

static volatile sig_atomic_t stopping = 0;
static volatile sig_atomic_t reportWanted = 0;

static void onSignal(int sig) { (void)sig; stopping = 1; }
static void onReport(int sig) { (void)sig; reportWanted = 1; }

static void die(const char *what) {
    perror(what);
    exit(2);
}

static uint64_t nowNs(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void parseAddress(const char *text, struct sockaddr_in *out, int needPort) {
    char host[64];
    const char *colon = strrchr(text, ':');
    size_t n = colon ? (size_t)(colon - text) : strlen(text);
    if (n >= sizeof host) {
        fprintf(stderr, "bad address %s\n", text);
        exit(2);
    }
    memcpy(host, text, n);
    host[n] = 0;
    memset(out, 0, sizeof *out);
    out->sin_family = AF_INET;
    if (inet_pton(AF_INET, host, &out->sin_addr) != 1) {
        fprintf(stderr, "bad IPv4 address %s\n", host);
        exit(2);
    }
    if (colon) {
        out->sin_port = htons((uint16_t)atoi(colon + 1));
    } else if (needPort) {
        fprintf(stderr, "address %s needs a port\n", text);
        exit(2);
    }
}

static void put32(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

static uint32_t get32(const unsigned char *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

/* Write a QUERY for url into buf (at least HEADER + 4 + len + 1 bytes). */
static size_t buildQuery(unsigned char *buf, uint32_t reqnum, const char *url, size_t len) {
    size_t total = HEADER + 4 + len + 1;
    memset(buf, 0, HEADER + 4);
    buf[0] = OP_QUERY;
    buf[1] = 2;
    buf[2] = (unsigned char)(total >> 8);
    buf[3] = (unsigned char)total;
    put32(buf + 4, reqnum);
    memcpy(buf + HEADER + 4, url, len);
    buf[HEADER + 4 + len] = 0;
    return total;
}

/* ------------------------------------------------------------------ load */

typedef struct {
    uint64_t sentNs; /* 0: free */
    uint32_t reqnum;
} Slot;

static char **hitUrls;
static size_t *hitLens;
static size_t hitCount;

static void readHits(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) die(path);
    size_t cap = 1024;
    hitUrls = malloc(cap * sizeof *hitUrls);
    hitLens = malloc(cap * sizeof *hitLens);
    char line[MAX_URL + 2];
    while (fgets(line, sizeof line, f)) {
        size_t n = strcspn(line, "\r\n");
        if (n == 0) continue;
        line[n] = 0;
        if (hitCount == cap) {
            cap *= 2;
            hitUrls = realloc(hitUrls, cap * sizeof *hitUrls);
            hitLens = realloc(hitLens, cap * sizeof *hitLens);
        }
        hitUrls[hitCount] = strdup(line);
        hitLens[hitCount] = n;
        hitCount++;
    }
    fclose(f);
}

static int runLoad(int argc, char **argv) {
    const char *src = NULL, *dst = NULL, *hitFile = NULL, *mode = "miss";
    const char *missPrefix = "http://127.0.0.1/icpload/miss/";
    double seconds = 5, warmup = 0.5;
    int window = 64, lostMs = 500, opt;
    optind = 1;
    while ((opt = getopt(argc, argv, "s:d:t:w:W:m:H:p:T:")) != -1) {
        switch (opt) {
        case 's': src = optarg; break;
        case 'd': dst = optarg; break;
        case 't': seconds = atof(optarg); break;
        case 'w': window = atoi(optarg); break;
        case 'W': warmup = atof(optarg); break;
        case 'm': mode = optarg; break;
        case 'H': hitFile = optarg; break;
        case 'p': missPrefix = optarg; break;
        case 'T': lostMs = atoi(optarg); break;
        default: return 2;
        }
    }
    if (!src || !dst || window < 1 || window > 65536 || seconds <= 0 || seconds > 3600) {
        fprintf(stderr, "usage: icpload -s SRC -d DST:PORT -t SECONDS [-w WINDOW] ...\n");
        return 2;
    }
    int wantHit = !strcmp(mode, "hit") || !strcmp(mode, "mix");
    int wantMiss = !strcmp(mode, "miss") || !strcmp(mode, "mix");
    if (!wantHit && !wantMiss) {
        fprintf(stderr, "mode must be hit, miss or mix\n");
        return 2;
    }
    if (wantHit) {
        if (!hitFile) {
            fprintf(stderr, "hit and mix modes need -H HITFILE\n");
            return 2;
        }
        readHits(hitFile);
        if (hitCount == 0) {
            fprintf(stderr, "no URLs in %s\n", hitFile);
            return 2;
        }
    }
    size_t prefixLen = strlen(missPrefix);
    if (prefixLen > MAX_URL - 32) {
        fprintf(stderr, "miss prefix too long\n");
        return 2;
    }

    struct sockaddr_in from, to;
    parseAddress(src, &from, 0);
    from.sin_port = 0;
    parseAddress(dst, &to, 1);
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
    if (fd < 0) die("socket");
    int buf = 4 * 1024 * 1024;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &buf, sizeof buf);
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &buf, sizeof buf);
    if (bind(fd, (struct sockaddr *)&from, sizeof from) < 0) die("bind");
    if (connect(fd, (struct sockaddr *)&to, sizeof to) < 0) die("connect");

    uint32_t tableSize = 1;
    while (tableSize < (uint32_t)window * 4) tableSize <<= 1;
    uint32_t mask = tableSize - 1;
    Slot *slots = calloc(tableSize, sizeof *slots);
    uint32_t *hist = calloc(HIST_US + 1, sizeof *hist);
    if (!slots || !hist) die("calloc");

    static unsigned char sendBufs[BATCH][MAX_URL + 64];
    static unsigned char recvBufs[BATCH][MAX_DGRAM];
    struct mmsghdr sendMsgs[BATCH], recvMsgs[BATCH];
    struct iovec sendIov[BATCH], recvIov[BATCH];
    memset(sendMsgs, 0, sizeof sendMsgs);
    memset(recvMsgs, 0, sizeof recvMsgs);
    for (int i = 0; i < BATCH; i++) {
        sendIov[i].iov_base = sendBufs[i];
        sendMsgs[i].msg_hdr.msg_iov = &sendIov[i];
        sendMsgs[i].msg_hdr.msg_iovlen = 1;
        recvIov[i].iov_base = recvBufs[i];
        recvIov[i].iov_len = MAX_DGRAM;
        recvMsgs[i].msg_hdr.msg_iov = &recvIov[i];
        recvMsgs[i].msg_hdr.msg_iovlen = 1;
    }

    char missUrl[MAX_URL + 64];
    memcpy(missUrl, missPrefix, prefixLen);
    uint64_t sent = 0, replies = 0, lost = 0, strays = 0, missSeq = 0, hitSeq = 0;
    uint64_t measured = 0, opCounts[256];
    memset(opCounts, 0, sizeof opCounts);
    uint32_t nextReqnum = 1;
    int outstanding = 0, flip = 0;
    uint64_t start = nowNs();
    uint64_t measureFrom = start + (uint64_t)(warmup * 1e9);
    uint64_t end = measureFrom + (uint64_t)(seconds * 1e9);
    uint64_t lostNs = (uint64_t)lostMs * 1000000ull;
    uint64_t nextSweep = start + lostNs / 4;

    while (!stopping) {
        uint64_t now = nowNs();
        if (now >= end) break;
        /* Fill the window. */
        while (outstanding < window) {
            int n = window - outstanding;
            if (n > BATCH) n = BATCH;
            for (int i = 0; i < n; i++) {
                uint32_t r = nextReqnum++;
                if (nextReqnum == 0 || nextReqnum > 0x7fffffffu) nextReqnum = 1;
                Slot *s = &slots[r & mask];
                if (s->sentNs) { /* a query long unanswered: give up on it */
                    lost++;
                    outstanding--;
                }
                int hit = wantHit && (!wantMiss || (flip ^= 1));
                size_t len;
                if (hit) {
                    size_t k = hitSeq++ % hitCount;
                    len = buildQuery(sendBufs[i], r, hitUrls[k], hitLens[k]);
                } else {
                    int m = snprintf(missUrl + prefixLen, 32, "%llu", (unsigned long long)missSeq++);
                    len = buildQuery(sendBufs[i], r, missUrl, prefixLen + (size_t)m);
                }
                sendIov[i].iov_len = len;
                s->reqnum = r;
                s->sentNs = 0; /* set after the send, below */
            }
            int done = sendmmsg(fd, sendMsgs, (unsigned)n, 0);
            uint64_t t = nowNs();
            if (done < 0) {
                if (errno == EAGAIN || errno == ENOBUFS || errno == EINTR) done = 0;
                else die("sendmmsg");
            }
            for (int i = 0; i < n; i++) {
                uint32_t r = get32(sendBufs[i] + 4);
                if (i < done) {
                    slots[r & mask].sentNs = t;
                    outstanding++;
                    sent++;
                } else {
                    slots[r & mask].sentNs = 0;
                }
            }
            if (done < n) break; /* socket full: wait for replies */
        }
        struct pollfd p = {fd, POLLIN, 0};
        int ready = poll(&p, 1, 5);
        if (ready < 0 && errno != EINTR) die("poll");
        if (ready > 0) {
            int got = recvmmsg(fd, recvMsgs, BATCH, MSG_DONTWAIT, NULL);
            uint64_t t = nowNs();
            for (int i = 0; i < got; i++) {
                unsigned len = recvMsgs[i].msg_len;
                const unsigned char *b = recvBufs[i];
                if (len < HEADER) {
                    strays++;
                    continue;
                }
                uint32_t r = get32(b + 4);
                Slot *s = &slots[r & mask];
                if (!s->sentNs || s->reqnum != r) {
                    strays++;
                    continue;
                }
                uint64_t lat = (t - s->sentNs) / 1000;
                s->sentNs = 0;
                outstanding--;
                replies++;
                if (t >= measureFrom) {
                    measured++;
                    opCounts[b[0]]++;
                    hist[lat < HIST_US ? lat : HIST_US]++;
                }
            }
        }
        if (now >= nextSweep) {
            for (uint32_t i = 0; i < tableSize; i++) {
                if (slots[i].sentNs && slots[i].sentNs + lostNs < now) {
                    slots[i].sentNs = 0;
                    outstanding--;
                    lost++;
                }
            }
            nextSweep = now + lostNs / 4;
        }
    }
    double elapsed = (double)(end - measureFrom) / 1e9;
    uint64_t cum = 0, p50 = 0, p90 = 0, p99 = 0, max = 0;
    int have50 = 0, have90 = 0, have99 = 0;
    for (uint32_t i = 0; i <= HIST_US; i++) {
        if (!hist[i]) continue;
        cum += hist[i];
        max = i;
        if (!have50 && cum * 100 >= measured * 50) { p50 = i; have50 = 1; }
        if (!have90 && cum * 100 >= measured * 90) { p90 = i; have90 = 1; }
        if (!have99 && cum * 100 >= measured * 99) { p99 = i; have99 = 1; }
    }
    printf("sent=%llu\nreplies=%llu\nmeasured=%llu\nlost=%llu\nstrays=%llu\n",
           (unsigned long long)sent, (unsigned long long)replies, (unsigned long long)measured,
           (unsigned long long)lost, (unsigned long long)strays);
    printf("seconds=%.3f\nqps=%.1f\n", elapsed, measured / elapsed);
    printf("p50_us=%llu\np90_us=%llu\np99_us=%llu\nmax_us=%llu\n", (unsigned long long)p50,
           (unsigned long long)p90, (unsigned long long)p99, (unsigned long long)max);
    static const struct { int op; const char *name; } names[] = {
        {OP_HIT, "HIT"}, {OP_MISS, "MISS"}, {OP_ERR, "ERR"},
        {OP_NOFETCH, "MISS_NOFETCH"}, {OP_DENIED, "DENIED"},
    };
    uint64_t known = 0;
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        printf("op_%s=%llu\n", names[i].name, (unsigned long long)opCounts[names[i].op]);
        known += opCounts[names[i].op];
    }
    printf("op_other=%llu\n", (unsigned long long)(measured - known));
    close(fd);
    return 0;
}

/* ------------------------------------------------------------- responder */

static int runResponder(int argc, char **argv) {
    const char *first = NULL;
    int count = 1, port = 0, opt;
    double seconds = 3600;
    optind = 1;
    while ((opt = getopt(argc, argv, "Ra:n:P:t:")) != -1) {
        switch (opt) {
        case 'R': break;
        case 'a': first = optarg; break;
        case 'n': count = atoi(optarg); break;
        case 'P': port = atoi(optarg); break;
        case 't': seconds = atof(optarg); break;
        default: return 2;
        }
    }
    if (!first || count < 1 || count > 250 || port <= 0 || port > 65535) {
        fprintf(stderr, "usage: icpload -R -a FIRST_IP -n COUNT -P PORT [-t SECONDS]\n");
        return 2;
    }
    struct sockaddr_in base;
    parseAddress(first, &base, 0);
    struct pollfd *fds = calloc((size_t)count * 2, sizeof *fds);
    for (int i = 0; i < count; i++) {
        struct sockaddr_in a = base;
        a.sin_addr.s_addr = htonl(ntohl(base.sin_addr.s_addr) + (uint32_t)i);
        a.sin_port = htons((uint16_t)port);
        int u = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
        int t = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
        int one = 1;
        if (u < 0 || t < 0) die("socket");
        setsockopt(t, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(u, (struct sockaddr *)&a, sizeof a) < 0) die("bind udp");
        if (bind(t, (struct sockaddr *)&a, sizeof a) < 0) die("bind tcp");
        if (listen(t, 64) < 0) die("listen");
        fds[2 * i] = (struct pollfd){u, POLLIN, 0};
        fds[2 * i + 1] = (struct pollfd){t, POLLIN, 0};
    }
    printf("ready\n");
    fflush(stdout);
    uint64_t end = nowNs() + (uint64_t)(seconds * 1e9);
    unsigned char in[MAX_DGRAM], out[MAX_DGRAM];
    unsigned long long answered = 0;
    while (!stopping && nowNs() < end) {
        if (reportWanted) {
            reportWanted = 0;
            printf("queries=%llu\n", answered);
            fflush(stdout);
        }
        int ready = poll(fds, (nfds_t)count * 2, 200);
        if (ready < 0) {
            if (errno == EINTR) continue;
            die("poll");
        }
        for (int i = 0; i < count * 2 && ready > 0; i++) {
            if (!(fds[i].revents & POLLIN)) continue;
            ready--;
            if (i & 1) {
                int c;
                while ((c = accept(fds[i].fd, NULL, NULL)) >= 0) close(c);
                continue;
            }
            for (int k = 0; k < 64; k++) {
                struct sockaddr_in peer;
                socklen_t plen = sizeof peer;
                ssize_t n = recvfrom(fds[i].fd, in, sizeof in, 0, (struct sockaddr *)&peer, &plen);
                if (n < 0) break;
                if (n < HEADER + 5 || in[0] != OP_QUERY || in[n - 1] != 0) continue;
                if (((size_t)in[2] << 8 | in[3]) != (size_t)n) continue;
                /* MISS: header, then the URL (the query's, after its 4-byte requester). */
                size_t urlLen = (size_t)n - HEADER - 4; /* with the NUL */
                size_t total = HEADER + urlLen;
                memset(out, 0, HEADER);
                out[0] = OP_MISS;
                out[1] = 2;
                out[2] = (unsigned char)(total >> 8);
                out[3] = (unsigned char)total;
                memcpy(out + 4, in + 4, 4);
                memcpy(out + HEADER, in + HEADER + 4, urlLen);
                if (sendto(fds[i].fd, out, total, 0, (struct sockaddr *)&peer, plen) == (ssize_t)total)
                    answered++;
            }
        }
    }
    for (int i = 0; i < count * 2; i++) close(fds[i].fd);
    return 0;
}

int main(int argc, char **argv) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = onSignal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sa.sa_handler = onReport;
    sigaction(SIGUSR1, &sa, NULL);
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-R")) return runResponder(argc, argv);
    }
    return runLoad(argc, argv);
}
