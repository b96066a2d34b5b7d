/* Generic native data plane: one thread per eventfd-notified virtqueue.
 *
 * The device-independent service loop of §2.7.10 / §2.8.21 (disable driver
 * notifications, pop a batch, serve, publish the used entries with one index
 * update, notify as EVENT_IDX / flags allow, re-enable and re-check before
 * sleeping), the eventfd wait, the hand-over ("deferral") of chains the device's
 * fast path does not serve to the Python device, vhost-user inflight marks, and the
 * lost-interrupt rescue.  A device supplies only `serve` (blk_dataplane.c).
 *
 * Threading: the thread holds no Python state.  Every used-ring update and pop
 * goes through the vq lock (vq_set_locking), so Python may complete deferred
 * chains concurrently; `mu` guards the deferred list and the eventfds. */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "dataplane.h"

#define DP_MU(dp) ((pthread_mutex_t *)(void *)(dp)->mu_storage)
_Static_assert(sizeof(((struct dp *)0)->mu_storage) >= sizeof(pthread_mutex_t), "mutex storage");
_Static_assert(sizeof(struct vu_inflight_split_hdr) == 16, "QueueRegionSplit header");
_Static_assert(sizeof(struct vu_inflight_desc_split) == 16, "DescStateSplit");

/* ---- inflight region ------------------------------------------------------------ */
static inline struct vu_inflight_desc_split *inflight_desc(uint8_t *region, uint16_t head)
{
    return (struct vu_inflight_desc_split *)(region + sizeof(struct vu_inflight_split_hdr)) + head;
}

void vu_inflight_pop(uint8_t *region, uint16_t desc_num, const uint16_t *heads, uint32_t n,
                     uint64_t *counter)
{
    for (uint32_t i = 0; i < n; i++) {
        if (heads[i] >= desc_num)
            continue;
        struct vu_inflight_desc_split *d = inflight_desc(region, heads[i]);
        d->counter = (*counter)++;
        __atomic_store_n(&d->inflight, (uint8_t)1, __ATOMIC_RELEASE);
    }
}

void vu_inflight_used(uint8_t *region, uint16_t desc_num, const uint16_t *heads, uint32_t n,
                      uint16_t used_idx)
{
    if (n == 0)
        return;
    struct vu_inflight_split_hdr *h = (struct vu_inflight_split_hdr *)region;
    uint16_t last = h->last_batch_head;
    for (uint32_t i = 0; i < n; i++) {
        if (heads[i] >= desc_num)
            continue;
        inflight_desc(region, heads[i])->next = last;
        last = heads[i];
    }
    h->last_batch_head = last;
    for (uint32_t i = 0; i < n; i++)
        if (heads[i] < desc_num)
            __atomic_store_n(&inflight_desc(region, heads[i])->inflight, (uint8_t)0,
                             __ATOMIC_RELEASE);
    __atomic_store_n(&h->used_idx, used_idx, __ATOMIC_RELEASE);
}

/* ---- deferral to Python --------------------------------------------------------- */
static void dp_defer(struct dp *dp, const struct vq_chain *c, const struct vq_seg *segs, int err)
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
    dp->io_errors += err != 0;
}

static int dp_room(struct dp *dp)
{
    pthread_mutex_lock(DP_MU(dp));
    int ok = dp->nd + DP_BATCH <= DP_DEFER_MAX && dp->nds + DP_MAX_SEGS <= DP_DEFER_SEGS;
    pthread_mutex_unlock(DP_MU(dp));
    return ok;
}

/* Move up to max deferred chains (their segments, and the errno of each one's
 * failed I/O) out; returns how many. */
