/* pyvirtio guest ABI, version 1: what a program run by `virtio run-driver` can rely on.
 * Documented in docs/driver-toolkit.md; the host side is emulator/drvkit/abi.py.
 *
 * Machine: one x86-64 vCPU in long mode, ring 0, the first 4 GiB identity-mapped
 * (MMIO windows uncached), the program linked at 0x100000 (guest-drivers/link.ld),
 * RSP set below 0x80000, interrupts off.  `main` is called with no arguments; its
 * return value is the program's result (0: success).  Build: run-driver compiles a
 * .c file with the project's freestanding flags, guest-drivers/runtime.c and
 * -I guest-drivers/include, so `#include <pyvirtio.h>` is all a driver needs.
 *
 * Parameters: struct pv_params at PV_PARAMS_ADDR (read-only for the program):
 * which device and transport, where its registers are, its interrupt line, the free
 * RAM the program may use for rings and buffers, and up to PV_MAX_ARGS integers
 * from `--arg`.
 *
 * Reporting (the debug port, runtime.h): console text with dbg_puts/dbg_hex,
 * progress with pv_progress(n) (JSON "progress"), named numbers with
 * pv_value(key, value) (JSON "values"), the result with `return` from main.
 *
 * Device timing: the emulated device's clock is the guest's exits.  Under
 * `--timing` other than inline, requests complete some exits after they were made
 * available; a driver that busy-waits on a ring MUST call pv_pause() in its loop
 * (one exit, no side effect), or wait for an interrupt (irq_wait / wait_for_interrupt:
 * a halted guest lets the device finish what it holds).
 *
 * Devices (`--device`): blk (§5.2), rng (§5.4), net (§5.1: the device's wire has a peer
 * that sends every unicast frame back to its sender, addresses swapped), input (§5.8:
 * the built-in keyboard; the host types PV_INPUT_EVENTS events, the sequence of
 * pv_input_expected(), when the guest sleeps or every 64 exits).
 *
 * Interrupts: line `irq_line` is delivered as vector IRQ_VECTOR_BASE + irq_line
 * through the IDT at `sti; hlt` (irq_install + irq_wait), or wakes a HLT with IF=0
 * (wait_for_interrupt).  Lines are level-triggered; the handler acknowledges the
 * device (virtio-mmio: InterruptStatus / InterruptACK, §4.2.3.4).
 */
#ifndef PYVIRTIO_H
#define PYVIRTIO_H

#include "../runtime.h"
#include "../virtqueue.h" /* virtio_dev.h: virtio-mmio and virtio-pci */

#define PV_ABI_VERSION 1
#define PV_PARAMS_ADDR PARAMS_ADDR
#define PV_MAX_ARGS 16

enum { PV_TRANSPORT_MMIO = 1, PV_TRANSPORT_PCI = 2 };

struct pv_params {
	u32 magic; /* PARAMS_MAGIC ("PVIO") */
	u32 abi_version; /* PV_ABI_VERSION */
	u32 device_id; /* virtio device ID (§5): 1 net, 2 block, 4 entropy, 18 input */
	u32 transport; /* PV_TRANSPORT_* */
	u64 regs_base; /* virtio-mmio: the register window (§4.2.2); virtio-pci: BAR 0 */
	u32 irq_line; /* the device's interrupt line */
	u32 nargs; /* how many of args[] were given */
	u64 ram_size; /* guest RAM bytes */
	u64 heap_base; /* free RAM for rings and buffers: [heap_base, heap_base + heap_size) */
	u64 heap_size;
	u64 args[PV_MAX_ARGS]; /* --arg values, in order; the rest 0 */
	u32 pci_bdf; /* virtio-pci: bus << 16 | device << 11 | function << 8 (0xCF8 form) */
	u32 reserved;
};

#define PV_P ((volatile struct pv_params *)PV_PARAMS_ADDR)

/* args[i], or `dflt` when fewer were given. */
static inline u64 pv_arg(u32 i, u64 dflt) { return i < PV_P->nargs ? PV_P->args[i] : dflt; }

/* Check the block is there and of this ABI version. */
static inline int pv_params_ok(void)
{
	return PV_P->magic == PARAMS_MAGIC && PV_P->abi_version == PV_ABI_VERSION;
}

/* The run's device over either transport (virtio_dev.h), found, reset and at
 * ACKNOWLEDGE|DRIVER (§3.1.1 steps 1-3): virtio-mmio at regs_base, virtio-pci by
 * enumerating bus 0 (§4.1.2.2), which must find the function at pci_bdf. */
