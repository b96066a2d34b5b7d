"""A Python vhost-user front-end for tests: drive a back-end the way QEMU does.

::

    a, b = trio.socket.socketpair()
    async with trio.open_nursery() as n:
        n.start_soon(server.serve_connection, b)
        fe = VhostUserFrontend(a)
        ram = GuestRam(8 << 20)
        await fe.negotiate()
        await fe.set_mem_table(ram)
        vq = await fe.setup_vring(0, ram, size=64)     # a DriverQueue in guest RAM
        vq.driver.add([b"hello"], [16]); vq.publish_and_kick()
        used = await vq.wait_used()
        await fe.get_vring_base(0)

``GuestRam`` is memfd-backed guest memory with front-end *user addresses* (what
ring addresses are expressed in) distinct from guest-physical addresses, so a
back-end that forgets to translate is caught.  ``FrontendVring`` pairs a
``DriverQueue`` with its kick/call/err eventfds.  ``raw`` messages (any bytes, any
fds) are there for hostile tests.  ``EchoDevice`` is a minimal device to serve.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from virtio.device import VirtioDevice
from virtio.errors import DeviceUsageError
from virtio.memory import FdRegion, MmapGuestMemory
from virtio.queues.chain import DescriptorChain
from virtio.spec.features import TransportFeature as TF
from virtio.spec.ids import DeviceId
from virtio.testing.driver import DriverQueue, UsedBuffer, footprint

if TYPE_CHECKING:
    from virtio.transport.vhost_user.server import VhostUserServer
from virtio.transport.vhost_user.frontend import (
    Ack,
    BackendDisconnected,
    Expect,
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
    ConfigSpace,
    FrontendRequest,
    InflightDescription,
    MemoryRegion,
    MemoryTable,
    SingleMemoryRegion,
    VringAddr,
    VringFd,
    VringState,
)
from virtio.transport.vhost_user.protocol import NEED_DATA, ConnectionClosed, Outgoing
from virtio.transport.vhost_user.server import recv_with_fds, send_with_fds

R = FrontendRequest
USER_BASE = 0x7F00_0000_0000
"""Where ``GuestRam`` pretends the front-end mapped guest RAM."""


def _name(request: int) -> str:
    try:
        return R(request).name
    except ValueError:
        return f"request {request}"


class GuestRam:
    """Guest RAM as the front-end has it: memfd regions, guest and user addresses.

    ``regions``: ``[(guest_addr, size), ...]`` (default one region at 0).
    ``memory`` is the front-end's own mapping (write rings and buffers through it).
    """

    def __init__(
        self,
        size: int = 0,
        *,
        regions: Sequence[tuple[int, int]] = (),
        user_base: int = USER_BASE,
    ) -> None:
        spec = list(regions) or [(0, size)]
        self.fds: list[int] = []
        fr = []
        for gpa, n in spec:
            fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
            os.ftruncate(fd, n)
            self.fds.append(fd)
            fr.append(FdRegion(gpa, n, fd, 0, user_base + gpa))
        self.memory = MmapGuestMemory(fr)
        self.user_base = user_base

    def table(self) -> MemoryTable:
        return MemoryTable(
            tuple(MemoryRegion(r.guest_addr, r.size, r.user_addr, 0) for r in self.memory.regions)
        )

    def user_addr(self, gpa: int) -> int:
        r = self.memory.region_at(gpa)
        return r.user_addr + (gpa - r.guest_addr)

    def close(self) -> None:
        self.memory.close()
        for fd in self.fds:
            os.close(fd)
        self.fds = []


@dataclass(eq=False)
class FrontendVring:
    """One vring from the front-end's side: the driver queue and its eventfds."""

    index: int
    driver: DriverQueue
    kick_fd: int
    call_fd: int
    err_fd: int

    def kick(self) -> None:
        os.eventfd_write(self.kick_fd, 1)

    def publish_and_kick(self) -> bool:
        """Publish added buffers; kick if the device asked for it.  Returns whether."""
        need = self.driver.publish()
        if need:
            self.kick()
        return need

    async def wait_call(self, timeout: float = 5.0) -> None:
        with trio.fail_after(timeout):
            await trio.lowlevel.wait_readable(self.call_fd)
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.call_fd)

    def error_signalled(self) -> bool:
        try:
            return os.eventfd_read(self.err_fd) > 0
        except BlockingIOError:
            return False

    async def wait_used(self, count: int = 1, timeout: float = 5.0) -> list[UsedBuffer]:
        """Wait (via the call eventfd) until ``count`` buffers came back."""
        out: list[UsedBuffer] = []
        with trio.fail_after(timeout):
            while True:
                out += self.driver.get_used()
                if len(out) >= count:
                    return out
                self.driver.set_interrupts(True)
                out += self.driver.get_used()
                if len(out) >= count:
                    return out
                with trio.move_on_after(0.05):  # tolerate a back-end that suppresses
                    await self.wait_call(timeout)

    def close(self) -> None:
        for fd in (self.kick_fd, self.call_fd, self.err_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


class VhostUserFrontend:
    """The front-end end of a vhost-user connection (a connected unix socket): a trio
    I/O wrapper over the sans-IO ``FrontendConnection``, which checks every reply."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.conn = FrontendConnection(name="back-end")
        self.features = 0
        self.vrings: dict[int, FrontendVring] = {}

    @classmethod
    async def connect(cls, path: str | os.PathLike[str]) -> VhostUserFrontend:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.connect(os.fspath(path))
        return cls(sock)

    @property
    def protocol_features(self) -> int:
        return self.conn.protocol_features

    @property
    def reply_ack(self) -> bool:
        return self.conn.reply_ack

    # ------------------------------------------------------------------ raw messages

    async def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Any bytes, any fds (hostile tests); ``recv_reply`` reads an answer."""
        await send_with_fds(self.sock, Outgoing(data, list(fds)))

    async def send(
        self,
        request: int,
        payload: object = None,
        fds: Sequence[int] = (),
        *,
        need_reply: bool = False,
    ) -> None:
        out = self.conn.send_request(request, payload, fds, need_reply=need_reply)
        await send_with_fds(self.sock, out)

    async def next_event(self) -> Response | Ack:
        """The next (checked) reply; ``BackendDisconnected`` at end of file."""
        while (event := self.conn.next_event()) is NEED_DATA:
            data, fds = await recv_with_fds(self.sock)
            self.conn.receive_data(data, fds)
        if isinstance(event, ConnectionClosed):
            raise BackendDisconnected("the back-end closed the connection")
        return event

    async def recv_reply(self, request: int) -> tuple[bytes, list[int]]:
        """The reply to ``request`` (sent by ``send`` or ``send_raw``): payload and fds
        (an ack comes back as its u64 payload)."""
        pending = self.conn.pending_replies
        if not pending or pending[0].request != request:
            self.conn.expect_reply(request)
        event = await self.next_event()
        if isinstance(event, Ack):
            return U64(event.status).pack(), []
        return event.payload, list(event.fds)

    async def expect_closed(self, timeout: float = 5.0) -> None:
        """Wait until the back-end closes the connection (raise if it sends anything)."""
        with trio.fail_after(timeout):
            data = await self.sock.recv(4096)
        if data:
            raise FrontendError(f"expected the back-end to close, got {data!r}")

    # ------------------------------------------------------------------ requests

    async def request(
        self,
        request: int,
        payload: object = None,
        fds: Sequence[int] = (),
        *,
        reply: bool = False,
        need_reply: bool = False,
    ) -> bytes | None:
        """Send a request; return its explicit reply payload (``reply``: the request has
        one), or check the REPLY_ACK (``need_reply``: ``RequestFailed`` on failure)."""
        await self.send(request, payload, fds, need_reply=need_reply)
        pending = self.conn.pending_replies
        if reply and not (pending and pending[-1].expect is Expect.EXPLICIT):
            raise DeviceUsageError(f"{_name(request)} has no explicit reply")
        if not pending:
            return None
        event = await self.next_event()
        if isinstance(event, Ack):
            if not event.ok:
                raise RequestFailed(f"{_name(request)} failed (status {event.status})")
            return None
        for fd in event.fds:
            os.close(fd)
        return event.payload

    async def get_u64(self, request: int) -> int:
        data = await self.request(request, reply=True)
        assert data is not None  # 8 bytes: checked by the connection
        return U64.unpack(data).value

    async def negotiate(
        self,
        *,
        features: int | None = None,
        protocol_features: int | None = None,
        packed: bool = False,
    ) -> None:
        """GET/SET_FEATURES and GET/SET_PROTOCOL_FEATURES, then SET_OWNER."""
        offered = await self.get_u64(R.GET_FEATURES)
        if offered >> VHOST_USER_F_PROTOCOL_FEATURES & 1:
            pf = await self.get_u64(R.GET_PROTOCOL_FEATURES)
            wanted = pf if protocol_features is None else protocol_features & pf
            await self.request(R.SET_PROTOCOL_FEATURES, wanted)
        await self.request(R.SET_OWNER)
        if features is None:
            features = offered & ~(1 << VHOST_F_LOG_ALL)
            if not packed:
                features &= ~TF.VIRTIO_F_RING_PACKED.mask
        self.features = features
        await self.request(R.SET_FEATURES, features, need_reply=self.reply_ack)

    async def set_mem_table(self, ram: GuestRam) -> None:
        await self.request(R.SET_MEM_TABLE, ram.table(), ram.fds, need_reply=self.reply_ack)

    async def add_mem_reg(self, region: MemoryRegion, fd: int) -> None:
        await self.request(
            R.ADD_MEM_REG, SingleMemoryRegion(region), [fd], need_reply=self.reply_ack
        )

    async def setup_vring(
        self,
        index: int,
        ram: GuestRam,
        *,
        size: int = 64,
        offset: int = 0,
        vring_base: int | None = None,
        data_size: int = 1 << 20,
        enable: bool = True,
        driver: DriverQueue | None = None,
    ) -> FrontendVring:
        """SET_VRING_NUM/BASE/ADDR/KICK/CALL/ERR (+ ENABLE) for a new ``DriverQueue``
        placed at guest address ``offset`` (or for ``driver``, an existing one: a
        reconnect).  ``vring_base`` is the SET_VRING_BASE value (default: a fresh ring,
        0, or for packed rings both wrap counters set, as QEMU sends).  The driver queue
        uses this front-end's negotiated EVENT_IDX / INDIRECT / RING_PACKED bits."""
        f = self.features
        if driver is None:
            driver = DriverQueue(
                ram.memory,
                size,
                base=offset,
                packed=bool(f & TF.VIRTIO_F_RING_PACKED.mask),
                event_idx=bool(f & TF.VIRTIO_F_EVENT_IDX.mask),
                indirect=bool(f & TF.VIRTIO_F_INDIRECT_DESC.mask),
                data_size=data_size,
            )
        ack = self.reply_ack
        if vring_base is None:
            vring_base = VringState.packed_num(0, True, 0, True) if driver.packed else 0
        await self.request(R.SET_VRING_NUM, VringState(index, driver.size), need_reply=ack)
        await self.request(R.SET_VRING_BASE, VringState(index, vring_base), need_reply=ack)
        await self.set_vring_addr(index, ram, driver)
        kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        err = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        vring = FrontendVring(index, driver, kick, call, err)
        self.vrings[index] = vring
        await self.request(R.SET_VRING_CALL, VringFd(index), [call], need_reply=ack)
        await self.request(R.SET_VRING_ERR, VringFd(index), [err], need_reply=ack)
        await self.request(R.SET_VRING_KICK, VringFd(index), [kick], need_reply=ack)
        if enable:
            await self.request(R.SET_VRING_ENABLE, VringState(index, 1), need_reply=ack)
        return vring

    async def set_vring_addr(
        self, index: int, ram: GuestRam, driver: DriverQueue, *, flags: int = 0, log: int = 0
    ) -> None:
        addr = VringAddr(
            index,
            flags,
            ram.user_addr(driver.desc_addr),
            ram.user_addr(driver.device_addr),
            ram.user_addr(driver.driver_addr),
            log,
        )
        await self.request(R.SET_VRING_ADDR, addr, need_reply=self.reply_ack)

    async def get_vring_base(self, index: int) -> int:
        data = await self.request(R.GET_VRING_BASE, VringState(index, 0), reply=True)
        assert data is not None
        return VringState.unpack(data).num

    async def get_config(self, offset: int, size: int) -> bytes:
        data = await self.request(R.GET_CONFIG, ConfigSpace(offset, 0, bytes(size)), reply=True)
        return data[CONFIG_HEADER_SIZE:] if data else b""  # empty: the back-end failed

    async def get_inflight_fd(self, num_queues: int, queue_size: int) -> tuple[int, int]:
        """GET_INFLIGHT_FD: (fd, mmap_size); the fd is the caller's."""
        await self.send(R.GET_INFLIGHT_FD, InflightDescription(0, 0, num_queues, queue_size))
        data, fds = await self.recv_reply(R.GET_INFLIGHT_FD)
        desc = InflightDescription.unpack(data)
        if len(fds) != 1:  # at most 1: checked by the connection
            raise InvalidReply(f"GET_INFLIGHT_FD reply with {len(fds)} fds")
        return fds[0], desc.mmap_size

    async def set_inflight_fd(self, fd: int, mmap_size: int, num_queues: int, qsize: int) -> None:
        await self.request(
            R.SET_INFLIGHT_FD,
            InflightDescription(mmap_size, 0, num_queues, qsize),
            [fd],
            need_reply=self.reply_ack,
        )

    async def aclose(self) -> None:
        for vring in self.vrings.values():
            vring.close()
        self.vrings.clear()
        self.conn.close()
        self.sock.close()


def footprint_for(size: int, data_size: int, *, packed: bool = False) -> int:
    """Bytes of guest RAM one ``setup_vring`` queue needs (rings + data area)."""
    return footprint(size, packed=packed) + data_size + 64


class EchoDevice(VirtioDevice):
    """A minimal device for transport tests: copies each chain's readable bytes
    (reversed) into its writable part and returns the count.  ``delay`` makes every
    request take that long (requests in flight); ``gate`` (a ``trio.Event``), if set,
    holds every request until it is set; ``hold`` holds chosen requests forever."""

    device_id = DeviceId.VIRTIO_ID_CONSOLE

    def __init__(
        self, num_queues: int = 1, queue_size: int = 256, config: bytes = bytes(range(16))
    ) -> None:
        super().__init__()
        self.queue_max_sizes = (queue_size,) * num_queues
        self.config = bytearray(config)
        self.delay = 0.0
        self.gate: trio.Event | None = None
        self.hold: set[bytes] = set()
        """Requests whose readable bytes are in ``hold`` never complete (until cancelled)."""
        self.handled = 0
        self.resets = 0

    def config_bytes(self) -> bytes:
        return bytes(self.config)

    def write_config(self, offset: int, data: bytes) -> None:
        self.config[offset : offset + len(data)] = data

    def reset(self) -> None:
        super().reset()
        self.resets += 1

    async def handle(self, queue_index: int, chain: DescriptorChain) -> int:
        data = chain.reader().read()
        if data in self.hold:
            await trio.sleep_forever()
        if self.gate is not None:
            await self.gate.wait()
        if self.delay:
            await trio.sleep(self.delay)
        self.handled += 1
        return chain.writer().write(data[::-1][: chain.writable_len])


@contextlib.asynccontextmanager
async def connected(
    server: VhostUserServer, nursery: trio.Nursery
) -> AsyncIterator[VhostUserFrontend]:
    """A front-end connected to ``server`` over a socketpair, served in ``nursery``;
    on exit the front-end closes and the server's side of the connection must end
    within 10 s."""
    a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    done = trio.Event()

    async def serve() -> None:
        try:
            await server.serve_connection(b)
        finally:
            done.set()

    nursery.start_soon(serve)
    fe = VhostUserFrontend(a)
    try:
        yield fe
    finally:
        await fe.aclose()
        with trio.fail_after(10):
            await done.wait()


@contextlib.asynccontextmanager
async def serve_device(
    device: VirtioDevice, ram_size: int, *, timeout: float = 30
) -> AsyncIterator[tuple[VhostUserServer, VhostUserFrontend, GuestRam]]:
    """``device`` behind a ``VhostUserServer``, and a front-end connected to it:
    features negotiated, guest RAM of ``ram_size`` bytes in the memory table.  The
    whole exchange must end within ``timeout`` s; the RAM is closed on exit (the
    device is the caller's)."""
    from virtio.transport.vhost_user.server import VhostUserServer

    server = VhostUserServer(device)
    ram = GuestRam(ram_size)
    try:
        with trio.fail_after(timeout):
            async with trio.open_nursery() as nursery, connected(server, nursery) as fe:
                await fe.negotiate()
                await fe.set_mem_table(ram)
                yield server, fe, ram
    finally:
        ram.close()
