/* Template: a minimal virtio-net driver over virtio-mmio or virtio-pci (virtio 1.4 §5.1),
 * correct under every `run-driver --timing` mode.  Copy it and change it.
 *
 * Negotiates VIRTIO_NET_F_MAC and VIRTIO_NET_F_STATUS (§5.1.3), keeps receiveq1 (queue 0)
 * populated with device-writable buffers of a 12-byte header + 1514 bytes
 * (drivernormative §5.1.9.3.1), and sends `npkts` frames on transmitq1 (queue 1), each
 * a zeroed struct virtio_net_hdr (flags 0, GSO_NONE, num_buffers 0: drivernormative
 * §5.1.9.2.1) + an Ethernet frame to PEER carrying its sequence number.  The wire's
 * peer sends each frame back; the driver checks every frame it receives (addressed to
 * its MAC, intact) and counts duplicates.  It stops transmitting while the link is
 * down (status VIRTIO_NET_S_LINK_UP clear, read on each configuration change,
 * §5.1.4; the interrupt cause is polled before each batch of frames).
 *
 * Results: PV_OK when every frame came back intact (duplicates are counted, not an
 * error: a network may duplicate); PV_E_LOST when some never came back after `grace`
 * polls; PV_E_VERIFY for a corrupted frame.  pv_value: 1 sent, 2 received, 3
 * duplicates, 4 lost, 5 link-down seen, 6 link-up seen, 7 bad frames.
 *
 * --arg: npkts (16), depth (4: frames in flight), irq (1), packed (0), event_idx (1),
 * len (64: payload bytes), grace (256).
 */
#include <pyvirtio.h>

#define HDR 12u /* struct virtio_net_hdr with num_buffers (VERSION_1, §5.1.6) */
#define ETH 14u
#define RXLEN (HDR + 1514u)
#define RXN 16u
#define MAXD 16u
#define MAXP 256u
#define ETHERTYPE 0x88B5 /* IEEE local experimental */
#define NET_S_LINK_UP 1

#ifndef TX_HDR_HOOK /* a buggy variant's mistake in the header (tests/drvkit/drivers) */
#define TX_HDR_HOOK(h, seq) ((void)(h), (void)(seq))
#endif

static const u8 PEER[6] = { 0x52, 0x54, 0x00, 0x12, 0x00, 0x02 };
static struct vdev vdev;
static struct vq rxq, txq;
static volatile u32 isr_bits, isr_count;
static u8 mac[6];
static u8 *rxbuf, *txbuf;
static u8 seen[MAXP];

static void isr(int irq)
{
	(void)irq;
	isr_bits |= vd_ack_interrupt(&vdev);
	isr_count++;
}

static void post_rx(u16 s)
{
	struct vq_seg seg = { (u64)(rxbuf + (u64)s * RXLEN), RXLEN, 1 };
	vq_add(&rxq, s, &seg, 1);
}

/* A used entry is there (without taking it). */
static int used_pending(struct vq *q)
{
	if (!q->packed)
		return q->used->idx != q->last_used;
	u16 flags = q->pdesc[q->next_used].flags;
	int avail = !!(flags & VRING_PACKED_DESC_F_AVAIL), used = !!(flags & VRING_PACKED_DESC_F_USED);
	return avail == used && used == q->used_wrap;
}

static u8 pattern(u32 seq, u32 i) { return (u8)(seq * 7 + i); }

static void send(u16 slot, u32 seq, u32 len)
{
	u8 *p = txbuf + (u64)slot * RXLEN;
	memset(p, 0, HDR); /* flags 0, gso_type GSO_NONE, num_buffers 0 */
	TX_HDR_HOOK(p, seq);
	u8 *f = p + HDR;
	memcpy(f, PEER, 6);
	memcpy(f + 6, mac, 6);
	f[12] = ETHERTYPE >> 8;
	f[13] = ETHERTYPE & 0xFF;
	memcpy(f + ETH, &seq, 4);
	for (u32 i = 4; i < len; i++)
		f[ETH + i] = pattern(seq, i);
	struct vq_seg seg = { (u64)p, HDR + ETH + len, 0 };
	vq_add(&txq, slot, &seg, 1);
}

/* A received buffer: 1 good, 0 a duplicate, -1 bad. */
static int receive(u16 s, u32 n, u32 npkts, u32 len)
{
	const u8 *f = rxbuf + (u64)s * RXLEN + HDR;
	u32 seq;
	if (n != HDR + ETH + len || memcmp(f, mac, 6) || memcmp(f + 6, PEER, 6) ||
	    f[12] != ETHERTYPE >> 8 || f[13] != (ETHERTYPE & 0xFF))
		return -1;
	memcpy(&seq, f + ETH, 4);
	if (seq >= npkts)
		return -1;
	for (u32 i = 4; i < len; i++)
		if (f[ETH + i] != pattern(seq, i))
			return -1;
	if (seen[seq])
		return 0;
	seen[seq] = 1;
	return 1;
}

