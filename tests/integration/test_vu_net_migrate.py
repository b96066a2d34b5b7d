"""Live migration of a guest whose NIC is a port of our ``virtio serve net`` switch,
while a TCP stream runs into it (issue 13 §5, net half).

One switch process, three ports: guest A's NIC on ``a-src``, its destination QEMU's
NIC (same MAC) on ``a-dst``, and a peer guest B on ``b``.  B streams 64 MiB of random
data (a 16 MiB random file sent four times) to A over TCP; once A has received some of
it, A is migrated (``migrate`` over a unix socket).  What has to hold:

- the rx buffers the switch writes into A's memory (packet data and used ring) are in
  QEMU's dirty log (SET_LOG_BASE / VHOST_F_LOG_ALL): a page written but not logged
  would reach the destination stale and the stream's checksum would differ;
- GET_VRING_BASE stops the source port's rings and the destination port resumes at
  those indices (virtio 1.4 §2.7, the vhost-user ``SET_VRING_BASE`` of the new QEMU);
- the switch relearns A's MAC on the destination port: QEMU announces the migrated
  guest (GUEST_ANNOUNCE, §5.1.9.5.4, or vhost-user SEND_RARP when the guest lacks it,
  which the switch turns into a RARP frame from that MAC).  Without it frames for A
  would still go to the stopped source port and the stream would stall.

Afterwards the sha256 A computed over what it received equals B's.  Both QEMU
versions (fixture ``qemu``); the downtime is printed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import trio

from virtio.testing.blk_checks import stop_process, wait_for_socket
from virtio.testing.guest_image import GuestImage
from virtio.testing.migration import migrate
from virtio.testing.qemu import QemuBinary, QemuGuest, VhostUserNet

pytestmark = pytest.mark.qemu

REPO = Path(__file__).resolve().parents[2]
MAC_A, MAC_B = "52:54:00:00:13:0a", "52:54:00:00:13:0b"
IP_A, IP_B = "10.0.13.10", "10.0.13.11"
ROUNDS = 4  # times B sends its 16 MiB file


async def _rx_bytes(guest: QemuGuest) -> int:
    out = (await guest.run("cat /sys/class/net/eth0/statistics/rx_bytes")).output
    return int(next(w for w in reversed(out.split()) if w.isdigit()))


async def test_live_migration_under_tcp_stream(guest_image: GuestImage, qemu: QemuBinary) -> None:
    with tempfile.TemporaryDirectory(prefix="pyvirtio-netmig-") as tmp, trio.fail_after(420):
        work = Path(tmp)
        a_src, a_dst, b_sock = work / "a-src.sock", work / "a-dst.sock", work / "b.sock"
        log_path = work / "switch.log"
        cmd = [sys.executable, "-m", "virtio", "serve", "net"]
        for sock in (a_src, a_dst, b_sock):
            cmd += ["--socket-path", os.fspath(sock)]
        with open(log_path, "ab") as err:
            switch = await trio.lowlevel.open_process(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, cwd=REPO
            )
        try:
            for sock in (a_src, a_dst, b_sock):
                await wait_for_socket(sock, switch, timeout=30)
            b = QemuGuest(guest_image, qemu=qemu, devices=[VhostUserNet(b_sock, mac=MAC_B)])
            src = QemuGuest(
                guest_image, qemu=qemu, qmp=True, devices=[VhostUserNet(a_src, mac=MAC_A)]
            )
            async with b, src:
                for g, ip in ((src, IP_A), (b, IP_B)):
                    await g.run(f"ip link set eth0 up && ip addr add {ip}/24 dev eth0")
                await b.run("dd if=/dev/urandom of=/tmp/tx bs=1M count=16 2>/dev/null")
                sent = (
                    await b.run(f"for i in $(seq {ROUNDS}); do cat /tmp/tx; done | sha256sum")
                ).output.split()[0]
                # A's listener: the sha256 of everything received, once B closes (its
                # stdin never ends: busybox's nc stops on EOF from either side).
                await src.run(
                    "(sleep 100000 | nc -l -p 5001 | sha256sum > /tmp/rx.sha) >/dev/null 2>&1 &"
                )
                r = await b.run(f"ping -c 1 -W 10 {IP_A}")
                assert r.rc == 0, r.output
                tx = await b.spawn(
                    f"for i in $(seq {ROUNDS}); do cat /tmp/tx; done | nc {IP_A} 5001"
                )
                with trio.fail_after(120):  # the stream is flowing before the migration
                    while await _rx_bytes(src) < 4 << 20:
                        await trio.sleep(0.2)
                uri = f"unix:{work / 'mig.sock'}"
                async with QemuGuest(
                    guest_image,
                    qemu=qemu,
                    qmp=True,
                    incoming=uri,
                    devices=[VhostUserNet(a_dst, mac=MAC_A)],
                ) as dst:
                    before = await _rx_bytes(src)
                    info = await migrate(src, dst, uri)
                    dst.take_over_console(src)
                    assert before < ROUNDS * 16 << 20, "the stream ended before the migration"
                    result = await tx.wait(timeout=300, check=False)
                    assert result.rc == 0, result.output[-2000:]
                    got = await dst.run(
                        "for i in $(seq 600); do [ -s /tmp/rx.sha ] && break; sleep 0.2; done; "
                        "cat /tmp/rx.sha",
                        timeout=150,
                    )
                    got = got.output.split()[0]
                    assert got == sent
                    assert await _rx_bytes(dst) > before  # received on the destination
        finally:
            with trio.CancelScope(shield=True):
                await stop_process(switch)
        log = log_path.read_text(errors="replace")
    assert "Traceback" not in log and "needs reset" not in log, log[-3000:]
    assert "dirty page logging on" in log, log[-3000:]
    print(
        f"net migration (QEMU {qemu.version}): downtime {info['downtime']} ms, "
        f"total {info['total-time']} ms, {info['ram']['transferred'] >> 20} MiB; "
        f"{'RARP sent by the switch' if 'RARP' in log else 'guest announced itself'}"
    )
