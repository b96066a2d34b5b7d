#!/usr/bin/env python3
"""Real storage: our vhost-user-blk back-end vs qemu-storage-daemon, no VM.

Issue 8 §4.  A guest under TCG cannot issue more than a few thousand requests a
second (see ``--guest-ceiling``), far below a disk's cold random-read rate, so the
load comes from a vhost-user front-end without a VM: the handshake and the split
rings are set up by the project's Python front-end
(``virtio.testing.vhost_user_frontend``) and a C driver loop (``bench/vu_load.c``)
keeps ``qd`` requests in flight on each ring, waiting on the call eventfd as a
guest waits for its interrupt.

Matrices (each point: both back-ends, interleaved A/B then B/A per round, a fresh
back-end process per run, so ratios come from the same minutes of the machine):

* ``cold``: O_DIRECT (ours ``--cache none --aio io_uring``, qsd
  ``cache.direct=on,aio=io_uring``), ``echo 3 > /proc/sys/vm/drop_caches`` before
  every run, a 4 GiB image on the root file system; 4 KiB random read / write at
  QD 1 and 32, 64 KiB sequential read / write at QD 8; 1 and 2 queues (QD per
  queue).
* ``cache``: page cache (ours ``--cache writeback``, qsd ``cache.direct=off,
  aio=io_uring``), image read into the page cache first; 4 KiB random read / write
  at QD 1 and 32, 1 and 2 queues.
* ``qcow2`` (issue 9 §3): the same cold O_DIRECT set-up on qcow2 (ours ``--format
  qcow2``, qsd ``driver=qcow2``), 64 KiB clusters, one queue: ``alloc-*`` a fully
  allocated image (``qemu-img convert`` of the raw image), ``fresh-*`` a new
  overlay over the raw image (every read falls through to the base; made afresh
  before every run); 4 KiB random read / write at QD 1 and 32.
* ``nbd`` (issue 9 §3): both back-ends on the same NBD export, a ``qemu-nbd``
  (``--cache=none --aio=io_uring -e 2``: two clients, Python's connection and our
  data plane's; qsd uses one) of the raw image started for every run, caches
  dropped; ours ``--blk-file nbd+unix://...``, qsd ``driver=nbd``; 4 KiB random
  read / write at QD 1 and 32, one queue.
* ``nbd-tls``: the same with the export requiring TLS (qemu-nbd
  ``--tls-creds``, X.509 certificates made for the run by
  ``virtio.testing.nbd_pki``); ours ``nbds+unix://...?tls-certificates=DIR`` (the
  native data plane speaks TLS with GnuTLS; ``--backends ours,baseline,qsd
  --baseline-repo DIR`` runs an older checkout beside it), qsd ``driver=nbd`` with
  ``tls-creds``.

Per run: IOPS (requests completed / seconds) and the back-end's CPU time per
request (utime + stime of all its threads, ``/proc/PID/stat``).  Per point: the
median of the rounds and the spread (min-max), the IOPS ratio ours/qsd and the
CPU ratio ours/qsd.

Usage (root, for drop_caches)::

    python bench/storage_matrix.py                       # both matrices (~25 min)
    python bench/storage_matrix.py --matrix cold --rounds 3 --runtime 8
    python bench/storage_matrix.py --quick               # 2 points, 1 round (~1 min)
    python bench/storage_matrix.py --backends ours,ours-threads,qsd
    python bench/storage_matrix.py --matrix cold --points randread-4k-qd1-q2 \
        --backends ours-qt1,ours,qsd --profile     # --queue-threads 1; per-thread costs
    python bench/storage_matrix.py --matrix cache --backends ours,baseline,qsd \\
        --baseline-repo /work/main                       # page cache vs an older checkout
    python bench/storage_matrix.py --json > out.json
    python bench/storage_matrix.py --matrix cold --backends ours,qsd,host  # + the disk itself
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import cffi  # noqa: E402
import trio  # noqa: E402

from virtio.testing.blk_checks import stop_process, wait_for_socket  # noqa: E402
from virtio.testing.nbd_pki import make_pki, tls_server_args  # noqa: E402
from virtio.testing.vhost_user_frontend import GuestRam, VhostUserFrontend  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
CLK_TCK = os.sysconf("SC_CLK_TCK")
QUEUE_SIZE = 256
PER_QUEUE = 8 * MiB
"""Guest RAM per queue: rings, headers, status bytes, data buffers."""


# --------------------------------------------------------------------------- the C driver
_CDEF = """
struct lq {
    int memfd; uint64_t memsize; uint64_t desc, avail, used; uint32_t size;
    int kick_fd, call_fd; uint64_t hdr_gpa, st_gpa, data_gpa; uint32_t bs, qd;
    int write, seq; uint64_t span_sectors; uint64_t first_sector; uint64_t seed;
    double seconds; uint64_t ios, errors, kicks, waits; double elapsed;
};
int lq_run(struct lq *q);
"""


def load_driver() -> tuple[Any, Any]:
    """Compile ``vu_load.c`` once per source version (cache: ~/.cache/pyvirtio)."""
    src = Path(__file__).with_name("vu_load.c")
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:12]
    cache = Path(os.environ.get("PYVIRTIO_CACHE", Path.home() / ".cache" / "pyvirtio"))
    out = cache / f"vu_load-{digest}.so"
    if not out.exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(tmp), str(src)], check=True)
        os.replace(tmp, out)
    ffi = cffi.FFI()
    ffi.cdef(_CDEF)
    return ffi, ffi.dlopen(str(out))


# --------------------------------------------------------------------------- points
@dataclasses.dataclass(frozen=True)
class Point:
    name: str
    bs: int
    qd: int
    write: bool
    seq: bool
    queues: int
    image: str = "raw"  # raw, qcow2-alloc, qcow2-fresh, nbd


def points_for(matrix: str) -> list[Point]:
    shapes = [("randread-4k", 4096, False, False), ("randwrite-4k", 4096, True, False)]
    out = []
    if matrix in ("nbd", "nbd-tls"):
        for name, bs, write, seq in shapes:
            for qd in (1, 32):
                out.append(Point(f"{matrix}-{name}-qd{qd}", bs, qd, write, seq, 1, matrix))
        return out
    if matrix == "qcow2":
        for kind in ("alloc", "fresh"):
            for name, bs, write, seq in shapes:
                for qd in (1, 32):
                    p = Point(f"{kind}-{name}-qd{qd}", bs, qd, write, seq, 1, f"qcow2-{kind}")
                    out.append(p)
        return out
    for queues in (1, 2):
        for name, bs, write, seq in shapes:
            for qd in (1, 32):
                out.append(Point(f"{name}-qd{qd}-q{queues}", bs, qd, write, seq, queues))
        if matrix == "cold":
            out.append(Point(f"seqread-64k-qd8-q{queues}", 65536, 8, False, True, queues))
            out.append(Point(f"seqwrite-64k-qd8-q{queues}", 65536, 8, True, True, queues))
    return out


# --------------------------------------------------------------------------- back-ends
def backend_python() -> str:
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def backend_cmd(
    name: str,
    matrix: str,
    sock: Path,
    image: Path,
    queues: int,
    baseline: Path | None = None,
    fmt: str = "raw",
) -> list[str]:
    direct = matrix in ("cold", "qcow2")
    if fmt in ("nbd", "nbd-tls"):  # image: the NBD server's unix socket, export "disk"
        tls = fmt == "nbd-tls"  # certificates in image.parent / "pki"
        if name.startswith("ours") or name == "baseline":  # (baseline: run from its cwd)
            uri = f"nbd+unix:///disk?socket={image}"
            if tls:
                uri = uri.replace("nbd+", "nbds+") + f"&tls-certificates={image.parent / 'pki'}"
                uri += "&tls-hostname=localhost"  # as qsd (which needs one over unix)
            return [
                backend_python(), "-m", "virtio", "serve", "blk",
                "--socket-path", str(sock), "--blk-file", uri,
                "--num-queues", str(queues), "--queue-size", str(QUEUE_SIZE),
            ]  # fmt: skip
        creds = f"tls-creds-x509,id=tls0,endpoint=client,dir={image.parent / 'pki'}"
        return [
            shutil.which("qemu-storage-daemon") or "qemu-storage-daemon",
            *(["--object", creds] if tls else []),
            "--blockdev",
            f"driver=nbd,node-name=disk0,server.type=unix,server.path={image},export=disk"
            + (",tls-creds=tls0,tls-hostname=localhost" if tls else ""),
            "--export",
            f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={sock},"
            f"writable=on,num-queues={queues}",
        ]  # fmt: skip
    if name == "baseline":  # another checkout (e.g. main before this work)
        if baseline is None:
            raise SystemExit("the baseline back-end needs --baseline-repo")
        return [
            backend_python(), "-m", "virtio", "serve", "blk",  # run from cwd=baseline
            "--socket-path", str(sock), "--blk-file", str(image), "--format", "raw",
            "--num-queues", str(queues), "--queue-size", str(QUEUE_SIZE),
            # cold: a checkout with --cache/--aio (page cache: the defaults, any checkout)
            *(["--cache", "none", "--aio", "io_uring"] if direct else []),
        ]  # fmt: skip
    if name.startswith("ours"):
        aio = "threads" if name == "ours-threads" else "io_uring"
        # ours-qtN: --queue-threads N (N threads serve the queues, one io_uring each)
        qt = ["--queue-threads", name[len("ours-qt") :]] if name.startswith("ours-qt") else []
        return [
            backend_python(), "-m", "virtio", "serve", "blk",
            "--socket-path", str(sock), "--blk-file", str(image), "--format", fmt,
            "--num-queues", str(queues), "--queue-size", str(QUEUE_SIZE),
            "--cache", "none" if direct else "writeback", "--aio", aio, *qt,
        ]  # fmt: skip
    qsd = shutil.which("qemu-storage-daemon")
    if qsd is None:
        raise SystemExit("qemu-storage-daemon not found (Debian: qemu-system-common)")
    # qsd-iothread: the export in an iothread (QEMU's adaptive polling, poll-max-ns
    # 32 µs by default) instead of the main loop
    iothread = name == "qsd-iothread"
    return [
        qsd,
        *(["--object", "iothread,id=iot0"] if iothread else []),
        "--blockdev",
        f"driver=file,node-name=file0,filename={image},"
        f"cache.direct={'on' if direct else 'off'},aio=io_uring",
        "--blockdev", f"driver={fmt},node-name=disk0,file=file0",
        "--export",
        f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={sock},"
        f"writable=on,num-queues={queues}" + (",iothread=iot0" if iothread else ""),
    ]  # fmt: skip


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    fields = data[data.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def thread_snapshot(pid: int) -> dict[int, tuple[str, int, int, int]]:
    """Per thread of pid: (name, CPU ns run (schedstat), voluntary and involuntary
    context switches)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            comm = (task / "comm").read_text().strip()
            run_ns = int((task / "schedstat").read_text().split()[0])
            status = (task / "status").read_text().splitlines()
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended meanwhile
        sw = {k: int(v) for k, v in (ln.split(":\t") for ln in status if "ctxt_switches" in ln)}
        out[int(task.name)] = (
            comm,
            run_ns,
            sw.get("voluntary_ctxt_switches", 0),
            sw.get("nonvoluntary_ctxt_switches", 0),
        )
    return out


