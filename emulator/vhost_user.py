"""vhost-user front-end: the VMM attaches a device served by an external back-end.

The guest sees an ordinary virtio-mmio (version 2) device; the device model lives in
another process that speaks vhost-user on a unix socket (``python -m virtio serve blk``,
qemu-storage-daemon's ``vhost-user-blk`` export, or any other back-end).  The VMM only
runs the control path: the register file, feature negotiation and the ring hand-off.
The data path bypasses the VMM entirely:

* guest RAM is the machine's memfd, handed over in SET_MEM_TABLE (one region:
  guest-physical 0, the VMM's own mapping address ``GuestRam.host_addr`` as *user
  address*; ring addresses in SET_VRING_ADDR are user addresses of that same mapping);
* QueueNotify: an eventfd per queue registered with :meth:`Machine.ioeventfd` on the
  QueueNotify register (4 bytes, datamatch = queue index) and given to the back-end in
  SET_VRING_KICK.  On KVM the write stays in the kernel (KVM_IOEVENTFD), on the soft CPU
  the bus signals the eventfd from its access hook: either way it is not an exit;
* used-buffer notifications: the back-end signals the queue's *call* eventfd
  (SET_VRING_CALL).  A notifier thread waits on the call eventfds, sets InterruptStatus
  bit 0 and signals the device's *irq* eventfd, which is registered with
  :meth:`Machine.irqfd` for the device's interrupt line: a halted guest wakes up (HLT
  wake-up, or delivery through the IDT), exactly like the emulator's other irqfds.  The
  relay exists because the machine consumes an irqfd when it wakes the guest; the
  device must still be able to tell the guest *why* (InterruptStatus, §4.2.2);
* the back-end's *err* eventfd (SET_VRING_ERR) sets DEVICE_NEEDS_RESET and raises a
  configuration change interrupt (§2.1.2), like the in-VMM transport does on a driver
  error.

Control path (vhost-user ``docs/interop/vhost-user.rst``, in QEMU's order):

* attach: GET_FEATURES, GET/SET_PROTOCOL_FEATURES (we take MQ, REPLY_ACK, CONFIG,
  RESET_DEVICE, STATUS if offered), SET_OWNER, GET_QUEUE_NUM (with MQ), GET_CONFIG
  (with CONFIG): DeviceFeatures, QueueNumMax count and the config space come from the
  back-end.  vhost-user has no way to ask for the device type, so ``device_id`` is
  the caller's (default virtio-blk);
* DRIVER_OK: SET_FEATURES (the driver's features, plus VHOST_USER_F_PROTOCOL_FEATURES
  if offered), SET_MEM_TABLE, then per ready queue SET_VRING_NUM / BASE / ADDR / KICK
  / CALL / ERR and SET_VRING_ENABLE 1, then SET_STATUS if negotiated;
* reset (Status 0): GET_VRING_BASE for each started ring (stops it), RESET_DEVICE if
  negotiated, SET_STATUS 0 if negotiated.

Every request without an explicit reply carries NEED_REPLY when REPLY_ACK was
negotiated, and a non-zero ack raises :class:`RequestFailed`.  Replies are checked
(version, REPLY flag, request number, size, no stray fds): :class:`InvalidReply`.
A closed socket is :class:`BackendDisconnected`, a silent one :class:`BackendTimeout`.
While the guest runs, the notifier thread also watches the socket for a hang-up
(POLLRDHUP): when the back-end dies, it wakes a halted guest and the guest's next
access to the device raises :class:`BackendDisconnected` out of ``Machine.run``; so a
dead back-end is a typed error, never a hang.

Polling drivers.  A driver that polls the used ring and reads Status when it finds
nothing (``guest-drivers/virtio_blk.c`` does) would otherwise make one exit per spin
while the back-end works.  So a Status read while requests are outstanding on a split
ring (avail idx != used idx) waits, up to ``poll_wait`` seconds, for the back-end to
catch up before it returns: at most one exit per batch, like the in-VMM path whose
QueueNotify exit returns when the batch is done.  ``poll_wait=0`` turns this off.

The workload paths ``vhost-user`` (our back-end) and ``vhost-user-qsd``
(qemu-storage-daemon) run ``guest-drivers/virtio_blk.c`` -- the very program of the
``virtio-mmio`` path -- against a back-end started for the run on a temporary raw
image; :func:`run_vhost_user` also attaches any back-end socket.
"""

from __future__ import annotations

import array
import contextlib
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from emulator import run as _run
from emulator import virtio_mmio as _vmmio
from emulator.bus import Device
from emulator.machine import Machine
from virtio.errors import DriverError
from virtio.spec.features import TransportFeature as TF
from virtio.spec.ids import DeviceId
from virtio.spec.mmio import (
    VIRTIO_MMIO_MAGIC,
    VIRTIO_MMIO_REGION_SIZE,
    VIRTIO_MMIO_VERSION_MODERN,
    MmioInterrupt,
    MmioReg,
)
from virtio.spec.status import DeviceStatus
from virtio.transport.mmio import (
    READ_REGISTERS,
    REGISTER_NAMES,
    VENDOR_ID,
    WRITE_REGISTERS,
    DeviceStatusError,
    FeatureNegotiationError,
    MmioAccessError,
    NotificationError,
    QueueSetupError,
)
from virtio.transport.vhost_user.messages import (
    CONFIG_HEADER_SIZE,
    HEADER,
    HEADER_SIZE,
    MAX_PAYLOAD_SIZE,
    U64,
    VHOST_F_LOG_ALL,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_VERSION,
    ConfigFlags,
    ConfigSpace,
    FrontendRequest,
    HeaderFlags,
    MemoryRegion,
    MemoryTable,
    ProtocolFeature,
    VringAddr,
    VringFd,
    VringState,
    encode_request,
    protocol_feature_mask,
)

R = MmioReg
Q = FrontendRequest
INT_VRING = int(MmioInterrupt.VIRTIO_MMIO_INT_VRING)
INT_CONFIG = int(MmioInterrupt.VIRTIO_MMIO_INT_CONFIG)
CONFIG_BASE = int(R.VIRTIO_MMIO_CONFIG)
ACK, DRIVER, FEATURES_OK, DRIVER_OK = (
    int(DeviceStatus.ACKNOWLEDGE),
    int(DeviceStatus.DRIVER),
    int(DeviceStatus.FEATURES_OK),
    int(DeviceStatus.DRIVER_OK),
)
FAILED, NEEDS_RESET = int(DeviceStatus.FAILED), int(DeviceStatus.DEVICE_NEEDS_RESET)

