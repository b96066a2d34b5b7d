/* virtio-blk fast path for the native data plane (dataplane.c): IN, OUT and FLUSH
 * served without the Python interpreter (virtio 1.4 §5.2.6), asynchronously
 * through an I/O engine (aio.c: io_uring, or worker threads).
 *
 * It is an accelerator, not a second device model: a request is served here only
 * when it is well formed and plainly valid (16-byte header alone in the readable
 * part, status byte last, data a multiple of 512 bytes inside the capacity, not a
 * write to a read-only disk; with O_DIRECT, offset and length aligned to the
 * logical block size).  Anything else -- GET_ID, DISCARD, WRITE_ZEROES, unknown
 * types, malformed chains -- is handed over ("deferred") to the Python device,
 * which decides the status exactly as it does for every request when the data
 * plane is off.
 *
 * Requests of one popped batch are started together (one submission) and finish
 * in any order: the used ring allows it (§2.7.8: "the device MAY ... use
 * descriptors in a different order").  Without O_DIRECT a read is first tried
 * inline without blocking (RWF_NOWAIT): served from the page cache, it completes
 * in the same batch, as fast as a synchronous call.  A buffered write is done
 * inline too (RWF_NOWAIT, or a plain pwritev2 where the file system does not
 * support that, e.g. ext4): it only copies into the page cache.
 *
 * FLUSH (§5.2.6: the device makes the writes it completed durable) is an
 * fdatasync on the engine.  A write the driver saw completed has completed in the
 * kernel (its completion was reaped before its used entry was published), so a
 * sync started after the FLUSH was popped covers every such write; writes still in
 * flight are not covered, and need not be.  With --cache unsafe it is answered at
 * once.  Write-through writes are a write linked to an fdatasync.
 *
 * With O_DIRECT, guest buffers that are not aligned to the file's memory alignment
 * (or lengths not multiples of the logical block size) go through a bounce buffer.
 *
 * An I/O that was tried here and failed is never tried again: it is deferred with
 * its errno, and Python answers VIRTIO_BLK_S_IOERR (and logs it).  Retrying would
 * be wrong for fdatasync: Linux reports a writeback error once, so a second call
 * succeeds although the data may be lost.  A failed fdatasync also sets the
 * image's sticky error (``sync_err``, unless O_DIRECT): every later FLUSH and
 * write-through write fails with it, on every queue and on the Python path (QEMU's
 * file-posix does the same after "fsyncgate").
 *
 * qcow2 images (qmap set): reads of guest clusters the map names (allocated plain
 * data in the top image, the run of clusters of one request contiguous in the file),
 * and writes into such clusters when the map also marks them writable in place
 * (QCOW2_MAP_IN_PLACE: the image owns them, refcount 1 -- a write there changes no
 * metadata), go to the host offset, on the same engine and with the same cache mode
 * as a raw image.  Everything else -- a cluster the map does not know, write-through
 * writes, FLUSH, DISCARD ... -- is deferred to the Python qcow2 code
 * (virtio/devices/blk/qcow2/), which owns the metadata. */
#include <errno.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "dataplane.h"

#define BLK_SECTOR 512u
#define BLK_HDR 16u

static inline uint8_t *seg_host(struct vq *q, const struct vq_seg *s)
{
    return q->mem->regions[s->region].host + s->offset;
}

/* Copy the first `want` readable bytes of the chain into out; returns bytes copied. */
static uint32_t gather(struct vq *q, const struct vq_chain *c, const struct vq_seg *segs,
                       uint8_t *out, uint32_t want)
{
    uint32_t got = 0;
    for (uint32_t i = 0; i < c->nreadable && got < want; i++) {
        uint32_t n = segs[i].len < want - got ? segs[i].len : want - got;
        memcpy(out + got, seg_host(q, &segs[i]), n);
        got += n;
    }
    return got;
}

