"""DPDK ``dpdk-testpmd`` as a VM-less vhost-user front-end (virtio-user PMD) or as
the reference back-end (vhost PMD), for the virtio-net tests and benchmark.

::

    async with Testpmd.virtio_user(sock, mode="txonly", packed=False) as tp:
        await tp.wait_started()
        await trio.sleep(5)
    tp.stats.tx_packets, tp.stats.tx_pps

Each instance gets its own ``--file-prefix`` (DPDK's runtime directory) and
``--no-huge -m 1024`` memory (memfd-backed: shareable with a vhost-user back-end).
Stopped with SIGINT, testpmd prints its accumulated forward statistics, parsed into
``stats``; ``--stats-period 1`` lines give the packet rates seen while running.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import trio

TESTPMD = "dpdk-testpmd"


def have_testpmd() -> bool:
    return shutil.which(TESTPMD) is not None


@dataclass
class TestpmdStats:
    __test__ = False  # not a pytest class
    rx_packets: int = 0
    tx_packets: int = 0
    tx_dropped: int = 0
    rx_pps: list[int] = field(default_factory=list)
    """Per-second receive rates printed while running (one per period)."""
    tx_pps: list[int] = field(default_factory=list)


def parse_stats(text: str) -> TestpmdStats:
    """The accumulated forward statistics and the periodic rates of a testpmd log."""
    st = TestpmdStats()
    acc = text.rsplit("Accumulated forward statistics", 1)
    tail = acc[1] if len(acc) == 2 else ""
    if m := re.search(r"RX-packets:\s+(\d+)", tail):
        st.rx_packets = int(m.group(1))
    if m := re.search(r"TX-packets:\s+(\d+)\s+TX-dropped:\s+(\d+)", tail):
        st.tx_packets, st.tx_dropped = int(m.group(1)), int(m.group(2))
    st.rx_pps = [int(x) for x in re.findall(r"Rx-pps:\s+(\d+)", text)]
    st.tx_pps = [int(x) for x in re.findall(r"Tx-pps:\s+(\d+)", text)]
    return st


class Testpmd:
    """One ``dpdk-testpmd`` process (use ``async with``)."""

    __test__ = False  # not a pytest class

    def __init__(self, eal: list[str], app: list[str], *, log: Path | None = None) -> None:
        self.prefix = f"pyvirtio-{uuid.uuid4().hex[:8]}"
        self.eal = ["--no-huge", "-m", "1024", "--no-pci", "--file-prefix", self.prefix, *eal]
        self.app = ["--stats-period", "1", *app]
        self.log = log or Path(tempfile.mkdtemp(prefix="testpmd-")) / "testpmd.log"
        self.proc: trio.Process | None = None
        self.stats = TestpmdStats()
        self.returncode: int | None = None

    @classmethod
    def virtio_user(
        cls,
        socket: str | os.PathLike[str],
        *,
        mode: str = "io",
        queues: int = 1,
        packed: bool = False,
        mrg_rxbuf: bool = True,
        txpkts: int = 64,
        lcores: str = "0,1",
        log: Path | None = None,
        extra: tuple[str, ...] = (),
    ) -> Testpmd:
        """A virtio-user port on vhost-user socket ``socket`` forwarding in ``mode``
        (``txonly``, ``rxonly``, ``io``, ``macswap``)."""
        vdev = (
            f"net_virtio_user0,path={os.fspath(socket)},queues={queues},queue_size=256,"
            f"packed_vq={int(packed)},mrg_rxbuf={int(mrg_rxbuf)},in_order=0"
        )
        app = [f"--forward-mode={mode}", f"--txpkts={txpkts}", f"--rxq={queues}"]
        app += [f"--txq={queues}", "--nb-cores=1", *extra]
        return cls(["-l", lcores, "--vdev", vdev], app, log=log)

    @classmethod
    def vhost(
        cls,
        socket: str | os.PathLike[str],
        *,
        mode: str = "rxonly",
        queues: int = 1,
        lcores: str = "0,1",
        log: Path | None = None,
    ) -> Testpmd:
        """testpmd's vhost PMD listening on ``socket`` (the reference back-end)."""
        vdev = f"net_vhost0,iface={os.fspath(socket)},queues={queues}"
        app = [f"--forward-mode={mode}", f"--rxq={queues}", f"--txq={queues}", "--nb-cores=1"]
        return cls(["-l", lcores, "--vdev", vdev], app, log=log)

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    async def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as out:
            self.proc = await trio.lowlevel.open_process(
                [TESTPMD, *self.eal, "--", *self.app],
                stdin=subprocess.PIPE,  # testpmd exits when its stdin sends a newline
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    async def wait_started(self, timeout: float = 30.0) -> None:
        """Until testpmd forwards (or fail with its log)."""
        with trio.fail_after(timeout):
            while not re.search(r"packet forwarding - ports=\d", self.output):
                if self.proc is not None and self.proc.returncode is not None:
                    raise RuntimeError(f"testpmd exited {self.proc.returncode}:\n{self.output}")
                await trio.sleep(0.05)
        if "No probed ethernet devices" in self.output or "ports=0" in self.output:
            raise RuntimeError(f"testpmd probed no port:\n{self.output}")

    async def stop(self, timeout: float = 20.0) -> TestpmdStats:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGINT)
            with trio.move_on_after(timeout):
                await self.proc.wait()
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()
        if self.proc is not None:
            self.returncode = self.proc.returncode
        self.stats = parse_stats(self.output)
        shutil.rmtree(f"/var/run/dpdk/{self.prefix}", ignore_errors=True)
        return self.stats

    async def __aenter__(self) -> Testpmd:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        with trio.CancelScope(shield=True):
            await self.stop()
