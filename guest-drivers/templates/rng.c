/* Template: a minimal virtio-rng driver over virtio-mmio or virtio-pci (virtio 1.4 §5.4), correct
 * under every `run-driver --timing` mode.  Posts `nbufs` device-writable buffers
 * (drivernormative §5.4.6.1: never device-readable ones), `rounds` times, and checks
 * that each comes back with 1..len bytes (devicenormative §5.4.6.2).
 *
 * --arg: nbufs (8), len (64), rounds (4), irq (1), packed (0), event_idx (1).
 */
#include <pyvirtio.h>

#define MAXB 64

static struct vdev vdev; /* either transport (virtio_dev.h, pv_open) */
static struct vq q;
static volatile u32 isr_bits, isr_count;

static void isr(int irq)
{
	(void)irq;
	isr_bits |= vd_ack_interrupt(&vdev);
	isr_count++;
}

int main(void)
{
	u32 nbufs = (u32)pv_arg(0, 8), len = (u32)pv_arg(1, 64), rounds = (u32)pv_arg(2, 4);
	u32 use_irq = (u32)pv_arg(3, 1);
	int packed = (int)pv_arg(4, 0), event_idx = (int)pv_arg(5, 1);
	if (!pv_params_ok() || PV_P->device_id != VIRTIO_ID_RNG || !nbufs || nbufs > MAXB || !len)
		return PV_E_PARAMS;
	if (use_irq)
		irq_install((int)PV_P->irq_line, isr);
	if (pv_open(&vdev, VIRTIO_ID_RNG))
		return PV_E_PROBE;
	int rc = vd_accept_features(&vdev, vd_ring_features(event_idx, packed));
	if (rc) {
		pv_fail(&vdev);
		return rc;
	}
	u32 qsize = pv_queue_max(&vdev, 0);
	if (qsize > 64)
		qsize = 64;
	if (nbufs > qsize)
		nbufs = qsize;
	void *ring = pv_alloc(16 << 10, 4096);
	u8 *bufs = pv_alloc((u64)nbufs * len, 16);
	if (!ring || !bufs)
		return PV_E_NOMEM;
	if (vq_init(&q, &vdev, 0, (u64)ring, (u16)qsize, packed, event_idx))
		return PV_E_QUEUE;
	vq_interrupts(&q, 0, 0);
	vd_driver_ok(&vdev);
	u32 filled = 0, bad = 0;
	for (u32 r = 0; r < rounds; r++) {
		for (u32 s = 0; s < nbufs; s++) {
			struct vq_seg seg = { (u64)(bufs + (u64)s * len), len, 1 };
			vq_add(&q, (u16)s, &seg, 1);
		}
		vq_publish(&q);
		for (u32 got = 0; got < nbufs;) {
			u16 id;
			u32 n;
			if (vq_get_used(&q, &id, &n)) {
				bad += id >= nbufs || n == 0 || n > len;
				got++;
				pv_progress(++filled);
				continue;
			}
			if (isr_bits & VD_INT_CONFIG && vd_status(&vdev) & VIRTIO_CONFIG_S_NEEDS_RESET)
				return PV_E_NEEDS_RESET;
			if (!use_irq) {
				pv_pause();
				continue;
			}
			u32 seen = isr_count;
			vq_interrupts(&q, 1, 1);
			if (vq_get_used(&q, &id, &n)) {
				bad += id >= nbufs || n == 0 || n > len;
				got++;
				pv_progress(++filled);
				continue;
			}
			while (isr_count == seen)
				irq_wait();
		}
	}
	dbg_puts("rng: done\n");
	vd_reset(&vdev);
	return bad ? PV_E_VERIFY : PV_OK;
}
