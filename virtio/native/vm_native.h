/* Native core of the virtqueue engine (virtio 1.4 CS01 §2.7 split, §2.8 packed).
 *
 * Everything the driver can write is untrusted: every index, address and length
 * read from ring memory is validated before use, and every descriptor is read
 * exactly once into a local copy (no double fetch).  Functions return 0/1 for
 * success and a negative VQ_E_* code for driver errors; the queue then records
 * the error and refuses further work until reset.
 */
#include <stdint.h>
#include <stddef.h>

struct vm_region {
    uint64_t gpa;
    uint64_t size;
    uint8_t *host;
};

struct vm_mem {
    struct vm_region *regions;  /* sorted by gpa, non-overlapping */
    uint32_t nregions;
    uint32_t last_hit;
    uint8_t *dirty_log;         /* bit per 4 KiB page of guest-physical space, or NULL */
    uint64_t dirty_log_size;    /* bytes */
};

struct vq_seg {
    uint64_t gpa;
    uint64_t offset;    /* offset inside region `region` */
    uint32_t len;
    uint16_t region;
    uint16_t writable;
};

struct vq_chain {
    uint16_t head;      /* split: head descriptor index; packed: buffer id */
    uint16_t ndesc;     /* ring descriptors consumed (packed: to skip on add_used) */
    uint32_t nsegs;
    uint32_t nreadable; /* the first nreadable segments are device-readable */
    uint32_t readable_len;
    uint32_t writable_len;
    uint32_t seg_start; /* index of its first segment in the batch's segment array */
};

/* Per-queue statistics, owned by the device (virtio/stats.py): they outlive the
 * rings and connections that feed them.  The ring core stamps each chain's pop time
 * and, when it is used, counts it with its latency (pop to used entry) and the
 * used-buffer notification decisions (§2.7.7 / §2.8.10 suppression); the device
 * counts requests, bytes and statuses by its own kinds (vq_stats_request), from a
 * data-plane thread or from Python.  Readers (Python) load whole aligned words. */
#define VQS_KINDS 8
#define VQS_STATUSES 4
#define VQS_LAT_BUCKETS 24  /* bucket b: latency in [2^(b-1), 2^b) us; 0: < 1 us; last: the rest */

struct vq_stats {
    uint64_t completed;         /* used entries published (any path) */
    uint64_t native;            /* ... of which by a native data-plane thread */
    uint64_t notify_sent, notify_suppressed;
    /* by the path that counted them, [0] Python, [1] the data-plane thread: one
     * writer per word, no atomic operations */
    uint64_t requests[2][VQS_KINDS], bytes[2][VQS_KINDS], status[2][VQS_STATUSES];
    uint64_t latency[VQS_LAT_BUCKETS];
    uint64_t latency_sum_ns, latency_count;
    uint64_t *t0;               /* pop time by head / buffer id (CLOCK_MONOTONIC ns; 0: none) */
    uint32_t t0_size;
    uint32_t sample_mask;       /* latency of one popped batch in sample_mask + 1 (2^k - 1) */
    uint64_t pops;              /* non-empty pops (latency sampling) */
    uint32_t stamped;           /* t0 slots not 0: none, and the per-chain loops are skipped */
    uint32_t _pad;
};

void vq_stats_request(struct vq_stats *s, int native, uint32_t kind, uint32_t status,
                      uint64_t bytes);
void vq_stats_popped(struct vq_stats *s, const struct vq_chain *chains, uint32_t n);
void vq_stats_used(struct vq_stats *s, const uint16_t *ids, uint32_t n);
void vq_stats_used_chains(struct vq_stats *s, const struct vq_chain *chains, uint32_t n);
void vq_stats_notify(struct vq_stats *s, int sent);

