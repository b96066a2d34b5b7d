/* Native data plane: a thread per eventfd-notified virtqueue (dataplane.c), with a
 * device-specific fast path (blk_dataplane.c).  Needs vm_native.h and inflight.h
 * (the vhost-user inflight region layout) first. */
#ifndef PYVIRTIO_DATAPLANE_H
#define PYVIRTIO_DATAPLANE_H

/* ---- generic data plane --------------------------------------------------------- */
#define DP_BATCH 64
#define DP_MAX_SEGS 4096
#define DP_DEFER_MAX 256
#define DP_DEFER_SEGS 8192
#define DP_ASYNC 4294967295

/* A chain served asynchronously, reported by the device's reap callback: used
 * length > 0 to complete it, or 0 to defer it to Python with the errno of the I/O
 * that failed. */
struct dp_done {
    uint16_t head;
    uint16_t _pad;
    uint32_t len;
    int32_t err;
};

/* The core's copy of a chain in progress (asynchronous serve): stable until the
 * device reports it. */
struct dp_pend {
    struct vq_chain chain;
    struct vq_seg *segs;
    uint32_t cap;
    uint32_t busy;
};

struct dp {
    struct vq *q;
    int kick_fd, call_fd, wake_fd, defer_fd;
    int stop;
    uint8_t *inflight;          /* this queue's inflight region, or NULL */
    uint16_t inflight_num;
    uint64_t inflight_counter;
    /* The device's fast path.  Returns the used length (> 0) to complete the chain
     * now, 0 to defer it to Python with *err = 0 (not served here) or the errno of
     * an I/O that was tried and failed (Python answers it without retrying), or
     * DP_ASYNC: the device started it and reports it later through reap. */
    uint32_t (*serve)(void *dev, const struct vq_chain *c, const struct vq_seg *segs, int *err);
    void *dev;
    /* Asynchronous completion (all optional).  start/finish run on the data plane
     * thread before the first and after the last request (e.g. an io_uring, which
     * belongs to the thread that submits); submit starts what serve queued (once
     * per popped batch); poll_fd is readable when completions wait; reap reports up
     * to max completed chains without blocking. */
    int (*start)(void *dev);
    void (*finish)(void *dev);
    void (*submit)(void *dev);
    uint32_t (*reap)(void *dev, struct dp_done *out, uint32_t max);
    int poll_fd;
    struct dp_pend *pend;       /* q->size slots, by head (buffer id), while running */
    uint32_t pending;           /* chains in progress */
    /* deferred chains, protected by mu */
    void *mu_storage[8];
    struct vq_chain *dchains;   /* DP_DEFER_MAX */
    struct vq_seg *dsegs;       /* DP_DEFER_SEGS */
    int32_t *derr;              /* DP_DEFER_MAX */
    uint32_t nd, nds;
    /* statistics */
    uint64_t requests, batches, deferred, kicks, calls, rescues, io_errors;
    uint64_t async_started, reaps, publishes, max_pending, dropped;
    uint64_t idles;             /* waits that timed out with nothing to do */
};

int dp_init(struct dp *dp);
void dp_destroy(struct dp *dp);
void dp_set_fds(struct dp *dp, int kick, int call);
int dp_run(struct dp *dp);
uint32_t dp_take(struct dp *dp, struct vq_chain *chains, uint32_t max, struct vq_seg *segs,
                 uint32_t max_segs, int32_t *errs);

/* ---- a scripted asynchronous device (tests of the core, dataplane.c) ------------- */
#define DP_SCRIPT_MAX 1024

struct dp_script {
    struct dp core;
    int efd;
    void *mu_storage[8];
    uint16_t started[DP_SCRIPT_MAX];
    uint32_t nstarted;
    struct dp_done done[DP_SCRIPT_MAX];
    uint32_t ndone;
    uint64_t submits;
};

int dp_script_attach(struct dp_script *s, int efd);
void dp_script_complete(struct dp_script *s, const uint16_t *heads, const uint32_t *lens,
                        int32_t err, uint32_t n);
uint32_t dp_script_started(struct dp_script *s, uint16_t *out, uint32_t max);

/* ---- virtio-blk fast path (virtio 1.4 §5.2.6): IN, OUT, FLUSH -------------------- */
#define BLK_AIO_THREADS 1
#define BLK_AIO_URING 2

struct blk_dp {
    struct dp core;
    int img_fd;
    int read_only, writethrough;
    int guard_sector0;          /* probed raw: writes to sector 0 go to Python (probe.py) */
    uint64_t capacity;          /* sectors */
    /* The image's sticky writeback error (shared by every queue of the image and the
     * Python path): once an fdatasync failed, every later sync fails with it.  Not
     * with O_DIRECT (direct), where the page cache holds no dirty data to lose. */
    int *sync_err;
    /* cache mode: O_DIRECT (offsets, lengths and buffers aligned, else bounce or
     * defer), flushes ignored (unsafe) */
    int direct, no_flush;
    uint32_t logical_block, mem_align;
    /* the I/O engine asked for (BLK_AIO_*) and the one running */
    int engine, engine_used, threads;
    void *priv;
    uint64_t reads, writes, flushes, syncs;
    uint64_t inline_done, bounced, uring_submits;
};

void blk_dp_attach(struct blk_dp *b);
void blk_dp_detach(struct blk_dp *b);

/* ---- I/O engines (aio.c) ------------------------------------------------------------ */
/* 1 when built with liburing and an io_uring can be set up here (kernel, seccomp). */
int aio_uring_usable(void);
/* Fault injection for tests (off unless a directory is set): the files "preadv",
 * "pwritev", "fdatasync" in it hold "ERRNO COUNT" (virtio.testing.faults). */
void dp_set_fault_dir(const char *dir);

#endif
