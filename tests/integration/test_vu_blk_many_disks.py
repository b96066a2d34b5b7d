"""Six ``virtio serve blk`` back-ends (native data plane) under one real QEMU guest.

Regression: SeaBIOS drives every vhost-user-blk disk at boot and hands over to Linux
without resetting them; Linux reuses the memory of the firmware's rings until its
virtio_blk driver resets each device.  A data plane thread that looked at its ring
whenever its wait for a kick timed out read that memory as an available ring (the
back-ends logged "avail idx moved by 18078 entries": a driver error) and wrote used
flags, used entries and avail_event into it: with 6 disks of 2 queues the guest's
``fio --version`` segfaulted in ld.so.  Without a kick the ring is not touched
(virtio 1.4 §2.7.10; ``virtio/native/dataplane.c``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import trio

from virtio.testing.blk_checks import wait_for_socket
from virtio.testing.guest_image import GuestImage
from virtio.testing.qemu import QemuGuest, VhostUserBlk

pytestmark = pytest.mark.qemu

DISKS = 6
QUEUES = 2
REPO = Path(__file__).resolve().parents[2]


async def test_six_disks_leave_firmware_ring_memory_alone(guest_image: GuestImage) -> None:
    work = Path(tempfile.mkdtemp(prefix="pyvirtio-6blk-"))
    procs: list[trio.Process] = []
    try:
        devices = []
        for i in range(DISKS):
            image = work / f"disk{i}.img"
            with open(image, "wb") as f:
                f.truncate(16 << 20)
            sock = work / f"blk{i}.sock"
            with open(work / f"backend{i}.log", "wb") as log:
                proc = await trio.lowlevel.open_process(
                    [sys.executable, "-m", "virtio", "-v", "serve", "blk",
                     "--socket-path", os.fspath(sock), "--blk-file", os.fspath(image),
                     "--num-queues", str(QUEUES)],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                    cwd=REPO, env={**os.environ, "PYVIRTIO_BLK_DATAPLANE": "1"},
                )  # fmt: skip
            procs.append(proc)
            await wait_for_socket(sock, proc)
            devices.append(VhostUserBlk(sock, num_queues=QUEUES))
        async with QemuGuest(guest_image, devices=devices, fio=True) as guest:
            names = (await guest.run("ls /sys/block")).check().output.split()
            assert names == [f"vd{chr(ord('a') + i)}" for i in range(DISKS)]
            for _ in range(3):
                r = await guest.run("fio --version", check=False)
                assert r.rc == 0 and r.output.startswith("fio-"), r.output
            for name in names:  # every disk still serves I/O after the hand-over
                await guest.run(f"dd if=/dev/{name} of=/dev/null bs=4096 count=64 2>&1")
            r = await guest.run("dmesg | grep -c -E 'segfault|general protection'", check=False)
            assert r.output.strip() == "0", r.output
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            await proc.wait()
    for i in range(DISKS):
        log = (work / f"backend{i}.log").read_text(errors="replace")
        assert "front-end connected" in log
        assert "driver error" not in log and "ERROR" not in log, log
    for path in work.iterdir():
        path.unlink()
    work.rmdir()
