"""The device-author API (virtio/device.py, virtio/service.py, virtio/config_space.py):
queue roles, the one queue-service loop under every transport, device-initiated
events, and the configuration space declared once."""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from construct import Bytes, Int8ul, Int32ul, Struct

from virtio.config_space import ConfigAccessError, ConfigLayout
from virtio.device import ActiveDevice, DeviceNeedsReset, VirtioDevice
from virtio.devices.rng import VirtioRng
from virtio.errors import DescriptorChainError
from virtio.memory import GuestMemory, MemoryRegion
from virtio.service import BufferQueue, QueueRole
from virtio.spec.ids import DeviceId
from virtio.spec.mmio import MmioReg
from virtio.spec.sections import S_5_8_4
from virtio.spec.status import DeviceStatus as S
from virtio.testing.driver import DriverQueue
from virtio.testing.harness import DeviceHarness
from virtio.testing.vhost_user_frontend import GuestRam, VhostUserFrontend
from virtio.transport.mmio import INT_CONFIG, INT_VRING, MmioAccessError, MmioTransport
from virtio.transport.vhost_user.messages import HEADER, BackendRequest, ConfigSpace
from virtio.transport.vhost_user.messages import FrontendRequest as R
from virtio.transport.vhost_user.server import VhostUserServer

R_ = MmioReg
MEM = 1 << 20
MiB = 1 << 20

# -- a stateful configuration space (input-like select/subsel, §5.8.4) ---------------------
select_config = Struct(
    "select" / Int8ul,
    "subsel" / Int8ul,
    "size" / Int8ul,
    "reserved" / Bytes(5),
    "u" / Bytes(16),
    "tail" / Int32ul,
)
SELECT_LAYOUT = ConfigLayout(select_config, writable={"select", "subsel"}, section=S_5_8_4)
STRINGS = {(1, 0): b"pyvirtio-tablet", (2, 0): b"SN42"}


class SelectDevice(VirtioDevice):
    """select/subsel choose what ``size`` and ``u`` read (as virtio-input's config)."""

    device_id = DeviceId.VIRTIO_ID_INPUT
    queue_max_sizes = (8,)
    config_layout = SELECT_LAYOUT

    def __init__(self) -> None:
        super().__init__()
        self.select = self.subsel = 0
        self.writes: list[tuple[str, Any]] = []

    def config_values(self) -> dict[str, Any]:
        data = STRINGS.get((self.select, self.subsel), b"")
        return {
            "select": self.select,
            "subsel": self.subsel,
            "size": len(data),
            "reserved": bytes(5),
            "u": data.ljust(16, b"\0"),
            "tail": 0xA1B2C3D4,
        }

    def config_field_written(self, name: str, value: Any) -> None:
        self.writes.append((name, value))
        setattr(self, name, value)

    async def handle(self, queue_index, chain) -> int:
        if chain.reader().read() == b"config-change":
            assert self.active is not None
            self.active.config_changed()
        else:
            assert self.active is not None
            self.active.set_needs_reset("the backing store went away")
        return 0


def test_layout_fields_and_offsets() -> None:
    f = SELECT_LAYOUT.field("u")
    assert (f.offset, f.size, f.writable, f.integer) == (8, 16, False, False)
    assert SELECT_LAYOUT.field("select").writable and SELECT_LAYOUT.size == 28
    assert [x.name for x in SELECT_LAYOUT.fields_in(1, 2)] == ["subsel", "size"]
    with pytest.raises(ValueError, match="nope"):
        ConfigLayout(select_config, writable={"nope"}, section=S_5_8_4)


def test_stateful_config_reads_any_range_and_writes_merge(caplog) -> None:
    dev = SelectDevice()
    assert dev.config_size == 28 and dev.read_config(2, 1) == b"\0"
    dev.write_config(0, b"\x01")  # select = ID_NAME
    assert dev.read_config(2, 1) == bytes([15])
    assert dev.read_config(8, 15) == b"pyvirtio-tablet"
    assert dev.read_config(11, 3) == b"irt"  # any offset and width inside the space
    assert dev.read_config(24, 4) == (0xA1B2C3D4).to_bytes(4, "little")
    dev.write_config(0, b"\x02\x00")  # select + subsel in one access
    assert dev.read_config(8, 4) == b"SN42"
    assert dev.writes[-2:] == [("select", 2), ("subsel", 0)]
    with caplog.at_level(logging.WARNING):
        dev.write_config(2, b"\x63")  # size is read-only: ignored, logged by name
    assert "read-only configuration field size" in caplog.text
    assert dev.read_config(2, 1) == bytes([4])
    dev.write_config(0, dev.config_bytes())  # writing the image back changes nothing
    assert "tail" not in caplog.text
    for offset, size in ((27, 2), (28, 1), (-1, 1)):
        with pytest.raises(ConfigAccessError):
            dev.read_config(offset, size)
    with pytest.raises(ConfigAccessError):
        dev.write_config(26, b"\0\0\0")


