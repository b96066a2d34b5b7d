"""I/O errors reach the guest exactly as they happened (issue: "a failed flush is
reported as success").

A real back-end process (``virtio serve blk``) runs with the fault-injection shim
(``virtio.testing.faults``: libc calls on the image fail on demand) and is driven
over vhost-user by the testing kit's front-end, on the native data plane with each
I/O engine (io_uring bypasses libc: the data plane's own fault hook reads the same
fault files) and on the Python path (``PYVIRTIO_BLK_DATAPLANE=0``).  devicenormative §5.2.6.2 ties a
FLUSH's success to durability; Linux reports a writeback error to one
``fdatasync`` only, so the failed flush must be answered IOERR itself (never
retried) and every later flush must fail too (the sticky writeback error).
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import struct
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from virtio.spec.blk import BlkFeature, BlkReqType, BlkStatus
from virtio.spec.features import TransportFeature as TF
from virtio.testing.faults import FaultInjector
from virtio.testing.vhost_user_frontend import GuestRam, VhostUserFrontend
from virtio.transport.vhost_user.messages import FrontendRequest as R

MiB = 1 << 20
ENGINES = {"io_uring": 2, "threads": 1}
"""``struct blk_dp``'s engine numbers (BLK_AIO_URING / BLK_AIO_THREADS)."""
REPO = Path(__file__).resolve().parents[3]
OUT = int(BlkReqType.VIRTIO_BLK_T_OUT)
IN = int(BlkReqType.VIRTIO_BLK_T_IN)
FLUSH = int(BlkReqType.VIRTIO_BLK_T_FLUSH)
OK = int(BlkStatus.VIRTIO_BLK_S_OK)
IOERR = int(BlkStatus.VIRTIO_BLK_S_IOERR)
CONFIG_WCE = BlkFeature.VIRTIO_BLK_F_CONFIG_WCE.mask
FLUSH_F = BlkFeature.VIRTIO_BLK_F_FLUSH.mask


