/* Split and packed virtqueues for the freestanding drivers (virtio 1.4 §2.7, §2.8),
 * over either transport (virtio_dev.h).
 *
 * A queue here has fixed "slots": slot s owns the descriptors
 * [s * per_slot, (s + 1) * per_slot) (split) or the same ring positions the first
 * time round (packed), so request bookkeeping is an array indexed by slot.
 */
#ifndef PYVIRTIO_VIRTQUEUE_H
#define PYVIRTIO_VIRTQUEUE_H

#include "virtio_dev.h"

/* vring_need_event (§2.7.10): has the index moved past `event` in (old, new]? */
static inline int vring_need_event(u16 event, u16 new_idx, u16 old)
{
	return (u16)(new_idx - event - 1) < (u16)(new_idx - old);
}

/* -- a virtqueue, split or packed ----------------------------------------------------- */
struct vq_seg {
	u64 addr;
	u32 len;
	int writable;
};

struct vq {
	struct vdev *dev;
	u64 notify; /* virtio-pci: this queue's Queue Notify address */
	u32 index;
	u16 size;
	int packed;
	int event_idx;
	/* split */
	volatile struct vring_desc *desc;
	volatile struct vring_avail *avail;
	volatile u16 *avail_ring;
	volatile u16 *used_event; /* avail->ring[size] */
	volatile struct vring_used *used;
	volatile struct vring_used_elem *used_ring;
	volatile u16 *avail_event; /* used->ring[size] */
	u16 avail_idx; /* driver's shadow of avail->idx */
	u16 published; /* avail->idx at the last publish */
	u16 last_used;
	/* packed */
	volatile struct vring_packed_desc *pdesc;
	volatile struct vring_packed_desc_event *driver_ev; /* driver event suppression */
	volatile struct vring_packed_desc_event *device_ev; /* device event suppression */
	u16 next_avail, avail_wrap, next_used, used_wrap, added, pub_avail, pub_wrap;
	u16 pending_head[64];
	u16 pending_flags[64];
	u32 npending;
	/* per-chain bookkeeping: packed buffer id -> descriptors in the chain,
	 * split head descriptor -> caller's id */
	u16 chain_ndesc[256];
	u16 head_id[256];
	u32 kicks;
};

static inline u64 align_up(u64 x, u64 a) { return (x + a - 1) & ~(a - 1); }

/* Lay the rings out at `base` (zeroed); returns the bytes used. */
static inline u64 vq_layout(struct vq *q, u64 base, u16 size, int packed, int event_idx)
{
	q->size = size;
	q->packed = packed;
	q->event_idx = event_idx;
	q->avail_idx = q->published = q->last_used = 0;
	q->kicks = 0;
	u64 end;
	if (packed) {
		q->pdesc = (volatile struct vring_packed_desc *)base;
		u64 drv = align_up(base + sizeof(struct vring_packed_desc) * size,
				   VRING_PACKED_EVENT_ALIGN);
		q->driver_ev = (volatile struct vring_packed_desc_event *)drv;
		q->device_ev = (volatile struct vring_packed_desc_event *)(drv +
									  sizeof(struct vring_packed_desc_event));
		end = drv + 2 * sizeof(struct vring_packed_desc_event);
		q->next_avail = q->next_used = 0;
		q->avail_wrap = q->used_wrap = q->pub_wrap = 1;
		q->pub_avail = 0;
		q->added = 0;
		q->npending = 0;
	} else {
		q->desc = (volatile struct vring_desc *)base;
		u64 avail = align_up(base + sizeof(struct vring_desc) * size, VRING_AVAIL_ALIGN);
		q->avail = (volatile struct vring_avail *)avail;
		q->avail_ring = (volatile u16 *)(avail + sizeof(struct vring_avail));
		q->used_event = q->avail_ring + size;
		u64 used = align_up(avail + sizeof(struct vring_avail) + 2 * (u64)size + 2, 4096);
		q->used = (volatile struct vring_used *)used;
		q->used_ring = (volatile struct vring_used_elem *)(used + sizeof(struct vring_used));
		q->avail_event = (volatile u16 *)(q->used_ring + size);
		end = used + sizeof(struct vring_used) + sizeof(struct vring_used_elem) * size + 2;
	}
	memset((void *)base, 0, end - base);
	return end - base;
}

static inline int vq_setup(struct vq *q)
{
	u64 desc, drv, dev;
	if (q->packed) {
		desc = (u64)q->pdesc;
		drv = (u64)q->driver_ev;
		dev = (u64)q->device_ev;
	} else {
		desc = (u64)q->desc;
		drv = (u64)q->avail;
		dev = (u64)q->used;
	}
	return vd_setup_queue(q->dev, q->index, q->size, desc, drv, dev, &q->notify);
}

/* Lay out queue `index` at `base` and hand it to the device (§3.1.1 step 7, §4.2.3.2). */
static inline int vq_init(struct vq *q, struct vdev *d, u16 index, u64 base, u16 size, int packed,
		   int event_idx)
{
	q->dev = d;
	q->index = index;
	vq_layout(q, base, size, packed, event_idx);
	return vq_setup(q);
}

/* Add one chain; `id` is the caller's slot (split: its first descriptor is
 * id * nsegs, packed: the buffer id).  Not visible to the device until vq_publish. */
