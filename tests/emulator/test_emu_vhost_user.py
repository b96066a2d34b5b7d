"""The VMM's vhost-user front-end: a virtio-mmio device whose model is another process.

* the client against hostile / broken back-ends (socketpair fakes): typed errors;
* the register file against our back-end, driven from Python (no CPU);
* the guest workload (``guest-drivers/virtio_blk.c``, the ``virtio-mmio`` program) on
  both CPU backends against ``python -m virtio serve blk`` and qemu-storage-daemon:
  data verified by the guest and on the host image, no QueueNotify exit (ioeventfd);
* the back-end killed in the middle of a run: ``BackendDisconnected``, not a hang.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import threading
import time

import pytest

from emulator import guest_build
from emulator import run as _run
from emulator import vhost_user as vu
from emulator import virtio_mmio as vmmio
from emulator.devices.debugport import CMD_MARK
from emulator.machine import Machine
from virtio.errors import QueueConfigError
from virtio.spec.features import TransportFeature as TF
from virtio.spec.mmio import MmioReg as R
from virtio.transport.mmio import DeviceStatusError, FeatureNegotiationError
from virtio.transport.vhost_user.messages import (
    HEADER,
    VHOST_USER_F_PROTOCOL_FEATURES,
    FrontendRequest,
    HeaderFlags,
    ProtocolFeature,
)

QSD = shutil.which("qemu-storage-daemon")
qsd_param = pytest.param(
    "qsd",
    marks=pytest.mark.skipif(QSD is None, reason="qemu-storage-daemon not installed"),
)
KIB = 128  # 32 requests of 4 KiB
QD = 8
BATCHES = 2 * (KIB // 4) // QD + 1  # write + read batches, plus the flush


# -- the client against fake back-ends ---------------------------------------------------------
def _fake_backend(answer):
    """A socketpair whose far end runs ``answer(sock, request, flags, payload)`` per message."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    def serve() -> None:
        with b:
            while True:
                hdr = b.recv(HEADER.size, socket.MSG_WAITALL)
                if len(hdr) < HEADER.size:
                    return
                req, flags, size = HEADER.unpack(hdr)
                payload = b.recv(size, socket.MSG_WAITALL) if size else b""
                if answer(b, req, flags, payload) is False:
                    return

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return vu.VhostUserClient(a, timeout=2.0, name="fake"), t


def _reply(sock, req, payload=b"", flags=1 | HeaderFlags.REPLY):
    sock.sendall(HEADER.pack(req, flags, len(payload)) + payload)


def test_client_typed_errors_on_bad_replies():
    cases = {
        "wrong request": (
            lambda s, r, f, p: _reply(s, r + 1, struct.pack("=Q", 0)),
            vu.InvalidReply,
            "answered",
        ),
        "no REPLY flag": (
            lambda s, r, f, p: _reply(s, r, struct.pack("=Q", 0), flags=1),
            vu.InvalidReply,
            "lack REPLY",
        ),
        "version 2": (
            lambda s, r, f, p: _reply(s, r, struct.pack("=Q", 0), flags=2 | HeaderFlags.REPLY),
            vu.InvalidReply,
            "version 2",
        ),
        "short u64": (lambda s, r, f, p: _reply(s, r, b"\0\0\0\0"), vu.InvalidReply, "expected 8"),
        "oversized": (
            lambda s, r, f, p: s.sendall(HEADER.pack(r, 1 | HeaderFlags.REPLY, 1 << 20)),
            vu.InvalidReply,
            "payload of",
        ),
        "hang-up": (lambda s, r, f, p: False, vu.BackendDisconnected, "closed the connection"),
        "silence": (lambda s, r, f, p: time.sleep(1) or False, vu.BackendTimeout, "no reply"),
    }
    for what, (answer, exc, text) in cases.items():
        client, t = _fake_backend(answer)
        client.sock.settimeout(0.3 if what == "silence" else 2.0)
        client.timeout = 0.3 if what == "silence" else 2.0
        with pytest.raises(exc, match=text):
            client.get_features()
        # the stream may be out of sync: later requests are refused, not misread
        with pytest.raises(vu.VhostUserFrontendError, match="unusable"):
            client.get_features()
        client.close()
        t.join(timeout=5)
        assert not t.is_alive(), what


