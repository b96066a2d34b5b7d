"""Several exports in one process and the operations commands (``virtio serve
--export``, virtio/exports.py, --control, --metrics-port, ``virtio stat``): the
syntax in-process, then real ``virtio serve`` processes driven over vhost-user by
the Python front-end."""

from __future__ import annotations

import os
import re
import signal
import struct
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import trio

from virtio.cli.serve import (
    ExportError,
    _export_parser,
    export_argv,
    parse_export_spec,
)
from virtio.control.client import ControlClient, ControlReplyError
from virtio.spec.blk import BlkReqType, BlkStatus, virtio_blk_outhdr
from virtio.testing.backend_stats import parse_statistics
from virtio.testing.net_frames import ether
from virtio.testing.vhost_user_frontend import GuestRam, VhostUserFrontend, footprint_for

MiB = 1 << 20
T = BlkReqType
OK = int(BlkStatus.VIRTIO_BLK_S_OK)
IOERR = int(BlkStatus.VIRTIO_BLK_S_IOERR)


def test_export_spec_syntax() -> None:
    kind, opts = parse_export_spec("blk,id=d0,socket-path=/a,,b,blk-file=x.img,read-only")
    assert kind == "blk"
    assert opts == {"id": "d0", "socket-path": "/a,b", "blk-file": "x.img", "read-only": "on"}
    assert parse_export_spec("type=rng,socket-path=/r") == ("rng", {"socket-path": "/r"})
    parser = _export_parser("blk")
    argv = export_argv(
        parser, {"socket-path": "/s", "read-only": "off", "num_queues": 2, "force": True}
    )
    assert argv == ["--socket-path", "/s", "--num-queues", "2", "--force"]
    with pytest.raises(ExportError, match="expected on or off"):
        export_argv(parser, {"read-only": "maybe"})
    with pytest.raises(ExportError, match="given twice"):
        parse_export_spec("blk,id=a,id=b")
    with pytest.raises(ExportError, match="unrecognized arguments"):
        parser.parse_args(export_argv(parser, {"no-such-option": "1"}))


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "virtio", *args], capture_output=True, text=True, timeout=60
    )


def test_bad_exports_exit_2_with_one_line(tmp_path) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(bytes(MiB))
    sock = f"socket-path={tmp_path}/s"
    cases = [
        (["--export", "floppy," + sock], "unknown export type 'floppy'"),
        (["--export", "blk," + sock], "blk-file is required"),
        (
            ["--export", f"blk,id=a,{sock}1,blk-file={img}", "--export", f"rng,id=a,{sock}2"],
            "id 'a' is used twice",
        ),
        (["--export", f"blk,{sock},blk-file={img},num-queues=x"], "invalid int value"),
    ]
    for argv, message in cases:
        r = run_cli("serve", *argv)
        assert r.returncode == 2, (argv, r.stderr)
        assert message in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert run_cli("serve").returncode == 2  # nothing to serve: usage


class Backend:
    """A ``virtio serve --export ...`` process with a control socket."""

    def __init__(
        self, tmp: Path, *exports: str, metrics: bool = False, netns: str | None = None
    ) -> None:
        self.tmp = tmp
        self.control = tmp / "ctl"
        self.log = tmp / "serve.log"
        argv = ["ip", "netns", "exec", netns] if netns else []
        argv += [sys.executable, "-m", "virtio", "serve", "--control", str(self.control)]
        for spec in exports:
            argv += ["--export", spec]
        if metrics:
            argv += ["--metrics-port", "0"]
        self._log = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, stderr=self._log, stdout=self._log)

    def text(self) -> str:
        return self.log.read_text()

    async def wait_ready(self) -> None:
        with trio.fail_after(30):
            while not self.control.exists():
                assert self.proc.poll() is None, self.text()
                await trio.sleep(0.05)

    async def wait_log(self, pattern: str, count: int = 1) -> re.Match[str]:
        with trio.fail_after(15):
            while len(found := list(re.finditer(pattern, self.text()))) < count:
                await trio.sleep(0.05)
        return found[count - 1]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=30)
        self._log.close()
        return rc


