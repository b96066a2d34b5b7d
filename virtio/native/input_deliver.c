/* virtio-input: deliver one group of events to the eventq in one call (virtio 1.4
 * §5.8.6), the native counterpart of VirtioInput's Python delivery (the reference).
 *
 * `events` holds n `struct virtio_input_event`s (le16 type, le16 code, le32 value,
 * 8 bytes each, packed by the caller).  The group goes out whole or not at all
 * (devicenormative §5.8.6.2): n available chains are popped, each must be a
 * device-writable buffer of at least 8 bytes (drivernormative §5.8.6.1), event i is
 * written into chain i, and the n used entries are published with one used-index
 * store (§2.7.8 split, §2.8.21 packed), after which the driver's suppression
 * settings (§2.7.7 / §2.8.10, EVENT_IDX aware) decide the notification.
 *
 * Returns n (delivered; out->notify, out->stored_ns set), 0 when fewer than n chains
 * are available (nothing popped), or INPUT_DELIVER_FALLBACK when anything is unusual:
 * a chain that fails validation, a buffer that is readable or shorter than an event,
 * more segments or events than this path handles, a packed ring whose pops the core
 * marks in a vhost-user inflight region (a pop could not be undone there).
 * The ring position is then restored exactly, so the Python path pops the same chains
 * and reports the driver's error (or handles the case) as it always did. */
#include <time.h>

#include "input_deliver.h"

#define INPUT_SEGS_PER_CHAIN 4

static void input_write_event(struct vq *q, const struct vq_chain *c, const struct vq_seg *segs,
                              const uint8_t *ev)
{
    uint32_t left = INPUT_EVENT_SIZE;
    for (uint32_t s = c->nreadable; s < c->nsegs && left; s++) {
        const struct vq_seg *g = &segs[c->seg_start + s];
        uint32_t k = g->len < left ? g->len : left;
        memcpy(q->mem->regions[g->region].host + g->offset, ev, k);
        vm_log_dirty(q->mem, g->gpa, k);
        ev += k;
        left -= k;
    }
}

static int input_deliver_u(struct vq *q, const uint8_t *events, uint32_t n,
                           struct input_delivery *out)
{
    struct vq_chain chains[INPUT_DELIVER_MAX];
    struct vq_seg segs[INPUT_DELIVER_MAX * INPUT_SEGS_PER_CHAIN];
    uint16_t ndescs[INPUT_DELIVER_MAX];
    uint16_t *ids = out->heads;
    uint32_t lens[INPUT_DELIVER_MAX];

    if (q->broken || q->inflight || n == 0 || n > INPUT_DELIVER_MAX)
        return INPUT_DELIVER_FALLBACK;
    if (vq_avail_chains_u(q, n) < n)
        return 0;
    /* Where the ring was: restored if the group cannot go out here. */
    uint16_t last_avail_idx = q->last_avail_idx, next_avail = q->next_avail;
    uint8_t avail_wrap = q->avail_wrap;
    uint64_t popped = q->popped;
    int rc = q->packed ? packed_pop_batch(q, chains, n, segs, INPUT_DELIVER_MAX * INPUT_SEGS_PER_CHAIN)
                       : split_pop_batch(q, chains, n, segs, INPUT_DELIVER_MAX * INPUT_SEGS_PER_CHAIN);
    int ok = rc == (int)n;
    for (uint32_t i = 0; ok && i < n; i++)
        ok = chains[i].readable_len == 0 && chains[i].writable_len >= INPUT_EVENT_SIZE;
    if (!ok) {
        q->last_avail_idx = last_avail_idx;
        q->next_avail = next_avail;
        q->avail_wrap = avail_wrap;
        q->popped = popped;
        q->broken = 0; /* it was not broken before: the Python path finds the error again */
        q->error = 0;
        return INPUT_DELIVER_FALLBACK;
    }
    if (q->stats)
        vq_stats_popped(q->stats, chains, n);
    for (uint32_t i = 0; i < n; i++) {
        input_write_event(q, &chains[i], segs, events + INPUT_EVENT_SIZE * i);
        ids[i] = chains[i].head;
        ndescs[i] = chains[i].ndesc;
        lens[i] = INPUT_EVENT_SIZE;
    }
    vq_add_used_batch_u(q, ids, lens, ndescs, n); /* the events are stored before the index */
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    out->stored_ns = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
    out->notify = (uint32_t)vq_needs_notification_u(q);
    return (int)n;
}

int input_deliver(struct vq *q, const uint8_t *events, uint32_t n, struct input_delivery *out)
{
    VQ_LOCK(q);
    int r = input_deliver_u(q, events, n, out);
    VQ_UNLOCK(q);
    return r;
}
