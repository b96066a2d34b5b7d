"""``Virtqueue.pop`` validates several chains in one native call and hands them out
one by one.  Chains read ahead but not handed out are not popped as far as anyone
can observe: state, statistics, the available-buffer event index and other pops
all see the ring position of the first chain not handed out."""

from __future__ import annotations

import struct

import pytest

from virtio.errors import DescriptorChainError, QueueBrokenError
from virtio.queues import Virtqueue
from virtio.spec.ring import PackedDescFlag
from virtio.testing.queues import make_queue_pair

AVAIL = int(PackedDescFlag.VRING_PACKED_DESC_F_AVAIL)


def _offer(pair, n: int, ndesc: int = 1) -> list[int]:
    # Chains of ndesc descriptors: ndesc - 1 readable, one writable.
    tokens = [pair.driver.add([bytes([i]) * 4] * (ndesc - 1), [8]) for i in range(n)]
    pair.driver.publish()
    return tokens


@pytest.mark.parametrize("ndesc", [1, 3])
def test_state_after_one_pop_names_the_next_chain(packed, ndesc):
    pair = make_queue_pair(16, packed=packed)
    tokens = _offer(pair, 5, ndesc)
    q = pair.device
    first = q.pop()
    assert first.head == tokens[0]
    st = q.state()
    if packed:
        assert (st.next_avail, st.avail_wrap) == (ndesc, True)
    else:
        assert st.last_avail_idx == 1
    assert q.statistics().popped == 1
    assert q.has_available()
    # A queue rebuilt from that state (vhost-user GET_VRING_BASE, reconnect) gets
    # exactly the chains that were not handed out, in order.
    again = Virtqueue(pair.memory, st)
    assert [c.head for c in iter(again)] == tokens[1:]


def test_pops_after_state_continue_in_order(packed):
    pair = make_queue_pair(16, packed=packed)
    tokens = _offer(pair, 6, 2)
    q = pair.device
    got = [q.pop().head, q.pop().head]
    q.state()  # gives the read-ahead back
    got += [c.head for c in q.pop_batch(2)]
    got += [q.pop().head]
    assert q.pop_raw(8) == 1
    got += [q.raw_chains[0].head]
    assert got == tokens
    assert q.pop() is None


def test_read_ahead_given_back_across_the_packed_wrap():
    pair = make_queue_pair(7, packed=True)  # packed rings may have any size
    q = pair.device
    pos, wrap = 0, True
    for _lap in range(6):  # two 3-descriptor chains per lap: the wrap moves around
        tokens = _offer(pair, 2, 3)
        first = q.pop()
        assert first.head == tokens[0]
        pos += 3
        if pos >= 7:
            pos, wrap = pos - 7, not wrap
        st = q.state()
        assert (st.next_avail, st.avail_wrap) == (pos, wrap)
        second = q.pop()
        assert second.head == tokens[1]
        pos += 3
        if pos >= 7:
            pos, wrap = pos - 7, not wrap
        q.add_used_batch([(first, 0), (second, 0)])
        assert sorted(u.id for u in pair.driver.get_used()) == sorted(tokens)
    assert q.pop() is None


def test_event_index_names_the_first_chain_not_handed_out():
    pair = make_queue_pair(16, event_idx=True)
    _offer(pair, 4)
    q = pair.device
    q.pop()
    assert q.enable_notification()  # three more are available
    avail_event = pair.memory.read_u16(pair.driver.device_addr + 4 + 8 * 16)
    assert avail_event == 1


def test_good_chains_before_a_bad_one_are_handed_out_first():
    pair = make_queue_pair(8)
    drv, q = pair.driver, pair.device
    tokens = _offer(pair, 2)
    bad_slot = 2
    drv.write_avail(bad_slot, 99)  # head outside the queue
    drv.set_avail_idx(3)
    assert [q.pop().head, q.pop().head] == tokens
    with pytest.raises(DescriptorChainError):
        q.pop()
    with pytest.raises(QueueBrokenError):
        q.pop()
    assert q.statistics().popped == 2


def test_no_read_ahead_while_a_data_plane_shares_the_queue(packed):
    pair = make_queue_pair(16, packed=packed)
    _offer(pair, 4)
    q = pair.device
    q.pop()
    q.set_locking(True)
    try:
        assert q.statistics().popped == 1  # the read-ahead was given back
        q.pop()
        # Every further chain is still in the ring, for the data-plane thread.
        st = q.state()
        assert (st.next_avail if packed else st.last_avail_idx) == 2
        assert q.statistics().popped == 2
    finally:
        q.set_locking(False)


def test_used_ring_sees_only_completed_chains(packed):
    pair = make_queue_pair(8, packed=packed)
    tokens = _offer(pair, 3)
    q = pair.device
    chain = q.pop()
    w = chain.writer()
    w.write(struct.pack("<Q", 7))
    q.add_used(chain, w.written)
    used = pair.driver.get_used()
    assert [(u.id, u.written) for u in used] == [(tokens[0], 8)]
    assert [c.head for c in q] == tokens[1:]
