"""One test per normative requirement the engine implements, named by section.

Driver requirements (``drivernormative``) are checked by feeding the engine a
driver that breaks them: it must raise a ``DriverError`` naming the clause and
break the queue.  Device requirements (``devicenormative``) are checked on what
the engine writes.
"""

from __future__ import annotations

import struct

import pytest

from virtio.errors import (
    DescriptorChainError,
    DriverError,
    InvalidAvailIdx,
    QueueBrokenError,
    QueueConfigError,
)
from virtio.memory import BytearrayGuestMemory, MmapGuestMemory
from virtio.queues import QueueConfig, QueueState, Virtqueue
from virtio.spec import sections as sec
from virtio.spec.ring import PackedDescFlag, VringDescFlag, VringUsedFlag
from virtio.testing.driver import DriverQueue
from virtio.testing.queues import make_queue_pair
from virtio.testing.watchpoints import WatchUnavailable, WriteWatch, host_address

NEXT = int(VringDescFlag.VRING_DESC_F_NEXT)
WRITE = int(VringDescFlag.VRING_DESC_F_WRITE)
INDIRECT = int(VringDescFlag.VRING_DESC_F_INDIRECT)
AVAIL = int(PackedDescFlag.VRING_PACKED_DESC_F_AVAIL)
USED = int(PackedDescFlag.VRING_PACKED_DESC_F_USED)


def _raw_split(size=4, indirect=True):
    pair = make_queue_pair(size, indirect=indirect)
    return pair, pair.driver, pair.device


def _offer_heads(drv, *heads):
    for i, h in enumerate(heads):
        drv.write_avail(i, h)
    drv.set_avail_idx(len(heads))


def _expect(q, exc_type, section):
    with pytest.raises(exc_type) as info:
        q.pop()
    assert info.value.section.startswith(section.number), info.value.section
    if section.label:
        assert section.label in info.value.section
    assert q.broken
    with pytest.raises(QueueBrokenError):
        q.pop()
    return info.value


# -- 2.7.1 drivernormative: Virtqueues (alignment) ---------------------------------------
@pytest.mark.parametrize(
    ("desc", "driver", "device"),
    [(0x1008, 0x2000, 0x3000), (0x1000, 0x2001, 0x3000), (0x1000, 0x2000, 0x3002)],
)
def test_spec_2_7_1_misaligned_rings_rejected(desc, driver, device):
    mem = BytearrayGuestMemory(0x10000)
    cfg = QueueConfig(max_size=8, desc_addr=desc, driver_addr=driver, device_addr=device)
    with pytest.raises(QueueConfigError) as info:
        cfg.activate(mem)
    assert info.value.section.startswith("2.7.1")


def test_spec_2_7_queue_size_power_of_two_and_max():
    mem = BytearrayGuestMemory(0x100000)
    for size in (3, 0, 65536):
        with pytest.raises(QueueConfigError):
            Virtqueue(
                mem, QueueState(size=size, desc_addr=0, driver_addr=0x1000, device_addr=0x2000)
            )
    # Packed rings (§2.8) allow any size up to 32768.
    Virtqueue(
        mem, QueueState(size=3, desc_addr=0, driver_addr=0x1000, device_addr=0x2000, packed=True)
    )


def test_spec_2_6_rings_outside_memory_rejected():
    mem = BytearrayGuestMemory(0x4000)
    with pytest.raises(QueueConfigError):
        QueueConfig(max_size=256, desc_addr=0x3800, driver_addr=0, device_addr=0x1000).activate(mem)


# -- 2.7.4.2 drivernormative: Message Framing --------------------------------------------
def test_spec_2_7_4_2_readable_after_writable_rejected(packed):
    pair = make_queue_pair(4, packed=packed)
    drv, q = pair.driver, pair.device
    base = drv.data_addr
    if packed:
        drv.write_desc(0, base, 8, WRITE | NEXT | AVAIL, 0)
        drv.write_desc(1, base + 8, 8, AVAIL, 0)
    else:
        drv.write_desc(0, base, 8, WRITE | NEXT, 1)
        drv.write_desc(1, base + 8, 8, 0, 0)
        _offer_heads(drv, 0)
    _expect(q, DescriptorChainError, sec.S_2_8_17 if packed else sec.S_2_7_4_2)