def _memory() -> GuestMemory:
    buf = bytearray(MEM)
    return GuestMemory([MemoryRegion(0, MEM, memoryview(buf), _owner=buf)])


def _mmio_start(t: MmioTransport, memory: GuestMemory, features: int) -> DriverQueue:
    t.write(R_.VIRTIO_MMIO_STATUS, 4, S.ACKNOWLEDGE)
    t.write(R_.VIRTIO_MMIO_STATUS, 4, S.ACKNOWLEDGE | S.DRIVER)
    for sel in (0, 1):
        t.write(R_.VIRTIO_MMIO_DRIVER_FEATURES_SEL, 4, sel)
        t.write(R_.VIRTIO_MMIO_DRIVER_FEATURES, 4, features >> (32 * sel) & 0xFFFFFFFF)
    t.write(R_.VIRTIO_MMIO_STATUS, 4, S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK)
    dq = DriverQueue(memory, 8, base=0x10000, event_idx=True, data_size=0x8000)
    t.write(R_.VIRTIO_MMIO_QUEUE_SEL, 4, 0)
    t.write(R_.VIRTIO_MMIO_QUEUE_NUM, 4, 8)
    for lo, addr in (
        (R_.VIRTIO_MMIO_QUEUE_DESC_LOW, dq.desc_addr),
        (R_.VIRTIO_MMIO_QUEUE_DRIVER_LOW, dq.driver_addr),
        (R_.VIRTIO_MMIO_QUEUE_DEVICE_LOW, dq.device_addr),
    ):
        t.write(lo, 4, addr)
    t.write(R_.VIRTIO_MMIO_QUEUE_READY, 4, 1)
    t.write(R_.VIRTIO_MMIO_STATUS, 4, S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK)
    assert not t.errors, t.errors
    return dq


VERSION_1_EVENT_IDX = 1 << 32 | 1 << 29


def test_mmio_config_byte_reads_and_select_write() -> None:
    dev = SelectDevice()
    t = MmioTransport(dev, _memory())
    base = int(R_.VIRTIO_MMIO_CONFIG)
    t.write(base, 1, 1)  # select = 1
    assert t.read(base + 2, 1) == 15
    name = bytes(t.read(base + 8 + i, 1) for i in range(15))
    assert name == b"pyvirtio-tablet"
    assert t.read(base + 8, 4) == int.from_bytes(b"pyvi", "little")
    assert t.read(base + 24, 4) == 0xA1B2C3D4 and not t.errors
    assert t.read(base + 26, 4) == 0  # misaligned: a typed error, no reset
    assert t.read(base + 28, 1) == 0  # beyond the 28-byte space
    assert all(isinstance(e, MmioAccessError) for e in t.errors) and len(t.errors) == 2
    assert not t.read(R_.VIRTIO_MMIO_STATUS, 4) & S.DEVICE_NEEDS_RESET


async def test_mmio_device_initiated_config_change_and_needs_reset() -> None:
    memory, dev = _memory(), SelectDevice()
    levels: list[bool] = []
    async with trio.open_nursery() as nursery:
        t = MmioTransport(
            dev, memory, levels.append, on_driver_ok=lambda a: nursery.start_soon(dev.run, a)
        )
        dq = _mmio_start(t, memory, VERSION_1_EVENT_IDX)
        dq.add([b"config-change"], [])
        dq.publish()
        t.write(R_.VIRTIO_MMIO_QUEUE_NOTIFY, 4, 0)
        with trio.fail_after(5):
            while not t.read(R_.VIRTIO_MMIO_INTERRUPT_STATUS, 4) & INT_CONFIG:
                await trio.sleep(0.001)  # the device runs in this loop's other task
        assert t.read(R_.VIRTIO_MMIO_CONFIG_GENERATION, 4) == 1 and levels[-1]
        assert not t.read(R_.VIRTIO_MMIO_STATUS, 4) & S.DEVICE_NEEDS_RESET
        t.write(R_.VIRTIO_MMIO_INTERRUPT_ACK, 4, INT_CONFIG | INT_VRING)
        dq.add([b"fail"], [])
        dq.publish()
        t.write(R_.VIRTIO_MMIO_QUEUE_NOTIFY, 4, 0)
        with trio.fail_after(5):
            while not t.read(R_.VIRTIO_MMIO_STATUS, 4) & S.DEVICE_NEEDS_RESET:
                await trio.sleep(0.001)
        assert t.read(R_.VIRTIO_MMIO_INTERRUPT_STATUS, 4) & INT_CONFIG  # §2.1.2.1
        assert isinstance(t.errors[-1], DeviceNeedsReset) and dev.needs_reset
        t.write(R_.VIRTIO_MMIO_STATUS, 4, 0)  # the reset stops the device's run()
        with trio.fail_after(5):
            await trio.testing.wait_all_tasks_blocked()
        assert dev.active is None and not dev.needs_reset
        nursery.cancel_scope.cancel()