def hdr(req_type: int, sector: int = 0) -> bytes:
    return virtio_blk_outhdr.build({"type": req_type, "reserved": 0, "sector": sector})


async def blk_session(
    path: Path, ram: GuestRam, writes: int, sector: int = 8, offset: int = 0
) -> None:
    """Connect to a blk export, write ``writes`` x 4 KiB and read each back, flush."""
    fe = await VhostUserFrontend.connect(path)
    await fe.negotiate()
    await fe.set_mem_table(ram)
    vq = await fe.setup_vring(0, ram, size=64, offset=offset)
    data = os.urandom(4096)
    for i in range(writes):
        vq.driver.add([hdr(T.VIRTIO_BLK_T_OUT, sector + 8 * i), data], [1])
        vq.publish_and_kick()
        (used,) = await vq.wait_used()
        assert used.data == bytes([OK])
        vq.driver.add([hdr(T.VIRTIO_BLK_T_IN, sector + 8 * i)], [len(data) + 1])
        vq.publish_and_kick()
        (used,) = await vq.wait_used()
        assert used.data == data + bytes([OK])
    vq.driver.add([hdr(T.VIRTIO_BLK_T_FLUSH)], [1])
    vq.publish_and_kick()
    await vq.wait_used()
    await fe.aclose()


def export_stats(reply: dict, export_id: str) -> dict:
    (e,) = [e for e in reply["exports"] if e["id"] == export_id]
    return e


