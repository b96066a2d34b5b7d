/* Per-queue statistics (struct vq_stats, vm_native.h): counted where the work is
 * done, on whichever thread does it, at a cost of a few stores per chain and one
 * clock read per batch.
 *
 * Writers: the ring core (vm_native.c) under the queue's lock when a data-plane
 * thread shares the queue (pop stamps, completions, latency, notifications); the
 * device's request counts (vq_stats_request) in two copies, one written by the
 * data-plane thread and one by Python, so no word has two writers.  Python reads the words as they are
 * (aligned 64-bit loads: each value is whole, the set is not a snapshot). */
#include <time.h>

static inline uint64_t vq_stats_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* One request of the device's kind `kind` (e.g. blk: in, out, flush, ...) finished
 * with the device's status index `status`, moving `bytes` of data; counted by the
 * data-plane thread (native) or by Python.  Out-of-range indices count in the last
 * slot ("other"). */
void vq_stats_request(struct vq_stats *s, int native, uint32_t kind, uint32_t status,
                      uint64_t bytes)
{
    if (!s)
        return;
    if (kind >= VQS_KINDS)
        kind = VQS_KINDS - 1;
    if (status >= VQS_STATUSES)
        status = VQS_STATUSES - 1;
    int p = native != 0;
    s->requests[p][kind]++;
    s->bytes[p][kind] += bytes;
    s->status[p][status]++;
}

/* n chains were popped now: stamp their heads -- for one popped batch in
 * sample_mask + 1 (a clock read costs ~0.1 us here, a whole request on the data
 * plane ~5 us of CPU); the other batches' heads are cleared (no sample). */
void vq_stats_popped(struct vq_stats *s, const struct vq_chain *chains, uint32_t n)
{
    if (!s || !n || !s->t0)
        return;
    uint64_t now = (s->pops++ & s->sample_mask) ? 0 : vq_stats_now();
    if (!now && !s->stamped)
        return; /* an unsampled pop, and no slot to clear */
    for (uint32_t i = 0; i < n; i++) { /* (an unsampled pop finds its slot cleared:
                                          * no store, which would queue behind the
                                          * data plane's stores to guest lines) */
        uint16_t h = chains[i].head;
        if (h < s->t0_size && s->t0[h] != now) {
            s->stamped += (uint32_t)(now != 0) - (uint32_t)(s->t0[h] != 0);
            s->t0[h] = now;
        }
    }
}

/* Count the latency of a stamped chain (*now: read once per publication, and only
 * when a stamped chain is in it). */
static inline void vq_stats_done(struct vq_stats *s, uint16_t id, uint64_t *now)
{
    if (!s->t0 || id >= s->t0_size || !s->t0[id])
        return; /* not sampled, or not popped (a resubmitted chain) */
    if (!*now)
        *now = vq_stats_now();
    uint64_t ns = *now > s->t0[id] ? *now - s->t0[id] : 0;
    s->t0[id] = 0;
    s->stamped--;
    uint64_t us = ns / 1000u;
    uint32_t b = us ? 64u - (uint32_t)__builtin_clzll(us) : 0u;
    if (b >= VQS_LAT_BUCKETS)
        b = VQS_LAT_BUCKETS - 1;
    s->latency[b]++;
    s->latency_sum_ns += ns;
    s->latency_count++;
}

/* n used entries were published now (ids: heads / buffer ids). */
void vq_stats_used(struct vq_stats *s, const uint16_t *ids, uint32_t n)
{
    if (!s || !n)
        return;
    uint64_t now = 0;
    for (uint32_t i = 0; s->stamped && i < n; i++)
        vq_stats_done(s, ids[i], &now);
    s->completed += n;
}

void vq_stats_used_chains(struct vq_stats *s, const struct vq_chain *chains, uint32_t n)
{
    if (!s || !n)
        return;
    uint64_t now = 0;
    for (uint32_t i = 0; s->stamped && i < n; i++)
        vq_stats_done(s, chains[i].head, &now);
    s->completed += n;
}

/* A used buffer notification decision: sent, or suppressed by the driver. */
void vq_stats_notify(struct vq_stats *s, int sent)
{
    if (!s)
        return;
    if (sent)
        s->notify_sent++;
    else
        s->notify_suppressed++;
}