static inline int pv_open(struct vdev *d, u32 device_id)
{
	if (PV_P->transport != PV_TRANSPORT_PCI)
		return vd_open(d, PV_P->regs_base, device_id);
	int rc = vd_open(d, 0, device_id);
	return rc ? rc : (d->vp.bdf == PV_P->pci_bdf ? 0 : VE_NO_PCI_DEVICE);
}

/* The largest size queue `index` takes (virtio-mmio QueueNumMax, virtio-pci
 * queue_size after queue_select, §4.1.4.3). */
static inline u32 pv_queue_max(struct vdev *d, u32 index)
{
	if (!d->pci) {
		vm_wr(&d->mmio, VIRTIO_MMIO_QUEUE_SEL, index);
		return vm_rd(&d->mmio, VIRTIO_MMIO_QUEUE_NUM_MAX);
	}
	mmio_write16(d->vp.common + VIRTIO_PCI_COMMON_Q_SELECT, (u16)index);
	return mmio_read16(d->vp.common + VIRTIO_PCI_COMMON_Q_SIZE);
}

/* Give up on the device: set FAILED (§3.1.1 step 8). */
static inline void pv_fail(struct vdev *d)
{
	u32 s = vd_status(d) | VIRTIO_CONFIG_S_FAILED;
	if (d->pci)
		vp_set_status(&d->vp, (u8)s);
	else
		vm_wr(&d->mmio, VIRTIO_MMIO_STATUS, s);
}

/* The device configuration space (§2.5) over either transport: 8/16/32-bit fields
 * at `offset` (virtio-mmio: from 0x100, §4.2.2; virtio-pci: the device-specific
 * configuration capability, §4.1.4.6). */
static inline u64 pv_config_addr(struct vdev *d, u32 offset)
{
	return d->pci ? d->vp.device + offset : d->mmio.base + VIRTIO_MMIO_CONFIG + offset;
}
static inline u8 pv_config_read8(struct vdev *d, u32 off) { return mmio_read8(pv_config_addr(d, off)); }
static inline u16 pv_config_read16(struct vdev *d, u32 off) { return mmio_read16(pv_config_addr(d, off)); }
static inline u32 pv_config_read32(struct vdev *d, u32 off) { return mmio_read32(pv_config_addr(d, off)); }
static inline void pv_config_write8(struct vdev *d, u32 off, u8 v) { mmio_write8(pv_config_addr(d, off), v); }

/* Bump allocator over the free RAM (zeroed, `align` a power of two). */
static u64 pv_heap_next;
static inline void *pv_alloc(u64 size, u64 align)
{
	if (!pv_heap_next)
		pv_heap_next = PV_P->heap_base;
	u64 p = (pv_heap_next + align - 1) & ~(align - 1);
	if (p + size > PV_P->heap_base + PV_P->heap_size)
		return 0;
	pv_heap_next = p + size;
	memset((void *)p, 0, size);
	return (void *)p;
}

/* One exit and nothing else: the device clock's tick (see "Device timing"). */
#define PV_TICK_PORT (DEBUG_BASE + 12)
static inline void pv_pause(void) { (void)inl(PV_TICK_PORT); }

static inline void pv_progress(u32 n) { dbg_cmd(DBG_IOS, n); }
static inline void pv_value(u32 key, u32 value) { dbg_value(key, value); }

/* virtio-input: event i of what the host types (emulator/drvkit/inputdev.py): even i
 * a key (code 16..55, pressed for even groups), odd i EV_SYN/SYN_REPORT. */
#define PV_INPUT_EVENTS 32
struct pv_input_event {
	u16 type;
	u16 code;
	u32 value;
};
static inline struct pv_input_event pv_input_expected(u32 i)
{
	struct pv_input_event ev = { 0, 0, 0 }; /* EV_SYN, SYN_REPORT */
	if (i & 1)
		return ev;
	u32 g = i / 2, h = g * 2654435761u;
	ev.type = 1; /* EV_KEY */
	ev.code = (u16)(16 + (h >> 16) % 40);
	ev.value = (g & 1) ? 0 : 1;
	return ev;
}

/* Result codes the templates use (any non-zero value is a failure). */
enum {
	PV_OK = 0,
	PV_E_PARAMS = 1,
	PV_E_PROBE = 2,
	PV_E_FEATURES = 5,
	PV_E_FEATURES_OK = 6,
	PV_E_QUEUE = 7,
	PV_E_IO = 9,
	PV_E_VERIFY = 12,
	PV_E_NEEDS_RESET = 13,
	PV_E_NOMEM = 14,
	PV_E_LOST = 15, /* net: frames sent that never came back */
};

#endif
