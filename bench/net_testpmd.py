#!/usr/bin/env python3
"""virtio-net: ``virtio serve net`` vs DPDK's vhost PMD, testpmd virtio-user as the peer.

Issue 10 §5.  Per point (frame size x ring layout x queue pairs) and per backend:

    testpmd (virtio-user A, virtio-user B; io forward, CPU 0)
        A --> BACKEND --> B --> (io) --> A --> ...            (and B --> A alike)

BACKEND is either DPDK's vhost PMD (one testpmd process with two vhost ports and
``--forward-mode=io`` between them, forwarding on CPU 1) or ours,
``virtio serve net --socket-path A --socket-path B`` (a switch with two ports),
pinned to CPU 1 with ``taskset``.  Both frontends live in one testpmd process:
on a 2-core machine a third busy-polling process would share a CPU and collapse
everything to thousands of packets per second.  The loop is seeded with
``start tx_first N`` (N bursts of 32 generated frames per queue and port), then
every frame crosses the backend once per lap, each way.

Per run: the frames and bytes the frontend received on both ports over the
measurement window (= frames the backend delivered), as Mpps and Gbit/s (frame
bytes without CRC, preamble or gap), and the backend's CPU time (utime + stime of
``/proc/PID/stat``, all threads) divided by those frames.  Both backends run in
the same invocation, alternating, ``--rounds`` times; the table shows medians
and the ratio ours/DPDK.  Goals (issue 10 §5): >= 0.5x DPDK's Mpps at 64 B,
>= 0.9x its Gbit/s at 1518 B.

Until ``virtio serve net`` exists (``--print-capabilities`` exits 0), the ours
column reads "n/a (virtio serve net not available)".

Usage::

    python bench/net_testpmd.py                  # full table (2 sizes x 2 rings x 1,2 QP)
    python bench/net_testpmd.py --quick          # 64 B split 1 QP only, 1 round
    python bench/net_testpmd.py --json           # JSON on stdout instead of the table
    python bench/net_testpmd.py --hugepages      # testpmd on 2 MiB hugepages (root)

Progress goes to stderr.  Exit status 0 when every run completed, 2 when
dpdk-testpmd is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from virtio.testing.testpmd import (  # noqa: E402
    Testpmd,
    TestpmdUnavailable,
    VhostPort,
    VirtioUserPort,
    cpu_seconds,
    find_testpmd,
    wait_for_socket,
)

NOT_AVAILABLE = "n/a (virtio serve net not available)"
BACKEND_CPU = 1
FRONTEND_CPU = 0


@dataclasses.dataclass(frozen=True)
class Point:
    size: int
    packed: bool
    queue_pairs: int

    @property
    def label(self) -> str:
        return f"{self.size}B {'packed' if self.packed else 'split'} {self.queue_pairs}qp"


@dataclasses.dataclass
class Run:
    mpps: float
    gbps: float
    cpu_ns_per_pkt: float


OURS_REPO = REPO  # --ours-repo: benchmark another checkout's backend (e.g. a branch)
MULTI_FLOW = False  # --multi-flow: the seeded frames carry many flows (source IPs)
HUGEPAGES = False  # --hugepages: testpmd's memory in 2 MiB hugetlbfs pages (DPDK's usual set-up)
BACKEND_STATS = False  # --backend-stats: ours prints its statistics line (stderr) mid-run


def python(repo: Path | None = None) -> str:
    venv = (repo or OURS_REPO) / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def ours_available(repo: Path | None = None) -> bool:
    """``virtio serve net --print-capabilities`` exits 0 (the vhost-user convention)."""
    try:
        r = subprocess.run(
            [python(repo), "-m", "virtio", "serve", "net", "--print-capabilities"],
            capture_output=True,
            timeout=30,
            cwd=repo or OURS_REPO,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


@contextlib.contextmanager
def dpdk_backend(a: Path, b: Path, qp: int) -> Iterator[int]:
    """DPDK's vhost PMD: two vhost ports, io forward between them; yields its pid."""
    ports = [VhostPort(a, qp), VhostPort(b, qp)]
    with Testpmd(
        ports, forward_cpu=BACKEND_CPU, forward_mode="io", name="vhost", hugepages=HUGEPAGES
    ) as vh:
        vh.start()
        yield vh.pid


def ours_backend(extra: list[str], repo: Path | None = None):
    """``virtio serve net`` (with ``extra`` arguments, from ``repo``) as a backend."""

    def backend(a: Path, b: Path, qp: int):
        return _ours(a, b, qp, extra, repo or OURS_REPO)

    backend.prints_statistics = True  # type: ignore[attr-defined]  # on SIGUSR1
    return backend