/* Build iovecs for `len` bytes of segments [first, end) starting `skip` bytes in. */
static int build_iov(struct vq *q, const struct vq_seg *segs, uint32_t first, uint32_t end,
                     uint32_t skip, uint64_t len, struct iovec *iov, int max)
{
    int n = 0;
    for (uint32_t i = first; i < end && len; i++) {
        uint32_t l = segs[i].len;
        uint8_t *p = seg_host(q, &segs[i]);
        if (skip >= l) {
            skip -= l;
            continue;
        }
        p += skip;
        l -= skip;
        skip = 0;
        if (l > len)
            l = (uint32_t)len;
        if (n == max)
            return -1;
        iov[n].iov_base = p;
        iov[n].iov_len = l;
        n++;
        len -= l;
    }
    return len ? -1 : n;
}

/* ---- qcow2 cluster map ------------------------------------------------------------ */
int qcow2_map_init(struct qcow2_map *m, uint64_t nclusters, uint32_t cluster_bits)
{
    memset(m, 0, sizeof *m);
    if (!nclusters)
        nclusters = 1;
    if (nclusters > ((uint64_t)1 << 40) || cluster_bits < 9 || cluster_bits > 21)
        return -EINVAL;
    void *p = mmap(NULL, nclusters * sizeof(uint64_t), PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED)
        return -errno;
    m->host = p;
    m->nclusters = nclusters;
    m->cluster_bits = cluster_bits;
    return 0;
}

void qcow2_map_destroy(struct qcow2_map *m)
{
    if (m->host)
        munmap(m->host, m->nclusters * sizeof(uint64_t));
    m->host = NULL;
    m->nclusters = 0;
}

void qcow2_map_set(struct qcow2_map *m, uint64_t gc, uint64_t host)
{
    if (gc < m->nclusters)
        __atomic_store_n(&m->host[gc], host, __ATOMIC_SEQ_CST);
}

void qcow2_map_set_many(struct qcow2_map *m, const uint64_t *gcs, const uint64_t *hosts,
                        uint32_t n)
{
    for (uint32_t i = 0; i < n; i++)
        qcow2_map_set(m, gcs[i], hosts[i]);
}

/* Wait until no native read can still use an offset cleared before this call. */
void qcow2_map_synchronize(struct qcow2_map *m)
{
    uint32_t old = __atomic_fetch_add(&m->epoch, 1, __ATOMIC_SEQ_CST);
    struct timespec pause = {0, 20000};
    while (__atomic_load_n(&m->readers[old & 1], __ATOMIC_SEQ_CST) > 0)
        nanosleep(&pause, NULL);
    m->syncs++;
}

/* Count a reader in the current epoch (re-checked after counting, so a
 * synchronize that flipped meanwhile is not missed); returns its parity. */
static int qcow2_enter(struct qcow2_map *m)
{
    for (;;) {
        uint32_t e = __atomic_load_n(&m->epoch, __ATOMIC_SEQ_CST);
        __atomic_add_fetch(&m->readers[e & 1], 1, __ATOMIC_SEQ_CST);
        if (__atomic_load_n(&m->epoch, __ATOMIC_SEQ_CST) == e)
            return (int)(e & 1);
        __atomic_sub_fetch(&m->readers[e & 1], 1, __ATOMIC_SEQ_CST);
    }
}

/* Where guest bytes [off, off + len) are: 1 with *host set when the map names every
 * cluster of it (for a write: writable in place) and they are contiguous in one file
 * (*backing: the raw backing file, else the image); 0 otherwise.  Called counted in. */
