"""vhost-user front-end: the VMM attaches a device served by an external back-end.

The guest sees an ordinary virtio-mmio (version 2) device; the device model lives in
another process that speaks vhost-user on a unix socket (``python -m virtio serve blk``,
qemu-storage-daemon's ``vhost-user-blk`` export, or any other back-end).  The register
file and every driver rule (§3.1.1 status order, §4.2.2 register rules, ring
validation) are ``virtio.transport.mmio.MmioTransport``'s, exactly as on the in-VMM
``virtio-mmio`` path; this module supplies its device backend, ``VhostUserBackend``
(:func:`attach`), which only runs the vhost-user control path: negotiation with the
back-end and the ring hand-off.  The data path bypasses the VMM entirely:

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
  back-end (GET_CONFIG asks for the extent ``CONFIG_LAYOUTS`` declares for the device
  type, or the caller's ``config_size``).  vhost-user has no way to ask for the device
  type, so ``device_id`` is the caller's (default virtio-blk);
* DRIVER_OK: SET_FEATURES (the driver's features, plus VHOST_USER_F_PROTOCOL_FEATURES
  if offered), SET_MEM_TABLE, then per ready queue SET_VRING_NUM / BASE / ADDR / KICK
  / CALL / ERR and SET_VRING_ENABLE 1, then SET_STATUS if negotiated;
* reset (Status 0): GET_VRING_BASE for each started ring (stops it), RESET_DEVICE if
  negotiated, SET_STATUS 0 if negotiated.

The client (:class:`VhostUserClient`) is blocking I/O around the sans-IO
``virtio.transport.vhost_user.frontend.FrontendConnection``: every request without an
explicit reply carries NEED_REPLY when REPLY_ACK was negotiated, and a non-zero ack
raises :class:`RequestFailed`; replies are checked (version, REPLY flag, request
number, size, fd count): :class:`InvalidReply`.
A closed socket is :class:`BackendDisconnected`, a silent one :class:`BackendTimeout`.
While the guest runs, the notifier thread also watches the socket for a hang-up
(POLLRDHUP): when the back-end dies, it wakes a halted guest and the guest's next
access to the device raises :class:`BackendDisconnected` out of ``Machine.run``
(``MmioTransport.backend_failed``), and a guest spinning on guest RAM is stopped with
the same error (``Machine.fail``); so a dead back-end is a typed error, never a hang.

Polling drivers.  With a back-end attached (``Machine.watched_devices``), the workload
runner tells ``guest-drivers/virtio_blk.c`` never to read Status while it polls
(``poll_spins`` = ``POLL_FOREVER``): the VMM watches the back-end itself and stops a
spinning vCPU when it hangs up (:meth:`Machine.fail`), so a polled run takes no exit at
all however slow the back-end is (``vhost-user`` and ``vhost-user-pci`` alike).  A
driver that polls the used ring and reads Status when it finds nothing would otherwise
make one exit per spin while the back-end works.  So a Status read while requests are
outstanding on a split ring (avail idx != used idx) waits, up to ``poll_wait`` seconds,
for the back-end to catch up before it returns: at most one exit per batch, like the
in-VMM path whose QueueNotify exit returns when the batch is done.  ``poll_wait=0`` turns this off.

The workload paths ``vhost-user`` (our back-end) and ``vhost-user-qsd``
(qemu-storage-daemon) run ``guest-drivers/virtio_blk.c`` -- the very program of the
``virtio-mmio`` path -- against a back-end started for the run on a temporary raw
image; :func:`run_vhost_user` also attaches any back-end socket.
"""

