/* Freestanding virtio-pci (modern, non-transitional) driver helpers (virtio 1.4 §4.1):
 * PCI enumeration through configuration mechanism #1 (ports 0xCF8/0xCFC), the virtio
 * capability walk, the common configuration (status handshake, features, queue
 * set-up), notifications, the ISR status and MSI-X vectors.  Drivers use them
 * through virtio_dev.h; every virtio constant comes from spec/virtio_spec.h.
 *
 * Accesses follow §4.1.3.1: 8-bit fields with 8-bit accesses, 16-bit fields with
 * aligned 16-bit accesses, 32- and 64-bit fields with aligned 32-bit accesses (a 64-bit
 * field as its low then its high half).
 */
#ifndef PYVIRTIO_VIRTIO_PCI_H
#define PYVIRTIO_VIRTIO_PCI_H

#include "runtime.h"
#include "virtio_mmio.h" /* VE_* result codes, BIT64, mb */

/* PCI Local Bus 3.0: configuration mechanism #1 and the type-0 header. */
#define PCI_CONFIG_ADDRESS 0xCF8
#define PCI_CONFIG_DATA 0xCFC
#define PCI_VENDOR_ID 0x00
#define PCI_COMMAND 0x04
#define PCI_STATUS 0x06
#define PCI_BAR0 0x10
#define PCI_CAPABILITY_LIST 0x34
#define PCI_COMMAND_MEMORY 0x2
#define PCI_COMMAND_MASTER 0x4
#define PCI_COMMAND_INTX_DISABLE 0x400
#define PCI_STATUS_CAP_LIST 0x10
#define PCI_CAP_ID_VNDR 0x09
#define PCI_CAP_ID_MSIX 0x11
#define PCI_MSIX_FLAGS 2
#define PCI_MSIX_FLAGS_QSIZE 0x7FF
#define PCI_MSIX_FLAGS_MASKALL 0x4000
#define PCI_MSIX_FLAGS_ENABLE 0x8000
#define PCI_MSIX_TABLE 4
#define PCI_MSIX_ENTRY_SIZE 16
#define PCI_MSIX_ENTRY_DATA 8
#define PCI_MSIX_ENTRY_VECTOR_CTRL 12
#define MSI_ADDRESS_BSP 0xFEE00000u /* x86 MSI: fixed delivery to APIC 0 */

struct vpci {
	u32 bdf; /* bus 0: device << 11 */
	u64 common, isr, device, notify;
	u32 notify_mult;
	u32 device_len;
	u8 msix_cap;
	u64 msix_table;
	u32 msix_size;
	int msix; /* MSI-X enabled: interrupts are vectors, the ISR status is not read */
};

static inline void pci_select(u32 bdf, u32 reg)
{
	outl(PCI_CONFIG_ADDRESS, 0x80000000u | bdf | (reg & 0xFC));
}
static inline u32 pci_read32(u32 bdf, u32 reg) { pci_select(bdf, reg); return inl(PCI_CONFIG_DATA); }
static inline u16 pci_read16(u32 bdf, u32 reg)
{
	pci_select(bdf, reg);
	return inw((u16)(PCI_CONFIG_DATA + (reg & 2)));
}
static inline u8 pci_read8(u32 bdf, u32 reg)
{
	pci_select(bdf, reg);
	return inb((u16)(PCI_CONFIG_DATA + (reg & 3)));
}
static inline void pci_write16(u32 bdf, u32 reg, u16 v)
{
	pci_select(bdf, reg);
	outw((u16)(PCI_CONFIG_DATA + (reg & 2)), v);
}

/* The address a memory BAR decodes (64-bit BARs take the next one as the high half). */
static inline u64 pci_bar_address(u32 bdf, u32 bar)
{
	u32 lo = pci_read32(bdf, PCI_BAR0 + 4 * bar);
	if (lo & 1)
		return 0; /* an I/O BAR: not used for virtio structures here */
	u64 addr = lo & ~0xFu;
	if (((lo >> 1) & 3) == 2 && bar < 5)
		addr |= (u64)pci_read32(bdf, PCI_BAR0 + 4 * (bar + 1)) << 32;
	return addr;
}

/* §4.1.2.2: the first function on bus 0 with Vendor 0x1AF4, Device 0x1040 + id. */
static inline int vp_find(struct vpci *d, u32 device_id)
{
	for (u32 dev = 0; dev < 32; dev++) {
		u32 bdf = dev << 11;
		u32 id = pci_read32(bdf, PCI_VENDOR_ID);
		if ((id & 0xFFFF) == VIRTIO_PCI_VENDOR_ID &&
		    (id >> 16) == VIRTIO_PCI_DEVICE_ID_BASE + device_id) {
			d->bdf = bdf;
			return VE_OK;
		}
	}
	return VE_NO_PCI_DEVICE;
}