WANTED_PROTOCOL_FEATURES = protocol_feature_mask(
    ProtocolFeature.MQ,
    ProtocolFeature.REPLY_ACK,
    ProtocolFeature.CONFIG,
    ProtocolFeature.RESET_DEVICE,
    ProtocolFeature.STATUS,
)
"""Protocol features this front-end uses when the back-end offers them."""

VHOST_ONLY_FEATURES = 1 << VHOST_USER_F_PROTOCOL_FEATURES | 1 << VHOST_F_LOG_ALL
"""GET_FEATURES bits that are about vhost-user, not the device: never shown to the guest."""

UNSUPPORTED_TRANSPORT_FEATURES = (
    TF.VIRTIO_F_NOTIFY_ON_EMPTY.mask  # legacy
    | TF.VIRTIO_F_ANY_LAYOUT.mask  # legacy
    | TF.VIRTIO_F_ACCESS_PLATFORM.mask  # no IOMMU / IOTLB in this VMM
    | TF.VIRTIO_F_SR_IOV.mask  # PCI only
    | TF.VIRTIO_F_NOTIFICATION_DATA.mask  # QueueNotify carries only the index (datamatch)
    | TF.VIRTIO_F_NOTIF_CONFIG_DATA.mask
    | TF.VIRTIO_F_RING_RESET.mask  # no per-queue reset over vhost-user here
    | TF.VIRTIO_F_ADMIN_VQ.mask  # not on MMIO (§4.2.5)
)
"""Transport feature bits a back-end may offer that this virtio-mmio front-end hides."""

CONFIG_SIZES = {int(DeviceId.VIRTIO_ID_BLOCK): 60}
"""GET_CONFIG size by device id: QEMU's vhost-user-blk asks for the virtio_blk_config
fields up to ``write_zeroes_may_unmap`` (60 bytes), which every vhost-user-blk back-end
answers (libvhost-user refuses larger requests)."""

DEFAULT_QUEUE_MAX = 256
MAX_QUEUES = 64
REPLY_TIMEOUT = 10.0


# -- typed errors ------------------------------------------------------------------------
class VhostUserFrontendError(RuntimeError):
    """Something went wrong between this front-end and the vhost-user back-end."""


class BackendDisconnected(VhostUserFrontendError):
    """The back-end closed the connection (it exited, crashed or was killed)."""


class BackendTimeout(VhostUserFrontendError):
    """The back-end did not answer (or accept the connection) in time."""


class InvalidReply(VhostUserFrontendError):
    """A reply broke the vhost-user message format (header flags, version, request
    number, size, file descriptors).  The stream may be out of sync: the client refuses
    further requests."""


class RequestFailed(VhostUserFrontendError):
    """The back-end answered a request with a failure (a non-zero REPLY_ACK, an empty
    GET_CONFIG reply)."""


class BackendUnsuitable(VhostUserFrontendError):
    """The back-end cannot back this device (no VIRTIO_F_VERSION_1, no queues, no
    config space...)."""


def _name(request: int) -> str:
    try:
        return Q(request).name
    except ValueError:
        return f"request {request}"