uint32_t dp_take(struct dp *dp, struct vq_chain *chains, uint32_t max, struct vq_seg *segs,
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

/* ---- notifications -------------------------------------------------------------- */
static void dp_call(struct dp *dp, uint64_t *counter)
{
    pthread_mutex_lock(DP_MU(dp)); /* the fd stays open while we write */
    if (dp->call_fd >= 0) {
        uint64_t one = 1;
        ssize_t w = write(dp->call_fd, &one, sizeof one);
        (void)w;
        (*counter)++;
    }
    pthread_mutex_unlock(DP_MU(dp));
}

/* Idle for a while with used entries the driver has not acknowledged (split ring,
 * EVENT_IDX: the driver's used_event lags our used idx) means a used buffer
 * notification went missing -- e.g. around a back-end restart the front-end was
 * not listening yet.  Notify again: spurious notifications are allowed (§2.7.7.1). */
static void dp_rescue(struct dp *dp)
{
    struct vq *q = dp->q;
    if (q->packed || !q->event_idx)
        return;
    uint16_t used_event = vm_load_acquire_u16(q->driver + 4 + 2 * (uint32_t)q->size);
    if (used_event == q->used_idx)
        return;
    dp_call(dp, &dp->rescues);
}

#define DP_IDLE_MS 500

/* Wait for a kick (or, with kick < 0, only for a wake).  Returns 1 to go on, 0 to
 * stop, <0 on error. */
static int dp_wait(struct dp *dp, int kick)
{
    struct pollfd p[2] = {{dp->wake_fd, POLLIN, 0}, {kick, POLLIN, 0}};
    int r = poll(p, kick >= 0 ? 2 : 1, kick >= 0 ? DP_IDLE_MS : -1);
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
        pthread_mutex_lock(DP_MU(dp)); /* dp_set_fds cannot swap it meanwhile */
        if (kick == dp->kick_fd) {
            ssize_t rr = read(kick, &v, sizeof v);
            (void)rr;
            dp->kicks++;
        }
        pthread_mutex_unlock(DP_MU(dp));
    }
    return 1;
}

/* ---- the loop ------------------------------------------------------------------- */
int dp_run(struct dp *dp)
{
    struct vq *q = dp->q;
    struct vq_chain *chains = calloc(DP_BATCH, sizeof *chains);
    struct vq_seg *segs = calloc(DP_MAX_SEGS, sizeof *segs);
    uint16_t ids[DP_BATCH], ndescs[DP_BATCH], heads[DP_BATCH];
    uint32_t lens[DP_BATCH];
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
            int n = vq_pop_batch(q, chains, DP_BATCH, segs, DP_MAX_SEGS);
            if (n < 0) {
                rc = n; /* driver error (queue broken) or a chain beyond our segments */
                goto out;
            }
            if (n == 0)
                break;
            dp->batches++;
            if (dp->inflight) {
                for (int i = 0; i < n; i++)
                    heads[i] = chains[i].head;
                vu_inflight_pop(dp->inflight, dp->inflight_num, heads, (uint32_t)n,
                                &dp->inflight_counter);
            }
            uint32_t done = 0;
            for (int i = 0; i < n; i++) {
                int err = 0;
                uint32_t used = dp->serve(dp->dev, &chains[i], segs + chains[i].seg_start, &err);
                if (!used) {
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
                if (dp->inflight)
                    vu_inflight_used(dp->inflight, dp->inflight_num, ids, done, used_idx);
                if (vq_needs_notification(q))
                    dp_call(dp, &dp->calls);
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

int dp_init(struct dp *dp)
{
    return pthread_mutex_init(DP_MU(dp), NULL) ? -1 : 0;
}

void dp_destroy(struct dp *dp)
{
    pthread_mutex_destroy(DP_MU(dp));
}

/* Replace the ring's eventfds.  When this returns the thread no longer reads or
 * writes the old ones, so the caller may close them (it may still poll() an old
 * kick number until woken: harmless). */
void dp_set_fds(struct dp *dp, int kick, int call)
{
    pthread_mutex_lock(DP_MU(dp));
    dp->kick_fd = kick;
    dp->call_fd = call;
    pthread_mutex_unlock(DP_MU(dp));
}