async def test_exports_stats_commands_metrics_and_stat(tmp_path) -> None:
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    a.write_bytes(bytes(4 * MiB))
    b.write_bytes(bytes(2 * MiB))
    be = Backend(
        tmp_path,
        f"blk,id=disk0,socket-path={tmp_path}/a.sock,blk-file={a}",
        f"blk,id=disk1,socket-path={tmp_path}/b.sock,blk-file={b},read-only=on",
        f"rng,socket-path={tmp_path}/r.sock",
        metrics=True,
    )
    ram = GuestRam(8 * MiB)
    try:
        await be.wait_ready()
        port = int((await be.wait_log(r"metrics: http://127\.0\.0\.1:(\d+)/metrics")).group(1))
        async with await ControlClient.connect(be.control) as ctl:
            exports = await ctl.execute("query-exports")
            assert [(e["id"], e["type"]) for e in exports] == [
                ("disk0", "blk"), ("disk1", "blk"), ("rng0", "rng"),
            ]  # fmt: skip
            # Two connections: the first one's requests stay in the totals.
            await blk_session(tmp_path / "a.sock", ram, writes=3)
            await blk_session(tmp_path / "a.sock", ram, writes=2)
            d0 = export_stats(await ctl.execute("query-stats"), "disk0")
            assert d0["connections"] == 2
            t = d0["totals"]
            assert t["requests"]["out"] == 5 and t["requests"]["in"] == 5
            assert t["requests"]["flush"] == 2 and t["completed"] == 12
            assert t["bytes"]["out"] == t["bytes"]["in"] == 5 * 4096
            assert t["status"]["ok"] == 12 and t["in_flight"] == 0
            assert t["dataplane"] == 12  # the native data plane served all of them
            # one popped batch in 4 is timed: each request here was popped alone
            assert t["latency"]["count"] == 3 == sum(t["latency"]["buckets_us"])
            # one notification decision per request (each was waited for alone); this
            # front-end leaves used_event at 0, so EVENT_IDX suppresses most of them
            notes = t["notifications"]
            assert notes["sent"] + notes["suppressed"] == 12 and notes["sent"] >= 2
            assert (
                export_stats(await ctl.execute("query-stats"), "disk1")["totals"]["completed"] == 0
            )
            # Writes to the read-only export: IOERR, counted as such.
            fe = await VhostUserFrontend.connect(tmp_path / "b.sock")
            await fe.negotiate()
            await fe.set_mem_table(ram)
            vq = await fe.setup_vring(0, ram, size=64, offset=0)
            vq.driver.add([hdr(T.VIRTIO_BLK_T_OUT, 8), bytes(512)], [1])
            vq.publish_and_kick()
            assert (await vq.wait_used())[0].data == bytes([IOERR])
            await fe.aclose()
            d1 = await ctl.execute("query-stats", export="disk1", queue=0)
            (q0,) = d1["exports"][0]["queues"]
            assert q0["status"]["ioerr"] == 1 and q0["requests"]["out"] == 1
            with pytest.raises(ControlReplyError, match="no queue 3"):
                await ctl.execute("query-stats", export="disk1", queue=3)

            # The same figures on SIGUSR1, in the Prometheus endpoint and in virtio stat.
            be.proc.send_signal(signal.SIGUSR1)
            line = (await be.wait_log(r"export disk0 \(blk\): (statistics: .* time=\S+)")).group(1)
            words = parse_statistics(line)  # the harness's parser reads every word
            assert words["completed"] == "12" and words["req_out"] == "5"
            assert words["connections"] == "2" and words["dataplane"] == "12"
            # chains popped per vring: the data plane's, across both connections
            assert words["vring_requests"] == "12"
            url = f"http://127.0.0.1:{port}/metrics"
            text = await trio.to_thread.run_sync(
                lambda: urllib.request.urlopen(url, timeout=10).read().decode()
            )
            assert (
                'virtio_requests_total{export="disk0",kind="out",queue="0",type="blk"} 5.0' in text
            )
            assert (
                'virtio_request_status_total{export="disk1",queue="0",status="ioerr",type="blk"}'
                " 1.0" in text
            )
            assert (
                'virtio_request_latency_seconds_count{export="disk0",queue="0",type="blk"} 3.0'
                in text
            )
            assert 'virtio_connections_total{export="disk0",type="blk"} 2.0' in text
            stat = await trio.to_thread.run_sync(
                lambda: run_cli("stat", "--control", str(be.control), "--once")
            )
            assert stat.returncode == 0, stat.stderr
            row = [ln.split() for ln in stat.stdout.splitlines() if ln.startswith("disk0 ")]
            assert row[-1][:9] == ["disk0", "*", "12", "-", "0", "100%", "20.0K", "20.0K", "0"]

            # Device commands are routed by export; resize reaches the image.
            with pytest.raises(ControlReplyError, match="name the export"):
                await ctl.execute("resize")
            r = await ctl.execute("resize", export="disk0", size=8 * MiB)
            assert (r["previous"], r["capacity"], r["changed"]) == (8192, 16384, True)
            assert a.stat().st_size == 8 * MiB
            with pytest.raises(ControlReplyError, match="raw image file"):
                await ctl.execute("resize", export="disk1", size=4 * MiB)
            cfg = await ctl.execute("query-config", export="disk0")
            assert cfg[0]["capacity"] == 16384 and cfg[0]["read_only"] is False

            # Exports come and go at run time; a taken path is refused, nothing else moves.
            added = await ctl.execute(
                "export-add", type="blk", id="disk2", **{"socket-path": str(tmp_path / "c.sock"),
                "blk-file": str(b), "read-only": True},
            )  # fmt: skip
            assert added["id"] == "disk2" and (tmp_path / "c.sock").is_socket()
            with pytest.raises(ControlReplyError, match="exists already"):
                await ctl.execute("export-add", type="rng", id="disk2", **{"socket-path": "x"})
            with pytest.raises(ControlReplyError, match=r"a\.sock"):
                await ctl.execute(
                    "export-add", type="rng", **{"socket-path": str(tmp_path / "a.sock")}
                )
            await ctl.execute("export-del", id="disk2")
            assert not (tmp_path / "c.sock").exists()
            assert [e["id"] for e in await ctl.execute("query-exports")] == [
                "disk0", "disk1", "rng0",
            ]  # fmt: skip
            with pytest.raises(ControlReplyError, match="no export"):
                await ctl.execute("export-del", id="disk2")
            await blk_session(tmp_path / "a.sock", ram, writes=1)  # still serving
            level = await ctl.execute("set-log-level", level="debug", logger="virtio")
            assert level == {"logger": "virtio", "level": "debug"}
            with pytest.raises(ControlReplyError, match="level must be"):
                await ctl.execute("set-log-level", level="loud")
    finally:
        ram.close()
        rc = await trio.to_thread.run_sync(be.stop)
    assert rc == 0, be.text()
    text = be.text()
    assert "export disk2 (blk) removed" in text
    final = [ln for ln in text.splitlines() if "export disk0 (blk): statistics:" in ln][-1]
    assert "completed=15 " in final and "time=" not in final


