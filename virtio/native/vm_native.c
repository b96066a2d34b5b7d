/* Native core of the virtqueue engine: see vm_native.h.  Spec: OASIS virtio 1.4
 * CS01, §2.7 (split virtqueues) and §2.8 (packed virtqueues).  Guest memory is
 * little-endian (virtio 1.x, §1.4); this file assumes a little-endian host. */
#include <string.h>
#include "vm_native.h"
#include "inflight.h"

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the native virtqueue core assumes a little-endian host"
#endif

/* Spec constants, generated from virtio.spec by the build (build.py). */
/* VM_SPEC_DEFINES */

#define PAGE_SHIFT 12

/* ---- guest memory -------------------------------------------------------------- */

static inline int vm_find(struct vm_mem *m, uint64_t gpa)
{
    uint32_t i = m->last_hit;
    if (i < m->nregions && gpa - m->regions[i].gpa < m->regions[i].size)
        return (int)i;
    for (i = 0; i < m->nregions; i++) {
        if (gpa - m->regions[i].gpa < m->regions[i].size) {
            m->last_hit = i;
            return (int)i;
        }
    }
    return -1;
}

/* Host pointer for [gpa, gpa+len) if it lies inside ONE region, else NULL.
 * len == 0 is treated as len == 1 for the lookup. */
uint8_t *vm_translate(struct vm_mem *m, uint64_t gpa, uint64_t len, uint32_t *region_out)
{
    int i = vm_find(m, gpa);
    if (i < 0)
        return NULL;
    struct vm_region *r = &m->regions[i];
    uint64_t off = gpa - r->gpa;
    if (len > r->size - off)
        return NULL;
    if (region_out)
        *region_out = (uint32_t)i;
    return r->host + off;
}

/* Whether [gpa, gpa+len) is guest memory, possibly made of several regions that are
 * adjacent in guest-physical space (the spec only asks for guest-physical contiguity). */
int vm_range_ok(struct vm_mem *m, uint64_t gpa, uint64_t len)
{
    if (len && gpa + len < gpa)
        return 0;
    do {
        int i = vm_find(m, gpa);
        if (i < 0)
            return 0;
        uint64_t n = m->regions[i].size - (gpa - m->regions[i].gpa);
        if (n >= len)
            return 1;
        gpa += n;
        len -= n;
    } while (len);
    return 1;
}

/* Copy [gpa, gpa+len) into dst across adjacent regions; 0, or -1 outside guest memory. */
static int vm_read(struct vm_mem *m, uint64_t gpa, uint8_t *dst, uint64_t len)
{
    while (len) {
        int i = vm_find(m, gpa);
        if (i < 0)
            return -1;
        struct vm_region *r = &m->regions[i];
        uint64_t off = gpa - r->gpa, n = r->size - off;
        if (n > len)
            n = len;
        memcpy(dst, r->host + off, n);
        dst += n;
        gpa += n;
        len -= n;
    }
    return 0;
}

void vm_log_dirty(struct vm_mem *m, uint64_t gpa, uint64_t len)
{
    if (!m->dirty_log || len == 0)
        return;
    uint64_t first = gpa >> PAGE_SHIFT, last = (gpa + len - 1) >> PAGE_SHIFT;
    for (uint64_t p = first; p <= last; p++) {
        if ((p >> 3) >= m->dirty_log_size)
            break;
        __atomic_fetch_or(&m->dirty_log[p >> 3], (uint8_t)(1u << (p & 7)), __ATOMIC_RELAXED);
    }
}

uint16_t vm_load_acquire_u16(const uint8_t *p) { return __atomic_load_n((const uint16_t *)p, __ATOMIC_ACQUIRE); }
uint32_t vm_load_acquire_u32(const uint8_t *p) { return __atomic_load_n((const uint32_t *)p, __ATOMIC_ACQUIRE); }
void vm_store_release_u16(uint8_t *p, uint16_t v) { __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELEASE); }
void vm_store_release_u32(uint8_t *p, uint32_t v) { __atomic_store_n((uint32_t *)p, v, __ATOMIC_RELEASE); }
void vm_fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

static inline uint16_t ld16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t ld32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t ld64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline void st16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }
static inline void st32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }

static int vq_fail(struct vq *q, int err, uint64_t a, uint64_t b, uint64_t c)
{
    q->broken = 1;
    q->error = err;
    q->err_a = a;
    q->err_b = b;
    q->err_c = c;
    return err;
}

/* ---- chain building (shared) ----------------------------------------------------- */

struct walk {
    struct vq_chain *chain;
    struct vq_seg *segs;
    uint32_t nseg, max_segs;
    uint64_t total;
    int seen_writable;
};

/* Append the buffer [addr, addr+len) to the chain, split at region borders. */
static inline __attribute__((always_inline)) int walk_add(struct vq *q, struct walk *w, uint64_t addr,
                                                        uint32_t len, int writable)
{
    if (writable)
        w->seen_writable = 1;
    else if (w->seen_writable)
        return vq_fail(q, VQ_E_ORDER, addr, len, 0);
    w->total += len;
    if (w->total > 0xffffffffull)
        return vq_fail(q, VQ_E_TOO_BIG, w->total, 0, 0);
    if (writable)
        w->chain->writable_len += len;
    else
        w->chain->readable_len += len;
    uint64_t a = addr, left = len;
    if (left && a + left < a)
        return vq_fail(q, VQ_E_MEMORY, addr, len, 0);
    while (left) {
        int i = vm_find(q->mem, a);
        if (i < 0)
            return vq_fail(q, VQ_E_MEMORY, addr, len, 0);
        struct vm_region *r = &q->mem->regions[i];
        uint64_t off = a - r->gpa, n = r->size - off;
        if (n > left)
            n = left;
        if (w->nseg >= w->max_segs)
            return VQ_E_SEGS;
        struct vq_seg *s = &w->segs[w->nseg++];
        s->gpa = a;
        s->offset = off;
        s->len = (uint32_t)n;
        s->region = (uint16_t)i;
        s->writable = (uint16_t)(writable != 0);
        w->chain->nsegs++;
        if (!writable)
            w->chain->nreadable++;
        a += n;
        left -= n;
    }
    return 0;
}