struct vq {
    struct vm_mem *mem;
    uint16_t size;
    uint8_t packed;
    uint8_t event_idx;
    uint8_t indirect;
    uint8_t broken;
    /* Set by a transport whose ring starts asynchronously to the driver
     * (vhost-user): until the ring shows a valid avail idx, or the driver kicks
     * after the first look (vq_kicked), an impossible avail idx is taken for memory
     * that is not a ring (yet) -- firmware that left the device running, its ring
     * memory reused -- and neither fails the queue nor gets written to. */
    uint8_t unproven;
    uint8_t stale;              /* unproven, and the last look saw an impossible idx */
    uint8_t _pad;
    uint64_t desc_gpa, driver_gpa, device_gpa;  /* desc table, avail/driver area, used/device area */
    uint8_t *desc, *driver, *device;           /* host pointers, validated at activation */
    /* split */
    uint16_t last_avail_idx;
    uint16_t used_idx;
    /* packed */
    uint16_t next_avail;
    uint16_t next_used;
    uint8_t avail_wrap;
    uint8_t used_wrap;
    /* split: the avail idx the last pop read (only a prefetching hint: which
     * entries past last_avail_idx were published, vq_prefetch_avail_buffer_u) */
    uint16_t avail_idx_seen;
    /* notification suppression: device -> driver */
    uint16_t signalled_used;
    uint8_t signalled_used_valid;
    uint8_t notify_enabled;     /* device wants driver->device notifications */
    uint16_t stale_avail;       /* the impossible avail idx an unproven ring showed */
    /* error reporting */
    int32_t error;
    uint64_t err_a, err_b, err_c;
    /* counters */
    uint64_t popped, used;
    void *lock; /* pthread_mutex_t *, set by vq_set_locking; NULL: no locking */
    struct vq_stats *stats;     /* the device's statistics of this queue, or NULL */
    /* packed ring: vhost-user inflight tracking (inflight.h), set by vq_set_inflight */
    struct vu_inflight_packed *inflight;
};

enum {
    VQ_E_AVAIL_IDX = -1,        /* avail idx moved more than queue size */
    VQ_E_HEAD_RANGE = -2,       /* head index >= queue size */
    VQ_E_NEXT_RANGE = -3,       /* next index out of range (table or queue) */
    VQ_E_LOOP = -4,             /* chain longer than queue size: a loop */
    VQ_E_INDIRECT_NESTED = -5,  /* indirect descriptor inside an indirect table */
    VQ_E_INDIRECT_NEXT = -6,    /* INDIRECT together with NEXT */
    VQ_E_INDIRECT_LEN = -7,     /* indirect table len 0 or not a multiple of 16 */
    VQ_E_INDIRECT_NOTNEG = -8,  /* INDIRECT used without VIRTIO_F_INDIRECT_DESC */
    VQ_E_MEMORY = -9,           /* buffer or table outside guest memory */
    VQ_E_ORDER = -10,           /* readable descriptor after a writable one */
    VQ_E_TOO_BIG = -11,         /* chain total length >= 2^32 */
    VQ_E_SEGS = -12,            /* caller's segment array too small (local) */
    VQ_E_BROKEN = -13,          /* queue already broken */
    VQ_E_PACKED_AVAIL = -14,    /* packed: chain continues into a non-available descriptor */
    VQ_E_INDIRECT_MEMORY = -15, /* indirect table not (contiguously) inside guest memory */
    VQ_E_INDIRECT_LOOP = -16,   /* split indirect table: NEXT links revisit an entry */
};

uint8_t *vm_translate(struct vm_mem *m, uint64_t gpa, uint64_t len, uint32_t *region_out);
int vm_range_ok(struct vm_mem *m, uint64_t gpa, uint64_t len);
void vm_log_dirty(struct vm_mem *m, uint64_t gpa, uint64_t len);

uint16_t vm_load_acquire_u16(const uint8_t *p);
uint32_t vm_load_acquire_u32(const uint8_t *p);
void vm_store_release_u16(uint8_t *p, uint16_t v);
void vm_store_release_u32(uint8_t *p, uint32_t v);
void vm_fence(void);

int vq_pop_batch(struct vq *q, struct vq_chain *chains, uint32_t nchains,
                 struct vq_seg *segs, uint32_t max_segs);
uint32_t vq_avail_count(struct vq *q);
void vq_kicked(struct vq *q);
uint32_t vq_avail_chains(struct vq *q, uint32_t max);
int vq_add_used_batch(struct vq *q, const uint16_t *ids, const uint32_t *lens,
                      const uint16_t *ndescs, uint32_t n);
int vq_needs_notification(struct vq *q);
int vq_enable_notification(struct vq *q);
int vq_enable_notification_after(struct vq *q, uint32_t skip);
void vq_disable_notification(struct vq *q);
int vq_add_used_chains(struct vq *q, const struct vq_chain *chains, uint32_t n, const uint32_t *lens);
int vq_set_locking(struct vq *q, int on);
int vq_publish_used(struct vq *q, const uint16_t *ids, const uint32_t *lens,
                    const uint16_t *ndescs, uint32_t n, uint16_t *used_idx);
int vq_add_used1(struct vq *q, uint16_t id, uint32_t len, uint16_t ndesc);
int vq_chain_at(struct vq *q, uint16_t head, struct vq_chain *chain, struct vq_seg *segs,
                uint32_t max_segs);
struct vu_inflight_packed;
void vq_set_inflight(struct vq *q, struct vu_inflight_packed *ip);
int vq_packed_chain_recorded(struct vq *q, const uint8_t *descs, uint16_t n,
                             struct vq_chain *chain, struct vq_seg *segs, uint32_t max_segs);
