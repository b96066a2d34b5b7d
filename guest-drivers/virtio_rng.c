/* virtio-rng over virtio-mmio or virtio-pci: ask the entropy device for random bytes and check them.
 *
 * Modern driver (virtio 1.4 §4.2.3 or §4.1.5, §5.4; mmio_base 0: virtio-pci): probe, status
 * handshake, feature negotiation (VERSION_1, optionally EVENT_IDX and RING_PACKED
 * per the parameter block), one requestq (§5.4.2), split or packed ring.
 *
 * For each of `rounds` rounds the driver posts `nbufs` device-writable buffers of
 * `buf_len` bytes (drivernormative §5.4.6.1: never device-readable ones), filled
 * with a marker byte, publishes them with one avail-index update, notifies, and
 * polls the used ring until all come back.  A buffer is bad when the written length
 * is 0 or larger than the buffer (devicenormative §5.4.6.2: "one or more random
 * bytes"), when its bytes are constant, or when it repeats the bytes another buffer
 * received.  Reports DBG_IOS (buffers filled), DBG_ERRORS (bad buffers), values
 * 1 (bytes received) and 2 (kicks), and the result (VE_*).
 */
#include "runtime.h"
#include "virtqueue.h"

struct params {
	u32 magic;
	u32 version;
	u32 nbufs;
	u32 buf_len;
	u32 rounds;
	u32 event_idx;
	u32 packed;
	u32 queue_size;
	u64 mmio_base;
	u64 ring_addr;
	u64 buf_addr; /* nbufs * buf_len */
};

#define MAX_BUFS 64
#define MARKER 0xA5
#define POLL_SPINS 200000u

static volatile struct params *const P = (volatile struct params *)PARAMS_ADDR;
static struct vdev dev;
static struct vq q;

static inline u8 *buf(u32 s) { return (u8 *)(P->buf_addr + (u64)s * P->buf_len); }

/* Constant bytes, or the same first 16 bytes as an earlier buffer of this round. */
static int suspicious(u32 s, u32 len)
{
	const u8 *b = buf(s);
	u32 same = 1;
	for (u32 i = 1; i < len; i++)
		same += b[i] == b[0];
	if (same == len && len > 1)
		return 1;
	u32 n = len < 16 ? len : 16;
	for (u32 t = 0; t < s && n >= 8; t++)
		if (!memcmp(buf(t), b, n))
			return 1;
	return 0;
}

/* One round: post every buffer, wait for all of them.  Returns VE_* */
static int run_round(u32 *bad, u32 *filled, u32 *bytes)
{
	u32 nbufs = P->nbufs, len = P->buf_len;
	for (u32 s = 0; s < nbufs; s++) {
		memset(buf(s), MARKER, len);
		struct vq_seg seg = { (u64)buf(s), len, 1 };
		vq_add(&q, (u16)s, &seg, 1);
	}
	vq_publish(&q);
	u32 got = 0, spins = 0;
	while (got < nbufs) {
		u16 id;
		u32 written;
		if (vq_get_used(&q, &id, &written)) {
			got++;
			spins = 0;
			if (id >= nbufs || written == 0 || written > len || suspicious(id, written))
				(*bad)++;
			(*filled)++;
			*bytes += written;
			continue;
		}
		if (++spins < POLL_SPINS) {
			__asm__ volatile("pause");
		} else {
			spins = 0;
			if (vd_status(&dev) & VIRTIO_CONFIG_S_NEEDS_RESET)
				return VE_NEEDS_RESET;
		}
	}
	return VE_OK;
}

int main(void)
{
	if (P->magic != PARAMS_MAGIC || P->nbufs == 0 || P->nbufs > MAX_BUFS ||
	    P->nbufs > P->queue_size || P->buf_len == 0)
		return VE_PARAMS;
	int rc = vd_open(&dev, P->mmio_base, VIRTIO_ID_RNG);
	if (rc)
		return rc;
	rc = vd_accept_features(&dev, vd_ring_features((int)P->event_idx, (int)P->packed));
	if (rc)
		return rc;
	rc = vq_init(&q, &dev, 0, P->ring_addr, (u16)P->queue_size, (int)P->packed,
		     (int)P->event_idx);
	if (rc)
		return rc;
	vq_interrupts(&q, 0, 0); /* polling */
	vd_driver_ok(&dev);
	dbg_puts("virtio-rng: start\n");

	u32 bad = 0, filled = 0, bytes = 0;
	dbg_mark(DBG_BEGIN);
	for (u32 r = 0; r < P->rounds; r++) {
		rc = run_round(&bad, &filled, &bytes);
		if (rc)
			return rc;
	}
	dbg_mark(DBG_END);
	dbg_cmd(DBG_IOS, filled);
	dbg_cmd(DBG_ERRORS, bad);
	dbg_value(1, bytes);
	dbg_value(2, q.kicks);
	dbg_puts("virtio-rng: done\n");
	vd_reset(&dev);
	return bad ? VE_VERIFY : VE_OK;
}
