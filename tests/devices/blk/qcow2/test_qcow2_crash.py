"""SIGKILL at random points (``image.py``'s metadata ordering).

A child process runs a seeded sequence of writes, write-zeroes and discards on a
qcow2 image made by qemu-img, flushing now and then and saying so on stdout after
each flush returned.  It dies by SIGKILL just before its N-th write or sync of
the image, N drawn at random from all of them (a first run counts them): the
points between two I/O calls are the ones where the order of metadata writes
matters.  (A SIGKILL loses nothing already written to the page cache: what this
checks is the order of the writes; the ``fdatasync`` placement is argued in
``image.py``.)  Afterwards
``qemu-img check`` must find no corruption (leaked clusters are allowed, as with
QEMU), and every sector must hold what the last acknowledged flush made durable,
or -- for a sector a later operation touched -- one of the values that operation
sequence gave it.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys

import pytest

from virtio.devices.blk.qcow2 import Qcow2Image

CHILD = r"""
import json, os, random, signal, sys
from virtio.devices.blk.qcow2 import Qcow2Image
from virtio.devices.blk.qcow2.hostfile import HostFile
args = json.loads(sys.argv[1])
calls = 0

def dies_at(method):
    # SIGKILL ourselves just before the kill_at-th write or sync of the image
    def wrapped(self, *a):
        global calls
        calls += 1
        if calls == args["kill_at"]:
            os.kill(os.getpid(), signal.SIGKILL)
        return method(self, *a)
    return wrapped

for name in ("pwrite", "pwritev", "sync"):
    setattr(HostFile, name, dies_at(getattr(HostFile, name)))
image = Qcow2Image(args["path"], l2_cache_size=args["cache"], refcount_cache_size=args["cache"])
for i, (op, off, n, arg) in enumerate(args["ops"]):
    if op == "write":
        image.write(off, [memoryview(random.Random(arg).randbytes(n))])
    elif op == "zero":
        image.zero(off, n, unmap=bool(arg))
    elif op == "discard":
        image.zero(off, n, unmap=True, discard=True)
    else:
        image.flush()
        print(i, flush=True)
print("done", calls, flush=True)
"""


def _ops(rng: random.Random, size: int, cs: int, n: int) -> list:
    ops = []
    sectors = size // 512
    for _ in range(n):
        r = rng.random()
        if r < 0.15:
            ops.append(("flush", 0, 0, 0))
            continue
        if rng.random() < 0.5:
            start = rng.randrange(sectors)
            count = rng.randrange(1, min(sectors - start, 300) + 1)
        else:
            c = rng.randrange(size // cs)
            start, count = c * cs // 512, cs // 512 * rng.randrange(1, 3)
            count = min(count, sectors - start)
        kind = "write" if r < 0.7 else "zero" if r < 0.85 else "discard"
        ops.append((kind, start * 512, count * 512, rng.randrange(2**32)))
    return ops


def _apply(model: bytearray, op, unit: int) -> None:
    kind, off, n, arg = op
    if kind == "write":
        model[off : off + n] = random.Random(arg).randbytes(n)
    elif kind == "zero":
        model[off : off + n] = bytes(n)
    elif kind == "discard":
        first, last = -(-off // unit) * unit, (off + n) // unit * unit
        if first < last:
            model[first:last] = bytes(last - first)


CONFIGS = {
    "64k": {},
    "512b-tiny-cache": {"cluster_size": 512, "cache": 1024},
    "extl2-backed": {"cluster_size": 32768, "extended_l2": True, "backed": True},
    "4k-backed-tiny-cache": {"cluster_size": 4096, "backed": True, "cache": 8192},
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_sigkill_at_random_points(qimg, tmp_path, name):
    cfg = dict(CONFIGS[name])
    cache = cfg.pop("cache", None)
    backed = cfg.pop("backed", False)
    cs = cfg.get("cluster_size", 65536)
    size = 4 << 20
    rng = random.Random(name)
    ops = _ops(rng, size, cs, 120)
    base = rng.randbytes(3 << 20) if backed else b""
    total = None
    for round_ in range(8):
        d = tmp_path / f"r{round_}"
        d.mkdir()
        backing = None
        if backed:
            backing = d / "base.raw"
            backing.write_bytes(base)
        img = qimg.create(d / "d.qcow2", size, backing=backing, backing_fmt="raw", **cfg)
        probe = Qcow2Image(img, read_only=True)
        unit = probe.sub_size
        probe.close()
        kill_at = 0 if total is None else rng.randrange(1, total + 1)
        args = json.dumps({"path": str(img), "cache": cache, "ops": ops, "kill_at": kill_at})
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, args], capture_output=True, text=True, timeout=120
        )
        lines = proc.stdout.split()
        if total is None:  # the counting run: it must finish
            assert proc.returncode == 0 and lines[-2] == "done", proc.stderr
            total = int(lines[-1])
            acked = int(lines[-3]) if len(lines) > 2 else -1  # the last flush
        else:
            assert proc.returncode == -signal.SIGKILL, proc.stderr
            acked = int(lines[-1]) if lines else -1
        qimg.check(img)  # corruption fails here; leaks are allowed
        # What the guest may see now.
        model = bytearray(size)
        model[: len(base)] = base
        for op in ops[: acked + 1]:
            _apply(model, op, unit)
        candidates: dict[int, set[bytes]] = {}
        later = bytearray(model)
        for op in ops[acked + 1 :]:
            _apply(later, op, unit)
            _, off, n, _ = op
            for s in range(off // 512, (off + n) // 512):
                candidates.setdefault(s, {bytes(model[s * 512 : s * 512 + 512])}).add(
                    bytes(later[s * 512 : s * 512 + 512])
                )
        raw = d / "now.raw"
        qimg.convert(img, raw, out_fmt="raw")
        now = raw.read_bytes()
        for s in range(size // 512):
            got = now[s * 512 : s * 512 + 512]
            allowed = candidates.get(s, {bytes(model[s * 512 : s * 512 + 512])})
            assert got in allowed, f"round {round_}: sector {s} (flush acked after op {acked})"