from __future__ import annotations

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
from emulator import workload_disk as _disk
from emulator.machine import Machine
from virtio.errors import DriverError
from virtio.memory import FdRegion, MmapGuestMemory
from virtio.queues.virtqueue import Virtqueue
from virtio.spec import sections as sec
from virtio.spec.blk import virtio_blk_config
from virtio.spec.features import TransportFeature as TF
from virtio.spec.ids import DeviceId
from virtio.spec.mmio import VIRTIO_MMIO_REGION_SIZE, MmioReg
from virtio.spec.status import DeviceStatus
from virtio.transport.mmio import MmioAccessError, MmioTransport
from virtio.transport.vhost_user.frontend import (
    Ack,
    BackendDisconnected,
    BackendTimeout,
    FrontendConnection,
    FrontendError,
    InvalidReply,
    RequestFailed,
    Response,
)
from virtio.transport.vhost_user.messages import (
    CONFIG_HEADER_SIZE,
    U64,
    VHOST_F_LOG_ALL,
    VHOST_USER_F_PROTOCOL_FEATURES,
    ConfigFlags,
    ConfigSpace,
    FrontendRequest,
    MemoryRegion,
    MemoryTable,
    ProtocolFeature,
    VringAddr,
    VringFd,
    VringState,
    protocol_feature_mask,
)
from virtio.transport.vhost_user.protocol import NEED_DATA, ConnectionClosed

__all__ = [
    "BackendDisconnected",
    "BackendTimeout",
    "BackendUnsuitable",
    "InvalidReply",
    "RequestFailed",
    "VhostUserBackend",
    "VhostUserClient",
    "VhostUserFrontendError",
    "attach",
    "attach_backend",
    "run_vhost_user",
]

R = MmioReg
Q = FrontendRequest
NEEDS_RESET = int(DeviceStatus.DEVICE_NEEDS_RESET)

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

CONFIG_LAYOUTS = {int(DeviceId.VIRTIO_ID_BLOCK): (virtio_blk_config, "write_zeroes_may_unmap")}
"""GET_CONFIG extent by device id: the spec's config struct and the last field asked
for.  QEMU's vhost-user-blk asks for ``virtio_blk_config`` up to
``write_zeroes_may_unmap`` (60 bytes), which every vhost-user-blk back-end answers
(libvhost-user refuses larger requests).  Other types: pass ``config_size``."""

DEFAULT_QUEUE_MAX = 256
MAX_QUEUES = 64
REPLY_TIMEOUT = 10.0
RECV_SIZE = 65536
MAX_REPLY_FDS = 8
"""fds one reply read accepts; a reply may carry at most 1 (more: ``InvalidReply``)."""


# -- typed errors ------------------------------------------------------------------------
VhostUserFrontendError = FrontendError
"""Base of every error between this front-end and its back-end (``frontend.py``)."""


class BackendUnsuitable(FrontendError):
    """The back-end cannot back this device (no VIRTIO_F_VERSION_1, no queues, no
    config space...)."""


def _name(request: int) -> str:
    try:
        return Q(request).name
    except ValueError:
        return f"request {request}"


