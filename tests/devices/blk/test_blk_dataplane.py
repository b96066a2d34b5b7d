"""The native virtio-blk data plane (``virtio/devices/blk/dataplane.py``).

Driven exactly as vhost-user drives it -- kick and call eventfds -- but from an
in-process driver queue: the common requests must be served by the native thread
(its counters say so), everything else must come out exactly as the Python device
answers it, and hostile rings must end in a typed driver error, not a crash.
"""

from __future__ import annotations

import contextlib
import os
import struct
import subprocess
import tempfile

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtio.device import ActiveDevice
from virtio.devices.blk import BlkOptions, VirtioBlk
from virtio.devices.blk.dataplane import BlkDataPlane
from virtio.devices.blk.probe import probe
from virtio.errors import DriverError
from virtio.memory import MmapGuestMemory
from virtio.queues import Virtqueue
from virtio.spec.blk import BlkReqType, BlkStatus
from virtio.spec.features import TransportFeature as TF
from virtio.testing.driver import DriverQueue
from virtio.testing.harness import EventfdNotifier

OUT = int(BlkReqType.VIRTIO_BLK_T_OUT)
IN = int(BlkReqType.VIRTIO_BLK_T_IN)
FLUSH = int(BlkReqType.VIRTIO_BLK_T_FLUSH)
GET_ID = int(BlkReqType.VIRTIO_BLK_T_GET_ID)
OK = int(BlkStatus.VIRTIO_BLK_S_OK)
IOERR = int(BlkStatus.VIRTIO_BLK_S_IOERR)
UNSUPP = int(BlkStatus.VIRTIO_BLK_S_UNSUPP)


def hdr(type_: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", type_, 0, sector)


class Rig:
    def __init__(
        self,
        tmp_path,
        *,
        packed=False,
        read_only=False,
        size=1 << 20,
        event_idx=True,
        image_format=None,
        image=None,
        **options,
    ):
        if image is not None:  # made by the test
            pass
        elif image_format == "qcow2":  # made by qemu-img, as users make them
            image = tmp_path / "disk.qcow2"
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(size)], check=True
            )
        else:
            image = tmp_path / "disk.img"
            with open(image, "wb") as f:
                f.truncate(size)
        self.device = VirtioBlk.from_options(
            BlkOptions(path=str(image), read_only=read_only, serial="dp-serial", **options),
            image_format=image_format,
        )
        features = self.device.offered_features()
        if not packed:
            features &= ~TF.VIRTIO_F_RING_PACKED.mask
        self.device.ack_features(features)
        self.mem = MmapGuestMemory.anonymous(4 << 20)
        if not event_idx:
            features &= ~TF.VIRTIO_F_EVENT_IDX.mask
            self.device.ack_features(features)
        self.drv = DriverQueue(self.mem, 64, packed=packed, event_idx=event_idx, indirect=True)
        self.queue = Virtqueue(self.mem, self.drv.state())
        self.notifier = EventfdNotifier()
        self.errors: list[DriverError] = []
        self.active = ActiveDevice(
            self.mem, features, {0: self.queue}, {0: self.notifier}, self.errors.append
        )
        self.image = image
        self.pending: dict = {}

    def submit(self, readable, writable, **kw) -> int:
        token = self.drv.add(readable, writable, **kw)
        if self.drv.publish():
            os.eventfd_write(self.notifier.kick_fd, 1)
        return token

    async def wait(self, token):
        pending = self.pending
        while token not in pending:
            for used in self.drv.get_used():
                pending[used.id] = used
            if token in pending:
                break
            if self.errors:
                raise self.errors[0]
            self.drv.set_interrupts(True)
            with trio.move_on_after(0.05):
                await trio.lowlevel.wait_readable(self.notifier.call_fd)
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self.notifier.call_fd)
        return pending.pop(token)

    async def request(self, readable, writable, **kw):
        return await self.wait(self.submit(readable, writable, **kw))

    def close(self):
        self.device.close()
        self.mem.close()
        self.notifier.close()


@pytest.fixture(params=[False, True], ids=["split", "packed"])
def rig(request, tmp_path):
    r = Rig(tmp_path, packed=request.param)
    yield r
    r.close()


async def serve(rig: Rig, nursery: trio.Nursery) -> BlkDataPlane:
    assert BlkDataPlane.supported(rig.device, rig.active, 0)
    nursery.start_soon(rig.device.serve_queue, rig.active, 0)
    while not rig.device.dataplanes:
        await trio.sleep(0.001)
    return rig.device.dataplanes[0]


