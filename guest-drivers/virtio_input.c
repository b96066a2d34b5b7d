/* virtio-input over virtio-mmio: read key events from the event queue and check them.
 *
 * Modern driver (virtio 1.4 §4.2.3, §5.8): probe, status handshake, feature negotiation
 * (VERSION_1, optionally EVENT_IDX; split ring only; virtio-input has no feature bits of its own,
 * §5.8.3), eventq (§5.8.2, queue 0) filled with queue_size device-writable buffers of
 * one struct virtio_input_event each (drivernormative §5.8.6.1: "SHOULD keep the
 * eventq populated").  The statusq is not used.  The device name is read through the
 * select/subsel protocol (§5.8.4: select ID_NAME, read size) and must be non-empty.
 *
 * Workload: params.ngroups key events (EV_KEY + SYN_REPORT: two events each), which
 * the VMM injects params.burst groups at a time whenever the guest halts waiting
 * (the host has "typed" while the guest slept).  The guest waits with IF=1 (IDT
 * delivery: the handler reads and acks InterruptStatus, §4.2.3.4), then takes every
 * used buffer, checks type, code and value against the expected sequence in order
 * (the same generator as emulator/virtio_input_paths.py), and posts the buffer again.
 * Reports DBG_IOS (events received), DBG_ERRORS (events out of order or wrong),
 * value 1 (eventq kicks after the start), and the result (VE_*).
 */
#include "runtime.h"
#include "virtqueue.h"

#define EV_SYN 0
#define EV_KEY 1
#define SYN_REPORT 0
#define MAX_QUEUE 64

struct params {
	u32 magic;
	u32 version;
	u32 ngroups;
	u32 burst;
	u32 seed;
	u32 event_idx;
	u32 packed;
	u32 queue_size;
	u32 irq_line;
	u32 reserved;
	u64 mmio_base;
	u64 ring_addr;
	u64 buf_addr; /* queue_size events */
};

struct ev {
	u16 type;
	u16 code;
	u32 value;
};

static volatile struct params *const P = (volatile struct params *)PARAMS_ADDR;
static struct vdev dev;
static struct vq q;
static volatile u32 isr_count, isr_bits;

static void input_isr(int irq)
{
	(void)irq;
	isr_bits |= vd_ack_interrupt(&dev);
	isr_count++;
}

static inline volatile struct ev *ev_buf(u32 s) { return (volatile struct ev *)(P->buf_addr + 8ULL * s); }

static void post(u32 s)
{
	ev_buf(s)->type = 0xFFFF;
	struct vq_seg seg = { (u64)ev_buf(s), sizeof(struct ev), 1 };
	vq_add(&q, (u16)s, &seg, 1);
}

/* Event i of the sequence: even i a key (code 16..55, press/release), odd i SYN. */
static void expected(u32 i, u32 seed, struct ev *out)
{
	u32 g = i / 2;
	if (i & 1) {
		out->type = EV_SYN;
		out->code = SYN_REPORT;
		out->value = 0;
		return;
	}
	u32 h = (g ^ seed) * 2654435761u;
	out->type = EV_KEY;
	out->code = (u16)(16 + (h >> 16) % 40);
	out->value = (g & 1) ? 0 : 1;
}

int main(void)
{
	if (P->magic != PARAMS_MAGIC || P->queue_size == 0 || P->queue_size > MAX_QUEUE ||
	    P->burst == 0 || 2 * P->burst > P->queue_size || P->packed)
		return VE_PARAMS;
	irq_install((int)P->irq_line, input_isr);
	int rc = vd_open(&dev, P->mmio_base, VIRTIO_ID_INPUT);
	if (rc)
		return rc;
	rc = vd_accept_features(&dev, vd_ring_features((int)P->event_idx, (int)P->packed));
	if (rc)
		return rc;
	rc = vq_init(&q, &dev, 0, P->ring_addr, (u16)P->queue_size, (int)P->packed,
		     (int)P->event_idx);
	if (rc)
		return rc;
	/* §5.8.4: select ID_NAME, subsel 0; size is the name's length. */
	mmio_write8(P->mmio_base + VIRTIO_MMIO_CONFIG + 0, VIRTIO_INPUT_CFG_ID_NAME);
	mmio_write8(P->mmio_base + VIRTIO_MMIO_CONFIG + 1, 0);
	if (mmio_read8(P->mmio_base + VIRTIO_MMIO_CONFIG + 2) == 0)
		return VE_DEVICE_ID;
	vq_interrupts(&q, 0, 0);
	vd_driver_ok(&dev);
	for (u32 s = 0; s < P->queue_size; s++)
		post(s);
	vq_publish(&q); /* the first notify starts the device's eventq service */
	u32 kicks0 = q.kicks;
	dbg_puts("virtio-input: start\n");

	u32 total = 2 * P->ngroups, got = 0, bad = 0, seen = isr_count;
	dbg_mark(DBG_BEGIN);
	while (got < total) {
		u16 id;
		u32 len;
		if (vq_get_used(&q, &id, &len)) {
			struct ev want;
			expected(got, P->seed, &want);
			volatile struct ev *e = ev_buf(id);
			if (id >= P->queue_size || len != sizeof(struct ev) || e->type != want.type ||
			    e->code != want.code || e->value != want.value)
				bad++;
			got++;
			post(id);
			continue;
		}
		vq_publish(&q); /* buffers back before sleeping (notifies only if the device waits) */
		vq_interrupts(&q, 1, 1);
		if (q.used->idx != q.last_used) /* used before used_event was set: no sleep */
			continue;
		while (isr_count == seen)
			irq_wait();
		seen = isr_count;
		if (isr_bits & VD_INT_CONFIG)
			return VE_NEEDS_RESET;
		isr_bits = 0;
		vq_interrupts(&q, 0, 0);
	}
	dbg_mark(DBG_END);
	dbg_cmd(DBG_IOS, got);
	dbg_cmd(DBG_ERRORS, bad);
	dbg_value(1, q.kicks - kicks0);
	dbg_puts("virtio-input: done\n");
	vd_reset(&dev);
	return bad ? VE_VERIFY : VE_OK;
}
