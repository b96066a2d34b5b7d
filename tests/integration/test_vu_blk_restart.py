"""Restart and upgrade of ``virtio serve blk`` without the guest noticing (issue 13 §6).

QEMU's chardev has ``reconnect=1``; fio writes and verifies (crc32c) in the guest
while the back-end is stopped -- SIGKILL and SIGTERM in turn -- and started again on
the same socket, over and over.  QEMU reconnects and hands each new process the
inflight area (vhost-user "Inflight I/O tracking"), which resubmits what the old
one had in flight.  fio must finish with every block verified: nothing lost,
nothing torn, no request left hanging.  Split rings run on the native data plane;
packed rings (virtio 1.4 §2.8) run with ``--debug-request-delay`` so that requests
really are in flight at the kills and the packed resubmission path is exercised.

Cycles (~2.6 s each under TCG, most of it QEMU's one-second reconnect timer): 50
for split rings on QEMU 7.2, 10 on QEMU 10.0, 6 for packed rings (slowed down by the
request delay); ``PYVIRTIO_RESTART_CYCLES=N`` sets them all (heavier runs).
"""

from __future__ import annotations

import os
import re
import time

import pytest
import trio
from test_vu_blk_qemu import backend_log, our_backend, vring_requests, wait_for_stats

from virtio.testing.blk_checks import vhost_user_blk_guest
from virtio.testing.guest_image import GuestImage
from virtio.testing.qemu import QemuBinary

pytestmark = pytest.mark.qemu

MiB = 1 << 20


def fio_verify_loop(dev: str, *, jobs: int, size_mb: int) -> str:
    """Shell: fio write-then-verify passes until /tmp/stop exists (at least one), each
    job on its own range; ``fio-ok N`` at the end, exit 1 on the first failure."""
    fio = (
        f"fio --name=v --filename={dev} --rw=randwrite --bs=4k --direct=1 --ioengine=libaio "
        f"--iodepth=8 --numjobs={jobs} --size={size_mb}M --offset_increment={size_mb}M "
        "--verify=crc32c --verify_fatal=1 --do_verify=1 --group_reporting --output=/tmp/fio.out"
    )
    return (
        f"n=0; while [ ! -e /tmp/stop ] || [ $n -lt 1 ]; do "
        f"{fio} || {{ cat /tmp/fio.out; exit 1; }}; n=$((n+1)); done; echo fio-ok $n"
    )


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
async def test_kill_and_restart_cycles_under_fio_verify(
    guest_image: GuestImage, qemu: QemuBinary, packed: bool
) -> None:
    default = 6 if packed else 50 if qemu.version == "7.2" else 10
    cycles = int(os.environ.get("PYVIRTIO_RESTART_CYCLES", default))
    extra = ("--debug-request-delay", "0.01") if packed else ()
    t0 = time.monotonic()
    with trio.fail_after(60 + 8 * cycles):
        async with vhost_user_blk_guest(
            guest_image,
            our_backend(*extra),
            disk_size=32 * MiB,
            num_queues=2,
            reconnect=1,
            device_props={"packed": True} if packed else {},
            guest_kwargs={"fio": True, "qemu": qemu},
        ) as s:
            job = await s.guest.spawn(fio_verify_loop(s.disk.dev, jobs=2, size_mb=8))
            await wait_for_stats(s, "fio writing", lambda st: sum(vring_requests(st)) > 0)
            pids = {s.backend.pid}
            for cycle in range(cycles):
                # SIGKILL (a crash) and SIGTERM (an orderly stop, e.g. an upgrade) in turn
                await s.restart_backend(kill=cycle % 2 == 0)
                pids.add(s.backend.pid)
                await wait_for_stats(
                    s, f"I/O after restart {cycle + 1}", lambda st: sum(vring_requests(st)) > 0
                )
                assert await job.poll() in (None, 0), await job.output()
            await s.guest.run("touch /tmp/stop")
            result = await job.wait(timeout=120, check=False)
            assert result.rc == 0 and "fio-ok" in result.output, result.output[-3000:]
            log = backend_log(s)
    assert len(pids) == cycles + 1
    assert log.count("inflight area set") >= cycles  # QEMU handed every new process the area
    resumed = [int(n) for n in re.findall(r"resumed (\d+) in-flight", log)]
    assert "needs reset" not in log and "rejected" not in log, log[-4000:]
    if packed:  # requests were in flight at the kills: some were redone from the area
        assert sum(resumed) > 0, log[-4000:]
    print(
        f"{cycles} restarts ({'packed' if packed else 'split'}, QEMU {qemu.version}) in "
        f"{time.monotonic() - t0:.0f} s; fio passes: {result.output.split()[-1]}; "
        f"resumed in-flight requests: {sum(resumed)} over {len(resumed)} ring starts"
    )
