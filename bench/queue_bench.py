#!/usr/bin/env python3
"""Virtqueue engine throughput: descriptor chains per second, pop + add_used.

Measures the device side only (the driver refills the ring between timed rounds):
split and packed rings, 1- and 3-descriptor chains, through

- ``batch``: ``Virtqueue.pop_raw`` / ``add_used_raw`` (one native call per batch);
- ``per-chain``: ``Virtqueue.pop()`` / ``add_used()`` (a Python object per chain, the
  path a device's ``handle`` sees);
- ``handle``: the per-chain path plus what a request handler does with the chain: a
  ``ChainReader`` reads up to 16 header bytes (when the chain has readable buffers)
  and a ``ChainWriter`` writes a 1-byte status, whose length goes to ``add_used``.

``chains/s`` and ``ns/chain`` divide the chains by the thread's CPU time
(``time.thread_time``), so that time during which other processes had the CPU does
not count; ``best ns`` is the fastest round's wall-clock time per chain (the CPU
clock may tick too coarsely for one round), which varies least between runs on a
shared machine.

Usage: python bench/queue_bench.py [--size 256] [--seconds 1.0] [--batch 64]
"""

from __future__ import annotations

import argparse
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from virtio.memory import BytearrayGuestMemory
from virtio.queues import QueueState, Virtqueue
from virtio.spec.ring import PackedDescFlag, VringDescFlag

NEXT = int(VringDescFlag.VRING_DESC_F_NEXT)
WRITE = int(VringDescFlag.VRING_DESC_F_WRITE)
AVAIL = int(PackedDescFlag.VRING_PACKED_DESC_F_AVAIL)
USED = int(PackedDescFlag.VRING_PACKED_DESC_F_USED)

DESC, DRIVER, DEVICE, DATA = 0x0, 0x100000, 0x200000, 0x400000


class Ring:
    """A minimal driver that keeps the ring full of identical chains."""

    def __init__(self, packed: bool, size: int, ndesc: int) -> None:
        self.chains = size // ndesc
        if packed:  # any size is valid (§2.8): make the chains tile the ring exactly
            size = self.chains * ndesc
        self.packed, self.size, self.ndesc = packed, size, ndesc
        self.mem = BytearrayGuestMemory(0x800000)
        self.q = Virtqueue(
            self.mem,
            QueueState(
                size=size,
                desc_addr=DESC,
                driver_addr=DRIVER,
                device_addr=DEVICE,
                packed=packed,
                event_idx=True,
                signalled_used_valid=True,
            ),
        )
        self.avail_idx = 0
        self.wrap = 1
        descs = bytearray()
        for c in range(self.chains):
            for k in range(ndesc):
                flags = WRITE if k == ndesc - 1 else 0
                if k < ndesc - 1:
                    flags |= NEXT
                addr = DATA + (c * ndesc + k) * 512
                if packed:
                    descs += struct.pack("<QIHH", addr, 512, c, flags)
                else:
                    descs += struct.pack("<QIHH", addr, 512, flags, c * ndesc + k + 1)
        self.template = bytes(descs)
        self.mem.write(DESC, self.template)
        if not packed:
            heads = struct.pack(f"<{size}H", *[(i % self.chains) * ndesc for i in range(size)])
            self.mem.write(DRIVER + 4, heads)
        self.flag_views = None

    def refill(self) -> int:
        """Make ``chains`` chains available (untimed)."""
        if self.packed:
            view = self.mem.regions[0].buffer
            bits = AVAIL if self.wrap else USED
            for i in range(self.chains * self.ndesc):
                off = DESC + 16 * i + 14
                k = i % self.ndesc
                flags = (WRITE if k == self.ndesc - 1 else 0) | (NEXT if k < self.ndesc - 1 else 0)
                view[off : off + 2] = (flags | bits).to_bytes(2, "little")
            self.wrap ^= 1
        else:
            self.avail_idx = (self.avail_idx + self.chains) & 0xFFFF
            self.mem.store_release_u16(DRIVER + 2, self.avail_idx)
        return self.chains


def run(
    packed: bool, ndesc: int, mode: str, size: int, seconds: float, batch: int
) -> tuple[float, float]:
    """Chains per second over all rounds, and the fastest round's seconds per chain."""
    ring = Ring(packed, size, ndesc)
    q = ring.q
    total = 0
    busy = 0.0
    best = float("inf")
    status = b"\0"
    while busy < seconds:
        n_round = ring.refill()
        c0, t0 = time.thread_time(), time.perf_counter()
        if mode == "batch":
            while q.pop_raw(batch):
                q.add_used_raw()
                q.needs_notification()
        elif mode == "per-chain":
            while (chain := q.pop()) is not None:
                q.add_used(chain, 0)
            q.needs_notification()
        else:
            while (chain := q.pop()) is not None:
                if chain.readable_len:
                    chain.reader().read(16)
                writer = chain.writer()
                writer.write(status)
                q.add_used(chain, writer.written)
            q.needs_notification()
        dt = time.perf_counter() - t0
        busy += time.thread_time() - c0
        total += n_round
        best = min(best, dt / n_round)
    return total / busy, best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256, help="queue size (default 256)")
    ap.add_argument("--seconds", type=float, default=1.0, help="device time per cell")
    ap.add_argument("--batch", type=int, default=64, help="chains per native call")
    args = ap.parse_args()
    print(f"queue size {args.size}, batch {args.batch}, {args.seconds:.1f} s device time per row")
    print(f"{'ring':<7} {'descs':>5} {'path':<10} {'chains/s':>12} {'ns/chain':>9} {'best ns':>8}")
    for packed in (False, True):
        for ndesc in (1, 3):
            for mode in ("batch", "per-chain", "handle"):
                rate, best = run(packed, ndesc, mode, args.size, args.seconds, args.batch)
                ring = "packed" if packed else "split"
                print(
                    f"{ring:<7} {ndesc:>5} {mode:<10} {rate:>12,.0f} {1e9 / rate:>9.0f}"
                    f" {best * 1e9:>8.0f}"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