int main(void)
{
	u32 npkts = (u32)pv_arg(0, 16), depth = (u32)pv_arg(1, 4), use_irq = (u32)pv_arg(2, 1);
	int packed = (int)pv_arg(3, 0), event_idx = (int)pv_arg(4, 1);
	u32 len = (u32)pv_arg(5, 64), grace = (u32)pv_arg(6, 256);
	if (!pv_params_ok() || PV_P->device_id != VIRTIO_ID_NET || !npkts || npkts > MAXP || !depth ||
	    depth > MAXD || len < 4 || len > 1500)
		return PV_E_PARAMS;
	if (use_irq)
		irq_install((int)PV_P->irq_line, isr);
	if (pv_open(&vdev, VIRTIO_ID_NET))
		return PV_E_PROBE;
	int rc = vd_accept_features(&vdev, vd_ring_features(event_idx, packed) |
						   BIT64(VIRTIO_NET_F_MAC) | BIT64(VIRTIO_NET_F_STATUS));
	if (rc) {
		pv_fail(&vdev);
		return rc;
	}
	for (u32 i = 0; i < 6; i++)
		mac[i] = pv_config_read8(&vdev, i); /* §5.1.4: mac */
	u32 link_up = pv_config_read16(&vdev, 6) & NET_S_LINK_UP;
	u32 rxsize = pv_queue_max(&vdev, 0), txsize = pv_queue_max(&vdev, 1);
	if (rxsize > 64)
		rxsize = 64;
	if (txsize > 64)
		txsize = 64;
	u32 nrx = rxsize < RXN ? rxsize : RXN;
	if (depth > txsize)
		depth = txsize;
	void *r0 = pv_alloc(64 << 10, 4096), *r1 = pv_alloc(64 << 10, 4096);
	rxbuf = pv_alloc((u64)nrx * RXLEN, 64);
	txbuf = pv_alloc((u64)MAXD * RXLEN, 64);
	if (!r0 || !r1 || !rxbuf || !txbuf || !nrx)
		return PV_E_NOMEM;
	if (vq_init(&rxq, &vdev, 0, (u64)r0, (u16)rxsize, packed, event_idx) ||
	    vq_init(&txq, &vdev, 1, (u64)r1, (u16)txsize, packed, event_idx))
		return PV_E_QUEUE;
	vq_interrupts(&rxq, 0, 0);
	vq_interrupts(&txq, 0, 0);
	vd_driver_ok(&vdev);
	for (u32 s = 0; s < nrx; s++)
		post_rx((u16)s);
	vq_publish(&rxq);

	u16 free_slots[MAXD];
	u32 nfree = depth, sent = 0, txdone = 0, got = 0, dups = 0, bad = 0, downs = 0, ups = 0;
	u32 idle = 0;
	for (u32 s = 0; s < depth; s++)
		free_slots[s] = (u16)s;
	for (;;) {
		int progress = 0;
		u16 id;
		u32 n;
		/* Interrupts are taken only while sleeping: poll the cause before sending, so
		 * a link change (configuration change, §2.5.2) is seen before the next frame. */
		isr_bits |= vd_ack_interrupt(&vdev);
		if (isr_bits & VD_INT_CONFIG) {
			isr_bits &= ~VD_INT_CONFIG;
			if (vd_status(&vdev) & VIRTIO_CONFIG_S_NEEDS_RESET)
				return PV_E_NEEDS_RESET;
			u32 up = pv_config_read16(&vdev, 6) & NET_S_LINK_UP;
			if (up != link_up) {
				downs += !up;
				ups += up;
				dbg_puts(up ? "net: link up\n" : "net: link down\n");
			}
			link_up = up;
		}
		while (link_up && nfree && sent < npkts) {
			send(free_slots[--nfree], sent, len);
			sent++;
			progress = 1;
		}
		vq_publish(&txq);
		while (vq_get_used(&txq, &id, &n)) { /* the device read it: the slot is free */
			free_slots[nfree++] = id;
			txdone++;
			progress = 1;
		}
		while (vq_get_used(&rxq, &id, &n)) {
			int r = receive(id, n, npkts, len);
			got += r == 1;
			dups += r == 0;
			bad += r < 0;
			if (r == 1)
				pv_progress(got);
			post_rx(id); /* keep receiveq1 populated */
			progress = 1;
		}
		vq_publish(&rxq);
		if (isr_bits & VD_INT_CONFIG)
			continue;
		if (sent == npkts && txdone == sent && got == npkts)
			break;
		if (progress) {
			idle = 0;
			continue;
		}
		if (sent == npkts && txdone == sent) {
			/* Only echoes are missing: poll a while (they may be held by the
			 * device; a frame lost on the wire never comes). */
			if (++idle > grace)
				break;
			pv_pause();
			continue;
		}
		if (!use_irq) {
			pv_pause();
			continue;
		}
		u32 seen_irq = isr_count;
		vq_interrupts(&txq, 1, 1); /* the next completion interrupts ... */
		vq_interrupts(&rxq, 1, 1);
		/* ... and re-check (§2.7.10) */
		if (!used_pending(&txq) && !used_pending(&rxq) && !(isr_bits & VD_INT_CONFIG))
			while (isr_count == seen_irq)
				irq_wait();
		vq_interrupts(&txq, 0, 0);
		vq_interrupts(&rxq, 0, 0);
	}
	pv_value(1, sent);
	pv_value(2, got);
	pv_value(3, dups);
	pv_value(4, npkts - got);
	pv_value(5, downs);
	pv_value(6, ups);
	pv_value(7, bad);
	dbg_puts("net: done\n");
	vd_reset(&vdev);
	if (bad)
		return PV_E_VERIFY;
	return got == npkts ? PV_OK : PV_E_LOST;
}
