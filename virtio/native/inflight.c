/* vhost-user inflight I/O tracking: marking the shared regions (layout: inflight.h).
 *
 * Split rings: the data plane (dataplane.c) and Python mark heads popped and used.
 * Packed rings: the queue core (vm_native.c) calls the vu_ifp_* functions under the
 * queue's lock while it pops and publishes, following vhost-user.rst's procedure for
 * QueueRegionPacked: a pop copies each descriptor into an entry from the free list
 * and moves old_free_head past the chain only once it is complete; a used batch
 * returns the chains' entries to the free list and advances used_idx *before* the
 * ring shows the batch, clears the chains' inflight marks after, then sets the old_*
 * fields (the commit).  Recovery is in Python (inflight.py). */

#define IFP_NONE 0xFFFFu

/* ---- split ------------------------------------------------------------------------ */
_Static_assert(sizeof(struct vu_inflight_split_hdr) == 16, "QueueRegionSplit header");
_Static_assert(sizeof(struct vu_inflight_desc_split) == 16, "DescStateSplit");

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

/* ---- packed ----------------------------------------------------------------------- */
_Static_assert(sizeof(struct vu_inflight_packed_hdr) == 32, "QueueRegionPacked header");
_Static_assert(sizeof(struct vu_inflight_desc_packed) == 32, "DescStatePacked");

static inline struct vu_inflight_packed_hdr *ifp_hdr(uint8_t *region)
{
    return (struct vu_inflight_packed_hdr *)region;
}

static inline struct vu_inflight_desc_packed *ifp_desc(uint8_t *region, uint16_t i)
{
    return (struct vu_inflight_desc_packed *)(region + sizeof(struct vu_inflight_packed_hdr)) + i;
}

/* A fresh region: every entry free (linked in index order), nothing in flight. */
void vu_inflight_packed_init(uint8_t *region, uint16_t desc_num, uint16_t used_idx,
                             uint8_t used_wrap)
{
    memset(region, 0, sizeof(struct vu_inflight_packed_hdr) +
                          (size_t)desc_num * sizeof(struct vu_inflight_desc_packed));
    for (uint32_t i = 0; i < desc_num; i++)
        ifp_desc(region, (uint16_t)i)->next = (uint16_t)(i + 1); /* desc_num: end */
    struct vu_inflight_packed_hdr *h = ifp_hdr(region);
    h->features = 1ull << VIRTIO_F_RING_PACKED_BIT;
    h->desc_num = desc_num;
    h->used_idx = h->old_used_idx = used_idx;
    h->used_wrap_counter = h->old_used_wrap_counter = used_wrap;
    __atomic_store_n(&h->version, (uint16_t)1, __ATOMIC_RELEASE);
}

void vu_ifp_pop_desc(struct vu_inflight_packed *ip, const uint8_t *d, int first)
{
    struct vu_inflight_packed_hdr *h = ifp_hdr(ip->region);
    if (first)
        ip->overflow = 0;
    if (ip->overflow)
        return;
    uint16_t head = h->old_free_head, slot = h->free_head;
    if (head >= ip->desc_num || slot >= ip->desc_num) {
        ip->overflow = 1; /* more descriptors outstanding than the ring has */
        return;
    }
    struct vu_inflight_desc_packed *e = ifp_desc(ip->region, head);
    if (first) {
        e->num = 0;
        e->counter = ip->counter;
        __atomic_store_n(&e->inflight, (uint8_t)1, __ATOMIC_RELEASE);
    }
    e->last = slot;
    e->num++;
    struct vu_inflight_desc_packed *s = ifp_desc(ip->region, slot);
    memcpy(&s->addr, d, 8);
    memcpy(&s->len, d + 8, 4);
    memcpy(&s->id, d + 12, 2);
    memcpy(&s->flags, d + 14, 2);
    h->free_head = s->next;
}

/* The chain is complete (ok) or was not consumed: commit or undo its entries. */
void vu_ifp_pop_end(struct vu_inflight_packed *ip, uint16_t id, int ok)
{
    struct vu_inflight_packed_hdr *h = ifp_hdr(ip->region);
    uint16_t head = h->old_free_head;
    if (!ok || ip->overflow || id >= ip->desc_num || head >= ip->desc_num) {
        if (ok)
            ip->untracked++;
        h->free_head = head;
        if (head < ip->desc_num)
            __atomic_store_n(&ifp_desc(ip->region, head)->inflight, (uint8_t)0, __ATOMIC_RELEASE);
        return;
    }
    ip->head_of[id] = head;
    ip->counter++;
    __atomic_store_n(&h->old_free_head, h->free_head, __ATOMIC_RELEASE);
}

/* Before the ring shows the batch: its chains' entries go back to the free list and
 * used_idx moves to where the batch ends. */
void vu_ifp_used_prepare(struct vu_inflight_packed *ip, const uint16_t *ids, uint32_t n,
                         uint16_t used_idx, uint8_t used_wrap)
{
    struct vu_inflight_packed_hdr *h = ifp_hdr(ip->region);
    for (uint32_t i = 0; i < n; i++) {
        uint16_t id = ids[i];
        if (id >= ip->desc_num || ip->head_of[id] >= ip->desc_num)
            continue;
        uint16_t head = ip->head_of[id];
        struct vu_inflight_desc_packed *e = ifp_desc(ip->region, head);
        if (e->last < ip->desc_num)
            ifp_desc(ip->region, e->last)->next = h->free_head;
        h->free_head = head;
    }
    h->used_idx = used_idx;
    __atomic_store_n(&h->used_wrap_counter, used_wrap, __ATOMIC_RELEASE);
}

/* After the ring shows the batch: the chains are done; commit the batch. */
void vu_ifp_used_commit(struct vu_inflight_packed *ip, const uint16_t *ids, uint32_t n)
{
    struct vu_inflight_packed_hdr *h = ifp_hdr(ip->region);
    for (uint32_t i = 0; i < n; i++) {
        uint16_t id = ids[i];
        if (id >= ip->desc_num || ip->head_of[id] >= ip->desc_num)
            continue;
        __atomic_store_n(&ifp_desc(ip->region, ip->head_of[id])->inflight, (uint8_t)0,
                         __ATOMIC_RELEASE);
        ip->head_of[id] = IFP_NONE;
    }
    h->old_free_head = h->free_head;
    h->old_used_idx = h->used_idx;
    __atomic_store_n(&h->old_used_wrap_counter, h->used_wrap_counter, __ATOMIC_RELEASE);
}