def hdr(type_: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", type_, 0, sector)


class Backend:
    """A ``virtio serve blk`` process under the fault shim, with a connected front-end
    and one ring."""

    def __init__(self, proc, fe: VhostUserFrontend, vq, faults: FaultInjector, log: Path):
        self.proc, self.fe, self.vq, self.faults, self.log = proc, fe, vq, faults, log

    async def request(self, readable: list[bytes], writable: list[int]):
        self.vq.driver.add(readable, writable)
        self.vq.publish_and_kick()
        (used,) = await self.vq.wait_used(timeout=10)
        return used

    async def status(self, readable: list[bytes], writable: list[int] | None = None) -> int:
        return (await self.request(readable, writable or [1])).data[-1]

    def stderr(self) -> str:
        return self.log.read_text()


@asynccontextmanager
async def serve_blk_on_fd(
    tmp_path: Path, img: Path, *options: str, env: dict[str, str] | None = None
) -> AsyncIterator[tuple[trio.Process, str, Path]]:
    """``virtio serve blk`` on ``img`` with ``options``, handed a listening socket
    (``--fd``): the process, the socket's path (listening already) and its stderr;
    killed at the end if it is still running."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = os.fspath(tmp_path / "blk.sock")
    listener.bind(path)
    listener.listen(1)
    log = tmp_path / "backend.log"
    with open(log, "wb") as err:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "virtio", "serve", "blk", "--fd", str(listener.fileno()),
             "--blk-file", os.fspath(img), *options],
            pass_fds=(listener.fileno(),),
            stderr=err,
            env=env,
            cwd=REPO,
        )  # fmt: skip
    listener.close()
    try:
        yield proc, path, log
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@asynccontextmanager
async def backend(tmp_path: Path, *, dataplane: str, features_off: int = 0):
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(4 * MiB))
    faults = FaultInjector(tmp_path / "faults")
    env = faults.env()
    env["PYVIRTIO_BLK_DATAPLANE"] = "0" if dataplane == "python" else "1"
    aio = "threads" if dataplane == "python" else dataplane
    async with serve_blk_on_fd(tmp_path, img, "--aio", aio, env=env) as (proc, path, log):
        ram = GuestRam(8 * MiB)
        try:
            with trio.fail_after(30):
                fe = await VhostUserFrontend.connect(path)
            offered = await fe.get_u64(R.GET_FEATURES)
            packed = TF.VIRTIO_F_RING_PACKED.mask
            await fe.negotiate(features=offered & ~(1 << 26 | packed | features_off))
            await fe.set_mem_table(ram)
            vq = await fe.setup_vring(0, ram, size=32)
            try:
                yield Backend(proc, fe, vq, faults, log)
            finally:
                await fe.aclose()
        finally:
            ram.close()


@pytest.fixture(params=["io_uring", "threads", "python"])
def dataplane(request) -> str:
    """The native data plane on an I/O engine, or the Python path."""
    return request.param


async def test_failed_flush_is_ioerr_and_every_later_flush_fails(tmp_path, dataplane):
    async with backend(tmp_path, dataplane=dataplane) as be:
        assert await be.status([hdr(OUT, 8), b"a" * 4096]) == OK
        assert await be.status([hdr(FLUSH)]) == OK
        assert await be.status([hdr(OUT, 16), b"b" * 4096]) == OK
        be.faults.arm("fdatasync", errno.EIO)  # Linux: the error is reported once
        assert await be.status([hdr(FLUSH)]) == IOERR
        assert not be.faults.armed("fdatasync")  # it fired, and only once
        # fdatasync would now succeed; the data of sector 16 may be gone: later
        # flushes must not claim durability.
        assert await be.status([hdr(FLUSH)]) == IOERR
        assert await be.status([hdr(OUT, 24), b"c" * 512]) == OK  # writeback: no sync
        assert await be.status([hdr(FLUSH)]) == IOERR
        used = await be.request([hdr(IN, 8)], [4096, 1])  # reads still work
        assert used.data == b"a" * 4096 + bytes([OK])
        if dataplane != "python":  # the engine asked for is the one that ran
            be.proc.send_signal(signal.SIGUSR1)
            with trio.fail_after(10):
                while "engine_used=" not in be.stderr():
                    await trio.sleep(0.02)
            assert f"engine_used={ENGINES[dataplane]}" in be.stderr()
    text = be.stderr()
    assert text.count("a flush of the image failed (EIO)") == 1, text
    assert "FLUSH" in text and "Input/output error" in text, text


async def test_failed_writethrough_write_is_ioerr_and_sticky(tmp_path, dataplane):
    # Neither FLUSH nor CONFIG_WCE negotiated: every write is durable before it
    # completes (devicenormative §5.2.6.2, stable writes case 1).
    async with backend(tmp_path, dataplane=dataplane, features_off=FLUSH_F | CONFIG_WCE) as be:
        assert await be.status([hdr(OUT, 0), b"a" * 512]) == OK
        be.faults.arm("fdatasync", errno.EIO)
        assert await be.status([hdr(OUT, 1), b"b" * 512]) == IOERR
        assert await be.status([hdr(OUT, 2), b"c" * 512]) == IOERR  # sticky
    assert be.stderr().count("a flush of the image failed (EIO)") == 1


async def test_failed_write_and_read_are_ioerr_with_zeroed_data(tmp_path, dataplane):
    async with backend(tmp_path, dataplane=dataplane) as be:
        assert await be.status([hdr(OUT, 0), b"x" * 1024]) == OK
        be.faults.arm("pwritev", errno.ENOSPC)
        assert await be.status([hdr(OUT, 0), b"y" * 1024]) == IOERR
        be.faults.arm("preadv", errno.EIO)
        used = await be.request([hdr(IN, 0)], [1024, 1])
        assert used.data == bytes(1024) + bytes([IOERR])  # no stale bytes left behind
        used = await be.request([hdr(IN, 0)], [1024, 1])
        assert used.data == b"x" * 1024 + bytes([OK])  # the failed write wrote nothing
        assert await be.status([hdr(FLUSH)]) == OK  # no writeback error happened


async def test_error_storm_is_rate_limited_in_the_log(tmp_path, dataplane):
    async with backend(tmp_path, dataplane=dataplane) as be:
        be.faults.arm("pwritev", errno.ENOSPC, count=-1)
        for batch in range(20):  # 200 failing writes, 10 at a time (32-entry ring)
            for i in range(10):
                be.vq.driver.add([hdr(OUT, batch * 10 + i), b"s" * 512], [1])
            be.vq.publish_and_kick()
            used = await be.vq.wait_used(10, timeout=30)
            assert {u.data for u in used} == {bytes([IOERR])}
        be.faults.disarm("pwritev")
        assert await be.status([hdr(OUT, 0), b"t" * 512]) == OK
        be.proc.send_signal(signal.SIGTERM)  # a clean exit reports what was held back
        with trio.fail_after(20):
            assert await be.proc.wait() == 0
    text = be.stderr()
    assert text.count("No space left on device") <= 5, text
    assert "... and 195 more 'IOERR ENOSPC' messages" in text, text
