"""Refcounts and allocation (``virtio/devices/blk/qcow2/refcount.py``): growing the
refcount table past what ``qemu-img create`` reserved, every refcount width, and
clusters given back by discard being reused -- each result checked by qemu-img."""

from __future__ import annotations

import random

import pytest

from virtio.devices.blk.qcow2 import Qcow2Image


@pytest.mark.parametrize("refcount_bits", [16, 64, 1])
def test_refcount_table_grows_and_qemu_img_agrees(qimg, tmp_path, refcount_bits):
    # 512-byte clusters: one refcount table cluster covers 8 MiB (16-bit), 2 MiB
    # (64-bit) or 128 MiB (1-bit) of host clusters.
    img = qimg.create(tmp_path / "d.qcow2", 24 << 20, cluster_size=512, refcount_bits=refcount_bits)
    image = Qcow2Image(img, refcount_cache_size=1024)
    start_clusters = image.refcounts.table_clusters
    rng = random.Random(refcount_bits)
    model = bytearray(image.size)
    for off in range(0, 10 << 20, 256 << 10):
        data = rng.randbytes(256 << 10)
        image.write(off, [memoryview(data)])
        model[off : off + len(data)] = data
    image.close()
    image = Qcow2Image(img)  # the grown table is what the header names now
    try:
        got = bytearray(image.size)
        image.read(0, [memoryview(got)])
        assert got == model
        if refcount_bits != 1:
            assert image.refcounts.table_clusters > start_clusters
    finally:
        image.close()
    report = qimg.check(img)
    assert report.get("leaks", 0) == 0, report
    raw = tmp_path / "model.raw"
    raw.write_bytes(model)
    qimg.compare(img, raw)


def test_discarded_clusters_are_reused(qimg, tmp_path):
    img = qimg.create(tmp_path / "d.qcow2", 8 << 20)
    image = Qcow2Image(img)
    try:
        data = bytes(range(256)) * 4096  # 1 MiB = 16 clusters
        image.write(0, [memoryview(data)])
        image.flush()
        end = image.refcounts.end
        image.zero(0, len(data), unmap=True, discard=True)
        image.flush()  # the L2 change is durable: the clusters are free again
        image.write(4 << 20, [memoryview(data)])
        image.flush()
        assert image.refcounts.end == end  # no growth: the freed clusters were used
    finally:
        image.close()
    assert qimg.check(img).get("leaks", 0) == 0
