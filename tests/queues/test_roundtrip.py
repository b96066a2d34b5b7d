"""Driver <-> device round trips over split (§2.7) and packed (§2.8) rings.

Random chain shapes, sizes, indirect use and notification settings: every buffer
the driver offers comes back exactly once with the bytes the device wrote, and
notifications happen exactly when the suppression rules require them.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtio.testing.driver import QueueFull
from virtio.testing.queues import make_queue_pair

chain_shape = st.tuples(
    st.lists(st.binary(min_size=1, max_size=40), min_size=0, max_size=4),  # readable
    st.lists(st.integers(1, 48), min_size=0, max_size=4),  # writable lengths
    st.booleans(),  # indirect
).filter(lambda t: t[0] or t[1])

ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), chain_shape),
        st.tuples(st.just("publish"), st.none()),
        st.tuples(st.just("device"), st.integers(1, 8)),  # pop up to n, complete some
        st.tuples(st.just("complete"), st.integers(0, 8)),
        st.tuples(st.just("reap"), st.none()),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    packed=st.booleans(),
    event_idx=st.booleans(),
    size_log=st.integers(0, 5),
    program=ops,
    reorder=st.booleans(),
)
def test_random_round_trip(packed, event_idx, size_log, program, reorder):
    size = 1 << size_log
    pair = make_queue_pair(size, packed=packed, event_idx=event_idx)
    drv, dev = pair.driver, pair.device
    offered: dict[int, tuple[list[bytes], list[int]]] = {}
    published: set[int] = set()
    unpublished: list[int] = []
    popped = []  # chains the device holds
    returned: dict[int, bytes] = {}
    expected: dict[int, bytes] = {}

    def device_pop(n):
        for chain in dev.pop_batch(n):
            assert chain.head in published, "device saw a buffer the driver never published"
            published.discard(chain.head)
            readable, writable = offered[chain.head]
            assert chain.reader().read() == b"".join(readable)
            assert chain.writable_len == sum(writable)
            popped.append(chain)

    def complete(n):
        nonlocal popped
        batch = popped[::-1][:n] if reorder else popped[:n]
        for chain in batch:
            popped.remove(chain)
        completions = []
        for chain in batch:
            payload = bytes((chain.head + i) & 0xFF for i in range(chain.writable_len))
            w = chain.writer()
            w.write(payload)
            expected[chain.head] = payload
            completions.append((chain, w.written))
        if completions:
            dev.add_used_batch(completions)
            dev.needs_notification()

    def reap():
        for used in drv.get_used():
            assert used.id not in returned, "buffer returned twice"
            assert used.written == len(expected[used.id])
            assert used.data == expected[used.id]
            returned[used.id] = used.data
            del offered[used.id]

    for op, arg in program:
        if op == "add":
            readable, writable, ind = arg
            try:
                token = drv.add(readable, writable, use_indirect=ind)
            except QueueFull:
                continue
            assert token not in offered
            offered[token] = (readable, writable)
            returned.pop(token, None)
            unpublished.append(token)
        elif op == "publish":
            drv.publish()
            published.update(unpublished)
            unpublished.clear()
        elif op == "device":
            device_pop(arg)
        elif op == "complete":
            complete(arg)
        else:
            reap()
    # Drain: everything published comes back exactly once.
    drv.publish()
    published.update(unpublished)
    device_pop(size)
    complete(len(popped))
    reap()
    assert not offered, f"buffers never returned: {sorted(offered)}"
    assert dev.pop() is None
    pair.close()


@settings(max_examples=60, deadline=None)
@given(
    packed=st.booleans(),
    used_event=st.integers(0, 40),
    completions=st.integers(1, 40),
)
def test_used_event_notifies_exactly_when_idx_passes_it(packed, used_event, completions):
    """§2.7.7.2 devicenormative (split): with EVENT_IDX the device MUST notify when the
    used idx it wrote an entry at equals used_event, and SHOULD NOT otherwise.
    §2.8.10 (packed): the same with the DESC event (offset | wrap counter)."""
    size = 64
    pair = make_queue_pair(size, packed=packed, event_idx=True)
    drv, dev = pair.driver, pair.device
    if packed:
        # off_wrap names the ring position (wrap counter 1 on the first lap).
        drv.set_interrupts(True, event=used_event | (1 << 15))
    else:
        drv.set_interrupts(True, event=used_event)
    for _ in range(completions):
        drv.add([b"x"], [])
    drv.publish()
    chains = dev.pop_batch(completions)
    notified_at = []
    for i, chain in enumerate(chains):
        dev.add_used(chain, 0)
        if dev.needs_notification():
            notified_at.append(i)
    # Exactly at the entry written at index used_event, and nowhere else.
    want = {used_event} if used_event < completions else set()
    assert set(notified_at) == want
    pair.close()


def test_flags_based_suppression(packed):
    """§2.7.7.2 without EVENT_IDX: flags 0 -> MUST notify; 1 -> SHOULD NOT.
    §2.8.10 packed: ENABLE -> notify, DISABLE -> not."""
    pair = make_queue_pair(8, packed=packed, event_idx=False)
    drv, dev = pair.driver, pair.device
    for _ in range(4):
        drv.add([b"a"], [4])
    drv.publish()
    chains = dev.pop_batch(4)
    drv.set_interrupts(False)
    dev.add_used(chains[0], 0)
    assert not dev.needs_notification()
    drv.set_interrupts(True)
    dev.add_used(chains[1], 0)
    assert dev.needs_notification()
    # Nothing new used since the last decision: no notification.
    assert not dev.needs_notification()
    pair.close()


def test_avail_notification_suppression_round_trip(packed):
    """§2.7.10 / §2.8.10: the driver kicks iff the device asked for it."""
    for event_idx in (False, True):
        pair = make_queue_pair(16, packed=packed, event_idx=event_idx)
        drv, dev = pair.driver, pair.device
        drv.add([b"a"], [])
        assert drv.publish()  # initially notifications are enabled
        dev.disable_notification()
        assert len(dev.pop_batch()) == 1
        drv.add([b"b"], [])
        kicked = drv.publish()
        if not event_idx or packed:
            assert not kicked  # flags / DISABLE
        # Re-enabling finds the buffer that raced in (no lost wake-up).
        assert dev.enable_notification() is True
        assert len(dev.pop_batch()) == 1
        assert dev.enable_notification() is False
        drv.add([b"c"], [])
        assert drv.publish(), "driver must notify after the device re-enabled"
        pair.close()
