"""Drive DPDK's ``dpdk-testpmd`` as a VM-less virtio-net peer (issue 10 §4-§5).

Two kinds of testpmd port are used, both virtual devices (no NIC; 4 KiB pages
with ``--no-huge`` unless ``Testpmd(hugepages=True)``, which needs hugetlbfs
mounted and 2 MiB pages reserved):

- :class:`VhostPort`: DPDK's vhost PMD, a vhost-user **backend** (the anchor we
  compare ``virtio serve net`` with): ``net_vhostN,iface=SOCK,queues=N[,client=1]``.
- :class:`VirtioUserPort`: the virtio-user PMD, a vhost-user **frontend** (a
  guest's virtio-net driver without a guest): ``net_virtio_userN,path=SOCK,
  queues=N,packed_vq=..,mrg_rxbuf=..,in_order=..``.

A :class:`Testpmd` is one interactive testpmd process (``-i``) driven through a
pipe: :meth:`Testpmd.command` writes one command line and returns the output up
to the next ``testpmd>`` prompt (stdout is unbuffered through ``stdbuf -o0``, so
a command's ``printf`` output is complete when the prompt appears).  Statistics
come from ``show port stats all`` (:meth:`Testpmd.port_stats`).

Placement on a small machine: every process gets ``-l 0,1 --main-lcore M``; its
single forwarding lcore is the other one (:attr:`Testpmd.forward_cpu`).  Two
processes must forward on different CPUs: testpmd's lcores busy-poll, and two
pollers sharing one CPU exchange whole scheduler slices, collapsing throughput
to thousands of packets per second.

Handshake robustness (the "first handshake fails with EINTR" quirk): testpmd
calls ``mlockall(MCL_CURRENT | MCL_FUTURE)`` at start-up unless ``--no-mlockall``
is given.  In a vhost PMD process that makes VHOST_USER_SET_MEM_TABLE fault in
and lock every page of the frontend's memory (``-m 1024``: 1 GiB, 262144 pages)
inside the ``mmap``: 0.8 s on an idle 2-core machine, 2-5 s on a busy one.  The
virtio-user frontend waits for that reply (REPLY_ACK) in a ``recv()`` that DPDK
22.11 does not retry on EINTR (``vhost_user_read()`` in
``drivers/net/virtio/virtio_user/vhost_user.c``), and testpmd's SIGINT/SIGTERM
handlers are installed without SA_RESTART, so a stop signal that lands during
those seconds fails the handshake ("Failed to recv msg header: Interrupted
system call").  This harness therefore passes ``--no-mlockall`` (the reply then
takes ~0.2 ms), waits for a process's prompt (its ports probed, i.e. the
handshake done) before using it, and never signals a process it has not asked to
``quit`` first.  No retry is needed or done.  See docs/benchmarks.md (net).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "PROMPT",
    "PortStats",
    "Testpmd",
    "TestpmdError",
    "TestpmdUnavailable",
    "VhostPort",
    "VirtioUserPort",
    "cpu_seconds",
    "find_testpmd",
    "wait_for_socket",
]

PROMPT = b"testpmd> "
_PORT_LINE = re.compile(rb"^Port (\d+): ([0-9A-F:]{17})\s*$", re.M)
_STATS_BLOCK = re.compile(r"NIC statistics for port (\d+)\s*#+(.*?)#{20,}", re.S)


class TestpmdUnavailable(RuntimeError):
    """dpdk-testpmd is not installed (Debian package ``dpdk-dev``)."""

    __test__ = False  # not a pytest class despite the name


class TestpmdError(RuntimeError):
    """A testpmd process failed to start, died, or did not answer in time.

    The message carries the tail of the process's output.
    """

    __test__ = False


def hugetlbfs_mounts() -> list[Path]:
    """Mount points of hugetlbfs (where DPDK keeps its hugepage segment files)."""
    with open("/proc/mounts") as f:
        return [Path(ln.split()[1]) for ln in f if ln.split()[2:3] == ["hugetlbfs"]]


def find_testpmd() -> str:
    """Path of ``dpdk-testpmd``; raises :class:`TestpmdUnavailable` when absent."""
    path = shutil.which("dpdk-testpmd")
    if path is None:
        raise TestpmdUnavailable("dpdk-testpmd not found (Debian package dpdk-dev)")
    return path


@dataclasses.dataclass(frozen=True)
class VhostPort:
    """A vhost PMD port: testpmd as the vhost-user backend on ``socket``."""

    socket: Path
    queues: int = 1
    client: bool = False

    def vdev(self, index: int) -> str:
        arg = f"net_vhost{index},iface={self.socket},queues={self.queues}"
        return arg + (",client=1" if self.client else "")


@dataclasses.dataclass(frozen=True)
class VirtioUserPort:
    """A virtio-user port: testpmd as the vhost-user frontend connecting to ``path``.

    ``packed_vq`` selects packed rings (virtio 1.4 §2.8) over split (§2.7);
    ``mrg_rxbuf`` and ``in_order`` offer VIRTIO_NET_F_MRG_RXBUF and VIRTIO_F_IN_ORDER.
    """

    path: Path
    queues: int = 1
    packed_vq: bool = False
    mrg_rxbuf: bool = True
    in_order: bool = False
    queue_size: int = 256
    server: bool = False

    def vdev(self, index: int) -> str:
        arg = (
            f"net_virtio_user{index},path={self.path},queues={self.queues},"
            f"queue_size={self.queue_size},packed_vq={int(self.packed_vq)},"
            f"mrg_rxbuf={int(self.mrg_rxbuf)},in_order={int(self.in_order)}"
        )
        return arg + (",server=1" if self.server else "")


@dataclasses.dataclass(frozen=True)
class PortStats:
    """One port's cumulative counters from ``show port stats``."""

    port: int
    rx_packets: int
    rx_missed: int
    rx_bytes: int
    rx_errors: int
    rx_nombuf: int
    tx_packets: int
    tx_errors: int
    tx_bytes: int

    @classmethod
    def parse_all(cls, text: str) -> dict[int, PortStats]:
        """Every ``NIC statistics for port N`` block of ``text``, by port."""
        out = {}
        for m in _STATS_BLOCK.finditer(text):
            body = m.group(2)

            def field(name: str, body: str = body) -> int:
                f = re.search(rf"{re.escape(name)}:\s*(\d+)", body)
                if f is None:
                    raise TestpmdError(f"no {name} in port stats: {body!r}")
                return int(f.group(1))

            port = int(m.group(1))
            out[port] = cls(
                port=port,
                rx_packets=field("RX-packets"),
                rx_missed=field("RX-missed"),
                rx_bytes=field("RX-bytes"),
                rx_errors=field("RX-errors"),
                rx_nombuf=field("RX-nombuf"),
                tx_packets=field("TX-packets"),
                tx_errors=field("TX-errors"),
                tx_bytes=field("TX-bytes"),
            )
        return out