def thread_profile(
    before: dict[int, tuple[str, int, int, int]],
    after: dict[int, tuple[str, int, int, int]],
    syscalls: dict[int, int],
    ios: int,
) -> list[dict[str, Any]]:
    """Per thread busy during the run: CPU µs, context switches and system calls per
    request (threads that did nothing are left out)."""
    rows = []
    for tid, (comm, run, vol, inv) in sorted(after.items()):
        _, run0, vol0, inv0 = before.get(tid, (comm, 0, 0, 0))
        d = (run - run0, vol - vol0, inv - inv0, syscalls.get(tid, 0))
        if not any(d):
            continue
        rows.append(
            {
                "tid": tid,
                "comm": comm,
                "cpu_us_per_io": d[0] / 1e3 / ios,
                "vol_cs_per_io": d[1] / ios,
                "invol_cs_per_io": d[2] / ios,
                "syscalls_per_io": d[3] / ios,
            }
        )
    return rows


def start_perf(pid: int, out: Path) -> subprocess.Popen[bytes] | None:
    """``perf stat --per-thread`` counting system calls of pid (None: no perf)."""
    perf = shutil.which("perf")
    if perf is None:
        return None
    return subprocess.Popen(
        [perf, "stat", "--per-thread", "-x", ",", "-o", str(out),
         "-e", "raw_syscalls:sys_enter", "-p", str(pid)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def stop_perf(proc: subprocess.Popen[bytes] | None, out: Path) -> dict[int, int]:
    """Stop perf (SIGINT: it prints its counts) and return system calls per thread."""
    if proc is None:
        return {}
    proc.send_signal(2)
    proc.wait(10)
    counts: dict[int, int] = {}
    for line in out.read_text().splitlines():
        f = line.split(",")
        # "comm-tid,count,,event,..."
        if len(f) > 3 and "sys_enter" in f[3] and f[1].isdigit():
            counts[int(f[0].rsplit("-", 1)[1])] = int(f[1])
    return counts


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def make_image(path: Path, size: int) -> None:
    """Every block written (no holes: a hole reads without touching the disk)."""
    if path.exists() and path.stat().st_size == size:
        return
    chunk = bytearray(os.urandom(MiB))
    with open(path, "wb") as f:
        for i in range(size // MiB):
            chunk[:8] = i.to_bytes(8, "little")
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def qcow2_image(args: argparse.Namespace, kind: str, work: Path) -> Path:
    """The qcow2 image of a point: ``qcow2-alloc`` every cluster allocated (made once,
    next to the raw image; writes go in place, it stays allocated), ``qcow2-fresh`` a
    new empty overlay over the raw image (made for every run)."""
    if kind == "qcow2-alloc":
        path = args.image.with_suffix(".alloc.qcow2")
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2",
                            "-o", "cluster_size=65536", str(args.image), str(tmp)],
                           check=True)  # fmt: skip
            tmp.rename(path)
        return path
    path = work / "fresh.qcow2"
    path.unlink(missing_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536",
                    "-b", str(args.image), "-F", "raw", str(path)], check=True)  # fmt: skip
    return path


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(16 * MiB):
            pass


