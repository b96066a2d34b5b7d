"""An orderly stop completes the requests in flight before the back-end lets go.

``virtio serve blk`` documents SIGINT/SIGTERM as a clean stop (an upgrade stops the
old process this way), and ``export-del`` on the control socket stops one export.
Either way the server stops reading messages, each ring drains as on a disconnect --
the requests already popped run to completion and their used entries reach the
driver (virtio 1.4 §2.7.8 / §2.8.21) -- and only then is everything cancelled
(``virtio.transport.vhost_user.server.stop_servers``).  Cancelling first abandoned
them (a restarted back-end had to resubmit them from the inflight area, and without
one the guest lost them) and then waited out a 1 s drain of each ring in turn.
"""

from __future__ import annotations

import re
import signal
import struct
import sys
import time
from pathlib import Path

import trio
from test_blk_io_errors import serve_blk_on_fd

from virtio.control.client import ControlClient
from virtio.spec.blk import BlkReqType, BlkStatus
from virtio.spec.features import TransportFeature as TF
from virtio.testing.vhost_user_frontend import FrontendVring, GuestRam, VhostUserFrontend
from virtio.transport.vhost_user.messages import FrontendRequest as R

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[3]
DELAY = 0.5  # --debug-request-delay: every request waits this long before it runs
OK = bytes([BlkStatus.VIRTIO_BLK_S_OK])


async def two_writes_in_flight(
    path: str, ram: GuestRam, proc: trio.Process, log: Path
) -> tuple[VhostUserFrontend, list[FrontendVring]]:
    """A front-end on two rings, one 4 KiB write on each (sectors 8 and 16), returned
    once the back-end has popped both (they then wait out DELAY)."""
    fe = await VhostUserFrontend.connect(path)
    offered = await fe.get_u64(R.GET_FEATURES)
    await fe.negotiate(features=offered & ~(1 << 26 | TF.VIRTIO_F_RING_PACKED.mask))
    await fe.set_mem_table(ram)
    rings = [await fe.setup_vring(i, ram, size=16, offset=i * 2 * MiB) for i in range(2)]
    for i, vq in enumerate(rings):
        header = struct.pack("<IIQ", int(BlkReqType.VIRTIO_BLK_T_OUT), 0, 8 * (i + 1))
        vq.driver.add([header, bytes([0xA0 + i]) * 4096], [1])
        vq.publish_and_kick()
    while True:
        proc.send_signal(signal.SIGUSR1)
        await trio.sleep(0.05)
        popped = re.findall(r"vring_requests=(\d+),(\d+)", log.read_text())
        if popped and popped[-1] == ("1", "1"):
            return fe, rings


def check_written(img: Path, text: str) -> None:
    assert "still in flight" not in text, text
    data = img.read_bytes()
    assert data[8 * 512 : 8 * 512 + 4096] == b"\xa0" * 4096
    assert data[16 * 512 : 16 * 512 + 4096] == b"\xa1" * 4096


async def test_sigterm_completes_requests_in_flight_on_every_ring(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(MiB))
    options = ("--num-queues", "2", "--debug-request-delay", str(DELAY))
    async with serve_blk_on_fd(tmp_path, img, *options) as (proc, path, log):
        ram = GuestRam(8 * MiB)
        try:
            with trio.fail_after(30):
                fe, rings = await two_writes_in_flight(path, ram, proc, log)
                t0 = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                used = [(await vq.wait_used(timeout=5))[0] for vq in rings]
                rc = await proc.wait()
                took = time.monotonic() - t0
            text = log.read_text()
            assert [u.data for u in used] == [OK, OK], text
            assert rc == 0, text
            assert took < DELAY + 1.5, (took, text)  # no 1 s drain per ring on top
            check_written(img, text)
            await fe.aclose()
        finally:
            ram.close()


async def test_export_del_completes_requests_in_flight(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(MiB))
    sock, ctl_path, log = tmp_path / "blk.sock", tmp_path / "ctl", tmp_path / "serve.log"
    spec = f"blk,id=d,socket-path={sock},blk-file={img},num-queues=2,debug-request-delay={DELAY}"
    with open(log, "wb") as err:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "virtio", "serve", "--control", str(ctl_path),
             "--export", spec],
            stderr=err,
            cwd=REPO,
        )  # fmt: skip
    ram = GuestRam(8 * MiB)
    try:
        with trio.fail_after(30):
            while "listening" not in log.read_text():
                await trio.sleep(0.05)
            fe, rings = await two_writes_in_flight(str(sock), ram, proc, log)
            async with await ControlClient.connect(ctl_path) as ctl:
                await ctl.execute("export-del", id="d")
                used = [(await vq.wait_used(timeout=5))[0] for vq in rings]
                assert [u.data for u in used] == [OK, OK], log.read_text()
                assert await ctl.execute("query-exports") == []
        check_written(img, log.read_text())
        await fe.aclose()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        ram.close()
