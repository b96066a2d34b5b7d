/* virtio-blk over virtio-mmio or virtio-pci: write then read-verify a region in 4 KiB
 * requests.
 *
 * Modern driver (virtio 1.4 §4.2.3 or §4.1.5, §5.2; mmio_base 0: find the device on the
 * PCI bus, virtio_dev.h): probe, status
 * handshake, feature negotiation (VERSION_1, FLUSH, optionally EVENT_IDX and
 * RING_PACKED per the parameter block), one request queue, split or packed ring.
 *
 * Up to params.queue_depth requests are in flight: the driver fills every free slot,
 * publishes them with one avail-index update and notifies once per batch when the
 * device has not suppressed notifications (VRING_USED_F_NO_NOTIFY / avail_event).
 * Completion: polling the used ring (IRQ_POLL, used buffer notifications disabled),
 * HLT until the device interrupts (IRQ_HLT, IF=0: then read + ack InterruptStatus, or
 * read the ISR status), or the IDT (IRQ_IDT: the handler reads and acks
 * InterruptStatus; over virtio-pci the queues and configuration changes have MSI-X
 * vectors 0x20 + irq_line and 0x20 + irq_line + 1, and the handlers touch no register).
 * With interrupts the driver asks for one notification per batch (used_event = last of
 * the batch).
 *
 * Phases and reporting match ide.c: BEGIN, write, MARK+0 flush, MARK+1 read, END;
 * DBG_IOS / DBG_ERRORS / DBG_RESULT.  Request r covers sectors [8r, 8r + 8) and is
 * filled with the same pattern as ide.c (emulator.run.expected_sector).
 */
#include "runtime.h"
#include "virtqueue.h"

enum { IRQ_POLL = 0, IRQ_HLT = 1, IRQ_IDT = 2 };

struct params {
	u32 magic;
	u32 version;
	u32 irq; /* IRQ_POLL / IRQ_HLT / IRQ_IDT */
	u32 irq_line;
	u32 nreqs;
	u32 queue_depth;
	u32 event_idx;
	u32 packed;
	u64 mmio_base; /* 0: virtio-pci, the device is found on the PCI bus */
	u64 ring_addr;
	u64 buf_addr; /* queue_depth * REQ_BYTES */
	u64 hdr_addr; /* queue_depth * HDR_STRIDE: header + status per slot */
	u32 seed;
	u32 queue_size;
	u32 flush;
	u32 req_bytes;
	u32 poll_spins; /* empty used-ring polls before a Status read; 0: POLL_SPINS,
			 * POLL_FOREVER: never (the VMM watches the device itself) */
};

#define HDR_STRIDE 32
#define STATUS_OFFSET 16
#define POLL_SPINS 200000u /* used-ring polls between two device-status reads */
#define POLL_FOREVER 0xFFFFFFFFu
#define MAX_SLOTS 64
#define SEGS 3

static volatile struct params *const P = (volatile struct params *)PARAMS_ADDR;
static struct vdev dev;
static struct vq q;
static u32 use_irq;
static volatile u32 isr_count, isr_bits;

static void vblk_isr(int irq)
{
	(void)irq;
	isr_bits |= vd_ack_interrupt(&dev);
	isr_count++;
}

/* MSI-X configuration vector: a configuration change (DEVICE_NEEDS_RESET). */
static void vblk_config_isr(int irq)
{
	(void)irq;
	isr_bits |= VD_INT_CONFIG;
	isr_count++;
}

static inline struct virtio_blk_outhdr *slot_hdr(u32 s)
{
	return (struct virtio_blk_outhdr *)(P->hdr_addr + (u64)s * HDR_STRIDE);
}
static inline volatile u8 *slot_status(u32 s)
{
	return (volatile u8 *)(P->hdr_addr + (u64)s * HDR_STRIDE + STATUS_OFFSET);
}
static inline u64 *slot_buf(u32 s) { return (u64 *)(P->buf_addr + (u64)s * P->req_bytes); }

/* Queue one request in slot s: type, sector, and data (none for FLUSH). */
static void submit(u32 s, u32 type, u64 sector, u32 data_len)
{
	struct virtio_blk_outhdr *h = slot_hdr(s);
	h->type = type;
	h->reserved = 0;
	h->sector = sector;
	*slot_status(s) = 0xFF;
	struct vq_seg segs[SEGS];
	u32 n = 0;
	segs[n++] = (struct vq_seg){ (u64)h, sizeof(*h), 0 };
	if (data_len)
		segs[n++] = (struct vq_seg){ (u64)slot_buf(s), data_len, type == VIRTIO_BLK_T_IN };
	segs[n++] = (struct vq_seg){ (u64)slot_status(s), 1, 1 };
	vq_add(&q, (u16)s, segs, n);
}

/* Interrupt modes: sleep until the device interrupts (it has by the time the
 * QueueNotify exit returns), then acknowledge it.  Returns -1 on a configuration
 * change interrupt (DEVICE_NEEDS_RESET, §2.1.2). */
static int wait_irq(u32 *seen)
{
	u32 isr;
	if (use_irq == IRQ_IDT) {
		while (isr_count == *seen)
			irq_wait();
		*seen = isr_count;
		isr = isr_bits;
		isr_bits = 0;
	} else {
		wait_for_interrupt();
		isr = vd_ack_interrupt(&dev);
	}
	return (isr & VD_INT_CONFIG) ? -1 : 0;
}

/* Publish the batch and wait until `count` requests completed; their slots go to
 * done[] in completion order.  Returns -1 if the device wants a reset. */