async def test_common_requests_are_served_natively(rig):
    data = os.urandom(8192)
    async with trio.open_nursery() as nursery:
        plane = await serve(rig, nursery)
        used = await rig.request([hdr(OUT, 8), data[:4096], data[4096:]], [1])
        assert used.data == bytes([OK]) and used.written == 1
        used = await rig.request([hdr(IN, 8)], [1000, 3096, 4096, 1])  # odd splits
        assert used.data[:-1] == data and used.data[-1] == OK
        assert used.written == 8192 + 1
        used = await rig.request([hdr(FLUSH)], [1], use_indirect=True)
        assert used.data == bytes([OK])
        stats = plane.statistics()
        assert (stats["writes"], stats["reads"], stats["flushes"]) == (1, 1, 1)
        assert stats["deferred"] == 0
        nursery.cancel_scope.cancel()
    assert rig.image.read_bytes()[8 * 512 : 8 * 512 + 8192] == data
    assert rig.device.backend.sync_calls >= 1  # the native flush is counted


async def test_other_requests_are_answered_by_the_python_device(rig):
    async with trio.open_nursery() as nursery:
        plane = await serve(rig, nursery)
        used = await rig.request([hdr(GET_ID)], [20, 1])
        assert used.data[:9] == b"dp-serial" and used.data[-1] == OK
        capacity = rig.device.capacity
        used = await rig.request([hdr(IN, capacity)], [512, 1])  # beyond capacity
        assert used.data[-1] == IOERR
        used = await rig.request([hdr(IN, 0)], [100, 1])  # not a multiple of 512
        assert used.data[-1] == IOERR
        used = await rig.request([hdr(99)], [1])
        assert used.data[-1] == UNSUPP
        assert plane.statistics()["deferred"] == 4
        nursery.cancel_scope.cancel()


async def wait_idle(plane: BlkDataPlane, idles: int) -> None:
    """Until the thread's wait for a kick timed out ``idles`` more times."""
    target = plane.statistics()["idles"] + idles
    with trio.fail_after(10):
        while plane.statistics()["idles"] < target:
            await trio.sleep(0.01)


@pytest.mark.parametrize("event_idx", [True, False], ids=["event_idx", "flags"])
async def test_idle_ring_memory_is_left_alone(tmp_path, event_idx):
    """Without a kick the thread neither reads nor writes the ring (virtio 1.4 §2.7.10:
    the driver notifies the device of new buffers; the device acts on them).

    Firmware (SeaBIOS) sets a disk up and hands over to the OS without resetting it;
    the OS reuses the ring's memory until its own driver resets the device.  A thread
    that re-polled the ring when its wait for a kick timed out read an "avail idx"
    there and wrote the used flags, used entries and avail_event into the OS's memory:
    a Linux guest under QEMU with 6 vhost-user-blk disks saw fio segfault in ld.so."""
    rig = Rig(tmp_path, event_idx=event_idx)
    try:
        async with trio.open_nursery() as nursery:
            plane = await serve(rig, nursery)
            used = await rig.request([hdr(IN, 0)], [512, 1])  # the firmware's boot read
            assert used.data[-1] == OK
            await wait_idle(plane, 1)
            used = await rig.request([hdr(IN, 1)], [512, 1])  # a kick still wakes it
            assert used.data[-1] == OK
            # back in its wait for a kick (its used entry is out before it looks at
            # the ring a last time: overwriting the ring before that would race it)
            await wait_idle(plane, 1)
            requests = plane.statistics()["requests"]
            # The OS now owns that memory: zeroes, and an "avail idx" one ahead of the
            # ring's (descriptor 0 then reads as a request), but no kick.
            drv, mem = rig.drv, rig.mem
            start, end = drv.desc_addr, drv.data_addr
            mem.write(start, bytes(end - start))
            mem.write_u16(drv.driver_addr + 2, (drv._avail_idx + 1) & 0xFFFF)
            reused = mem.read(start, end - start)
            await wait_idle(plane, 2)
            assert mem.read(start, end - start) == reused
            assert plane.statistics()["requests"] == requests
            assert not rig.errors
            nursery.cancel_scope.cancel()
    finally:
        rig.close()


async def test_read_only_disk_rejects_writes(tmp_path):
    rig = Rig(tmp_path, read_only=True)
    try:
        async with trio.open_nursery() as nursery:
            await serve(rig, nursery)
            used = await rig.request([hdr(OUT, 0), b"x" * 512], [1])
            assert used.data[-1] == IOERR
            nursery.cancel_scope.cancel()
        assert rig.image.read_bytes()[:512] == bytes(512)
    finally:
        rig.close()


