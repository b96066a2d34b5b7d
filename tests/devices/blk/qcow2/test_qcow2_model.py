"""Random write / write-zeroes / discard / flush sequences on qcow2 images made by
``qemu-img create``, against a raw model (Hypothesis).

After every sequence: our read-back equals the model, ``qemu-img check`` finds no
corruption and no leak, and ``qemu-img compare`` sees the model's bytes.  A second
property runs the same writes through ``qemu-io`` on a copy of the image and
``qemu-img compare``s both results.  Configurations: cluster sizes 512 B to 2 MiB,
extended L2 entries, version 2, refcount widths 1..64, lazy refcounts, and a
backing chain (qcow2 over raw, shorter than the overlay).
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtio.devices.blk.qcow2 import Qcow2Image
from virtio.devices.blk.qcow2.native import BACKING, IN_PLACE, backing_value, map_value

CONFIGS = {
    "64k": {},
    "512b": {"cluster_size": 512},
    "4k-refcount1": {"cluster_size": 4096, "refcount_bits": 1},
    "2m-refcount64": {"cluster_size": 2 << 20, "refcount_bits": 64},
    "v2": {"compat": "0.10"},
    "extl2-16k": {"cluster_size": 16384, "extended_l2": True},
    "extl2-64k-lazy": {"extended_l2": True, "lazy_refcounts": True},
    "refcount8-8k": {"cluster_size": 8192, "refcount_bits": 8},
    # two-table caches: every L2 load evicts (write-back in metadata order)
    "512b-tiny-cache": {"cluster_size": 512, "cache": 1024},
    "extl2-16k-tiny-cache": {"cluster_size": 16384, "extended_l2": True, "cache": 32768},
}
BACKED = {
    "backed-64k": {},
    "backed-extl2": {"cluster_size": 32768, "extended_l2": True},
    "backed-v2": {"compat": "0.10", "cluster_size": 4096},
    "backed-512b": {"cluster_size": 512},
    "backed-512b-tiny-cache": {"cluster_size": 512, "cache": 1024},
}


def _size(cs: int) -> int:
    return max(cs * 12, 1 << 20) + 1536  # a partial last cluster


def _ops(size: int, cluster: int, unit: int):
    """Operations on sector ranges: arbitrary ones, and ones aligned to clusters or
    subclusters (those are the ones that change the mapping)."""
    sectors = size // 512
    free = st.integers(0, sectors - 1).flatmap(
        lambda s: st.tuples(st.just(s), st.integers(1, min(sectors - s, 2048)))
    )

    def aligned(step: int):
        step //= 512
        return st.tuples(st.integers(0, (sectors - 1) // step), st.integers(1, 4)).map(
            lambda t: (t[0] * step, min(t[1] * step, sectors - t[0] * step))
        )

    span = st.one_of(free, aligned(cluster), aligned(unit))
    return st.lists(
        st.one_of(
            st.tuples(st.just("write"), span, st.integers(0, 2**32 - 1)),
            st.tuples(st.just("zero"), span, st.booleans()),
            st.tuples(st.just("discard"), span, st.just(0)),
            st.tuples(st.just("flush"), st.just((0, 0)), st.just(0)),
            st.tuples(st.just("reopen"), st.just((0, 0)), st.just(0)),
        ),
        min_size=1,
        max_size=30,
    )


def _data(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


class Model:
    def __init__(self, image: Qcow2Image, base: bytes) -> None:
        self.data = bytearray(image.size)
        self.data[: len(base)] = base[: image.size]
        self.unit = image.sub_size
        self.discard_shows_backing = image.version < 3 and image.backing is not None

    def discard(self, off: int, n: int) -> None:
        if self.discard_shows_backing:
            return
        first = -(-off // self.unit) * self.unit
        last = (off + n) // self.unit * self.unit
        if first < last:
            self.data[first:last] = bytes(last - first)


def _open(path: Path, cfg: dict) -> Qcow2Image:
    cache = cfg.get("cache")
    image = Qcow2Image(path, l2_cache_size=cache, refcount_cache_size=cache)
    # the map the native data plane reads through (over a raw base: its clusters too)
    image.enable_native_reads(backing=True)
    return image


def _check_native_map(image: Qcow2Image, model: Model, *, complete: bool) -> None:
    """Every cluster the native map names is plain data at that host offset now,
    and reading it there (what the native data plane does) gives the model's bytes;
    ``complete`` (every L2 table used since the image was opened): it names every
    plain data cluster."""
    native = image.native
    assert native is not None
    cs = image.cs
    raw_base = image.native_backing_size
    for gc in range(-(-image.size // cs)):
        host = native.lookup(gc)
        if host or complete:
            entry, bitmap = image._entry(gc)
            want = map_value(
                entry, bitmap, extended=image.extended, version=image.version, writable=True
            )
            if raw_base and entry == 0 and bitmap == 0:  # the raw base's, or Python's
                want = backing_value(gc, image.cluster_bits, raw_base)
                assert host in (want, 0), (gc, host, want)  # (0: made unallocated again)
            else:
                assert host == want, (gc, host, want)
        if host:
            n = min(cs, image.size - gc * cs)
            at = host & ~(IN_PLACE | BACKING)
            fd = image.backing.file.fileno if host & BACKING else image.f.fileno
            assert os.pread(fd, n, at) == model.data[gc * cs : gc * cs + n], gc


def _run(image: Qcow2Image, path: Path, ops, model: Model, cfg: dict) -> Qcow2Image:
    for op, (sector, count), arg in ops:
        off, n = sector * 512, count * 512
        if op == "write":
            data = _data(arg, n)
            image.write(off, [memoryview(data)])
            model.data[off : off + n] = data
        elif op == "zero":
            image.zero(off, n, unmap=arg)
            model.data[off : off + n] = bytes(n)
        elif op == "discard":
            image.zero(off, n, unmap=True, discard=True)
            model.discard(off, n)
        elif op == "flush":
            image.flush()
        else:
            image.close()
            image = _open(path, cfg)
    return image


def _make(qimg, tmp: Path, name: str, cfg: dict, backed: bool | str) -> tuple[Path, bytes]:
    cs = cfg.get("cluster_size", 65536)
    size = _size(cs)
    base = b""
    backing = None
    if backed:
        base_raw = tmp / "base.raw"
        base = _data(7, size - 3 * cs - 512)
        base_raw.write_bytes(base)
        backing = base_raw
        if backed != "raw":
            backing = qimg.convert(base_raw, tmp / "base.qcow2", "-o", f"cluster_size={cs}")
    opts = {k: v for k, v in cfg.items() if k != "cache"}
    if backed == "raw":
        opts["backing_fmt"] = "raw"
    img = qimg.create(tmp / f"{name}.qcow2", size, backing=backing, **opts)
    return img, base


def _fresh_dir(tmp_path_factory, name: str) -> Path:
    d = tmp_path_factory.mktemp(name)
    return d


@pytest.mark.parametrize(
    ("name", "cfg", "backed"),
    [(k, v, False) for k, v in CONFIGS.items()]
    + [(k, v, "qcow2") for k, v in BACKED.items()]
    # a raw base: the native map names its clusters too (QCOW2_MAP_BACKING)
    + [(f"raw-{k}", BACKED[k], "raw") for k in ("backed-64k", "backed-extl2", "backed-v2")],
)
def test_random_sequences_match_a_raw_model(qimg, tmp_path_factory, name, cfg, backed):
    @settings(
        max_examples=15,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        database=None,
    )
    @given(data=st.data())
    def run(data):
        tmp = _fresh_dir(tmp_path_factory, name)
        try:
            img, base = _make(qimg, tmp, name, cfg, backed)
            image = _open(img, cfg)
            model = Model(image, base)
            ops = data.draw(_ops(image.size, image.cs, image.sub_size))
            image = _run(image, img, ops, model, cfg)
            _check_native_map(image, model, complete=False)
            got = bytearray(image.size)
            image.read(0, [memoryview(got)])
            assert got == model.data
            _check_native_map(image, model, complete=True)
            image.close()
            report = qimg.check(img)
            assert report.get("leaks", 0) == 0, report
            raw = tmp / "model.raw"
            raw.write_bytes(model.data)
            qimg.compare(img, raw)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    run()


WRITE_CONFIGS = {"64k": {}, "extl2-32k": {"cluster_size": 32768, "extended_l2": True}}


@pytest.mark.parametrize("backed", [False, True], ids=["plain", "backed"])
@pytest.mark.parametrize("name", sorted(WRITE_CONFIGS))
def test_same_result_as_qemu_io(qimg, tmp_path_factory, name, backed):
    """The same writes and write-zeroes through qemu-io give the same disk."""
    cfg = WRITE_CONFIGS[name]

    @settings(
        max_examples=8,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        database=None,
    )
    @given(data=st.data())
    def run(data):
        tmp = _fresh_dir(tmp_path_factory, name)
        try:
            img, base = _make(qimg, tmp, name, cfg, backed)
            theirs = tmp / "theirs.qcow2"
            shutil.copyfile(img, theirs)
            image = Qcow2Image(img)
            ops = [
                o
                for o in data.draw(_ops(image.size, image.cs, image.sub_size))
                if o[0] in ("write", "zero", "flush")
            ]
            cmds = []
            for i, (op, (sector, count), arg) in enumerate(ops):
                off, n = sector * 512, count * 512
                if op == "write":
                    src = tmp / f"w{i}"
                    src.write_bytes(_data(arg, n))
                    cmds.append(f"write -q -s {src} {off} {n}")
                elif op == "zero":
                    cmds.append(f"write -q -z {'-u ' if arg else ''}{off} {n}")
                else:
                    cmds.append("flush")
            _run(image, img, ops, Model(image, base), cfg).close()
            if cmds:
                qimg.io(theirs, *cmds)
            qimg.check(img)
            qimg.compare(img, theirs, "qcow2", "qcow2")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    run()


def test_reads_past_a_short_backing_file_are_zeros(qimg, tmp_path):
    base = tmp_path / "base.raw"
    base.write_bytes(b"\xab" * 4096)
    top = qimg.create(tmp_path / "top.qcow2", 1 << 20, backing=base, backing_fmt="raw")
    with_backing = Qcow2Image(top)
    try:
        buf = bytearray(8192)
        with_backing.read(0, [memoryview(buf)])
        assert buf == b"\xab" * 4096 + bytes(4096)
    finally:
        with_backing.close()
    assert os.path.exists(base)