EVENT = struct.Struct("<HHi")  # struct virtio_input_event (virtio 1.4 §5.8.6)


async def eventq_of(path: Path, ram: GuestRam, buffers: int) -> tuple[VhostUserFrontend, Any]:
    """A front-end on an input export with ``buffers`` event buffers posted."""
    fe = await VhostUserFrontend.connect(path)
    await fe.negotiate()
    await fe.set_mem_table(ram)
    eventq = await fe.setup_vring(0, ram, size=16)
    await fe.setup_vring(1, ram, size=16, offset=2 * MiB)
    for _ in range(buffers):
        eventq.driver.add([], [EVENT.size])
    eventq.publish_and_kick()
    return fe, eventq


async def test_input_exports_beside_blk_commands_routed_by_export(tmp_path) -> None:
    """Two input devices and a disk in one process (issue 13 §4: several devices of any
    type): each keyboard's ``inject`` reaches its own eventq only, picked by
    ``export``; an input export added and removed at run time takes its commands along."""
    img = tmp_path / "d.img"
    img.write_bytes(bytes(MiB))
    be = Backend(
        tmp_path,
        f"input,id=kbd,kind=keyboard,serial=K1,socket-path={tmp_path}/k.sock",
        f"input,id=tab,kind=tablet,socket-path={tmp_path}/t.sock",
        f"blk,id=disk,socket-path={tmp_path}/d.sock,blk-file={img}",
    )
    ram = GuestRam(4 * MiB)
    try:
        await be.wait_ready()
        async with await ControlClient.connect(be.control) as ctl:
            exports = await ctl.execute("query-exports")
            assert [(e["id"], e["type"]) for e in exports] == [
                ("kbd", "input"), ("tab", "input"), ("disk", "blk"),
            ]  # fmt: skip
            with pytest.raises(ControlReplyError, match="name the export"):
                await ctl.execute("key", key="KEY_A")
            fe, eventq = await eventq_of(tmp_path / "k.sock", ram, buffers=4)
            r = await ctl.execute("key", export="kbd", key="KEY_A", value=1)
            assert r == {"groups": 1, "events": 2, "dropped": 0}
            used = await eventq.wait_used(2)
            assert [EVENT.unpack(u.data) for u in used] == [(1, 30, 1), (0, 0, 0)]  # EV_KEY A
            # the tablet has no keys: refused by *its* capabilities, the keyboard unaffected
            with pytest.raises(ControlReplyError, match="no key KEY_A"):
                await ctl.execute("key", export="tab", key="KEY_A")
            q = await ctl.execute("query-input", export="kbd")
            assert q["statistics"]["events"] == 2 and q["driver"] is True
            assert (await ctl.execute("query-input", export="tab"))["statistics"]["events"] == 0
            await fe.aclose()
            added = await ctl.execute(
                "export-add", type="input", id="mouse",
                **{"kind": "mouse", "socket-path": str(tmp_path / "m.sock")},
            )  # fmt: skip
            assert added["id"] == "mouse"
            fe, eventq = await eventq_of(tmp_path / "m.sock", ram, buffers=4)
            await ctl.execute("move", export="mouse", x=3, y=-2)
            used = await eventq.wait_used(3)
            assert [EVENT.unpack(u.data) for u in used] == [(2, 0, 3), (2, 1, -2), (0, 0, 0)]
            await fe.aclose()
            await ctl.execute("export-del", id="mouse")
            with pytest.raises(ControlReplyError, match="no export 'mouse' has it"):
                await ctl.execute("move", export="mouse", x=1, y=1)
            with pytest.raises(ControlReplyError, match="evdev-path or --kind"):
                await ctl.execute("export-add", type="input", **{"socket-path": "x.sock"})
    finally:
        ram.close()
        rc = await trio.to_thread.run_sync(be.stop)
    assert rc == 0, be.text()


