"""Compressed clusters (``compress.py``): images from ``qemu-img convert -c`` (deflate
and zstd) read back equal to their source; writing into, zeroing and discarding
compressed clusters copies them out or drops them, and qemu-img agrees."""

from __future__ import annotations

import random

import pytest

from virtio.devices.blk.qcow2 import Qcow2Image


def _source(size: int) -> bytes:
    rng = random.Random(size)
    out = bytearray()
    while len(out) < size:
        kind = rng.randrange(3)
        n = rng.choice([512, 4096, 65536, 200000])
        if kind == 0:
            out += bytes(n)
        elif kind == 1:
            out += (b"compressible %d " % rng.randrange(1000)) * (n // 16)
        else:
            out += rng.randbytes(n)
    return bytes(out[:size])


@pytest.mark.parametrize(
    "opts",
    [
        "cluster_size=65536",
        "cluster_size=4096,compression_type=zstd",
        "cluster_size=2097152",
        "cluster_size=65536,compression_type=zstd,extended_l2=on",
        "cluster_size=512",
    ],
)
def test_compressed_images_read_back_and_take_writes(qimg, tmp_path, opts):
    size = (6 << 20) + 512 * 7
    src = tmp_path / "src.raw"
    data = _source(size)
    src.write_bytes(data)
    img = qimg.convert(src, tmp_path / "c.qcow2", "-c", "-o", opts)
    info = qimg.info(img)
    assert info["format-specific"]["data"]["compression-type"] == (
        "zstd" if "zstd" in opts else "zlib"
    )
    image = Qcow2Image(img)
    model = bytearray(data)
    try:
        got = bytearray(size)
        image.read(0, [memoryview(got)])
        assert got == model
        rng = random.Random(opts)
        for _ in range(40):
            off = rng.randrange(size // 512) * 512
            n = min(rng.randrange(1, 300) * 512, size - off)
            op = rng.randrange(3)
            if op == 0:
                buf = rng.randbytes(n)
                image.write(off, [memoryview(buf)])
                model[off : off + n] = buf
            elif op == 1:
                image.zero(off, n, unmap=rng.random() < 0.5)
                model[off : off + n] = bytes(n)
            else:
                image.zero(off, n, unmap=True, discard=True)
                unit = image.sub_size
                first, last = -(-off // unit) * unit, (off + n) // unit * unit
                if first < last:
                    model[first:last] = bytes(last - first)
        image.read(0, [memoryview(got)])
        assert got == model
    finally:
        image.close()
    qimg.check(img)
    out = tmp_path / "model.raw"
    out.write_bytes(model)
    qimg.compare(img, out)
