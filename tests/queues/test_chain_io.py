"""ChainReader / ChainWriter stream over any arrangement of buffers (virtio 1.4
§2.7.4: the device must not assume a particular arrangement of descriptors): reads
and writes in arbitrary pieces agree with a byte-string model, whether a piece
stays inside one buffer (the one-slice path) or crosses buffer boundaries."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtio.testing.queues import make_queue_pair

pieces = st.lists(st.integers(0, 24), max_size=8)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    packed=st.booleans(),
    indirect=st.booleans(),
    readable=st.lists(st.binary(min_size=1, max_size=16), max_size=4),
    writable=st.lists(st.integers(1, 16), max_size=4),
    reads=pieces,
    writes=pieces,
)
def test_streams_match_a_model(packed, indirect, readable, writable, reads, writes):
    if not readable and not writable:
        writable = [1]
    pair = make_queue_pair(16, packed=packed)
    drv, q = pair.driver, pair.device
    drv.add(readable, writable, use_indirect=indirect)
    drv.add([b"next"], [4])  # a second chain, so pop reads ahead
    drv.publish()
    chain = q.pop()
    assert len(chain.segments) == len(readable) + len(writable)
    assert [s.writable for s in chain.segments] == [False] * len(readable) + [True] * len(writable)

    model = b"".join(readable)
    reader = chain.reader()
    pos = 0
    for n in reads:
        got = reader.read(n)
        assert got == model[pos : pos + n]
        pos += len(got)
        assert reader.remaining == len(model) - pos
    assert reader.read() == model[pos:]

    total = sum(writable)
    writer = chain.writer()
    out = b""
    for i, n in enumerate(writes):
        data = bytes([i + 1]) * n
        k = writer.write(data)
        assert k == min(n, total - len(out))
        out += data[:k]
        assert writer.written == len(out) and writer.remaining == total - len(out)
    q.add_used(chain, writer.written)
    (used,) = drv.get_used()
    assert used.written == len(out)
    assert used.data[: len(out)] == out
    assert used.readable == readable  # the device never wrote a readable buffer
    assert q.pop().reader().read() == b"next"
    pair.close()


def test_status_trailer_after_views():
    """seek_end puts the status byte in the last writable byte, after zero-copy views."""
    pair = make_queue_pair(8)
    drv, q = pair.driver, pair.device
    drv.add([b"h" * 16], [3, 5, 1])
    drv.publish()
    chain = q.pop()
    w = chain.writer()
    for v in w.views(8):
        v[:] = b"d" * len(v)
    w.seek_end(1)
    w.write(b"\x07")
    q.add_used(chain, 9)
    (used,) = drv.get_used()
    assert used.data == b"d" * 8 + b"\x07"