async def test_export_tasks_run_while_served_and_a_failing_one_stops_only_its_export(
    tmp_path,
) -> None:
    """``Export.tasks`` (an input export's evdev reader): cancelled when the export is
    removed; one that fails stops its own export, the others keep serving."""
    from virtio.devices.rng import VirtioRng
    from virtio.exports import Export, ExportSet
    from virtio.transport.vhost_user.server import VhostUserServer

    ran, cancelled = trio.Event(), trio.Event()

    async def reader() -> None:
        ran.set()
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()

    async def broken() -> None:
        raise OSError(19, "No such device")  # the evdev went away

    def export(name: str, task: Any) -> Export:
        dev = VirtioRng()
        return Export(
            name, "rng", dev, VhostUserServer(dev), socket_path=str(tmp_path / name),
            tasks=[task],
        )  # fmt: skip

    async with trio.open_nursery() as nursery:
        exports = ExportSet()
        await nursery.start(exports.run)
        await exports.add(export("a", reader))
        await exports.add(export("b", broken))
        await ran.wait()
        with trio.fail_after(10):
            while "b" in exports.exports:
                await trio.sleep(0.01)
        assert list(exports.exports) == ["a"] and not (tmp_path / "b").exists()
        assert not cancelled.is_set()
        await exports.remove("a")
        assert cancelled.is_set()
        nursery.cancel_scope.cancel()


NET_HDR = bytes(12)  # virtio_net_hdr_v1, nothing to offload (§5.1.6)
NET_RING = footprint_for(64, 64 << 10)


class NetPort:
    """One guest NIC on a net export: receiveq1 and transmitq1 over vhost-user."""

    def __init__(self, fe: VhostUserFrontend, rx: Any, tx: Any, mac: bytes) -> None:
        self.fe, self.rx, self.tx, self.mac = fe, rx, tx, mac

    @classmethod
    async def connect(cls, path: Path, ram: GuestRam, slot: int, mac: bytes) -> NetPort:
        fe = await VhostUserFrontend.connect(path)
        await fe.negotiate()
        await fe.set_mem_table(ram)
        rx = await fe.setup_vring(0, ram, size=64, offset=2 * slot * NET_RING, data_size=64 << 10)
        tx = await fe.setup_vring(
            1, ram, size=64, offset=(2 * slot + 1) * NET_RING, data_size=64 << 10
        )
        for _ in range(8):
            rx.driver.add([], [2048])
        rx.publish_and_kick()
        port = cls(fe, rx, tx, mac)
        # a frame to itself: the switch learns this guest's address and drops it
        # (hairpin); once transmitq1 served it, receiveq1 is served too
        await port.send(ether(mac, mac, b"hello"))
        return port

    async def send(self, frame: bytes) -> None:
        self.tx.driver.add([NET_HDR + frame], [])
        self.tx.publish_and_kick()
        await self.tx.wait_used()

    async def receive(self) -> bytes:
        (used,) = await self.rx.wait_used()
        return used.data[12 : used.written]

    def nothing_received(self) -> bool:
        return not self.rx.driver.get_used()