def wait_for_socket(
    path: Path, timeout: float = 30.0, proc: subprocess.Popen | None = None
) -> None:
    """Poll until ``path`` is a listening unix socket (a connect succeeds)."""
    import socket

    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise TestpmdError(
                f"process {proc.pid} exited ({proc.returncode}) before {path} listened"
            )
        if Path(path).is_socket():
            with (
                socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s,
                contextlib.suppress(OSError),
            ):
                s.connect(str(path))
                return
        if time.monotonic() > deadline:
            raise TestpmdError(f"{path} not listening after {timeout} s")
        time.sleep(0.02)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all its threads (``/proc/PID/stat``), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


_counter = itertools.count()


class Testpmd:
    """One interactive ``dpdk-testpmd`` process; use as a context manager.

    ``forward_cpu`` is the CPU its forwarding lcore runs on (the main lcore, which
    only reads commands, gets the other of CPUs 0 and 1).  ``forward_mode`` is set
    at start-up; forwarding starts only on :meth:`start` (``start tx_first`` when
    ``tx_first`` bursts are asked for).  ``txpkts`` is the generated frame length
    in bytes (txonly and ``tx_first``), without the 4-byte CRC.
    """

    __test__ = False  # not a pytest class despite the name

    def __init__(
        self,
        ports: Sequence[VhostPort | VirtioUserPort],
        *,
        forward_cpu: int,
        forward_mode: str = "io",
        txpkts: int = 64,
        rxq: int | None = None,
        memory_mb: int = 1024,
        hugepages: bool = False,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 60.0,
        name: str | None = None,
    ) -> None:
        if forward_cpu not in (0, 1):
            raise ValueError("forward_cpu must be 0 or 1 (the harness assumes CPUs 0 and 1)")
        self.ports = tuple(ports)
        self.forward_cpu = forward_cpu
        self.forward_mode = forward_mode
        self.name = name or f"testpmd{next(_counter)}"
        self.file_prefix = f"pyvirtio-{self.name}-{uuid.uuid4().hex[:8]}"
        self.hugepages = hugepages
        queues = rxq or max(p.queues for p in self.ports)
        self.argv = [
            "stdbuf", "-o0",
            find_testpmd(),
            "-l", "0,1", "--main-lcore", str(1 - forward_cpu),
            *(("--no-huge",) if not hugepages else ("--single-file-segments",)),
            "-m", str(memory_mb), "--no-pci",
            "--file-prefix", self.file_prefix,
            *(arg for i, p in enumerate(self.ports) for arg in ("--vdev", p.vdev(i))),
            "--",
            "-i", "--no-mlockall",
            f"--forward-mode={forward_mode}",
            f"--txpkts={txpkts}",
            f"--rxq={queues}", f"--txq={queues}",
            "--nb-cores=1",
            *extra_args,
        ]  # fmt: skip
        self._startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._buf = bytearray()
        self._consumed = 0
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None
        self.startup_output = ""
        self.macs: dict[int, str] = {}

    # -- life cycle -------------------------------------------------------------

    def __enter__(self) -> Testpmd:
        self.launch()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise TestpmdError(f"{self.name} not started")
        return self.proc.pid

    def launch(self) -> None:
        """Start the process and wait for its first prompt: every port probed (for a
        virtio-user port, its vhost-user handshake done).  Raises
        :class:`TestpmdError` if a port is missing or the process dies."""
        for p in self.ports:
            if isinstance(p, VirtioUserPort) and not p.server:
                wait_for_socket(p.path, timeout=self._startup_timeout)
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a ^C in the caller's terminal is not its signal
        )
        self._reader = threading.Thread(target=self._read, name=f"{self.name}-stdout", daemon=True)
        self._reader.start()
        try:
            self.startup_output = self._until_prompt(self._startup_timeout)
        except BaseException:
            self.close()
            raise
        self.macs = {
            int(n): mac.decode() for n, mac in _PORT_LINE.findall(self.startup_output.encode())
        }
        if len(self.macs) != len(self.ports):
            tail = self.startup_output[-3000:]
            self.close()
            raise TestpmdError(
                f"{self.name}: {len(self.macs)} of {len(self.ports)} ports probed:\n{tail}"
            )

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while True:
            chunk = os.read(fd, 65536)
            with self._cond:
                if not chunk:
                    self._cond.notify_all()
                    return
                self._buf += chunk
                self._cond.notify_all()

    def _until_prompt(self, timeout: float) -> str:
        """Output from the last consumed position up to the next prompt."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                idx = self._buf.find(PROMPT, self._consumed)
                if idx >= 0:
                    out = bytes(self._buf[self._consumed : idx])
                    self._consumed = idx + len(PROMPT)
                    return out.decode(errors="replace")
                exited = self.proc is not None and self.proc.poll() is not None
                left = deadline - time.monotonic()
                if exited or left <= 0:
                    why = (
                        f"exited with {self.proc.returncode}"
                        if exited
                        else f"no prompt in {timeout} s"
                    )
                    tail = bytes(self._buf[-3000:]).decode(errors="replace")
                    raise TestpmdError(f"{self.name} (pid {self.pid}) {why}:\n{tail}")
                self._cond.wait(min(left, 0.2))

    def output(self) -> str:
        """Everything the process printed so far."""
        with self._cond:
            return bytes(self._buf).decode(errors="replace")

    def close(self, timeout: float = 15.0) -> int | None:
        """``quit`` (testpmd stops forwarding and closes its ports), then wait; only if
        it does not exit in ``timeout`` is this process (by pid) sent SIGTERM, then
        SIGKILL.  Returns the exit status."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                assert proc.stdin is not None
                proc.stdin.write(b"quit\n")
                proc.stdin.flush()
            for sig in (None, signal.SIGTERM, signal.SIGKILL):
                if sig is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, sig)
                try:
                    proc.wait(timeout)
                    break
                except subprocess.TimeoutExpired:
                    continue
        with contextlib.suppress(OSError):
            assert proc.stdin is not None
            proc.stdin.close()
        if self._reader is not None:
            self._reader.join(5)
        if proc.stdout is not None:
            proc.stdout.close()
        if self.hugepages:  # a killed testpmd leaves its segment files: 1 GiB each
            for mount in hugetlbfs_mounts():
                for f in mount.glob(f"{self.file_prefix}map_*"):
                    f.unlink(missing_ok=True)
        return proc.returncode

    # -- commands ---------------------------------------------------------------

    def command(self, line: str, timeout: float = 10.0) -> str:
        """Run one interactive command; its output (without the prompt)."""
        if self.proc is None or self.proc.stdin is None:
            raise TestpmdError(f"{self.name} not started")
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
        except OSError as e:
            raise TestpmdError(f"{self.name}: cannot send {line!r}: {e}") from e
        return self._until_prompt(timeout)

    def start(self, tx_first: int = 0) -> None:
        """Start forwarding; with ``tx_first`` > 0, first send that many bursts of
        generated packets on every port (seeds a loop in io mode)."""
        out = self.command(f"start tx_first {tx_first}" if tx_first else "start")
        if "Packet forwarding already started" in out:
            raise TestpmdError(f"{self.name}: forwarding already started")

    def stop(self) -> str:
        """Stop forwarding; returns testpmd's forward statistics."""
        return self.command("stop", timeout=30)

    def port_stats(self) -> dict[int, PortStats]:
        """Cumulative counters of every port."""
        stats = PortStats.parse_all(self.command("show port stats all"))
        if set(stats) != set(range(len(self.ports))):
            raise TestpmdError(
                f"{self.name}: stats for ports {sorted(stats)}, expected {len(self.ports)}"
            )
        return stats

    def link_up(self, port: int) -> bool:
        """Link status of ``port`` (a vhost port is up once a frontend is ready)."""
        out = self.command(f"show port info {port}")
        m = re.search(r"Link status:\s*(\w+)", out)
        return m is not None and m.group(1) == "up"

    def wait_link_up(self, ports: Sequence[int] | None = None, timeout: float = 30.0) -> None:
        """Poll until every one of ``ports`` (default: all) reports link up."""
        want = list(range(len(self.ports))) if ports is None else list(ports)
        deadline = time.monotonic() + timeout
        while not all(self.link_up(p) for p in want):
            if time.monotonic() > deadline:
                raise TestpmdError(f"{self.name}: link of ports {want} not up after {timeout} s")
            time.sleep(0.05)
