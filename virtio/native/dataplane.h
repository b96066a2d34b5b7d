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
/* serve: complete the chain now with used length 0 (e.g. a virtio-net transmit
 * buffer: the device writes nothing into it) */
#define DP_USED_ZERO 4294967294
/* events of a device's own wait (struct dp.wait) */
#define DP_EV_KICK 1
#define DP_EV_WAKE 2
#define DP_EV_DONE 4
/* dp.wait's timeout for a group member: no blocking and no system call -- report
 * the events already seen and remember `want` for the group's one wait */
#define DP_WAIT_PEEK (-2)
/* queues one dp_group thread serves at most */
#define DP_GROUP_MAX 64

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

struct dp_group;

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
    /* Optional, instead of poll() on the eventfds and poll_fd: the device waits in
     * its own mechanism (an io_uring that also reads the kick and wake eventfds: one
     * system call per wait, which also submits, and one wake-up per event).  watch
     * names the eventfds to wait on: called with the core's lock held whenever the
     * ring's kick eventfd changed (-1: none), so the fd numbers are still the ones
     * meant.  wait blocks until one of the DP_EV_* events in `want` happened (kicks
     * and wakes are consumed; completions are left for reap) or timeout_ms (< 0:
     * none) passed, and returns the events, 0 on timeout, or -errno. */
    int (*watch)(void *dev, int kick, int wake);
    int (*wait)(void *dev, int want, int timeout_ms);
    int watched_kick;           /* the kick eventfd last given to watch (-2: none yet) */
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
    /* Deferred chains Python has finished serving (written by Python only, after
     * each one): a device whose chains must leave in order (net) compares it with
     * `deferred` before it serves one natively past those. */
    uint64_t deferred_done;
    /* Optional: called after each popped batch was served, before its used entries
     * are published (a device that writes other rings publishes those here). */
    void (*batch_end)(void *dev);
    /* Optional: called with each popped batch (n chains; chain i's segments at
     * segs + c[i].seg_start) before any of them is served: a device reads what
     * every chain starts with in one pass, so those loads (lines another CPU wrote)
     * overlap instead of stalling one serve each. */
    void (*batch_begin)(void *dev, const struct vq_chain *c, uint32_t n, const struct vq_seg *segs);
    /* Optional: called before the thread blocks in poll() (after any polling of the
     * ring), so a device can hand work it keeps for later to another thread. */
    void (*before_sleep)(void *dev);
    /* Poll the ring this long (ns) for new chains before re-enabling driver
     * notifications and sleeping (0: sleep at once).  A busy peer's next burst is
     * then taken without a kick and a wake-up; an idle ring costs this much CPU
     * once per idle period. */
    uint64_t spin_ns;
    uint64_t spins, spin_hits;  /* polls done, and those that found chains */
    /* Served by a dp_group's thread instead of its own (NULL: dp_run).  The loop's
     * state between steps (dataplane.c), the events it waits for, and, once it
     * ended, its result; done_fd is written then. */
    struct dp_group *group;
    void *loop;
    int want, done_fd, result;
    uint64_t idle_since_ms;
};

/* One thread serving several queues (QEMU's iothread with its virtqueue mapping):
 * members join and leave at any time (dp_group_join; a member leaves when its loop
 * ends: stop, error).  The members' device waits in one mechanism for all of them
 * (`wait`, set up by the members' start hook from `shared`, e.g. one io_uring);
 * until the first member started, the thread waits on wake_fd alone. */
struct dp_group {
    void *mu_storage[8];
    struct dp *members[DP_GROUP_MAX]; /* [0, n), guarded by mu */
    uint32_t n;
    int running;                /* a thread runs dp_group_run (guarded by mu) */
    int wake_fd;                /* written on join */
    void *shared;               /* the members' device's shared engine */
    int (*wait)(void *shared, int timeout_ms); /* 1: some member has events, 0: timeout */
    uint64_t waits, wakeups;
};

