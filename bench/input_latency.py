"""virtio-input: latency from an injected event to the used ring, no VM (issue 11 §5).

The processes are laid out as deployed.  The back-end process runs what ``virtio serve
input --kind keyboard --control PATH`` runs: ``VirtioInput``, ``VhostUserServer`` and
the control socket in one trio loop.  The front-end is the testing kit's
``VhostUserFrontend`` (virtio/testing/vhost_user_frontend.py) in the bench process,
standing in for QEMU: a 64-entry eventq kept full, the used ring read when the call
eventfd fires.  The two share no interpreter lock.  Key groups (EV_KEY +
SYN_REPORT) come one every ``--interval-us`` from ``--source``:

* ``control``: a client process sends one ``inject`` line per group to the control
  socket and reads the reply (a test harness, a remote-control tool);
* ``loop``: a task in the back-end's loop calls ``VirtioInput.inject`` (what the
  evdev reader does);
* ``thread``: a thread of the back-end process calls ``inject`` (a program that embeds
  the device and has its own input thread);
* ``inproc``: no processes, no vhost-user: the device under the testing kit's
  ``DeviceHarness`` in this process, a task calling ``inject`` (the driver reposts each
  buffer right after): the device's own cost (only ``device`` is reported).

Figures, all from ``time.monotonic_ns()`` (one clock for every process):

* ``device``: ``inject`` to the used-index store that publishes the group (the call
  eventfd is written right after): ``VirtioInput.latency_log``, the device side alone, including
  groups that had to wait for the front-end to post buffers (counted as "waited");
* ``device, buffers ready``: the same for the groups that went out at injection
  (the driver had posted the buffers, no group was waiting): the device's own cost;
* ``sent→used`` (``control``): the client's send to the used ring: adds the control
  socket (read, JSON, dispatch);
* ``frontend``: the source (send, or ``inject``) to the front-end seeing the used index
  move; adds the Python front-end's own wake-up (the measurement side).

    python bench/input_latency.py [--source control|loop|thread] [--groups 5000]
        [--interval-us 500] [--python-delivery] [--json]

Prints p50 / p90 / p99 / max in µs and the load average; the goal (issue 11 §5) is
p99 <= 100 µs.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio
import trio.testing
from evdev import ecodes as e

from virtio.control import CommandRegistry
from virtio.control.server import serve_control
from virtio.devices.input import VirtioInput, builtin
from virtio.devices.input.control import register_input_commands
from virtio.devices.input.device import EVENT
from virtio.testing.harness import DeviceHarness
from virtio.testing.vhost_user_frontend import GuestRam, VhostUserFrontend
from virtio.transport.vhost_user.server import VhostUserServer

MiB = 1 << 20
QUEUE = 64
SOURCES = ("control", "loop", "thread", "inproc")


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


def key(i: int) -> tuple[int, int, int]:
    return (e.EV_KEY, e.KEY_A + i % 26, i & 1 ^ 1)


# -- the back-end process -------------------------------------------------------------
def backend(
    path: str, control: str, source: str, groups: int, interval_us: float, native: bool, conn
) -> None:
    """``virtio serve input``'s stack; a ``loop``/``thread`` source once told "go";
    the latency log sent back once told "done"."""
    dev = VirtioInput(builtin("keyboard"))
    dev.record_latency = True
    dev.native_delivery = native
    registry = CommandRegistry()
    register_input_commands(registry, dev)
    server = VhostUserServer(dev, name="virtio-input")
    interval = interval_us / 1e6

    async def inject_loop() -> None:
        for i in range(groups):
            dev.inject([key(i)])  # + SYN_REPORT: 2 events
            await trio.sleep(interval)

    def inject_thread() -> None:
        for i in range(groups):
            dev.inject([key(i)])
            time.sleep(interval)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve_path, path)
            await nursery.start(serve_control, control, registry)
            conn.send("ready")
            cpu = time.process_time()
            while True:
                await trio.lowlevel.wait_readable(conn.fileno())
                msg = conn.recv()
                if msg == "go" and source == "loop":
                    nursery.start_soon(inject_loop)
                elif msg == "go" and source == "thread":
                    threading.Thread(target=inject_thread, daemon=True).start()
                elif msg == "done":
                    stats = {
                        **dev.statistics(),
                        "cpu_s": time.process_time() - cpu,
                        "native_groups": getattr(dev, "groups_native", 0),
                    }
                    conn.send((list(dev.latency_log), stats))
                    nursery.cancel_scope.cancel()
                    return

    trio.run(main)


# -- the control-socket client process ---------------------------------------------------
def control_client(control: str, groups: int, interval_us: float, conn) -> None:
    """One ``inject`` line per group (reply read before the next); the send times back."""
    lines = [
        json.dumps(
            {
                "execute": "inject",
                "arguments": {"events": [{"type": "EV_KEY", "code": e.KEY[c], "value": v}]},
            }
        ).encode()
        + b"\n"
        for _, c, v in map(key, range(groups))
    ]
    sent: list[int] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(control)
        replies = s.makefile("rb")
        for line in lines:
            sent.append(time.monotonic_ns())
            s.sendall(line)
            reply = json.loads(replies.readline())
            if reply.get("return", {}).get("groups") != 1:
                raise SystemExit(f"inject failed: {reply}")
            time.sleep(interval_us / 1e6)
    conn.send(sent)


# -- the front-end (this process) ----------------------------------------------------------
async def frontend(path: str, groups: int, start_source) -> list[int]:
    """Drive the back-end like QEMU; when each group's SYN_REPORT was seen."""
    seen: list[int] = []
    ram = GuestRam(4 * MiB)
    try:
        fe = await VhostUserFrontend.connect(path)
        await fe.negotiate()
        await fe.set_mem_table(ram)
        eventq = await fe.setup_vring(0, ram, size=QUEUE)
        await fe.setup_vring(1, ram, size=QUEUE, offset=2 * MiB)
        for _ in range(QUEUE):
            eventq.driver.add([], [EVENT.size])
        eventq.publish_and_kick()
        start_source()
        events = 0
        while events < 2 * groups:
            used = await eventq.wait_used(1, timeout=30)
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
    return seen


