/* Buggy virtio-net drivers (tests/drvkit/test_device_kinds.py): the net template with
 * one mistake in the transmit header, picked by args[7] (0: none).  Each breaks a
 * drivernormative clause of §5.1.9.2.1 (virtio 1.2: §5.1.6.2.1). */
#include <pyvirtio.h>

enum {
	HDR_OK,
	HDR_DATA_VALID, /* flags VIRTIO_NET_HDR_F_DATA_VALID: MUST NOT be set */
	HDR_NUM_BUFFERS, /* num_buffers 1: MUST be zero */
	HDR_NEEDS_CSUM, /* NEEDS_CSUM without VIRTIO_NET_F_CSUM: flags MUST be zero */
	HDR_RESERVED_FLAG, /* flags bit 3, which no version defines */
	HDR_GSO, /* gso_type TCPV4 without HOST_TSO4: MUST be GSO_NONE */
};

static void bad_header(u8 *h, u32 seq)
{
	u32 bug = (u32)pv_arg(7, 0);
	if (seq != 2) /* the third frame only: the others are correct */
		return;
	if (bug == HDR_DATA_VALID)
		h[0] = 2;
	else if (bug == HDR_NUM_BUFFERS)
		h[10] = 1;
	else if (bug == HDR_NEEDS_CSUM)
		h[0] = 1;
	else if (bug == HDR_RESERVED_FLAG)
		h[0] = 8;
	else if (bug == HDR_GSO)
		h[1] = 1;
}

#define TX_HDR_HOOK(h, seq) bad_header((h), (seq))
#include "../../../guest-drivers/templates/net.c"
