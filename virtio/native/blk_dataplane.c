/* virtio-blk data plane: a thread per queue that serves the common requests
 * (IN, OUT, FLUSH) without the Python interpreter (virtio 1.4 §5.2.6).
 *
 * It is an accelerator, not a second device model: a request is served here only
 * when it is well formed and plainly valid (16-byte header alone in the readable
 * part, status byte last, data a multiple of 512 bytes inside the capacity, not a
 * write to a read-only disk).  Anything else -- GET_ID, DISCARD, WRITE_ZEROES,
 * unknown types, malformed chains -- is handed over ("deferred") to the Python
 * device, which decides the status exactly as it does for every request when the
 * data plane is off.
 *
 * An I/O that was tried here and failed is never tried again: it is deferred with
 * its errno, and Python answers VIRTIO_BLK_S_IOERR (and logs it).  Retrying would
 * be wrong for fdatasync: Linux reports a writeback error once, so a second call
 * succeeds although the data may be lost.  A failed fdatasync also sets the
 * image's sticky error (``sync_err``): every later FLUSH and write-through write
 * fails with it, on every queue and on the Python path (QEMU's file-posix does the
 * same after "fsyncgate").
 *
 * Threading: the thread holds no Python state.  Every used-ring update and pop
 * goes through the vq lock (vq_set_locking), so Python may complete deferred
 * chains concurrently. */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#define BLK_DP_BATCH 64
#define BLK_DP_MAX_SEGS 4096
#define BLK_SECTOR 512u
#define BLK_HDR 16u
#define DP_MU(dp) ((pthread_mutex_t *)(void *)(dp)->mu_storage)
_Static_assert(sizeof(((struct blk_dp *)0)->mu_storage) >= sizeof(pthread_mutex_t), "mutex storage");

static inline uint8_t *seg_host(struct vq *q, const struct vq_seg *s)
{
    return q->mem->regions[s->region].host + s->offset;
}

static void dp_defer(struct blk_dp *dp, const struct vq_chain *c, const struct vq_seg *segs, int err)
{
    pthread_mutex_lock(DP_MU(dp));
    /* Room for a whole batch is checked before popping (dp_room), so this fits. */
    dp->derr[dp->nd] = err;
    struct vq_chain *d = &dp->dchains[dp->nd++];
    *d = *c;
    d->seg_start = dp->nds;
    memcpy(&dp->dsegs[dp->nds], segs, c->nsegs * sizeof *segs);
    dp->nds += c->nsegs;
    pthread_mutex_unlock(DP_MU(dp));
    uint64_t one = 1;
    ssize_t rc = write(dp->defer_fd, &one, sizeof one);
    (void)rc;
    dp->deferred++;
}

static void inflight_pop(struct blk_dp *dp, uint16_t head)
{
    if (!dp->inflight || head >= dp->inflight_num)
        return;
    uint8_t *d = dp->inflight + 16 + 16u * head;
    memcpy(d + 8, &dp->inflight_counter, 8);
    dp->inflight_counter++;
    __atomic_store_n(d, (uint8_t)1, __ATOMIC_RELEASE);
}

static void inflight_used(struct blk_dp *dp, const uint16_t *heads, uint32_t n, uint16_t used_idx)
{
    if (!dp->inflight || n == 0)
        return;
    uint16_t last;
    memcpy(&last, dp->inflight + 12, 2);
    for (uint32_t i = 0; i < n; i++) {
        if (heads[i] >= dp->inflight_num)
            continue;
        memcpy(dp->inflight + 16 + 16u * heads[i] + 6, &last, 2);
        last = heads[i];
    }
    memcpy(dp->inflight + 12, &last, 2);
    for (uint32_t i = 0; i < n; i++)
        if (heads[i] < dp->inflight_num)
            __atomic_store_n(dp->inflight + 16 + 16u * heads[i], (uint8_t)0, __ATOMIC_RELEASE);
    __atomic_store_n((uint16_t *)(dp->inflight + 14), used_idx, __ATOMIC_RELEASE);
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

/* Returns 0, or the errno of the failure (EIO for an unexpected end of file). */
static int full_io(int fd, struct iovec *iov, int n, uint64_t off, int write_)
{
    while (n > 0) {
        ssize_t r = write_ ? pwritev(fd, iov, n, (off_t)off) : preadv(fd, iov, n, (off_t)off);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return errno ? errno : EIO;
        }
        if (r == 0)
            return EIO; /* short transfer: past the end of the file */
        off += (uint64_t)r;
        while (n > 0 && (size_t)r >= iov->iov_len) {
            r -= (ssize_t)iov->iov_len;
            iov++;
            n--;
        }
        if (n > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + r;
            iov->iov_len -= (size_t)r;
        }
    }
    return 0;
}