static inline void vq_add(struct vq *q, u16 id, const struct vq_seg *segs, u32 nsegs)
{
	if (!q->packed) {
		u16 head = (u16)(id * nsegs);
		for (u32 i = 0; i < nsegs; i++) {
			volatile struct vring_desc *dsc = &q->desc[head + i];
			dsc->addr = segs[i].addr;
			dsc->len = segs[i].len;
			dsc->flags = (u16)((segs[i].writable ? VRING_DESC_F_WRITE : 0) |
					   (i + 1 < nsegs ? VRING_DESC_F_NEXT : 0));
			dsc->next = (u16)(head + i + 1);
		}
		q->head_id[head] = id;
		q->avail_ring[q->avail_idx % q->size] = head;
		q->avail_idx++;
		return;
	}
	u16 head_pos = q->next_avail, head_flags = 0;
	for (u32 i = 0; i < nsegs; i++) {
		volatile struct vring_packed_desc *dsc = &q->pdesc[q->next_avail];
		u16 flags = (u16)((segs[i].writable ? VRING_PACKED_DESC_F_WRITE : 0) |
				  (i + 1 < nsegs ? VRING_PACKED_DESC_F_NEXT : 0));
		flags |= q->avail_wrap ? VRING_PACKED_DESC_F_AVAIL : VRING_PACKED_DESC_F_USED;
		dsc->addr = segs[i].addr;
		dsc->len = segs[i].len;
		dsc->id = id;
		if (i == 0)
			head_flags = flags; /* written last, in vq_publish (§2.8.21) */
		else
			dsc->flags = flags;
		if (++q->next_avail == q->size) {
			q->next_avail = 0;
			q->avail_wrap ^= 1;
		}
	}
	q->chain_ndesc[id] = (u16)nsegs;
	q->pending_head[q->npending] = head_pos;
	q->pending_flags[q->npending] = head_flags;
	q->npending++;
	q->added = (u16)(q->added + nsegs);
}

/* Make the added chains visible; notify the device unless it suppressed
 * notifications (§2.7.13.3-4 / §2.8.21-22).  Returns 1 if it notified. */
static inline int vq_publish(struct vq *q)
{
	int kick;
	if (!q->packed) {
		u16 old = q->published, new_idx = q->avail_idx;
		if (old == new_idx)
			return 0;
		barrier(); /* descriptors and ring entries before the index (x86: TSO) */
		q->avail->idx = new_idx;
		q->published = new_idx;
		mb(); /* the index store before reading the device's suppression state */
		if (q->event_idx)
			kick = vring_need_event(*q->avail_event, new_idx, old);
		else
			kick = !(q->used->flags & VRING_USED_F_NO_NOTIFY);
	} else {
		if (!q->npending)
			return 0;
		barrier();
		for (u32 i = 0; i < q->npending; i++)
			q->pdesc[q->pending_head[i]].flags = q->pending_flags[i];
		q->npending = 0;
		mb();
		u16 added = q->added;
		q->added = 0;
		u16 flags = q->device_ev->flags;
		if (flags == VRING_PACKED_EVENT_FLAG_DISABLE) {
			kick = 0;
		} else if (flags == VRING_PACKED_EVENT_FLAG_DESC && q->event_idx) {
			u16 off_wrap = q->device_ev->off_wrap;
			int off = off_wrap & ~(1 << VRING_PACKED_EVENT_F_WRAP_CTR);
			if ((off_wrap >> VRING_PACKED_EVENT_F_WRAP_CTR) != q->avail_wrap)
				off -= q->size;
			kick = vring_need_event((u16)off, q->next_avail, (u16)(q->next_avail - added));
		} else {
			kick = 1;
		}
	}
	if (kick) {
		vd_notify(q->dev, q->index, q->notify);
		q->kicks++;
	}
	return kick;
}

/* Pop one used chain: returns 1 and its slot id / written length, 0 if none. */
static inline int vq_get_used(struct vq *q, u16 *id, u32 *len)
{
	if (!q->packed) {
		if (q->used->idx == q->last_used)
			return 0;
		barrier(); /* read the entry after the index */
		volatile struct vring_used_elem *e = &q->used_ring[q->last_used % q->size];
		*id = q->head_id[(u16)e->id % q->size];
		*len = e->len;
		q->last_used++;
		return 1;
	}
	volatile struct vring_packed_desc *dsc = &q->pdesc[q->next_used];
	u16 flags = dsc->flags;
	int avail = !!(flags & VRING_PACKED_DESC_F_AVAIL), used = !!(flags & VRING_PACKED_DESC_F_USED);
	if (avail != used || used != q->used_wrap)
		return 0;
	barrier();
	*id = dsc->id;
	*len = dsc->len;
	u16 n = q->chain_ndesc[*id];
	q->next_used = (u16)(q->next_used + n);
	if (q->next_used >= q->size) {
		q->next_used = (u16)(q->next_used - q->size);
		q->used_wrap ^= 1;
	}
	return 1;
}

/* Used buffer notifications: off (polling), or exactly when `count` more chains
 * have completed (split with EVENT_IDX: used_event; otherwise flags). */
static inline void vq_interrupts(struct vq *q, int enable, u16 count)
{
	if (!q->packed) {
		if (q->event_idx)
			*q->used_event = enable ? (u16)(q->last_used + count - 1)
						: (u16)(q->last_used - 1);
		else
			q->avail->flags = enable ? 0 : VRING_AVAIL_F_NO_INTERRUPT;
	} else {
		q->driver_ev->flags = enable ? VRING_PACKED_EVENT_FLAG_ENABLE
					     : VRING_PACKED_EVENT_FLAG_DISABLE;
	}
	mb();
}

#endif