/* Walk an indirect table (§2.7.5.3 split / §2.8.7 packed).  `packed` selects the
 * descriptor layout; split tables follow NEXT links, packed ones are sequential.
 * The table is `len` bytes at guest-physical `addr`: it may cross from one memory
 * region into an adjacent one, and then each descriptor is gathered from the regions
 * (still read exactly once, into a local copy). */
static int walk_indirect(struct vq *q, struct walk *w, uint64_t addr, uint32_t len, int packed)
{
    if (len == 0 || len % 16)
        return vq_fail(q, VQ_E_INDIRECT_LEN, addr, len, 0);
    uint64_t n = len / 16;
    if (n > 65536)
        return vq_fail(q, VQ_E_INDIRECT_LEN, addr, len, 0);
    const uint8_t *table = vm_translate(q->mem, addr, len, NULL);
    if (!table && !vm_range_ok(q->mem, addr, len))
        return vq_fail(q, VQ_E_INDIRECT_MEMORY, addr, len, 0);
    uint32_t idx = 0, count = 0;
    for (;;) {
        if (count++ >= n)
            return vq_fail(q, VQ_E_INDIRECT_LOOP, addr, n, 0);
        uint8_t d[16];
        if (table)
            memcpy(d, table + (uint64_t)idx * 16, 16);
        else if (vm_read(q->mem, addr + (uint64_t)idx * 16, d, 16))
            return vq_fail(q, VQ_E_INDIRECT_MEMORY, addr, len, 0);
        uint64_t daddr = ld64(d);
        uint32_t dlen = ld32(d + 8);
        uint16_t flags = packed ? ld16(d + 14) : ld16(d + 12);
        uint16_t next = packed ? 0 : ld16(d + 14);
        if (flags & VRING_DESC_F_INDIRECT)
            return vq_fail(q, VQ_E_INDIRECT_NESTED, idx, 0, 0);
        int rc = walk_add(q, w, daddr, dlen, flags & VRING_DESC_F_WRITE);
        if (rc)
            return rc;
        if (packed) {
            if (++idx >= n)
                return 0;
            continue;
        }
        if (!(flags & VRING_DESC_F_NEXT))
            return 0;
        if (next >= n)
            return vq_fail(q, VQ_E_NEXT_RANGE, next, n, 1);
        idx = next;
    }
}

/* ---- split ring (§2.7) ------------------------------------------------------------ */

#define SPLIT_AVAIL_IDX(q) ((q)->driver + 2)
#define SPLIT_AVAIL_RING(q, i) ((q)->driver + 4 + 2 * (uint32_t)(i))
#define SPLIT_USED_EVENT(q) ((q)->driver + 4 + 2 * (uint32_t)(q)->size)
#define SPLIT_USED_IDX(q) ((q)->device + 2)
#define SPLIT_USED_ELEM(q, i) ((q)->device + 4 + 8 * (uint32_t)(i))
#define SPLIT_AVAIL_EVENT(q) ((q)->device + 4 + 8 * (uint32_t)(q)->size)

/* A chain of one descriptor: its buffer, at `off` in region `ri`, as segment s. */
static inline __attribute__((always_inline)) void vq_fill_one(struct vq_chain *c, struct vq_seg *s,
                                                              uint32_t seg_used, uint32_t ri,
                                                              uint64_t addr, uint64_t off,
                                                              uint32_t len, int writable)
{
    c->ndesc = 1;
    c->nsegs = 1;
    c->nreadable = !writable;
    c->readable_len = writable ? 0 : len;
    c->writable_len = writable ? len : 0;
    c->seg_start = seg_used;
    s->gpa = addr;
    s->offset = off;
    s->len = len;
    s->region = (uint16_t)ri;
    s->writable = (uint16_t)writable;
}
/* Whether a descriptor is the usual chain: neither NEXT nor INDIRECT, a non-empty
 * buffer at `off` (its address less the region's gpa) inside a region of rsize
 * bytes.  The one test of vq_chain_one and the pop loops. */
static inline __attribute__((always_inline)) int vq_is_one(uint16_t flags, uint32_t len,
                                                           uint64_t off, uint64_t rsize)
{
    return !(flags & (VRING_DESC_F_NEXT | VRING_DESC_F_INDIRECT)) && len && off < rsize &&
           len <= rsize - off;
}
/* Descriptor d (flags already read), buffer ID / head `id`, as chain c with segment
 * s if it is the usual chain in region ri ([gpa, gpa + rsize)): 1, else 0 (nothing
 * written).  The pop loops' step. */
static inline __attribute__((always_inline)) int vq_take_one(const uint8_t *d, uint16_t flags,
                                                             uint16_t id, uint32_t ri,
                                                             uint64_t gpa, uint64_t rsize,
                                                             struct vq_chain *c, struct vq_seg *s,
                                                             uint32_t seg_used)
{
    uint64_t addr = ld64(d), off = addr - gpa;
    uint32_t len = ld32(d + 8);
    if (!vq_is_one(flags, len, off, rsize))
        return 0;
    vq_fill_one(c, s, seg_used, ri, addr, off, len, (flags & VRING_DESC_F_WRITE) != 0);
    c->head = id;
    return 1;
}
/* The usual chain (vq_is_one) in the region vm_find would try first.  Written as
 * walk_add would write it, without the general walk; 0 leaves everything else (and
 * every error) to it. */
static inline __attribute__((always_inline)) int vq_chain_one(struct vq *q, struct vq_chain *c,
                                                             struct vq_seg *s, uint32_t seg_used,
                                                             uint32_t max_segs, uint64_t addr,
                                                             uint32_t len, uint16_t flags)
{
    const struct vm_mem *m = q->mem;
    uint32_t ri = m->last_hit;
    if (seg_used >= max_segs || ri >= m->nregions)
        return 0;
    uint64_t off = addr - m->regions[ri].gpa;
    if (!vq_is_one(flags, len, off, m->regions[ri].size))
        return 0;
    vq_fill_one(c, s, seg_used, ri, addr, off, len, (flags & VRING_DESC_F_WRITE) != 0);
    return 1;
}

