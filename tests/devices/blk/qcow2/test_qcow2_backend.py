"""``Qcow2Backend`` as the device sees it: through ``VirtioBlk.from_options`` and the
vhost-user server (Python path: no native data plane for qcow2), concurrent
requests from trio tasks, QEMU's byte-range locking of the image and its backing
file (qemu-img and qemu-io are the judges), and ``virtio serve blk --format qcow2``."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from virtio.devices.blk import BlkOptions, ImageLockedError, RawFileBackend, VirtioBlk
from virtio.devices.blk.config import CONFIG_SIZE
from virtio.devices.blk.qcow2 import Qcow2Backend
from virtio.spec.blk import BlkReqType, BlkStatus, virtio_blk_config, virtio_blk_outhdr
from virtio.testing.vhost_user_frontend import GuestRam, VhostUserFrontend
from virtio.transport.vhost_user.server import VhostUserServer

MiB = 1 << 20
T = BlkReqType
OK = bytes([BlkStatus.VIRTIO_BLK_S_OK])
REPO = Path(__file__).resolve().parents[4]


def hdr(req_type: int, sector: int = 0) -> bytes:
    return virtio_blk_outhdr.build({"type": req_type, "reserved": 0, "sector": sector})


def _overlay(qimg, tmp_path: Path) -> tuple[Path, Path, bytes]:
    base = tmp_path / "base.raw"
    content = random.Random(1).randbytes(2 * MiB)
    base.write_bytes(content)
    top = qimg.create(tmp_path / "top.qcow2", 3 * MiB + 4096, backing=base, backing_fmt="raw")
    return base, top, content


async def test_qcow2_overlay_over_vhost_user(qimg, tmp_path) -> None:
    base, top, content = _overlay(qimg, tmp_path)
    dev = VirtioBlk.from_options(BlkOptions(path=top), image_format="qcow2")
    assert isinstance(dev.backend, Qcow2Backend)
    assert dev.backend.fd >= 0  # the native data plane reads allocated clusters
    server = VhostUserServer(dev)
    ram = GuestRam(8 * MiB)
    data = bytes(range(256)) * 24  # 6 KiB, crossing a cluster boundary below
    sector = (64 * 1024 - 2048) // 512
    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                nursery.start_soon(server.serve_connection, b)
                fe = VhostUserFrontend(a)
                await fe.negotiate()
                cfg = virtio_blk_config.parse(await fe.get_config(0, CONFIG_SIZE))
                assert cfg.capacity == (3 * MiB + 4096) // 512  # the virtual size
                await fe.set_mem_table(ram)
                vq = await fe.setup_vring(0, ram, size=64, offset=0)
                vq.driver.add([hdr(T.VIRTIO_BLK_T_OUT, sector), data], [1])
                vq.publish_and_kick()
                (used,) = await vq.wait_used()
                assert used.data == OK
                vq.driver.add([hdr(T.VIRTIO_BLK_T_FLUSH)], [1])
                vq.driver.add([hdr(T.VIRTIO_BLK_T_IN, sector - 8)], [4096 + len(data) + 1])
                vq.publish_and_kick()
                got = sorted(await vq.wait_used(2), key=lambda u: u.written)
                assert got[0].data == OK
                want = content[(sector - 8) * 512 : sector * 512] + data
                assert got[1].data == want + OK
                # The write and the flush went to Python (qcow2 metadata), and so did
                # that read: its two clusters are not next to each other in the file
                # (the new L2 table lies between).  A read inside one allocated
                # cluster is the data plane's own.
                vq.driver.add([hdr(T.VIRTIO_BLK_T_IN, 128)], [4096 + 1])
                vq.publish_and_kick()
                (used,) = await vq.wait_used()
                assert used.data == data[2048:] + OK  # 4 KiB into cluster 1: the rest of it
                (plane,) = dev.dataplanes
                stats = plane.statistics()
                assert stats["qcow2_reads"] == 1 and stats["deferred"] == 3, stats
                await fe.aclose()
    finally:
        ram.close()
        dev.close()
    assert dev.backend.sync_calls >= 1
    qimg.check(top)
    assert base.read_bytes() == content  # writes stay in the overlay


async def test_concurrent_requests_keep_the_image_consistent(qimg, tmp_path) -> None:
    _, top, content = _overlay(qimg, tmp_path)
    backend = Qcow2Backend(top, l2_cache_size=64 << 10)
    model = bytearray(content + bytes(backend.size - len(content)))
    rng = random.Random(5)

    async def worker(i: int) -> None:
        region = i * (backend.size // 8) // 512 * 512
        for _ in range(15):
            off = region + rng.randrange(0, 600) * 512
            n = rng.randrange(1, 64) * 512
            choice = rng.randrange(4)
            if choice == 0:
                buf = rng.randbytes(n)
                await backend.write(off, [memoryview(buf)], sync=rng.random() < 0.3)
                model[off : off + n] = buf
            elif choice == 1:
                await backend.write_zeroes([(off, n)], unmap=rng.random() < 0.5)
                model[off : off + n] = bytes(n)
            elif choice == 2:
                got = bytearray(n)
                await backend.read(off, [memoryview(got)])
                assert got == model[off : off + n]
            else:
                await backend.flush()

    try:
        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(worker, i)
        got = bytearray(backend.size)
        await backend.read(0, [memoryview(got)])
        assert got == model
    finally:
        backend.close()
    assert qimg.check(top).get("leaks", 0) == 0
    raw = tmp_path / "model.raw"
    raw.write_bytes(model)
    qimg.compare(top, raw)


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


def test_locks_as_qemu_sees_them(qimg, tmp_path) -> None:
    base = tmp_path / "base.qcow2"
    qimg.create(base, 2 * MiB)
    top = qimg.create(tmp_path / "top.qcow2", 2 * MiB, backing=base)
    backend = Qcow2Backend(top)
    try:
        r = _run("qemu-img", "info", str(top))
        assert r.returncode != 0 and "lock" in r.stderr, r.stderr  # top: in use
        assert _run("qemu-img", "info", "-U", str(top)).returncode == 0  # as with QEMU
        r = _run("qemu-io", "-f", "qcow2", "-c", "read 0 512", str(top))
        assert r.returncode != 0 and "lock" in r.stderr, r.stderr
        r = _run("qemu-io", "-r", "-f", "qcow2", "-c", "read 0 512", str(base))
        assert r.returncode == 0, r.stderr  # base: other readers welcome
        r = _run("qemu-io", "-f", "qcow2", "-c", "write 0 512", str(base))
        assert r.returncode != 0 and "lock" in r.stderr, r.stderr  # ... writers not
        with pytest.raises(ImageLockedError):
            Qcow2Backend(top)
        with pytest.raises(ImageLockedError):
            Qcow2Backend(top, read_only=True)
        with pytest.raises(ImageLockedError):
            RawFileBackend(top)  # the whole-file lock of a raw server conflicts too
        with pytest.raises(ImageLockedError):
            Qcow2Backend(base)  # a backing file in use cannot be written
        second = Qcow2Backend(qimg.create(tmp_path / "top2.qcow2", 2 * MiB, backing=base))
        second.close()  # two overlays may share one base
    finally:
        backend.close()
    assert _run("qemu-img", "info", str(top)).returncode == 0


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def test_cli_serves_qcow2_and_holds_the_lock(qimg, tmp_path) -> None:
    _, top, _ = _overlay(qimg, tmp_path)
    sock = tmp_path / "blk.sock"
    cmd = [sys.executable, "-m", "virtio", "serve", "blk", "--socket-path", str(sock)]
    cmd += ["--blk-file", str(top), "--format", "qcow2", "--l2-cache-size", "1M"]
    proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(sock, proc)
        r = _run("qemu-img", "info", str(top))
        assert r.returncode != 0 and "lock" in r.stderr, r.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, proc.stderr.read() if proc.stderr else ""
        if proc.stderr:
            proc.stderr.close()
    qimg.check(top)
    r = subprocess.run(
        [*cmd[:-2], "--l2-cache-size", "lots"], capture_output=True, text=True, cwd=REPO
    )
    assert r.returncode == 2 and "not a size" in r.stderr
    assert os.path.exists(top)
