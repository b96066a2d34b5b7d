"""The testpmd harness against DPDK's own vhost PMD (issue 10 §4: the anchor peer).

virtio-user (frontend) and the vhost PMD (backend), each in its own testpmd
process forwarding on its own CPU; counters come from ``show port stats``.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from virtio.testing.testpmd import (
    Testpmd,
    TestpmdUnavailable,
    VhostPort,
    VirtioUserPort,
    find_testpmd,
)

try:
    find_testpmd()
except TestpmdUnavailable as e:
    pytest.skip(f"{e}", allow_module_level=True)


def _wait_equal(read, timeout: float = 10.0) -> tuple[int, int]:
    """Poll ``read() -> (a, b)`` until a == b (bounded); the last pair."""
    deadline = time.monotonic() + timeout
    while True:
        a, b = read()
        if a == b or time.monotonic() > deadline:
            return a, b
        time.sleep(0.05)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_txonly_into_vhost_rxonly_counts_every_packet(tmp_path: Path, packed: bool) -> None:
    sock = tmp_path / "vh.sock"
    with (
        Testpmd([VhostPort(sock)], forward_cpu=1, forward_mode="rxonly", name="vhost") as vh,
        Testpmd(
            [VirtioUserPort(sock, packed_vq=packed)],
            forward_cpu=0,
            forward_mode="txonly",
            name="vu",
        ) as vu,
    ):
        vh.wait_link_up()
        vh.start()
        vu.start()
        deadline = time.monotonic() + 10
        while vh.port_stats()[0].rx_packets < 100_000:
            assert time.monotonic() < deadline, vh.output()[-2000:]
            time.sleep(0.05)
        vu.stop()
        # The vhost side keeps polling: it drains what is left in the ring.
        sent, received = _wait_equal(
            lambda: (vu.port_stats()[0].tx_packets, vh.port_stats()[0].rx_packets)
        )
        assert sent == received > 0
        assert vh.port_stats()[0].rx_bytes == 64 * received


def test_io_forward_between_two_vhost_ports(tmp_path: Path) -> None:
    """A loop seeded by ``start tx_first``: frontend A -> vhost 0 -> io -> vhost 1 ->
    frontend B -> io -> A ...  Both directions carry traffic, and no port reports
    more packets than its peer handed over."""
    a, b = tmp_path / "a.sock", tmp_path / "b.sock"
    with (
        Testpmd([VhostPort(a), VhostPort(b)], forward_cpu=1, forward_mode="io", name="vhost") as vh,
        Testpmd(
            [VirtioUserPort(a), VirtioUserPort(b)], forward_cpu=0, forward_mode="io", name="vu"
        ) as vu,
    ):
        vh.wait_link_up()
        vh.start()
        vu.start(tx_first=4)
        deadline = time.monotonic() + 10
        while min(s.rx_packets for s in vu.port_stats().values()) < 50_000:
            assert time.monotonic() < deadline, (vu.output()[-2000:], vh.output()[-2000:])
            time.sleep(0.05)
        vu.stop()
        vh.stop()
        fe, be = vu.port_stats(), vh.port_stats()
        for port in (0, 1):
            peer = 1 - port
            # backend port N receives what frontend port N sent; frontend port N
            # receives what the backend forwarded to port N from its peer.
            assert 0 < be[port].rx_packets <= fe[port].tx_packets
            assert 0 < fe[port].rx_packets <= be[port].tx_packets <= be[peer].rx_packets
