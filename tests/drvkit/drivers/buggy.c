/* A catalogue of buggy virtio drivers (tests/drvkit/test_buggy_drivers.py): args[0]
 * picks the bug, everything else is a correct virtio-blk (or virtio-rng) driver over
 * virtio-mmio or virtio-pci that writes, flushes and reads back a few requests.  The
 * program returns 0 whenever it "thinks" it worked: run-driver must catch the bug
 * itself.  Over virtio-pci the register bugs make the same mistake in the common
 * configuration structure (§4.1.4.3) instead of the virtio-mmio registers.  The races
 * (101-105) are correct under `--timing inline` and fail under some other mode. */
#include <pyvirtio.h>

enum {
	NONE,
	WIDTH,		  /* 16-bit access to a control register (§4.2.2.2) */
	RO_WRITE,	  /* write to the read-only MagicValue (§4.2.2.2) */
	ORDER,		  /* DRIVER_OK without FEATURES_OK (§3.1.1) */
	CLEAR_BIT,	  /* clears ACKNOWLEDGE (§2.1.1) */
	UNOFFERED,	  /* accepts a feature that was not offered (§2.2.1) */
	NO_VERSION_1,	  /* does not accept VIRTIO_F_VERSION_1 (§6.1) */
	QUEUE_NUM,	  /* QueueNum above QueueNumMax (§4.2.2.2) */
	SETUP_READY,	  /* queue address written while QueueReady is 1 (§4.2.2.2) */
	EARLY_NOTIFY,	  /* QueueNotify before DRIVER_OK (§3.1.1) */
	BAD_NEXT,	  /* descriptor `next` outside the table (§2.7.5) */
	AVAIL_JUMP,	  /* avail idx moved by more than the queue size (§2.7.6) */
	FLUSH_SECTOR,	  /* FLUSH with a non-zero sector (§5.2.6.1) */
	BEYOND_CAPACITY,  /* read beyond capacity (§5.2.6.1) */
	ODD_LENGTH,	  /* OUT with 100 bytes of data (§5.2.6.1) */
	WRITABLE_FIRST,	  /* device-writable descriptor before a readable one (§2.7.4.2) */
	LATE_FEATURES,	  /* DriverFeatures written after FEATURES_OK (§3.1.1) */
	CONFIG_BEYOND,	  /* configuration read beyond its end (§4.2.2.2) */
	RNG_READABLE,	  /* device-readable buffer in the entropy requestq (§5.4.6.1) */
	/* timing-only races: correct under --timing inline */
	RACE_NO_RECHECK = 101, /* sleeps without re-checking the ring after enabling (§2.7.10) */
	RACE_USED_EVENT,     /* used_event one too far: waits for an interrupt never due (§2.7.7) */
	RACE_REFILL,	     /* rewrites a buffer still in flight (§2.7.13: it is the device's
				until its used entry, §2.7.14) */
	RACE_ORDER,	     /* takes the i-th used entry for the i-th request (§2.7.8: any order) */
	RACE_STATUS_EARLY,   /* reads the status byte before the used entry (§2.7.14, §5.2.6) */
};

#define REQ 4096u
#define D 4

static struct vdev vdev; /* either transport (pv_open) */
#define MM (&vdev.mmio)
#define COMMON(f) (vdev.vp.common + VIRTIO_PCI_COMMON_##f)
static struct vq q;
static u32 bug;
static struct virtio_blk_outhdr *hdr;
static volatile u8 *status;
static u8 *buf;

static void submit(u16 s, u32 type, u64 sector, u32 len)
{
	hdr[s].type = type;
	hdr[s].reserved = 0;
	hdr[s].sector = sector;
	status[s] = 0xFF;
	struct vq_seg segs[3];
	u32 n = 0;
	if (bug == WRITABLE_FIRST)
		segs[n++] = (struct vq_seg){ (u64)&status[s], 1, 1 };
	segs[n++] = (struct vq_seg){ (u64)&hdr[s], sizeof(hdr[s]), 0 };
	if (len)
		segs[n++] = (struct vq_seg){ (u64)(buf + (u64)s * REQ), len, type == VIRTIO_BLK_T_IN };
	if (bug != WRITABLE_FIRST)
		segs[n++] = (struct vq_seg){ (u64)&status[s], 1, 1 };
	vq_add(&q, s, segs, n);
	if (bug == BAD_NEXT && !q.packed)
		q.desc[s * n].next = 0x7fff;
}

static void publish(void)
{
	if (bug == AVAIL_JUMP)
		q.avail_idx = (u16)(q.avail_idx + q.size + 1);
	vq_publish(&q);
}

