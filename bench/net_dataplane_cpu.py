#!/usr/bin/env python3
"""CPU per frame of the native virtio-net path alone, no peer, one CPU.

Two in-memory guests on one switch (``virtio/devices/net``), native data plane on,
no offloads and no EVENT_IDX (what testpmd's virtio-user negotiates): guest A's
transmit ring holds ``--ring`` frames (virtio_net_hdr + an Ethernet frame of
``--size`` bytes in one readable descriptor, as testpmd sends them), guest B's
receive ring as many 2048-byte buffers.  One kick, and A's transmit thread
forwards the lot through the switch into B's buffers.  The driver side keeps the
same buffers and re-arms both rings from a template between rounds (untimed, and
light enough to leave the caches mostly alone).

Timed: the on-CPU time of the data plane threads (``/proc/self/task/TID/schedstat``)
over the frames forwarded, after a warm-up -- the per-frame work plus one wake-up
per ring's worth, without the cross-CPU line transfers a real peer adds.  Where
``bench/net_testpmd.py`` answers "how fast against DPDK", this answers "how much
work is one frame" steadily enough to compare two builds: ``--baseline-repo`` runs
another checkout the same way, alternating round by round, and prints the paired
ratio.  Pin it to one CPU (the driver and the data plane then share it).

Usage::

    taskset -c 1 python bench/net_dataplane_cpu.py [--packed] [--size 60] [--rounds 5] \
        [--queue-pairs 2] [--baseline-repo DIR]
    python bench/net_dataplane_cpu.py --instructions --ring 256 --frames 20000 [...]

``--instructions`` counts instead of timing (valgrind's callgrind): the instructions
per frame of the serving step, the same figure on a fast or a slow machine, where
time per frame moved 3x with the machine's state from one day to the next.

With ``--queue-pairs 2`` both ports have two pairs in use (MQ, no control queue, as
under vhost-user): the transmit batch hashes its frames' flows, notes them for
steering (§5.1.9.5.6), and the receiving port picks its queue by them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def measure(packed: bool, size: int, ring: int, frames: int, pairs: int = 1) -> tuple[float, int]:
    """ns of data plane CPU per forwarded frame, and the frames forwarded in all
    (warm-up included; run inside the checkout to measure)."""
    import struct

    import trio
    import trio.testing

    from virtio.device import ActiveDevice
    from virtio.devices.net import Switch, VirtioNet
    from virtio.devices.net.packet import HDR
    from virtio.memory import MmapGuestMemory
    from virtio.queues import Virtqueue
    from virtio.spec.features import TransportFeature as TF
    from virtio.spec.net import NetFeature as NF
    from virtio.testing.driver import P_AVAIL, P_USED, WRITE, DriverQueue, footprint
    from virtio.testing.harness import EventfdNotifier, thread_cpu_ns
    from virtio.testing.net_frames import MAC_A, MAC_B, ether

    rx, tx, buf = 0, 1, 2048
    frame = HDR.pack(0, 0, 0, 0, 0, 0, 0) + ether(MAC_B, MAC_A, bytes(size - 14))

    class Ring:
        """A driver that keeps the same ``ring`` one-descriptor buffers (buffer i at
        data + i * buf, id i) and re-arms all of them at once: cheap enough that the
        untimed driver side barely disturbs the caches between rounds."""

        def __init__(self, mem, base: int, writable: bool) -> None:
            self.mem, self.dq = mem, DriverQueue(mem, ring, base=base, packed=packed)
            d = self.dq
            flags = WRITE if writable else 0
            self.templates = []
            for wrap in (1, 0):
                bits = (P_AVAIL if wrap else P_USED) if packed else 0
                t = bytearray()
                length = buf if writable else len(frame)
                for i in range(ring):  # packed: id i + flags; split: flags + next 0
                    word = (i, flags | bits) if packed else (flags, 0)
                    t += struct.pack("<QIHH", d.data_addr + i * buf, length, *word)
                self.templates.append(bytes(t))
            # no used buffer notifications, as a polling driver (testpmd) asks:
            # packed event flags DISABLE (§2.8.10), split VRING_AVAIL_F_NO_INTERRUPT
            mem.write(d.driver_addr + (2 if packed else 0), struct.pack("<H", 1))
            if not packed:
                mem.write(d.driver_addr + 4, struct.pack(f"<{ring}H", *range(ring)))
            if not writable:
                for i in range(ring):
                    mem.write(d.data_addr + i * buf, frame)
            self.round = 0

        def arm(self) -> None:
            d, t = self.dq, self.templates[self.round % 2 if packed else 0]
            if packed:  # the first descriptor's flags last (§2.8.21)
                self.mem.write(d.desc_addr + 16, t[16:])
                self.mem.write(d.desc_addr, t[:14])
                self.mem.store_release_u16(d.desc_addr + 14, struct.unpack_from("<H", t, 14)[0])
            else:
                self.mem.write(d.desc_addr, t)
                self.mem.store_release_u16(d.driver_addr + 2, ((self.round + 1) * ring) & 0xFFFF)
            self.round += 1

        def done(self) -> bool:
            d = self.dq
            if packed:
                f = self.mem.load_acquire_u16(d.desc_addr + 16 * (ring - 1) + 14)
                w = self.round % 2  # the wrap the device used the last round with
                return bool(f & P_AVAIL) == bool(f & P_USED) == bool(w)
            return self.mem.load_acquire_u16(d.device_addr + 2) == (self.round * ring) & 0xFFFF

    class Guest:
        def __init__(self, dev: VirtioNet) -> None:
            feats = dev.offered_features()
            if pairs == 1:
                feats &= ~NF.VIRTIO_NET_F_MQ.mask
            feats &= ~TF.VIRTIO_F_EVENT_IDX.mask
            if not packed:
                feats &= ~TF.VIRTIO_F_RING_PACKED.mask
            feats &= ~NF.VIRTIO_NET_F_CSUM.mask  # testpmd's virtio-user: no offloads
            dev.ack_features(feats)
            per = footprint(ring, packed=packed, event_idx=False) + ring * buf + 4096
            # with MQ and no control queue (as vhost-user serves it) every pair is in
            # use (§5.1.9.5.5): all receive queues armed, transmitq1 sends
            qis = (rx, tx, *(2 * k for k in range(1, pairs)))
            self.mem = MmapGuestMemory.anonymous(len(qis) * per + 4096)
            self.rings = {qi: Ring(self.mem, i * per, qi % 2 == 0) for i, qi in enumerate(qis)}
            self.rx = [qi for qi in qis if qi % 2 == 0]
            queues = {
                qi: Virtqueue(self.mem, r.dq.state(), name=f"{dev.name}q{qi}")
                for qi, r in self.rings.items()
            }
            self.notifiers = {qi: EventfdNotifier() for qi in qis}
            self.errors: list = []
            self.active = ActiveDevice(self.mem, feats, queues, self.notifiers, self.errors.append)

    sw = Switch()
    a = VirtioNet(name="a", switch=sw, mac=MAC_A, num_queue_pairs=pairs)
    b = VirtioNet(name="b", switch=sw, mac=MAC_B, num_queue_pairs=pairs)
    ga, gb = Guest(a), Guest(b)
    result = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.run, ga.active)
            nursery.start_soon(b.run, gb.active)
            await trio.testing.wait_all_tasks_blocked()
            done = cpu = 0
            warm = 4 * ring  # the first rounds fault the guest pages in: not counted
            # one flow: every frame goes to the receive queue its hash picks (b never
            # transmitted it, so no steering entry) -- found in the first round
            to = None
            while done < frames + warm:
                for qi in gb.rx if to is None else (to,):
                    gb.rings[qi].arm()
                    os.eventfd_write(gb.notifiers[qi].kick_fd, 1)
                await trio.testing.wait_all_tasks_blocked()
                c0 = thread_cpu_ns("VirtioNet-")
                ga.rings[tx].arm()
                os.eventfd_write(ga.notifiers[tx].kick_fd, 1)
                armed = gb.rx if to is None else [to]
                while not ga.rings[tx].done() or not any(gb.rings[qi].done() for qi in armed):
                    await trio.sleep(0.0002)  # polling the driver's view: untimed
                if to is None:
                    to = next(qi for qi in gb.rx if gb.rings[qi].done())
                if done >= warm:
                    cpu += thread_cpu_ns("VirtioNet-") - c0
                done += ring
            st = a.statistics()["native"]["tx"]
            assert st["tx_native"] == done and not ga.errors and not gb.errors, st
            result.append((cpu / (done - warm), done))
            nursery.cancel_scope.cancel()

    trio.run(main)
    return result[0]


def child(args: argparse.Namespace) -> list[str]:
    """The command of one measuring run (in the checkout to measure: its cwd)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", "--size", str(args.size)]
    cmd += ["--ring", str(args.ring), "--frames", str(args.frames)]
    cmd += ["--packed"] if args.packed else []
    return [*cmd, "--queue-pairs", str(args.queue_pairs)]