@contextlib.contextmanager
def _ours(a: Path, b: Path, qp: int, extra: list[str], repo: Path) -> Iterator[int]:
    """``virtio serve net`` with two ports, pinned to the backend CPU; yields its pid."""
    cmd = [
        "taskset", "-c", str(BACKEND_CPU),
        python(repo), "-m", "virtio", "serve", "net",
        "--socket-path", str(a), "--socket-path", str(b),
        "--num-queue-pairs", str(qp), *extra,
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=repo, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_socket(a, proc=proc)
        wait_for_socket(b, proc=proc)
        yield proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def measure(backend, point: Point, duration: float, tx_first: int) -> Run:
    with tempfile.TemporaryDirectory(prefix="net-testpmd-") as tmp:
        a, b = Path(tmp) / "a.sock", Path(tmp) / "b.sock"
        with backend(a, b, point.queue_pairs) as pid:
            ports = [VirtioUserPort(s, point.queue_pairs, packed_vq=point.packed) for s in (a, b)]
            with Testpmd(
                ports,
                forward_cpu=FRONTEND_CPU,
                forward_mode="io",
                txpkts=point.size,
                name="fe",
                hugepages=HUGEPAGES,
                extra_args=["--txonly-multi-flow"] if MULTI_FLOW else [],
            ) as fe:
                fe.start(tx_first=tx_first)
                time.sleep(0.5)  # warm-up: the loop fills up
                s0, c0, t0 = fe.port_stats(), cpu_seconds(pid), time.monotonic()
                time.sleep(duration)
                s1, c1, t1 = fe.port_stats(), cpu_seconds(pid), time.monotonic()
                if BACKEND_STATS and getattr(backend, "prints_statistics", False):
                    os.kill(pid, signal.SIGUSR1)  # per-queue counts and nrxq while running
                    time.sleep(0.2)  # let it print before testpmd stops
                fe.stop()
    pkts = sum(s1[p].rx_packets - s0[p].rx_packets for p in s0)
    nbytes = sum(s1[p].rx_bytes - s0[p].rx_bytes for p in s0)
    dt = t1 - t0
    return Run(
        mpps=pkts / dt / 1e6,
        gbps=nbytes * 8 / dt / 1e9,
        cpu_ns_per_pkt=(c1 - c0) * 1e9 / pkts if pkts else float("inf"),
    )


def median(runs: list[Run]) -> Run:
    return Run(
        mpps=statistics.median(r.mpps for r in runs),
        gbps=statistics.median(r.gbps for r in runs),
        cpu_ns_per_pkt=statistics.median(r.cpu_ns_per_pkt for r in runs),
    )


HUGEPAGES_MB = 2 * 1024 + 512  # two testpmd processes of 1 GiB each, and slack


def reserve_hugepages(mb: int) -> None:
    """At least ``mb`` MiB of free 2 MiB hugepages, and hugetlbfs on /dev/hugepages."""
    nr = Path("/proc/sys/vm/nr_hugepages")
    free = int(Path("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages").read_text())
    want = mb // 2
    if free < want:
        nr.write_text(str(int(nr.read_text()) + want - free))
    mounts = Path("/proc/mounts").read_text().split()
    if "hugetlbfs" not in mounts:
        Path("/dev/hugepages").mkdir(exist_ok=True)
        subprocess.run(["mount", "-t", "hugetlbfs", "nodev", "/dev/hugepages"], check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="64,1518")
    ap.add_argument("--rings", default="split,packed")
    ap.add_argument("--queue-pairs", default="1,2")
    ap.add_argument("--duration", type=float, default=3.0, help="measurement window, s")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tx-first", type=int, default=8, help="bursts seeding the loop")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--ours-repo", type=Path, default=REPO, help="checkout whose backend to run")
    ap.add_argument(
        "--ours-args",
        action="append",
        default=None,
        metavar="ARGS",
        help="extra arguments for virtio serve net, e.g. '--poll-us 50' (repeatable: one "
        "column of ours per value, all in the same run; default: one with none)",
    )
    ap.add_argument(
        "--baseline-repo",
        type=Path,
        default=None,
        help="another checkout (e.g. main) measured in the same run, as column 'base': "
        "before/after side by side",
    )
    ap.add_argument(
        "--multi-flow",
        action="store_true",
        help="seed the loop with testpmd's --txonly-multi-flow (the source IP varies per "
        "frame): with 2 queue pairs our switch spreads the flows over both receive "
        "queues by flow hash (DPDK's io forward keeps queue to queue)",
    )
    ap.add_argument(
        "--backend-stats",
        action="store_true",
        help="at the end of each window ours prints its statistics line to stderr "
        "(SIGUSR1): packets per queue, the native path's nrxq",
    )
    ap.add_argument(
        "--hugepages",
        action="store_true",
        help="run both testpmd processes (frontend, DPDK's vhost PMD) on 2 MiB hugepages, "
        "as DPDK is normally deployed (default: --no-huge, 4 KiB pages); reserves them "
        "and mounts hugetlbfs on /dev/hugepages when needed (root)",
    )
    args = ap.parse_args()
    global HUGEPAGES
    HUGEPAGES = args.hugepages
    if HUGEPAGES:
        nr = Path("/proc/sys/vm/nr_hugepages")
        before = nr.read_text()
        reserve_hugepages(HUGEPAGES_MB)
        try:
            return run(args)
        finally:
            nr.write_text(before)  # give the pages back (the ones still in use stay)
    return run(args)