# -- the synchronous client ----------------------------------------------------------------
class VhostUserClient:
    """A blocking vhost-user front-end on a connected unix stream socket.

    One request at a time (a lock serialises callers).  ``reply_ack`` is set once
    REPLY_ACK was negotiated (:meth:`set_protocol_features`); from then on every request
    without an explicit reply asks for an ack and a failure raises ``RequestFailed``.
    """

    def __init__(self, sock: socket.socket, *, timeout: float = REPLY_TIMEOUT, name: str = ""):
        self.sock = sock
        self.sock.settimeout(timeout)
        self.name = name or "vhost-user back-end"
        self.timeout = timeout
        self.protocol_features = 0
        self.reply_ack = False
        self._buf = bytearray()
        self._lock = threading.Lock()
        self._broken: VhostUserFrontendError | None = None
        self.requests = 0

    @classmethod
    def connect(
        cls,
        path: str | os.PathLike[str],
        *,
        timeout: float = REPLY_TIMEOUT,
        connect_timeout: float = 10.0,
        alive: Callable[[], str | None] | None = None,
        name: str = "",
    ) -> VhostUserClient:
        """Connect to ``path``, retrying while the socket does not exist or refuses
        (a back-end that is still starting).  ``alive()`` returns why the back-end
        process is gone (then we stop waiting), or ``None``."""
        deadline = time.monotonic() + connect_timeout
        label = name or f"vhost-user back-end at {os.fspath(path)}"
        delay = 0.005
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(os.fspath(path))
                return cls(sock, timeout=timeout, name=label)
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                sock.close()
                reason = alive() if alive is not None else None
                if reason is not None:
                    raise BackendDisconnected(f"{label}: {reason}") from exc
                if time.monotonic() > deadline:
                    raise BackendTimeout(
                        f"{label}: no listener after {connect_timeout:.1f} s ({exc})"
                    ) from exc
                time.sleep(delay)
                delay = min(delay * 2, 0.1)
            except BaseException:
                sock.close()
                raise

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    # -- raw messages ----------------------------------------------------------------------
    def _send(self, data: bytes, fds: Sequence[int], request: int) -> None:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        try:
            sent = self.sock.sendmsg([data], anc, socket.MSG_NOSIGNAL)
            while sent < len(data):
                sent += self.sock.send(data[sent:], socket.MSG_NOSIGNAL)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise self._fail(
                BackendDisconnected(f"{self.name}: connection lost sending {_name(request)}")
            ) from exc
        except TimeoutError as exc:
            raise self._fail(
                BackendTimeout(f"{self.name}: {_name(request)} not accepted in {self.timeout} s")
            ) from exc

    def _fill(self, n: int, request: int) -> None:
        while len(self._buf) < n:
            try:
                data, anc, _flags, _ = self.sock.recvmsg(
                    65536, socket.CMSG_SPACE(8 * 4), socket.MSG_CMSG_CLOEXEC
                )
            except TimeoutError as exc:
                raise self._fail(
                    BackendTimeout(
                        f"{self.name}: no reply to {_name(request)} within {self.timeout} s"
                    )
                ) from exc
            except ConnectionResetError as exc:
                raise self._fail(
                    BackendDisconnected(
                        f"{self.name}: connection reset while {_name(request)} waited for its reply"
                    )
                ) from exc
            fds = _fds_from(anc)
            if fds:
                for fd in fds:
                    os.close(fd)
                raise self._fail(
                    InvalidReply(
                        f"{self.name}: the reply to {_name(request)} carried {len(fds)} file "
                        "descriptor(s); none is defined (vhost-user: Communication)"
                    )
                )
            if not data:
                raise self._fail(
                    BackendDisconnected(
                        f"{self.name}: the back-end closed the connection while "
                        f"{_name(request)} waited for its reply"
                    )
                )
            self._buf += data

    def _recv_reply(self, request: int) -> bytes:
        self._fill(HEADER_SIZE, request)
        got, flags, size = HEADER.unpack_from(self._buf)
        where = f"{self.name}: reply to {_name(request)}"
        if size > MAX_PAYLOAD_SIZE:
            raise self._fail(InvalidReply(f"{where}: payload of {size} bytes announced"))
        if flags & HeaderFlags.VERSION_MASK != VHOST_USER_VERSION:
            raise self._fail(
                InvalidReply(f"{where}: version {flags & 3} (flags {flags:#x}), expected 1")
            )
        if not flags & HeaderFlags.REPLY:
            raise self._fail(InvalidReply(f"{where}: flags {flags:#x} lack REPLY (bit 2)"))
        if got != request:
            raise self._fail(InvalidReply(f"{where}: the back-end answered {_name(got)}"))
        self._fill(HEADER_SIZE + size, request)
        payload = bytes(self._buf[HEADER_SIZE : HEADER_SIZE + size])
        del self._buf[: HEADER_SIZE + size]
        return payload

    def _fail(self, exc: VhostUserFrontendError) -> VhostUserFrontendError:
        self._broken = exc
        return exc

    # -- requests ----------------------------------------------------------------------------
    def request(
        self,
        request: FrontendRequest,
        payload: object = None,
        fds: Sequence[int] = (),
        *,
        reply_size: int | None = None,
        reply: bool = False,
    ) -> bytes | None:
        """Send ``request``; return its explicit reply (``reply`` or ``reply_size``: the
        exact size it must have), else wait for the REPLY_ACK if negotiated."""
        with self._lock:
            if self._broken is not None:
                raise type(self._broken)(
                    f"{self.name}: connection unusable after an earlier error: {self._broken}"
                )
            explicit = reply or reply_size is not None
            ack = self.reply_ack and not explicit
            self._send(encode_request(request, payload, need_reply=ack), fds, request)  # type: ignore[arg-type]
            self.requests += 1
            if explicit:
                data = self._recv_reply(request)
                if reply_size is not None and len(data) != reply_size:
                    raise self._fail(
                        InvalidReply(
                            f"{self.name}: reply to {request.name} has {len(data)} bytes, "
                            f"expected {reply_size}"
                        )
                    )
                return data
            if ack:
                data = self._recv_reply(request)
                if len(data) != 8:
                    raise self._fail(
                        InvalidReply(
                            f"{self.name}: REPLY_ACK to {request.name} has {len(data)} bytes, "
                            "expected a u64"
                        )
                    )
                status = U64.unpack(data).value
                if status:
                    raise RequestFailed(
                        f"{self.name}: {request.name} failed (REPLY_ACK status {status})"
                    )
            return None

    def get_u64(self, request: FrontendRequest) -> int:
        data = self.request(request, reply_size=8)
        assert data is not None
        return U64.unpack(data).value

    def get_features(self) -> int:
        return self.get_u64(Q.GET_FEATURES)

    def set_features(self, features: int) -> None:
        self.request(Q.SET_FEATURES, features)

    def get_protocol_features(self) -> int:
        return self.get_u64(Q.GET_PROTOCOL_FEATURES)

    def set_protocol_features(self, features: int) -> None:
        self.request(Q.SET_PROTOCOL_FEATURES, features)
        self.protocol_features = features
        self.reply_ack = bool(features & ProtocolFeature.REPLY_ACK.mask)

    def has(self, feature: ProtocolFeature) -> bool:
        return bool(self.protocol_features & feature.mask)

    def set_owner(self) -> None:
        self.request(Q.SET_OWNER)

    def get_queue_num(self) -> int:
        return self.get_u64(Q.GET_QUEUE_NUM)

    def get_config(self, offset: int, size: int) -> bytes:
        data = self.request(
            Q.GET_CONFIG, ConfigSpace(offset, ConfigFlags.WRITABLE, bytes(size)), reply=True
        )
        return self._config_reply(data, offset, size)

    def _config_reply(self, data: bytes | None, offset: int, size: int) -> bytes:
        if not data:
            raise RequestFailed(f"{self.name}: GET_CONFIG of {size} bytes at {offset} failed")
        if len(data) != CONFIG_HEADER_SIZE + size:
            raise self._fail(
                InvalidReply(
                    f"{self.name}: GET_CONFIG reply of {len(data)} bytes, expected "
                    f"{CONFIG_HEADER_SIZE} + {size}"
                )
            )
        return data[CONFIG_HEADER_SIZE:]

    def set_config(self, offset: int, data: bytes) -> None:
        self.request(Q.SET_CONFIG, ConfigSpace(offset, ConfigFlags.WRITABLE, data))

    def set_mem_table(self, table: MemoryTable, fds: Sequence[int]) -> None:
        self.request(Q.SET_MEM_TABLE, table, fds)

    def set_vring_num(self, index: int, num: int) -> None:
        self.request(Q.SET_VRING_NUM, VringState(index, num))

    def set_vring_base(self, index: int, base: int) -> None:
        self.request(Q.SET_VRING_BASE, VringState(index, base))

    def get_vring_base(self, index: int) -> int:
        data = self.request(Q.GET_VRING_BASE, VringState(index, 0), reply_size=VringState.SIZE)
        assert data is not None
        state = VringState.unpack(data)
        if state.index != index:
            raise self._fail(
                InvalidReply(f"{self.name}: GET_VRING_BASE {index} answered for {state.index}")
            )
        return state.num

    def set_vring_addr(self, addr: VringAddr) -> None:
        self.request(Q.SET_VRING_ADDR, addr)

    def set_vring_fd(self, request: FrontendRequest, index: int, fd: int | None) -> None:
        """SET_VRING_KICK / CALL / ERR with ``fd`` (``None``: the NOFD bit)."""
        self.request(request, VringFd(index, fd is None), [] if fd is None else [fd])

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self.request(Q.SET_VRING_ENABLE, VringState(index, int(enable)))

    def reset_device(self) -> None:
        self.request(Q.RESET_DEVICE)

    def set_status(self, status: int) -> None:
        self.request(Q.SET_STATUS, status)

    def get_status(self) -> int:
        return self.get_u64(Q.GET_STATUS)