static int split_walk(struct vq *q, struct walk *w, uint16_t head)
{
    if (head >= q->size)
        return vq_fail(q, VQ_E_HEAD_RANGE, head, q->size, 0);
    uint32_t idx = head, count = 0;
    for (;;) {
        if (count++ >= q->size)
            return vq_fail(q, VQ_E_LOOP, head, q->size, 0);
        uint8_t d[16];
        memcpy(d, q->desc + idx * 16u, 16); /* read once: the driver may race us */
        uint64_t addr = ld64(d);
        uint32_t len = ld32(d + 8);
        uint16_t flags = ld16(d + 12), next = ld16(d + 14);
        if (flags & VRING_DESC_F_INDIRECT) {
            if (!q->indirect)
                return vq_fail(q, VQ_E_INDIRECT_NOTNEG, idx, 0, 0);
            if (flags & VRING_DESC_F_NEXT)
                return vq_fail(q, VQ_E_INDIRECT_NEXT, idx, 0, 0);
            return walk_indirect(q, w, addr, len, 0);
        }
        int rc = walk_add(q, w, addr, len, flags & VRING_DESC_F_WRITE);
        if (rc)
            return rc;
        if (!(flags & VRING_DESC_F_NEXT))
            return 0;
        if (next >= q->size)
            return vq_fail(q, VQ_E_NEXT_RANGE, next, q->size, 0);
        idx = next;
    }
}

/* An unproven ring (vm_native.h) whose avail idx is `avail_idx` (`n` ahead of the
 * device): 1 if that is impossible (§2.7.6: at most the queue size ahead) and is to
 * be ignored -- the ring is left alone until the driver kicks; a valid idx proves
 * the ring. */
static int split_avail_stale(struct vq *q, uint16_t avail_idx, uint16_t n)
{
    if (!q->unproven)
        return 0;
    if (n > q->size) {
        q->stale = 1;
        q->stale_avail = avail_idx;
        return 1;
    }
    q->unproven = 0;
    q->stale = 0;
    return 0;
}

/* Ring prefetching (packed_prefetch_ring, split_pop_batch) */
#define VQ_PF_AHEAD 8   /* descriptors beyond the batch */
#define VQ_PF_MAX 128   /* descriptors prefetched at most per pop */
#define VQ_PF_HEADS 4   /* split rings: head descriptors prefetched this far ahead */
static int split_pop_batch(struct vq *q, struct vq_chain *chains, uint32_t nchains,
                           struct vq_seg *segs, uint32_t max_segs)
{
    uint16_t avail_idx = vm_load_acquire_u16(SPLIT_AVAIL_IDX(q));
    uint16_t n = (uint16_t)(avail_idx - q->last_avail_idx);
    if (split_avail_stale(q, avail_idx, n))
        return 0;
    if (n > q->size)
        return vq_fail(q, VQ_E_AVAIL_IDX, avail_idx, q->last_avail_idx, q->size);
    uint32_t done = 0, seg_used = 0;
    /* the available entries this pop takes, then, chain by chain,
     * the head descriptor VQ_PF_HEADS entries ahead (see packed_prefetch_ring) */
    q->avail_idx_seen = avail_idx;
    uint32_t pf = nchains < n ? nchains : n; /* published entries only: the driver
                                              * may be writing the ones after them */
    for (uint32_t k = 0; k < pf && k < VQ_PF_MAX; k += 32)
        __builtin_prefetch(SPLIT_AVAIL_RING(q, (uint16_t)(q->last_avail_idx + k) % q->size), 0, 3);
    const struct vm_mem *m = q->mem;
    const uint32_t ri = m->last_hit;
    if (ri < m->nregions && !(q->size & (q->size - 1))) {
        /* The usual chains (vq_chain_one's), as packed_pop_batch takes them: locals
         * for the ring and the region, the size a power of 2 (§2.7: always, checked
         * where the ring is set up) for a mask instead of a division per entry.
         * The first other chain ends this loop. */
        const uint8_t *const desc = q->desc, *const ring = SPLIT_AVAIL_RING(q, 0);
        const uint16_t size = q->size, mask = (uint16_t)(size - 1);
        const uint64_t gpa = m->regions[ri].gpa, rsize = m->regions[ri].size;
        uint16_t last = q->last_avail_idx;
        while (done < nchains && n && seg_used < max_segs) {
            if (n > VQ_PF_HEADS) {
                uint16_t ahead = ld16(ring + 2u * ((uint16_t)(last + VQ_PF_HEADS) & mask));
                if (ahead < size)
                    __builtin_prefetch(desc + ahead * 16u, 0, 3);
            }
            uint16_t head = ld16(ring + 2u * (last & mask));
            if (head >= size)
                break;
            const uint8_t *d = desc + head * 16u;
            if (!vq_take_one(d, ld16(d + 12), head, ri, gpa, rsize, &chains[done],
                             &segs[seg_used], seg_used))
                break;
            done++;
            seg_used++;
            last++;
            n--;
        }
        q->last_avail_idx = last;
    }
    while (done < nchains && n) {
        if (n > VQ_PF_HEADS) {
            uint16_t ahead = ld16(SPLIT_AVAIL_RING(q, (uint16_t)(q->last_avail_idx + VQ_PF_HEADS) % q->size));
            if (ahead < q->size)
                __builtin_prefetch(q->desc + ahead * 16u, 0, 3);
        }
        uint16_t head = ld16(SPLIT_AVAIL_RING(q, q->last_avail_idx % q->size));
        struct vq_chain *c = &chains[done];
        if (head < q->size) {
            const uint8_t *d1 = q->desc + head * 16u; /* each field read once */
            uint64_t a1 = ld64(d1);
            uint32_t l1 = ld32(d1 + 8);
            uint16_t f1 = ld16(d1 + 12);
            if (vq_chain_one(q, c, segs + seg_used, seg_used, max_segs, a1, l1, f1)) {
                c->head = head;
                seg_used++;
                q->last_avail_idx++;
                n--;
                done++;
                continue;
            }
        }
        memset(c, 0, sizeof *c);
        c->head = head;
        c->ndesc = 1;
        c->seg_start = seg_used;
        struct walk w = {c, segs + seg_used, 0, max_segs - seg_used, 0, 0};
        int rc = split_walk(q, &w, head);
        if (rc == VQ_E_SEGS) {
            if (done == 0)
                return VQ_E_SEGS;
            break; /* no room for this chain in the batch: leave it for the next call */
        }
        if (rc) {
            if (!done)
                return rc;
            /* Deliver the good chains first; the bad one fails the next call. */
            q->broken = 0;
            q->error = 0;
            break;
        }
        seg_used += w.nseg;
        q->last_avail_idx++;
        n--;
        done++;
    }
    q->popped += done;
    return (int)done;
}

