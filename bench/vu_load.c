/* A vhost-user-blk load generator without a VM (bench/storage_matrix.py).
 *
 * The Python front-end (virtio.testing.vhost_user_frontend) does the vhost-user
 * handshake and sets up the split rings in a memfd it shares with the back-end;
 * this code then plays the guest driver on one ring: `qd` requests in flight, each
 * a fixed 3-descriptor chain (header, data, status), resubmitted as soon as its
 * used entry comes back, with EVENT_IDX notification suppression both ways (as
 * Linux's virtio_blk).  It waits for completions on the call eventfd (as a guest
 * waits for its interrupt), so the back-end is measured, not a polling loop.
 *
 * Compiled by storage_matrix.py with the system C compiler (cc -O2 -shared). */
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

struct lq {
    int memfd;
    uint64_t memsize;
    uint64_t desc, avail, used; /* guest addresses (== offsets in the memfd) */
    uint32_t size;
    int kick_fd, call_fd;
    uint64_t hdr_gpa, st_gpa, data_gpa;
    uint32_t bs, qd;
    int write, seq;
    uint64_t span_sectors; /* requests fall in [0, span_sectors) */
    uint64_t first_sector;
    uint64_t seed;
    double seconds;
    /* results */
    uint64_t ios, errors, kicks, waits;
    double elapsed;
};

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static uint64_t xorshift(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

static int need_event(uint16_t event, uint16_t new_idx, uint16_t old)
{
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old);
}

int lq_run(struct lq *q)
{
    uint8_t *m = mmap(NULL, q->memsize, PROT_READ | PROT_WRITE, MAP_SHARED, q->memfd, 0);
    if (m == MAP_FAILED)
        return -errno;
    uint32_t size = q->size, bsec = q->bs / 512;
    uint8_t *desc = m + q->desc;
    volatile uint16_t *avail = (uint16_t *)(m + q->avail);
    volatile uint16_t *used = (uint16_t *)(m + q->used);
    volatile uint16_t *used_event = &avail[2 + size];
    volatile uint16_t *avail_event = (uint16_t *)(m + q->used + 4 + 8 * (uint64_t)size);
    uint64_t blocks = q->span_sectors / bsec, next_seq = 0, seed = q->seed | 1;
    for (uint32_t s = 0; s < q->qd; s++) {
        uint8_t *d = desc + 16 * 3 * s;
        uint64_t a;
        uint32_t l;
        uint16_t f, n;
        a = q->hdr_gpa + 16 * s, l = 16, f = 1, n = (uint16_t)(3 * s + 1);
        memcpy(d, &a, 8), memcpy(d + 8, &l, 4), memcpy(d + 12, &f, 2), memcpy(d + 14, &n, 2);
        a = q->data_gpa + (uint64_t)s * q->bs, l = q->bs, f = q->write ? 1 : 3;
        n = (uint16_t)(3 * s + 2);
        memcpy(d + 16, &a, 8), memcpy(d + 24, &l, 4), memcpy(d + 28, &f, 2);
        memcpy(d + 30, &n, 2);
        a = q->st_gpa + s, l = 1, f = 2, n = 0;
        memcpy(d + 32, &a, 8), memcpy(d + 40, &l, 4), memcpy(d + 44, &f, 2);
        memcpy(d + 46, &n, 2);
        if (q->write)
            memset(m + q->data_gpa + (uint64_t)s * q->bs, 0x5a ^ s, q->bs);
    }
    uint16_t avail_idx = avail[1], last_used = used[1];
    uint16_t published = avail_idx;
#define FILL(s)                                                                                  \
    do {                                                                                         \
        uint8_t *h = m + q->hdr_gpa + 16 * (s);                                                  \
        uint32_t t = q->write ? 1 : 0, z = 0;                                                    \
        uint64_t b = q->seq ? (next_seq++ % blocks) : (xorshift(&seed) % blocks);                \
        uint64_t sec = q->first_sector + b * bsec;                                               \
        memcpy(h, &t, 4), memcpy(h + 4, &z, 4), memcpy(h + 8, &sec, 8);                          \
        m[q->st_gpa + (s)] = 0xff;                                                               \
        avail[2 + avail_idx % size] = (uint16_t)(3 * (s));                                       \
        avail_idx++;                                                                             \
    } while (0)
    for (uint32_t s = 0; s < q->qd; s++)
        FILL(s);
    uint32_t outstanding = q->qd;
    double t0 = now(), deadline = t0 + q->seconds;
    int stopping = 0;
    for (;;) {
        if (avail_idx != published) {
            uint16_t old = published;
            __atomic_store_n(&avail[1], avail_idx, __ATOMIC_RELEASE);
            published = avail_idx;
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            if (need_event(*avail_event, published, old)) {
                uint64_t one = 1;
                ssize_t w = write(q->kick_fd, &one, 8);
                (void)w;
                q->kicks++;
            }
        }
        if (!outstanding)
            break;
        uint16_t u = __atomic_load_n(&used[1], __ATOMIC_ACQUIRE);
        if (u == last_used) {
            *used_event = last_used; /* interrupt on the next one */
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            u = __atomic_load_n(&used[1], __ATOMIC_ACQUIRE);
            if (u == last_used) {
                struct pollfd p = {q->call_fd, POLLIN, 0};
                if (poll(&p, 1, 10000) <= 0) {
                    munmap(m, q->memsize);
                    return -ETIMEDOUT;
                }
                uint64_t v;
                ssize_t r = read(q->call_fd, &v, 8);
                (void)r;
                q->waits++;
                continue;
            }
        }
        if (!stopping && now() >= deadline) {
            stopping = 1;
            q->elapsed = now() - t0;
        }
        while (last_used != u) {
            uint32_t id;
            memcpy(&id, m + q->used + 4 + 8 * (uint64_t)(last_used % size), 4);
            last_used++;
            uint32_t s = id / 3;
            if (s >= q->qd) {
                munmap(m, q->memsize);
                return -EPROTO;
            }
            if (m[q->st_gpa + s] != 0)
                q->errors++;
            if (stopping) {
                outstanding--;
                continue;
            }
            q->ios++;
            FILL(s);
        }
    }
    munmap(m, q->memsize);
    return 0;
}