/* §4.1.4, §4.1.5.1.1: walk the capability list, keep the first structure of each type
 * (§4.1.4.1: reserved cfg_type and bar values are ignored), and the MSI-X table. */
static inline int vp_map_caps(struct vpci *d)
{
	d->common = d->isr = d->device = d->notify = 0;
	d->msix_cap = 0;
	if (!(pci_read16(d->bdf, PCI_STATUS) & PCI_STATUS_CAP_LIST))
		return VE_PCI_CAPS;
	u8 ptr = pci_read8(d->bdf, PCI_CAPABILITY_LIST) & ~3;
	for (u32 guard = 0; ptr >= 0x40 && guard < 48; guard++) {
		u8 id = pci_read8(d->bdf, ptr);
		if (id == PCI_CAP_ID_VNDR) {
			u8 type = pci_read8(d->bdf, ptr + VIRTIO_PCI_CAP_CFG_TYPE);
			u8 bar = pci_read8(d->bdf, ptr + VIRTIO_PCI_CAP_BAR);
			u64 base = bar <= 5 ? pci_bar_address(d->bdf, bar) : 0;
			u64 addr = base + pci_read32(d->bdf, ptr + VIRTIO_PCI_CAP_OFFSET);
			if (!base) {
				/* reserved bar, or an unassigned BAR: ignore the structure */
			} else if (type == VIRTIO_PCI_CAP_COMMON_CFG && !d->common) {
				d->common = addr;
			} else if (type == VIRTIO_PCI_CAP_NOTIFY_CFG && !d->notify) {
				d->notify = addr;
				d->notify_mult = pci_read32(d->bdf, ptr + VIRTIO_PCI_NOTIFY_CAP_MULT);
			} else if (type == VIRTIO_PCI_CAP_ISR_CFG && !d->isr) {
				d->isr = addr;
			} else if (type == VIRTIO_PCI_CAP_DEVICE_CFG && !d->device) {
				d->device = addr;
				d->device_len = pci_read32(d->bdf, ptr + VIRTIO_PCI_CAP_LENGTH);
			}
		} else if (id == PCI_CAP_ID_MSIX && !d->msix_cap) {
			u32 table = pci_read32(d->bdf, ptr + PCI_MSIX_TABLE);
			d->msix_cap = ptr;
			d->msix_table = pci_bar_address(d->bdf, table & 7) + (table & ~7u);
			d->msix_size = (pci_read16(d->bdf, ptr + PCI_MSIX_FLAGS) & PCI_MSIX_FLAGS_QSIZE) + 1;
		}
		ptr = pci_read8(d->bdf, ptr + 1) & ~3;
	}
	return d->common && d->notify && d->isr ? VE_OK : VE_PCI_CAPS;
}

static inline u8 vp_status(struct vpci *d) { return mmio_read8(d->common + VIRTIO_PCI_COMMON_STATUS); }
static inline void vp_set_status(struct vpci *d, u8 s)
{
	mmio_write8(d->common + VIRTIO_PCI_COMMON_STATUS, s);
}

/* Find the device, enable memory decoding and bus mastering (MSI-X messages and the
 * rings), map its structures, then reset, ACKNOWLEDGE, DRIVER (§3.1.1 steps 1-3). */