static int split_add_used_batch(struct vq *q, const uint16_t *ids, const uint32_t *lens, uint32_t n)
{
    uint16_t used = q->used_idx;
    for (uint32_t i = 0; i < n; i++) {
        uint8_t *e = SPLIT_USED_ELEM(q, (uint16_t)(used + i) % q->size);
        st32(e, ids[i]);
        st32(e + 4, lens[i]);
    }
    vm_log_dirty(q->mem, q->device_gpa + 4, 8ull * q->size);
    q->used_idx = (uint16_t)(used + n);
    vm_store_release_u16(SPLIT_USED_IDX(q), q->used_idx); /* §2.7.8.2: elements before idx */
    vm_log_dirty(q->mem, q->device_gpa + 2, 2);
    return 0;
}

static inline int need_event(uint16_t event, uint16_t new_idx, uint16_t old)
{
    /* §2.7.10 / §2.7.8: notify iff event lies in [old, new). */
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old);
}

/* ---- packed ring (§2.8) ----------------------------------------------------------- */

static inline int packed_is_avail(uint16_t flags, uint8_t wrap)
{
    int avail = !!(flags & VRING_PACKED_DESC_F_AVAIL), used = !!(flags & VRING_PACKED_DESC_F_USED);
    return avail != used && avail == wrap;
}

/* One descriptor of a packed chain (a local copy `d`, ring slot or recorded):
 * indirect table or buffer.  Returns a VQ_E_* code or 0; *end is set when the
 * chain ends with it. */
static int packed_chain_desc(struct vq *q, struct walk *w, const uint8_t *d, uint16_t ndesc,
                             uint16_t slot, int *end)
{
    uint16_t flags = ld16(d + 14);
    uint64_t addr = ld64(d);
    uint32_t len = ld32(d + 8);
    *end = 1;
    if (flags & VRING_DESC_F_INDIRECT) {
        if (!q->indirect)
            return vq_fail(q, VQ_E_INDIRECT_NOTNEG, slot, 0, 1);
        /* §2.8.19: no INDIRECT descriptor in a list linked by NEXT, neither
         * with NEXT itself nor at its end (unlike split rings, §2.7.5.3.2). */
        if ((flags & VRING_DESC_F_NEXT) || ndesc > 1)
            return vq_fail(q, VQ_E_INDIRECT_NEXT, slot, 0, 1);
        return walk_indirect(q, w, addr, len, 1);
    }
    int rc = walk_add(q, w, addr, len, flags & VRING_DESC_F_WRITE);
    *end = rc || !(flags & VRING_DESC_F_NEXT);
    return rc;
}

/* Start fetching the ring's lines a pop will read: the driver wrote them on
 * another CPU, and one descriptor read at a time leaves each miss exposed.  A
 * batch prefetches what it may take (a descriptor per chain, plus a little); a
 * pop of one chain (a receive buffer per frame) the line two ahead.  Only an
 * address inside the ring is formed; a prefetch never faults. */
static inline void packed_prefetch_ring(const struct vq *q, uint32_t nchains)
{
    uint32_t from = nchains > 1 ? 0 : VQ_PF_AHEAD, to = nchains + VQ_PF_AHEAD;
    if (to > VQ_PF_MAX)
        to = VQ_PF_MAX;
    if (to > q->size)
        to = q->size;
    for (uint32_t k = from; k < to; k += 4) {
        uint32_t slot = q->next_avail + k;
        if (slot >= q->size)
            slot -= q->size;
        __builtin_prefetch(q->desc + slot * 16u, 0, 3);
    }
}