# --------------------------------------------------------------------------- a run
@dataclasses.dataclass
class Run:
    point: str
    backend: str
    round: int
    iops: float
    ios: int
    seconds: float
    cpu_s: float
    errors: int
    kicks: int
    waits: int
    threads: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def cpu_us_per_io(self) -> float:
        return self.cpu_s / self.ios * 1e6 if self.ios else float("nan")


async def run_host(point: Point, rnd: int, args: argparse.Namespace) -> Run:
    """Back-end ``host``: no back-end at all -- fio on the host straight on the image
    (O_DIRECT, io_uring; caches dropped first), one job per queue at the point's QD:
    the disk's own rate in the same minutes, the ceiling the back-ends are held to.
    CPU per I/O is fio's (user + system), not a back-end's."""
    if args.matrix_now != "cold" or point.image != "raw":
        raise SystemExit("back-end host: cold raw points only (fio on the raw image)")
    fio = shutil.which("fio")
    if fio is None:
        raise SystemExit("back-end host needs fio (Debian: fio)")
    drop_caches()
    rw = (
        ("write" if point.write else "read")
        if point.seq
        else ("randwrite" if point.write else "randread")
    )
    # one job per queue; sequential streams of different jobs start far apart
    size = args.size // point.queues if point.seq else args.size
    cmd = [
        fio, "--name=host", f"--filename={args.image}", "--direct=1", "--ioengine=io_uring",
        f"--rw={rw}", f"--bs={point.bs}", f"--iodepth={point.qd}",
        f"--numjobs={point.queues}", "--group_reporting", "--time_based",
        f"--runtime={args.runtime}", f"--size={size}", f"--randseed={rnd + 1}",
        "--output-format=json",
        *([f"--offset_increment={size}"] if point.seq and point.queues > 1 else []),
    ]  # fmt: skip
    out = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True)
    job = json.loads(out.stdout)["jobs"][0]
    side = job["write" if point.write else "read"]
    seconds = side["runtime"] / 1e3  # wall time (job_runtime sums the jobs')
    cpu = (job["usr_cpu"] + job["sys_cpu"]) / 100 * job["job_runtime"] / 1e3
    if job.get("error"):
        raise RuntimeError(f"host {point.name}: fio error {job['error']}")
    return Run(point.name, "host", rnd, side["iops"], side["total_ios"], seconds, cpu, 0, 0, 0)