async def test_net_exports_share_one_switch_beside_blk(tmp_path) -> None:
    """Issue 13 §4: two net exports and a blk export in one process; every net export
    is a port of one switch: a frame from one port's transmitq reaches the other's
    receiveq over vhost-user.  export-del takes a port off the switch, which forgets
    its addresses (a frame to them floods to a port added afterwards)."""
    img = tmp_path / "d.img"
    img.write_bytes(bytes(MiB))
    be = Backend(
        tmp_path,
        f"net,id=a,socket-path={tmp_path}/a.sock",
        f"net,id=b,socket-path={tmp_path}/b.sock,mac=02:00:00:00:00:0b",
        f"blk,id=disk,socket-path={tmp_path}/d.sock,blk-file={img}",
    )
    ram = GuestRam(16 * MiB)  # net rings from 0, the disk's at 8 MiB
    x, y, z = (bytes.fromhex(f"0200000000{n:02x}") for n in (0xA1, 0xB1, 0xC1))
    try:
        await be.wait_ready()
        async with await ControlClient.connect(be.control) as ctl:
            exports = await ctl.execute("query-exports")
            assert [(e["id"], e["type"]) for e in exports] == [
                ("a", "net"), ("b", "net"), ("disk", "blk"),
            ]  # fmt: skip
            config = {c["id"]: c for c in await ctl.execute("query-config")}
            assert config["a"]["device"] == config["b"]["device"] == "net"
            a = await NetPort.connect(tmp_path / "a.sock", ram, 0, x)
            b_sock = tmp_path / "b.sock"
            b = await NetPort.connect(b_sock, ram, 1, y)
            to_b = ether(y, x, os.urandom(200))
            await a.send(to_b)
            assert await b.receive() == to_b
            to_a = ether(x, y, os.urandom(1400))
            await b.send(to_a)
            assert await a.receive() == to_a
            await blk_session(tmp_path / "d.sock", ram, 2, offset=8 * MiB)  # the disk beside
            assert a.nothing_received() and b.nothing_received()
            added = await ctl.execute(
                "export-add", type="net", id="c", **{"socket-path": str(tmp_path / "c.sock")}
            )
            assert added["type"] == "net"
            c = await NetPort.connect(tmp_path / "c.sock", ram, 2, z)
            await a.send(ether(y, x, b"only for b"))  # learned: not flooded to c
            assert await b.receive() == ether(y, x, b"only for b")
            await b.fe.aclose()
            await ctl.execute("export-del", id="b")
            await ctl.execute("export-add", type="net", id="d", **{"socket-path": f"{b_sock}"})
            d = await NetPort.connect(b_sock, ram, 3, b"\x02" * 6)  # b's port number now
            again = ether(y, x, os.urandom(300))  # y was learned on b, which is gone
            await a.send(again)
            assert await c.receive() == again  # unknown again: flooded to c and d
            assert await d.receive() == again
            assert c.nothing_received() and d.nothing_received()
            # set-link (QEMU's set_link), routed by export: status LINK_UP cleared
            # (§5.1.4), nothing received or sent while down, both ways again once up
            with pytest.raises(ControlReplyError, match="name the export"):
                await ctl.execute("set-link", up=False)
            r = await ctl.execute("set-link", export="a", up=False)
            assert r["link"] == "down"
            assert await a.fe.get_config(6, 2) == b"\0\0"  # status: link down
            assert await c.fe.get_config(6, 2) == b"\1\0"  # the other port's is up
            await c.send(ether(x, z, b"to a, down"))
            await a.send(ether(z, x, b"from a, down"))
            assert a.nothing_received() and c.nothing_received()
            await ctl.execute("set-link", export="a", up=True)
            assert await a.fe.get_config(6, 2) == b"\1\0"
            await a.send(ether(z, x, b"from a, up"))
            assert await c.receive() == ether(z, x, b"from a, up")
            await d.fe.aclose()
            await a.fe.aclose()
            await c.fe.aclose()
            stats = {e["id"]: e for e in (await ctl.execute("query-stats"))["exports"]}
            assert set(stats) == {"a", "c", "d", "disk"}
    finally:
        ram.close()
        rc = await trio.to_thread.run_sync(be.stop)
    assert rc == 0, be.text()


