"""The image lock changes hands at a live migration's switch-over (docs/migration.md).

Two ``VirtioBlk`` on one raw image, as two back-ends of a migration would be: the
source locks it when opened, the destination (``BlkOptions(incoming=True)``, ``serve
blk --incoming``) does not.  Driven by the testing kit's vhost-user front-end the
way QEMU drives them: the source's rings stop with ``GET_VRING_BASE`` while
``VHOST_F_LOG_ALL`` is negotiated (the switch-over) -- it flushes and releases the
lock; the destination takes it when its first vring starts; a source whose
migration failed takes it back when its rings restart.  A third writer is refused
while either holds it; a QEMU ``qemu-io`` too (its ``file-posix`` byte locks
conflict with ours).  ``virtio serve blk --incoming`` starts on an image another
process holds; without ``--incoming`` it is refused.
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from virtio.devices.blk import BlkOptions, ImageLockedError, VirtioBlk
from virtio.devices.blk.backend import RawFileBackend
from virtio.spec.blk import BlkReqType, BlkStatus, virtio_blk_outhdr
from virtio.testing.blk_checks import stop_process, wait_for_socket
from virtio.testing.vhost_user_frontend import FrontendVring, GuestRam, VhostUserFrontend
from virtio.transport.vhost_user.messages import VHOST_F_LOG_ALL
from virtio.transport.vhost_user.messages import FrontendRequest as R
from virtio.transport.vhost_user.server import VhostUserServer

MiB = 1 << 20
OK = bytes([BlkStatus.VIRTIO_BLK_S_OK])
DATA = bytes(range(256)) * 16  # 4 KiB
LOG_ALL = 1 << VHOST_F_LOG_ALL


def _hdr(req_type: int, sector: int = 0) -> bytes:
    return virtio_blk_outhdr.build({"type": req_type, "reserved": 0, "sector": sector})


async def _connect(nursery: trio.Nursery, dev: VirtioBlk) -> VhostUserFrontend:
    a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    nursery.start_soon(VhostUserServer(dev).serve_connection, b)
    return VhostUserFrontend(a)


async def _start(fe: VhostUserFrontend, ram: GuestRam) -> FrontendVring:
    await fe.negotiate()
    await fe.set_mem_table(ram)
    return await fe.setup_vring(0, ram, size=64)


async def _request(vq: FrontendVring, readable: list[bytes], writable: list[int]) -> bytes:
    vq.driver.add(readable, writable)
    vq.publish_and_kick()
    (used,) = await vq.wait_used()
    return used.data


async def _switch_over(fe: VhostUserFrontend) -> int:
    """What the source QEMU sends at a migration: dirty logging on, then the rings stop."""
    await fe.request(R.SET_FEATURES, fe.features | LOG_ALL, need_reply=fe.reply_ack)
    return await fe.get_vring_base(0)


def _third_writer_refused(path: Path) -> ImageLockedError:
    with pytest.raises(ImageLockedError) as info:
        RawFileBackend(path).close()
    return info.value


def _lockable(path: Path) -> None:
    RawFileBackend(path).close()  # nobody holds the lock


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(4 * MiB))
    return path


async def test_lock_handed_from_source_to_destination(image: Path, caplog) -> None:
    caplog.set_level(logging.INFO)
    src = VirtioBlk.from_options(BlkOptions(path=image))
    dst = VirtioBlk.from_options(BlkOptions(path=image, incoming=True))
    ram_src, ram_dst = GuestRam(4 * MiB), GuestRam(4 * MiB)
    try:
        assert src.backend.lock_held and not dst.backend.lock_held
        _third_writer_refused(image)
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                fe_src = await _connect(nursery, src)
                vq = await _start(fe_src, ram_src)
                assert await _request(vq, [_hdr(BlkReqType.VIRTIO_BLK_T_OUT), DATA], [1]) == OK
                base = await _switch_over(fe_src)
                assert base == 1
                assert not src.backend.lock_held
                _lockable(image)  # released indeed (an OFD unlock, the image still open)
                fe_dst = await _connect(nursery, dst)
                vq_dst = await _start(fe_dst, ram_dst)  # its first vring takes the lock
                assert dst.backend.lock_held
                _third_writer_refused(image)
                read = await _request(vq_dst, [_hdr(BlkReqType.VIRTIO_BLK_T_IN)], [len(DATA) + 1])
                assert read == DATA + OK  # what the source wrote before the switch
                # the source cannot restart its rings now: its ring fails, named
                await fe_src.request(R.SET_FEATURES, fe_src.features, need_reply=fe_src.reply_ack)
                again = await fe_src.setup_vring(
                    0, ram_src, size=64, driver=vq.driver, vring_base=base
                )
                await trio.lowlevel.wait_readable(again.err_fd)  # §2.1.2 NEEDS_RESET
                assert again.error_signalled()
                assert not src.backend.lock_held
                await fe_src.aclose()
                await fe_dst.aclose()
                nursery.cancel_scope.cancel()
    finally:
        ram_src.close()
        ram_dst.close()
        src.close()
        dst.close()
    text = caplog.text
    assert "image lock released (live migration" in text
    assert "image lock taken (vring 0 starting)" in text
    assert "back-end error ImageLockedError" in text and "in use by another process" in text
    _lockable(image)  # closing released everything


async def test_lock_taken_back_when_the_migration_failed(image: Path) -> None:
    src = VirtioBlk.from_options(BlkOptions(path=image))
    ram = GuestRam(4 * MiB)
    try:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                fe = await _connect(nursery, src)
                vq = await _start(fe, ram)
                base = await _switch_over(fe)
                assert not src.backend.lock_held
                # QEMU resumes the source: logging off, rings set up again
                await fe.request(R.SET_FEATURES, fe.features, need_reply=fe.reply_ack)
                vq = await fe.setup_vring(0, ram, size=64, driver=vq.driver, vring_base=base)
                assert src.backend.lock_held
                _third_writer_refused(image)
                assert await _request(vq, [_hdr(BlkReqType.VIRTIO_BLK_T_OUT), DATA], [1]) == OK
                await fe.aclose()
                nursery.cancel_scope.cancel()
    finally:
        ram.close()
        src.close()


async def test_lock_kept_when_rings_stop_without_migration(image: Path) -> None:
    """A VM stop or guest reset stops the rings too, without dirty logging: the
    back-end keeps the lock."""
    src = VirtioBlk.from_options(BlkOptions(path=image))
    ram = GuestRam(4 * MiB)
    try:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                fe = await _connect(nursery, src)
                await _start(fe, ram)
                await fe.get_vring_base(0)
                assert src.backend.lock_held
                _third_writer_refused(image)
                await fe.aclose()
                nursery.cancel_scope.cancel()
    finally:
        ram.close()
        src.close()


def test_lock_release_and_take_raw_backend(image: Path) -> None:
    a = RawFileBackend(image)
    b = RawFileBackend(image, lock=False)  # an incoming back-end: opened, not locked
    try:
        assert a.lock_held and not b.lock_held
        with pytest.raises(ImageLockedError):
            b.take_lock()
        assert not b.lock_held
        a.release_lock()
        a.release_lock()  # idempotent
        b.take_lock()
        b.take_lock()
        assert b.lock_held and not a.lock_held
        with pytest.raises(ImageLockedError):
            a.take_lock()
    finally:
        a.close()
        b.close()
    _lockable(image)


@pytest.mark.skipif(shutil.which("qemu-io") is None, reason="qemu-io (qemu-utils) not installed")
def test_lock_refuses_qemu_io_while_held(image: Path) -> None:
    """QEMU's own tools are refused while a back-end holds the lock, and accepted
    once it released it (the window of the switch-over)."""
    cmd = ["qemu-io", "-f", "raw", "-c", "write 0 512", str(image)]
    a = RawFileBackend(image)
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        assert r.returncode != 0 and "lock" in (r.stdout + r.stderr), r
        a.release_lock()
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and "wrote 512/512 bytes" in r.stdout, r
    finally:
        a.close()


async def test_serve_incoming_starts_on_a_locked_image(image: Path, tmp_path: Path) -> None:
    """``serve blk --incoming`` listens while the source holds the lock; without
    ``--incoming`` the same command is refused, naming the lock."""
    held = RawFileBackend(image)
    sock = tmp_path / "dst.sock"
    base = [sys.executable, "-m", "virtio", "serve", "blk", "--blk-file", str(image)]
    try:
        r = subprocess.run(
            [*base, "--socket-path", str(tmp_path / "x.sock")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode != 0 and "lock" in r.stderr, r
        proc = await trio.lowlevel.open_process(
            [*base, "--socket-path", str(sock), "--incoming"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            await wait_for_socket(sock, proc, timeout=60)
        finally:
            with trio.CancelScope(shield=True):
                await stop_process(proc)
    finally:
        held.close()
