/* One virtio device over either transport, chosen at run time: virtio-mmio at a known
 * base, or virtio-pci found by enumeration (virtio 1.4 §4.1, §4.2).  The drivers
 * (virtio_blk.c, virtio_rng.c) only use these vd_* calls and virtqueue.h, so the same
 * program runs over both: a parameter block with mmio_base 0 means "find the device
 * on the PCI bus".
 */
#ifndef PYVIRTIO_VIRTIO_DEV_H
#define PYVIRTIO_VIRTIO_DEV_H

#include "virtio_mmio.h"
#include "virtio_pci.h"

/* Interrupt causes, the same bits in InterruptStatus (§4.2.2) and ISR status (§4.1.4.5). */
#define VD_INT_QUEUE 1
#define VD_INT_CONFIG 2

struct vdev {
	int pci;
	struct vmmio mmio;
	struct vpci vp;
};

/* A virtio-mmio device a program already drives through struct vmmio (vm_*). */
static inline struct vdev vd_from_mmio(const struct vmmio *m)
{
	struct vdev d = { 0 };
	d.mmio = *m;
	return d;
}

/* Find and reset the device, then ACKNOWLEDGE and DRIVER (§3.1.1 steps 1-3). */
static inline int vd_open(struct vdev *d, u64 mmio_base, u32 device_id)
{
	d->pci = mmio_base == 0;
	if (d->pci)
		return vp_probe(&d->vp, device_id);
	d->mmio.base = mmio_base;
	return vm_probe(&d->mmio, device_id);
}

/* The transport bits every driver here asks for: VERSION_1, plus EVENT_IDX and
 * RING_PACKED when the run wants them (§6). */
static inline u64 vd_ring_features(int event_idx, int packed)
{
	u64 want = BIT64(VIRTIO_F_VERSION_1);
	if (event_idx)
		want |= BIT64(VIRTIO_F_EVENT_IDX);
	if (packed)
		want |= BIT64(VIRTIO_F_RING_PACKED);
	return want;
}

/* The name these bits had when only virtio-mmio existed. */
static inline u64 vm_ring_features(int event_idx, int packed)
{
	return vd_ring_features(event_idx, packed);
}

/* Accept `want` if the device offers all of it, then FEATURES_OK (§3.1.1 steps 4-6). */
static inline int vd_accept_features(struct vdev *d, u64 want)
{
	if (!d->pci)
		return vm_accept_features(&d->mmio, want);
	if ((vp_device_features(&d->vp) & want) != want)
		return VE_FEATURES;
	return vp_set_features(&d->vp, want);
}

static inline u32 vd_status(struct vdev *d)
{
	return d->pci ? vp_status(&d->vp) : vm_rd(&d->mmio, VIRTIO_MMIO_STATUS);
}

static inline void vd_driver_ok(struct vdev *d)
{
	if (d->pci)
		vp_set_status(&d->vp, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER |
					      VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK);
	else
		vm_driver_ok(&d->mmio);
}

/* Reset: the device lets go of the rings. */
static inline void vd_reset(struct vdev *d)
{
	if (d->pci)
		vp_set_status(&d->vp, 0);
	else
		vm_wr(&d->mmio, VIRTIO_MMIO_STATUS, 0);
}

static inline int vd_setup_queue(struct vdev *d, u32 index, u32 size, u64 desc, u64 driver, u64 device,
			  u64 *notify)
{
	if (d->pci)
		return vp_setup_queue(&d->vp, index, size, desc, driver, device, notify);
	*notify = d->mmio.base + VIRTIO_MMIO_QUEUE_NOTIFY;
	return vm_setup_queue(&d->mmio, index, size, desc, driver, device);
}

/* Available buffer notification: a 16-bit write of the queue index at the queue's
 * notify address (§4.1.5.2) or a QueueNotify write (§4.2.3.3). */
static inline void vd_notify(struct vdev *d, u32 index, u64 notify)
{
	if (d->pci)
		mmio_write16(notify, (u16)index);
	else
		mmio_write32(notify, index);
}

/* Route interrupts to vectors (virtio-pci MSI-X, §4.1.5.1.2): queues to
 * `queue_vector`, configuration changes to `config_vector`.  virtio-mmio has one
 * line: nothing to do.  Call between FEATURES_OK and the queue set-up. */
static inline int vd_use_vectors(struct vdev *d, u32 queue_vector, u32 config_vector)
{
	return d->pci ? vp_msix_enable(&d->vp, queue_vector, config_vector) : VE_OK;
}

/* The cause of a (line) interrupt, acknowledged: InterruptStatus + InterruptACK
 * (§4.2.3.4), or the read-to-clear ISR status (§4.1.4.5).  With MSI-X the vector is
 * the cause: the queue vector's handler gets VD_INT_QUEUE without any access. */
static inline u32 vd_ack_interrupt(struct vdev *d)
{
	if (!d->pci)
		return vm_ack_interrupt(&d->mmio);
	if (d->vp.msix)
		return VD_INT_QUEUE;
	return mmio_read8(d->vp.isr);
}

/* 32 bits of the device configuration space (fields of 32 bits and more). */
static inline u32 vd_config_read32(struct vdev *d, u32 offset)
{
	if (d->pci)
		return mmio_read32(d->vp.device + offset);
	return vm_rd(&d->mmio, VIRTIO_MMIO_CONFIG + offset);
}

#endif