def _arp(op: int, sha: bytes, spa: str, tha: bytes, tpa: str) -> bytes:
    """An Ethernet/IPv4 ARP packet (RFC 826)."""
    import ipaddress

    return struct.pack("!HHBBH", 1, 0x0800, 6, 4, op) + (
        sha + ipaddress.IPv4Address(spa).packed + tha + ipaddress.IPv4Address(tpa).packed
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="a network namespace and a tap need root")
async def test_net_export_tap_key_uplinks_a_namespace(tmp_path) -> None:
    """Issue 10 §2 / issue 13 §4: ``--export net,...,tap=IFNAME`` opens the tap on the
    export's switch (as ``virtio serve net --tap`` does).  In a network namespace this
    test creates, the kernel pings a guest NIC's address over the tap: its ARP request
    (tap -> port, flooded), our ARP reply (port -> tap, learned) and then its echo
    request (tap -> port, unicast) cross the switch."""
    netns = f"pyvirtio-{os.getpid()}-tapkey"
    subprocess.run(["ip", "netns", "add", netns], check=True, capture_output=True, timeout=30)
    be = None
    ram = GuestRam(8 * MiB)
    ping = None
    port = None
    try:
        be = Backend(tmp_path, f"net,id=up,socket-path={tmp_path}/a.sock,tap=vtap9", netns=netns)
        await be.wait_ready()

        def ns(cmd: str) -> None:
            r = subprocess.run(["ip", "netns", "exec", netns, "sh", "-c", cmd],
                               capture_output=True, text=True, timeout=30)  # fmt: skip
            assert r.returncode == 0, r.stderr

        ns("sysctl -qw net.ipv6.conf.all.disable_ipv6=1")  # no IPv6 chatter on the tap
        ns("ip link set vtap9 up && ip addr add 10.77.0.1/24 dev vtap9")
        mac = bytes.fromhex("0200000000a1")
        port = await NetPort.connect(tmp_path / "a.sock", ram, 0, mac)
        ping = subprocess.Popen(
            ["ip", "netns", "exec", netns, "busybox", "ping", "-c", "1", "-W", "20", "10.77.0.2"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

        async def next_frame(ethertype: int) -> bytes:
            with trio.fail_after(20):
                while True:
                    port.rx.driver.add([], [2048])
                    port.rx.publish_and_kick()
                    frame = await port.receive()
                    if struct.unpack_from("!H", frame, 12)[0] == ethertype:
                        return frame

        request = await next_frame(0x0806)  # who-has 10.77.0.2, broadcast out of the tap
        assert request[:6] == b"\xff" * 6
        kernel_mac = request[6:12]
        assert request[14:].startswith(struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1))
        reply = _arp(2, mac, "10.77.0.2", kernel_mac, "10.77.0.1")
        await port.send(ether(kernel_mac, mac, reply, ethertype=0x0806))
        echo = await next_frame(0x0800)  # the kernel took our reply: unicast to us now
        assert echo[:6] == mac and echo[6:12] == kernel_mac
        assert echo[14 + 9] == 1 and echo[14 + 20] == 8  # ICMP echo request
        assert "tap vtap9" in be.text()  # the export's summary line names its tap
    finally:
        if ping is not None and ping.poll() is None:
            ping.kill()
            ping.wait()
        if port is not None:
            await port.fe.aclose()
        ram.close()
        if be is not None:
            rc = await trio.to_thread.run_sync(be.stop)
            assert rc == 0, be.text()
        subprocess.run(["ip", "netns", "del", netns], capture_output=True, timeout=30)
