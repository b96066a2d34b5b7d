/* Freestanding virtio-mmio (version 2) driver helpers: probe, status handshake,
 * feature negotiation, queue setup and interrupt acknowledgement (virtio 1.4 §3.1,
 * §4.2).  Every spec constant comes from spec/virtio_spec.h.  Drivers use them
 * through virtio_dev.h (either transport) and virtqueue.h (the rings).
 */
#ifndef PYVIRTIO_VIRTIO_MMIO_H
#define PYVIRTIO_VIRTIO_MMIO_H

#include "runtime.h"
#include "../spec/virtio_spec.h"

#define BIT64(n) (1ULL << (n))

static inline void mb(void) { __asm__ volatile("mfence" ::: "memory"); }

struct vmmio {
	u64 base;
};

static inline u32 vm_rd(struct vmmio *d, u32 reg) { return mmio_read32(d->base + reg); }
static inline void vm_wr(struct vmmio *d, u32 reg, u32 v) { mmio_write32(d->base + reg, v); }

/* Error codes reported with DBG_RESULT (shared with emulator/virtio_mmio.py and
 * emulator/pci/virtio.py). */
enum {
	VE_OK = 0,
	VE_PARAMS = 1,
	VE_MAGIC = 2,
	VE_VERSION = 3,
	VE_DEVICE_ID = 4,
	VE_FEATURES = 5,
	VE_FEATURES_OK = 6,
	VE_QUEUE = 7,
	VE_CAPACITY = 8,
	VE_WRITE = 9,
	VE_READ = 10,
	VE_FLUSH = 11,
	VE_VERIFY = 12,
	VE_NEEDS_RESET = 13,
	VE_NO_PCI_DEVICE = 14, /* no function with the virtio-pci IDs on bus 0 */
	VE_PCI_CAPS = 15, /* common, notify or ISR capability missing or unusable */
};

/* §4.2.3.1 / §3.1.1: reset, ACKNOWLEDGE, DRIVER; check magic, version, device id. */
static inline int vm_probe(struct vmmio *d, u32 device_id)
{
	if (vm_rd(d, VIRTIO_MMIO_MAGIC_VALUE) != VIRTIO_MMIO_MAGIC)
		return VE_MAGIC;
	if (vm_rd(d, VIRTIO_MMIO_VERSION) != VIRTIO_MMIO_VERSION_MODERN)
		return VE_VERSION;
	if (vm_rd(d, VIRTIO_MMIO_DEVICE_ID) != device_id)
		return VE_DEVICE_ID;
	vm_wr(d, VIRTIO_MMIO_STATUS, 0);
	vm_wr(d, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
	vm_wr(d, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
	return VE_OK;
}

static inline u64 vm_device_features(struct vmmio *d)
{
	vm_wr(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
	u64 lo = vm_rd(d, VIRTIO_MMIO_DEVICE_FEATURES);
	vm_wr(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
	u64 hi = vm_rd(d, VIRTIO_MMIO_DEVICE_FEATURES);
	return lo | hi << 32;
}

/* Write the accepted features, set FEATURES_OK and read it back (§3.1.1 steps 4-6). */
static inline int vm_set_features(struct vmmio *d, u64 features)
{
	vm_wr(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
	vm_wr(d, VIRTIO_MMIO_DRIVER_FEATURES, (u32)features);
	vm_wr(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
	vm_wr(d, VIRTIO_MMIO_DRIVER_FEATURES, (u32)(features >> 32));
	u32 st = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
	vm_wr(d, VIRTIO_MMIO_STATUS, st);
	if (!(vm_rd(d, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK))
		return VE_FEATURES_OK;
	return VE_OK;
}

/* Accept `want` if the device offers all of it, then FEATURES_OK (§3.1.1 steps 4-6). */
static inline int vm_accept_features(struct vmmio *d, u64 want)
{
	if ((vm_device_features(d) & want) != want)
		return VE_FEATURES;
	return vm_set_features(d, want);
}

static inline void vm_driver_ok(struct vmmio *d)
{
	vm_wr(d, VIRTIO_MMIO_STATUS,
	      VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK |
		      VIRTIO_CONFIG_S_DRIVER_OK);
}

static inline void vm_wr64(struct vmmio *d, u32 lo_reg, u32 hi_reg, u64 v)
{
	vm_wr(d, lo_reg, (u32)v);
	vm_wr(d, hi_reg, (u32)(v >> 32));
}

/* §4.2.3.2 virtqueue configuration. */
static inline int vm_setup_queue(struct vmmio *d, u32 index, u32 size, u64 desc, u64 driver, u64 device)
{
	vm_wr(d, VIRTIO_MMIO_QUEUE_SEL, index);
	if (vm_rd(d, VIRTIO_MMIO_QUEUE_READY))
		return VE_QUEUE;
	u32 max = vm_rd(d, VIRTIO_MMIO_QUEUE_NUM_MAX);
	if (max == 0 || size > max)
		return VE_QUEUE;
	vm_wr(d, VIRTIO_MMIO_QUEUE_NUM, size);
	vm_wr64(d, VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH, desc);
	vm_wr64(d, VIRTIO_MMIO_QUEUE_DRIVER_LOW, VIRTIO_MMIO_QUEUE_DRIVER_HIGH, driver);
	vm_wr64(d, VIRTIO_MMIO_QUEUE_DEVICE_LOW, VIRTIO_MMIO_QUEUE_DEVICE_HIGH, device);
	vm_wr(d, VIRTIO_MMIO_QUEUE_READY, 1);
	return vm_rd(d, VIRTIO_MMIO_QUEUE_READY) == 1 ? VE_OK : VE_QUEUE;
}

/* Interrupt handling (§4.2.3.4): read InterruptStatus, acknowledge what was seen. */
static inline u32 vm_ack_interrupt(struct vmmio *d)
{
	u32 isr = vm_rd(d, VIRTIO_MMIO_INTERRUPT_STATUS);
	vm_wr(d, VIRTIO_MMIO_INTERRUPT_ACK, isr);
	return isr;
}

#endif