async def _inproc(groups: int, interval_us: float, native: bool) -> tuple[list, dict]:
    """The device alone: ``inject`` on its loop, buffers always posted."""
    dev = VirtioInput(builtin("keyboard"))
    dev.record_latency = True
    dev.native_delivery = native
    async with DeviceHarness.start(dev, queue_size=QUEUE, data_size=MiB) as h:
        dq = h.queues[0]
        for _ in range(QUEUE):
            dq.add([], [EVENT.size])
        dq.publish()
        await trio.testing.wait_all_tasks_blocked()
        cpu = time.process_time()
        for i in range(groups):
            dev.inject([key(i)])
            for _ in dq.get_used():
                dq.add([], [EVENT.size])
            dq.publish()
            await trio.sleep(interval_us / 1e6)
        cpu = time.process_time() - cpu
    stats = {**dev.statistics(), "cpu_s": cpu, "native_groups": dev.statistics()["groups_native"]}
    return list(dev.latency_log), stats


def run_inproc(groups: int, interval_us: float, native: bool = True) -> dict:
    load_before = os.getloadavg()
    log, stats = trio.run(_inproc, groups, interval_us, native)
    if stats["groups"] != groups:
        raise SystemExit(f"lost groups: {stats}")
    res = {
        "source": "inproc",
        "groups": groups,
        "interval_us": interval_us,
        "load": [*load_before, *os.getloadavg()[:1]],
        "backend_cpu_us_per_group": stats["cpu_s"] * 1e6 / groups,
        "waited": sum(not direct for _, _, direct in log),
        "native_groups": stats["native_groups"],
        "device": percentiles([u - i for i, u, _ in log]),
    }
    ready = [u - i for i, u, direct in log if direct]
    if ready:
        res["device, buffers ready"] = percentiles(ready)
    return res


def run(source: str, groups: int, interval_us: float, native: bool = True) -> dict:
    if source == "inproc":
        return run_inproc(groups, interval_us, native)
    ctx = multiprocessing.get_context("spawn")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="input-lat-") as tmp:
        path, control = f"{tmp}/input.sock", f"{tmp}/input.ctl"
        here, there = ctx.Pipe()
        back = ctx.Process(
            target=backend,
            args=(path, control, source, groups, interval_us, native, there),
            daemon=True,
        )
        back.start()
        if not here.poll(60) or here.recv() != "ready":
            raise SystemExit("the back-end did not start")
        client_pipe, client_end = ctx.Pipe()
        client = ctx.Process(
            target=control_client, args=(control, groups, interval_us, client_end), daemon=True
        )

        def start_source() -> None:
            if source == "control":
                client.start()
            else:
                here.send("go")

        seen = trio.run(frontend, path, groups, start_source)
        sent = client_pipe.recv() if source == "control" else None
        here.send("done")
        log, stats = here.recv()
        back.join(10)
        if source == "control":
            client.join(10)
    if stats["groups_dropped"] or len(seen) != groups or len(log) != groups:
        raise SystemExit(f"lost groups: {stats}, {len(seen)}/{groups} seen, {len(log)} logged")
    origin = sent if sent is not None else [i for i, _, _ in log]
    res = {
        "source": source,
        "groups": groups,
        "interval_us": interval_us,
        "load": [*load_before, *os.getloadavg()[:1]],
        "backend_cpu_us_per_group": stats["cpu_s"] * 1e6 / groups,
        "waited": sum(not direct for _, _, direct in log),
        "native_groups": stats["native_groups"],
        "device": percentiles([u - i for i, u, _ in log]),
    }
    ready = [u - i for i, u, direct in log if direct]
    if ready:
        res["device, buffers ready"] = percentiles(ready)
    if sent is not None:
        res["sent→inject"] = percentiles([i - s for s, (i, _, _) in zip(sent, log, strict=True)])
        res["sent→used"] = percentiles([u - s for s, (_, u, _) in zip(sent, log, strict=True)])
    res["frontend"] = percentiles([f - o for f, o in zip(seen, origin, strict=True)])
    return res


def table(res: dict) -> str:
    load = res["load"]
    out = [
        f"source {res['source']}: {res['groups']} key groups, one every"
        f" {res['interval_us']:g} µs; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
        f" (1-min after: {load[3]:.2f}); {res['waited']} groups waited for buffers;"
        f" back-end CPU {res['backend_cpu_us_per_group']:.1f} µs per group;"
        f" {res['native_groups']} groups delivered by the native call",
        "| latency | n | p50 µs | p90 µs | p99 µs | max µs |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("device", "device, buffers ready", "sent→inject", "sent→used", "frontend"):
        if name in res:
            r = res[name]
            out.append(
                f"| {name} | {r['n']} | {r['p50']:.1f} | {r['p90']:.1f} | {r['p99']:.1f}"
                f" | {r['max']:.1f} |"
            )
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", choices=SOURCES, default="control")
    ap.add_argument("--groups", type=int, default=5000)
    ap.add_argument("--interval-us", type=float, default=500.0)
    ap.add_argument(
        "--python-delivery",
        action="store_true",
        help="deliver groups with the Python path only (the reference; no native call)",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    res = run(args.source, args.groups, args.interval_us, native=not args.python_delivery)
    print(json.dumps(res, indent=2, ensure_ascii=False) if args.json else table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