async def test_writethrough_switch_reaches_the_thread(rig):
    # CONFIG_WCE negotiated: writeback=0 makes every write durable before completion.
    async with trio.open_nursery() as nursery:
        plane = await serve(rig, nursery)
        rig.device.write_config(32, b"\x00")  # writeback = 0
        assert rig.device.writethrough
        before = plane.statistics()["syncs"]
        used = await rig.request([hdr(OUT, 8), b"y" * 512], [1])
        assert used.data[-1] == OK
        assert plane.statistics()["syncs"] == before + 1
        nursery.cancel_scope.cancel()


async def test_malformed_chain_is_a_driver_error(rig):
    async with trio.open_nursery() as nursery:
        await serve(rig, nursery)
        rig.submit([hdr(IN, 0)], [])  # no writable status byte
        with trio.fail_after(10):
            while not rig.errors:
                await trio.sleep(0.01)
        assert rig.device.needs_reset
        nursery.cancel_scope.cancel()


async def test_hostile_ring_breaks_the_queue_with_a_typed_error(tmp_path):
    rig = Rig(tmp_path)
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await serve(rig, nursery)
                rig.drv.set_avail_idx(1000)  # more than the queue size
                os.eventfd_write(rig.notifier.kick_fd, 1)
                while not rig.errors:
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
        assert rig.queue.broken
        assert "2.7" in rig.errors[0].section
    finally:
        rig.close()


async def test_many_requests_in_flight(rig):
    data = {i: os.urandom(4096) for i in range(24)}
    async with trio.open_nursery() as nursery:
        plane = await serve(rig, nursery)
        tokens = [rig.submit([hdr(OUT, 8 * i), d], [1], use_indirect=True) for i, d in data.items()]
        for t in tokens:
            assert (await rig.wait(t)).data == bytes([OK])
        tokens = {i: rig.submit([hdr(IN, 8 * i)], [4096, 1], use_indirect=True) for i in data}
        for i, t in tokens.items():
            assert (await rig.wait(t)).data[:-1] == data[i]
        assert plane.statistics()["requests"] == 48
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("native", [True, False], ids=["dataplane", "python"])
async def test_shrunk_image_capacity_reaches_both_paths(tmp_path, native):
    """Shrink the image, resize (SIGHUP does this), write beyond the new capacity:
    IOERR on both paths, and the file is not grown back (§5.2.6.1: requests beyond
    ``capacity`` are errors)."""
    rig = Rig(tmp_path, size=1 << 20)
    rig.device.native_dataplane = native
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rig.device.serve_queue, rig.active, 0)
            last = rig.device.capacity - 1
            assert (await rig.request([hdr(OUT, last), b"z" * 512], [1])).data == bytes([OK])
            os.truncate(rig.image, 512 << 10)
            assert rig.device.resize() is True
            assert rig.device.capacity == 1024
            used = await rig.request([hdr(OUT, last), b"z" * 512], [1])
            assert used.data == bytes([IOERR])
            used = await rig.request([hdr(IN, 1024)], [512, 1])
            assert used.data[-1] == IOERR
            used = await rig.request([hdr(OUT, 1023), b"y" * 512], [1])  # still inside
            assert used.data == bytes([OK])
            assert bool(rig.device.dataplanes) is native
            nursery.cancel_scope.cancel()
        assert os.path.getsize(rig.image) == 512 << 10
    finally:
        rig.close()


# -- the probed-raw rule, on the Python path and the native data plane ----------------


@pytest.mark.parametrize("native", [True, False], ids=["dataplane", "python"])
@pytest.mark.parametrize("explicit", [False, True], ids=["probed", "format-raw"])
async def test_probed_raw_refuses_a_format_header_in_sector_0(tmp_path, native, explicit):
    rig = Rig(tmp_path)
    rig.device.guard_format_change = not explicit  # what from_options decides
    rig.device.native_dataplane = native
    qcow2_header = b"QFI\xfb" + struct.pack(">I", 3) + bytes(504)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rig.device.serve_queue, rig.active, 0)
            used = await rig.request([hdr(OUT, 0), qcow2_header, bytes(3584)], [1])
            assert used.data == bytes([OK if explicit else IOERR])
            used = await rig.request([hdr(OUT, 0), b"\xeb\x63\x90" + bytes(509)], [1])
            assert used.data == bytes([OK])  # an ordinary boot sector is fine
            used = await rig.request([hdr(OUT, 8), qcow2_header], [1])
            assert used.data == bytes([OK])  # the magic elsewhere is just data
            nursery.cancel_scope.cancel()
        assert (probe(rig.image.read_bytes()[:512]) == "qcow2") is False
    finally:
        rig.close()