int dp_init(struct dp *dp);
void dp_destroy(struct dp *dp);
void dp_set_fds(struct dp *dp, int kick, int call);
int dp_run(struct dp *dp);
int dp_run_named(struct dp *dp, const char *name);
void dp_name_thread(const char *name);
int dp_group_init(struct dp_group *g, int wake_fd);
int dp_group_join(struct dp_group *g, struct dp *dp);
int dp_group_run(struct dp_group *g);
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
/* Request kinds of the blk statistics (vq_stats_request; virtio/devices/blk/device.py
 * names them in this order: in, out, flush, get-id, discard, write-zeroes, other);
 * the status index is the status byte (§5.2.6: OK 0, IOERR 1, UNSUPP 2). */
#define BLK_STAT_IN 0
#define BLK_STAT_OUT 1
#define BLK_STAT_FLUSH 2
#define BLK_AIO_THREADS 1
#define BLK_AIO_URING 2

/* A qcow2 image's allocated clusters, for reads without Python (blk_dataplane.c;
 * filled and invalidated by virtio/devices/blk/qcow2/native.py).  host[gc] is the
 * host offset of guest cluster gc when the whole cluster is plain data in the top
 * image (not compressed, zero, unallocated or partly allocated), else 0: "ask
 * Python"; with QCOW2_MAP_IN_PLACE set when a write may go there too.  Python clears an entry before the L2 entry behind it changes, and
 * before a freed host cluster can be reused calls qcow2_map_synchronize, which
 * waits for every native read that may have looked the old offset up (readers are
 * counted per epoch parity). */
#define QCOW2_MAP_IN_PLACE 1 /* host[gc] flag: writable in place (refcount 1) */
/* host[gc] flag: the cluster is unallocated in the top image and wholly inside its raw
 * backing file; the offset (gc << cluster_bits) is read from blk_dp.backing_fd */
#define QCOW2_MAP_BACKING 2

struct qcow2_map {
    uint64_t *host;             /* nclusters entries (mmap, pages touched on use) */
    uint64_t nclusters;
    uint32_t cluster_bits;
    uint32_t epoch;
    int64_t readers[2];
    uint64_t hits, misses, syncs;
};

int qcow2_map_init(struct qcow2_map *m, uint64_t nclusters, uint32_t cluster_bits);
void qcow2_map_destroy(struct qcow2_map *m);
void qcow2_map_set(struct qcow2_map *m, uint64_t gc, uint64_t host);
void qcow2_map_set_many(struct qcow2_map *m, const uint64_t *gcs, const uint64_t *hosts,
                        uint32_t n);
void qcow2_map_synchronize(struct qcow2_map *m);

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
    /* qcow2: allocated-cluster reads through this map (img_fd is the qcow2 file);
     * everything else is deferred to Python.  NULL for raw images. */
    struct qcow2_map *qmap;
    /* the I/O engine asked for (BLK_AIO_*) and the one running */
    int engine, engine_used, threads;
    int ring_wait;              /* io_uring: the thread waits in the ring (1), or polls */
    void *priv;
    uint64_t reads, writes, flushes, syncs;
    uint64_t inline_done, bounced, uring_submits;
    uint64_t qcow2_reads, qcow2_writes, qcow2_deferred;
    /* qcow2 over one raw backing file: the file QCOW2_MAP_BACKING reads come from
     * (O_DIRECT like img_fd under direct), -1 otherwise */
    int backing_fd;
    uint64_t qcow2_backing_reads;
};

void blk_dp_attach(struct blk_dp *b);
void blk_dp_detach(struct blk_dp *b);

/* ---- I/O engines (aio.c) ------------------------------------------------------------ */
/* 1 when built with liburing and an io_uring can be set up here (kernel, seccomp). */
int aio_uring_usable(void);
/* Fault injection for tests (off unless a directory is set): the files "preadv",
 * "pwritev", "fdatasync" in it hold "ERRNO COUNT" (virtio.testing.faults). */
void dp_set_fault_dir(const char *dir);
/* Tests: 0 makes new io_uring engines poll their completion eventfd (the fallback
 * where eventfd READs on the ring do not wait) instead of waiting in the ring. */
void aio_set_ring_wait(int on);

#endif