static int qcow2_lookup(struct qcow2_map *m, uint64_t off, uint64_t len, int write_,
                        uint64_t *host, int *backing)
{
    uint32_t cb = m->cluster_bits;
    uint64_t gc = off >> cb, last = (off + len - 1) >> cb;
    uint64_t need = write_ ? QCOW2_MAP_IN_PLACE : 0;
    const uint64_t flags = QCOW2_MAP_IN_PLACE | QCOW2_MAP_BACKING;
    if (last >= m->nclusters)
        return 0;
    uint64_t h = __atomic_load_n(&m->host[gc], __ATOMIC_SEQ_CST);
    if (!h || (h & need) != need)
        return 0;
    for (uint64_t g = gc + 1; g <= last; g++)
        if (__atomic_load_n(&m->host[g], __ATOMIC_SEQ_CST) != h + ((g - gc) << cb))
            return 0; /* (the flags must match too) */
    *backing = (h & QCOW2_MAP_BACKING) != 0;
    if (*backing && write_)
        return 0; /* (never IN_PLACE too; kept explicit) */
    *host = (h & ~flags) + (off & (((uint64_t)1 << cb) - 1));
    return *backing || (h & ~flags);
}

struct blk_slot {
    int8_t qparity;         /* qcow2: the map epoch parity this read counts in, or -1 */
    int fd;                 /* the image, or (qcow2) its raw backing file */
    uint8_t *status;
    uint64_t status_gpa;
    uint32_t used;
    uint8_t type, bounced;
    struct iovec *iov;      /* iovcap entries */
    int iovcap;
    uint8_t *bounce;        /* aligned, bcap bytes */
    size_t bcap;
    uint64_t len;
    const struct vq_seg *segs; /* the core's copy of the chain's segments */
    uint32_t first, end;    /* data segments [first, end) */
};

struct blk_priv {
    struct aio aio;
    struct blk_slot *slots;
    uint32_t nslots;
    int nowait_write_ok;
};

static void blk_qleave(struct blk_dp *dp, struct blk_slot *s)
{
    if (s->qparity >= 0)
        __atomic_sub_fetch(&dp->qmap->readers[s->qparity], 1, __ATOMIC_SEQ_CST);
    s->qparity = -1;
}

static int blk_sync_err(struct blk_dp *dp)
{
    return dp->sync_err && !dp->direct ? __atomic_load_n(dp->sync_err, __ATOMIC_ACQUIRE) : 0;
}

static void blk_set_sync_err(struct blk_dp *dp, int err)
{
    if (dp->sync_err && !dp->direct) {
        int zero = 0;
        __atomic_compare_exchange_n(dp->sync_err, &zero, err, 0, __ATOMIC_ACQ_REL,
                                    __ATOMIC_ACQUIRE);
    }
}

static int blk_iov_room(struct blk_slot *s, int want)
{
    if (s->iovcap >= want)
        return 1;
    int cap = want < 16 ? 16 : want;
    struct iovec *n = realloc(s->iov, (size_t)cap * sizeof *n);
    if (!n)
        return 0;
    s->iov = n;
    s->iovcap = cap;
    return 1;
}

/* O_DIRECT: whether the iovecs meet the file's alignment. */
static int blk_aligned(struct blk_dp *dp, const struct iovec *iov, int n)
{
    uintptr_t m = dp->mem_align ? dp->mem_align - 1 : 511;
    uintptr_t l = dp->logical_block ? dp->logical_block - 1 : 511;
    for (int i = 0; i < n; i++)
        if (((uintptr_t)iov[i].iov_base & m) || (iov[i].iov_len & l))
            return 0;
    return 1;
}

/* Replace the n guest iovecs by one aligned bounce buffer (a write's data copied
 * into it now; a read's copied out in blk_finish_ok). */
static int blk_bounce(struct blk_dp *dp, struct blk_slot *s, int n, int write_)
{
    if (s->bcap < s->len) {
        free(s->bounce);
        s->bounce = NULL;
        s->bcap = 0;
        size_t align = dp->mem_align > 4096 ? dp->mem_align : 4096;
        void *b;
        if (posix_memalign(&b, align, s->len))
            return 0;
        s->bounce = b;
        s->bcap = s->len;
    }
    if (write_) {
        uint64_t done = 0;
        for (int i = 0; i < n; i++) {
            memcpy(s->bounce + done, s->iov[i].iov_base, s->iov[i].iov_len);
            done += s->iov[i].iov_len;
        }
    }
    s->iov[0].iov_base = s->bounce;
    s->iov[0].iov_len = s->len;
    s->bounced = 1;
    dp->bounced++;
    return 1;
}

