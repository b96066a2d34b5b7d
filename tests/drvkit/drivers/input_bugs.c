/* Buggy virtio-input drivers (tests/drvkit/test_device_kinds.py): the input template
 * with one mistake in the status event it sends, picked by args[5] (0: none). */
#include <pyvirtio.h>

enum {
	STATUS_OK,
	STATUS_UNADVERTISED_LED, /* EV_LED code 9 (LED_MAIL): not in the device's EV_BITS */
	STATUS_WRONG_TYPE, /* EV_REL: not a status type the device reports */
};

static void bad_status(struct pv_input_event *ev)
{
	u32 bug = (u32)pv_arg(5, 0);
	if (bug == STATUS_UNADVERTISED_LED)
		ev->code = 9;
	else if (bug == STATUS_WRONG_TYPE)
		ev->type = 2;
}

#define STATUS_HOOK(ev) bad_status(ev)
#include "../../../guest-drivers/templates/input.c"