# -- 2.7.5.1 devicenormative: the device MUST NOT write to a device-readable buffer --------
def test_spec_2_7_5_1_device_never_writes_readable_buffers(packed):
    pair = make_queue_pair(8, packed=packed)
    drv, q = pair.driver, pair.device
    drv.add([b"R" * 24, b"S" * 8], [16, 3])
    drv.publish()
    chain = q.pop()
    w = chain.writer()
    assert w.write(b"\xff" * 100) == 19  # only the 19 writable bytes
    q.add_used(chain, w.written)
    (used,) = drv.get_used()
    assert used.data == b"\xff" * 19
    assert used.readable == [b"R" * 24, b"S" * 8]


# -- 2.7.5.2 drivernormative: no chain longer than 2^32 bytes; loops forbidden ----------------
def test_spec_2_7_5_2_chain_longer_than_4gib_rejected(packed):
    # 4 GiB + 1 MiB of sparse guest RAM so both 2 GiB buffers really are guest memory.
    mem = MmapGuestMemory.anonymous((1 << 32) + (1 << 20))
    drv = DriverQueue(mem, 4, base=0, packed=packed, indirect=False, data_size=4096)
    q = Virtqueue(mem, drv.state())
    avail = AVAIL if packed else 0
    drv.write_desc(0, 1 << 20, 1 << 31, NEXT | avail, 1)
    drv.write_desc(1, (1 << 20) + (1 << 31), 1 << 31, NEXT | avail, 2)
    drv.write_desc(2, drv.data_addr, 16, avail, 0)
    if not packed:
        _offer_heads(drv, 0)
    # Packed rings have no 2^32 clause: the list is "longer than allowed by the device"
    # (§2.8.17), whose used length is 32 bits.
    err = _expect(q, DescriptorChainError, sec.S_2_8_17 if packed else sec.S_2_7_5_2)
    assert "2^32" in str(err)
    mem.close()


def test_spec_2_7_5_2_loop_rejected():
    """A loop in a plain chain breaks 2.7.5.2 ("loops in the descriptor chain are
    forbidden"), not the Indirect Descriptors clause."""
    _pair, drv, q = _raw_split(4)
    drv.write_desc(0, drv.data_addr, 8, NEXT, 1)
    drv.write_desc(1, drv.data_addr, 8, NEXT, 0)
    _offer_heads(drv, 0)
    err = _expect(q, DescriptorChainError, sec.S_2_7_5_2)
    assert "Indirect" not in err.section
    assert "a loop" in str(err)


def test_spec_2_7_5_2_loop_inside_indirect_table_rejected():
    pair, drv, q = _raw_split(4)
    table = drv.alloc.alloc(48)
    entries = [
        (drv.data_addr, 8, NEXT, 1),
        (drv.data_addr, 8, NEXT, 2),
        (drv.data_addr, 8, NEXT, 1),
    ]
    pair.memory.write(table, b"".join(struct.pack("<QIHH", *e) for e in entries))
    drv.write_desc(0, table, 48, INDIRECT, 0)
    _offer_heads(drv, 0)
    err = _expect(q, DescriptorChainError, sec.S_2_7_5_2)
    assert f"indirect table at {table:#x} chains more than its 3 descriptors" in str(err)


def test_spec_2_8_17_packed_list_longer_than_queue_size_rejected():
    pair = make_queue_pair(4, packed=True)
    drv, q = pair.driver, pair.device
    for i in range(4):  # every descriptor available and chained: the list never ends
        drv.write_desc(i, drv.data_addr, 8, NEXT | AVAIL, 0)
    _expect(q, DescriptorChainError, sec.S_2_8_17)


def test_spec_2_7_5_next_out_of_range_rejected():
    _pair, drv, q = _raw_split(4)
    drv.write_desc(0, drv.data_addr, 8, NEXT, 4)
    _offer_heads(drv, 0)
    _expect(q, DescriptorChainError, sec.S_2_7_5)


def test_spec_2_7_5_buffer_outside_memory_rejected(packed):
    pair = make_queue_pair(4, packed=packed)
    drv, q = pair.driver, pair.device
    if packed:
        drv.write_desc(0, 1 << 40, 8, AVAIL, 0)
    else:
        drv.write_desc(0, 1 << 40, 8, 0, 0)
        _offer_heads(drv, 0)
    _expect(q, DescriptorChainError, sec.S_2_8_4 if packed else sec.S_2_7_5)