async def run_one(
    ffi: Any, lib: Any, point: Point, backend: str, rnd: int, args: argparse.Namespace, work: Path
) -> Run:
    if backend == "host":
        return await run_host(point, rnd, args)
    sock = work / f"{backend}.sock"
    sock.unlink(missing_ok=True)
    image, fmt = args.image, "raw"
    nbd_server = None
    if point.image in ("nbd", "nbd-tls"):
        image, fmt = work / "nbd.sock", point.image
        image.unlink(missing_ok=True)
        tls: list[str] = []
        if fmt == "nbd-tls":
            if not (work / "pki").exists():
                make_pki(work / "pki")
            tls = tls_server_args("qemu-nbd", work / "pki")
        nbd_server = subprocess.Popen(
            ["qemu-nbd", "-f", "raw", "-x", "disk", "-t", "-e", "2", "-k", str(image), *tls,
             "--cache=none", "--aio=io_uring", str(args.image)],
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        with trio.fail_after(20):
            while not image.exists():
                await trio.sleep(0.02)
    elif point.image != "raw":
        image, fmt = qcow2_image(args, point.image, work), "qcow2"
    if args.matrix_now in ("cold", "qcow2", "nbd", "nbd-tls"):
        drop_caches()
    cmd = backend_cmd(backend, args.matrix_now, sock, image, point.queues, args.baseline_repo, fmt)
    cwd = args.baseline_repo if backend == "baseline" else REPO
    with open(work / f"{backend}.log", "ab") as log:
        proc = await trio.lowlevel.open_process(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=cwd
        )
    ram = GuestRam(PER_QUEUE * point.queues)
    fe = None
    try:
        await wait_for_socket(sock, proc, timeout=30)
        fe = await VhostUserFrontend.connect(sock)
        await fe.negotiate()
        await fe.set_mem_table(ram)
        qs = []
        span = args.size // 512  # the virtual size (a qcow2 file is larger)
        for i in range(point.queues):
            base = i * PER_QUEUE
            vring = await fe.setup_vring(i, ram, size=QUEUE_SIZE, offset=base, data_size=4096)
            d = vring.driver
            q = ffi.new("struct lq *")
            q.memfd, q.memsize = ram.fds[0], PER_QUEUE * point.queues
            q.desc, q.avail, q.used, q.size = d.desc_addr, d.driver_addr, d.device_addr, d.size
            q.kick_fd, q.call_fd = vring.kick_fd, vring.call_fd
            q.hdr_gpa, q.st_gpa, q.data_gpa = base + MiB, base + MiB + 65536, base + 2 * MiB
            q.bs, q.qd, q.write, q.seq = point.bs, point.qd, point.write, point.seq
            # Sequential streams of different queues start far apart.
            q.first_sector = (span // point.queues) * i if point.seq else 0
            q.span_sectors = span // point.queues if point.seq else span
            q.seed = 0x9E3779B97F4A7C15 * (rnd * 7 + i + 1) & (1 << 64) - 1
            q.seconds = args.runtime
            qs.append(q)
        cpu0 = cpu_seconds(proc.pid)
        if args.profile:
            snap0 = thread_snapshot(proc.pid)
            perf = start_perf(proc.pid, work / "perf.txt")
        rcs: list[int] = []
        async with trio.open_nursery() as nursery:
            for q in qs:

                async def go(q=q) -> None:
                    rcs.append(await trio.to_thread.run_sync(lib.lq_run, q))

                nursery.start_soon(go)
        cpu = cpu_seconds(proc.pid) - cpu0
        if args.profile:
            snap1 = thread_snapshot(proc.pid)
            syscalls = stop_perf(perf, work / "perf.txt")
        if any(rcs):
            raise RuntimeError(f"{backend} {point.name}: driver loop failed {rcs}")
        errors = sum(int(q.errors) for q in qs)
        if errors:  # a rate of failing requests measures an error path, not the back-end
            tail = (work / f"{backend}.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{backend} {point.name}: {errors} requests failed; log:\n{tail}")
        ios = sum(int(q.ios) for q in qs)
        seconds = max(float(q.elapsed) for q in qs)
        threads = thread_profile(snap0, snap1, syscalls, ios) if args.profile else []
        return Run(
            point.name,
            backend,
            rnd,
            ios / seconds,
            ios,
            seconds,
            cpu,
            errors,
            sum(int(q.kicks) for q in qs),
            sum(int(q.waits) for q in qs),
            threads,
        )
    finally:
        if fe is not None:
            await fe.aclose()
        await stop_process(proc)
        ram.close()
        if nbd_server is not None:
            nbd_server.terminate()
            nbd_server.wait(10)


# --------------------------------------------------------------------------- summary
def anchor_of(backends: list[str]) -> str:
    """The back-end the ratios are taken against: the first qsd configuration listed
    (``--backends ours,qsd-iothread,qsd``: qsd-iothread)."""
    return next((b for b in backends if b.startswith("qsd")), "qsd")


def summarise(runs: list[Run], points: list[Point], backends: list[str]) -> list[dict[str, Any]]:
    rows = []
    anchor = anchor_of(backends)
    for p in points:
        row: dict[str, Any] = {"point": p.name}
        for b in backends:
            rs = [r for r in runs if r.point == p.name and r.backend == b]
            if not rs:
                continue
            iops = [r.iops for r in rs]
            row[b] = {
                "iops": statistics.median(iops),
                "iops_min": min(iops),
                "iops_max": max(iops),
                "cpu_us_per_io": statistics.median(r.cpu_us_per_io for r in rs),
                "errors": sum(r.errors for r in rs),
            }
        ours, qsd = row.get(backends[0]), row.get(anchor)
        if ours and qsd:
            row["iops_ratio"] = ours["iops"] / qsd["iops"]
            row["cpu_ratio"] = ours["cpu_us_per_io"] / qsd["cpu_us_per_io"]
            # per-round ratios (A and B ran back to back): their spread
            per = [
                a.iops / b.iops
                for a in runs
                for b in runs
                if a.point == b.point == p.name
                and a.round == b.round
                and a.backend == backends[0]
                and b.backend == anchor
            ]
            row["ratio_min"], row["ratio_max"] = min(per), max(per)
            # the median of the per-round ratios: each pair ran back to back, so a
            # machine that changes speed between rounds moves both (net_testpmd.py too)
            row["ratio_paired"] = statistics.median(per)
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]], backends: list[str]) -> str:
    head = "| point | " + " | ".join(f"{b} IOPS (min-max) | {b} CPU µs/IO" for b in backends)
    a = anchor_of(backends)
    head += f" | IOPS ours/{a} (per-round range) | paired x | CPU ours/{a} |"
    lines = [head, "|" + "---|" * (2 + 2 * len(backends) + 2)]
    for r in rows:
        cells = [r["point"]]
        for b in backends:
            x = r.get(b)
            if x is None:
                cells += ["-", "-"]
                continue
            cells.append(
                f"{x['iops'] / 1000:.1f}k ({x['iops_min'] / 1000:.1f}-{x['iops_max'] / 1000:.1f})"
            )
            cells.append(f"{x['cpu_us_per_io']:.1f}")
        if "iops_ratio" in r:
            cells.append(f"{r['iops_ratio']:.2f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})")
            cells.append(f"{r['ratio_paired']:.2f}")
            cells.append(f"{r['cpu_ratio']:.2f}")
        else:
            cells += ["-", "-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    ffi, lib = load_driver()
    backends = args.backends.split(",")
    make_image(args.image, args.size)
    out: dict[str, Any] = {"runs": [], "tables": {}}
    with tempfile.TemporaryDirectory(prefix="pyvirtio-storage-") as tmp:
        work = Path(tmp)
        for matrix in args.matrix.split(","):
            args.matrix_now = matrix
            points = points_for(matrix)
            if args.points:
                points = [p for p in points if p.name in args.points.split(",")]
            if matrix == "cache":
                warm(args.image)
            runs: list[Run] = []
            for p in points:
                for rnd in range(args.rounds):
                    order = backends if rnd % 2 == 0 else backends[::-1]
                    for b in order:
                        if matrix == "cache":
                            warm(args.image)
                        r = await run_one(ffi, lib, p, b, rnd, args, work)
                        runs.append(r)
                        print(
                            f"[{matrix}] {p.name} {b} r{rnd}: {r.iops / 1000:.1f}k IOPS, "
                            f"{r.cpu_us_per_io:.1f} µs CPU/IO, errors {r.errors}",
                            file=sys.stderr,
                            flush=True,
                        )
                        for t in r.threads:
                            print(
                                f"    {t['comm']:<16} {t['tid']:>7}: "
                                f"{t['cpu_us_per_io']:6.2f} µs CPU, "
                                f"{t['vol_cs_per_io']:5.2f} + {t['invol_cs_per_io']:5.2f} "
                                f"ctx switches, {t['syscalls_per_io']:5.2f} syscalls per IO",
                                file=sys.stderr,
                                flush=True,
                            )
            rows = summarise(runs, points, backends)
            out["tables"][matrix] = rows
            out["runs"] += [dataclasses.asdict(r) | {"matrix": matrix} for r in runs]
            if not args.json:
                print(f"\n### {matrix}\n\n{format_table(rows, backends)}\n", flush=True)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--matrix",
        default="cold,cache",
        help="cold, cache, qcow2, nbd, nbd-tls, or several (cold,cache)",
    )
    ap.add_argument("--image", type=Path, default=Path("/var/tmp/pyvirtio-storage-bench.img"))
    ap.add_argument("--size", type=int, default=4 * GiB, help="image size in bytes (4 GiB)")
    ap.add_argument("--runtime", type=float, default=8.0, help="seconds per run (8)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--points", default="", help="comma-separated point names")
    ap.add_argument(
        "--backends",
        default="ours,qsd",
        help="ours, ours-threads, ours-qtN (--queue-threads N), qsd, qsd-iothread (the export "
        "in an iothread), baseline, host (fio on the image itself: the disk's ceiling, cold "
        "raw points only); the first is A, ratios against the first qsd* listed",
    )
    ap.add_argument(
        "--baseline-repo", type=Path, help="a checkout whose back-end is 'baseline' (page cache)"
    )
    ap.add_argument("--quick", action="store_true", help="2 cold points, 1 round, 4 s")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="per back-end thread: CPU, context switches and system calls (perf) per IO",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.matrix, args.rounds, args.runtime = "cold", 1, 4.0
        args.points = args.points or "randread-4k-qd1-q1,randread-4k-qd32-q1"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    out = trio.run(bench, args)
    out["seconds"] = time.monotonic() - t0
    if args.json:
        json.dump(out, sys.stdout, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
