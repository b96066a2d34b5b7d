/* Template: a minimal virtio-blk driver over virtio-mmio or virtio-pci (virtio 1.4
 * §3.1.1, §4.1.5, §4.2.3, §5.2), correct under every `run-driver --timing` mode.  Copy it and change it.
 *
 * Writes `nreqs` 4 KiB requests (a pattern), flushes, reads them back and checks
 * them, with up to `depth` requests in flight.  Completions are matched by the used
 * entry's id (they may come back in any order, §2.7.8), and every wait re-checks the
 * ring after asking for the next interrupt (§2.7.10) before sleeping.
 *
 * --arg: nreqs (16), depth (4), irq (1: interrupts through the IDT, 0: polling with
 * pv_pause), packed (0), event_idx (1).
 */
#include <pyvirtio.h>

#define REQ 4096u
#define MAXD 32

static struct vdev vdev; /* either transport (virtio_dev.h, pv_open) */
static struct vq q;
static u32 use_irq;
static volatile u32 isr_bits, isr_count;
static struct virtio_blk_outhdr *hdr;
static volatile u8 *status;
static u8 *buf;

static void isr(int irq)
{
	(void)irq;
	isr_bits |= vd_ack_interrupt(&vdev);
	isr_count++;
}

static void submit(u16 s, u32 type, u64 sector, u32 len)
{
	hdr[s].type = type;
	hdr[s].reserved = 0;
	hdr[s].sector = sector;
	status[s] = 0xFF;
	struct vq_seg segs[3];
	u32 n = 0;
	segs[n++] = (struct vq_seg){ (u64)&hdr[s], sizeof(hdr[s]), 0 };
	if (len)
		segs[n++] = (struct vq_seg){ (u64)(buf + (u64)s * REQ), len, type == VIRTIO_BLK_T_IN };
	segs[n++] = (struct vq_seg){ (u64)&status[s], 1, 1 };
	vq_add(&q, s, segs, n);
}

/* Wait for one completion: its slot.  -1: the device needs a reset (§2.1.2). */
static int wait_one(void)
{
	for (;;) {
		u16 id;
		u32 len;
		if (vq_get_used(&q, &id, &len))
			return id;
		if (isr_bits & VD_INT_CONFIG) {
			isr_bits &= ~VD_INT_CONFIG;
			if (vd_status(&vdev) & VIRTIO_CONFIG_S_NEEDS_RESET)
				return -1;
			dbg_puts("blk: configuration changed\n");
		}
		if (!use_irq) {
			pv_pause();
			continue;
		}
		u32 seen = isr_count;
		vq_interrupts(&q, 1, 1); /* the next completion interrupts */
		if (vq_get_used(&q, &id, &len))  /* ... and re-check before sleeping */
			return id;
		while (isr_count == seen)
			irq_wait();
	}
}

static int phase(u32 type, u32 nreqs, u32 depth, u32 *bad)
{
	u32 next = 0, inflight = 0, done = 0, slot_req[MAXD];
	u16 free_slots[MAXD];
	u32 nfree = depth;
	for (u32 s = 0; s < depth; s++)
		free_slots[s] = (u16)s;
	while (done < nreqs) {
		while (nfree && next < nreqs) {
			u16 s = free_slots[--nfree];
			u64 *b = (u64 *)(buf + (u64)s * REQ);
			if (type == VIRTIO_BLK_T_OUT)
				fill(b, REQ / 8, (u64)next * 8, 7);
			slot_req[s] = next;
			submit(s, type, (u64)next * 8, REQ);
			next++;
			inflight++;
		}
		vq_publish(&q);
		int s = wait_one();
		if (s < 0)
			return PV_E_NEEDS_RESET;
		if (status[s] != VIRTIO_BLK_S_OK)
			return PV_E_IO;
		if (type == VIRTIO_BLK_T_IN)
			*bad += check((u64 *)(buf + (u64)s * REQ), REQ / 8, (u64)slot_req[s] * 8, 7);
		free_slots[nfree++] = (u16)s;
		inflight--;
		done++;
		pv_progress(done);
	}
	return PV_OK;
}

int main(void)
{
	u32 nreqs = (u32)pv_arg(0, 16), depth = (u32)pv_arg(1, 4);
	use_irq = (u32)pv_arg(2, 1);
	int packed = (int)pv_arg(3, 0), event_idx = (int)pv_arg(4, 1);
	if (!pv_params_ok() || PV_P->device_id != VIRTIO_ID_BLOCK || !depth || depth > MAXD)
		return PV_E_PARAMS;
	if (use_irq)
		irq_install((int)PV_P->irq_line, isr);
	int rc = pv_open(&vdev, VIRTIO_ID_BLOCK);
	if (rc)
		return PV_E_PROBE;
	rc = vd_accept_features(&vdev, vd_ring_features(event_idx, packed) | BIT64(VIRTIO_BLK_F_FLUSH));
	if (rc) {
		pv_fail(&vdev);
		return rc;
	}
	u32 qsize = pv_queue_max(&vdev, 0);
	if (qsize > 128)
		qsize = 128;
	if (qsize < 3 * depth)
		depth = qsize / 3;
	void *ring = pv_alloc(64 << 10, 4096);
	hdr = pv_alloc(sizeof(*hdr) * MAXD, 16);
	status = pv_alloc(MAXD, 1);
	buf = pv_alloc((u64)MAXD * REQ, 4096);
	if (!ring || !hdr || !status || !buf || !depth)
		return PV_E_NOMEM;
	if (vq_init(&q, &vdev, 0, (u64)ring, (u16)qsize, packed, event_idx))
		return PV_E_QUEUE;
	u64 capacity = vd_config_read32(&vdev, 0) | (u64)vd_config_read32(&vdev, 4) << 32;
	if (capacity < (u64)nreqs * 8)
		return PV_E_PARAMS;
	vq_interrupts(&q, 0, 0);
	vd_driver_ok(&vdev);

	u32 bad = 0;
	rc = phase(VIRTIO_BLK_T_OUT, nreqs, depth, &bad);
	if (rc)
		return rc;
	submit(0, VIRTIO_BLK_T_FLUSH, 0, 0);
	vq_publish(&q);
	int s = wait_one();
	if (s < 0)
		return PV_E_NEEDS_RESET;
	if (status[s] != VIRTIO_BLK_S_OK)
		return PV_E_IO;
	rc = phase(VIRTIO_BLK_T_IN, nreqs, depth, &bad);
	if (rc)
		return rc;
	pv_value(1, q.kicks);
	dbg_puts("blk: done\n");
	vd_reset(&vdev);
	return bad ? PV_E_VERIFY : PV_OK;
}