# ---- random requests, native against Python (hypothesis) ---------------------------

SECTORS = 64  # a 32 KiB disk: requests run past its end often


def _cut(draw, data: bytes) -> list[bytes]:
    """``data`` cut at 0-2 random places (pieces may be empty)."""
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=2)))
    return [data[i:j] for i, j in zip([0, *cuts], [*cuts, len(data)], strict=True)]


@st.composite
def _random_request(draw):
    """(readable, writable, indirect): a request of a known, unknown or unsupported
    type, at a sector inside, across or far past the disk's end, with a data length
    that is or is not a multiple of 512, its header and data cut across descriptors,
    the status byte alone or at the end of the last data buffer."""
    kind = draw(st.sampled_from([IN, IN, OUT, OUT, FLUSH, GET_ID, 10, 11, 13, 14, 99, 1 << 31]))
    sector = draw(
        st.integers(0, SECTORS + 4) | st.sampled_from([SECTORS - 1, 1 << 55, (1 << 64) - 1])
    )
    n = draw(st.integers(0, 8).map(lambda k: 512 * k) | st.sampled_from([1, 100, 511, 513, 20]))
    header = struct.pack("<IIQ", kind, draw(st.integers(0, 0xFFFFFFFF)), sector)
    readable = _cut(draw, header)
    writable: list[int] = []
    if kind in (OUT, 11, 13, 14, 99):  # data the device reads (segments for 11 / 13 / 14)
        if kind in (11, 13, 14) and draw(st.booleans()):
            segs = st.tuples(st.integers(0, SECTORS + 2), st.integers(0, 9), st.integers(0, 3))
            data = b"".join(struct.pack("<QII", *s) for s in draw(st.lists(segs, max_size=3)))
        else:
            data = draw(st.binary(min_size=n, max_size=n))
        readable += _cut(draw, data)
    else:  # IN, GET_ID, GET_LIFETIME, FLUSH: buffers the device writes
        writable = [len(p) for p in _cut(draw, bytes(n))]
    if writable and writable[-1] and draw(st.booleans()):
        writable[-1] += 1  # the status byte at the end of the last data buffer
    else:
        writable.append(1)
    return readable, writable, draw(st.booleans())


async def _requests(tmp: str, native: bool, packed: bool, fmt: str, reqs) -> tuple[list, bytes]:
    image = os.path.join(tmp, f"disk-{native}.{fmt}")
    pattern = image if fmt == "raw" else os.path.join(tmp, f"pattern-{native}.raw")
    with open(pattern, "wb") as f:
        f.write(bytes(range(256)) * (SECTORS * 2))
    if fmt != "raw":
        subprocess.run(["qemu-img", "convert", "-q", "-O", fmt, pattern, image], check=True)
    rig = Rig(None, packed=packed, image=image, image_format=fmt)
    rig.device.native_dataplane = native
    answers = []
    try:
        async with trio.open_nursery() as nursery:
            if native:
                await serve(rig, nursery)
            else:
                nursery.start_soon(rig.device.serve_queue, rig.active, 0)
            for readable, writable, indirect in reqs:
                used = await rig.request(readable, writable, use_indirect=indirect)
                answers.append((used.written, used.data[: used.written]))
            assert not rig.errors and not rig.device.needs_reset
            nursery.cancel_scope.cancel()
    finally:
        rig.close()
    if fmt != "raw":
        subprocess.run(["qemu-img", "convert", "-q", "-O", "raw", image, pattern], check=True)
    with open(pattern, "rb") as f:
        return answers, f.read()


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reqs=st.lists(_random_request(), min_size=1, max_size=10), packed=st.booleans())
async def test_random_requests_answered_as_python_does(fmt, reqs, packed):
    """A guest driver may send anything (§5.2.6, "A driver MUST NOT submit a request
    which would cause a read or write beyond capacity", and the rest): every random
    request, served by the native data plane where it can and handed to the Python
    device where it cannot, gets the status, the used length and the bytes the
    Python device alone gives it, and the disk reads the same in the end (qcow2:
    its clusters looked up and allocated natively, converted back by qemu-img)."""
    with tempfile.TemporaryDirectory() as tmp:
        py = await _requests(tmp, False, packed, fmt, reqs)
        nat = await _requests(tmp, True, packed, fmt, reqs)
    assert nat[0] == py[0]
    assert nat[1] == py[1]