static int run_batch(u32 count, u16 *done)
{
	u32 seen = isr_count;
	if (use_irq)
		vq_interrupts(&q, 1, (u16)count);
	vq_publish(&q);
	if (use_irq && wait_irq(&seen))
		return -1;
	u32 got = 0, spins = 0;
	u32 budget = P->poll_spins ? P->poll_spins : POLL_SPINS;
	while (got < count) {
		u16 id;
		u32 len;
		if (vq_get_used(&q, &id, &len)) {
			done[got++] = id;
			spins = 0;
			continue;
		}
		if (use_irq) {
			if (wait_irq(&seen))
				return -1;
		} else if (budget == POLL_FOREVER || ++spins < budget) {
			/* A device beside the vCPU (vhost-user) completes while we spin on
			 * guest memory: no exit.  An in-VMM device has already completed
			 * everything when the notify exit returns, so this never spins. */
			__asm__ volatile("pause");
		} else {
			/* A long silence: ask the device whether it stopped (one exit). */
			spins = 0;
			if (vd_status(&dev) & VIRTIO_CONFIG_S_NEEDS_RESET)
				return -1;
		}
	}
	return 0;
}

/* Write (type OUT, filling buffers) or read-verify (IN) all requests. */
static int phase(u32 type, u32 *bad, u32 *ios)
{
	u32 qd = P->queue_depth, nreqs = P->nreqs, spr = P->req_bytes / VIRTIO_BLK_SECTOR_SIZE;
	u32 words = P->req_bytes / 8;
	u16 done[MAX_SLOTS];
	u32 slot_req[MAX_SLOTS];
	u32 next = 0;
	while (next < nreqs) {
		u32 n = 0;
		for (; n < qd && next < nreqs; n++, next++) {
			if (type == VIRTIO_BLK_T_OUT)
				fill(slot_buf(n), words, (u64)next * spr, P->seed);
			else
				memset(slot_buf(n), 0, P->req_bytes); /* as ide.c: same guest work */
			slot_req[n] = next;
			submit(n, type, (u64)next * spr, P->req_bytes);
		}
		if (run_batch(n, done))
			return VE_NEEDS_RESET;
		for (u32 i = 0; i < n; i++) {
			u32 s = done[i];
			if (*slot_status(s) != VIRTIO_BLK_S_OK)
				return type == VIRTIO_BLK_T_OUT ? VE_WRITE : VE_READ;
			if (type == VIRTIO_BLK_T_IN)
				*bad += check(slot_buf(s), words, (u64)slot_req[s] * spr, P->seed);
			(*ios)++;
		}
	}
	return VE_OK;
}

int main(void)
{
	if (P->magic != PARAMS_MAGIC || P->queue_depth == 0 || P->queue_depth > MAX_SLOTS ||
	    P->queue_depth * SEGS > P->queue_size || P->req_bytes % VIRTIO_BLK_SECTOR_SIZE)
		return VE_PARAMS;
	use_irq = P->irq;
	if (use_irq == IRQ_IDT) {
		irq_install((int)P->irq_line, vblk_isr);
		if (P->mmio_base == 0 && P->irq_line < 15)
			irq_install((int)P->irq_line + 1, vblk_config_isr);
	}

	int rc = vd_open(&dev, P->mmio_base, VIRTIO_ID_BLOCK);
	if (rc)
		return rc;
	u64 want = vd_ring_features((int)P->event_idx, (int)P->packed) | BIT64(VIRTIO_BLK_F_FLUSH);
	rc = vd_accept_features(&dev, want);
	if (rc)
		return rc;
	if (use_irq == IRQ_IDT) {
		rc = vd_use_vectors(&dev, IRQ_VECTOR_BASE + P->irq_line,
				    IRQ_VECTOR_BASE + P->irq_line + 1);
		if (rc)
			return rc;
	}

	rc = vq_init(&q, &dev, 0, P->ring_addr, (u16)P->queue_size, (int)P->packed,
		     (int)P->event_idx);
	if (rc)
		return rc;
	/* §5.2.4 capacity: a 64-bit field read as two 32-bit accesses (§4.2.2.2, §4.1.3.1). */
	u64 cap_lo = vd_config_read32(&dev, 0);
	u64 cap_hi = vd_config_read32(&dev, 4);
	u64 capacity = cap_lo | cap_hi << 32;
	u64 sectors = (u64)P->nreqs * (P->req_bytes / VIRTIO_BLK_SECTOR_SIZE);
	if (capacity < sectors)
		return VE_CAPACITY;
	vq_interrupts(&q, 0, 0);
	vd_driver_ok(&dev);
	dbg_puts("virtio-blk: start\n");

	u32 bad = 0, ios = 0;
	u16 done[1];
	dbg_mark(DBG_BEGIN);
	rc = phase(VIRTIO_BLK_T_OUT, &bad, &ios);
	if (rc)
		return rc;
	dbg_mark(DBG_MARK + 0); /* phase "flush" */
	if (P->flush) {
		submit(0, VIRTIO_BLK_T_FLUSH, 0, 0);
		if (run_batch(1, done))
			return VE_NEEDS_RESET;
		if (*slot_status(0) != VIRTIO_BLK_S_OK)
			return VE_FLUSH;
	}
	dbg_mark(DBG_MARK + 1); /* phase "read" */
	rc = phase(VIRTIO_BLK_T_IN, &bad, &ios);
	if (rc)
		return rc;
	dbg_mark(DBG_END);
	if (use_irq)
		vq_interrupts(&q, 0, 0);
	dbg_cmd(DBG_IOS, ios);
	dbg_cmd(DBG_ERRORS, bad);
	dbg_value(1, q.kicks);
	dbg_puts("virtio-blk: done\n");
	vd_reset(&dev); /* the device lets go of the rings */
	return bad ? VE_VERIFY : VE_OK;
}