def test_client_reply_ack_failure_and_fds():
    seen: list[tuple[int, int]] = []

    def answer(s, r, f, p):
        seen.append((r, f))
        if r == FrontendRequest.SET_PROTOCOL_FEATURES:
            return None  # no ack: REPLY_ACK is not on yet
        if r == FrontendRequest.SET_OWNER:
            _reply(s, r, struct.pack("=Q", 1))  # failure
        elif r == FrontendRequest.GET_FEATURES:
            fd = os.eventfd(0)
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))]
            s.sendmsg([HEADER.pack(r, 1 | HeaderFlags.REPLY, 8) + bytes(8)], anc)
            os.close(fd)
        return None

    client, t = _fake_backend(answer)
    client.set_protocol_features(ProtocolFeature.REPLY_ACK.mask)
    with pytest.raises(vu.RequestFailed, match="SET_OWNER failed"):
        client.set_owner()
    assert seen[-1] == (FrontendRequest.SET_OWNER, 1 | HeaderFlags.NEED_REPLY)
    with pytest.raises(vu.InvalidReply, match="file descriptor"):
        client.get_features()
    client.close()
    t.join(timeout=5)


def test_connect_gives_up_when_the_backend_process_is_gone(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(vu.BackendDisconnected, match="exit status 3"):
        vu.VhostUserClient.connect(tmp_path / "none.sock", alive=lambda: "exit status 3")
    with pytest.raises(vu.BackendTimeout, match="no listener"):
        vu.VhostUserClient.connect(tmp_path / "none.sock", connect_timeout=0.2)
    assert time.monotonic() - t0 < 5


def test_backend_that_cannot_start_is_a_typed_error(tmp_path):
    """The back-end exits at once (no image): the error carries its status and message."""
    sock = str(tmp_path / "vu.sock")
    argv = vu.backend_argv("ours", sock, str(tmp_path / "missing" / "disk.img"))
    proc = vu.BackendProcess(argv, tmp_path / "log")
    try:
        with (
            Machine(ram_size=8 << 20, cpu="soft") as m,
            pytest.raises(vu.BackendDisconnected, match=r"exit status 1.*cannot open"),
        ):
            vu.attach_backend(m, sock, process=proc)
    finally:
        proc.stop()


class FakeBlk:
    """A scripted back-end on a socketpair: answers the attach sequence, acks everything
    (REPLY_ACK) except ``refuse``, keeps the fds it is sent."""

    FEATURES = TF.VIRTIO_F_VERSION_1.mask | 1 << VHOST_USER_F_PROTOCOL_FEATURES
    PROTOCOL = ProtocolFeature.REPLY_ACK.mask | ProtocolFeature.CONFIG.mask

    def __init__(self, refuse: int | None = None) -> None:
        self.refuse = refuse
        self.fds: dict[int, list[int]] = {}
        self.log: list[int] = []
        a, self.sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.client = vu.VhostUserClient(a, timeout=2.0, name="fake-blk")
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with self.sock as s:
            while True:
                hdr, fds, _, _ = socket.recv_fds(s, HEADER.size, 16)
                if len(hdr) < HEADER.size:
                    return
                req, flags, size = HEADER.unpack(hdr)
                payload = s.recv(size, socket.MSG_WAITALL) if size else b""
                self.fds.setdefault(req, []).extend(fds)
                self.log.append(req)
                if req == FrontendRequest.GET_FEATURES:
                    _reply(s, req, struct.pack("=Q", self.FEATURES))
                elif req == FrontendRequest.GET_PROTOCOL_FEATURES:
                    _reply(s, req, struct.pack("=Q", self.PROTOCOL))
                elif req == FrontendRequest.GET_CONFIG:
                    _reply(s, req, payload[:12] + struct.pack("=Q", 2048).ljust(len(payload) - 12))
                elif req == FrontendRequest.GET_VRING_BASE:
                    _reply(s, req, struct.pack("=II", 0, 0))
                elif flags & HeaderFlags.NEED_REPLY:
                    _reply(s, req, struct.pack("=Q", int(req == self.refuse)))

    def close(self) -> None:
        for fds in self.fds.values():
            for fd in fds:
                os.close(fd)


def _driver_ok(dev, ring=0x10000):
    _wr(dev, R.VIRTIO_MMIO_STATUS, 3)
    for sel in (0, 1):
        _wr(dev, R.VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel)
        _wr(dev, R.VIRTIO_MMIO_DRIVER_FEATURES, TF.VIRTIO_F_VERSION_1.mask >> (32 * sel))
    _wr(dev, R.VIRTIO_MMIO_STATUS, 11)
    _wr(dev, R.VIRTIO_MMIO_QUEUE_NUM, 16)
    _wr(dev, R.VIRTIO_MMIO_QUEUE_DESC_LOW, ring)
    _wr(dev, R.VIRTIO_MMIO_QUEUE_AVAIL_LOW, ring + 0x100)
    _wr(dev, R.VIRTIO_MMIO_QUEUE_USED_LOW, ring + 0x1000)
    _wr(dev, R.VIRTIO_MMIO_QUEUE_READY, 1)
    _wr(dev, R.VIRTIO_MMIO_STATUS, 15)


def _wait_for(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_backend_refusal_and_error_eventfd_need_reset():
    """A NAK during the DRIVER_OK hand-off, and the back-end's err eventfd: both set
    DEVICE_NEEDS_RESET and raise a configuration change interrupt (§2.1.2)."""
    fake = FakeBlk(refuse=FrontendRequest.SET_VRING_ADDR)
    with Machine(ram_size=8 << 20, cpu="soft") as m:
        dev = vu.attach(m, fake.client, config_size=8)
        assert dev.read(0x100, 4) == 2048  # capacity from GET_CONFIG
        _driver_ok(dev)
        status = _rd(dev, R.VIRTIO_MMIO_STATUS)
        assert status & 0x40 and _rd(dev, R.VIRTIO_MMIO_INTERRUPT_STATUS) == 2
        assert "SET_VRING_ADDR failed" in str(dev.errors[-1])
    fake.close()

    fake = FakeBlk()
    with Machine(ram_size=8 << 20, cpu="soft") as m:
        dev = vu.attach(m, fake.client, config_size=8)
        _driver_ok(dev)
        assert _rd(dev, R.VIRTIO_MMIO_STATUS) == 15
        sent = fake.log[fake.log.index(FrontendRequest.SET_FEATURES) :]
        assert sent == [
            FrontendRequest.SET_FEATURES,
            FrontendRequest.SET_MEM_TABLE,
            FrontendRequest.SET_VRING_NUM,
            FrontendRequest.SET_VRING_BASE,
            FrontendRequest.SET_VRING_ADDR,
            FrontendRequest.SET_VRING_KICK,
            FrontendRequest.SET_VRING_CALL,
            FrontendRequest.SET_VRING_ERR,
            FrontendRequest.SET_VRING_ENABLE,
        ]
        (mem_fd,) = fake.fds[FrontendRequest.SET_MEM_TABLE]
        assert os.fstat(mem_fd).st_size == 8 << 20  # the guest RAM memfd
        # a call: InterruptStatus bit 0, and the irqfd wakes a halted guest
        os.eventfd_write(fake.fds[FrontendRequest.SET_VRING_CALL][0], 1)
        _wait_for(lambda: dev.interrupt_status == 1)
        assert m.irqfds[dev.backend.irq_fd] == vmmio.VIRTIO_IRQ
        _wr(dev, R.VIRTIO_MMIO_INTERRUPT_ACK, 1)
        assert _rd(dev, R.VIRTIO_MMIO_INTERRUPT_STATUS) == 0
        # an error on the ring
        os.eventfd_write(fake.fds[FrontendRequest.SET_VRING_ERR][0], 1)
        _wait_for(lambda: dev.interrupt_status == 2)
        assert _rd(dev, R.VIRTIO_MMIO_STATUS) & 0x40
        assert "error on vring 0" in str(dev.errors[-1])
        _wr(dev, R.VIRTIO_MMIO_STATUS, 0)
        assert fake.log[-1] == FrontendRequest.GET_VRING_BASE  # no RESET_DEVICE offered
        assert _rd(dev, R.VIRTIO_MMIO_STATUS) == 0
    fake.close()


# -- the register file against our back-end (no CPU) --------------------------------------------
@pytest.fixture
def ours(tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    sock = str(tmp_path / "vu.sock")
    proc = vu.BackendProcess(vu.backend_argv("ours", sock, str(image)), tmp_path / "log")
    yield sock, proc
    assert proc.stop() == 0, proc.output()


def _rd(dev, reg):
    return dev.read(int(reg), 4)


def _wr(dev, reg, value):
    dev.write(int(reg), 4, value)


def test_register_file_against_our_backend(ours):
    sock, proc = ours
    with Machine(ram_size=8 << 20, cpu="soft") as m:
        dev = vu.attach_backend(m, sock, process=proc)
        be = dev.backend
        c = be.client
        assert c.has(ProtocolFeature.REPLY_ACK) and c.has(ProtocolFeature.CONFIG)
        assert _rd(dev, R.VIRTIO_MMIO_MAGIC_VALUE) == 0x74726976
        assert _rd(dev, R.VIRTIO_MMIO_VERSION) == 2
        assert _rd(dev, R.VIRTIO_MMIO_DEVICE_ID) == 2
        assert not be.device_features >> VHOST_USER_F_PROTOCOL_FEATURES & 1
        assert be.device_features & TF.VIRTIO_F_VERSION_1.mask
        assert dev.read(0x100, 4) | dev.read(0x104, 4) << 32 == (1 << 20) // 512  # capacity
        feats = TF.VIRTIO_F_VERSION_1.mask | TF.VIRTIO_F_EVENT_IDX.mask

        def handshake() -> None:  # one queue of 16
            _wr(dev, R.VIRTIO_MMIO_STATUS, 1)
            _wr(dev, R.VIRTIO_MMIO_STATUS, 3)
            for sel in (0, 1):
                _wr(dev, R.VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel)
                _wr(dev, R.VIRTIO_MMIO_DRIVER_FEATURES, feats >> (32 * sel) & 0xFFFF_FFFF)
            _wr(dev, R.VIRTIO_MMIO_STATUS, 11)
            assert _rd(dev, R.VIRTIO_MMIO_STATUS) == 11
            _wr(dev, R.VIRTIO_MMIO_QUEUE_SEL, 0)
            assert _rd(dev, R.VIRTIO_MMIO_QUEUE_NUM_MAX) == vu.DEFAULT_QUEUE_MAX
            _wr(dev, R.VIRTIO_MMIO_QUEUE_NUM, 16)

        # a ring outside RAM is a typed driver error (the transport's ring validation):
        # the queue stays not ready and the device needs a reset, as on the in-VMM path
        handshake()
        _wr(dev, R.VIRTIO_MMIO_QUEUE_DESC_LOW, 0)
        _wr(dev, R.VIRTIO_MMIO_QUEUE_DESC_HIGH, 1)
        _wr(dev, R.VIRTIO_MMIO_QUEUE_READY, 1)
        assert _rd(dev, R.VIRTIO_MMIO_QUEUE_READY) == 0
        assert isinstance(dev.errors.pop(), QueueConfigError)
        assert _rd(dev, R.VIRTIO_MMIO_STATUS) & 0x40
        _wr(dev, R.VIRTIO_MMIO_STATUS, 0)
        handshake()
        for lo, hi, addr in (
            (R.VIRTIO_MMIO_QUEUE_DESC_LOW, R.VIRTIO_MMIO_QUEUE_DESC_HIGH, 0x10000),
            (R.VIRTIO_MMIO_QUEUE_AVAIL_LOW, R.VIRTIO_MMIO_QUEUE_AVAIL_HIGH, 0x10100),
            (R.VIRTIO_MMIO_QUEUE_USED_LOW, R.VIRTIO_MMIO_QUEUE_USED_HIGH, 0x11000),
        ):
            _wr(dev, lo, addr)
            _wr(dev, hi, 0)
        _wr(dev, R.VIRTIO_MMIO_QUEUE_READY, 1)
        assert _rd(dev, R.VIRTIO_MMIO_QUEUE_READY) == 1
        sent = c.requests
        _wr(dev, R.VIRTIO_MMIO_STATUS, 15)  # DRIVER_OK: the hand-off
        assert c.requests - sent >= 9 and be.started and be.vrings[0].started
        assert be.outstanding() == []
        # a QueueNotify that reaches the VMM (no ioeventfd took it) still kicks
        _wr(dev, R.VIRTIO_MMIO_QUEUE_NOTIFY, 0)
        assert be.stats.notify_exits == 1 and not dev.errors
        _wr(dev, R.VIRTIO_MMIO_STATUS, 0)  # reset: GET_VRING_BASE + RESET_DEVICE
        assert be.vrings[0].base == 0 and not be.started
        assert _rd(dev, R.VIRTIO_MMIO_STATUS) == 0
        assert dev.errors == []


# -- the guest workload -------------------------------------------------------------------------
def _check(r: dict, irq: bool) -> None:
    assert r["verified"], r
    assert r["ios"] == 2 * (KIB // 4)
    regs = r["exits_by_register"]
    assert not any("queue_notify" in k for k in regs), regs  # ioeventfd: never an exit
    assert set(r["exits_by_device"]) <= {"vhost-user-blk", "cpu"}, r["exits_by_device"]
    if irq:
        hlt = regs["cpu.hlt"]
        # one wake-up per batch; a back-end may signal once early when a ring starts
        assert BATCHES <= hlt <= BATCHES + 3, regs
        assert regs["vhost-user-blk.interrupt_status"] == hlt
        assert regs["vhost-user-blk.interrupt_ack"] == hlt
        assert r["exits_total"] == 3 * hlt
    else:
        # polling: a Status read waits for the back-end, so at most one exit per batch
        assert r["exits_total"] == regs.get("vhost-user-blk.status", 0) <= BATCHES, regs


@pytest.mark.usefixtures("need_gcc")
@pytest.mark.parametrize("backend", ["ours", qsd_param])
@pytest.mark.parametrize("irq", [False, True], ids=["poll", "irq"])
def test_workload(cpu, backend, irq):
    r = vu.run_vhost_user(
        cpu, kib=KIB, queue_depth=QD, irq=irq, irq_mode="idt", backend=backend, timeout=60
    )
    assert r["path"] == ("vhost-user" if backend == "ours" else "vhost-user-qsd")
    assert r["cpu"] == cpu
    _check(r, irq)


@pytest.mark.usefixtures("need_gcc")
def test_same_program_fewer_exits_than_in_vmm_path(need_soft):
    """Same guest program and parameters: the in-VMM path exits on every kick."""
    mmio = _run.run_workload("virtio-mmio", "soft", kib=KIB, queue_depth=QD, irq=True)
    vhost = _run.run_workload("vhost-user", "soft", kib=KIB, queue_depth=QD, irq=True)
    assert mmio["exits_by_register"]["virtio-blk.queue_notify"] == BATCHES
    assert "vhost-user-blk.queue_notify" not in vhost["exits_by_register"]
    assert _run.PATHS["vhost-user"].program == _run.PATHS["virtio-mmio"].program


@pytest.mark.usefixtures("need_gcc")
def test_hlt_wakeup_mode_and_external_socket(need_soft, ours):
    sock, _proc = ours  # an already running back-end with a 1 MiB image
    r = vu.run_vhost_user("soft", kib=KIB, queue_depth=QD, irq=True, irq_mode="hlt", timeout=60)
    _check(r, True)
    ext = vu.run_vhost_user("soft", kib=4, queue_depth=1, socket_path=sock, timeout=60)
    assert ext["verified"] and ext["ios"] == 2
    assert "vhost-user-socket" not in _run.PATHS


@pytest.mark.usefixtures("need_gcc")
@pytest.mark.parametrize("irq", [False, True], ids=["poll", "irq"])
def test_backend_killed_mid_run(cpu, irq):
    """SIGKILL the back-end when the guest starts its flush: typed error, no hang."""
    spec = _run.WorkloadSpec("vhost-user", KIB << 10, QD, irq, irq_mode="idt")
    m = Machine(ram_size=_run.DEFAULT_RAM, cpu=cpu)
    try:
        _run.PATHS["vhost-user"].setup(m, spec)
        dev = m.devices["vhost-user-blk"]
        mark = m.debug.on_mark

        def on_mark(cmd: int) -> None:
            mark(cmd)
            if cmd == CMD_MARK:  # write phase done, flush next
                dev.backend.process.kill(signal.SIGKILL)
                dev.backend.process.proc.wait(timeout=5)

        m.debug.on_mark = on_mark
        m.load_elf(guest_build.build("virtio_blk"))
        t0 = time.monotonic()
        with pytest.raises(vu.BackendDisconnected, match="killed by signal 9"):
            m.run(timeout=30)
        assert time.monotonic() - t0 < 15
        assert m.debug.result is None
    finally:
        m.close()


def test_paths_registered():
    for name in ("vhost-user", "vhost-user-qsd"):
        wp = _run.PATHS[name]
        assert wp.program == "virtio_blk"
        assert wp.max_queue_depth == vmmio.MAX_QUEUE_DEPTH


# -- one status machine: the vhost-user path refuses what the in-VMM path refuses --------------
_ORDER_CASES = {
    "features-ok-before-driver": [1, 1 | 8],
    "driver-ok-without-features-ok": [1, 3, 3 | 4],
    "driver-before-ack": [2],
    "clear-a-bit": [1, 3, 1],
}


@pytest.mark.parametrize("sequence", list(_ORDER_CASES.values()), ids=list(_ORDER_CASES))
def test_status_order_enforced_like_in_vmm_path(sequence):
    """§3.1.1: a Status sequence that skips a step (e.g. DRIVER_OK without FEATURES_OK)
    is refused on the vhost-user path exactly as on the in-process path (same error
    type and section, NEEDS_RESET), and nothing is handed to the back-end."""
    from virtio.memory import GuestMemory, MemoryRegion
    from virtio.testing.vhost_user_frontend import EchoDevice
    from virtio.transport.mmio import MmioTransport

    buf = bytearray(1 << 16)
    local = MmioTransport(EchoDevice(), GuestMemory([MemoryRegion(0, len(buf), memoryview(buf))]))
    fake = FakeBlk()
    with Machine(ram_size=8 << 20, cpu="soft") as m:
        dev = vu.attach(m, fake.client, config_size=8)
        for t in (local, dev):
            for value in sequence:
                _wr(t, R.VIRTIO_MMIO_STATUS, value)
        (a,), (b,) = local.errors, dev.errors
        assert type(a) is type(b) is DeviceStatusError
        assert a.section == b.section and a.message == b.message
        assert _rd(dev, R.VIRTIO_MMIO_STATUS) == _rd(local, R.VIRTIO_MMIO_STATUS)
        assert _rd(dev, R.VIRTIO_MMIO_STATUS) & 0x40  # DEVICE_NEEDS_RESET
        assert FrontendRequest.SET_FEATURES not in fake.log  # no hand-off
        assert not dev.backend.started
    fake.close()


def test_unoffered_feature_leaves_features_ok_clear():
    """The driver features the back-end did not offer: FEATURES_OK stays clear on the
    vhost-user path too (§3.1.1 step 6), with the in-VMM path's typed error."""
    fake = FakeBlk()
    with Machine(ram_size=8 << 20, cpu="soft") as m:
        dev = vu.attach(m, fake.client, config_size=8)
        _wr(dev, R.VIRTIO_MMIO_STATUS, 1)
        _wr(dev, R.VIRTIO_MMIO_STATUS, 3)
        _wr(dev, R.VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1)
        _wr(dev, R.VIRTIO_MMIO_DRIVER_FEATURES, 1)  # VERSION_1 ...
        _wr(dev, R.VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0)
        _wr(dev, R.VIRTIO_MMIO_DRIVER_FEATURES, 1 << 7)  # ... and a bit not offered
        _wr(dev, R.VIRTIO_MMIO_STATUS, 11)
        assert _rd(dev, R.VIRTIO_MMIO_STATUS) == 3
        assert isinstance(dev.errors[-1], FeatureNegotiationError)
        assert dev.errors[-1].spec_section.number == "2.2.1"
    fake.close()


@pytest.mark.usefixtures("need_gcc")
@pytest.mark.parametrize("path", ["vhost-user", "vhost-user-pci"])
def test_polled_run_takes_no_exit_however_slow_the_backend(cpu, path):
    """The back-end is stopped (SIGSTOP) for the first 0.3 s of the measurement window,
    far longer than the guest's 200,000-poll Status budget: the polled run still takes
    0 exits, because with a back-end the VMM watches (``Machine.watched_devices``) the
    program never asks Status (``poll_spins`` = POLL_FOREVER), and data, kicks and
    completions never leave guest RAM and the eventfds."""
    wp = _run.PATHS[path]
    spec = _run.WorkloadSpec(path, KIB << 10, QD, False)
    m = Machine(ram_size=_run.DEFAULT_RAM, cpu=cpu)
    resume = None
    try:
        verify = wp.setup(m, spec)
        _run._watched_polling(m, wp)
        assert m.watched_devices == 1
        proc = m.devices["vhost-user-blk"].backend.process.proc
        mark = m.debug.on_mark

        def on_mark(cmd: int) -> None:
            nonlocal resume
            mark(cmd)
            if resume is None:  # BEGIN: the back-end stalls while the guest polls
                proc.send_signal(signal.SIGSTOP)
                resume = threading.Timer(0.3, proc.send_signal, (signal.SIGCONT,))
                resume.start()

        m.debug.on_mark = on_mark
        m.load_elf(guest_build.build(wp.program))
        m.run(timeout=60)
        assert m.debug.result == 0 and verify()
        assert m.debug.ios == 2 * (KIB // 4)
        assert m.window is not None and m.window.total == 0, dict(m.window.by_register)
    finally:
        if resume is not None:
            resume.join()
        m.close()
