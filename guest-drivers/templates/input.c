/* Template: a minimal virtio-input driver over virtio-mmio or virtio-pci (virtio 1.4 §5.8),
 * correct under every `run-driver --timing` mode.  Copy it and change it.
 *
 * Reads the device name and the event types it reports through the select/subsel
 * protocol (§5.8.4: ID_NAME, EV_BITS), keeps the eventq (queue 0) populated with
 * device-writable buffers of one struct virtio_input_event (drivernormative §5.8.6.1),
 * and checks the `nevents` events the host types against pv_input_expected(), in
 * order.  Then it turns the Caps Lock LED on through the statusq (queue 1, §5.8.6: a
 * status event of a type and code the device advertised, EV_LED/LED_CAPSL).
 * pv_value: 1 events, 2 wrong events, 3 LEDs the device advertised (EV_BITS/EV_LED
 * size).
 *
 * --arg: nevents (32 = PV_INPUT_EVENTS), irq (1), packed (0), event_idx (1),
 * led_code (1 = LED_CAPSL).
 */
#include <pyvirtio.h>

#define CFG_SELECT 0
#define CFG_SUBSEL 1
#define CFG_SIZE 2
#define CFG_U 8
#define SEL_ID_NAME 0x01
#define SEL_EV_BITS 0x11
#define EV_LED 0x11
#define NBUF 32u

#ifndef STATUS_HOOK /* a buggy variant's mistake in the status event (tests/drvkit/drivers) */
#define STATUS_HOOK(ev) ((void)(ev))
#endif

static struct vdev vdev;
static struct vq evq, stq;
static volatile u32 isr_bits, isr_count;
static volatile struct pv_input_event *evbuf;
static struct pv_input_event *status_ev;

static void isr(int irq)
{
	(void)irq;
	isr_bits |= vd_ack_interrupt(&vdev);
	isr_count++;
}

static void post(u16 s)
{
	evbuf[s].type = 0xFFFF;
	struct vq_seg seg = { (u64)&evbuf[s], sizeof(evbuf[s]), 1 };
	vq_add(&evq, s, &seg, 1);
}

/* §5.8.4: write select and subsel, read size. */
static u8 query(u8 select, u8 subsel)
{
	pv_config_write8(&vdev, CFG_SELECT, select);
	pv_config_write8(&vdev, CFG_SUBSEL, subsel);
	return pv_config_read8(&vdev, CFG_SIZE);
}

/* Wait for a used entry on `q` (interrupts with the §2.7.10 re-check, or polling). */
static int wait_used(struct vq *q, u32 use_irq, u16 *id, u32 *len)
{
	for (;;) {
		if (vq_get_used(q, id, len))
			return 0;
		if (isr_bits & VD_INT_CONFIG) {
			isr_bits &= ~VD_INT_CONFIG;
			if (vd_status(&vdev) & VIRTIO_CONFIG_S_NEEDS_RESET)
				return -1;
		}
		if (!use_irq) {
			pv_pause();
			continue;
		}
		u32 seen = isr_count;
		vq_interrupts(q, 1, 1);
		if (vq_get_used(q, id, len)) {
			vq_interrupts(q, 0, 0);
			return 0;
		}
		while (isr_count == seen)
			irq_wait();
		vq_interrupts(q, 0, 0);
	}
}

int main(void)
{
	u32 nevents = (u32)pv_arg(0, PV_INPUT_EVENTS), use_irq = (u32)pv_arg(1, 1);
	int packed = (int)pv_arg(2, 0), event_idx = (int)pv_arg(3, 1);
	u16 led_code = (u16)pv_arg(4, 1);
	if (!pv_params_ok() || PV_P->device_id != VIRTIO_ID_INPUT || nevents > PV_INPUT_EVENTS)
		return PV_E_PARAMS;
	if (use_irq)
		irq_install((int)PV_P->irq_line, isr);
	if (pv_open(&vdev, VIRTIO_ID_INPUT))
		return PV_E_PROBE;
	int rc = vd_accept_features(&vdev, vd_ring_features(event_idx, packed));
	if (rc) {
		pv_fail(&vdev);
		return rc;
	}
	if (query(SEL_ID_NAME, 0) == 0) /* every device has a name */
		return PV_E_PROBE;
	u32 leds = query(SEL_EV_BITS, EV_LED); /* bitmap bytes of the LEDs it has */
	u32 qsize = pv_queue_max(&vdev, 0), ssize = pv_queue_max(&vdev, 1);
	if (qsize > NBUF)
		qsize = NBUF;
	if (ssize > 8)
		ssize = 8;
	void *r0 = pv_alloc(16 << 10, 4096), *r1 = pv_alloc(16 << 10, 4096);
	evbuf = pv_alloc(sizeof(*evbuf) * NBUF, 16);
	status_ev = pv_alloc(sizeof(*status_ev), 16);
	if (!r0 || !r1 || !evbuf || !status_ev || !qsize || !ssize)
		return PV_E_NOMEM;
	if (vq_init(&evq, &vdev, 0, (u64)r0, (u16)qsize, packed, event_idx) ||
	    vq_init(&stq, &vdev, 1, (u64)r1, (u16)ssize, packed, event_idx))
		return PV_E_QUEUE;
	vq_interrupts(&evq, 0, 0);
	vq_interrupts(&stq, 0, 0);
	vd_driver_ok(&vdev);
	for (u32 s = 0; s < qsize; s++)
		post((u16)s);
	vq_publish(&evq);

	u32 got = 0, bad = 0;
	while (got < nevents) {
		u16 id;
		u32 len;
		if (wait_used(&evq, use_irq, &id, &len))
			return PV_E_NEEDS_RESET;
		struct pv_input_event want = pv_input_expected(got);
		volatile struct pv_input_event *ev = &evbuf[id % NBUF];
		bad += id >= qsize || len != sizeof(*ev) || ev->type != want.type ||
		       ev->code != want.code || ev->value != want.value;
		got++;
		pv_progress(got);
		post(id);
		vq_publish(&evq);
	}
	/* Caps Lock on (§5.8.6: the statusq carries events of types the device reports). */
	status_ev->type = EV_LED;
	status_ev->code = led_code;
	status_ev->value = 1;
	STATUS_HOOK(status_ev);
	struct vq_seg seg = { (u64)status_ev, sizeof(*status_ev), 0 };
	vq_add(&stq, 0, &seg, 1);
	vq_publish(&stq);
	u16 id;
	u32 len;
	if (wait_used(&stq, use_irq, &id, &len))
		return PV_E_NEEDS_RESET;
	pv_value(1, got);
	pv_value(2, bad);
	pv_value(3, leds);
	dbg_puts("input: done\n");
	vd_reset(&vdev);
	return bad ? PV_E_VERIFY : PV_OK;
}
