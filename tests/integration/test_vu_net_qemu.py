"""``virtio serve net`` with real peers (issue 10 §4): two Linux guests (QEMU TCG) and
a tap in a network namespace the test creates, all on one switch.

One rig is booted for the whole module (boots dominate the time): the back-end runs
inside the namespace with ``--tap``, so the tap is there; guest A has two queue pairs,
every offload and MRG_RXBUF; guest B has one queue pair, neither MRG_RXBUF nor any
guest offload (its receive buffers are the §5.1.9.3.1 big-packet chains at MTU 9000,
and every TSO packet A sends it is segmented by the switch).  The guests' own
drivers, TCP stacks and ``sha256sum`` are the judges; the back-end's statistics
(SIGUSR1) show which path each packet took.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
import trio

from virtio.devices.net.packet import GSO_TCPV4, HDR, NEEDS_CSUM
from virtio.testing.blk_checks import wait_for_socket
from virtio.testing.net_frames import BROADCAST, ether, tcp4
from virtio.testing.qemu import (
    QEMU_VERSIONS,
    GuestResult,
    QemuGuest,
    QemuUnavailable,
    VhostUserNet,
    qemu_binary,
)
from virtio.testing.vhost_user_frontend import GuestRam, VhostUserFrontend

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
IP_A, IP_B, IP_TAP = "10.0.0.1", "10.0.0.2", "10.0.0.3"
MTU = 9000
NO_GUEST_OFFLOADS = {
    "mrg_rxbuf": "off",
    "guest_csum": "off",
    "guest_tso4": "off",
    "guest_tso6": "off",
    "guest_ecn": "off",
    "guest_ufo": "off",
    "guest_announce": "off",
}


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


class NetRig:
    """The back-end, the namespace and the two guests, run by a trio loop in a
    thread for the module's tests (``call`` runs an async function there)."""

    def __init__(self, image, tmp: Path, qemu=None) -> None:
        self.image = image
        self.qemu = qemu
        self.tmp = tmp
        self.netns = f"pyvirtio-{uuid.uuid4().hex[:8]}"
        self.log = tmp / "backend.log"
        self.token: trio.lowlevel.TrioToken | None = None
        self._ready = threading.Event()
        self._stop: trio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._thread_main, daemon=True)

    def start(self) -> None:
        _ip("netns", "add", self.netns)
        self._thread.start()
        self._ready.wait(600)
        if self._error is not None:
            raise self._error
        if self.token is None:
            raise TimeoutError("the rig did not come up")

    def close(self) -> None:
        if self.token is not None and self._stop is not None:
            trio.from_thread.run_sync(self._stop.set, trio_token=self.token)
        self._thread.join(120)
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True, timeout=30)

    def call(self, fn, *args):
        return trio.from_thread.run(fn, *args, trio_token=self.token)

    def run(self, guest: str, command: str, timeout: float = 120.0) -> GuestResult:
        g = {"a": self.a, "b": self.b}[guest]
        return self.call(lambda: g.run(command, timeout=timeout))

    def ns(self, command: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.netns, "sh", "-c", command],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def statistics(self) -> dict[str, dict[str, str]]:
        """The back-end's statistics line (SIGUSR1), per port: {field: value}."""
        return self.call(self._statistics)

    async def _statistics(self) -> dict[str, dict[str, str]]:
        before = self.log.read_text().count("statistics:")
        self.proc.send_signal(signal.SIGUSR1)
        with trio.fail_after(10):
            while self.log.read_text().count("statistics:") <= before:
                await trio.sleep(0.05)
        line = [ln for ln in self.log.read_text().splitlines() if "statistics:" in ln][before]
        return {
            m.group(1): dict(kv.split("=", 1) for kv in m.group(2).split())
            for m in re.finditer(r"(\w+)=\[([^\]]*)\]", line)
        }

    def _thread_main(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # reported by start() or at teardown
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        a_sock, b_sock = self.tmp / "a.sock", self.tmp / "b.sock"
        cmd = ["ip", "netns", "exec", self.netns, sys.executable, "-m", "virtio", "-v"]
        cmd += ["serve", "net", "--socket-path", str(a_sock), "--socket-path", str(b_sock)]
        cmd += ["--socket-path", str(self.tmp / "h.sock")]  # the hostile port
        cmd += ["--tap", "vtap0", "--mtu", str(MTU), "--num-queue-pairs", "2"]
        with open(self.log, "ab") as err:
            self.proc = await trio.lowlevel.open_process(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, cwd=REPO
            )
        try:
            await wait_for_socket(b_sock, self.proc, timeout=30)
            await wait_for_socket(a_sock, self.proc, timeout=30)
            self.a = QemuGuest(
                self.image,
                qemu=self.qemu,
                devices=[VhostUserNet(os.fspath(a_sock), queues=2, mac="52:54:00:00:00:0a",
                                      props={"host_mtu": MTU})],
            )  # fmt: skip
            self.b = QemuGuest(
                self.image,
                qemu=self.qemu,
                devices=[VhostUserNet(os.fspath(b_sock), mac="52:54:00:00:00:0b",
                                      props={"host_mtu": MTU, **NO_GUEST_OFFLOADS})],
            )  # fmt: skip
            async with trio.open_nursery() as nursery:  # boot both at once
                nursery.start_soon(self.a.start)
                nursery.start_soon(self.b.start)
            try:
                for g, ip in ((self.a, IP_A), (self.b, IP_B)):
                    await g.run(f"ip link set eth0 mtu {MTU} up && ip addr add {ip}/24 dev eth0")
                ns = self.ns(f"ip link set vtap0 mtu {MTU} up && ip addr add {IP_TAP}/24 dev vtap0")
                assert ns.returncode == 0, ns.stderr
                self._stop = trio.Event()
                self.token = trio.lowlevel.current_trio_token()
                self._ready.set()
                await self._stop.wait()
            finally:
                with trio.CancelScope(shield=True):
                    await self.a.aclose()
                    await self.b.aclose()
        finally:
            self.proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(15):
                await self.proc.wait()


@pytest.fixture(scope="module", params=QEMU_VERSIONS, ids=[f"qemu{v}" for v in QEMU_VERSIONS])
def rig(request, guest_image, tmp_path_factory):
    """The rig on each QEMU version (``vectors=0`` under TCG on both: the harness's
    default for vhost-user-net, which QEMU 7.2 needs)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 (network namespace, tap)")
    try:
        qemu = qemu_binary(request.param)
    except QemuUnavailable as e:
        pytest.skip(f"QEMU {request.param} unavailable: {e}")
    r = NetRig(guest_image, tmp_path_factory.mktemp("net"), qemu)
    try:
        r.start()
        yield r
    finally:
        r.close()
    log = r.log.read_text()
    assert "Traceback" not in log, log[-4000:]


def _features(rig: NetRig, guest: str) -> str:
    return rig.run(guest, "cat /sys/class/net/eth0/device/features").output.strip()


def test_negotiated_as_configured(rig):
    fa, fb = _features(rig, "a"), _features(rig, "b")
    mrg, guest_tso4, mq = 15, 7, 22
    assert fa[mrg] == "1" and fa[guest_tso4] == "1" and fa[mq] == "1", fa
    assert fb[mrg] == "0" and fb[guest_tso4] == "0" and fb[1] == "0", fb  # no GUEST_CSUM


def test_ping_both_ways_and_jumbo(rig):
    assert "0% packet loss" in rig.run("a", f"ping -c 3 -W 10 {IP_B}").output
    assert "0% packet loss" in rig.run("b", f"ping -c 3 -W 10 {IP_A}").output
    # MTU 9000: B receives into big-packet chains (no MRG_RXBUF), A into merged buffers
    assert "0% packet loss" in rig.run("a", f"ping -c 2 -W 10 -s 8900 {IP_B}").output
    assert "0% packet loss" in rig.run("b", f"ping -c 2 -W 10 -s 8900 {IP_A}").output
    st = rig.statistics()
    assert st["port0"]["needs_reset"] == "0" and st["port1"]["needs_reset"] == "0"
    # A -> B unicast (ICMP: no offload asked) is switched by the native per-packet
    # path straight into B's receive ring; B -> A is not (A has two receive queues,
    # picked by flow hash in Python), nor are floods (the tap is no native port)
    assert int(st["port0"].get("tx_native", "0")) > 0, st["port0"]
    assert int(st["port1"].get("rx_native", "0")) > 0, st["port1"]
    assert int(st["port1"].get("py_port", "0")) > 0, st["port1"]


def _listen(rig: NetRig, guest: str, port: int) -> None:
    """A busybox ``nc`` listener whose received bytes' sha256 lands in a file.  Its
    stdin never ends (busybox's small nc exits on EOF from either side)."""
    rig.run(
        guest,
        f"rm -f /tmp/rx{port}.sha; "
        f"(sleep 100000 | nc -l -p {port} | sha256sum > /tmp/rx{port}.sha) >/dev/null 2>&1 &",
    )


def _received(rig: NetRig, guest: str, port: int, timeout: int = 600) -> str:
    """The listener's sha256, once the sender closed the connection."""
    out = rig.run(
        guest,
        f"for i in $(seq {timeout * 5}); do [ -s /tmp/rx{port}.sha ] && break; sleep 0.2; done; "
        f"cat /tmp/rx{port}.sha",
        timeout=timeout + 30,
    )
    return out.output.split()[0]


def _transfer(rig: NetRig, sender: str, receiver: str, ip: str, mib: int, port: int) -> None:
    """``mib`` MiB of random data over TCP (busybox nc); sha256 equal on both ends."""
    _listen(rig, receiver, port)
    rig.run(sender, f"dd if=/dev/urandom of=/tmp/tx bs=1M count={mib} 2>/dev/null")
    sent = rig.run(sender, "sha256sum < /tmp/tx").output.split()[0]
    rig.run(sender, f"nc {ip} {port} < /tmp/tx", timeout=900)
    got = _received(rig, receiver, port)
    rig.run(sender, "rm -f /tmp/tx")
    assert got == sent


def test_64mib_tcp_tso_guest_to_offloadless_guest(rig):
    before = rig.statistics()["port1"]
    _transfer(rig, "a", "b", IP_B, 64, 5001)
    after = rig.statistics()["port1"]
    # A sent TSO packets; B negotiated no guest offloads: each was segmented for it
    assert int(after["segmented"]) > int(before["segmented"])
    assert int(after["segments"]) > int(after["segmented"])
    assert after.get("rx_too_big", "0") == "0"


def test_transfer_into_two_queue_pairs(rig):
    _transfer(rig, "b", "a", IP_A, 8, 5002)
    for port in range(5003, 5007):  # several flows: the flow hash spreads them
        _transfer(rig, "b", "a", IP_A, 1, port)
    st = rig.statistics()["port0"]
    queues = dict(q.split(":") for q in st["queues"].split(","))
    assert int(queues.get("0", 0)) > 0 and int(queues.get("2", 0)) > 0, queues
    # §5.1.9.5.6: A's TCP stack answered each flow on a transmit queue of its choice,
    # and B's next packets of that flow came in on that pair's receive queue
    assert int(st["steered"]) > 0, st


def test_tap_in_namespace(rig):
    r = rig.ns(f"busybox ping -c 3 -W 10 {IP_A}")
    assert r.returncode == 0 and " 0% packet loss" in r.stdout, r.stdout + r.stderr
    # TCP from the namespace's stack to guest B (partial checksums and TSO from the
    # host kernel, completed or segmented for B)
    _listen(rig, "b", 5010)
    data = os.urandom(4 << 20)
    (rig.tmp / "tap.bin").write_bytes(data)
    send = (
        "import socket, sys; s = socket.create_connection((sys.argv[1], 5010), timeout=60); "
        "s.sendall(open(sys.argv[2], 'rb').read()); s.shutdown(socket.SHUT_WR); s.recv(1)"
    )
    r = rig.ns(f'{sys.executable} -c "{send}" {IP_B} {rig.tmp / "tap.bin"}')
    assert r.returncode == 0, r.stderr
    got = _received(rig, "b", 5010)
    assert got == hashlib.sha256(data).hexdigest()
    st = rig.statistics()
    assert int(st["tap"]["in_packets"]) > 0 and int(st["tap"]["out_packets"]) > 0


HOSTILE_MAC = bytes.fromhex("5254000000ee")


def _hdr(flags=0, gso=0, hdr_len=0, gso_size=0, start=0, offset=0) -> bytes:
    return HDR.pack(flags, gso, hdr_len, gso_size, start, offset, 0)


async def _hostile_port(rig: NetRig) -> dict[str, int]:
    """A vhost-user front-end on the third port: a receive ring that stalls and a
    transmit ring of malformed packets.  Returns GET_VRING_BASE's answers."""
    ram = GuestRam(8 << 20)
    fe = await VhostUserFrontend.connect(rig.tmp / "h.sock")
    try:
        await fe.negotiate()
        await fe.set_mem_table(ram)
        rx = await fe.setup_vring(0, ram, size=64, data_size=1 << 20)
        tx = await fe.setup_vring(1, ram, size=64, offset=4 << 20, data_size=2 << 20)
        # receive: two 20-byte buffers, never enough for a packet with MRG_RXBUF: the
        # device must take them, give them back and wait (holding nothing)
        rx.driver.add([], [20])
        rx.driver.add([], [20])
        rx.publish_and_kick()
        good = ether(BROADCAST, HOSTILE_MAC, b"hello" * 20)
        bad_tcp = tcp4(BROADCAST, HOSTILE_MAC, b"x" * 3000, partial=True)
        hostile = [
            [_hdr() + ether(BROADCAST, HOSTILE_MAC, b"j" * (MTU + 100))],  # over the MTU
            [_hdr(), b"\0" * (70 << 10)],  # over 64 KiB
            [_hdr(NEEDS_CSUM, 0, 0, 0, 5000, 6) + good],  # csum_start outside
            [_hdr(NEEDS_CSUM, GSO_TCPV4, 54, 0, 34, 16) + bad_tcp],  # gso_size 0
            [_hdr(NEEDS_CSUM, GSO_TCPV4, 54, 1, 34, 16) + bad_tcp],  # 3000 segments
            [_hdr(NEEDS_CSUM, GSO_TCPV4, 54, 100, 34, 16) + good],  # TSO, not TCP
            [b"", b""],  # zero-length buffers
            [_hdr() + good],  # and one good packet
        ]
        for bufs in hostile:
            tx.driver.add(bufs, [])
        tx.publish_and_kick()
        await tx.wait_used(len(hostile), timeout=10)
        # the stalled receive ring stops at once (nothing held), base unchanged
        with trio.fail_after(2):
            rx_base = await fe.get_vring_base(0)
        tx_base = await fe.get_vring_base(1)
        return {"rx_base": rx_base, "tx_base": tx_base}
    finally:
        await fe.aclose()
        ram.close()


def test_hostile_port_drops_and_counts_others_unaffected(rig):
    before = rig.statistics()
    bases = rig.call(_hostile_port, rig)
    assert bases == {"rx_base": 0, "tx_base": 8}
    st = rig.statistics()
    h = st["port2"]
    assert h["needs_reset"] == "0"
    assert int(h["dropped_oversized"]) == 2
    assert int(h["dropped_bad_csum"]) == 1
    assert int(h["dropped_bad_gso"]) == 3
    assert int(h["dropped_runt"]) == 1
    assert int(h["in_packets"]) == 1  # the good one, flooded to the guests and the tap
    for port in ("port0", "port1"):
        assert int(st[port]["out_packets"]) > int(before[port]["out_packets"])
    # the guests did not notice
    assert "0% packet loss" in rig.run("a", f"ping -c 3 -W 10 {IP_B}").output
    assert "0% packet loss" in rig.run("b", f"ping -c 2 -W 10 -s 8900 {IP_A}").output