def run(args: argparse.Namespace) -> int:
    """The bench proper (main: arguments and hugepages)."""
    global OURS_REPO, MULTI_FLOW, BACKEND_STATS
    BACKEND_STATS = args.backend_stats
    OURS_REPO = args.ours_repo.resolve()
    MULTI_FLOW = args.multi_flow
    try:
        find_testpmd()
    except TestpmdUnavailable as e:
        print(e, file=sys.stderr)
        return 2
    if args.quick:
        args.sizes, args.rings, args.queue_pairs, args.rounds = "64", "split", "1", 1
    points = [
        Point(int(s), r == "packed", int(q))
        for s in args.sizes.split(",")
        for r in args.rings.split(",")
        for q in args.queue_pairs.split(",")
    ]
    have_ours = ours_available()
    variants = args.ours_args or [""]
    backends = {"dpdk": dpdk_backend}
    if have_ours:
        for v in variants:
            backends[f"ours {v}".strip()] = ours_backend(v.split())
    if args.baseline_repo is not None and ours_available(args.baseline_repo.resolve()):
        backends["ours base"] = ours_backend([], args.baseline_repo.resolve())
    ours_names = [n for n in backends if n != "dpdk"] or ["ours"]
    results: dict[str, dict[str, Run | None]] = {}
    paired: dict[str, dict[str, float]] = {}
    for point in points:
        runs: dict[str, list[Run]] = {name: [] for name in backends}
        for rnd in range(args.rounds):
            for name, backend in backends.items():
                print(f"[{point.label}] round {rnd + 1} {name} ...", file=sys.stderr, flush=True)
                r = measure(backend, point, args.duration, args.tx_first)
                runs[name].append(r)
                print(
                    f"[{point.label}] round {rnd + 1} {name}: {r.mpps:.2f} Mpps, "
                    f"{r.gbps:.2f} Gbit/s, {r.cpu_ns_per_pkt:.0f} ns CPU/pkt",
                    file=sys.stderr,
                    flush=True,
                )
        results[point.label] = {name: median(r) for name, r in runs.items()}
        paired[point.label] = {}
        for name, r in runs.items():
            ratios = [o.mpps / d.mpps for o, d in zip(r, runs["dpdk"], strict=True) if d.mpps]
            if name != "dpdk" and ratios:
                paired[point.label][name] = statistics.median(ratios)
        for name in ours_names:
            results[point.label].setdefault(name, None)

    if args.json:
        out = {
            label: {
                **{k: (dataclasses.asdict(v) if v else NOT_AVAILABLE) for k, v in row.items()},
                "paired_ratio": paired.get(label, {}),
            }
            for label, row in results.items()
        }
        json.dump({"host": platform.node(), "cpus": os.cpu_count(), "points": out}, sys.stdout)
        print()
        return 0
    hdr = (
        f"{'point':<20} {'DPDK Mpps':>9} {'Gbit/s':>7} {'ns CPU/pkt':>10}  "
        f"{'ours Mpps':>9} {'Gbit/s':>7} {'ns CPU/pkt':>10}  {'Mpps x':>6} {'paired x':>8}"
    )
    print(hdr)
    print("-" * len(hdr))
    for label, row in results.items():
        d = row["dpdk"]
        assert d is not None
        for name in ours_names:
            o = row[name]
            left = f"{label:<20} {d.mpps:>9.2f} {d.gbps:>7.2f} {d.cpu_ns_per_pkt:>10.0f}  "
            if o is None:
                print(left + NOT_AVAILABLE)
                continue
            tag = f"  [{name[5:]}]" if len(ours_names) > 1 else ""
            print(
                left + f"{o.mpps:>9.2f} {o.gbps:>7.2f} {o.cpu_ns_per_pkt:>10.0f}  "
                f"{o.mpps / d.mpps:>6.2f} {paired[label].get(name, float('nan')):>8.2f}{tag}"
            )
    print(
        f"\nfrontend: testpmd virtio-user x2, io forward, CPU {FRONTEND_CPU}; backend on CPU "
        f"{BACKEND_CPU}; {args.duration} s windows, median of {args.rounds} rounds; "
        "Mpps x: ratio of the medians (= the Gbit/s ratio), paired x: median of the "
        "rounds' ratios (each round runs DPDK then ours: robust to the machine's drift); "
        "goals: >= 0.5x DPDK's Mpps at 64 B, >= 0.9x its Gbit/s at 1518 B"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
