"""``virtio serve rng`` as the vhost-user-rng back-end of a real guest, on QEMU 7.2 and 10.0.

The guest's own virtio_rng driver (hw_random core) is the judge: it binds to our
device, ``/dev/hwrng`` returns bytes that are not constant, and the back-end's
statistics show it filled the buffers (virtio 1.4 §5.4.6).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from virtio.testing.blk_checks import wait_for_socket
from virtio.testing.qemu import QemuGuest, VhostUserRng

pytestmark = pytest.mark.qemu

REPO = Path(__file__).resolve().parents[2]
NBYTES = 4096


async def _statistics(proc: trio.Process, log: Path) -> dict[str, str]:
    """SIGUSR1 the back-end; the statistics line it prints on stderr, parsed."""
    before = log.read_text().count("statistics:")
    proc.send_signal(signal.SIGUSR1)
    with trio.fail_after(10):
        while log.read_text().count("statistics:") <= before:
            await trio.sleep(0.05)
    line = [ln for ln in log.read_text().splitlines() if "statistics:" in ln][before]
    return dict(kv.split("=", 1) for kv in line.split("statistics:", 1)[1].split())


async def test_linux_guest_reads_hwrng_from_our_backend(guest_image, qemu, tmp_path):
    sock, log = tmp_path / "rng.sock", tmp_path / "backend.log"
    with open(log, "ab") as err:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "virtio", "-v", "serve", "rng", "--socket-path", str(sock)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            cwd=REPO,
        )
    try:
        await wait_for_socket(sock, proc)
        async with QemuGuest(
            guest_image, devices=[VhostUserRng(os.fspath(sock))], qemu=qemu, qmp=True
        ) as g:
            assert g.qmp is not None
            version = (await g.qmp.execute("query-version"))["qemu"]
            assert f"{version['major']}.{version['minor']}" == qemu.version
            current = await g.run("cat /sys/class/misc/hw_random/rng_current")
            assert current.output.strip().startswith("virtio_rng"), current.output
            r = await g.run(
                f"dd if=/dev/hwrng bs={NBYTES} count=1 iflag=fullblock 2>/dev/null"
                " | od -An -v -tx1 | tr -d ' \\n'",
                timeout=120,
            )
            data = bytes.fromhex(r.output.strip())
            stats = await _statistics(proc, log)
        assert len(data) == NBYTES
        # Non-constant: 4 KiB of random bytes use (almost) every byte value, and no
        # 64-byte block repeats (a device handing out the same buffer again would).
        assert len(set(data)) > 200
        blocks = [data[i : i + 64] for i in range(0, NBYTES, 64)]
        assert len(set(blocks)) == len(blocks)
        assert int(stats["buffers_filled"]) > 0
        assert int(stats["bytes"]) >= NBYTES
        assert int(stats["vring_requests"].split(",")[0]) == int(stats["buffers_filled"])
        assert stats["needs_reset"] == "0", log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            assert await proc.wait() == 0, log.read_text()