static int packed_pop_batch(struct vq *q, struct vq_chain *chains, uint32_t nchains,
                            struct vq_seg *segs, uint32_t max_segs)
{
    uint32_t done = 0, seg_used = 0;
    packed_prefetch_ring(q, nchains);
    struct vu_inflight_packed *ip = q->inflight;
    const struct vm_mem *m = q->mem;
    const uint32_t ri = m->last_hit;
    if (!ip && ri < m->nregions) {
        /* The usual chains, one descriptor each in the region vm_find would try
         * first (vq_chain_one's), with the ring position and the region in locals:
         * the stores into chains and segs may alias *q, whose fields would be
         * read again after each.  The first other descriptor ends this loop. */
        const uint8_t *const desc = q->desc;
        const uint16_t size = q->size;
        const uint64_t gpa = m->regions[ri].gpa, rsize = m->regions[ri].size;
        uint16_t pos = q->next_avail;
        uint8_t wrap = q->avail_wrap;
        while (done < nchains && seg_used < max_segs) {
            const uint8_t *d = desc + pos * 16u;
            uint16_t flags = vm_load_acquire_u16(d + 14);
            if (!packed_is_avail(flags, wrap) ||
                !vq_take_one(d, flags, ld16(d + 12) /* §2.8.6: the buffer ID */, ri, gpa,
                             rsize, &chains[done], &segs[seg_used], seg_used))
                break;
            done++;
            seg_used++;
            if (++pos >= size) {
                pos = 0;
                wrap ^= 1;
            }
        }
        q->next_avail = pos;
        q->avail_wrap = wrap;
    }
    while (done < nchains) {
        uint16_t pos = q->next_avail;
        uint8_t wrap = q->avail_wrap;
        uint16_t flags = vm_load_acquire_u16(q->desc + pos * 16u + 14);
        if (!packed_is_avail(flags, wrap))
            break;
        struct vq_chain *c = &chains[done];
        const uint8_t *d1 = q->desc + pos * 16u; /* each field read once */
        uint64_t a1 = ld64(d1);
        uint32_t l1 = ld32(d1 + 8);
        uint16_t id1 = ld16(d1 + 12), f1 = ld16(d1 + 14);
        if (!ip && vq_chain_one(q, c, segs + seg_used, seg_used, max_segs, a1, l1, f1)) {
            c->head = id1; /* §2.8.6: the buffer ID */
            seg_used++;
            if (++pos >= q->size) {
                pos = 0;
                wrap ^= 1;
            }
            q->next_avail = pos;
            q->avail_wrap = wrap;
            done++;
            continue;
        }
        memset(c, 0, sizeof *c);
        c->seg_start = seg_used;
        struct walk w = {c, segs + seg_used, 0, max_segs - seg_used, 0, 0};
        uint16_t ndesc = 0, id = 0;
        int rc = 0, end = 0;
        while (!end) {
            if (ndesc >= q->size) {
                rc = vq_fail(q, VQ_E_LOOP, q->next_avail, q->size, 1);
                break;
            }
            uint8_t d[16];
            memcpy(d, q->desc + pos * 16u, 16);
            flags = ld16(d + 14);
            if (ndesc > 0 && !packed_is_avail(flags, wrap)) {
                rc = vq_fail(q, VQ_E_PACKED_AVAIL, pos, q->next_avail, 0);
                break;
            }
            if (ip)
                vu_ifp_pop_desc(ip, d, ndesc == 0);
            ndesc++;
            id = ld16(d + 12);
            uint16_t cur = pos;
            if (++pos >= q->size) {
                pos = 0;
                wrap ^= 1;
            }
            rc = packed_chain_desc(q, &w, d, ndesc, cur, &end);
            if (rc)
                break;
        }
        if (ip)
            vu_ifp_pop_end(ip, id, rc == 0);
        if (rc == VQ_E_SEGS) {
            if (done == 0)
                return VQ_E_SEGS;
            break;
        }
        if (rc) {
            if (!done)
                return rc;
            /* Deliver the good chains first; the bad one fails the next call. */
            q->broken = 0;
            q->error = 0;
            break;
        }
        c->head = id;   /* §2.8.6: the buffer ID is in the last descriptor of the chain */
        c->ndesc = ndesc;
        seg_used += w.nseg;
        q->next_avail = pos;
        q->avail_wrap = wrap;
        done++;
    }
    q->popped += done;
    return (int)done;
}

/* Packed ring: the chain of n recorded ring descriptors (16 bytes each, as the ring
 * held them when popped: resubmission from the inflight area after a back-end
 * restart).  Same validation as a pop; the ring is not touched. */
static int vq_packed_chain_recorded_u(struct vq *q, const uint8_t *descs, uint16_t n,
                                      struct vq_chain *c, struct vq_seg *segs, uint32_t max_segs)
{
    if (q->broken)
        return VQ_E_BROKEN;
    if (!q->packed || n == 0 || n > q->size)
        return vq_fail(q, VQ_E_LOOP, n, q->size, 1);
    memset(c, 0, sizeof *c);
    struct walk w = {c, segs, 0, max_segs, 0, 0};
    int rc = 0, end = 0;
    uint16_t i = 0;
    while (!end && i < n) {
        const uint8_t *d = descs + 16u * i;
        c->head = ld16(d + 12);
        rc = packed_chain_desc(q, &w, d, ++i, 0, &end);
        if (rc)
            return rc;
    }
    if (!end || i != n) /* the record's length and its NEXT flags disagree */
        return vq_fail(q, VQ_E_PACKED_AVAIL, i, n, 0);
    c->ndesc = n;
    return 1;
}

static int packed_add_used_batch(struct vq *q, const uint16_t *ids, const uint32_t *lens,
                                 const uint16_t *ndescs, uint32_t n)
{
    /* The ring position in locals: stores through the ring's byte pointer may alias
     * anything, so fields of *q would be reloaded and stored per element. */
    const uint16_t first = q->next_used, size = q->size;
    const uint8_t first_wrap = q->used_wrap;
    uint8_t *const desc = q->desc;
    uint32_t pos = first, total = 0;
    uint8_t wrap = first_wrap;
    if (q->inflight) {
        /* Where the batch ends: the inflight region moves there before the ring
         * shows it. */
        uint32_t end = first;
        uint8_t end_wrap = first_wrap;
        for (uint32_t i = 0; i < n; i++) {
            end += ndescs[i] ? ndescs[i] : 1;
            if (end >= size) {
                end -= size;
                end_wrap ^= 1;
            }
        }
        vu_ifp_used_prepare(q->inflight, ids, n, (uint16_t)end, end_wrap);
    }
    /* The first element's flags are written last (§2.8.21.3.1 batching): the driver,
     * and a restarted back-end reading old_used_idx, see all of the batch or none. */
    for (uint32_t i = 0; i < n; i++) {
        uint8_t *d = desc + pos * 16u;
        st32(d + 8, lens[i]);
        st16(d + 12, ids[i]);
        if (i > 0)
            vm_store_release_u16(d + 14, wrap ? (VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED) : 0);
        uint32_t nd = ndescs[i] ? ndescs[i] : 1;
        total += nd;
        pos += nd;
        if (pos >= size) {
            pos -= size;
            wrap ^= 1;
        }
    }
    if (q->mem->dirty_log) { /* the elements written, for live migration */
        uint32_t at = first;
        for (uint32_t i = 0; i < n; i++) {
            vm_log_dirty(q->mem, q->desc_gpa + at * 16u, 16);
            at += ndescs[i] ? ndescs[i] : 1;
            if (at >= size)
                at -= size;
        }
    }
    q->next_used = (uint16_t)pos;
    q->used_wrap = wrap;
    q->used_idx += (uint16_t)total; /* descriptors used since reset */
    if (n)
        vm_store_release_u16(desc + first * 16u + 14,
                             first_wrap ? (VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED) : 0);
    if (q->inflight)
        vu_ifp_used_commit(q->inflight, ids, n);
    return 0;
}

/* ---- public entry points ---------------------------------------------------------- */

