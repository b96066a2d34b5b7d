"""virtio-input: latency from ``VirtioInput.inject`` to the event in the used ring, no VM.

The back-end is ``VhostUserServer(VirtioInput(builtin("keyboard")))`` (what ``virtio
serve input`` runs) in its own thread and trio loop; the front-end is the testing
kit's ``VhostUserFrontend`` (virtio/testing/vhost_user_frontend.py) in a second thread
with guest RAM of its own, a 64-entry eventq kept full; a third thread injects key
groups (EV_KEY + SYN_REPORT), one every ``--interval-us``, as an evdev reader or the
control socket would.  Two latencies per group:

* ``device``: injection to the device's ``complete_batch`` (``VirtioInput.record_latency``:
  the events are in the used ring and the call eventfd was signalled if asked);
* ``frontend``: injection to the front-end seeing the used index move (woken by the
  call eventfd), i.e. what a driver would observe.

    python bench/input_latency.py [--groups 5000] [--interval-us 500] [--json]

Prints p50 / p90 / p99 / max in µs; the goal (issue 11 §5) is p99 <= 100 µs.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio
from evdev import ecodes as e

from virtio.devices.input import VirtioInput, builtin
from virtio.devices.input.device import EVENT
from virtio.testing.vhost_user_frontend import GuestRam, VhostUserFrontend
from virtio.transport.vhost_user.server import VhostUserServer

MiB = 1 << 20
QUEUE = 64


def percentiles(ns: list[int]) -> dict[str, float]:
    us = sorted(x / 1000 for x in ns)

    def pct(p: float) -> float:
        return us[min(len(us) - 1, int(p / 100 * len(us)))]

    return {
        "n": len(us),
        "p50": pct(50),
        "p90": pct(90),
        "p99": pct(99),
        "max": us[-1],
        "mean": statistics.fmean(us),
    }


def run(groups: int, interval_us: float) -> dict:
    dev = VirtioInput(builtin("keyboard"))
    dev.record_latency = True
    server = VhostUserServer(dev)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    keys = [e.KEY_A + i % 26 for i in range(groups)]
    injected: list[int] = []
    seen: list[int] = []

    def backend() -> None:
        async def main() -> None:
            with trio.CancelScope() as scope:
                backend_scope.append((scope, trio.lowlevel.current_trio_token()))
                await server.serve_connection(trio.socket.from_stdlib_socket(b))

        trio.run(main)

    backend_scope: list = []
    th = threading.Thread(target=backend, name="input-backend", daemon=True)
    th.start()

    def inject_all() -> None:
        for i, code in enumerate(keys):
            injected.append(time.monotonic_ns())
            dev.inject([(e.EV_KEY, code, i & 1 ^ 1)])  # + SYN_REPORT: 2 events
            time.sleep(interval_us / 1e6)

    async def frontend() -> None:
        ram = GuestRam(4 * MiB)
        try:
            fe = VhostUserFrontend(trio.socket.from_stdlib_socket(a))
            await fe.negotiate()
            await fe.set_mem_table(ram)
            eventq = await fe.setup_vring(0, ram, size=QUEUE)
            await fe.setup_vring(1, ram, size=QUEUE, offset=2 * MiB)
            for _ in range(QUEUE):
                eventq.driver.add([], [EVENT.size])
            eventq.publish_and_kick()
            async with trio.open_nursery() as n:
                n.start_soon(trio.to_thread.run_sync, inject_all)
                events = 0
                while events < 2 * groups:
                    used = await eventq.wait_used(1, timeout=10)
                    now = time.monotonic_ns()
                    for u in used:
                        events += 1
                        if EVENT.unpack(u.data[:8])[0] == e.EV_SYN:
                            seen.append(now)
                        eventq.driver.add([], [EVENT.size])
                    eventq.publish_and_kick()
            await fe.aclose()
        finally:
            ram.close()

    trio.run(frontend)
    scope, token = backend_scope[0]
    trio.from_thread.run_sync(scope.cancel, trio_token=token)
    th.join(5)
    if dev.groups_dropped or len(seen) != groups:
        raise SystemExit(f"lost groups: {dev.groups_dropped} dropped, {len(seen)}/{groups} seen")
    return {
        "groups": groups,
        "interval_us": interval_us,
        "device": percentiles(list(dev.latencies_ns)),
        "frontend": percentiles([s - i for s, i in zip(seen, injected, strict=True)]),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--groups", type=int, default=5000)
    ap.add_argument("--interval-us", type=float, default=500.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    res = run(args.groups, args.interval_us)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"{res['groups']} key groups, one every {args.interval_us:g} µs")
    print("| latency | n | p50 µs | p90 µs | p99 µs | max µs |")
    print("|---|---|---|---|---|---|")
    for name in ("device", "frontend"):
        r = res[name]
        print(
            f"| {name} | {r['n']} | {r['p50']:.1f} | {r['p90']:.1f} | {r['p99']:.1f}"
            f" | {r['max']:.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