async def test_vhost_user_device_initiated_events() -> None:
    device = SelectDevice()
    server = VhostUserServer(device)
    ram = GuestRam(4 * MiB)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.serve_connection, b)
            fe = VhostUserFrontend(a)
            await fe.negotiate()
            await fe.request(R.SET_BACKEND_REQ_FD, None, [theirs.fileno()], need_reply=True)
            theirs.close()
            # Stateful config through SET_CONFIG / GET_CONFIG.
            await fe.request(R.SET_CONFIG, ConfigSpace(0, 0, b"\x02"), need_reply=True)
            assert (await fe.get_config(0, 28))[8:12] == b"SN42"
            await fe.set_mem_table(ram)
            vq = await fe.setup_vring(0, ram, size=8)
            vq.driver.add([b"config-change"], [])
            vq.publish_and_kick()
            await vq.wait_used()
            request, _flags, size = HEADER.unpack(ours.recv(HEADER.size))
            assert (request, size) == (BackendRequest.CONFIG_CHANGE_MSG, 0)
            vq.driver.add([b"fail"], [])
            vq.publish_and_kick()
            with trio.fail_after(5):
                while not vq.error_signalled():
                    await trio.sleep(0.01)
            assert await fe.get_u64(R.GET_STATUS) & S.DEVICE_NEEDS_RESET
            request, _flags, _size = HEADER.unpack(ours.recv(HEADER.size))
            assert request == BackendRequest.CONFIG_CHANGE_MSG  # §2.1.2.1
            await fe.aclose()
            nursery.cancel_scope.cancel()
    finally:
        ours.close()
        ram.close()


# -- queue roles -----------------------------------------------------------------------------
async def test_buffers_role_waits_for_the_driver_without_polling() -> None:
    dev = VirtioRng()
    async with DeviceHarness.start(dev, queue_size=16) as h:
        with trio.fail_after(2):  # would never return if the device polled the ring
            await trio.testing.wait_all_tasks_blocked()
        assert dev.buffers_filled == 0
        tokens = [h.submit(0, writable=[n]) for n in (1, 100, 4096)]
        used = [await h.wait_used(0, t) for t in tokens]
        assert [u.written for u in used] == [1, 100, 4096]
        assert len({u.data for u in used}) == 3 and dev.bytes_served == 4197
        with trio.fail_after(2):
            await trio.testing.wait_all_tasks_blocked()
        assert h.queues[0].inflight == 0


async def test_buffers_role_notifies_as_event_idx_asks() -> None:
    dev = VirtioRng()
    async with DeviceHarness.start(dev, queue_size=16) as h:
        dq, notifier = h.queues[0], h.notifiers[0]
        dq.set_interrupts(True, event=2)  # used_event: interrupt once the 3rd is used
        for _ in range(3):
            dq.add([], [8])
        dq.publish()
        notifier.kick()
        with trio.fail_after(2):
            await trio.testing.wait_all_tasks_blocked()
        assert len(dq.get_used()) == 3 and notifier.interrupts == 1
        dq.set_interrupts(False)
        dq.add([], [8])
        if dq.publish():
            notifier.kick()
        with trio.fail_after(2):
            await trio.testing.wait_all_tasks_blocked()
        assert len(dq.get_used()) == 1 and notifier.interrupts == 1  # suppressed


async def test_rng_readable_buffer_is_a_driver_error() -> None:
    dev = VirtioRng()
    async with DeviceHarness.start(dev, queue_size=16) as h:
        token = h.submit(0, readable=[b"x"], writable=[8])
        with pytest.raises(DescriptorChainError) as info:
            await h.wait_used(0, token)
        assert info.value.spec_section.number == "5.4.6.1" and dev.needs_reset


