/* virtio-blk fast path for the native data plane (dataplane.c): IN, OUT and FLUSH
 * served without the Python interpreter (virtio 1.4 §5.2.6).
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
 * same after "fsyncgate"). */
#include <errno.h>
#include <string.h>
#include <sys/uio.h>
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
static uint32_t blk_serve(void *dev, const struct vq_chain *c, const struct vq_seg *segs, int *err)
{
    struct blk_dp *dp = dev;
    struct vq *q = dp->core.q;
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
    struct iovec iov[DP_MAX_SEGS];
    uint32_t used;
    if (type == VIRTIO_BLK_T_IN) {
        uint64_t len = c->writable_len - 1u;
        if (c->readable_len != BLK_HDR || len % BLK_SECTOR)
            return 0;
        uint64_t cap = __atomic_load_n(&dp->capacity, __ATOMIC_ACQUIRE);
        if (sector > cap || len / BLK_SECTOR > cap - sector)
            return 0;
        int n = build_iov(q, segs, c->nreadable, c->nsegs, 0, len, iov, DP_MAX_SEGS);
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
        int n = build_iov(q, segs, 0, c->nreadable, BLK_HDR, len, iov, DP_MAX_SEGS);
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

void blk_dp_attach(struct blk_dp *b)
{
    b->core.serve = blk_serve;
    b->core.dev = b;
}