/* fdatasync the image, honouring and setting its sticky writeback error.
 * Returns 0 or an errno. */
static int dp_sync(struct blk_dp *dp)
{
    int err = dp->sync_err ? __atomic_load_n(dp->sync_err, __ATOMIC_ACQUIRE) : 0;
    if (err)
        return err;
    dp->syncs++;
    while (fdatasync(dp->img_fd)) {
        if (errno == EINTR)
            continue;
        err = errno ? errno : EIO;
        if (dp->sync_err) {
            int zero = 0;
            __atomic_compare_exchange_n(dp->sync_err, &zero, err, 0, __ATOMIC_ACQ_REL,
                                        __ATOMIC_ACQUIRE);
        }
        return err;
    }
    return 0;
}

/* Serve one chain.  Returns the used length (>0), or 0 to defer it to Python with
 * *err = 0 (not served here) or the errno of the I/O that failed. */
static uint32_t blk_serve(struct blk_dp *dp, const struct vq_chain *c, const struct vq_seg *segs,
                          int *err)
{
    struct vq *q = dp->q;
    uint8_t hdr[BLK_HDR];
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
    uint8_t *status = seg_host(q, last) + last->len - 1;
    uint64_t status_gpa = last->gpa + last->len - 1;
    struct iovec iov[BLK_DP_MAX_SEGS];
    uint32_t used;
    if (type == VIRTIO_BLK_T_IN) {
        uint64_t len = c->writable_len - 1u;
        if (c->readable_len != BLK_HDR || len % BLK_SECTOR)
            return 0;
        uint64_t cap = __atomic_load_n(&dp->capacity, __ATOMIC_ACQUIRE);
        if (sector > cap || len / BLK_SECTOR > cap - sector)
            return 0;
        int n = build_iov(q, segs, c->nreadable, c->nsegs, 0, len, iov, BLK_DP_MAX_SEGS);
        if (n < 0)
            return 0;
        if ((*err = full_io(dp->img_fd, iov, n, sector * BLK_SECTOR, 0)))
            return 0;
        if (q->mem->dirty_log)
            for (uint32_t i = c->nreadable; i < c->nsegs; i++)
                vm_log_dirty(q->mem, segs[i].gpa, segs[i].len);
        dp->reads++;
        used = (uint32_t)len + 1u;
    } else if (type == VIRTIO_BLK_T_OUT) {
        uint64_t len = c->readable_len - BLK_HDR;
        if (c->writable_len != 1 || dp->read_only || len % BLK_SECTOR)
            return 0;
        if (sector == 0 && dp->guard_sector0)
            return 0;
        uint64_t cap = __atomic_load_n(&dp->capacity, __ATOMIC_ACQUIRE);
        if (sector > cap || len / BLK_SECTOR > cap - sector)
            return 0;
        int n = build_iov(q, segs, 0, c->nreadable, BLK_HDR, len, iov, BLK_DP_MAX_SEGS);
        if (n < 0)
            return 0;
        if ((*err = full_io(dp->img_fd, iov, n, sector * BLK_SECTOR, 1)))
            return 0;
        if (__atomic_load_n(&dp->writethrough, __ATOMIC_RELAXED) && (*err = dp_sync(dp)))
            return 0;
        dp->writes++;
        used = 1;
    } else if (type == VIRTIO_BLK_T_FLUSH) {
        if (c->readable_len != BLK_HDR || c->writable_len != 1)
            return 0;
        if ((*err = dp_sync(dp)))
            return 0;
        dp->flushes++;
        used = 1;
    } else {
        return 0;
    }
    *status = VIRTIO_BLK_S_OK;
    vm_log_dirty(q->mem, status_gpa, 1);
    return used;
}

