"""DPDK ``dpdk-testpmd`` (virtio-user PMD) as a VM-less front-end of ``virtio serve
net`` (issue 10 §4): txonly into rxonly and into io, split and packed rings.  Both
testpmds forward on the same lcore so the back-end keeps a core of the two."""

from __future__ import annotations

import re
import signal
import sys
from pathlib import Path

import pytest
import trio

from virtio.testing.blk_checks import wait_for_socket
from virtio.testing.testpmd import Testpmd, have_testpmd

pytestmark = [pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
RUN_SECONDS = 3
SERVE = [sys.executable, "-m", "virtio", "-v", "serve", "net"]


async def _backend(tmp: Path):
    a, b = tmp / "a.sock", tmp / "b.sock"
    log = tmp / "backend.log"
    with open(log, "ab") as err:
        proc = await trio.lowlevel.open_process(
            [*SERVE, "--socket-path", str(a), "--socket-path", str(b)],
            stderr=err,
            cwd=REPO,
        )
    await wait_for_socket(a, proc)
    await wait_for_socket(b, proc)
    return proc, a, b, log


async def _stop(proc, log: Path) -> dict[str, dict[str, str]]:
    proc.send_signal(signal.SIGTERM)
    with trio.fail_after(20):
        assert await proc.wait() == 0, log.read_text()[-3000:]
    line = [ln for ln in log.read_text().splitlines() if "statistics:" in ln][-1]
    return {
        m.group(1): dict(kv.split("=", 1) for kv in m.group(2).split())
        for m in re.finditer(r"(\w+)=\[([^\]]*)\]", line)
    }


@pytest.fixture
def testpmd():
    if not have_testpmd():
        pytest.skip("dpdk-testpmd not installed (Debian package dpdk-dev)")


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("receiver", ["rxonly", "io"])
async def test_txonly_into_testpmd(testpmd, tmp_path, packed, receiver):
    proc, a, b, log = await _backend(tmp_path)
    try:
        rx = Testpmd.virtio_user(b, mode=receiver, packed=packed, log=tmp_path / "rx.log")
        tx = Testpmd.virtio_user(a, mode="txonly", packed=packed, log=tmp_path / "tx.log")
        async with rx:
            await rx.wait_started()
            async with tx:
                await tx.wait_started()
                await trio.sleep(RUN_SECONDS)
            await trio.sleep(0.5)  # the last packets reach rx
    finally:
        st = await _stop(proc, log)
    port0, port1 = st["port0"], st["port1"]
    assert port0["needs_reset"] == "0" and port1["needs_reset"] == "0"
    # every packet txonly's port sent went through the switch to the other port
    assert int(port0["in_packets"]) == tx.stats.tx_packets > 1000, tx.output[-2000:]
    assert int(port1["out_packets"]) == int(port0["in_packets"])
    # the receiving testpmd got what was delivered into its ring (none lost on the way)
    assert rx.stats.rx_packets == int(port1["queues"].split(",")[0].split(":")[1])
    assert rx.stats.rx_packets > 1000
    if receiver == "io":  # io sends everything back out: the switch sees it again
        assert int(port1["in_packets"]) > 0