/* The data segments [first, end) and the status byte of a finished IN / OUT / FLUSH
 * (§5.2.6) whose status is VIRTIO_BLK_S_OK: the status written, what the device
 * wrote marked in the dirty log, the queue's statistics; returns the counter of the
 * request's type (0 IN, 1 OUT, 2 FLUSH).  Shared with nbd_dataplane.c. */
static int blk_complete_ok(struct vq *q, uint8_t type, const struct vq_seg *segs,
                           uint32_t first, uint32_t end, uint32_t len, uint8_t *status,
                           uint64_t status_gpa)
{
    int kind = type == VIRTIO_BLK_T_IN ? 0 : type == VIRTIO_BLK_T_OUT ? 1 : 2;
    if (kind == 0 && q->mem->dirty_log)
        for (uint32_t i = first; i < end; i++)
            vm_log_dirty(q->mem, segs[i].gpa, segs[i].len);
    static const int stat[3] = {BLK_STAT_IN, BLK_STAT_OUT, BLK_STAT_FLUSH};
    vq_stats_request(q->stats, 1, stat[kind], VIRTIO_BLK_S_OK, kind == 2 ? 0 : len);
    *status = VIRTIO_BLK_S_OK;
    vm_log_dirty(q->mem, status_gpa, 1);
    return kind;
}

/* A finished request: bounce copy-out, then blk_complete_ok.  Returns the used length. */
static uint32_t blk_finish_ok(struct blk_dp *dp, struct blk_slot *s)
{
    struct vq *q = dp->core.q;
    if (s->type == VIRTIO_BLK_T_IN && s->bounced) {
        /* the guest's iovecs again, then the data into them */
        int n = build_iov(q, s->segs, s->first, s->end, 0, s->len, s->iov, s->iovcap);
        uint64_t done = 0;
        for (int i = 0; i < n; i++) {
            memcpy(s->iov[i].iov_base, s->bounce + done, s->iov[i].iov_len);
            done += s->iov[i].iov_len;
        }
    }
    uint64_t *count[3] = {&dp->reads, &dp->writes, &dp->flushes};
    (*count[blk_complete_ok(q, s->type, s->segs, s->first, s->end, s->len, s->status,
                            s->status_gpa)])++;
    return s->used;
}

/* A buffered write, here and now (it copies into the page cache).  Returns 1, or
 * -errno. */