# -- 2.7.5.3.1 drivernormative: Indirect Descriptors ----------------------------------------
def test_spec_2_7_5_3_1_indirect_without_feature_rejected(packed):
    pair = make_queue_pair(4, packed=packed, indirect=False)
    drv, q = pair.driver, pair.device
    table = drv.alloc.alloc(16)
    pair.memory.write(table, struct.pack("<QIHH", drv.data_addr, 8, 0, 0))
    if packed:
        drv.write_desc(0, table, 16, INDIRECT | AVAIL, 0)
    else:
        drv.write_desc(0, table, 16, INDIRECT, 0)
        _offer_heads(drv, 0)
    _expect(q, DescriptorChainError, sec.S_2_8_19 if packed else sec.S_2_7_5_3_1)


def test_spec_2_7_5_3_1_nested_indirect_rejected(packed):
    pair = make_queue_pair(4, packed=packed)
    drv, q = pair.driver, pair.device
    table = drv.alloc.alloc(32)
    if packed:  # addr, len, id, flags
        inner = struct.pack("<QIHH", table, 16, 0, INDIRECT)
    else:  # addr, len, flags, next
        inner = struct.pack("<QIHH", table, 16, INDIRECT, 0)
    pair.memory.write(table, inner + inner)
    if packed:
        drv.write_desc(0, table, 32, INDIRECT | AVAIL, 0)
    else:
        drv.write_desc(0, table, 32, INDIRECT, 0)
        _offer_heads(drv, 0)
    _expect(q, DescriptorChainError, sec.S_2_8_19 if packed else sec.S_2_7_5_3_1)


def test_spec_2_7_5_3_1_indirect_with_next_rejected():
    pair, drv, q = _raw_split(4)
    table = drv.alloc.alloc(16)
    pair.memory.write(table, struct.pack("<QIHH", drv.data_addr, 8, 0, 0))
    drv.write_desc(0, table, 16, INDIRECT | NEXT, 1)
    _offer_heads(drv, 0)
    _expect(q, DescriptorChainError, sec.S_2_7_5_3_1)


def test_spec_2_7_5_2_chain_through_every_descriptor_is_a_loop():
    _pair, drv, q = _raw_split(4)
    for i in range(4):
        drv.write_desc(i, drv.data_addr, 8, NEXT, (i + 1) % 4)
    _offer_heads(drv, 0)
    _expect(q, DescriptorChainError, sec.S_2_7_5_2)


def test_spec_2_8_19_packed_indirect_in_a_next_list_rejected():
    """Packed rings forbid an INDIRECT descriptor anywhere in a NEXT-linked list
    (2.8.19), even as its last element, which split rings allow (2.7.5.3.2)."""
    pair = make_queue_pair(4, packed=True)
    drv, q = pair.driver, pair.device
    table = drv.alloc.alloc(16)
    pair.memory.write(table, struct.pack("<QIHH", drv.data_addr, 8, 0, 0))
    drv.write_desc(0, drv.data_addr, 8, NEXT | AVAIL, 0)
    drv.write_desc(1, table, 16, INDIRECT | AVAIL, 0)
    err = _expect(q, DescriptorChainError, sec.S_2_8_19)
    assert "descriptor 1 combines" in str(err)


@pytest.mark.parametrize("length", [0, 8, 24])
def test_spec_2_7_5_3_indirect_table_length_invalid(length):
    _pair, drv, q = _raw_split(4)
    table = drv.alloc.alloc(32)
    drv.write_desc(0, table, length, INDIRECT, 0)
    _offer_heads(drv, 0)
    err = _expect(q, DescriptorChainError, sec.S_2_7_5_3)
    assert "no normative clause names this fault" in str(err)


def test_spec_2_7_5_3_2_device_ignores_write_flag_on_table_and_handles_direct_then_indirect():
    """devicenormative 2.7.5.3.2: ignore WRITE on the descriptor that refers to a table;
    handle zero or more chained descriptors followed by one indirect descriptor."""
    pair, drv, q = _raw_split(4)
    mem = pair.memory
    a = drv.alloc.alloc(64)
    mem.write(a, b"head----")
    table = drv.alloc.alloc(32)
    mem.write(
        table, struct.pack("<QIHH", a + 8, 8, NEXT, 1) + struct.pack("<QIHH", a + 16, 8, WRITE, 0)
    )
    mem.write(a + 8, b"indirect")
    drv.write_desc(0, a, 8, NEXT, 1)
    drv.write_desc(1, table, 32, INDIRECT | WRITE, 0)
    _offer_heads(drv, 0)
    chain = q.pop()
    assert chain.reader().read() == b"head----indirect"
    assert chain.writable_len == 8


