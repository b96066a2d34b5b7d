"""The native group delivery (virtio/native/input_deliver.c) against the Python path.

``VirtioInput`` delivers a group that fits the posted buffers with one native call;
its Python delivery (``BufferQueue.next_buffers_nowait`` + ``complete_batch``) is the
reference.  The same scripted driver runs against both (``native_delivery`` on and
off) and guest memory -- descriptor tables, available and used rings, event buffers,
``avail_event`` -- must be equal byte for byte after every step, with the same
notifications (§2.7.7 / §2.8.10, EVENT_IDX on and off), split and packed rings, over
many ring wraps.  Anything the native call does not handle (a buffer that is
readable or shorter than one event, drivernormative §5.8.6.1; a malformed chain)
leaves the ring as it was and takes the Python path, which reports the driver error.
"""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing
from evdev import ecodes as e

from virtio.devices.input import VirtioInput, builtin
from virtio.devices.input.device import EVENT
from virtio.devices.input.native import FALLBACK
from virtio.errors import DescriptorChainError
from virtio.native import ffi, lib
from virtio.testing.driver import QueueFull
from virtio.testing.harness import DeviceHarness
from virtio.testing.queues import make_queue_pair
from virtio.transport.vhost_user.inflight import SplitInflightQueue, split_region_size

SYN = (e.EV_SYN, e.SYN_REPORT, 0)
KEYS = [e.KEY_A, e.KEY_B, e.KEY_LEFTSHIFT, e.KEY_ENTER, e.KEY_SPACE]
SHAPES = [
    {"writable": [8]},
    {"writable": [16]},
    {"writable": [4, 4]},  # one event across two descriptors
    {"writable": [3, 5, 8]},
    {"writable": [8], "use_indirect": True},
    {"writable": [2, 2, 2, 2], "use_indirect": True},
]
"""Buffer layouts the driver posts (all valid: device-writable, >= 8 bytes)."""
QUEUE_SIZE = 16
STEPS = 80