static int blk_write_plain(struct blk_dp *dp, struct blk_slot *s, int iovcnt, uint64_t off)
{
    struct iovec *iov = s->iov;
    uint64_t left = s->len;
    while (left) {
        ssize_t n = pwritev2(dp->img_fd, iov, iovcnt, (off_t)off, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return n < 0 && errno ? -errno : -EIO;
        off += (uint64_t)n;
        left -= (uint64_t)n;
        while (iovcnt > 0 && (size_t)n >= iov->iov_len) {
            n -= (ssize_t)iov->iov_len;
            iov++;
            iovcnt--;
        }
        if (iovcnt > 0 && n) {
            iov->iov_base = (uint8_t *)iov->iov_base + n;
            iov->iov_len -= (size_t)n;
        }
    }
    return 1;
}

/* Page-cache I/O inline, without waiting for the disk.  A read is tried with
 * RWF_NOWAIT (served from the page cache, or it goes asynchronous).  A write is
 * tried with RWF_NOWAIT too; where the file system does not support that for
 * buffered writes (ext4: EOPNOTSUPP) it is written here with a plain pwritev2,
 * as the data plane always did: a buffered write only copies into the page cache
 * (io_uring would hand it to a kernel worker thread, several times slower).
 * Returns 1 when it completed whole, 0 to go asynchronous, or -errno for a
 * failure that is final (never retried). */
static int blk_try_inline(struct blk_dp *dp, struct blk_priv *pv, struct blk_slot *s,
                          int iovcnt, uint64_t off, int write_)
{
    int f = dp_fault(write_ ? "pwritev" : "preadv");
    if (f)
        return -f;
    if (write_ && !pv->nowait_write_ok)
        return blk_write_plain(dp, s, iovcnt, off);
    ssize_t n = write_ ? pwritev2(s->fd, s->iov, iovcnt, (off_t)off, RWF_NOWAIT)
                       : preadv2(s->fd, s->iov, iovcnt, (off_t)off, RWF_NOWAIT);
    if (n < 0 && write_ && errno == EOPNOTSUPP) {
        pv->nowait_write_ok = 0;
        return blk_write_plain(dp, s, iovcnt, off);
    }
    /* EAGAIN, a short transfer (part not cached) or any error: go asynchronous and
     * let the engine report the error, if it is one.  Repeating the part already
     * done is harmless: same bytes, same place. */
    return n >= 0 && (uint64_t)n == s->len;
}

/* Serve one chain (the core's stable copy).  Returns DP_ASYNC (started), the used
 * length (>0, done inline), or 0 to defer it to Python with *err = 0 (not served
 * here) or the errno of the I/O that failed. */
static uint32_t blk_serve(void *dev, const struct vq_chain *c, const struct vq_seg *segs, int *err)
{
    struct blk_dp *dp = dev;
    struct blk_priv *pv = dp->priv;
    struct vq *q = dp->core.q;
    uint8_t hdr[BLK_HDR];
    if (!pv || c->head >= pv->nslots)
        return 0;
    if (c->readable_len < BLK_HDR || c->writable_len < 1 || c->nsegs == 0)
        return 0;
    if (gather(q, c, segs, hdr, BLK_HDR) != BLK_HDR)
        return 0;
    uint32_t type;
    uint64_t sector;
    memcpy(&type, hdr, 4);
    memcpy(&sector, hdr + 8, 8);
    const struct vq_seg *last = &segs[c->nsegs - 1];
    if (!last->writable || last->len == 0)
        return 0;
    if (dp->qmap && type != VIRTIO_BLK_T_IN && type != VIRTIO_BLK_T_OUT)
        return 0; /* qcow2: the image's metadata is Python's */
    struct blk_slot *s = &pv->slots[c->head];
    s->qparity = -1;
    s->fd = dp->img_fd;
    s->status = seg_host(q, last) + last->len - 1;
    s->status_gpa = last->gpa + last->len - 1;
    s->type = (uint8_t)type;
    s->bounced = 0;
    s->segs = segs;
    uint32_t slot = c->head;
    if (type == VIRTIO_BLK_T_IN || type == VIRTIO_BLK_T_OUT) {
        int write_ = type == VIRTIO_BLK_T_OUT;
        uint64_t len;
        if (write_) {
            len = c->readable_len - BLK_HDR;
            if (c->writable_len != 1 || dp->read_only || len % BLK_SECTOR)
                return 0;
            if (sector == 0 && dp->guard_sector0)
                return 0;
            s->first = 0;
            s->end = c->nreadable;
        } else {
            len = c->writable_len - 1u;
            if (c->readable_len != BLK_HDR || len % BLK_SECTOR)
                return 0;
            s->first = c->nreadable;
            s->end = c->nsegs;
        }
        uint64_t cap = __atomic_load_n(&dp->capacity, __ATOMIC_ACQUIRE);
        if (sector > cap || len / BLK_SECTOR > cap - sector)
            return 0;
        uint64_t off = sector * BLK_SECTOR;
        if (len == 0) {
            s->used = 1;
            s->len = 0;
            return blk_finish_ok(dp, s);
        }
        if (dp->qmap) { /* guest offset -> host offset, or Python's */
            if (write_ && __atomic_load_n(&dp->writethrough, __ATOMIC_RELAXED))
                return 0; /* Python's, with the image's sticky flush error */
            s->qparity = (int8_t)qcow2_enter(dp->qmap);
            int backing = 0;
            if (!qcow2_lookup(dp->qmap, off, len, write_, &off, &backing) ||
                (backing && dp->backing_fd < 0)) {
                dp->qcow2_deferred++;
                blk_qleave(dp, s);
                return 0;
            }
            if (backing) {
                s->fd = dp->backing_fd;
                dp->qcow2_backing_reads++;
            }
        }
        if (dp->direct && dp->logical_block > BLK_SECTOR &&
            ((off | len) & (dp->logical_block - 1))) {
            blk_qleave(dp, s);
            return 0; /* not block aligned: Python's buffered path */
        }
        int n = blk_iov_room(s, (int)(s->end - s->first))
                    ? build_iov(q, segs, s->first, s->end, write_ ? BLK_HDR : 0, len, s->iov,
                                s->iovcap)
                    : -1;
        if (n < 0) {
            blk_qleave(dp, s);
            return 0;
        }
        s->len = len;
        s->used = write_ ? 1u : (uint32_t)len + 1u;
        int sync = write_ && __atomic_load_n(&dp->writethrough, __ATOMIC_RELAXED) &&
                   !dp->no_flush;
        if (dp->direct && !blk_aligned(dp, s->iov, n)) {
            if (!blk_bounce(dp, s, n, write_)) {
                blk_qleave(dp, s);
                return 0;
            }
            n = 1;
        } else if (!dp->direct && !sync) {
            int r = blk_try_inline(dp, pv, s, n, off, write_);
            if (r != 0)
                blk_qleave(dp, s);
            if (r < 0) {
                *err = -r;
                return 0;
            }
            if (r > 0) {
                dp->inline_done++;
                dp->qcow2_reads += dp->qmap && !write_;
                dp->qcow2_writes += dp->qmap && write_;
                return blk_finish_ok(dp, s);
            }
        }
        dp->qcow2_reads += dp->qmap && !write_;
        dp->qcow2_writes += dp->qmap && write_;
        if (sync) {
            int e = blk_sync_err(dp);
            if (e) {
                aio_fail(&pv->aio, slot, e, 1);
                return DP_ASYNC;
            }
            dp->syncs++;
        }
        aio_start(&pv->aio, slot, write_ ? (sync ? AIO_WRITE_SYNC : AIO_WRITE) : AIO_READ,
                  s->fd, s->iov, n, off, len);
        return DP_ASYNC;
    }
    if (type == VIRTIO_BLK_T_FLUSH) {
        if (c->readable_len != BLK_HDR || c->writable_len != 1)
            return 0;
        s->used = 1;
        s->len = 0;
        if (dp->no_flush)
            return blk_finish_ok(dp, s);
        int e = blk_sync_err(dp);
        if (e) {
            *err = e;
            return 0;
        }
        dp->syncs++;
        aio_start(&pv->aio, slot, AIO_FSYNC, dp->img_fd, NULL, 0, 0, 0);
        return DP_ASYNC;
    }
    return 0;
}

static void blk_submit(void *dev)
{
    struct blk_dp *dp = dev;
    struct blk_priv *pv = dp->priv;
    uint64_t before = pv->aio.submits;
    aio_submit(&pv->aio);
    dp->uring_submits += pv->aio.submits - before;
}

static uint32_t blk_reap(void *dev, struct dp_done *out, uint32_t max)
{
    struct blk_dp *dp = dev;
    struct blk_priv *pv = dp->priv;
    struct aio_done done[DP_BATCH];
    uint32_t n = aio_reap(&pv->aio, done, max < DP_BATCH ? max : DP_BATCH);
    for (uint32_t i = 0; i < n; i++) {
        struct blk_slot *s = &pv->slots[done[i].slot];
        blk_qleave(dp, s); /* the read is done: its cluster may be reused now */
        out[i].head = (uint16_t)done[i].slot;
        out[i].err = done[i].err;
        if (done[i].err) {
            if (done[i].sync_failed)
                blk_set_sync_err(dp, done[i].err);
            out[i].len = 0;
        } else {
            out[i].len = blk_finish_ok(dp, s);
        }
    }
    return n;
}

static int blk_watch(void *dev, int kick, int wake)
{
#ifdef HAVE_LIBURING
    return aio_uring_watch(&((struct blk_priv *)((struct blk_dp *)dev)->priv)->aio, kick, wake);
#else
    (void)dev, (void)kick, (void)wake;
    return -ENOSYS;
#endif
}

static int blk_wait(void *dev, int want, int timeout_ms)
{
#ifdef HAVE_LIBURING
    return aio_uring_wait(&((struct blk_priv *)((struct blk_dp *)dev)->priv)->aio, want,
                          timeout_ms);
#else
    (void)dev, (void)want, (void)timeout_ms;
    return -ENOSYS;
#endif
}

/* dp_group.wait: the members' shared io_uring (aio.c) */
static int blk_group_wait(void *shared, int timeout_ms)
{
#ifdef HAVE_LIBURING
    return ring_wait_any(shared, timeout_ms);
#else
    (void)shared, (void)timeout_ms;
    return -ENOSYS;
#endif
}

static int blk_start(void *dev)
{
    struct blk_dp *dp = dev;
    struct blk_priv *pv = calloc(1, sizeof *pv);
    uint32_t nslots = dp->core.q->size ? dp->core.q->size : 1;
    if (!pv)
        return -ENOMEM;
    pv->slots = calloc(nslots, sizeof *pv->slots);
    pv->nslots = nslots;
    pv->nowait_write_ok = 1;
    if (!pv->slots) {
        free(pv);
        return -ENOMEM;
    }
    struct dp_group *g = dp->core.group; /* --queue-threads: one io_uring per thread */
    int e = aio_init(&pv->aio, dp->engine, nslots, dp->threads,
                     g ? (struct aio_ring **)&g->shared : NULL, g ? g->wake_fd : -1);
    if (g && e >= 0)
        g->wait = blk_group_wait;
    if (e < 0) {
        aio_destroy(&pv->aio);
        free(pv->slots);
        free(pv);
        return e;
    }
    dp->engine_used = e;
    if (aio_waits_in_ring(&pv->aio)) { /* one io_uring_enter per wait, and per wake-up */
        dp->core.poll_fd = -1;
        dp->core.watch = blk_watch;
        dp->core.wait = blk_wait;
        dp->ring_wait = 1;
    } else {
        dp->ring_wait = 0;
        dp->core.poll_fd = pv->aio.efd;
    }
    __atomic_store_n(&dp->priv, pv, __ATOMIC_RELEASE);
    return 0;
}

static void blk_finish(void *dev)
{
    struct blk_dp *dp = dev;
    struct blk_priv *pv = dp->priv;
    if (!pv)
        return;
    dp->priv = NULL;
    dp->core.poll_fd = -1;
    dp->core.watch = NULL;
    dp->core.wait = NULL;
    aio_destroy(&pv->aio);
    for (uint32_t i = 0; i < pv->nslots; i++) {
        free(pv->slots[i].iov);
        free(pv->slots[i].bounce);
    }
    free(pv->slots);
    free(pv);
}

void blk_dp_attach(struct blk_dp *b)
{
    b->core.serve = blk_serve;
    b->core.dev = b;
    b->core.start = blk_start;
    b->core.finish = blk_finish;
    b->core.submit = blk_submit;
    b->core.reap = blk_reap;
    b->core.poll_fd = -1;
}

void blk_dp_detach(struct blk_dp *b)
{
    blk_finish(b); /* in case the thread never ran its finish */
}
