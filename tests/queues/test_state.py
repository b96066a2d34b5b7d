"""Queue state save/restore (vhost-user GET/SET_VRING_BASE, migration): plain,
untrusted data validated on restore."""

from __future__ import annotations

import pytest

from virtio.errors import QueueConfigError
from virtio.queues import QueueState, Virtqueue
from virtio.testing.queues import make_queue_pair


def test_save_restore_continues_where_it_stopped(packed):
    pair = make_queue_pair(4, packed=packed, event_idx=True)
    drv, q = pair.driver, pair.device
    done = []
    for round_ in range(3):  # wraps the 4-entry ring more than once
        tokens = [drv.add([bytes([round_, i])]) for i in range(3)]
        drv.publish()
        for chain in q.pop_batch(2):
            q.add_used(chain, 0)
        saved = q.state()
        q = Virtqueue.restore(pair.memory, QueueState.from_dict(saved.to_dict()))
        rest = q.pop_batch()
        assert [c.head for c in rest] == tokens[2:]
        q.add_used_batch([(c, 0) for c in rest])
        done.extend(u.id for u in drv.get_used())
        assert sorted(done[-3:]) == sorted(tokens)
    assert q.state().to_dict() == QueueState.from_dict(q.state().to_dict()).to_dict()


@pytest.mark.parametrize(
    "bad",
    [
        {"size": 0},
        {"size": 3},  # split rings are powers of 2
        {"size": 65536},
        {"desc_addr": -1},
        {"desc_addr": 1 << 64},
        {"last_avail_idx": 0x10000},
        {"next_avail": 8, "packed": True},
    ],
)
def test_restore_rejects_out_of_range_state(bad):
    data = QueueState(size=8, desc_addr=0, driver_addr=0x1000, device_addr=0x2000).to_dict()
    data.update(bad)
    with pytest.raises(QueueConfigError):
        QueueState.from_dict(data)


def test_restore_rejects_unknown_fields_and_types():
    data = QueueState(size=8, desc_addr=0, driver_addr=0x1000, device_addr=0x2000).to_dict()
    with pytest.raises(QueueConfigError):
        QueueState.from_dict({**data, "evil": 1})
    with pytest.raises(QueueConfigError):
        QueueState.from_dict({**data, "size": "8"})


def test_restored_queue_with_unknown_signal_state_notifies_once():
    """After a restore without signalled-used state the device cannot know what the
    driver saw, so its first decision notifies (a spurious notification is allowed:
    the driver MUST handle spurious notifications, §2.7.7.1)."""
    pair = make_queue_pair(8, event_idx=True)
    drv = pair.driver
    drv.set_interrupts(True, event=5)
    drv.add([b"a"], [])
    drv.add([b"b"], [])
    drv.publish()
    q = Virtqueue.restore(
        pair.memory,
        drv.state().__class__(**{**drv.state().to_dict(), "signalled_used_valid": False}),
    )
    c1, c2 = q.pop_batch()
    q.add_used(c1, 0)
    assert q.needs_notification()
    q.add_used(c2, 0)
    assert not q.needs_notification()


def test_used_length_is_dirty_logged_whatever_way_it_was_written():
    """vhost-user migration: pages the device wrote (the first ``len`` writable bytes,
    §2.7.8.2) are in the dirty log when the used index moves, even when the device
    filled zero-copy views before logging was switched on."""
    pair = make_queue_pair(8)
    drv, q, mem = pair.driver, pair.device, pair.memory
    drv.add([b"hdr"], [8192])
    drv.publish()
    chain = q.pop()
    for view in chain.writable():  # written behind the writer's back
        view[:] = b"\x01" * len(view)
    log = memoryview(bytearray(64))
    mem.set_dirty_log(log)
    q.add_used(chain, 5000)
    seg = chain.segments[chain.nreadable]
    pages = {p for p in range(64 * 8) if log[p // 8] >> (p % 8) & 1}
    written = set(range(seg.addr // 4096, (seg.addr + 5000 - 1) // 4096 + 1))
    assert written <= pages
