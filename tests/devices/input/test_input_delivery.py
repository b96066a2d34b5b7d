"""How an injected group reaches the eventq's used ring (the latency path, issue 11 §5).

When the driver has posted buffers for a whole group, ``inject`` on the device's loop
thread puts it in the used ring before it returns (no task switch, no timer); from
another thread, the loop's first callback does (no further scheduling).  Groups still
go out whole and in order (devicenormative §5.8.6.2): a group never overtakes one
that waits for buffers.
"""

from __future__ import annotations

import threading

import trio
import trio.testing
from evdev import ecodes as e

from virtio.devices.input import VirtioInput, builtin
from virtio.devices.input.device import EVENT
from virtio.testing.harness import DeviceHarness

SYN = (e.EV_SYN, e.SYN_REPORT, 0)


def _events(used) -> list[tuple[int, int, int]]:
    return [EVENT.unpack(u.data[:8]) for u in used]


async def test_inject_on_the_loop_fills_the_used_ring_before_it_returns() -> None:
    dev = VirtioInput(builtin("keyboard"))
    async with DeviceHarness.start(dev) as h:
        for _ in range(6):
            h.submit(0, writable=[8])
        await trio.testing.wait_all_tasks_blocked()  # the eventq task is parked
        interrupts = h.notifiers[0].interrupts
        assert dev.inject([(e.EV_KEY, e.KEY_A, 1)]) == 1
        # No await since inject: nothing else ran, yet the group is in the used ring
        # and the driver was notified.
        assert _events(h.queues[0].get_used()) == [(e.EV_KEY, e.KEY_A, 1), SYN]
        assert h.notifiers[0].interrupts == interrupts + 1
        assert dev.held_events == 0 and dev.groups_delivered == 1
        # Two groups in one call, both fitting: both delivered at once, in order.
        assert dev.inject([(e.EV_KEY, e.KEY_A, 0), SYN, (e.EV_KEY, e.KEY_B, 1)]) == 2
        assert _events(h.queues[0].get_used()) == [
            (e.EV_KEY, e.KEY_A, 0), SYN, (e.EV_KEY, e.KEY_B, 1), SYN
        ]  # fmt: skip
        assert h.driver_errors == []


async def test_inject_from_another_thread_is_delivered_by_the_loops_first_callback() -> None:
    dev = VirtioInput(builtin("keyboard"))
    async with DeviceHarness.start(dev) as h:
        for _ in range(2):
            h.submit(0, writable=[8])
        await trio.testing.wait_all_tasks_blocked()
        token = trio.lowlevel.current_trio_token()
        seen: list[list[tuple[int, int, int]]] = []

        def injector() -> None:
            dev.inject([(e.EV_KEY, e.KEY_Q, 1)])
            # Runs on the loop right after the callback inject queued (FIFO): the
            # group must already be in the used ring, without the eventq task's turn.
            seen.append(
                trio.from_thread.run_sync(lambda: _events(h.queues[0].get_used()), trio_token=token)
            )

        thread = threading.Thread(target=injector)
        thread.start()
        await trio.to_thread.run_sync(thread.join)
        assert seen == [[(e.EV_KEY, e.KEY_Q, 1), SYN]]


async def test_a_group_that_fits_never_overtakes_one_waiting_for_buffers() -> None:
    dev = VirtioInput(builtin("keyboard"))
    async with DeviceHarness.start(dev) as h:
        first = h.submit(0, writable=[8])  # room for one event only
        await trio.testing.wait_all_tasks_blocked()
        assert dev.inject([(e.EV_KEY, e.KEY_A, 1)]) == 1  # two events: held
        assert dev.inject([SYN]) == 1  # one event: would fit, but must wait its turn
        await trio.testing.wait_all_tasks_blocked()
        assert h.queues[0].get_used() == [] and dev.held_events == 3
        tokens = [first] + [h.submit(0, writable=[8]) for _ in range(2)]
        used = [await h.wait_used(0, t) for t in tokens]
        assert _events(used) == [(e.EV_KEY, e.KEY_A, 1), SYN, SYN]
        assert dev.held_events == 0
        # Back to parked: the next group goes out inside inject again.
        h.submit(0, writable=[8])
        h.submit(0, writable=[8])
        await trio.testing.wait_all_tasks_blocked()
        dev.inject([(e.EV_KEY, e.KEY_A, 0)])
        assert _events(h.queues[0].get_used()) == [(e.EV_KEY, e.KEY_A, 0), SYN]


async def test_a_bad_buffer_found_at_inject_fails_the_queue_not_the_caller() -> None:
    """A too-small eventq buffer seen by ``inject``'s delivery is given back; the
    eventq task meets it and reports the driver error (§5.8.6.1), as before."""
    dev = VirtioInput(builtin("keyboard"))
    async with DeviceHarness.start(dev) as h:
        h.submit(0, writable=[4])
        h.submit(0, writable=[8])
        await trio.testing.wait_all_tasks_blocked()
        assert dev.inject([(e.EV_KEY, e.KEY_Q, 1)]) == 1  # does not raise
        with trio.fail_after(5):
            while not h.driver_errors:
                await h.notifiers[0].wait_interrupt()
        assert "5.8.6.1" in str(h.driver_errors[0])
        assert h.queues[0].get_used() == []
