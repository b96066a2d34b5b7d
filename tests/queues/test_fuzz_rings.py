"""Hostile ring memory: random bytes in the descriptor table, the driver/device
areas and indirect tables.  The engine only ever yields chains inside guest memory
or raises the typed ``DriverError``s, never another exception, never hangs, and
never writes outside the used ring and the buffers the chains gave it."""

from __future__ import annotations

import random
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtio.errors import DriverError, QueueBrokenError
from virtio.memory import BytearrayGuestMemory
from virtio.queues.state import QueueState
from virtio.queues.virtqueue import Virtqueue

MEM = 0x4000
DESC, DRIVER, DEVICE = 0x0, 0x1000, 0x1800


def _descs(size, packed):
    """Descriptors pointing mostly into memory, sometimes anywhere."""
    addr = st.one_of(st.integers(0x2000, MEM + 64), st.integers(0, 2**64 - 1))
    length = st.one_of(st.integers(0, 64), st.integers(0, 2**32 - 1))
    if packed:
        # Mostly "available on the first lap" (AVAIL=1, USED=0), sometimes anything.
        flags = st.one_of(st.integers(0, 7).map(lambda f: f | 0x80), st.integers(0, 0xFFFF))
    else:
        flags = st.integers(0, 7)
    nxt = st.one_of(st.integers(0, size), st.integers(0, 0xFFFF))
    return st.lists(st.tuples(addr, length, flags, nxt), min_size=size, max_size=size)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), packed=st.booleans(), size_log=st.integers(0, 6), event_idx=st.booleans())
def test_random_rings_never_escape(data, packed, size_log, event_idx):
    size = 1 << size_log
    mem = BytearrayGuestMemory(MEM)
    # Random garbage everywhere first, then plausible descriptors on top.
    garbage = random.Random(data.draw(st.integers(0, 2**32))).randbytes(MEM)
    mem.write(0, garbage)
    # Often a sane avail ring, so chains are actually walked.
    if data.draw(st.booleans()):
        rng = random.Random(data.draw(st.integers(0, 2**32)))
        mem.write_u16(DRIVER + 2, rng.randint(0, size))
        for slot in range(size):
            mem.write_u16(DRIVER + 4 + 2 * slot, rng.randrange(size))
    for i, (addr, length, flags, nxt) in enumerate(data.draw(_descs(size, packed))):
        if packed:
            mem.write(DESC + 16 * i, struct.pack("<QIHH", addr, length, nxt, flags))
        else:
            mem.write(DESC + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))
    state = QueueState(
        size=size,
        desc_addr=DESC,
        driver_addr=DRIVER,
        device_addr=DEVICE,
        packed=packed,
        event_idx=event_idx,
        indirect=data.draw(st.booleans()),
        last_avail_idx=data.draw(st.sampled_from([0, 0xFFFF, 0x8000])),
    )
    q = Virtqueue(mem, state)
    before = bytes(mem.read(0, MEM))
    allowed = bytearray(MEM)  # 1 = the device may write this byte
    used_area = (DESC, DESC + 16 * size) if packed else (DEVICE, DEVICE + 6 + 8 * size)
    allowed[used_area[0] : used_area[1]] = b"\x01" * (used_area[1] - used_area[0])
    if packed:
        allowed[DEVICE : DEVICE + 4] = b"\x01" * 4
    for _round in range(4):
        try:
            chains = q.pop_batch(8)
        except DriverError as exc:
            assert exc.section, "driver errors name the spec section"
            assert q.broken and q.error is exc
            try:
                q.pop()
            except QueueBrokenError:
                pass
            else:
                raise AssertionError("a broken queue kept working")
            break
        for chain in chains:
            seen_writable = False
            for seg in chain.segments:
                mem.check(seg.addr, seg.length)  # inside guest memory
                assert seg.addr + seg.length <= MEM
                if seg.writable:
                    seen_writable = True
                    allowed[seg.addr : seg.addr + seg.length] = b"\x01" * seg.length
                else:
                    assert not seen_writable, "readable after writable slipped through"
            w = chain.writer()
            w.write(b"\xaa" * chain.writable_len)
            q.add_used(chain, w.written)
            q.needs_notification()
        q.enable_notification()
        if not chains:
            break
    after = mem.read(0, MEM)
    for i in range(MEM):
        if before[i] != after[i]:
            assert allowed[i], f"device wrote byte {i:#x} outside the buffers it was given"
    mem.close()


def test_collecting_broken_queues_is_safe(tmp_path):
    """A broken queue keeps its error (and so a reference cycle through the
    traceback); collecting such cycles must not crash the interpreter."""
    import subprocess
    import sys

    code = """
import gc
from virtio.errors import DriverError
from virtio.memory import BytearrayGuestMemory
from virtio.queues.state import QueueState
from virtio.queues.virtqueue import Virtqueue
for i in range(200):
    mem = BytearrayGuestMemory(0x4000)
    mem.write_u16(0x1002, 5)  # avail idx 5 > queue size 1
    q = Virtqueue(mem, QueueState(size=1, desc_addr=0, driver_addr=0x1000, device_addr=0x1800))
    try:
        q.pop()
    except DriverError:
        pass
    if i % 50 == 0:
        gc.collect()
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