def count_instructions(args: argparse.Namespace, builds: dict[str, Path]) -> int:
    """Instructions per forwarded frame, counted by callgrind from the entry of each
    data plane thread's serving step (``dp_step``: pops, switching, copies, used
    entries, notifications; not the waits) over every frame forwarded."""
    import re
    import shutil
    import tempfile

    if not shutil.which("valgrind"):
        print("--instructions needs valgrind (Debian: valgrind)", file=sys.stderr)
        return 2
    per: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, repo in builds.items():
            cg = [
                "valgrind",
                "--tool=callgrind",
                "--collect-atstart=no",
                "--toggle-collect=dp_step",
            ]
            cg += [f"--callgrind-out-file={tmp}/{name}.out"]
            out = subprocess.run(cg + child(args), cwd=repo, capture_output=True, text=True)
            got = re.search(r"Collected : (\d+)", out.stderr)
            frames = re.search(r"^frames (\d+)$", out.stdout, re.M)
            if out.returncode or not got or not frames:
                print(out.stdout, out.stderr[-2000:], file=sys.stderr)
                return 1
            per[name] = int(got.group(1)) / int(frames.group(1))
            print(
                f"{name:5} {'packed' if args.packed else 'split':6} {args.size:5} B"
                f" {args.queue_pairs} QP  {per[name]:7.1f} instructions/frame"
                f"  ({int(got.group(1))} over {frames.group(1)} frames)"
            )
    if "base" in per:
        print(f"ours/base: {per['ours'] / per['base']:.3f}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--packed", action="store_true", help="packed rings (default split)")
    ap.add_argument("--size", type=int, default=60, help="Ethernet frame bytes (no CRC)")
    ap.add_argument("--ring", type=int, default=1024, help="ring size = frames per kick")
    ap.add_argument("--frames", type=int, default=200_000, help="frames per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(
        "--queue-pairs", type=int, default=1, help="pairs of both ports (2: flow hashing, steering)"
    )
    ap.add_argument(
        "--baseline-repo",
        type=Path,
        default=None,
        help="another checkout measured alternately (one with virtio.testing.harness."
        "thread_cpu_ns, i.e. from this script's first commit on)",
    )
    ap.add_argument(
        "--instructions",
        action="store_true",
        help="count instead of timing: instructions the data plane threads retire per "
        "frame (valgrind's callgrind, inside dp_step; one run per build, --frames 20000 "
        "is plenty): the same on a fast or a slow machine",
    )
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child run
    args = ap.parse_args()
    if args.one:
        sys.path.insert(0, os.getcwd())
        ns, done = measure(args.packed, args.size, args.ring, args.frames, args.queue_pairs)
        print(f"frames {done}")
        print(ns)
        return 0
    builds = {"ours": REPO}
    if args.baseline_repo:
        builds["base"] = args.baseline_repo.resolve()
    if args.instructions:
        return count_instructions(args, builds)
    res: dict[str, list[float]] = {k: [] for k in builds}
    for r in range(args.rounds):
        for name, repo in builds.items():
            out = subprocess.run(child(args), cwd=repo, capture_output=True, text=True, check=True)
            res[name].append(float(out.stdout.split()[-1]))
            print(f"round {r + 1} {name}: {res[name][-1]:.1f} ns/frame", file=sys.stderr)
    ring = "packed" if args.packed else "split"
    for name, vals in res.items():
        print(
            f"{name:5} {ring:6} {args.size:5} B {args.queue_pairs} QP"
            f"  median {statistics.median(vals):6.1f} ns/frame"
            f"  (min {min(vals):.1f}, max {max(vals):.1f}, {args.rounds} rounds)"
        )
    if "base" in res:
        ratios = [o / b for o, b in zip(res["ours"], res["base"], strict=True)]
        print(f"ours/base paired: {statistics.median(ratios):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