/* One completion's slot, or -1 once the device gave up (NEEDS_RESET / nothing comes). */
static int wait_one(void)
{
	u16 id;
	u32 len;
	for (u32 tries = 0; tries < 100000; tries++) {
		if (vq_get_used(&q, &id, &len))
			return id;
		if (vd_status(&vdev) & VIRTIO_CONFIG_S_NEEDS_RESET)
			return -1;
		if (bug == RACE_NO_RECHECK) {
			vd_ack_interrupt(&vdev); /* exits: the device may finish here */
			vq_interrupts(&q, 1, 1);
			wait_for_interrupt(); /* no re-check after enabling */
			continue;
		}
		if (bug == RACE_USED_EVENT) {
			*q.used_event = q.last_used + 1; /* should be last_used */
			mb();
			if (vq_get_used(&q, &id, &len))
				return id;
			wait_for_interrupt();
			vd_ack_interrupt(&vdev);
			continue;
		}
		pv_pause();
	}
	return -1;
}

static int io(u32 type, u32 first, u32 n, u32 len, u32 *bad)
{
	for (u32 i = 0; i < n; i++) {
		u16 s = (u16)i;
		if (type == VIRTIO_BLK_T_OUT)
			fill((u64 *)(buf + (u64)s * REQ), REQ / 8, (u64)(first + i) * 8, 3);
		else
			memset(buf + (u64)s * REQ, 0, REQ);
		submit(s, type, (u64)(first + i) * 8, len);
	}
	publish();
	if (bug == RACE_REFILL && type == VIRTIO_BLK_T_OUT) /* "the device copied it at the notify" */
		fill((u64 *)buf, REQ / 8, (u64)(first + 100) * 8, 3);
	if (bug == RACE_STATUS_EARLY) /* "the status is there once the notify returned" */
		for (u32 i = 0; i < n; i++)
			*bad += status[i] != VIRTIO_BLK_S_OK;
	for (u32 i = 0; i < n; i++) {
		int s = wait_one();
		if (s < 0)
			return 0; /* the device stopped: this driver does not care */
		if (bug == RACE_ORDER)
			s = (int)i; /* the id of the used entry ignored */
		if (type == VIRTIO_BLK_T_IN)
			*bad += check((u64 *)(buf + (u64)s * REQ), REQ / 8, (u64)(first + s) * 8, 3);
		if (status[s] != VIRTIO_BLK_S_OK)
			(*bad)++;
	}
	return 0;
}

static void set_status(u32 st)
{
	if (vdev.pci)
		vp_set_status(&vdev.vp, (u8)st);
	else
		vm_wr(MM, VIRTIO_MMIO_STATUS, st);
}

static void set_features(u64 want)
{
	if (vdev.pci)
		vp_set_features(&vdev.vp, want);
	else
		vm_set_features(MM, want);
}

