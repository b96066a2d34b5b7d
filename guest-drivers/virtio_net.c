/* virtio-net over virtio-mmio: two NICs of one machine on the VMM's switch.
 *
 * Modern driver (virtio 1.4 §4.2.3, §5.1) for each NIC: probe, status handshake,
 * feature negotiation (VERSION_1, MAC, optionally EVENT_IDX and RING_PACKED per the
 * parameter block; no MRG_RXBUF, so every packet takes one receive buffer and the
 * header is the 12-byte struct virtio_net_hdr_v1, §5.1.6), receiveq1 (0) and
 * transmitq1 (1) (§5.1.2; no control queue: CTRL_VQ is not negotiated).  The station
 * address is read from the configuration space (§5.1.4, byte accesses).
 *
 * Receive (§5.1.6.3): every receive queue is filled with device-writable buffers of
 * RX_BUF_LEN bytes (drivernormative §5.1.6.3.1: at least 1526 without the GUEST_TSO
 * features) right after DRIVER_OK (one notify starts the queue); a consumed buffer is
 * posted again at once, so the device never runs out and reposting costs no notify
 * (the device only asks for one when it waits for buffers, §2.7.10).
 *
 * Transmit (§5.1.6.2): one descriptor per packet holding the header (flags 0,
 * gso_type VIRTIO_NET_HDR_GSO_NONE: driver-normative §5.1.6.2.1) and the frame.
 * params.batch frames are queued, published with one avail-index update and notified
 * once; the receiving NIC's used ring then holds them (the VMM's device ran the switch
 * inside the notify exit).  Completion: polled (IRQ_POLL), or by an interrupt of the
 * receiving NIC per batch (IRQ_HLT / IRQ_IDT; used_event = the batch's last packet).
 *
 * Workload as ne2000.c: params.npackets frames of params.frame_len bytes, the first
 * half from NIC 0 to NIC 1 (phase 1), the second half back (MARK+0).  Each frame
 * carries its sequence number's pattern; the receiver checks the length, addresses,
 * order and every payload byte (DBG_ERRORS), and the header apart (value 5: headers
 * with num_buffers other than 1, which the device must write without MRG_RXBUF,
 * device-normative §5.1.9.4.1, or with a GSO type).  The header count is kept apart so
 * that the same program verifies its data on a device that deviates there (QEMU's
 * virtio-net leaves num_buffers 0 without MRG_RXBUF: bench/qemu_virtio_exits.py); the
 * emulator's path requires it to be 0.  Reports DBG_IOS (packets received and
 * checked), DBG_ERRORS, values 1 and 2 (kicks of transmitq1 of NIC 0 and NIC 1), 3 and
 * 4 (receiveq1 kicks), 5 (bad headers), and the result (VE_*: VE_VERIFY on a data
 * error).
 */
#include "runtime.h"
#include "virtqueue.h"

enum { IRQ_POLL = 0, IRQ_HLT = 1, IRQ_IDT = 2 };
#define NNICS 2
#define ETH_ALEN 6
#define ETH_HLEN 14
#define ETH_FRAME_LEN 1514
#define ETHERTYPE 0x88B5 /* IEEE 802 local experimental */
#define HDR_LEN 12 /* struct virtio_net_hdr_v1 */
#define RX_BUF_LEN 1536
#define BUF_STRIDE 2048
#define MAX_BATCH 64
#define MAX_QUEUE 256
#define RXQ 0
#define TXQ 1
#define RING_STRIDE 0x10000UL /* per queue: split rings of 256 fit in 16 KiB */
#define NIC_BUF_STRIDE 0x100000UL /* per NIC: tx buffers, then rx buffers at +RX_OFFSET */
#define RX_OFFSET 0x20000UL
#define POLL_SPINS 200000u

struct params {
	u32 magic;
	u32 version;
	u32 irq; /* IRQ_POLL / IRQ_HLT / IRQ_IDT */
	u32 npackets;
	u32 frame_len;
	u32 batch;
	u32 seed;
	u32 event_idx;
	u32 packed;
	u32 queue_size;
	u32 irq_line[NNICS];
	u64 mmio_base[NNICS];
	u64 ring_addr; /* NNICS * 2 queues * RING_STRIDE */
	u64 buf_addr; /* NNICS * NIC_BUF_STRIDE */
};

struct nic {
	struct vdev dev;
	struct vq rx, tx;
	u8 mac[ETH_ALEN];
	u64 bufs;
	volatile u32 isr_count, isr_bits;
};

static volatile struct params *const P = (volatile struct params *)PARAMS_ADDR;
static struct nic nics[NNICS];
static u32 use_irq;
static u32 bad, bad_hdr;