async def _scripted_run(
    *, native: bool, packed: bool, event_idx: bool, inflight: bool = False
) -> tuple[list, VirtioInput]:
    """Run one seeded driver script; per step: guest memory, dirty log, vhost-user
    inflight region (``inflight``: split rings), used buffers, interrupts and
    statistics."""
    dev = VirtioInput(builtin("keyboard"))
    dev.native_delivery = native
    rng = random.Random(2026)
    steps = []
    async with DeviceHarness.start(
        dev, packed=packed, event_idx=event_idx, queue_size=QUEUE_SIZE, data_size=1 << 16
    ) as h:
        dq = h.queues[0]
        total = len(h.memory.buffers[0])
        log = bytearray((total >> 12) // 8 + 1)
        h.memory.set_dirty_log(memoryview(log))
        region = bytearray(split_region_size(QUEUE_SIZE))
        if inflight:
            await trio.testing.wait_all_tasks_blocked()  # the eventq service is running
            area = SplitInflightQueue(memoryview(region), QUEUE_SIZE)
            area.initialize(0)
            dev._buffers.queue.inflight = area
        for step in range(STEPS):
            # Mostly a full ring; sometimes a few buffers only (groups then wait).
            for _ in range(QUEUE_SIZE if rng.random() < 0.85 else rng.randrange(3)):
                try:
                    h.submit(0, **SHAPES[rng.randrange(len(SHAPES))])
                except QueueFull:
                    break
            await trio.testing.wait_all_tasks_blocked()
            mode = rng.randrange(4)
            if mode == 0:
                dq.set_interrupts(False)
            elif mode == 3 and event_idx and not packed:
                dq.set_interrupts(True, event=(dq.used_event_index + 2) & 0xFFFF)
            else:
                dq.set_interrupts(True)
            log[:] = bytes(len(log))
            events = []
            for _ in range(rng.randrange(1, 3)):
                key = KEYS[rng.randrange(len(KEYS))]
                events += [(e.EV_KEY, key, 1)] * rng.randrange(1, 4) + [SYN]
            dev.inject(events)
            await trio.testing.wait_all_tasks_blocked()
            used = [(u.id, u.written, u.data) for u in dq.get_used()]
            steps.append(
                (
                    step,
                    h.memory.read(0, total),
                    bytes(log),
                    bytes(region),
                    used,
                    h.notifiers[0].interrupts,
                    {k: v for k, v in dev.statistics().items() if k != "groups_native"},
                    h.driver_errors[:],
                )
            )
    return steps, dev


@pytest.mark.parametrize(
    ("packed", "event_idx", "inflight"),
    [
        (False, False, False),
        (False, True, False),
        (True, False, False),
        (True, True, False),
        (False, True, True),
    ],
    ids=["split", "split-event-idx", "packed", "packed-event-idx", "split-event-idx-inflight"],
)
async def test_native_and_python_delivery_leave_guest_memory_equal(
    packed: bool, event_idx: bool, inflight: bool
) -> None:
    args = {"packed": packed, "event_idx": event_idx, "inflight": inflight}
    native, ndev = await _scripted_run(native=True, **args)
    python, pdev = await _scripted_run(native=False, **args)
    assert len(native) == len(python) == STEPS
    for a, b in zip(native, python, strict=True):
        step = a[0]
        if a[1] != b[1]:
            first = next(i for i in range(len(a[1])) if a[1][i] != b[1][i])
            pytest.fail(f"step {step}: guest memory differs first at {first:#x}")
        assert a[2:] == b[2:], f"step {step}"
    # The script exercised what it claims: the native call delivered most groups,
    # some groups waited for buffers (the eventq task's Python path), the ring
    # wrapped many times, the driver was notified and not every time.
    assert ndev.groups_native > STEPS // 2 and ndev._native.fallbacks == 0
    assert pdev.groups_native == 0
    stats = native[-1][6]
    assert stats["groups"] > ndev.groups_native  # some waited
    assert stats["events"] > 8 * QUEUE_SIZE and stats["groups_dropped"] == 0
    assert 0 < native[-1][5] < stats["groups"]
    assert all(not s[7] for s in native)
    if inflight:  # the region saw every batch: chains counted, none left in flight
        area = SplitInflightQueue(memoryview(bytearray(native[-1][3])), QUEUE_SIZE)
        assert area.used_idx == stats["events"] and area.in_flight() == []
    events = [EVENT.unpack(d[:8]) for s in native for _, length, d in s[4]]
    assert len(events) == stats["events"] and events.count(SYN) == stats["groups"]
    assert all(length == EVENT.size for s in native for _, length, _ in s[4])


@pytest.mark.parametrize(
    "shape",
    [
        {"writable": [4]},
        {"readable": [bytes(8)], "writable": [8]},
        {"writable": [2, 4], "use_indirect": True},
    ],
    ids=["short", "readable", "short-indirect"],
)
async def test_a_buffer_the_spec_forbids_takes_the_python_path(shape: dict) -> None:
    """drivernormative §5.8.6.1: eventq buffers MUST be device-writable and at least 8
    bytes: the native call declines, the Python path fails the queue as before."""
    results = []
    for native in (True, False):
        dev = VirtioInput(builtin("keyboard"))
        dev.native_delivery = native
        async with DeviceHarness.start(dev, queue_size=QUEUE_SIZE, data_size=1 << 16) as h:
            h.submit(0, writable=[8])
            h.submit(0, **shape)
            await trio.testing.wait_all_tasks_blocked()
            dev.inject([(e.EV_KEY, e.KEY_A, 1)])
            await trio.testing.wait_all_tasks_blocked()
            total = len(h.memory.buffers[0])
            results.append(
                (h.memory.read(0, total), [str(x) for x in h.driver_errors], dev.groups_delivered)
            )
        assert (dev._native.fallbacks > 0) == native  # inject's attempt, the task's
        assert dev.groups_native == 0
    assert results[0] == results[1]
    errors = results[0][1]
    assert len(errors) == 1 and "5.8.6.1" in errors[0]


def _chain_state(pair) -> tuple:
    q = pair.device
    return q.state(), q.broken, q.statistics()


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_a_malformed_chain_leaves_the_ring_as_it_was(packed: bool) -> None:
    """A chain the ring core rejects (a buffer outside guest memory, §2.7.5 /
    §2.8.4) in the middle of a group: nothing is popped or written, the queue is not
    broken, and the Python path's pop reports the error."""
    pair = make_queue_pair(QUEUE_SIZE, packed=packed, event_idx=True)
    try:
        drv = pair.driver
        drv.add(writable=[8])
        bad = drv.add(writable=[8])
        drv.publish()
        slot = 1 if packed else bad
        drv.write_desc(slot, 1 << 40, 8, 2 | (0x80 if packed else 0), bad if packed else 0)
        before = _chain_state(pair)
        memory = pair.memory.read(0, len(pair.memory.buffers[0]))
        out = ffi.new("struct input_delivery *")
        events = EVENT.pack(e.EV_KEY, e.KEY_A, 1) + EVENT.pack(*SYN)
        assert lib.input_deliver(pair.device.native, events, 2, out) == FALLBACK
        assert _chain_state(pair) == before
        assert pair.memory.read(0, len(pair.memory.buffers[0])) == memory
        assert pair.device.pop() is not None
        with pytest.raises(DescriptorChainError, match="not inside guest memory"):
            pair.device.pop()
    finally:
        pair.close()


def test_too_few_buffers_pop_nothing_and_a_fitting_group_goes_out_whole() -> None:
    pair = make_queue_pair(QUEUE_SIZE, event_idx=True)
    try:
        drv = pair.driver
        tokens = [drv.add(writable=[8]) for _ in range(2)]
        drv.publish()
        out = ffi.new("struct input_delivery *")
        group = [(e.EV_KEY, e.KEY_A, 1), (e.EV_KEY, e.KEY_B, 1), SYN]
        packed = b"".join(EVENT.pack(*ev) for ev in group)
        before = _chain_state(pair)
        assert lib.input_deliver(pair.device.native, packed, 3, out) == 0
        assert _chain_state(pair) == before and drv.get_used() == []
        tokens.append(drv.add(writable=[8]))
        drv.publish()
        drv.set_interrupts(True)
        assert lib.input_deliver(pair.device.native, packed, 3, out) == 3
        assert out.notify == 1 and out.stored_ns > 0
        used = drv.get_used()
        assert [u.id for u in used] == tokens
        assert [EVENT.unpack(u.data) for u in used] == group
        assert [u.written for u in used] == [8, 8, 8]
        # More events than the native path takes at once: declined, nothing popped.
        big = lib.INPUT_DELIVER_MAX + 1
        assert lib.input_deliver(pair.device.native, packed * big, big, out) == FALLBACK
    finally:
        pair.close()


async def test_a_malformed_chain_is_a_driver_error_not_an_exception_in_inject() -> None:
    """A hostile driver's chain met while ``inject`` delivers (on the loop, or in the
    loop's callback for another thread) is reported like any driver error (the
    eventq task raises it: DEVICE_NEEDS_RESET), with either delivery path; the
    injector sees no exception and the loop keeps running."""
    results = []
    for native, from_thread in ((True, False), (False, False), (True, True)):
        dev = VirtioInput(builtin("keyboard"))
        dev.native_delivery = native
        async with DeviceHarness.start(dev, queue_size=QUEUE_SIZE, data_size=1 << 16) as h:
            dq = h.queues[0]
            dq.add(writable=[8])
            bad = dq.add(writable=[8])
            dq.publish()
            dq.write_desc(bad, 1 << 40, 8, 2)  # VIRTQ_DESC_F_WRITE, outside guest memory
            await trio.testing.wait_all_tasks_blocked()
            group = [(e.EV_KEY, e.KEY_A, 1)]
            if from_thread:
                assert await trio.to_thread.run_sync(dev.inject, group) == 1
            else:
                assert dev.inject(group) == 1
            await trio.testing.wait_all_tasks_blocked()
            assert dev.needs_reset
            total = len(h.memory.buffers[0])
            results.append((h.memory.read(0, total), [str(x) for x in h.driver_errors]))
    assert results[0] == results[1] == results[2]
    errors = results[0][1]
    assert len(errors) == 1 and "not inside guest memory" in errors[0]


def test_a_stopping_vhost_user_ring_is_not_touched() -> None:
    """Once the vhost-user handler stops a ring (GET_VRING_BASE: its ``_RingQueue``
    hands out no chain from then on), the native call must not pop or use any: it
    declines, and the Python path finds no buffers."""
    from types import SimpleNamespace

    from virtio.devices.input.native import NativeDelivery
    from virtio.testing.harness import MemoryNotifier
    from virtio.transport.vhost_user.handler import _RingQueue

    pair = make_queue_pair(QUEUE_SIZE, event_idx=True)
    try:
        drv = pair.driver
        for _ in range(2):
            drv.add(writable=[8])
        drv.publish()
        queue = _RingQueue(pair.memory, drv.state())
        buffers = SimpleNamespace(queue=queue, gate=None, completed=0, notifier=MemoryNotifier())
        events = EVENT.pack(e.EV_KEY, e.KEY_A, 1) + EVENT.pack(*SYN)
        native = NativeDelivery()
        queue.stopping = True
        before = queue.state()
        assert native.deliver(buffers, events, 2) == FALLBACK  # type: ignore[arg-type]
        assert queue.state() == before and drv.get_used() == []
        assert queue.available_chains(2) == 0  # what the Python path then sees
        queue.stopping = False
        assert native.deliver(buffers, events, 2) == 2  # type: ignore[arg-type]
        assert [u.written for u in drv.get_used()] == [8, 8] and buffers.completed == 2
    finally:
        pair.close()


async def test_a_group_behind_one_that_waited_goes_out_natively_from_the_task() -> None:
    """The eventq task delivers what waited: the group that needed the driver's kick
    through the Python path (its buffers were popped when they came), the group
    queued behind it, whose buffers are then there, with the native call."""
    memories = []
    for native in (True, False):
        dev = VirtioInput(builtin("keyboard"))
        dev.native_delivery = native
        async with DeviceHarness.start(dev, queue_size=QUEUE_SIZE, data_size=1 << 16) as h:
            h.submit(0, writable=[8])
            await trio.testing.wait_all_tasks_blocked()
            assert dev.inject([(e.EV_KEY, e.KEY_A, 1), SYN, (e.EV_KEY, e.KEY_A, 0), SYN]) == 2
            await trio.testing.wait_all_tasks_blocked()
            assert dev.held_events == 4  # the first group waits for a second buffer
            for _ in range(3):
                h.submit(0, writable=[8])
            await trio.testing.wait_all_tasks_blocked()
            got = [EVENT.unpack(u.data[:8]) for u in h.queues[0].get_used()]
            assert got == [(e.EV_KEY, e.KEY_A, 1), SYN, (e.EV_KEY, e.KEY_A, 0), SYN]
            assert dev.groups_delivered == 2 and dev.groups_native == (1 if native else 0)
            memories.append(h.memory.read(0, len(h.memory.buffers[0])))
    assert memories[0] == memories[1]
