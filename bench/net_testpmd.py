#!/usr/bin/env python3
"""virtio-net back-ends under DPDK testpmd load: ``virtio serve net`` vs testpmd's own
vhost PMD, in one run (issue 10 §5).

For each frame size (64 B, 1518 B), ring layout (split, packed) and queue-pair count
(1, 2):

- **ours**: testpmd virtio-user ``txonly`` -> port 0 of ``virtio serve net`` ->
  switch -> port 1 -> testpmd virtio-user ``rxonly``; the rate is what the receiving
  testpmd counts (``Rx-pps``, median of the steady seconds).
- **dpdk**: testpmd virtio-user ``txonly`` -> testpmd's vhost PMD (``rxonly``): the
  anchor's own back-end, receiving into its PMD.

Placement on a 2-core machine: the front-ends' forwarding lcores share CPU 1; the
back-end (our process, or the vhost PMD's forwarding lcore) has CPU 0.  CPU per
packet: the back-end's CPU time (``/proc/PID/stat`` utime+stime over the run)
divided by the packets received; the vhost PMD busy-polls, so its figure is one
core's time over its rate.

Before the timed runs one virtio-user connects to a freshly started vhost PMD and is
discarded (issue 10: "the first testpmd 22.11 virtio-user that connects to a freshly
started testpmd vhost PMD fails its handshake"); whether that happened is reported.

    .venv/bin/python bench/net_testpmd.py [--seconds 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from virtio.testing.blk_checks import wait_for_socket
from virtio.testing.testpmd import Testpmd, have_testpmd

SERVE = ["taskset", "-c", "0", sys.executable, "-m", "virtio", "serve", "net"]
# -q: --num-queue-pairs
FRONT = "0,1"  # main lcore 0, forwarding lcore 1
BACK = "1,0"  # vhost PMD: main lcore 1, forwarding lcore 0


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rate(tp: Testpmd) -> float:
    steady = [x for x in tp.stats.rx_pps[1:] if x > 0] or tp.stats.rx_pps or [0]
    return float(statistics.median(steady))


async def run_ours(tmp: Path, size: int, packed: bool, queues: int, seconds: float) -> dict:
    a, b = tmp / "a.sock", tmp / "b.sock"
    with open(tmp / "backend.log", "ab") as err:
        be = await trio.lowlevel.open_process(
            [*SERVE, "--socket-path", str(a), "--socket-path", str(b), "-q", str(queues)],
            stderr=err,
        )
    try:
        await wait_for_socket(a, be)
        await wait_for_socket(b, be)
        rx = Testpmd.virtio_user(b, mode="rxonly", queues=queues, packed=packed, lcores=FRONT)
        tx = Testpmd.virtio_user(
            a, mode="txonly", queues=queues, packed=packed, txpkts=size - 4, lcores=FRONT
        )
        async with rx:
            await rx.wait_started()
            async with tx:
                await tx.wait_started()
                await trio.sleep(1)
                c0 = _cpu_seconds(be.pid)
                await trio.sleep(seconds)
                cpu = _cpu_seconds(be.pid) - c0
        pps = _rate(rx)
    finally:
        be.terminate()
        await be.wait()
    return {"pps": pps, "cpu_ns_per_pkt": cpu / (pps * seconds) * 1e9 if pps else None}


async def run_dpdk(tmp: Path, size: int, packed: bool, queues: int, seconds: float) -> dict:
    sock = tmp / "vhost.sock"
    sock.unlink(missing_ok=True)
    vh = Testpmd.vhost(sock, mode="rxonly", queues=queues, lcores=BACK)
    async with vh:
        await vh.wait_started()
        tx = Testpmd.virtio_user(
            sock, mode="txonly", queues=queues, packed=packed, txpkts=size - 4, lcores=FRONT
        )
        async with tx:
            await tx.wait_started()
            await trio.sleep(1 + seconds)
    pps = _rate(vh)
    return {"pps": pps, "cpu_ns_per_pkt": 1e9 / pps if pps else None}


async def first_handshake(tmp: Path) -> dict:
    """Connect virtio-user to a fresh vhost PMD twice; report each handshake."""
    sock = tmp / "fresh.sock"
    out = {}
    vh = Testpmd.vhost(sock, lcores=BACK)
    async with vh:
        await vh.wait_started()
        for n in (1, 2):
            tx = Testpmd.virtio_user(sock, mode="txonly", lcores=FRONT)
            async with tx:
                try:
                    await tx.wait_started(timeout=20)
                    ok = True
                except RuntimeError:
                    ok = False
                await trio.sleep(1)
            out[f"connection{n}"] = {
                "ok": ok,
                "eintr": "Interrupted system call" in tx.output,
                "tx_packets": tx.stats.tx_packets,
            }
    return out


async def main(args: argparse.Namespace) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="net-bench-"))
    results: dict = {"first_handshake": await first_handshake(tmp), "runs": []}
    print("first handshake:", results["first_handshake"], flush=True)
    for queues in (1, 2):
        for packed in (False, True):
            for size in (64, 1518):
                row = {"size": size, "ring": "packed" if packed else "split", "queues": queues}
                row["ours"] = await run_ours(tmp, size, packed, queues, args.seconds)
                row["dpdk"] = await run_dpdk(tmp, size, packed, queues, args.seconds)
                o, d = row["ours"]["pps"], row["dpdk"]["pps"]
                row["ratio"] = o / d if d else None
                row["ours_gbps"] = o * size * 8 / 1e9
                row["dpdk_gbps"] = d * size * 8 / 1e9
                results["runs"].append(row)
                print(
                    f"{size:5d} B {row['ring']:6s} {queues}q  ours {o / 1e6:8.4f} Mpps "
                    f"({row['ours_gbps']:.3f} Gbit/s, {row['ours']['cpu_ns_per_pkt'] or 0:,.0f}"
                    f" ns CPU/pkt)  dpdk {d / 1e6:8.3f} Mpps ({row['dpdk_gbps']:.2f} Gbit/s, "
                    f"{row['dpdk']['cpu_ns_per_pkt'] or 0:,.0f} ns/pkt)  ratio "
                    f"{row['ratio'] or 0:.4f}",
                    flush=True,
                )
    return results


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    if not have_testpmd():
        sys.exit("dpdk-testpmd not found (Debian package dpdk-dev)")
    res = trio.run(main, a)
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))