static inline u8 *tx_buf(struct nic *n, u32 slot) { return (u8 *)(n->bufs + (u64)slot * BUF_STRIDE); }
static inline u8 *rx_buf(struct nic *n, u32 slot)
{
	return (u8 *)(n->bufs + RX_OFFSET + (u64)slot * BUF_STRIDE);
}

static void nic_isr(struct nic *n)
{
	n->isr_bits |= vd_ack_interrupt(&n->dev);
	n->isr_count++;
}
static void nic0_isr(int irq) { (void)irq; nic_isr(&nics[0]); }
static void nic1_isr(int irq) { (void)irq; nic_isr(&nics[1]); }

/* Post receive buffer `slot` (device-writable, §5.1.6.3.1). */
static void post_rx(struct nic *n, u32 slot)
{
	struct vq_seg seg = { (u64)rx_buf(n, slot), RX_BUF_LEN, 1 };
	vq_add(&n->rx, (u16)slot, &seg, 1);
}

static int nic_init(struct nic *n, u32 i)
{
	int rc = vd_open(&n->dev, P->mmio_base[i], VIRTIO_ID_NET);
	if (rc)
		return rc;
	u64 want = vd_ring_features((int)P->event_idx, (int)P->packed) | BIT64(VIRTIO_NET_F_MAC);
	rc = vd_accept_features(&n->dev, want);
	if (rc)
		return rc;
	u64 rings = P->ring_addr + (u64)i * 2 * RING_STRIDE;
	rc = vq_init(&n->rx, &n->dev, RXQ, rings, (u16)P->queue_size, (int)P->packed,
		     (int)P->event_idx);
	if (rc)
		return rc;
	rc = vq_init(&n->tx, &n->dev, TXQ, rings + RING_STRIDE, (u16)P->queue_size,
		     (int)P->packed, (int)P->event_idx);
	if (rc)
		return rc;
	for (u32 b = 0; b < ETH_ALEN; b++) /* §5.1.4 mac, byte by byte */
		n->mac[b] = mmio_read8(P->mmio_base[i] + VIRTIO_MMIO_CONFIG + b);
	n->bufs = P->buf_addr + (u64)i * NIC_BUF_STRIDE;
	vq_interrupts(&n->rx, 0, 0);
	vq_interrupts(&n->tx, 0, 0);
	vd_driver_ok(&n->dev);
	/* Fill receiveq1: at most 64 chains per publish (the packed ring's pending list). */
	for (u32 s = 0; s < P->queue_size; s++) {
		post_rx(n, s);
		if ((s + 1) % MAX_BATCH == 0)
			vq_publish(&n->rx);
	}
	vq_publish(&n->rx);
	return VE_OK;
}

static inline u8 payload_byte(u32 seq, u32 j, u32 seed)
{
	return (u8)(pattern_word(seq, j / 8, seed) >> (8 * (j & 7)));
}

/* Queue frame `seq` from `from` to `to` in transmit slot `slot`. */
static void queue_frame(struct nic *from, const struct nic *to, u32 slot, u32 seq, u32 len)
{
	u8 *b = tx_buf(from, slot);
	struct virtio_net_hdr_v1 *h = (struct virtio_net_hdr_v1 *)b;
	memset(h, 0, sizeof(*h)); /* no checksum offload, VIRTIO_NET_HDR_GSO_NONE */
	u8 *f = b + HDR_LEN;
	memcpy(f, to->mac, ETH_ALEN);
	memcpy(f + ETH_ALEN, from->mac, ETH_ALEN);
	f[12] = ETHERTYPE >> 8;
	f[13] = ETHERTYPE & 0xFF;
	for (u32 j = 0; j < len - ETH_HLEN; j++)
		f[ETH_HLEN + j] = payload_byte(seq, j, P->seed);
	struct vq_seg seg = { (u64)b, HDR_LEN + len, 0 };
	vq_add(&from->tx, (u16)slot, &seg, 1);
}

static u32 check_frame(const u8 *b, u32 written, const struct nic *from, const struct nic *to,
		       u32 seq, u32 len)
{
	const struct virtio_net_hdr_v1 *h = (const struct virtio_net_hdr_v1 *)b;
	if (written != HDR_LEN + len)
		return 1;
	if (h->num_buffers != 1 || h->gso_type != VIRTIO_NET_HDR_GSO_NONE)
		bad_hdr++;
	const u8 *f = b + HDR_LEN;
	u32 n = 0;
	if (memcmp(f, to->mac, ETH_ALEN) || memcmp(f + ETH_ALEN, from->mac, ETH_ALEN) ||
	    f[12] != (ETHERTYPE >> 8) || f[13] != (ETHERTYPE & 0xFF))
		n++;
	for (u32 j = 0; j < len - ETH_HLEN; j++)
		if (f[ETH_HLEN + j] != payload_byte(seq, j, P->seed))
			n++;
	return n;
}