static inline int vp_probe(struct vpci *d, u32 device_id)
{
	int rc = vp_find(d, device_id);
	if (rc)
		return rc;
	u16 cmd = pci_read16(d->bdf, PCI_COMMAND);
	pci_write16(d->bdf, PCI_COMMAND, cmd | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER);
	rc = vp_map_caps(d);
	if (rc)
		return rc;
	d->msix = 0;
	vp_set_status(d, 0);
	while (vp_status(d)) /* §4.1.4.3.2: reinitialize only once it reads 0 */
		;
	vp_set_status(d, VIRTIO_CONFIG_S_ACKNOWLEDGE);
	vp_set_status(d, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
	return VE_OK;
}

static inline u64 vp_device_features(struct vpci *d)
{
	mmio_write32(d->common + VIRTIO_PCI_COMMON_DFSELECT, 0);
	u64 lo = mmio_read32(d->common + VIRTIO_PCI_COMMON_DF);
	mmio_write32(d->common + VIRTIO_PCI_COMMON_DFSELECT, 1);
	u64 hi = mmio_read32(d->common + VIRTIO_PCI_COMMON_DF);
	return lo | hi << 32;
}

static inline int vp_set_features(struct vpci *d, u64 features)
{
	mmio_write32(d->common + VIRTIO_PCI_COMMON_GFSELECT, 0);
	mmio_write32(d->common + VIRTIO_PCI_COMMON_GF, (u32)features);
	mmio_write32(d->common + VIRTIO_PCI_COMMON_GFSELECT, 1);
	mmio_write32(d->common + VIRTIO_PCI_COMMON_GF, (u32)(features >> 32));
	vp_set_status(d, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER |
				 VIRTIO_CONFIG_S_FEATURES_OK);
	return (vp_status(d) & VIRTIO_CONFIG_S_FEATURES_OK) ? VE_OK : VE_FEATURES_OK;
}

/* MSI-X (§4.1.5.1.2): table entry 0 -> vector `queue_vector` for the queues, entry 1 ->
 * `config_vector` for configuration changes, then MSI-X on and INTx off.  Each mapping
 * is read back (a failed one reads NO_VECTOR). */
static inline int vp_msix_enable(struct vpci *d, u32 queue_vector, u32 config_vector)
{
	if (!d->msix_cap || d->msix_size < 2 || !d->msix_table)
		return VE_PCI_CAPS;
	u32 vectors[2] = { queue_vector, config_vector };
	for (u32 e = 0; e < 2; e++) {
		u64 entry = d->msix_table + e * PCI_MSIX_ENTRY_SIZE;
		mmio_write32(entry + 0, MSI_ADDRESS_BSP);
		mmio_write32(entry + 4, 0);
		mmio_write32(entry + PCI_MSIX_ENTRY_DATA, vectors[e]);
		mmio_write32(entry + PCI_MSIX_ENTRY_VECTOR_CTRL, 0); /* unmask */
	}
	u16 flags = pci_read16(d->bdf, d->msix_cap + PCI_MSIX_FLAGS);
	flags = (u16)((flags | PCI_MSIX_FLAGS_ENABLE) & ~PCI_MSIX_FLAGS_MASKALL);
	pci_write16(d->bdf, d->msix_cap + PCI_MSIX_FLAGS, flags);
	u16 cmd = pci_read16(d->bdf, PCI_COMMAND);
	pci_write16(d->bdf, PCI_COMMAND, cmd | PCI_COMMAND_INTX_DISABLE);
	mmio_write16(d->common + VIRTIO_PCI_COMMON_MSIX, 1);
	if (mmio_read16(d->common + VIRTIO_PCI_COMMON_MSIX) != 1)
		return VE_QUEUE;
	d->msix = 1;
	return VE_OK;
}

/* §4.1.5.1.3 virtqueue configuration; `*notify` gets the queue's notify address
 * (cap.offset + queue_notify_off * notify_off_multiplier, §4.1.4.4). */
static inline int vp_setup_queue(struct vpci *d, u32 index, u32 size, u64 desc, u64 driver, u64 device,
			  u64 *notify)
{
	u64 c = d->common;
	mmio_write16(c + VIRTIO_PCI_COMMON_Q_SELECT, (u16)index);
	if (mmio_read16(c + VIRTIO_PCI_COMMON_Q_ENABLE))
		return VE_QUEUE;
	u32 max = mmio_read16(c + VIRTIO_PCI_COMMON_Q_SIZE);
	if (max == 0 || size > max)
		return VE_QUEUE;
	mmio_write16(c + VIRTIO_PCI_COMMON_Q_SIZE, (u16)size);
	mmio_write32(c + VIRTIO_PCI_COMMON_Q_DESCLO, (u32)desc);
	mmio_write32(c + VIRTIO_PCI_COMMON_Q_DESCHI, (u32)(desc >> 32));
	mmio_write32(c + VIRTIO_PCI_COMMON_Q_AVAILLO, (u32)driver);
	mmio_write32(c + VIRTIO_PCI_COMMON_Q_AVAILHI, (u32)(driver >> 32));
	mmio_write32(c + VIRTIO_PCI_COMMON_Q_USEDLO, (u32)device);
	mmio_write32(c + VIRTIO_PCI_COMMON_Q_USEDHI, (u32)(device >> 32));
	if (d->msix) {
		mmio_write16(c + VIRTIO_PCI_COMMON_Q_MSIX, 0);
		if (mmio_read16(c + VIRTIO_PCI_COMMON_Q_MSIX) != 0)
			return VE_QUEUE;
	}
	*notify = d->notify + (u64)mmio_read16(c + VIRTIO_PCI_COMMON_Q_NOFF) * d->notify_mult;
	mmio_write16(c + VIRTIO_PCI_COMMON_Q_ENABLE, 1);
	return mmio_read16(c + VIRTIO_PCI_COMMON_Q_ENABLE) == 1 ? VE_OK : VE_QUEUE;
}

#endif
