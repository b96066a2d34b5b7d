"""Opening qcow2 images (``header.py``, ``image.py``): what ``qemu-img create`` makes
is understood as ``qemu-img info`` describes it; what we cannot serve is refused
with one clear error, and hostile metadata never crashes or reaches outside the
image's own clusters."""

from __future__ import annotations

import struct
import subprocess

import pytest

from virtio.devices.blk.qcow2 import Qcow2FormatError, Qcow2Image
from virtio.devices.blk.qcow2.header import EXT_FEATURE_NAMES, Header
from virtio.errors import BackendIOError
from virtio.testing.qemu_img import qemu_img_create


@pytest.mark.parametrize(
    "opts",
    [
        {},
        {"compat": "0.10", "cluster_size": 512},
        {"cluster_size": 2 << 20, "refcount_bits": 64},
        {"extended_l2": True, "lazy_refcounts": True, "refcount_bits": 2},
        {"extra": ("-o", "compression_type=zstd")},
    ],
    ids=["default", "v2-512", "2m-r64", "extl2-lazy-r2", "zstd"],
)
def test_header_reads_as_qemu_img_info_says(qimg, tmp_path, opts):
    img = qimg.create(tmp_path / "d.qcow2", 100 << 20, **opts)
    info = qimg.info(img)
    hdr = Header.parse(img.read_bytes()[: 2 << 20])
    assert hdr.size == info["virtual-size"]
    assert hdr.cluster_size == info["cluster-size"]
    spec = info["format-specific"]["data"]
    assert hdr.version == (2 if spec["compat"] == "0.10" else 3)
    if hdr.version == 3:
        assert hdr.refcount_bits == spec["refcount-bits"]
        assert hdr.lazy_refcounts == spec["lazy-refcounts"]
        assert hdr.extended_l2 == spec.get("extended-l2", False)
    assert ("zstd" if hdr.compression_type else "zlib") == spec["compression-type"]


def _patch(path, offset: int, fmt: str, *values) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, *values))


def _incompat(path) -> int:
    return struct.unpack(">Q", path.read_bytes()[72:80])[0]


def test_unknown_incompatible_feature_is_refused_by_name(qimg, tmp_path):
    img = qimg.create(tmp_path / "d.qcow2", 1 << 20)
    head = bytearray(img.read_bytes()[:65536])
    # Rename the first feature-name-table entry to bit 9, "frobnication".
    pos = 104
    while struct.unpack_from(">I", head, pos)[0] != EXT_FEATURE_NAMES:
        pos += 8 + ((struct.unpack_from(">I", head, pos + 4)[0] + 7) & ~7)
    head[pos + 8 : pos + 8 + 48] = bytes([0, 9]) + b"frobnication".ljust(46, b"\0")
    struct.pack_into(">Q", head, 72, 1 << 9 | 1 << 12)
    with open(img, "r+b") as f:
        f.write(head)
    with pytest.raises(Qcow2FormatError, match=r"frobnication, bit 12"):
        Qcow2Image(img, read_only=True)


@pytest.mark.parametrize("bit", [0, 1], ids=["dirty", "corrupt"])
def test_dirty_or_corrupt_image_is_served_read_only_only(qimg, tmp_path, bit):
    img = qimg.create(tmp_path / "d.qcow2", 1 << 20)
    qimg.io(img, "write -P 0x5a 0 64k")
    _patch(img, 72, ">Q", _incompat(img) | 1 << bit)
    with pytest.raises(Qcow2FormatError, match="qemu-img check -r all"):
        Qcow2Image(img)
    image = Qcow2Image(img, read_only=True)
    try:
        buf = bytearray(512)
        image.read(0, [memoryview(buf)])
        assert buf == b"\x5a" * 512
        with pytest.raises(BackendIOError, match="read-only"):
            image.write(0, [memoryview(bytes(512))])
    finally:
        image.close()


def test_snapshots_and_bitmaps(qimg, tmp_path):
    img = qimg.create(tmp_path / "d.qcow2", 1 << 20)
    qimg.io(img, "write -P 1 0 64k")
    subprocess.run(["qemu-img", "snapshot", "-c", "s1", str(img)], check=True)
    with pytest.raises(Qcow2FormatError, match="internal snapshots"):
        Qcow2Image(img)
    Qcow2Image(img, read_only=True).close()
    # A persistent bitmap sets an auto-clear bit: a writer clears it first.
    img2 = qimg.create(tmp_path / "b.qcow2", 1 << 20)
    subprocess.run(["qemu-img", "bitmap", "--add", str(img2), "b0"], check=True)
    assert struct.unpack(">Q", img2.read_bytes()[88:96])[0] & 1
    image = Qcow2Image(img2)
    image.write(0, [memoryview(b"x" * 512)])
    image.close()
    assert struct.unpack(">Q", img2.read_bytes()[88:96])[0] == 0
    qimg.check(img2)