class Producer(VirtioDevice):
    """Data first, then a buffer (net receive's shape): ``push`` queues a message."""

    device_id = DeviceId.VIRTIO_ID_CONSOLE
    queue_max_sizes = (8, 8)
    queue_roles = (QueueRole.BUFFERS, QueueRole.REQUESTS)

    def __init__(self) -> None:
        super().__init__()
        self.send, self.receive = trio.open_memory_channel[bytes](16)

    async def fill_buffers(self, queue_index: int, buffers: BufferQueue) -> None:
        async for message in self.receive:
            chain = await buffers.next_buffer()
            buffers.complete(chain, chain.writer().write(message))

    async def handle(self, queue_index, chain) -> int:
        self.send.send_nowait(chain.reader().read().upper())
        return 0


async def test_roles_side_by_side_request_feeds_buffer_queue() -> None:
    dev = Producer()
    async with DeviceHarness.start(dev, queue_size=8) as h:
        assert dev.queue_role(0) is QueueRole.BUFFERS and dev.queue_role(1) is QueueRole.REQUESTS
        await h.request(1, [b"hello"])  # data, but no buffer posted yet: it waits
        with trio.fail_after(2):
            await trio.testing.wait_all_tasks_blocked()
        token = h.submit(0, writable=[16])
        used = await h.wait_used(0, token)
        assert used.data[: used.written] == b"HELLO"


def test_rng_is_small() -> None:
    """Issue 7: a new device is one small folder (virtio-rng in at most 60 lines)."""
    import virtio.devices.rng as pkg

    folder = Path(pkg.__file__).parent
    assert sum(len(p.read_text().splitlines()) for p in folder.glob("*.py")) <= 60


async def test_active_device_without_config_channel_says_so() -> None:
    active = ActiveDevice(_memory(), 0, {}, {})
    assert active.config_changed() is False


def test_mmio_synchronous_mode_runs_the_same_service_and_reset_stops_it() -> None:
    from virtio.transport.mmio import TrioRunner

    memory, dev = _memory(), VirtioRng()
    with TrioRunner() as runner:
        t = MmioTransport(dev, memory, runner=runner)
        dq = _mmio_start(t, memory, VERSION_1_EVENT_IDX)
        for n in (16, 32):
            dq.add([], [n])
        dq.publish()
        t.write(R_.VIRTIO_MMIO_QUEUE_NOTIFY, 4, 0)
        # Filled before the notify returned (settled), by the BUFFERS-role service.
        assert [u.written for u in dq.get_used()] == [16, 32]
        assert t.read(R_.VIRTIO_MMIO_INTERRUPT_STATUS, 4) == INT_VRING
        (run,) = dev._runs
        assert t.active is not None and t.active.services[0].parked
        t.write(R_.VIRTIO_MMIO_STATUS, 4, 0)  # reset: from this (vCPU) thread
        assert dev._runs == [] and all(done.is_set() for _, _, done in run._tasks.values())
        assert not t.errors


class RacedBuffers(VirtioDevice):
    """A ``BUFFERS`` device whose first look at the ring races the driver: the ring
    is empty when popped, and the driver posts before notifications are re-enabled."""

    device_id = DeviceId.VIRTIO_ID_CONSOLE
    queue_max_sizes = (8,)
    queue_roles = (QueueRole.BUFFERS,)

    def __init__(self) -> None:
        super().__init__()
        self.race: Any = None
        self.ready = trio.Event()
        self.took = trio.Event()

    async def fill_buffers(self, queue_index: int, buffers: BufferQueue) -> None:
        await self.ready.wait()
        queue, real_pop, raced = buffers.queue, buffers.queue.pop, []

        def pop():
            if not raced:
                raced.append(True)
                self.race()  # the driver posts just after the device found nothing
                return None
            return real_pop()

        queue.pop = pop
        try:
            chain = await buffers.next_buffer()
        finally:
            del queue.pop
        buffers.complete(chain, 0)
        self.took.set()
        await trio.sleep_forever()


@pytest.mark.parametrize(("packed", "event_idx"), [(False, False), (True, False), (True, True)])
async def test_buffer_found_on_re_enable_leaves_notifications_off(packed, event_idx) -> None:
    """§2.7.10 / §2.8.10: a device that finds buffers when it re-enables notifications
    takes them and turns notifications off again, so the driver's next post needs no
    kick (before: they stayed on and every post cost a notification)."""
    dev = RacedBuffers()
    async with DeviceHarness.start(dev, queue_size=8, packed=packed, event_idx=event_idx) as h:
        dq = h.queues[0]

        def race() -> None:
            dq.add([], [8])
            dq.publish()

        dev.race = race
        dev.ready.set()
        with trio.fail_after(5):
            await dev.took.wait()
        assert len(dq.get_used()) == 1
        dq.add([], [8])
        assert dq.publish() is False  # notifications are off: no kick wanted