static int dp_room(struct blk_dp *dp)
{
    pthread_mutex_lock(DP_MU(dp));
    int ok = dp->nd + BLK_DP_BATCH <= BLK_DP_DEFER_MAX && dp->nds + BLK_DP_MAX_SEGS <= BLK_DP_DEFER_SEGS;
    pthread_mutex_unlock(DP_MU(dp));
    return ok;
}

/* Wait for a kick (or, with kick < 0, only for a wake).  Returns 1 to go on, 0 to
 * stop, <0 on error. */
/* Idle for a while with used entries the driver has not acknowledged (split ring,
 * EVENT_IDX: the driver's used_event lags our used idx) means a used buffer
 * notification went missing -- e.g. around a back-end restart the front-end was
 * not listening yet.  Notify again: spurious notifications are allowed (§2.7.7.1). */
static void dp_rescue(struct blk_dp *dp)
{
    struct vq *q = dp->q;
    if (q->packed || !q->event_idx)
        return;
    uint16_t used_event = ld16(q->driver + 4 + 2 * (uint32_t)q->size);
    if (used_event == q->used_idx)
        return;
    pthread_mutex_lock(DP_MU(dp));
    if (dp->call_fd >= 0) {
        uint64_t one = 1;
        ssize_t w = write(dp->call_fd, &one, sizeof one);
        (void)w;
        dp->rescues++;
    }
    pthread_mutex_unlock(DP_MU(dp));
}

#define BLK_DP_IDLE_MS 500

static int dp_wait(struct blk_dp *dp, int kick)
{
    struct pollfd p[2] = {{dp->wake_fd, POLLIN, 0}, {kick, POLLIN, 0}};
    int r = poll(p, kick >= 0 ? 2 : 1, kick >= 0 ? BLK_DP_IDLE_MS : -1);
    if (r == 0) {
        dp_rescue(dp);
        return 1;
    }
    if (r < 0)
        return errno == EINTR ? 1 : -errno;
    uint64_t v;
    if (p[0].revents & POLLIN) {
        ssize_t rr = read(dp->wake_fd, &v, sizeof v); /* stop, new fds, or room */
        (void)rr;
    }
    if (__atomic_load_n(&dp->stop, __ATOMIC_ACQUIRE))
        return 0;
    /* The kick fd may have been replaced (and the old number reused) while we
     * slept: only read the fd that is still the ring's kick, under the lock. */
    if (kick >= 0 && (p[1].revents & POLLIN)) {
        pthread_mutex_lock(DP_MU(dp)); /* blk_dp_set_fds cannot swap it meanwhile */
        if (kick == dp->kick_fd) {
            ssize_t rr = read(kick, &v, sizeof v);
            (void)rr;
            dp->kicks++;
        }
        pthread_mutex_unlock(DP_MU(dp));
    }
    return 1;
}

