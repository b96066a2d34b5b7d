/* Native data plane: a thread per eventfd-notified virtqueue (dataplane.c), with a
 * device-specific fast path (blk_dataplane.c), and the vhost-user inflight region
 * layout (one definition: Python's virtio.transport.vhost_user.inflight uses these
 * structs and functions through cffi).  Needs vm_native.h first. */
#ifndef PYVIRTIO_DATAPLANE_H
#define PYVIRTIO_DATAPLANE_H

/* ---- vhost-user inflight I/O tracking, split layout (vhost-user "Inflight I/O
 * tracking": QueueRegionSplit / DescStateSplit) ----------------------------------- */
struct vu_inflight_split_hdr {
    uint64_t features;
    uint16_t version;
    uint16_t desc_num;
    uint16_t last_batch_head;
    uint16_t used_idx;
};

struct vu_inflight_desc_split {
    uint8_t inflight;
    uint8_t padding[5];
    uint16_t next;
    uint64_t counter;
};

/* Mark heads popped (counter order) / completed (one batch, then used_idx). */
void vu_inflight_pop(uint8_t *region, uint16_t desc_num, const uint16_t *heads, uint32_t n,
                     uint64_t *counter);
void vu_inflight_used(uint8_t *region, uint16_t desc_num, const uint16_t *heads, uint32_t n,
                      uint16_t used_idx);

/* ---- generic data plane --------------------------------------------------------- */
#define DP_BATCH 64
#define DP_MAX_SEGS 4096
#define DP_DEFER_MAX 256
#define DP_DEFER_SEGS 8192

struct dp {
    struct vq *q;
    int kick_fd, call_fd, wake_fd, defer_fd;
    int stop;
    uint8_t *inflight;          /* this queue's inflight region, or NULL */
    uint16_t inflight_num;
    uint64_t inflight_counter;
    /* The device's fast path.  Returns the used length (> 0) to complete the chain
     * now, or 0 to defer it to Python with *err = 0 (not served here) or the errno
     * of an I/O that was tried and failed (Python answers it without retrying). */
    uint32_t (*serve)(void *dev, const struct vq_chain *c, const struct vq_seg *segs, int *err);
    void *dev;
    /* deferred chains, protected by mu */
    void *mu_storage[8];
    struct vq_chain *dchains;   /* DP_DEFER_MAX */
    struct vq_seg *dsegs;       /* DP_DEFER_SEGS */
    int32_t *derr;              /* DP_DEFER_MAX */
    uint32_t nd, nds;
    /* statistics */
    uint64_t requests, batches, deferred, kicks, calls, rescues, io_errors;
};

int dp_init(struct dp *dp);
void dp_destroy(struct dp *dp);
void dp_set_fds(struct dp *dp, int kick, int call);
int dp_run(struct dp *dp);
uint32_t dp_take(struct dp *dp, struct vq_chain *chains, uint32_t max, struct vq_seg *segs,
                 uint32_t max_segs, int32_t *errs);

/* ---- virtio-blk fast path (virtio 1.4 §5.2.6): IN, OUT, FLUSH -------------------- */
struct blk_dp {
    struct dp core;
    int img_fd;
    int read_only, writethrough;
    int guard_sector0;          /* probed raw: writes to sector 0 go to Python (probe.py) */
    uint64_t capacity;          /* sectors */
    /* The image's sticky writeback error (shared by every queue of the image and the
     * Python path): once an fdatasync failed, every later sync fails with it. */
    int *sync_err;
    uint64_t reads, writes, flushes, syncs;
};

void blk_dp_attach(struct blk_dp *b);

#endif