def test_encrypted_and_external_data_file_are_refused(qimg, tmp_path):
    enc = tmp_path / "e.qcow2"
    qemu_img_create(
        "-f", "qcow2", "--object", "secret,id=s0,data=pw",
        "-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
        str(enc), "1M",
    )  # fmt: skip
    with pytest.raises(Qcow2FormatError, match="encrypted"):
        Qcow2Image(enc)
    ext = qimg.create(tmp_path / "x.qcow2", 1 << 20, extra=("-o", f"data_file={tmp_path}/x.raw"))
    with pytest.raises(Qcow2FormatError, match="external data file"):
        Qcow2Image(ext)


def test_backing_chain_loop_is_refused(qimg, tmp_path):
    a = qimg.create(tmp_path / "a.qcow2", 1 << 20)
    b = qimg.create(tmp_path / "b.qcow2", 1 << 20, backing=a)
    subprocess.run(
        ["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2"],
        check=True,
        cwd=tmp_path,
    )
    with pytest.raises(Qcow2FormatError, match="loops"):
        Qcow2Image(b)


def test_three_level_chain_reads_fall_through(qimg, tmp_path):
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x01" * (1 << 20))
    mid = qimg.create(tmp_path / "mid.qcow2", 2 << 20, backing=base, backing_fmt="raw")
    qimg.io(mid, "write -P 2 64k 64k")
    top = qimg.create(tmp_path / "top.qcow2", 2 << 20, backing=mid)
    qimg.io(top, "write -P 3 96k 4k")
    image = Qcow2Image(top)
    try:
        assert image.chain_depth == 3
        buf = bytearray(2 << 20)
        image.read(0, [memoryview(buf)])
        want = bytearray(b"\x01" * (1 << 20) + bytes(1 << 20))
        want[64 << 10 : 128 << 10] = b"\x02" * (64 << 10)
        want[96 << 10 : 100 << 10] = b"\x03" * 4096
        assert buf == want
    finally:
        image.close()


def _l1_offset(path) -> int:
    return struct.unpack(">Q", path.read_bytes()[40:48])[0]


def _field(path, offset: int) -> int:
    return struct.unpack(">Q", path.read_bytes()[offset : offset + 8])[0]


def _l2_of_cluster0(path) -> int:
    return _field(path, _l1_offset(path)) & 0x00FF_FFFF_FFFF_FE00


def _data_at(path, what: int) -> None:
    """Point guest cluster 0's L2 entry (COPIED) at ``what``."""
    _patch(path, _l2_of_cluster0(path), ">Q", 1 << 63 | what)


@pytest.mark.parametrize(
    ("what", "patch"),
    [
        ("L2 table over the L1 table", lambda p: _patch(p, _l1_offset(p), ">Q", _l1_offset(p))),
        ("L2 table in the header", lambda p: _patch(p, _l1_offset(p), ">Q", 1 << 63 | 512)),
        ("L2 table past the end", lambda p: _patch(p, _l1_offset(p), ">Q", 1 << 40)),
        ("misaligned L2 table", lambda p: _patch(p, _l1_offset(p), ">Q", 0x10200)),
        ("data over the refcount table", lambda p: _data_at(p, _field(p, 48))),
        ("data over the L1 table", lambda p: _data_at(p, _l1_offset(p))),
        ("data over its own L2 table", lambda p: _data_at(p, _l2_of_cluster0(p))),
        ("data past the end", lambda p: _data_at(p, 1 << 40)),
        (
            "refcount block over the L1 table",
            lambda p: _patch(p, _field(p, 48), ">Q", _l1_offset(p)),
        ),
    ],
)
def test_hostile_l1_entries_give_a_clear_error(qimg, tmp_path, what, patch):
    img = qimg.create(tmp_path / "d.qcow2", 1 << 20)
    qimg.io(img, "write -P 7 0 64k")
    patch(img)
    before = img.read_bytes()
    try:
        image = Qcow2Image(img)
    except Qcow2FormatError:  # refused at open: as good
        assert img.read_bytes() == before
        return
    try:
        with pytest.raises(Qcow2FormatError):
            image.read(0, [memoryview(bytearray(512))])
        with pytest.raises(Qcow2FormatError):
            image.write(0, [memoryview(b"\xff" * 512)])
    finally:
        image.f.close()  # no flush: nothing may have been written
    assert img.read_bytes() == before


@pytest.mark.parametrize(
    ("offset", "fmt", "value", "match"),
    [
        (20, ">I", 30, "cluster_bits"),
        (36, ">I", 1 << 30, "L1 table"),
        (48, ">Q", 1 << 40, "refcount_table_offset"),
        (4, ">I", 4, "version 4"),
        (0, ">4s", b"QFI\x00", "magic"),
    ],
)
def test_hostile_headers_are_refused(qimg, tmp_path, offset, fmt, value, match):
    img = qimg.create(tmp_path / "d.qcow2", 1 << 20)
    _patch(img, offset, fmt, value)
    with pytest.raises(Qcow2FormatError, match=match):
        Qcow2Image(img)