static int vq_pop_batch_u(struct vq *q, struct vq_chain *chains, uint32_t nchains,
                 struct vq_seg *segs, uint32_t max_segs)
{
    if (q->broken)
        return VQ_E_BROKEN;
    int n = q->packed ? packed_pop_batch(q, chains, nchains, segs, max_segs)
                      : split_pop_batch(q, chains, nchains, segs, max_segs);
    if (n > 0 && q->stats)
        vq_stats_popped(q->stats, chains, (uint32_t)n);
    return n;
}

static inline void vq_prefetchw(const void *p)
{
#if defined(__x86_64__)
    __asm__ volatile("prefetchw %0" : : "m"(*(const char *)p)); /* a NOP before PRFCHW */
#else
    __builtin_prefetch(p, 1, 3);
#endif
}

/* A device-writable buffer at `off` in region r, `len` bytes, about to be written:
 * its first line or two asked for in the exclusive state. */
static inline void vq_prefetchw_buffer(const struct vm_region *r, uint64_t off, uint32_t len)
{
    vq_prefetchw(r->host + off);
    if (len > 64 && off + 64 < r->size)
        vq_prefetchw(r->host + off + 64);
}

/* Start taking the buffer `ahead` chains past the next one into this CPU's cache
 * for writing (the queue's lock held): a receive buffer the device fills a few
 * frames later, whose first lines the driver's CPU last wrote -- without this the
 * copy's stores wait for those lines in the store buffer and stall what follows.
 * Only a hint: the descriptor is read once more, without ordering (a stale or
 * not yet available one only prefetches a useless line), only a first direct
 * descriptor is looked at, and only an address inside guest memory is formed. */
static void vq_prefetch_avail_buffer_u(struct vq *q, uint32_t ahead)
{
    const uint8_t *d;
    if (ahead >= q->size || q->broken)
        return;
    if (q->packed) {
        uint32_t slot = q->next_avail + ahead;
        uint8_t wrap = q->avail_wrap;
        if (slot >= q->size) {
            slot -= q->size;
            wrap ^= 1;
        }
        d = q->desc + slot * 16u;
        if (!packed_is_avail(ld16(d + 14), wrap))
            return;
    } else {
        if ((uint16_t)(q->avail_idx_seen - q->last_avail_idx) <= ahead)
            return; /* not published when last looked: the driver may be writing it */
        uint16_t head = ld16(SPLIT_AVAIL_RING(q, (uint16_t)(q->last_avail_idx + ahead) % q->size));
        if (head >= q->size)
            return;
        d = q->desc + head * 16u;
    }
    uint16_t flags = ld16(d + 14);
    uint64_t addr = ld64(d);
    uint32_t len = ld32(d + 8);
    if (flags & VRING_DESC_F_INDIRECT || len == 0)
        return;
    int i = vm_find(q->mem, addr);
    if (i < 0)
        return;
    const struct vm_region *r = &q->mem->regions[i];
    vq_prefetchw_buffer(r, addr - r->gpa, len);
}

static uint32_t vq_avail_count_u(struct vq *q)
{
    if (q->broken)
        return 0;
    if (q->packed) {
        uint16_t flags = vm_load_acquire_u16(q->desc + q->next_avail * 16u + 14);
        return packed_is_avail(flags, q->avail_wrap) ? 1 : 0;
    }
    uint16_t idx = vm_load_acquire_u16(SPLIT_AVAIL_IDX(q));
    uint16_t n = (uint16_t)(idx - q->last_avail_idx);
    return split_avail_stale(q, idx, n) ? 0 : n;
}

static int vq_add_used_batch_u(struct vq *q, const uint16_t *ids, const uint32_t *lens,
                      const uint16_t *ndescs, uint32_t n)
{
    if (q->broken)
        return VQ_E_BROKEN;
    if (n == 0)
        return 0;
    q->used += n;
    if (q->stats)
        vq_stats_used(q->stats, ids, n);
    if (q->packed)
        return packed_add_used_batch(q, ids, lens, ndescs, n);
    return split_add_used_batch(q, ids, lens, n);
}

/* Device -> driver: must the device send a used buffer notification now?
 * (§2.7.7 / §2.7.10 split, §2.8.10 packed).  Call after add_used. */
static int vq_notification_due(struct vq *q, uint16_t old, uint16_t new_idx, int valid);

static int vq_needs_notification_u(struct vq *q)
{
    if (q->broken)
        return 0;
    vm_fence(); /* used idx / descriptors visible before reading the driver's event */
    uint16_t old = q->signalled_used, new_idx = q->used_idx;
    int valid = q->signalled_used_valid;
    q->signalled_used = new_idx;
    q->signalled_used_valid = 1;
    if (valid && old == new_idx)
        return 0; /* nothing used since the last notification decision */
    int due = vq_notification_due(q, old, new_idx, valid);
    if (q->stats)
        vq_stats_notify(q->stats, due);
    return due;
}

/* The driver's suppression settings: notify for used entries (old, new_idx]? */
static int vq_notification_due(struct vq *q, uint16_t old, uint16_t new_idx, int valid)
{
    if (q->packed) {
        uint16_t flags = ld16(q->driver + 2);
        if (flags == VRING_PACKED_EVENT_FLAG_DISABLE)
            return 0;
        if (flags != VRING_PACKED_EVENT_FLAG_DESC || !q->event_idx || !valid)
            return 1;
        uint16_t off_wrap = ld16(q->driver);
        int32_t off = off_wrap & 0x7fff;
        if ((off_wrap >> VRING_PACKED_EVENT_F_WRAP_CTR) != q->used_wrap)
            off -= q->size;
        uint16_t pending = (uint16_t)(new_idx - old);
        int32_t newpos = q->next_used, oldpos = newpos - pending;
        return (uint16_t)(newpos - off - 1) < (uint16_t)(newpos - oldpos);
    }
    if (!q->event_idx)
        return !(ld16(q->driver) & VRING_AVAIL_F_NO_INTERRUPT);
    if (!valid)
        return 1;
    return need_event(ld16(SPLIT_USED_EVENT(q)), new_idx, old);
}

/* Driver -> device: ask for notifications again.  Returns 1 if buffers became
 * available meanwhile (the caller must process them: §2.7.10 race). */
/* Where the `skip`-th available chain after the device's position ends (packed):
 * the descriptor position and wrap counter a notification should be asked for. */