def _fds_from(anc: list) -> list[int]:
    fds: list[int] = []
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
            fds.extend(arr)
    return fds


# -- the device ------------------------------------------------------------------------------
def _eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def _drain(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


@dataclass(eq=False)
class _Queue:
    index: int
    kick: int
    call: int
    err: int
    num: int = 0
    ready: bool = False
    desc: int = 0
    driver: int = 0
    device: int = 0
    started: bool = False
    base: int | None = None  # last GET_VRING_BASE answer

    def clear(self) -> None:
        self.num = self.desc = self.driver = self.device = 0
        self.ready = self.started = False


@dataclass
class FrontendStats:
    """What the device saw (exits are counted by the bus; these are host-side events)."""

    notify_exits: int = 0  # QueueNotify writes that reached the VMM (no ioeventfd match)
    calls: int = 0  # call eventfd signals relayed to the interrupt line
    errors_signalled: int = 0  # err eventfd signals (back-end saw a driver error)
    poll_waits: int = 0  # Status reads that waited for the back-end
    starts: int = 0  # DRIVER_OK hand-offs
    resets: int = 0
    extra: dict = field(default_factory=dict)


class VhostUserMmioDevice(Device):
    """A virtio-mmio v2 register file in the VMM in front of a vhost-user back-end.

    Maps itself at ``base`` (``VIRTIO_MMIO_REGION_SIZE`` bytes), registers the
    QueueNotify ioeventfds and the interrupt irqfd with ``machine``, and closes itself
    with the machine.  Driver mistakes never raise: like ``MmioTransport`` they become
    typed ``DriverError``s in ``errors``.  Back-end failures raise
    ``VhostUserFrontendError`` subclasses out of the register access (so out of
    ``Machine.run``).
    """

    def __init__(
        self,
        machine: Machine,
        client: VhostUserClient,
        *,
        base: int = _vmmio.MMIO_BASE,
        irq: int = _vmmio.VIRTIO_IRQ,
        device_id: int = int(DeviceId.VIRTIO_ID_BLOCK),
        name: str = "vhost-user-blk",
        queue_max: int = DEFAULT_QUEUE_MAX,
        config_size: int | None = None,
        poll_wait: float = 5.0,
        ioeventfd: bool = True,
    ) -> None:
        self.name = name
        self.machine = machine
        self.client = client
        self.base = base
        self.irq = irq
        self.device_id = device_id
        self.queue_max = queue_max
        self.poll_wait = poll_wait
        self.use_ioeventfd = ioeventfd
        self.errors: list[DriverError] = []
        self.stats = FrontendStats()
        self.dead: str | None = None
        self.backend: BackendProcess | None = None  # set by whoever started it
        self._lock = threading.Lock()
        self._closed = False
        self._fds: list[int] = []
        self._thread: threading.Thread | None = None

        # -- negotiation with the back-end (QEMU's vhost_user_backend_init order) --
        self.backend_features = client.get_features()
        if self.backend_features >> VHOST_USER_F_PROTOCOL_FEATURES & 1:
            offered = client.get_protocol_features()
            client.set_protocol_features(offered & WANTED_PROTOCOL_FEATURES)
        client.set_owner()
        nq = client.get_queue_num() if client.has(ProtocolFeature.MQ) else 1
        if nq < 1:
            raise BackendUnsuitable(f"{client.name}: GET_QUEUE_NUM answered {nq}")
        self.num_queues = min(nq, MAX_QUEUES)
        self.device_features = (
            self.backend_features & ~VHOST_ONLY_FEATURES & ~UNSUPPORTED_TRANSPORT_FEATURES
        )
        if not self.device_features & TF.VIRTIO_F_VERSION_1.mask:
            raise BackendUnsuitable(
                f"{client.name}: no VIRTIO_F_VERSION_1 in GET_FEATURES "
                f"({self.backend_features:#x}); virtio-mmio v2 has no legacy interface"
            )
        size = CONFIG_SIZES.get(device_id, 0) if config_size is None else config_size
        self.config = bytearray()
        if size and client.has(ProtocolFeature.CONFIG):
            self.config = bytearray(client.get_config(0, size))
        elif size:
            raise BackendUnsuitable(
                f"{client.name}: protocol feature CONFIG not offered: the device config "
                "space cannot be read"
            )

        # -- notifications ------------------------------------------------------------------
        self._irq_fd = self._new_fd()
        self._stop_fd = self._new_fd()
        self.queues = [
            _Queue(i, self._new_fd(), self._new_fd(), self._new_fd())
            for i in range(self.num_queues)
        ]
        try:
            machine.bus.add_mmio(base, VIRTIO_MMIO_REGION_SIZE, self)
        except BaseException:
            self._close_fds()
            raise
        notify = base + int(R.VIRTIO_MMIO_QUEUE_NOTIFY)
        if ioeventfd:
            for q in self.queues:
                machine.ioeventfd(notify, 4, q.kick, datamatch=q.index)
        machine.irqfd(self._irq_fd, irq)
        machine.devices[name] = self
        machine.closers.append(self.close)
        self._reset_registers()
        self._thread = threading.Thread(target=self._notifier, name=f"{name}-notify", daemon=True)
        self._thread.start()

    def _new_fd(self) -> int:
        fd = _eventfd()
        self._fds.append(fd)
        return fd

    def _reset_registers(self) -> None:
        self.status = 0
        self.isr = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.started = False
        for q in self.queues:
            q.clear()

    # -- the notifier thread ------------------------------------------------------------------
    def _notifier(self) -> None:
        # The KVM backend's deadline timer (SIGALRM) must interrupt KVM_RUN on the vCPU
        # thread, not this one.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        poller = select.poll()
        roles: dict[int, tuple[str, _Queue | None]] = {self._stop_fd: ("stop", None)}
        poller.register(self._stop_fd, select.POLLIN)
        for q in self.queues:
            roles[q.call] = ("call", q)
            roles[q.err] = ("err", q)
            poller.register(q.call, select.POLLIN)
            poller.register(q.err, select.POLLIN)
        sock = self.client.fileno()
        roles[sock] = ("socket", None)
        poller.register(sock, select.POLLRDHUP)
        while True:
            for fd, events in poller.poll():
                role, q = roles[fd]
                if role == "stop":
                    return
                if role == "socket":
                    poller.unregister(sock)
                    with self._lock:
                        self.dead = (
                            f"{self.client.name}: the back-end hung up "
                            f"(poll events {events:#x}){self._backend_note()}"
                        )
                    os.eventfd_write(self._irq_fd, 1)  # wake a halted guest
                elif role == "call" and _drain(fd):
                    with self._lock:
                        self.isr |= INT_VRING
                        self.stats.calls += 1
                    os.eventfd_write(self._irq_fd, 1)
                elif role == "err" and _drain(fd):
                    assert q is not None
                    with self._lock:
                        self.stats.errors_signalled += 1
                        self._needs_reset_locked(
                            f"the back-end signalled an error on vring {q.index}"
                        )
                    os.eventfd_write(self._irq_fd, 1)

    def _backend_note(self) -> str:
        if self.backend is None:
            return ""
        reason = self.backend.exit_reason(wait=0.5)
        return f"; {reason}" if reason else ""

    def _needs_reset_locked(self, message: str) -> None:
        self.errors.append(DriverError(message, section="2.1.2"))
        self.status |= NEEDS_RESET
        if self.status & DRIVER_OK:
            self.isr |= INT_CONFIG

    def _check_alive(self) -> None:
        if self.dead is not None:
            raise BackendDisconnected(self.dead)

    # -- bus protocol -----------------------------------------------------------------------
    def register_name(self, offset: int, is_write: bool) -> str:
        if offset >= CONFIG_BASE:
            return "config"
        return REGISTER_NAMES.get(offset, f"{offset:#x}")

    def read(self, offset: int, size: int) -> int:
        self._check_alive()
        try:
            if offset >= CONFIG_BASE:
                return self._read_config(offset - CONFIG_BASE, size)
            self._check_access(offset, size, READ_REGISTERS, "read")
            return self._read_reg(offset) & 0xFFFF_FFFF
        except DriverError as exc:
            self.errors.append(exc)
            return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self._check_alive()
        try:
            if offset >= CONFIG_BASE:
                self._write_config(offset - CONFIG_BASE, size, value)
                return
            self._check_access(offset, size, WRITE_REGISTERS, "write")
            self._write_reg(offset, value)
        except DriverError as exc:
            self.errors.append(exc)

    @staticmethod
    def _check_access(offset: int, size: int, allowed: frozenset[int], what: str) -> None:
        if size != 4 or offset % 4:
            raise MmioAccessError(f"{size}-byte {what} at {offset:#x}: registers are 32-bit")
        if offset not in allowed:
            raise MmioAccessError(f"{what} of register {offset:#x} is not allowed")

    def _sel_queue(self) -> _Queue | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def _read_reg(self, offset: int) -> int:
        q = self._sel_queue()
        if offset == R.VIRTIO_MMIO_MAGIC_VALUE:
            return VIRTIO_MMIO_MAGIC
        if offset == R.VIRTIO_MMIO_VERSION:
            return VIRTIO_MMIO_VERSION_MODERN
        if offset == R.VIRTIO_MMIO_DEVICE_ID:
            return self.device_id
        if offset == R.VIRTIO_MMIO_VENDOR_ID:
            return VENDOR_ID
        if offset == R.VIRTIO_MMIO_DEVICE_FEATURES:
            sel = self.device_features_sel
            return self.device_features >> (32 * sel) if sel < 2 else 0
        if offset == R.VIRTIO_MMIO_QUEUE_NUM_MAX:
            return self.queue_max if q is not None else 0
        if offset == R.VIRTIO_MMIO_QUEUE_READY:
            return int(q is not None and q.ready)
        if offset == R.VIRTIO_MMIO_INTERRUPT_STATUS:
            with self._lock:
                return self.isr
        if offset == R.VIRTIO_MMIO_STATUS:
            self._wait_progress()
            return self.status
        if offset in (
            R.VIRTIO_MMIO_SHM_LEN_LOW,
            R.VIRTIO_MMIO_SHM_LEN_HIGH,
            R.VIRTIO_MMIO_SHM_BASE_LOW,
            R.VIRTIO_MMIO_SHM_BASE_HIGH,
        ):
            return 0xFFFF_FFFF  # no shared memory region (§4.2.2)
        return 0  # QueueReset (RING_RESET not offered), ConfigGeneration (never changes)

    def _write_reg(self, offset: int, value: int) -> None:
        q = self._sel_queue()
        if offset == R.VIRTIO_MMIO_DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == R.VIRTIO_MMIO_DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == R.VIRTIO_MMIO_DRIVER_FEATURES:
            if self.status & FEATURES_OK:
                raise FeatureNegotiationError("DriverFeatures written after FEATURES_OK")
            if self.driver_features_sel < 2:
                shift = 32 * self.driver_features_sel
                mask = 0xFFFF_FFFF << shift
                self.driver_features = (self.driver_features & ~mask) | (value << shift)
        elif offset == R.VIRTIO_MMIO_QUEUE_SEL:
            self.queue_sel = value
        elif offset == R.VIRTIO_MMIO_QUEUE_NOTIFY:
            self._notify(value)
        elif offset == R.VIRTIO_MMIO_INTERRUPT_ACK:
            with self._lock:
                self.isr &= ~value
        elif offset == R.VIRTIO_MMIO_STATUS:
            self._write_status(value)
        else:
            self._write_queue_reg(q, offset, value)

    def _write_queue_reg(self, q: _Queue | None, offset: int, value: int) -> None:
        if q is None:
            raise QueueSetupError(f"queue {self.queue_sel} does not exist ({offset:#x} write)")
        if offset == R.VIRTIO_MMIO_QUEUE_READY:
            if value == 0:
                if self.started:
                    raise QueueSetupError("QueueReady 0 after DRIVER_OK: reset the device")
                q.ready = False
            elif value == 1:
                self._queue_ready(q)
            else:
                raise QueueSetupError(f"QueueReady written with {value}")
            return
        if q.ready:
            raise QueueSetupError(f"queue {q.index} set up while ready ({offset:#x} write)")
        if offset == R.VIRTIO_MMIO_QUEUE_NUM:
            q.num = value
        elif offset in (R.VIRTIO_MMIO_QUEUE_DESC_LOW, R.VIRTIO_MMIO_QUEUE_DESC_HIGH):
            q.desc = _set_half(q.desc, offset == R.VIRTIO_MMIO_QUEUE_DESC_HIGH, value)
        elif offset in (R.VIRTIO_MMIO_QUEUE_AVAIL_LOW, R.VIRTIO_MMIO_QUEUE_AVAIL_HIGH):
            q.driver = _set_half(q.driver, offset == R.VIRTIO_MMIO_QUEUE_AVAIL_HIGH, value)
        elif offset in (R.VIRTIO_MMIO_QUEUE_USED_LOW, R.VIRTIO_MMIO_QUEUE_USED_HIGH):
            q.device = _set_half(q.device, offset == R.VIRTIO_MMIO_QUEUE_USED_HIGH, value)
        # SHMSel and QueueReset writes: nothing to select or reset

    @property
    def packed(self) -> bool:
        return bool(self.driver_features & TF.VIRTIO_F_RING_PACKED.mask)

    def _ring_sizes(self, num: int) -> tuple[int, int, int]:
        if self.packed:
            return 16 * num, 4, 4
        extra = 2 if self.driver_features & TF.VIRTIO_F_EVENT_IDX.mask else 0
        return 16 * num, 4 + 2 * num + extra, 4 + 8 * num + extra

    def _queue_ready(self, q: _Queue) -> None:
        if not self.status & FEATURES_OK:
            raise QueueSetupError(f"QueueReady for queue {q.index} before FEATURES_OK")
        if not 1 <= q.num <= self.queue_max:
            raise QueueSetupError(f"queue {q.index} size {q.num} not in 1..{self.queue_max}")
        if not self.packed and q.num & (q.num - 1):
            raise QueueSetupError(f"split queue {q.index} size {q.num} is not a power of 2")
        aligns = (16, 4, 4) if self.packed else (16, 2, 4)  # §2.8.10.1 / §2.7
        ram = self.machine.memory
        for what, addr, size, align in zip(
            ("descriptor area", "driver area", "device area"),
            (q.desc, q.driver, q.device),
            self._ring_sizes(q.num),
            aligns,
            strict=True,
        ):
            if addr % align:
                raise QueueSetupError(
                    f"queue {q.index} {what} {addr:#x} not {align}-byte aligned", section="2.7"
                )
            if not ram.contains(addr, size):
                raise QueueSetupError(
                    f"queue {q.index} {what} {addr:#x}+{size:#x} outside guest RAM",
                    section="2.7",
                )
        q.ready = True

    def _notify(self, value: int) -> None:
        """A QueueNotify write that reached the VMM: no ioeventfd took it."""
        self.stats.notify_exits += 1
        if not self.status & DRIVER_OK:
            raise NotificationError(f"QueueNotify {value} before DRIVER_OK")
        if value >= len(self.queues) or not self.queues[value].started:
            raise NotificationError(f"QueueNotify for queue {value}, which is not running")
        os.eventfd_write(self.queues[value].kick, 1)

    def _write_status(self, value: int) -> None:
        if value == 0:
            self.reset()
            return
        old = self.status & ~NEEDS_RESET
        if value & ~0xFF or value & old != old:
            raise DeviceStatusError(f"Status {value:#x} clears bits of {old:#x}")
        new = value & ~old
        if new & FEATURES_OK:
            self._features_ok()
            if not self.status & FEATURES_OK:
                new &= ~FEATURES_OK
                value &= ~FEATURES_OK
        if new & DRIVER_OK and not self.status & FEATURES_OK:
            raise DeviceStatusError("DRIVER_OK without FEATURES_OK")
        with self._lock:
            self.status = value | (self.status & NEEDS_RESET)
        if new & DRIVER_OK and not self.status & NEEDS_RESET:
            self._start()

    def _features_ok(self) -> None:
        extra = self.driver_features & ~self.device_features
        if extra:
            self.errors.append(
                FeatureNegotiationError(f"driver accepted features {extra:#x} not offered")
            )
            return
        if not self.driver_features & TF.VIRTIO_F_VERSION_1.mask:
            self.errors.append(FeatureNegotiationError("VIRTIO_F_VERSION_1 not accepted"))
            return
        self.status |= FEATURES_OK

    # -- the hand-off to the back-end -----------------------------------------------------------
    def user_addr(self, gpa: int) -> int:
        """The front-end user address of guest-physical ``gpa`` (SET_MEM_TABLE scheme)."""
        return self.machine.memory.host_addr + gpa

    def memory_table(self) -> MemoryTable:
        ram = self.machine.memory
        return MemoryTable((MemoryRegion(0, ram.size, ram.host_addr, 0),))

    def _start(self) -> None:
        """DRIVER_OK: program the back-end and start its rings."""
        c = self.client
        features = self.driver_features
        if self.backend_features >> VHOST_USER_F_PROTOCOL_FEATURES & 1:
            features |= 1 << VHOST_USER_F_PROTOCOL_FEATURES
        try:
            c.set_features(features)
            c.set_mem_table(self.memory_table(), [self.machine.ram_fd])
            base = VringState.packed_num(0, True, 0, True) if self.packed else 0
            for q in self.queues:
                if not q.ready:
                    continue
                for fd in (q.kick, q.call, q.err):
                    _drain(fd)  # nothing from an earlier session
                c.set_vring_num(q.index, q.num)
                c.set_vring_base(q.index, base)
                c.set_vring_addr(
                    VringAddr(
                        q.index,
                        0,
                        self.user_addr(q.desc),
                        self.user_addr(q.device),
                        self.user_addr(q.driver),
                        0,
                    )
                )
                c.set_vring_fd(Q.SET_VRING_KICK, q.index, q.kick)
                c.set_vring_fd(Q.SET_VRING_CALL, q.index, q.call)
                c.set_vring_fd(Q.SET_VRING_ERR, q.index, q.err)
                q.started = True
                self.started = True
                if features >> VHOST_USER_F_PROTOCOL_FEATURES & 1:
                    c.set_vring_enable(q.index, True)
            if c.has(ProtocolFeature.STATUS):
                c.set_status(self.status)
        except RequestFailed as exc:
            # The back-end refused what the driver set up: the device needs a reset.
            with self._lock:
                self._needs_reset_locked(str(exc))
            os.eventfd_write(self._irq_fd, 1)
        except BackendDisconnected as exc:
            raise BackendDisconnected(f"{exc}{self._backend_note()}") from exc
        self.started = True
        self.stats.starts += 1

    def reset(self) -> None:
        """Status 0 (§2.4): stop the back-end's rings and reset it, then our registers."""
        c = self.client
        if self.started:
            for q in self.queues:
                if q.started:
                    q.base = c.get_vring_base(q.index)
            if c.has(ProtocolFeature.RESET_DEVICE):
                c.reset_device()
            if c.has(ProtocolFeature.STATUS):
                c.set_status(0)
            self.stats.resets += 1
        with self._lock:
            self._reset_registers()
        for q in self.queues:
            for fd in (q.kick, q.call, q.err):
                _drain(fd)

    # -- polling drivers -------------------------------------------------------------------------
    def outstanding(self) -> list[tuple[_Queue, int]]:
        """Started split queues with requests the back-end has not used yet:
        ``[(queue, used idx)]`` (indices read from guest RAM)."""
        if self.packed:
            return []
        ram = self.machine.ram
        out = []
        for q in self.queues:
            if q.started:
                avail = struct.unpack_from("<H", ram, q.driver + 2)[0]
                used = struct.unpack_from("<H", ram, q.device + 2)[0]
                if avail != used:
                    out.append((q, used))
        return out

    def _wait_progress(self) -> None:
        if self.poll_wait <= 0 or not self.status & DRIVER_OK or self.status & NEEDS_RESET:
            return
        if not self.outstanding():
            return
        self.stats.poll_waits += 1
        deadline = time.monotonic() + self.poll_wait
        delay = 2e-6
        while time.monotonic() < deadline:
            self._check_alive()
            if self.status & NEEDS_RESET or not self.outstanding():
                return
            time.sleep(delay)
            delay = min(delay * 2, 5e-4)

    def _read_config(self, offset: int, size: int) -> int:
        if size not in (1, 2, 4) or offset % size:
            raise MmioAccessError(f"{size}-byte config read at {offset:#x}", section="4.2.2.2")
        if offset + size > len(self.config):
            raise MmioAccessError(
                f"config read at {offset:#x}+{size} beyond the {len(self.config)}-byte config "
                "space the back-end reported",
                section="4.2.2.2",
            )
        return int.from_bytes(self.config[offset : offset + size], "little")

    def _write_config(self, offset: int, size: int, value: int) -> None:
        if size not in (1, 2, 4) or offset % size or offset + size > len(self.config):
            raise MmioAccessError(f"{size}-byte config write at {offset:#x}", section="4.2.2.2")
        data = value.to_bytes(size, "little")
        try:
            self.client.set_config(offset, data)
        except RequestFailed as exc:
            raise MmioAccessError(f"config write at {offset:#x} refused: {exc}") from exc
        self.config[offset : offset + size] = data

    # -- teardown -------------------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            os.eventfd_write(self._stop_fd, 1)
            self._thread.join(timeout=5)
        if self.started and self.dead is None:
            with contextlib.suppress(VhostUserFrontendError, OSError):
                self.client.sock.settimeout(2.0)
                self.reset()
        self.client.close()
        self._close_fds()

    def _close_fds(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []


def _set_half(old: int, high: bool, value: int) -> int:
    if high:
        return (old & 0xFFFF_FFFF) | (value & 0xFFFF_FFFF) << 32
    return (old & ~0xFFFF_FFFF) | (value & 0xFFFF_FFFF)


# -- back-end processes ---------------------------------------------------------------------------
BACKENDS = ("ours", "qsd")


def backend_argv(backend: str, socket_path: str, image: str, queue_size: int = 256) -> list[str]:
    """The command line that serves ``image`` as vhost-user-blk on ``socket_path``."""
    if backend == "ours":
        return [
            sys.executable, "-m", "virtio", "serve", "blk",
            "--socket-path", socket_path, "--blk-file", image,
            "--queue-size", str(queue_size), "--serial", "pyvirtio-vhost-user",
        ]  # fmt: skip
    if backend == "qsd":
        exe = shutil.which("qemu-storage-daemon")
        if exe is None:
            raise FileNotFoundError("qemu-storage-daemon not found in PATH")

        def esc(s: str) -> str:
            return s.replace(",", ",,")  # QEMU option syntax

        return [
            exe,
            "--blockdev", f"driver=file,node-name=f,filename={esc(image)}",
            "--blockdev", "driver=raw,node-name=d,file=f",
            "--export",
            "type=vhost-user-blk,id=e,node-name=d,addr.type=unix,"
            f"addr.path={esc(socket_path)},writable=on",
        ]  # fmt: skip
    raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")


class BackendProcess:
    """A back-end process started for a run; its output goes to ``log_path``."""

    def __init__(self, argv: list[str], log_path: str | os.PathLike[str]) -> None:
        self.argv = argv
        self.log_path = Path(log_path)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        self.pid = self.proc.pid

    def exit_reason(self, wait: float = 0.0) -> str | None:
        """Why the process is gone (status and the end of its output), or ``None``."""
        try:
            rc = self.proc.wait(timeout=wait) if wait > 0 else self.proc.poll()
        except subprocess.TimeoutExpired:
            rc = None
        if rc is None:
            return None
        how = f"killed by signal {-rc}" if rc < 0 else f"exit status {rc}"
        tail = self.output()[-400:].strip()
        return f"back-end pid {self.pid} {how}" + (f"; output: {tail}" if tail else "")

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM (the back-end convention), then SIGKILL after ``timeout``; reaps it."""
        if self.proc.poll() is None:
            self.kill(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill(signal.SIGKILL)
                self.proc.wait(timeout=timeout)
        return self.proc.returncode


def attach_backend(
    m: Machine,
    socket_path: str | os.PathLike[str],
    *,
    process: BackendProcess | None = None,
    **device_kwargs,
) -> VhostUserMmioDevice:
    """Connect to the back-end at ``socket_path`` and map it as a virtio-mmio device."""
    alive = process.exit_reason if process is not None else None
    client = VhostUserClient.connect(socket_path, alive=alive)
    try:
        dev = VhostUserMmioDevice(m, client, **device_kwargs)
    except BaseException as exc:
        client.close()
        if process is not None and isinstance(exc, VhostUserFrontendError):
            reason = process.exit_reason(wait=0.5)
            if reason:
                raise type(exc)(f"{exc}; {reason}") from exc
        raise
    dev.backend = process
    return dev


# -- workload paths -----------------------------------------------------------------------------
def _setup(backend: str, socket_path: str | None = None):
    def setup(m: Machine, spec: _run.WorkloadSpec) -> Callable[[], bool]:
        size = spec.total_bytes + (1 << 20)
        tmp = tempfile.mkdtemp(prefix="pyvirtio-vu-")
        m.closers.append(lambda: shutil.rmtree(tmp, ignore_errors=True))  # runs last
        process = None
        image = spec.image
        if socket_path is None:
            image = image or os.path.join(tmp, "disk.img")
            fd = os.open(image, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if os.fstat(fd).st_size < size:
                    os.ftruncate(fd, size)
            finally:
                os.close(fd)
            sock = os.path.join(tmp, "vhost-user.sock")
            process = BackendProcess(
                backend_argv(backend, sock, image, _vmmio.QUEUE_SIZE), os.path.join(tmp, "log")
            )
            m.closers.append(process.stop)
        else:
            sock = socket_path
        dev = attach_backend(
            m, sock, process=process, name="vhost-user-blk", queue_max=_vmmio.QUEUE_SIZE
        )
        m.write_params(
            _vmmio.VIRTIO_PARAMS.pack(
                _run.PARAMS_MAGIC, _run.PARAMS_VERSION, spec.irq_param, _vmmio.VIRTIO_IRQ,
                spec.nreqs, spec.queue_depth, 1, 0,
                _vmmio.MMIO_BASE, _vmmio.RING_ADDR, _vmmio.BUF_ADDR, _vmmio.HDR_ADDR,
                spec.seed, _vmmio.QUEUE_SIZE, 1, _run.REQUEST_BYTES,
            )
        )  # fmt: skip

        def verify() -> bool:
            if dev.errors:
                return False
            if image is None:  # an external back-end: only the guest's own check
                return True
            nsect = spec.nreqs * (_run.REQUEST_BYTES // 512)
            with open(image, "rb") as f:
                data = f.read(nsect * 512)
            return all(
                data[lba * 512 : (lba + 1) * 512] == _run.expected_sector(lba, spec.seed)
                for lba in range(nsect)
            )

        return verify

    return setup


def _phase_ios(nreqs: int) -> tuple[int, ...]:
    return (nreqs, 0, nreqs)


def _path(backend: str, socket_path: str | None = None, description: str = "") -> _run.WorkloadPath:
    return _run.WorkloadPath(
        "virtio_blk",
        _setup(backend, socket_path),
        _vmmio.MAX_QUEUE_DEPTH,
        description,
        _run.IDE_PHASES,
        _phase_ios,
        extra={"event_idx": True, "packed": False, "backend": backend},
    )


PATHS = {
    "vhost-user": (
        "ours",
        "virtio-blk over virtio-mmio, device in a vhost-user back-end (virtio serve blk); "
        "ioeventfd kicks, irqfd calls",
    ),
    "vhost-user-qsd": (
        "qsd",
        "virtio-blk over virtio-mmio, device in qemu-storage-daemon's vhost-user-blk export",
    ),
}

for _name_, (_backend, _desc) in PATHS.items():
    _run.register_path(_name_, _path(_backend, description=_desc))


def run_vhost_user(
    cpu: str = "auto",
    mib: int = 1,
    queue_depth: int = 1,
    irq: bool = False,
    *,
    backend: str = "ours",
    socket_path: str | None = None,
    **kwargs,
) -> dict:
    """``run_workload`` on a vhost-user back-end: ``backend="ours"`` or ``"qsd"`` (started
    for the run on a temporary image), or ``socket_path``: an already running back-end
    serving a disk of at least the workload size + 1 MiB (only the guest verifies the
    data then: the VMM cannot see the disk)."""
    if socket_path is None:
        path = "vhost-user" if backend == "ours" else f"vhost-user-{backend}"
        if path not in _run.PATHS:
            raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
        return _run.run_workload(path, cpu, mib, queue_depth, irq, **kwargs)
    name = "vhost-user-socket"
    desc = f"vhost-user back-end at {socket_path}"
    _run.register_path(name, _path("external", socket_path, desc))
    try:
        return _run.run_workload(name, cpu, mib, queue_depth, irq, **kwargs)
    finally:
        _run.PATHS.pop(name, None)


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - thin CLI
    import argparse
    import json

    ap = argparse.ArgumentParser(
        prog="python -m emulator.vhost_user",
        description="Run the virtio-blk guest workload against a vhost-user back-end.",
    )
    ap.add_argument("--backend", choices=BACKENDS, default="ours")
    ap.add_argument("--socket", help="attach this running back-end instead of starting one")
    ap.add_argument("--cpu", choices=["kvm", "soft", "auto"], default="auto")
    ap.add_argument("--mib", type=int, default=1)
    ap.add_argument("--kib", type=int)
    ap.add_argument("--queue-depth", type=int, default=32)
    ap.add_argument("--irq", action="store_true")
    ap.add_argument("--irq-mode", choices=sorted(_run.IRQ_MODES), default="idt")
    args = ap.parse_args(argv)
    res = run_vhost_user(
        args.cpu,
        args.mib,
        args.queue_depth,
        args.irq,
        backend=args.backend,
        socket_path=args.socket,
        kib=args.kib,
        irq_mode=args.irq_mode,
    )
    json.dump(res, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
