/* vhost-user inflight I/O tracking ("Inflight I/O tracking" in vhost-user.rst): the
 * layout of one queue's region of the shared inflight area, defined once here
 * (Python's virtio.transport.vhost_user.inflight reads these structs through cffi),
 * and the functions that mark it (inflight.c).  Needs vm_native.h first. */
#ifndef PYVIRTIO_INFLIGHT_H
#define PYVIRTIO_INFLIGHT_H

/* ---- split rings: QueueRegionSplit / DescStateSplit ------------------------------ */
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

/* ---- packed rings: QueueRegionPacked / DescStatePacked ----------------------------
 * A copy of every ring descriptor of a chain in flight (the device overwrites ring
 * slots with used elements, possibly before an older chain completes), in entries
 * taken from a free list; the head entry of a chain holds inflight, num, last and
 * counter.  used_idx / used_wrap_counter are the device's next used position; the
 * old_* fields are the state before the batch being published (commit or roll
 * back after a crash, by the flags of the ring slot at old_used_idx). */
struct vu_inflight_desc_packed {
    uint8_t inflight;
    uint8_t padding;
    uint16_t next;
    uint16_t last;
    uint16_t num;
    uint64_t counter;
    uint16_t id;
    uint16_t flags;
    uint32_t len;
    uint64_t addr;
};

struct vu_inflight_packed_hdr {
    uint64_t features;          /* we set VIRTIO_F_RING_PACKED's bit: this layout */
    uint16_t version;
    uint16_t desc_num;
    uint16_t free_head;
    uint16_t old_free_head;
    uint16_t used_idx;
    uint16_t old_used_idx;
    uint8_t used_wrap_counter;
    uint8_t old_used_wrap_counter;
    uint8_t padding[7];
};

/* What the queue core needs to mark a packed region (process memory, not shared):
 * the region, the entry holding each buffer id's head (rebuilt on recovery), and
 * the pop in progress.  Attached to a struct vq (vq_set_inflight); the core then
 * marks every pop and used batch under the queue's lock. */
struct vu_inflight_packed {
    uint8_t *region;
    uint16_t desc_num;
    uint16_t *head_of;          /* desc_num entries: buffer id -> head entry */
    uint64_t counter;
    uint64_t untracked;         /* chains not recorded (id >= desc_num, no free entry) */
    int overflow;               /* the pop in progress ran out of entries */
};

void vu_inflight_packed_init(uint8_t *region, uint16_t desc_num, uint16_t used_idx,
                             uint8_t used_wrap);
/* Called by the packed ring core (vm_native.c) for each chain popped and each used
 * batch.  desc is a 16-byte ring descriptor as read. */
void vu_ifp_pop_desc(struct vu_inflight_packed *ip, const uint8_t *desc, int first);
void vu_ifp_pop_end(struct vu_inflight_packed *ip, uint16_t id, int ok);
void vu_ifp_used_prepare(struct vu_inflight_packed *ip, const uint16_t *ids, uint32_t n,
                         uint16_t used_idx, uint8_t used_wrap);
void vu_ifp_used_commit(struct vu_inflight_packed *ip, const uint16_t *ids, uint32_t n);

#endif