# -- 2.7.6 / 2.7.13.3: available ring and idx --------------------------------------------
def _ring_bytes(pair) -> bytes:
    drv = pair.driver
    return bytes(pair.memory.read(drv.desc_addr, drv.data_addr - drv.desc_addr))


def test_spec_2_7_6_unproven_ring_with_impossible_idx_waits_for_a_kick():
    """A ring started asynchronously to its driver (``start_unproven``: vhost-user)
    whose avail idx is impossible before it was ever valid is not failed and not
    written to (no used flags; the memory may be the OS's, firmware left the device
    running) -- until the driver kicks after that look: then it is the error."""
    pair, drv, q = _raw_split(4)
    pair.device.start_unproven()
    drv.set_avail_idx(0xA5B3)
    before = _ring_bytes(pair)
    q.disable_notification()
    assert q.pop() is None and not q.has_available() and q.available_chains(4) == 0
    assert not q.enable_notification()  # nothing "arrived" either
    assert q.stale_avail == 0xA5B3 and not q.broken
    assert _ring_bytes(pair) == before  # not one byte written
    q.kicked()
    with pytest.raises(InvalidAvailIdx) as info:
        q.pop()
    assert (info.value.avail_idx, info.value.last_avail_idx) == (0xA5B3, 0)
    assert "avail idx 0xa5b3, the device's next 0x0000" in str(info.value)
    assert q.broken


def test_spec_2_7_6_unproven_ring_proven_by_a_valid_idx():
    """One valid look proves the ring: a jump afterwards is the error at once."""
    pair, drv, q = _raw_split(4)
    pair.device.start_unproven()
    q.kicked()  # a kick before any look changes nothing
    drv.set_avail_idx(0)
    assert q.pop() is None and q.stale_avail is None
    drv.set_avail_idx(5)
    with pytest.raises(InvalidAvailIdx):
        q.pop()


def test_spec_2_7_6_head_out_of_range_rejected():
    _pair, drv, q = _raw_split(4)
    _offer_heads(drv, 7)
    _expect(q, DescriptorChainError, sec.S_2_7_6)


def test_spec_2_7_6_avail_idx_moved_more_than_queue_size():
    """No normative clause forbids the jump: the error says so and names the
    informative 2.7.6 (and 2.7.6.1, which a decrement in disguise would break)."""
    _pair, drv, q = _raw_split(4)
    drv.set_avail_idx(5)
    with pytest.raises(InvalidAvailIdx) as info:
        q.pop()
    assert info.value.queue_size == 4 and info.value.reported_len == 5
    assert info.value.spec_section is sec.S_2_7_6 and info.value.section == "2.7.6"
    text = str(info.value)
    assert "no normative clause names this fault" in text
    assert "§2.7.6 The Virtqueue Available Ring" in text and "§2.7.6.1" in text
    assert q.broken


# -- 2.7.8.2 devicenormative: used ring len and idx ------------------------------------------
@pytest.mark.parametrize("slot", [0, 3])
def test_spec_2_7_8_2_len_set_before_idx_and_counts_written_bytes(slot):
    """The engine's stores, as the CPU executes them (hardware write watchpoints on
    the used element and the used idx): id and len first, idx last."""
    pair, drv, q = _raw_split(4)
    for _ in range(slot):  # move the used ring on to ``slot``
        drv.add([b"x"], [])
        drv.publish()
        q.add_used(q.pop(), 0)
        drv.get_used()
    drv.add([b"abc"], [10])
    drv.publish()
    chain = q.pop()
    chain.writer().write(b"0123456789")
    elem_addr = drv.device_addr + 4 + 8 * slot
    ranges = {
        "id": (host_address(pair.memory.slice(elem_addr, 4)), 4),
        "len": (host_address(pair.memory.slice(elem_addr + 4, 4)), 4),
        "idx": (host_address(pair.memory.slice(drv.device_addr + 2, 2)), 2),
    }
    try:
        with WriteWatch(ranges) as watch:
            q.add_used(chain, 10)
    except WatchUnavailable as exc:
        pytest.skip(f"no hardware watchpoints here: {exc}")
    assert watch.order == ["id", "len", "idx"]  # MUST set len prior to updating idx
    used_idx = pair.memory.read_u16(drv.device_addr + 2)
    elem = struct.unpack("<II", pair.memory.read(elem_addr, 8))
    assert used_idx == slot + 1
    assert elem == (chain.head, 10)  # len: the bytes written into the chain