/* Queue 0 set-up by hand (the bugs happen in the middle of it). */
static void setup_queue(u16 size)
{
	q.dev = &vdev;
	q.index = 0;
	if (!vdev.pci) {
		q.notify = vdev.mmio.base + VIRTIO_MMIO_QUEUE_NOTIFY;
		vm_wr(MM, VIRTIO_MMIO_QUEUE_SEL, 0);
		vm_wr(MM, VIRTIO_MMIO_QUEUE_NUM, size);
		vm_wr64(MM, VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH, (u64)q.desc);
		vm_wr64(MM, VIRTIO_MMIO_QUEUE_DRIVER_LOW, VIRTIO_MMIO_QUEUE_DRIVER_HIGH, (u64)q.avail);
		vm_wr64(MM, VIRTIO_MMIO_QUEUE_DEVICE_LOW, VIRTIO_MMIO_QUEUE_DEVICE_HIGH, (u64)q.used);
		vm_wr(MM, VIRTIO_MMIO_QUEUE_READY, 1);
		if (bug == SETUP_READY)
			vm_wr64(MM, VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH, (u64)q.desc);
		if (bug == EARLY_NOTIFY)
			vm_wr(MM, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
		return;
	}
	mmio_write16(COMMON(Q_SELECT), 0);
	mmio_write16(COMMON(Q_SIZE), size);
	mmio_write32(COMMON(Q_DESCLO), (u32)(u64)q.desc);
	mmio_write32(COMMON(Q_DESCHI), (u32)((u64)q.desc >> 32));
	mmio_write32(COMMON(Q_AVAILLO), (u32)(u64)q.avail);
	mmio_write32(COMMON(Q_AVAILHI), (u32)((u64)q.avail >> 32));
	mmio_write32(COMMON(Q_USEDLO), (u32)(u64)q.used);
	mmio_write32(COMMON(Q_USEDHI), (u32)((u64)q.used >> 32));
	q.notify = vdev.vp.notify + (u64)mmio_read16(COMMON(Q_NOFF)) * vdev.vp.notify_mult;
	mmio_write16(COMMON(Q_ENABLE), 1);
	if (bug == SETUP_READY)
		mmio_write32(COMMON(Q_DESCLO), (u32)(u64)q.desc);
	if (bug == EARLY_NOTIFY)
		mmio_write16(q.notify, 0);
}

static int blk(void)
{
	u32 st = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
	if (bug == WIDTH) /* pci: 16-bit access to the 8-bit device_status */
		(void)mmio_read16(vdev.pci ? COMMON(STATUS) : vdev.mmio.base + VIRTIO_MMIO_STATUS);
	if (bug == RO_WRITE) { /* pci: num_queues is read-only */
		if (vdev.pci)
			mmio_write16(COMMON(NUMQ), 0);
		else
			vm_wr(MM, VIRTIO_MMIO_MAGIC_VALUE, 0);
	}
	if (bug == CLEAR_BIT)
		set_status(VIRTIO_CONFIG_S_DRIVER);
	u64 want = BIT64(VIRTIO_F_VERSION_1) | BIT64(VIRTIO_F_EVENT_IDX) | BIT64(VIRTIO_BLK_F_FLUSH);
	if (bug == UNOFFERED)
		want |= BIT64(VIRTIO_BLK_F_SCSI);
	if (bug == NO_VERSION_1)
		want &= ~BIT64(VIRTIO_F_VERSION_1);
	if (bug != ORDER) {
		set_features(want);
		st |= VIRTIO_CONFIG_S_FEATURES_OK;
	}
	if (bug == LATE_FEATURES) {
		if (vdev.pci)
			mmio_write32(COMMON(GF), 0);
		else
			vm_wr(MM, VIRTIO_MMIO_DRIVER_FEATURES, 0);
	}
	if (bug == CONFIG_BEYOND) /* pci: past the device configuration structure's length */
		(void)(vdev.pci ? mmio_read32(vdev.vp.device + vdev.vp.device_len)
				: vm_rd(MM, VIRTIO_MMIO_CONFIG + 0xF0));
	void *ring = pv_alloc(64 << 10, 4096);
	hdr = pv_alloc(sizeof(*hdr) * D, 16);
	status = pv_alloc(D, 1);
	buf = pv_alloc((u64)D * REQ, 4096);
	u32 max = pv_queue_max(&vdev, 0);
	u16 size = bug == QUEUE_NUM ? (u16)(max + 1) : 64;
	vq_layout(&q, (u64)ring, size, 0, 1);
	setup_queue(size);
	vq_interrupts(&q, 0, 0);
	set_status(st | VIRTIO_CONFIG_S_DRIVER_OK);

	u32 bad = 0;
	u64 capacity = vd_config_read32(&vdev, 0) | (u64)vd_config_read32(&vdev, 4) << 32;
	io(VIRTIO_BLK_T_OUT, 0, D, bug == ODD_LENGTH ? 100 : REQ, &bad);
	submit(0, VIRTIO_BLK_T_FLUSH, bug == FLUSH_SECTOR ? 5 : 0, 0);
	publish();
	wait_one();
	io(VIRTIO_BLK_T_IN, bug == BEYOND_CAPACITY ? (u32)(capacity / 8) : 0, D, REQ, &bad);
	pv_value(1, bad);
	set_status(0);
	/* The races show as wrong data or a hang; the spec bugs are for run-driver. */
	return bug >= RACE_NO_RECHECK && bad ? PV_E_VERIFY : PV_OK;
}

static int rng(void)
{
	set_features(BIT64(VIRTIO_F_VERSION_1));
	void *ring = pv_alloc(16 << 10, 4096);
	u8 *b = pv_alloc(64, 16);
	vq_init(&q, &vdev, 0, (u64)ring, 16, 0, 0);
	vd_driver_ok(&vdev);
	struct vq_seg seg = { (u64)b, 64, bug != RNG_READABLE };
	vq_add(&q, 0, &seg, 1);
	vq_publish(&q);
	wait_one();
	return PV_OK;
}

int main(void)
{
	bug = (u32)pv_arg(0, NONE);
	if (pv_open(&vdev, PV_P->device_id))
		return PV_E_PROBE;
	return PV_P->device_id == VIRTIO_ID_RNG ? rng() : blk();
}
