"""SIGTERM is an orderly stop: the requests in flight complete before the back-end exits.

``virtio serve blk`` documents SIGINT/SIGTERM as a clean stop (an upgrade stops the
old process this way).  The server stops reading messages, each ring drains as on a
disconnect -- the requests already popped run to completion and their used entries
reach the driver (virtio 1.4 §2.7.8 / §2.8.21) -- and only then is everything
cancelled.  Cancelling first abandoned them (a restarted back-end had to resubmit
them from the inflight area, and without one the guest lost them) and then waited
out a 1 s drain of each ring in turn.
"""

from __future__ import annotations

import re
import signal
import struct
import time
from pathlib import Path

import trio
from test_blk_io_errors import serve_blk_on_fd

from virtio.spec.blk import BlkReqType, BlkStatus
from virtio.spec.features import TransportFeature as TF
from virtio.testing.vhost_user_frontend import GuestRam, VhostUserFrontend
from virtio.transport.vhost_user.messages import FrontendRequest as R

MiB = 1 << 20
DELAY = 0.5  # --debug-request-delay: every request waits this long before it runs


async def test_sigterm_completes_requests_in_flight_on_every_ring(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(MiB))
    options = ("--num-queues", "2", "--debug-request-delay", str(DELAY))
    async with serve_blk_on_fd(tmp_path, img, *options) as (proc, path, log):
        ram = GuestRam(8 * MiB)
        try:
            with trio.fail_after(30):
                fe = await VhostUserFrontend.connect(path)
                offered = await fe.get_u64(R.GET_FEATURES)
                await fe.negotiate(features=offered & ~(1 << 26 | TF.VIRTIO_F_RING_PACKED.mask))
                await fe.set_mem_table(ram)
                rings = [
                    await fe.setup_vring(i, ram, size=16, offset=i * 2 * MiB) for i in range(2)
                ]
                for i, vq in enumerate(rings):  # one write per ring, sector 8 and 16
                    header = struct.pack("<IIQ", int(BlkReqType.VIRTIO_BLK_T_OUT), 0, 8 * (i + 1))
                    vq.driver.add([header, bytes([0xA0 + i]) * 4096], [1])
                    vq.publish_and_kick()
                # both popped and waiting in their delay
                while True:
                    proc.send_signal(signal.SIGUSR1)
                    await trio.sleep(0.05)
                    popped = re.findall(r"vring_requests=(\d+),(\d+)", log.read_text())
                    if popped and popped[-1] == ("1", "1"):
                        break
                t0 = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                used = [(await vq.wait_used(timeout=5))[0] for vq in rings]
                rc = await proc.wait()
                took = time.monotonic() - t0
            text = log.read_text()
            assert [u.data for u in used] == [bytes([BlkStatus.VIRTIO_BLK_S_OK])] * 2, text
            assert rc == 0, text
            assert "still in flight" not in text, text
            assert took < DELAY + 1.5, (took, text)  # no 1 s drain per ring on top
            data = img.read_bytes()
            assert data[8 * 512 : 8 * 512 + 4096] == b"\xa0" * 4096
            assert data[16 * 512 : 16 * 512 + 4096] == b"\xa1" * 4096
            await fe.aclose()
        finally:
            ram.close()
