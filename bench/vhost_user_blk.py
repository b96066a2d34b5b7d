#!/usr/bin/env python3
"""vhost-user-blk: our back-end vs qemu-storage-daemon, fio inside one QEMU guest.

One TCG guest (``-machine pc,accel=tcg -cpu max``, 2 vCPUs, the harness of
:mod:`virtio.testing.qemu`) gets two ``vhost-user-blk-pci`` disks with the same
``num-queues``: one served by ``python -m virtio serve blk`` (this project, run by
the venv's python when there is one), the other by ``qemu-storage-daemon``'s
``vhost-user-blk`` export.  Each back-end has its own copy of the same raw image
(filled with random data, so reads touch real pages).  fio runs on one disk at a
time, alternating back-ends (A, B, A, B, ...) for several rounds per point, so a
noisy machine affects both alike.

Per run: fio's IOPS (``--direct=1``, time based, JSON) and the back-end's CPU time
(utime + stime of ``/proc/PID/stat``, all threads, delta over the fio command)
divided by the I/Os fio completed.  The main thread's share
(``/proc/PID/task/PID/stat``) is reported too: for our back-end that is the trio
thread (protocol, rings, requests), the rest being the worker threads doing
``preadv``/``pwritev``.  Per point: medians over rounds, the IOPS ratio ours/qsd
and the CPU-per-I/O ratio ours/qsd, judged against the goals (IOPS ratio >= 0.9,
CPU per I/O <= 2x qsd's).

Usage::

    python bench/vhost_user_blk.py                    # full run (~7 min)
    python bench/vhost_user_blk.py --quick            # smoke run (~25 s, 2 points)
    python bench/vhost_user_blk.py --json             # JSON on stdout instead of the table
    python bench/vhost_user_blk.py --floor            # CPU cost of trio's building blocks
    python bench/vhost_user_blk.py --points randread-4k-qd32 --rounds 2 \\
        --py-spy /tmp/prof                            # py-spy record of our back-end per run
    python bench/vhost_user_blk.py --ours-cprofile /tmp/ours.prof   # main thread under cProfile
    python bench/vhost_user_blk.py --attach-dir /tmp/st \\
        --attach 'timeout {duration} strace -c -f -p {pid} -o {out}.strace'   # any tool, per run

Progress goes to stderr.  Exit status 0 when every run completed (missing the
goals is reported, not an error), 2 when QEMU/qsd/the guest image are missing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import trio  # noqa: E402

from virtio.testing.blk_checks import (  # noqa: E402
    BlkDisk,
    run_fio,
    start_qemu_storage_daemon,
    stop_process,
    wait_for_socket,
)
from virtio.testing.guest_image import GuestImageUnavailable, ensure_image  # noqa: E402
from virtio.testing.qemu import QemuGuest, QemuUnavailable, VhostUserBlk  # noqa: E402

MiB = 1 << 20
OURS, QSD = "ours", "qsd"
SERIAL = "pyvirtio-bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")

IOPS_GOAL = 0.9
CPU_GOAL = 2.0


@dataclasses.dataclass(frozen=True)
class Point:
    name: str
    rw: str
    bs: str
    iodepth: int

    def fio_kwargs(self) -> dict[str, Any]:
        extra = "--norandommap --randrepeat=1" if self.rw.startswith("rand") else ""
        return {"rw": self.rw, "bs": self.bs, "iodepth": self.iodepth, "extra": extra}


POINTS = {
    p.name: p
    for p in (
        Point("randread-4k-qd1", "randread", "4k", 1),
        Point("randread-4k-qd32", "randread", "4k", 32),
        Point("randwrite-4k-qd32", "randwrite", "4k", 32),
        Point("read-1m-qd4", "read", "1M", 4),
    )
}
QUICK_POINTS = ("randread-4k-qd32", "randwrite-4k-qd32")


# --------------------------------------------------------------------------- CPU accounting


def _ticks(stat_path: str) -> tuple[int, int]:
    """(utime, stime) in clock ticks from a /proc stat file."""
    with open(stat_path) as f:
        data = f.read()
    fields = data[data.rindex(")") + 2 :].split()
    return int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)


@dataclasses.dataclass(frozen=True)
class CpuSample:
    total: float  # seconds, the whole process (live and exited threads), user + system
    sys: float  # seconds, the whole process, system (kernel) time only
    main: float  # seconds, the main thread only, user + system

    @classmethod
    def of(cls, pid: int) -> CpuSample:
        user, system = _ticks(f"/proc/{pid}/stat")
        main = sum(_ticks(f"/proc/{pid}/task/{pid}/stat"))
        return cls((user + system) / CLK_TCK, system / CLK_TCK, main / CLK_TCK)

    def __sub__(self, other: CpuSample) -> CpuSample:
        return CpuSample(self.total - other.total, self.sys - other.sys, self.main - other.main)


# --------------------------------------------------------------------------- back-ends


def backend_python() -> str:
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


async def start_ours(
    socket_path: Path, image_path: Path, num_queues: int, *, cprofile: Path | None = None
) -> trio.Process:
    """``python -m virtio serve blk`` (optionally under ``-m cProfile``), stderr to a log."""
    prefix = [backend_python()]
    if cprofile is not None:
        prefix += ["-m", "cProfile", "-o", str(cprofile)]
    cmd = [
        *prefix, "-m", "virtio", "serve", "blk",
        "--socket-path", str(socket_path),
        "--blk-file", str(image_path),
        "--num-queues", str(num_queues),
        "--serial", SERIAL,
    ]  # fmt: skip
    with open(f"{socket_path}.log", "ab") as log:
        proc = await trio.lowlevel.open_process(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, cwd=REPO
        )
    try:
        await wait_for_socket(socket_path, proc, timeout=30)
    except BaseException:
        with trio.CancelScope(shield=True):
            await stop_process(proc)
        raise
    return proc


def make_images(workdir: Path, size: int) -> tuple[Path, Path]:
    """Two identical raw images of random data (written once, copied)."""
    a, b = workdir / "ours.img", workdir / "qsd.img"
    chunk = os.urandom(MiB)
    with open(a, "wb") as f:
        for i in range(size // MiB):
            # Cheap variation so no two MiB are identical.
            f.write(i.to_bytes(8, "little") + chunk[8:])
    shutil.copyfile(a, b)
    return a, b


# --------------------------------------------------------------------------- runs


@dataclasses.dataclass
class Run:
    point: str
    backend: str
    round: int
    iops: float
    bw_mib_s: float
    ios: int
    lat_us: float
    seconds: float
    cpu_s: float
    main_cpu_s: float
    sys_cpu_s: float
    other_backend_cpu_s: float
    """CPU the other (idle, still connected) back-end used meanwhile."""

    @property
    def cpu_us_per_io(self) -> float:
        return self.cpu_s / self.ios * 1e6 if self.ios else float("nan")

    @property
    def main_us_per_io(self) -> float:
        return self.main_cpu_s / self.ios * 1e6 if self.ios else float("nan")

    @property
    def sys_us_per_io(self) -> float:
        return self.sys_cpu_s / self.ios * 1e6 if self.ios else float("nan")

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["cpu_us_per_io"] = round(self.cpu_us_per_io, 2)
        d["main_us_per_io"] = round(self.main_us_per_io, 2)
        d["sys_us_per_io"] = round(self.sys_us_per_io, 2)
        return d


def _fio_totals(report: dict[str, Any]) -> tuple[float, float, int, float]:
    job = report["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio error {job['error']}: {json.dumps(job)[:500]}")
    iops = bw = 0.0
    ios = 0
    lat_weighted = 0.0
    for d in ("read", "write"):
        part = job[d]
        iops += part["iops"]
        bw += part["bw"] / 1024  # KiB/s -> MiB/s
        n = part["total_ios"]
        ios += n
        lat_weighted += part["lat_ns"]["mean"] * n
    return iops, bw, ios, (lat_weighted / ios / 1000 if ios else 0.0)


async def run_one(
    guest: QemuGuest,
    disk: BlkDisk,
    pid: int,
    idle_pid: int,
    point: Point,
    backend: str,
    rnd: int,
    args: argparse.Namespace,
) -> Run:
    profiler: subprocess.Popen[bytes] | None = None
    attached: subprocess.Popen[bytes] | None = None
    if args.py_spy is not None and backend == OURS:
        out = args.py_spy / f"{point.name}-r{rnd}.txt"
        profiler = subprocess.Popen(
            [
                args.py_spy_binary, "record", "--pid", str(pid),
                "--rate", str(args.py_spy_rate), "--duration", str(int(args.runtime)),
                "--format", "raw", "--threads", "--output", str(out),
                *(["--nonblocking"] if args.py_spy_nonblocking else []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(out.with_suffix(".log"), "wb"),  # noqa: SIM115 - the child's
        )  # fmt: skip
    if args.attach is not None and backend in args.attach_to:
        base = args.attach_dir / f"{backend}-{point.name}-r{rnd}"
        cmd = args.attach.format(pid=pid, duration=max(1, int(args.runtime)), out=base)
        attached = subprocess.Popen(
            shlex.split(cmd),
            stdout=open(f"{base}.attach.out", "wb"),  # noqa: SIM115 - the child's
            stderr=subprocess.STDOUT,
        )
    before, idle_before, t0 = CpuSample.of(pid), CpuSample.of(idle_pid), time.monotonic()
    report = await run_fio(
        guest, disk, runtime=args.runtime, ioengine=args.ioengine, **point.fio_kwargs()
    )
    seconds = time.monotonic() - t0
    cpu = CpuSample.of(pid) - before
    idle = CpuSample.of(idle_pid) - idle_before
    for child in (profiler, attached):
        if child is not None:
            try:
                await trio.to_thread.run_sync(child.wait, 15)
            except subprocess.TimeoutExpired:
                child.send_signal(signal.SIGINT)
                await trio.to_thread.run_sync(child.wait)
    iops, bw, ios, lat = _fio_totals(report)
    return Run(
        point.name,
        backend,
        rnd,
        iops,
        bw,
        ios,
        lat,
        seconds,
        cpu.total,
        cpu.main,
        cpu.sys,
        idle.total,
    )


def summarise(runs: list[Run], points: list[Point]) -> list[dict[str, Any]]:
    rows = []
    for p in points:
        row: dict[str, Any] = {"point": p.name}
        for b in (OURS, QSD):
            mine = [r for r in runs if r.point == p.name and r.backend == b]
            row[b] = {
                "iops": statistics.median(r.iops for r in mine),
                "bw_mib_s": statistics.median(r.bw_mib_s for r in mine),
                "lat_us": statistics.median(r.lat_us for r in mine),
                "cpu_us_per_io": statistics.median(r.cpu_us_per_io for r in mine),
                "main_us_per_io": statistics.median(r.main_us_per_io for r in mine),
                "sys_us_per_io": statistics.median(r.sys_us_per_io for r in mine),
                "iops_runs": [round(r.iops) for r in mine],
            }
        row["iops_ratio"] = row[OURS]["iops"] / row[QSD]["iops"] if row[QSD]["iops"] else None
        q = row[QSD]["cpu_us_per_io"]
        row["cpu_ratio"] = row[OURS]["cpu_us_per_io"] / q if q else None
        row["iops_goal_met"] = row["iops_ratio"] is not None and row["iops_ratio"] >= IOPS_GOAL
        row["cpu_goal_met"] = row["cpu_ratio"] is not None and row["cpu_ratio"] <= CPU_GOAL
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| point | ours IOPS | qsd IOPS | IOPS ours/qsd | ours CPU µs/IO (main thr, kernel) "
        "| qsd CPU µs/IO (main thr, kernel) | CPU ours/qsd | mean lat µs ours/qsd "
        "| goals (IOPS ≥ 0.9, CPU ≤ 2x) |"
    )
    out = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        o, q = r[OURS], r[QSD]
        goals = ("ok" if r["iops_goal_met"] else "MISS") + " / "
        goals += "ok" if r["cpu_goal_met"] else "MISS"
        out.append(
            f"| {r['point']} | {o['iops']:,.0f} | {q['iops']:,.0f} | {r['iops_ratio']:.2f} "
            f"| {o['cpu_us_per_io']:.1f} ({o['main_us_per_io']:.0f}, {o['sys_us_per_io']:.0f}) "
            f"| {q['cpu_us_per_io']:.1f} ({q['main_us_per_io']:.0f}, {q['sys_us_per_io']:.0f}) "
            f"| {r['cpu_ratio']:.2f} | {o['lat_us']:,.0f} / {q['lat_us']:,.0f} | {goals} |"
        )
    return "\n".join(out)


# --------------------------------------------------------------------------- py-spy summary


IDLE_LEAVES = ("WorkerThread._work", "EpollIOManager.get_events")
"""Leaf frames that are blocking waits (a worker's ``lock.acquire``, ``epoll.poll``):
py-spy's idle detection lets many of those through, so they are counted apart."""

CATEGORIES: tuple[tuple[str, Any], ...] = (
    (
        "wake a worker thread (lock release = futex wake, ThreadCache.start_thread_soon)",
        lambda fn, path: fn == "ThreadCache.start_thread_soon",
    ),
    (
        "call eventfd write (EventfdNotifier.notify_used)",
        lambda fn, path: fn == "EventfdNotifier.notify_used",
    ),
    ("preadv/pwritev (workers)", lambda fn, path: fn in ("preadv_all", "pwritev_all")),
    (
        "worker -> trio hand-back (run_sync_soon, wakeup socket, to_thread plumbing)",
        lambda fn, path: (
            any(
                k in path
                for k in (
                    "_entry_queue.py",
                    "_wakeup_socketpair.py",
                    "_threads.py",
                    "_thread_cache",
                )
            )
            or "outcome" in path
        ),
    ),
    (
        "trio scheduler: tasks, cancel scopes, events, epoll bookkeeping",
        lambda fn, path: "trio" in path or "contextlib" in path,
    ),
    (
        "virtqueue: pop, chain decode, chain reader/writer, add_used (virtio/queues)",
        lambda fn, path: "virtio/queues/" in path or "_vm_native" in path,
    ),
    (
        "blk request: parse, execute, complete (virtio/devices/blk)",
        lambda fn, path: (
            "virtio/devices/blk/request.py" in path or ("virtio/devices/blk/device.py" in path)
        ),
    ),
    ("thread batcher (_ThreadBatcher, RawFileBackend)", lambda fn, path: "backend.py" in path),
    ("serve_queue loop (virtio/device.py)", lambda fn, path: "virtio/device.py" in path),
    (
        "vhost-user ring, inflight tracking (virtio/transport)",
        lambda fn, path: "virtio/transport/" in path,
    ),
    ("other", lambda fn, path: True),
)


def _split_frame(frame: str) -> tuple[str, str]:
    """``func (path/file.py:123)`` -> (``func``, ``path/file.py``)."""
    name, _, where = frame.rpartition(" (")
    if not name:
        return frame, ""
    return name, where.rstrip(")").rsplit(":", 1)[0]


def py_spy_summary(
    directory: Path, runs: list[Run], rate: int, pid: int, top: int = 25
) -> dict[str, Any]:
    """Per run of our back-end: py-spy's samples, the blocking waits left out
    (:data:`IDLE_LEAVES`), split main thread / worker threads, grouped in
    :data:`CATEGORIES` by leaf frame, and the top functions by self and inclusive
    samples.

    Each figure is given as a share of the busy samples and as µs/IO, the share
    applied to the CPU per I/O measured in /proc (py-spy's absolute sample counts
    are not trustworthy on a loaded machine, its proportions are).
    """
    out: dict[str, Any] = {}
    for run in runs:
        if run.backend != OURS:
            continue
        path = directory / f"{run.point}-r{run.round}.txt"
        if not path.exists():
            continue
        selfs: dict[str, int] = {}
        incl: dict[str, int] = {}
        cats: dict[str, list[int]] = {}
        main = other = idle = 0
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count_s = line.rpartition(" ")
            if not stack or not count_s.isdigit():
                continue
            n = int(count_s)
            head, _, rest = stack.partition(";")
            frames = [_split_frame(f) for f in rest.split(";") if f]
            if not frames or frames[-1][0] in IDLE_LEAVES:
                idle += n
                continue
            on_main = head.startswith(f"thread ({pid})")
            if on_main:
                main += n
            else:
                other += n
            funcs = [f"{fn} ({p.rsplit('/', 1)[-1]})" for fn, p in frames]
            selfs[funcs[-1]] = selfs.get(funcs[-1], 0) + n
            for f in set(funcs):
                incl[f] = incl.get(f, 0) + n
            leaf_fn, leaf_path = frames[-1]
            for title, match in CATEGORIES:
                if match(leaf_fn, leaf_path):
                    slot = cats.setdefault(title, [0, 0])
                    slot[0 if on_main else 1] += n
                    break
        busy = main + other or 1
        measured = run.cpu_us_per_io

        def ranked(
            d: dict[str, int], busy: int = busy, measured: float = measured
        ) -> list[tuple[str, float, float]]:
            items = sorted(d.items(), key=lambda kv: -kv[1])[:top]
            return [(f, round(measured * n / busy, 2), round(100 * n / busy, 1)) for f, n in items]

        out.setdefault(run.point, []).append(
            {
                "round": run.round,
                "ios": run.ios,
                "busy_samples": main + other,
                "idle_samples_left_out": idle,
                "sampled_busy_us_per_io": round((main + other) * 1e6 / rate / run.ios, 2),
                "measured_cpu_us_per_io": round(measured, 2),
                "main_share_percent": round(100 * main / busy, 1),
                "categories": [
                    (t, round(measured * sum(v) / busy, 2), round(100 * sum(v) / busy, 1),
                     round(100 * v[0] / busy, 1), round(100 * v[1] / busy, 1))
                    for t, v in sorted(cats.items(), key=lambda kv: -sum(kv[1]))
                ],
                "top_self": ranked(selfs),
                "top_inclusive": ranked(incl),
            }
        )  # fmt: skip
    return out


def format_py_spy(summary: dict[str, Any], top: int = 15) -> str:
    lines = []
    for point, entries in summary.items():
        for e in entries:
            lines.append(
                f"== py-spy, our back-end, {point} round {e['round'] + 1}: "
                f"{e['busy_samples']} busy samples ({e['idle_samples_left_out']} idle left out, "
                f"{e['main_share_percent']}% on the main thread); measured "
                f"{e['measured_cpu_us_per_io']} µs/IO (samples say {e['sampled_busy_us_per_io']})"
            )
            lines.append(
                "  by category of the leaf frame (µs/IO, % of busy: total = main + workers):"
            )
            for t, us, pct, m, w in e["categories"]:
                lines.append(f"    {us:8.2f} {pct:5.1f}% = {m:4.1f} + {w:4.1f}  {t}")
            for title, key in (("self", "top_self"), ("inclusive", "top_inclusive")):
                lines.append(f"  top {title} (µs/IO, % of busy samples):")
                for f, us, pct in e[key][:top]:
                    lines.append(f"    {us:8.2f} {pct:5.1f}%  {f}")
    return "\n".join(lines)


def _version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "?"
    return out.splitlines()[0].strip() if out else "?"


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    points = [POINTS[n] for n in args.points]
    image = ensure_image(fio=True)
    qsd_bin = shutil.which("qemu-storage-daemon")
    if qsd_bin is None:
        raise QemuUnavailable("qemu-storage-daemon not found (Debian: qemu-system-common)")
    workdir = Path(tempfile.mkdtemp(prefix="pyvirtio-vublk-bench-"))
    runs: list[Run] = []
    info: dict[str, Any] = {}
    t_start = time.monotonic()

    def say(msg: str) -> None:
        print(f"[{time.monotonic() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    try:
        img_ours, img_qsd = make_images(workdir, args.size_mib * MiB)
        sock_ours, sock_qsd = workdir / "ours.sock", workdir / "qsd.sock"
        procs: dict[str, trio.Process] = {}
        try:
            procs[OURS] = await start_ours(
                sock_ours, img_ours, args.num_queues, cprofile=args.ours_cprofile
            )
            procs[QSD] = await start_qemu_storage_daemon(sock_qsd, img_qsd, args.num_queues)
            ours_pid = procs[OURS].pid
            say(f"back-ends up: ours pid {ours_pid}, qsd pid {procs[QSD].pid}")
            devices = [
                VhostUserBlk(sock_ours, num_queues=args.num_queues),
                VhostUserBlk(sock_qsd, num_queues=args.num_queues),
            ]
            async with QemuGuest(image, devices=devices, fio=True, smp=2) as guest:
                say(f"guest booted in {guest.boot_seconds:.1f} s")
                disks = {}
                for name in ("vda", "vdb"):
                    serial = (
                        await guest.run(f"cat /sys/block/{name}/serial 2>/dev/null", check=False)
                    ).output.strip()
                    backend = OURS if serial == SERIAL else QSD
                    img = img_ours if backend == OURS else img_qsd
                    disks[backend] = BlkDisk(name, img, args.size_mib * MiB, args.num_queues)
                    q = f"/sys/block/{name}/queue"
                    limits = (
                        await guest.run(
                            f"echo $(cat {q}/max_sectors_kb {q}/max_segments "
                            f"{q}/max_segment_size) $(ls /sys/block/{name}/mq | wc -l)"
                        )
                    ).output.split()
                    info[backend] = {
                        "guest_disk": name,
                        "max_sectors_kb": int(limits[0]),
                        "max_segments": int(limits[1]),
                        "max_segment_size": int(limits[2]),
                        "hw_queues": int(limits[3]),
                    }
                if set(disks) != {OURS, QSD}:
                    raise RuntimeError(f"cannot tell the disks apart: {info}")
                order = [OURS, QSD]
                for p in points:
                    for rnd in range(args.rounds):
                        for b in order:
                            other = procs[QSD if b == OURS else OURS].pid
                            run = await run_one(
                                guest, disks[b], procs[b].pid, other, p, b, rnd, args
                            )
                            runs.append(run)
                            say(
                                f"{p.name} round {rnd + 1}/{args.rounds} {b:4}: "
                                f"{run.iops:9,.0f} IOPS  {run.cpu_us_per_io:7.1f} µs CPU/IO "
                                f"(main {run.main_us_per_io:.1f}, kernel {run.sys_us_per_io:.1f})"
                            )
        finally:
            with trio.CancelScope(shield=True):
                for p_ in procs.values():
                    await stop_process(p_, grace=10)
            for b, p_ in procs.items():
                if p_.returncode not in (0, None):
                    say(f"warning: {b} back-end exited with {p_.returncode}")
    finally:
        log = workdir / "ours.sock.log"
        if log.exists() and log.stat().st_size:
            tail = log.read_text(errors="replace")[-2000:]
            if "Traceback" in tail or "ERROR" in tail:
                print(f"--- our back-end's log (tail) ---\n{tail}", file=sys.stderr)
        shutil.rmtree(workdir, ignore_errors=True)
    rows = summarise(runs, points)
    idle = {}
    for b in (OURS, QSD):
        others = [r for r in runs if r.backend != b]
        wall = sum(r.seconds for r in others)
        idle[b] = round(100 * sum(r.other_backend_cpu_s for r in others) / wall, 2) if wall else 0
    spy = None
    if args.py_spy is not None:
        spy = py_spy_summary(args.py_spy, runs, args.py_spy_rate, ours_pid)
    return {
        "settings": {
            "points": [dataclasses.asdict(p) for p in points],
            "rounds": args.rounds,
            "runtime_s": args.runtime,
            "num_queues": args.num_queues,
            "image_mib": args.size_mib,
            "ioengine": args.ioengine,
            "guest": "pc,accel=tcg -cpu max, 2 vCPUs, 512 MiB",
            "order": "ours, qsd alternating per round",
        },
        "environment": {
            "host_cpus": os.cpu_count(),
            "host_cpu": _cpu_model(),
            "python_backend": _version([backend_python(), "--version"]),
            "qemu": _version(["qemu-system-x86_64", "--version"]),
            "qsd": _version([qsd_bin, "--version"]),
            "kernel": platform.release(),
        },
        "disks": info,
        "summary": rows,
        "runs": [r.as_dict() for r in runs],
        "idle_cpu_percent": idle,
        "py_spy": spy,
        "all_goals_met": all(r["iops_goal_met"] and r["cpu_goal_met"] for r in rows),
        "wall_seconds": round(time.monotonic() - t_start, 1),
    }


async def floor_costs(n: int = 20000) -> dict[str, float]:
    """CPU µs of the trio and syscall building blocks our data path uses, in this
    process (``--floor``): what each scheduler pass, task, shielded scope or thread hop
    costs on this machine before any virtio work."""
    res: dict[str, float] = {}
    cpu = time.process_time

    async def noop() -> None:
        pass

    t = cpu()
    for _ in range(n):
        await trio.lowlevel.checkpoint()
    res["trio checkpoint (one scheduler pass incl. epoll_wait)"] = (cpu() - t) / n
    t = cpu()
    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(noop)
            if i % 32 == 31:
                await trio.lowlevel.checkpoint()
    res["spawn + run + finish a trio task (32 per pass)"] = (cpu() - t) / n
    t = cpu()
    for _ in range(n // 4):
        await trio.to_thread.run_sync(_noop)
    res["trio.to_thread.run_sync(noop) round trip, one at a time"] = (cpu() - t) / (n // 4)
    t = cpu()
    for _ in range(n):
        with trio.CancelScope(shield=True):
            pass
    res["with trio.CancelScope(shield=True): pass"] = (cpu() - t) / n
    t = cpu()
    for _ in range(n):
        trio.Event()
    res["trio.Event()"] = (cpu() - t) / n
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        t = cpu()
        for _ in range(n):
            os.eventfd_write(fd, 1)
        res["os.eventfd_write (nobody waiting)"] = (cpu() - t) / n
    finally:
        os.close(fd)
    return {k: round(v * 1e6, 2) for k, v in res.items()}


def _noop() -> None:
    pass


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "?"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: 2 points, 1 round of 1 s, 64 MiB"
    )
    ap.add_argument("--json", action="store_true", help="print JSON on stdout, not the table")
    ap.add_argument(
        "--floor",
        action="store_true",
        help="only measure trio/syscall building-block costs in this process (no guest)",
    )
    ap.add_argument("--rounds", type=int, help="runs per back-end per point (default 5)")
    ap.add_argument("--runtime", type=float, help="seconds per fio run (default 8)")
    ap.add_argument("--size-mib", type=int, help="image size in MiB (default 256)")
    ap.add_argument("--num-queues", type=int, default=2, help="virtqueues, both back-ends (2)")
    ap.add_argument("--ioengine", default="libaio", help="fio ioengine (libaio)")
    ap.add_argument(
        "--points",
        type=lambda s: s.split(","),
        help=f"comma-separated subset of: {', '.join(POINTS)}",
    )
    ap.add_argument(
        "--py-spy",
        type=Path,
        metavar="DIR",
        help="record our back-end with py-spy during each of its runs (raw stacks in DIR)",
    )
    ap.add_argument("--py-spy-rate", type=int, default=250, help="py-spy samples/s (250)")
    ap.add_argument(
        "--py-spy-nonblocking",
        action="store_true",
        help="py-spy --nonblocking (less intrusive, but idle threads leak into the samples)",
    )
    ap.add_argument(
        "--ours-cprofile",
        type=Path,
        metavar="FILE",
        help="run our back-end under python -m cProfile -o FILE (main thread only)",
    )
    ap.add_argument(
        "--attach",
        metavar="CMD",
        help="run CMD during each run of the --attach-to back-end(s); {pid}, {duration} (s) "
        "and {out} (a path prefix in --attach-dir) are substituted, e.g. "
        "'perf record -e cpu-clock -g -p {pid} -o {out}.perf -- sleep {duration}'",
    )
    ap.add_argument("--attach-dir", type=Path, default=Path("."), help="for --attach's {out}")
    ap.add_argument(
        "--attach-to",
        type=lambda s: s.split(","),
        default=[OURS],
        help="back-ends --attach watches: ours (default), qsd or ours,qsd",
    )
    args = ap.parse_args(argv)
    if args.attach is not None:
        args.attach_dir.mkdir(parents=True, exist_ok=True)
    quick = args.quick
    args.rounds = args.rounds or (1 if quick else 5)
    args.runtime = args.runtime or (1.0 if quick else 8.0)
    args.size_mib = args.size_mib or (64 if quick else 256)
    args.points = args.points or (list(QUICK_POINTS) if quick else list(POINTS))
    for n in args.points:
        if n not in POINTS:
            ap.error(f"unknown point {n!r} (known: {', '.join(POINTS)})")
    if args.py_spy is not None:
        args.py_spy_binary = shutil.which("py-spy") or str(Path(backend_python()).parent / "py-spy")
        if not os.access(args.py_spy_binary, os.X_OK):
            ap.error("--py-spy: py-spy not found (pip install py-spy)")
        args.py_spy.mkdir(parents=True, exist_ok=True)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.floor:
        costs = trio.run(floor_costs)
        if args.json:
            print(json.dumps(costs, indent=2))
        else:
            for k, v in costs.items():
                print(f"{v:8.2f} µs CPU  {k}")
        return 0
    try:
        result = trio.run(bench, args)
    except (QemuUnavailable, GuestImageUnavailable) as e:
        print(f"vhost_user_blk bench: cannot run: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        s = result["settings"]
        print(
            f"fio {s['ioengine']} --direct=1, {s['runtime_s']:g} s per run, "
            f"{s['rounds']} round(s) per back-end, num-queues={s['num_queues']}, "
            f"{s['image_mib']} MiB image; medians; CPU = utime+stime of all threads "
            f"over the fio run / I/Os (in parentheses: the main thread's share, the kernel's "
            "(stime) share)"
        )
        print(format_table(result["summary"]))
        d = result["disks"]
        print(
            "guest queue limits (max_sectors_kb/max_segments/max_segment_size/hw queues): "
            + "; ".join(
                f"{b} {v['max_sectors_kb']}/{v['max_segments']}/{v['max_segment_size']}"
                f"/{v['hw_queues']}"
                for b, v in d.items()
            )
        )
        print(
            "CPU of each back-end while idle (connected, the other one's fio running): "
            + ", ".join(f"{b} {v}% of a core" for b, v in result["idle_cpu_percent"].items())
        )
        print(f"all goals met: {result['all_goals_met']}  ({result['wall_seconds']} s)")
        if result["py_spy"]:
            print(format_py_spy(result["py_spy"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