static void packed_skip_chains(struct vq *q, uint32_t skip, uint16_t *pos_out, uint8_t *wrap_out)
{
    uint16_t pos = q->next_avail;
    uint8_t wrap = q->avail_wrap;
    uint32_t walked = 0;
    while (skip && walked < q->size) {
        uint16_t flags = vm_load_acquire_u16(q->desc + pos * 16u + 14);
        if (!packed_is_avail(flags, wrap))
            break;
        walked++;
        if (++pos >= q->size) {
            pos = 0;
            wrap ^= 1;
        }
        if (!(flags & VRING_DESC_F_NEXT))
            skip--;
    }
    *pos_out = pos;
    *wrap_out = wrap;
}

/* Enable available-buffer notifications; with EVENT_IDX, ask for one only once the
 * driver makes a chain available beyond the first `skip` ones not popped yet (a
 * device waiting for a group of buffers, vq_avail_chains). */
static int vq_enable_notification_u(struct vq *q, uint32_t skip)
{
    if (q->broken || q->stale)
        return 0; /* a stale ring is not written to: the kick fd is watched anyway */
    q->notify_enabled = 1;
    if (q->packed) {
        if (q->event_idx) {
            uint16_t pos = q->next_avail;
            uint8_t wrap = q->avail_wrap;
            if (skip)
                packed_skip_chains(q, skip, &pos, &wrap);
            st16(q->device, (uint16_t)(pos | (wrap << VRING_PACKED_EVENT_F_WRAP_CTR)));
            vm_store_release_u16(q->device + 2, VRING_PACKED_EVENT_FLAG_DESC);
        } else {
            vm_store_release_u16(q->device + 2, VRING_PACKED_EVENT_FLAG_ENABLE);
        }
        vm_log_dirty(q->mem, q->device_gpa, 4);
    } else if (q->event_idx) {
        vm_store_release_u16(SPLIT_AVAIL_EVENT(q), (uint16_t)(q->last_avail_idx + skip));
        vm_log_dirty(q->mem, q->device_gpa + 4 + 8ull * q->size, 2);
    } else {
        vm_store_release_u16(q->device, (uint16_t)(ld16(q->device) & ~VRING_USED_F_NO_NOTIFY));
        vm_log_dirty(q->mem, q->device_gpa, 2);
    }
    vm_fence();
    return vq_avail_count_u(q) != 0;
}

static void vq_disable_notification_u(struct vq *q)
{
    if (q->broken || (q->unproven && !q->packed))
        return; /* not before the ring proved to be one: a spare kick does no harm */
    q->notify_enabled = 0;
    if (q->packed) {
        vm_store_release_u16(q->device + 2, VRING_PACKED_EVENT_FLAG_DISABLE);
        vm_log_dirty(q->mem, q->device_gpa, 4);
    } else if (!q->event_idx) {
        vm_store_release_u16(q->device, (uint16_t)(ld16(q->device) | VRING_USED_F_NO_NOTIFY));
        vm_log_dirty(q->mem, q->device_gpa, 2);
    }
    /* split + EVENT_IDX: avail_event is left where it is; the driver notifies
     * at most once more (§2.7.10). */
}

/* Complete popped chains in order: chain i with lens[i] bytes written, or with its
 * whole writable length when lens is NULL.  One used-index update per call. */
static int vq_add_used_chains_u(struct vq *q, const struct vq_chain *chains, uint32_t n, const uint32_t *lens)
{
    if (q->broken)
        return VQ_E_BROKEN;
    if (n == 0)
        return 0;
    q->used += n;
    if (q->stats)
        vq_stats_used_chains(q->stats, chains, n);
    if (q->packed) {
        for (uint32_t i = 0; i < n; i++) {
            uint16_t id = chains[i].head, nd = chains[i].ndesc;
            uint32_t len = lens ? lens[i] : chains[i].writable_len;
            packed_add_used_batch(q, &id, &len, &nd, 1);
        }
        return (int)n;
    }
    uint16_t used = q->used_idx;
    for (uint32_t i = 0; i < n; i++) {
        uint8_t *e = SPLIT_USED_ELEM(q, (uint16_t)(used + i) % q->size);
        st32(e, chains[i].head);
        st32(e + 4, lens ? lens[i] : chains[i].writable_len);
    }
    vm_log_dirty(q->mem, q->device_gpa + 4, 8ull * q->size);
    q->used_idx = (uint16_t)(used + n);
    vm_store_release_u16(SPLIT_USED_IDX(q), q->used_idx);
    vm_log_dirty(q->mem, q->device_gpa + 2, 2);
    return (int)n;
}

/* Split ring: build the chain whose head descriptor is `head` without consuming the
 * available ring (resubmitting in-flight requests after a backend reconnect,
 * vhost-user "Inflight I/O tracking").  Same validation as a pop. */
static int vq_chain_at_u(struct vq *q, uint16_t head, struct vq_chain *chain, struct vq_seg *segs,
                uint32_t max_segs)
{
    if (q->broken)
        return VQ_E_BROKEN;
    if (q->packed)
        return VQ_E_BROKEN;
    memset(chain, 0, sizeof *chain);
    chain->head = head;
    chain->ndesc = 1;
    struct walk w = {chain, segs, 0, max_segs, 0, 0};
    int rc = split_walk(q, &w, head);
    return rc ? rc : 1;
}

/* One completion (the per-chain path): avoids marshalling arrays from Python. */
int vq_add_used1(struct vq *q, uint16_t id, uint32_t len, uint16_t ndesc)
{
    return vq_add_used_batch(q, &id, &len, &ndesc, 1);
}

/* ---- locked entry points ------------------------------------------------------------
 * When a queue is shared with a data-plane thread (vq_set_locking), every entry
 * point below serialises on the queue's mutex; otherwise the lock is NULL and free. */
#include <pthread.h>
#include <stdlib.h>

/* Functions, not macros: the queue expression is evaluated once (a macro took it
 * twice, so an argument with a side effect locked one queue and tested another). */
static inline void VQ_LOCK(struct vq *q)
{
    if (q->lock)
        pthread_mutex_lock((pthread_mutex_t *)q->lock);
}