int blk_dp_run(struct blk_dp *dp)
{
    struct vq *q = dp->q;
    struct vq_chain *chains = calloc(BLK_DP_BATCH, sizeof *chains);
    struct vq_seg *segs = calloc(BLK_DP_MAX_SEGS, sizeof *segs);
    uint16_t ids[BLK_DP_BATCH], ndescs[BLK_DP_BATCH];
    uint32_t lens[BLK_DP_BATCH];
    int rc = 0;
    if (!chains || !segs) {
        rc = -ENOMEM;
        goto out;
    }
    for (;;) {
        if (__atomic_load_n(&dp->stop, __ATOMIC_ACQUIRE))
            goto out;
        if (!dp_room(dp)) { /* Python has not taken the deferred chains yet */
            int w = dp_wait(dp, -1);
            if (w <= 0) {
                rc = w;
                goto out;
            }
            continue;
        }
        vq_disable_notification(q);
        int more = 0;
        for (;;) {
            if (!dp_room(dp)) {
                more = 1;
                break;
            }
            int n = vq_pop_batch(q, chains, BLK_DP_BATCH, segs, BLK_DP_MAX_SEGS);
            if (n < 0) {
                rc = n; /* driver error (queue broken) or a chain beyond our segments */
                goto out;
            }
            if (n == 0)
                break;
            dp->batches++;
            uint32_t done = 0;
            for (int i = 0; i < n; i++)
                inflight_pop(dp, chains[i].head);
            for (int i = 0; i < n; i++) {
                int err = 0;
                uint32_t used = blk_serve(dp, &chains[i], segs + chains[i].seg_start, &err);
                if (!used) {
                    dp->io_errors += err != 0;
                    dp_defer(dp, &chains[i], segs + chains[i].seg_start, err);
                    continue;
                }
                ids[done] = chains[i].head;
                lens[done] = used;
                ndescs[done] = chains[i].ndesc;
                done++;
            }
            dp->requests += (uint64_t)n;
            if (done) {
                uint16_t used_idx = vq_add_used_batch_idx(q, ids, lens, ndescs, done);
                inflight_used(dp, ids, done, used_idx);
                if (vq_needs_notification(q)) {
                    pthread_mutex_lock(DP_MU(dp)); /* the fd stays open while we write */
                    if (dp->call_fd >= 0) {
                        uint64_t one = 1;
                        ssize_t w = write(dp->call_fd, &one, sizeof one);
                        (void)w;
                        dp->calls++;
                    }
                    pthread_mutex_unlock(DP_MU(dp));
                }
            }
            if (__atomic_load_n(&dp->stop, __ATOMIC_ACQUIRE))
                goto out;
        }
        if (more)
            continue;
        if (vq_enable_notification(q))
            continue;
        int w = dp_wait(dp, __atomic_load_n(&dp->kick_fd, __ATOMIC_ACQUIRE));
        if (w <= 0) {
            rc = w;
            goto out;
        }
    }
out:
    free(chains);
    free(segs);
    return rc;
}

int blk_dp_init(struct blk_dp *dp)
{
    return pthread_mutex_init(DP_MU(dp), NULL) ? -1 : 0;
}

/* Move up to max deferred chains (their segments, and the errno of each one's
 * failed I/O) out; returns how many. */
uint32_t blk_dp_take(struct blk_dp *dp, struct vq_chain *chains, uint32_t max, struct vq_seg *segs,
                     uint32_t max_segs, int32_t *errs)
{
    pthread_mutex_lock(DP_MU(dp));
    uint32_t n = 0, s = 0;
    while (n < dp->nd && n < max && s + dp->dchains[n].nsegs <= max_segs) {
        errs[n] = dp->derr[n];
        chains[n] = dp->dchains[n];
        memcpy(&segs[s], &dp->dsegs[chains[n].seg_start], chains[n].nsegs * sizeof *segs);
        chains[n].seg_start = s;
        s += chains[n].nsegs;
        n++;
    }
    /* Shift the rest down (rare: more than `max` deferred at once). */
    if (n < dp->nd) {
        uint32_t first_seg = dp->dchains[n].seg_start;
        for (uint32_t i = n; i < dp->nd; i++) {
            dp->derr[i - n] = dp->derr[i];
            dp->dchains[i - n] = dp->dchains[i];
            dp->dchains[i - n].seg_start -= first_seg;
        }
        memmove(dp->dsegs, &dp->dsegs[first_seg], (dp->nds - first_seg) * sizeof *segs);
        dp->nds -= first_seg;
    } else {
        dp->nds = 0;
    }
    dp->nd -= n;
    pthread_mutex_unlock(DP_MU(dp));
    return n;
}

/* Replace the ring's eventfds.  When this returns the thread no longer reads or
 * writes the old ones, so the caller may close them (it may still poll() an old
 * kick number until woken: harmless). */
void blk_dp_set_fds(struct blk_dp *dp, int kick, int call)
{
    pthread_mutex_lock(DP_MU(dp));
    dp->kick_fd = kick;
    dp->call_fd = call;
    pthread_mutex_unlock(DP_MU(dp));
}