/* Interrupt modes: sleep until the receiver interrupts; -1 on a configuration change. */
static int wait_irq(struct nic *n, u32 *seen)
{
	u32 isr;
	if (use_irq == IRQ_IDT) {
		while (n->isr_count == *seen)
			irq_wait();
		*seen = n->isr_count;
		isr = n->isr_bits;
		n->isr_bits = 0;
	} else {
		wait_for_interrupt();
		isr = vd_ack_interrupt(&n->dev);
	}
	return (isr & VD_INT_CONFIG) ? -1 : 0;
}

/* Send frames [seq, seq + count) and receive them on `to`, checking each. */
static int run_batch(struct nic *from, struct nic *to, u32 seq, u32 count, u32 len)
{
	u32 seen = to->isr_count;
	for (u32 k = 0; k < count; k++)
		queue_frame(from, to, k, seq + k, len);
	if (use_irq)
		vq_interrupts(&to->rx, 1, (u16)count);
	vq_publish(&from->tx);
	if (use_irq && wait_irq(to, &seen))
		return VE_NEEDS_RESET;
	u32 got = 0, sent = 0, spins = 0;
	while (got < count || sent < count) {
		u16 id;
		u32 written;
		if (sent < count && vq_get_used(&from->tx, &id, &written)) {
			sent++; /* transmit buffer back: its slot is free again */
			continue;
		}
		if (got < count && vq_get_used(&to->rx, &id, &written)) {
			if (id >= P->queue_size)
				return VE_READ;
			bad += check_frame(rx_buf(to, id), written, from, to, seq + got, len);
			got++;
			post_rx(to, id);
			spins = 0;
			continue;
		}
		if (use_irq && got < count) {
			if (wait_irq(to, &seen))
				return VE_NEEDS_RESET;
		} else if (++spins < POLL_SPINS) {
			__asm__ volatile("pause");
		} else {
			spins = 0;
			if ((vd_status(&from->dev) | vd_status(&to->dev)) & VIRTIO_CONFIG_S_NEEDS_RESET)
				return VE_NEEDS_RESET;
		}
	}
	if (use_irq)
		vq_interrupts(&to->rx, 0, 0);
	vq_publish(&to->rx); /* the buffers taken, posted again (no notify: not waited for) */
	return VE_OK;
}

int main(void)
{
	u32 len = P->frame_len, batch = P->batch;
	if (P->magic != PARAMS_MAGIC || len < ETH_HLEN + 4 || len > ETH_FRAME_LEN || batch == 0 ||
	    batch > MAX_BATCH || P->npackets % (2 * batch) || P->queue_size > MAX_QUEUE ||
	    P->queue_size < 2 * MAX_BATCH)
		return VE_PARAMS;
	use_irq = P->irq;
	if (use_irq == IRQ_IDT) {
		irq_install((int)P->irq_line[0], nic0_isr);
		irq_install((int)P->irq_line[1], nic1_isr);
	}
	for (u32 i = 0; i < NNICS; i++) {
		int rc = nic_init(&nics[i], i);
		if (rc)
			return rc;
	}
	dbg_puts("virtio-net: start\n");
	u32 half = P->npackets / 2, done = 0;
	dbg_mark(DBG_BEGIN);
	for (u32 dir = 0; dir < NNICS; dir++) {
		struct nic *from = &nics[dir], *to = &nics[1 - dir];
		if (dir)
			dbg_mark(DBG_MARK + 0); /* phase 2: back */
		for (u32 seq = 0; seq < half; seq += batch) {
			int rc = run_batch(from, to, seq, batch, len);
			if (rc)
				return rc;
			done += batch;
		}
	}
	dbg_mark(DBG_END);
	dbg_cmd(DBG_IOS, done);
	dbg_cmd(DBG_ERRORS, bad);
	dbg_value(1, nics[0].tx.kicks);
	dbg_value(2, nics[1].tx.kicks);
	dbg_value(3, nics[0].rx.kicks);
	dbg_value(4, nics[1].rx.kicks);
	dbg_value(5, bad_hdr);
	dbg_puts("virtio-net: done\n");
	for (u32 i = 0; i < NNICS; i++)
		vd_reset(&nics[i].dev);
	return bad ? VE_VERIFY : VE_OK;
}