# -- 2.7.10.2 devicenormative: Available Buffer Notification Suppression ----------------------
def test_spec_2_7_10_2_flags_zero_with_event_idx():
    pair = make_queue_pair(8, event_idx=True)
    q, drv = pair.device, pair.driver
    q.disable_notification()
    assert pair.memory.read_u16(drv.device_addr) == 0  # MUST set flags to 0
    q.enable_notification()
    assert pair.memory.read_u16(drv.device_addr + 4 + 8 * 8) == q.next_avail


def test_spec_2_7_10_2_flags_without_event_idx():
    pair = make_queue_pair(8, event_idx=False)
    q, drv = pair.device, pair.driver
    q.disable_notification()
    assert pair.memory.read_u16(drv.device_addr) == int(VringUsedFlag.VRING_USED_F_NO_NOTIFY)
    q.enable_notification()
    assert pair.memory.read_u16(drv.device_addr) == 0


# -- 2.8 packed ring ---------------------------------------------------------------------------
def test_spec_2_8_6_buffer_id_from_last_descriptor_and_device_skips_chain():
    pair = make_queue_pair(4, packed=True, indirect=False)
    drv, q = pair.driver, pair.device
    t1 = drv.add([b"a", b"b"], [4])  # 3 descriptors
    t2 = drv.add([b"c"], [])
    drv.publish()
    c1, c2 = q.pop_batch()
    assert (c1.head, c1.ndesc, c2.head, c2.ndesc) == (t1, 3, t2, 1)
    # Complete out of order; the device writes used descriptors in ring order.
    q.add_used(c2, 0)
    q.add_used(c1, 4)
    assert sorted(u.id for u in drv.get_used()) == sorted([t1, t2])


def test_spec_2_8_1_wrap_counters_flip_at_ring_end():
    pair = make_queue_pair(3, packed=True)
    drv, q = pair.driver, pair.device
    for lap in range(5):
        tokens = [drv.add([bytes([lap])]) for _ in range(3)]
        drv.publish()
        chains = q.pop_batch()
        assert [c.head for c in chains] == tokens
        q.add_used_batch([(c, 0) for c in chains])
        assert sorted(u.id for u in drv.get_used()) == sorted(tokens)
    st = q.state()
    assert st.avail_wrap == st.used_wrap == bool(5 % 2 == 0)


def test_spec_2_8_17_chain_into_unavailable_descriptor_rejected():
    pair = make_queue_pair(4, packed=True)
    drv, q = pair.driver, pair.device
    drv.write_desc(0, drv.data_addr, 8, NEXT | AVAIL, 0)
    drv.write_desc(1, drv.data_addr, 8, USED, 0)  # not available on this lap
    _expect(q, DescriptorChainError, sec.S_2_8_17)


def test_driver_error_only_breaks_its_queue():
    """A broken queue says so; another queue over the same memory keeps working."""
    pair_a = make_queue_pair(4)
    pair_a.driver.set_avail_idx(9)
    with pytest.raises(DriverError):
        pair_a.device.pop()
    pair_b = make_queue_pair(4)
    pair_b.driver.add([b"ok"], [])
    pair_b.driver.publish()
    assert pair_b.device.pop().reader().read() == b"ok"
    assert isinstance(pair_a.device.error, InvalidAvailIdx)


def test_native_errors_cite_their_layouts_clauses():
    """Every native error cites a section of the index: split-ring errors a 2.7
    clause, packed-ring errors a 2.8 one (never the split ring's 2.7.4.2)."""
    from virtio.native import lib
    from virtio.queues.virtqueue import _ERRORS

    known = set(sec.all_sections().values())
    for code, (_cls, split_section, packed_section, _template) in _ERRORS.items():
        assert split_section in known and packed_section in known, code
        if code != lib.VQ_E_PACKED_AVAIL:  # packed only
            assert split_section.number.startswith("2.7."), (code, split_section)
        assert packed_section.number.startswith("2.8."), (code, packed_section)


def test_driver_error_cites_through_the_index():
    err = DescriptorChainError("bad", section=sec.S_2_8_19)
    assert err.spec_section is sec.S_2_8_19
    assert err.section == sec.S_2_8_19.citation
    assert str(err).endswith(f"(virtio 1.4 §{sec.S_2_8_19.citation})")
    informative = DescriptorChainError("odd", section=sec.S_2_8_7)
    assert informative.section == "2.8.7"
    assert "no normative clause names this fault; see virtio 1.4 §2.8.7" in str(informative)