# -- the synchronous client ----------------------------------------------------------------
class VhostUserClient:
    """A blocking vhost-user front-end on a connected unix stream socket: the I/O around
    a sans-IO ``FrontendConnection`` (which checks every reply).

    One request at a time (a lock serialises callers).  Once REPLY_ACK is negotiated
    (:meth:`set_protocol_features`) every request without an explicit reply asks for an
    ack and a failure raises ``RequestFailed``.  After a broken reply, a timeout or a
    reset connection the client refuses further requests.
    """

    def __init__(self, sock: socket.socket, *, timeout: float = REPLY_TIMEOUT, name: str = ""):
        self.sock = sock
        self.sock.settimeout(timeout)
        self.name = name or "vhost-user back-end"
        self.timeout = timeout
        self.conn = FrontendConnection(name=self.name)
        self._lock = threading.Lock()
        self._broken: FrontendError | None = None

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

    @property
    def protocol_features(self) -> int:
        return self.conn.protocol_features

    @property
    def reply_ack(self) -> bool:
        return self.conn.reply_ack

    @property
    def requests(self) -> int:
        return self.conn.requests

    def has(self, feature: ProtocolFeature) -> bool:
        return self.conn.has_protocol_feature(feature)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.conn.close()
        with contextlib.suppress(OSError):
            self.sock.close()

    # -- I/O ---------------------------------------------------------------------------------
    def _fail(self, exc: FrontendError) -> FrontendError:
        self._broken = exc
        return exc

    def _send(self, data: bytes, fds: Sequence[int], request: int) -> None:
        try:
            sent = socket.send_fds(self.sock, [data], fds, socket.MSG_NOSIGNAL)
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

    def _next_event(self, request: int) -> Response | Ack:
        while (event := self.conn.next_event()) is NEED_DATA:
            try:
                data, fds, flags, _ = socket.recv_fds(
                    self.sock, RECV_SIZE, MAX_REPLY_FDS, socket.MSG_CMSG_CLOEXEC
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
            if flags & socket.MSG_CTRUNC:
                for fd in fds:
                    os.close(fd)
                raise self._fail(
                    InvalidReply(f"{self.name}: the reply to {_name(request)} lost fds")
                )
            self.conn.receive_data(data, fds)
        if isinstance(event, ConnectionClosed):  # pragma: no cover - a reply was awaited
            raise self._fail(BackendDisconnected(f"{self.name}: connection closed"))
        return event

    # -- requests ----------------------------------------------------------------------------
    def request(
        self,
        request: FrontendRequest,
        payload: object = None,
        fds: Sequence[int] = (),
        *,
        reply_size: int | None = None,
    ) -> bytes | None:
        """Send ``request``; return its explicit reply payload (checked by the connection;
        ``reply_size``: the exact size it must have), else wait for the REPLY_ACK if
        negotiated."""
        with self._lock:
            if self._broken is not None:
                raise type(self._broken)(
                    f"{self.name}: connection unusable after an earlier error: {self._broken}"
                )
            out = self.conn.send_request(request, payload, fds, reply_size=reply_size)
            self._send(out.data, out.fds, request)
            if not self.conn.pending_replies:
                return None
            event = self._next_event(request)
            if isinstance(event, Ack):
                if not event.ok:
                    raise RequestFailed(
                        f"{self.name}: {request.name} failed (REPLY_ACK status {event.status})"
                    )
                return None
            for fd in event.fds:  # none of our requests wants one
                os.close(fd)
            return event.payload

    def get_u64(self, request: FrontendRequest) -> int:
        data = self.request(request)
        assert data is not None  # 8 bytes: checked by the connection
        return U64.unpack(data).value

    def get_features(self) -> int:
        return self.get_u64(Q.GET_FEATURES)

    def set_features(self, features: int) -> None:
        self.request(Q.SET_FEATURES, features)

    def get_protocol_features(self) -> int:
        return self.get_u64(Q.GET_PROTOCOL_FEATURES)

    def set_protocol_features(self, features: int) -> None:
        self.request(Q.SET_PROTOCOL_FEATURES, features)

    def set_owner(self) -> None:
        self.request(Q.SET_OWNER)

    def get_queue_num(self) -> int:
        return self.get_u64(Q.GET_QUEUE_NUM)

    def get_config(self, offset: int, size: int) -> bytes:
        data = self.request(Q.GET_CONFIG, ConfigSpace(offset, ConfigFlags.WRITABLE, bytes(size)))
        if not data:  # "zero length of payload to indicate an error"
            raise RequestFailed(f"{self.name}: GET_CONFIG of {size} bytes at {offset} failed")
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
        data = self.request(Q.GET_VRING_BASE, VringState(index, 0))
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


# -- the device backend ----------------------------------------------------------------------
def _eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def _drain(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def declared_config_size(device_id: int) -> int:
    """How many config-space bytes to ask GET_CONFIG for: the fields the device type's
    ``CONFIG_LAYOUTS`` entry declares."""
    if device_id not in CONFIG_LAYOUTS:
        return 0
    struct_, last = CONFIG_LAYOUTS[device_id]
    size = 0
    for sub in struct_.subcons:
        size += sub.sizeof()
        if sub.name == last:
            return size
    raise ValueError(f"{last} is no field of the config layout")  # pragma: no cover


@dataclass(eq=False)
class _Vring:
    index: int
    kick: int
    call: int
    err: int
    vq: Virtqueue | None = None  # the validated ring (QueueReady=1)
    started: bool = False
    base: int | None = None  # last GET_VRING_BASE answer


@dataclass
class FrontendStats:
    """What the backend saw (exits are counted by the bus; these are host-side events)."""

    notify_exits: int = 0  # QueueNotify writes that reached the VMM (no ioeventfd match)
    calls: int = 0  # call eventfd signals relayed to the interrupt line
    errors_signalled: int = 0  # err eventfd signals (back-end saw a driver error)
    poll_waits: int = 0  # Status reads that waited for the back-end
    starts: int = 0  # DRIVER_OK hand-offs
    resets: int = 0
    extra: dict = field(default_factory=dict)


class VhostUserBackend:
    """The device behind an ``MmioTransport`` when the device model is a vhost-user
    back-end: ``MmioDevice`` (identity, features and config space from the back-end)
    and ``MmioBackend`` (rings handed over at DRIVER_OK, kicks and calls by eventfd).

    The transport does the registers and every driver rule; this class only talks to
    the back-end.  Back-end failures raise ``FrontendError`` subclasses out of the
    register access (so out of ``Machine.run``).
    """

    def __init__(
        self,
        machine: Machine,
        client: VhostUserClient,
        *,
        device_id: int = int(DeviceId.VIRTIO_ID_BLOCK),
        queue_max: int = DEFAULT_QUEUE_MAX,
        config_size: int | None = None,
        poll_wait: float = 5.0,
    ) -> None:
        self.machine = machine
        machine.watched_devices += 1  # the runner's polling guests rely on the notifier
        self.client = client
        self.device_id = device_id
        self.poll_wait = poll_wait
        self.stats = FrontendStats()
        self.process: BackendProcess | None = None  # set by whoever started it
        self.transport: MmioTransport | None = None  # set by attach()
        self.needs_reset = False
        self.driver_features = 0
        self.started = False
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
        self.queue_max_sizes = (queue_max,) * min(nq, MAX_QUEUES)
        self.device_features = (
            self.backend_features & ~VHOST_ONLY_FEATURES & ~UNSUPPORTED_TRANSPORT_FEATURES
        )
        if not self.device_features & TF.VIRTIO_F_VERSION_1.mask:
            raise BackendUnsuitable(
                f"{client.name}: no VIRTIO_F_VERSION_1 in GET_FEATURES "
                f"({self.backend_features:#x}); virtio-mmio v2 has no legacy interface"
            )
        size = declared_config_size(device_id) if config_size is None else config_size
        self.config = bytearray()
        if size and client.has(ProtocolFeature.CONFIG):
            self.config = bytearray(client.get_config(0, size))
        elif size:
            raise BackendUnsuitable(
                f"{client.name}: protocol feature CONFIG not offered: the device config "
                "space cannot be read"
            )
        self.irq_fd = self._new_fd()
        self._stop_fd = self._new_fd()
        self.vrings = [
            _Vring(i, self._new_fd(), self._new_fd(), self._new_fd())
            for i in range(len(self.queue_max_sizes))
        ]

    def _new_fd(self) -> int:
        fd = _eventfd()
        self._fds.append(fd)
        return fd

    @property
    def name(self) -> str:
        return self.transport.name if self.transport is not None else self.client.name

    # -- MmioDevice ----------------------------------------------------------------------------
    def offered_features(self) -> int:
        return self.device_features

    def ack_features(self, features: int) -> None:
        self.driver_features = features

    def config_bytes(self) -> bytes:
        return bytes(self.config)

    @property
    def config_size(self) -> int:
        return len(self.config)

    def read_config(self, offset: int, size: int) -> bytes:
        """The config bytes read at GET_CONFIG time (the transport checked the range)."""
        return bytes(self.config[offset : offset + size])

    def write_config(self, offset: int, data: bytes) -> None:
        try:
            self.client.set_config(offset, data)
        except RequestFailed as exc:
            raise MmioAccessError(f"config write at {offset:#x} refused: {exc}") from exc
        self.config[offset : offset + len(data)] = data

    def reset(self) -> None:
        """Status 0 (§2.4): stop the back-end's rings and reset it."""
        c = self.client
        if self.started:
            for v in self.vrings:
                if v.started:
                    v.base = c.get_vring_base(v.index)
            if c.has(ProtocolFeature.RESET_DEVICE):
                c.reset_device()
            if c.has(ProtocolFeature.STATUS):
                c.set_status(0)
            self.stats.resets += 1
        self.started = False
        self.needs_reset = False
        self.driver_features = 0
        for v in self.vrings:
            v.vq = None
            v.started = False
            for fd in (v.kick, v.call, v.err):
                _drain(fd)

    # -- MmioBackend ----------------------------------------------------------------------------
    def start_queue(self, index: int, vq: Virtqueue) -> None:
        v = self.vrings[index]
        v.vq = vq
        if self.started:  # a queue enabled on a live device
            self._start_vring(v, self.driver_features & TF.VIRTIO_F_RING_PACKED.mask)

    def stop_queue(self, index: int) -> None:
        v = self.vrings[index]
        v.vq = None
        if v.started:
            v.base = self.client.get_vring_base(index)  # stops the ring
            v.started = False

    def driver_ok(self, features: int) -> None:
        """DRIVER_OK: program the back-end and start its rings.  A refusal is raised as a
        ``DriverError`` (the transport sets DEVICE_NEEDS_RESET)."""
        c = self.client
        wire = features
        if self.backend_features >> VHOST_USER_F_PROTOCOL_FEATURES & 1:
            wire |= 1 << VHOST_USER_F_PROTOCOL_FEATURES
        self.started = True
        self.stats.starts += 1
        try:
            c.set_features(wire)
            c.set_mem_table(self.memory_table(), [self.machine.ram_fd])
            for v in self.vrings:
                if v.vq is not None:
                    self._start_vring(v, features & TF.VIRTIO_F_RING_PACKED.mask)
            if c.has(ProtocolFeature.STATUS):
                assert self.transport is not None
                c.set_status(self.transport.status)
        except RequestFailed as exc:
            # The back-end refused what the driver set up: the device needs a reset.
            raise DriverError(str(exc), section=sec.S_2_1_2) from exc
        except BackendDisconnected as exc:
            raise BackendDisconnected(f"{exc}{self._backend_note()}") from exc

    def _start_vring(self, v: _Vring, packed: int) -> None:
        c = self.client
        assert v.vq is not None
        state = v.vq.state()
        for fd in (v.kick, v.call, v.err):
            _drain(fd)  # nothing from an earlier session
        c.set_vring_num(v.index, state.size)
        c.set_vring_base(v.index, VringState.packed_num(0, True, 0, True) if packed else 0)
        c.set_vring_addr(
            VringAddr(
                v.index,
                0,
                self.user_addr(state.desc_addr),
                self.user_addr(state.device_addr),
                self.user_addr(state.driver_addr),
                0,
            )
        )
        c.set_vring_fd(Q.SET_VRING_KICK, v.index, v.kick)
        c.set_vring_fd(Q.SET_VRING_CALL, v.index, v.call)
        c.set_vring_fd(Q.SET_VRING_ERR, v.index, v.err)
        v.started = True
        if self.backend_features >> VHOST_USER_F_PROTOCOL_FEATURES & 1:
            c.set_vring_enable(v.index, True)

    def notify(self, index: int) -> None:
        """A QueueNotify write that reached the VMM (no ioeventfd took it): kick."""
        self.stats.notify_exits += 1
        os.eventfd_write(self.vrings[index].kick, 1)

    def status_read(self) -> None:
        self._wait_progress()

    # -- the hand-off ----------------------------------------------------------------------------
    def user_addr(self, gpa: int) -> int:
        """The front-end user address of guest-physical ``gpa`` (SET_MEM_TABLE scheme)."""
        return self.machine.memory.host_addr + gpa

    def memory_table(self) -> MemoryTable:
        ram = self.machine.memory
        return MemoryTable((MemoryRegion(0, ram.size, ram.host_addr, 0),))

    # -- the notifier thread ------------------------------------------------------------------
    def start_notifier(self, transport: MmioTransport) -> None:
        self.transport = transport
        self._thread = threading.Thread(
            target=self._notifier, name=f"{transport.name}-notify", daemon=True
        )
        self._thread.start()

    def interrupt(self, level: bool) -> None:
        """The transport's interrupt line: an edge on the machine's irqfd (a halted guest
        wakes up; InterruptStatus says why)."""
        if level:
            os.eventfd_write(self.irq_fd, 1)

    def _notifier(self) -> None:
        # The KVM backend's deadline timer (SIGALRM) must interrupt KVM_RUN on the vCPU
        # thread, not this one.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        t = self.transport
        assert t is not None
        poller = select.poll()
        roles: dict[int, tuple[str, _Vring | None]] = {self._stop_fd: ("stop", None)}
        poller.register(self._stop_fd, select.POLLIN)
        for v in self.vrings:
            roles[v.call] = ("call", v)
            roles[v.err] = ("err", v)
            poller.register(v.call, select.POLLIN)
            poller.register(v.err, select.POLLIN)
        sock = self.client.fileno()
        roles[sock] = ("socket", None)
        poller.register(sock, select.POLLRDHUP)
        while True:
            for fd, events in poller.poll():
                role, v = roles[fd]
                if role == "stop":
                    return
                if role == "socket":
                    poller.unregister(sock)
                    exc = BackendDisconnected(
                        f"{self.client.name}: the back-end hung up "
                        f"(poll events {events:#x}){self._backend_note()}"
                    )
                    t.backend_failed(exc)
                    os.eventfd_write(self.irq_fd, 1)  # wake a halted guest
                    # and stop one that spins on the used ring (it never asks Status:
                    # POLL_FOREVER in the workload's parameters)
                    self.machine.fail(exc)
                elif role == "call" and _drain(fd):
                    assert v is not None
                    self.stats.calls += 1
                    t.used_buffer_notification(v.index)
                elif role == "err" and _drain(fd):
                    assert v is not None
                    self.stats.errors_signalled += 1
                    t.driver_error(
                        DriverError(
                            f"the back-end signalled an error on vring {v.index}",
                            section=sec.S_2_1_2,
                        )
                    )

    def _backend_note(self) -> str:
        if self.process is None:
            return ""
        reason = self.process.exit_reason(wait=0.5)
        return f"; {reason}" if reason else ""

    # -- polling drivers -------------------------------------------------------------------------
    def outstanding(self) -> list[tuple[_Vring, int]]:
        """Started split rings with requests the back-end has not used yet:
        ``[(vring, used idx)]`` (indices read from guest RAM)."""
        if self.driver_features & TF.VIRTIO_F_RING_PACKED.mask:
            return []
        ram = self.machine.ram
        out = []
        for v in self.vrings:
            if v.started and v.vq is not None:
                state = v.vq.state()
                avail = struct.unpack_from("<H", ram, state.driver_addr + 2)[0]
                used = struct.unpack_from("<H", ram, state.device_addr + 2)[0]
                if avail != used:
                    out.append((v, used))
        return out

    def _wait_progress(self) -> None:
        t = self.transport
        if t is None or self.poll_wait <= 0 or not self.started or t.status & NEEDS_RESET:
            return
        if not self.outstanding():
            return
        self.stats.poll_waits += 1
        deadline = time.monotonic() + self.poll_wait
        delay = 2e-6
        while time.monotonic() < deadline:
            if t.broken is not None:
                raise t.broken
            if t.status & NEEDS_RESET or not self.outstanding():
                return
            time.sleep(delay)
            delay = min(delay * 2, 5e-4)

    # -- teardown -------------------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            os.eventfd_write(self._stop_fd, 1)
            self._thread.join(timeout=5)
        broken = self.transport is not None and self.transport.broken is not None
        if self.started and not broken:
            with contextlib.suppress(FrontendError, OSError):
                self.client.sock.settimeout(2.0)
                self.reset()
        self.client.close()
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []


def attach(
    machine: Machine,
    client: VhostUserClient,
    *,
    base: int = _vmmio.MMIO_BASE,
    irq: int = _vmmio.VIRTIO_IRQ,
    name: str = "vhost-user-blk",
    ioeventfd: bool = True,
    **backend_kwargs,
) -> MmioTransport:
    """Map the device served by ``client``'s back-end as a virtio-mmio device at ``base``:
    an ``MmioTransport`` in front of a ``VhostUserBackend``, QueueNotify ioeventfds
    (datamatch = queue index), the interrupt as an irqfd on line ``irq``.  The machine
    closes it.  ``transport.backend`` is the ``VhostUserBackend``."""
    backend = VhostUserBackend(machine, client, **backend_kwargs)
    memories: list[MmapGuestMemory] = []

    def guest_memory() -> MmapGuestMemory:
        memories.append(MmapGuestMemory([FdRegion(0, machine.ram_size, machine.ram_fd)]))
        return memories[-1]

    transport = MmioTransport(backend, guest_memory, backend.interrupt, name=name, ring_reset=False)
    try:
        machine.bus.add_mmio(base, VIRTIO_MMIO_REGION_SIZE, transport)
    except BaseException:
        backend.close()
        raise
    if ioeventfd:
        notify = base + int(R.VIRTIO_MMIO_QUEUE_NOTIFY)
        for v in backend.vrings:
            machine.ioeventfd(notify, 4, v.kick, datamatch=v.index)
    machine.irqfd(backend.irq_fd, irq)
    machine.devices[name] = transport
    machine.closers.append(lambda: [mem.close() for mem in memories])
    machine.closers.append(backend.close)
    backend.start_notifier(transport)
    return transport


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
    **kwargs,
) -> MmioTransport:
    """Connect to the back-end at ``socket_path`` and map it as a virtio-mmio device
    (:func:`attach`); ``process``: the back-end process, if started for this run."""
    alive = process.exit_reason if process is not None else None
    client = VhostUserClient.connect(socket_path, alive=alive)
    try:
        transport = attach(m, client, **kwargs)
    except BaseException as exc:
        client.close()
        if process is not None and isinstance(exc, FrontendError):
            reason = process.exit_reason(wait=0.5)
            if reason:
                raise type(exc)(f"{exc}; {reason}") from exc
        raise
    transport.backend.process = process  # type: ignore[attr-defined]
    return transport


# -- workload paths -----------------------------------------------------------------------------
def _setup(backend: str, socket_path: str | None = None):
    def setup(m: Machine, spec: _run.WorkloadSpec) -> Callable[[], bool]:
        tmp = tempfile.mkdtemp(prefix="pyvirtio-vu-")
        m.closers.append(lambda: shutil.rmtree(tmp, ignore_errors=True))  # runs last
        process = None
        image = spec.image
        if socket_path is None:
            image = image or os.path.join(tmp, "disk.img")
            _disk.ensure_image(image, _disk.disk_size(spec))
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
            return _disk.disk_ok(_disk.read_image(image, _disk.written_bytes(spec)), spec)

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