static inline void VQ_UNLOCK(struct vq *q)
{
    if (q->lock)
        pthread_mutex_unlock((pthread_mutex_t *)q->lock);
}

int vq_set_locking(struct vq *q, int on)
{
    if (on && !q->lock) {
        pthread_mutex_t *m = malloc(sizeof *m);
        if (!m || pthread_mutex_init(m, NULL)) {
            free(m);
            return -1;
        }
        q->lock = m;
    } else if (!on && q->lock) {
        pthread_mutex_destroy((pthread_mutex_t *)q->lock);
        free(q->lock);
        q->lock = NULL;
    }
    return 0;
}

int vq_pop_batch(struct vq *q, struct vq_chain *chains, uint32_t nchains, struct vq_seg *segs,
                 uint32_t max_segs)
{
    VQ_LOCK(q);
    int r = vq_pop_batch_u(q, chains, nchains, segs, max_segs);
    VQ_UNLOCK(q);
    return r;
}

uint32_t vq_avail_count(struct vq *q)
{
    VQ_LOCK(q);
    uint32_t r = vq_avail_count_u(q);
    VQ_UNLOCK(q);
    return r;
}

/* How many chains (up to `max`) the driver has made available and the device has
 * not popped, without popping them (a device that must deliver a group of buffers
 * at once, virtio-input §5.8.6, waits until enough are there).  Split: the avail
 * index distance; packed: the chains of available descriptors, followed by their
 * NEXT flags (contents are validated when popped). */
static uint32_t vq_avail_chains_u(struct vq *q, uint32_t max)
{
    if (q->broken || max == 0)
        return 0;
    if (!q->packed) {
        uint16_t idx = vm_load_acquire_u16(SPLIT_AVAIL_IDX(q));
        uint32_t n = (uint16_t)(idx - q->last_avail_idx);
        if (split_avail_stale(q, idx, (uint16_t)n))
            return 0;
        return n < max ? n : max;
    }
    uint32_t chains = 0, walked = 0;
    uint16_t pos = q->next_avail;
    uint8_t wrap = q->avail_wrap;
    while (chains < max && walked < q->size) {
        uint16_t flags = vm_load_acquire_u16(q->desc + pos * 16u + 14);
        if (!packed_is_avail(flags, wrap))
            break;
        walked++;
        if (++pos >= q->size) {
            pos = 0;
            wrap ^= 1;
        }
        if (!(flags & VRING_DESC_F_NEXT))
            chains++;
    }
    return chains;
}

uint32_t vq_avail_chains(struct vq *q, uint32_t max)
{
    VQ_LOCK(q);
    uint32_t r = vq_avail_chains_u(q, max);
    VQ_UNLOCK(q);
    return r;
}

int vq_add_used_batch(struct vq *q, const uint16_t *ids, const uint32_t *lens,
                      const uint16_t *ndescs, uint32_t n)
{
    VQ_LOCK(q);
    int r = vq_add_used_batch_u(q, ids, lens, ndescs, n);
    VQ_UNLOCK(q);
    return r;
}

/* A data plane's publication: the used entries (as vq_add_used_batch), then the
 * notification decision (as vq_needs_notification), under one hold of the queue's
 * lock.  *used_idx gets the used index after the update (for inflight logs).
 * 1 when the driver is to be notified (§2.7.10 / §2.8.10). */
int vq_publish_used(struct vq *q, const uint16_t *ids, const uint32_t *lens,
                    const uint16_t *ndescs, uint32_t n, uint16_t *used_idx)
{
    VQ_LOCK(q);
    vq_add_used_batch_u(q, ids, lens, ndescs, n);
    *used_idx = q->packed ? q->next_used : q->used_idx;
    int r = vq_needs_notification_u(q);
    VQ_UNLOCK(q);
    return r;
}

int vq_needs_notification(struct vq *q)
{
    VQ_LOCK(q);
    int r = vq_needs_notification_u(q);
    VQ_UNLOCK(q);
    return r;
}

/* The driver notified the queue (§2.3) after the device's first look at it: an
 * unproven ring that looked stale is now the driver's ring, and an impossible avail
 * idx on it a driver error. */
void vq_kicked(struct vq *q)
{
    VQ_LOCK(q);
    if (q->stale)
        q->unproven = q->stale = 0;
    VQ_UNLOCK(q);
}

int vq_enable_notification(struct vq *q)
{
    VQ_LOCK(q);
    int r = vq_enable_notification_u(q, 0);
    VQ_UNLOCK(q);
    return r;
}

int vq_enable_notification_after(struct vq *q, uint32_t skip)
{
    VQ_LOCK(q);
    int r = vq_enable_notification_u(q, skip);
    VQ_UNLOCK(q);
    return r;
}

void vq_disable_notification(struct vq *q)
{
    VQ_LOCK(q);
    vq_disable_notification_u(q);
    VQ_UNLOCK(q);
}

int vq_add_used_chains(struct vq *q, const struct vq_chain *chains, uint32_t n, const uint32_t *lens)
{
    VQ_LOCK(q);
    int r = vq_add_used_chains_u(q, chains, n, lens);
    VQ_UNLOCK(q);
    return r;
}

int vq_chain_at(struct vq *q, uint16_t head, struct vq_chain *chain, struct vq_seg *segs,
                uint32_t max_segs)
{
    VQ_LOCK(q);
    int r = vq_chain_at_u(q, head, chain, segs, max_segs);
    VQ_UNLOCK(q);
    return r;
}

int vq_packed_chain_recorded(struct vq *q, const uint8_t *descs, uint16_t n,
                             struct vq_chain *chain, struct vq_seg *segs, uint32_t max_segs)
{
    VQ_LOCK(q);
    int r = vq_packed_chain_recorded_u(q, descs, n, chain, segs, max_segs);
    VQ_UNLOCK(q);
    return r;
}

/* Packed rings: mark pops and used batches in an inflight region from now on (NULL:
 * stop).  Under the lock, so a data-plane thread never sees it half set. */
void vq_set_inflight(struct vq *q, struct vu_inflight_packed *ip)
{
    VQ_LOCK(q);
    q->inflight = q->packed ? ip : NULL;
    VQ_UNLOCK(q);
}
