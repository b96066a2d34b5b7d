"""vhost-user requests -> a ``VirtioDevice``: features, memory, rings, config, inflight.

``VhostUserHandler`` is the layer between the sans-IO ``BackendConnection`` (which
has already checked sizes, fd counts and feature gating) and a ``VirtioDevice``.
It owns everything that needs the device or guest memory; ``server.py`` owns the
socket.  One handler serves one front-end connection; the device outlives it.

Rings (vhost-user "Ring states").  A ring is *started* by SET_VRING_KICK (an eventfd,
or the NOFD bit: polling) and *stopped* by GET_VRING_BASE.  With
``VHOST_USER_F_PROTOCOL_FEATURES`` acked it starts disabled until SET_VRING_ENABLE 1;
without, it is enabled as soon as it starts.  A ring is *served* while it is started,
enabled, has a size, addresses and guest memory, and is not broken: the handler
builds a ``Virtqueue`` (``Virtqueue.restore`` from a ``QueueState``: the ring
addresses translated from front-end user addresses with ``user_to_guest``, next
avail from SET_VRING_BASE, the used index read from the used ring) and runs
``device.serve_queue(active, index)`` for it in its own cancel scope.

Pausing a ring (GET_VRING_BASE, SET_VRING_ENABLE 0, a new memory table or ring
address while it runs) *drains* it: the queue stops handing out chains, in-flight
chains complete (up to ``drain_timeout`` s), then its scope is cancelled and its
state saved, so the reported base counts only chains that were returned.

Resets.  SET_STATUS 0 (QEMU 7.2 sends it when it stops the device) stops every
ring and resets the device but keeps the rings' configuration and base, so the
GET_VRING_BASEs around it answer correctly; a new SET_VRING_KICK restarts a ring.
RESET_DEVICE and the end of the connection forget everything (``reset``).
Packed rings are served and their base reported (avail | wrap << 15, used | wrap
<< 31).

Inflight tracking (``inflight.py``): with INFLIGHT_SHMFD every ring records what it
popped and used in the shared area (split: heads; packed: copies of the chains'
ring descriptors, marked by the queue core).  When a ring starts on an area that
was used before (a restarted back-end), the requests still in flight are resubmitted
to ``device.handle`` in pop order ("resumed N in-flight request(s)" once done), and
the next available position becomes the used position + what was in flight (the
SET_VRING_BASE value is ignored, as libvhost-user does; for packed rings QEMU's
value is stale after a crash anyway).

Errors.  A request the handler cannot honour (overlapping memory regions, a ring
outside guest memory, a config access out of bounds) raises a
``VhostUserProtocolError``; ``handle`` logs it (naming the error type), marks the
device NEEDS_RESET and answers failure if the protocol has a way to (REPLY_ACK, an
empty GET_CONFIG, a non-zero status); when a reply is owed that cannot say
"failed", ``handle`` returns ``None`` and the server closes the connection.  A
``DriverError`` from the device or a queue (``ActiveDevice.on_driver_error``)
is logged, sets NEEDS_RESET (GET_STATUS shows it), signals the ring's error eventfd
and stops that ring; other rings and the connection go on.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import mmap
import os
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from virtio.device import ActiveDevice, VirtioDevice
from virtio.errors import BackendIOError, DriverError, GuestMemoryError
from virtio.memory import FdRegion, MmapGuestMemory
from virtio.queues.chain import DescriptorChain
from virtio.queues.state import QueueState
from virtio.queues.virtqueue import Virtqueue
from virtio.spec.features import TransportFeature as TF
from virtio.spec.ring import VRING_PACKED_DESC_EVENT_SIZE, split_ring_sizes
from virtio.spec.status import DeviceStatus

from .errors import InvalidMessage, request_section
from .inflight import InflightArea, PackedInflightQueue, PackedRecovery, SplitInflightQueue
from .messages import (
    STATUS_REPLIES,
    U64,
    VHOST_F_LOG_ALL,
    VHOST_USER_F_PROTOCOL_FEATURES,
    ConfigSpace,
    FrontendRequest,
    InflightDescription,
    LogDescription,
    MacAddress,
    MemoryRegion,
    MemoryTable,
    ProtocolFeature,
    SingleMemoryRegion,
    VringAddr,
    VringFd,
    VringState,
    config_change_msg,
    protocol_feature_mask,
)
from .protocol import BackendConnection, Outgoing, Reply, Request

log = logging.getLogger(__name__)

_P = ProtocolFeature
OFFERED_PROTOCOL_FEATURES = protocol_feature_mask(
    _P.MQ,
    _P.LOG_SHMFD,
    _P.REPLY_ACK,
    _P.BACKEND_REQ,
    _P.CONFIG,
    _P.CONFIGURE_MEM_SLOTS,
    _P.INFLIGHT_SHMFD,
    _P.RESET_DEVICE,
    _P.STATUS,
)
"""Protocol features this back-end offers (GET_PROTOCOL_FEATURES)."""
TRANSPORT_FEATURES = 1 << VHOST_USER_F_PROTOCOL_FEATURES | 1 << VHOST_F_LOG_ALL
"""vhost-user bits in GET_FEATURES that are not the device's (stripped before ack)."""
MAX_MEM_SLOTS = 32
POLL_INTERVAL = 0.002
"""Seconds between polls of a ring whose kick came with the NOFD bit."""

_R = FrontendRequest


def _section(request: FrontendRequest) -> str:
    return request_section(request.name)


def _close(fd: int | None) -> None:
    if fd is not None and fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)


class EventfdNotifier:
    """``QueueNotifier`` over a ring's kick and call eventfds.

    No kick fd (NOFD bit): ``wait_kick`` polls every ``POLL_INTERVAL`` s.  No call fd:
    used-buffer notifications are dropped (the front-end polls).  ``stopping``
    makes ``wait_kick`` sleep until the ring's scope is cancelled (draining).
    """

    def __init__(self) -> None:
        self.kick_fd: int | None = None
        self.call_fd: int | None = None
        self.stopping = False
        self.poll_fallback = False
        self.kicks = 0
        self.calls = 0
        self.listeners: list[Callable[[], None]] = []
        """Called when the kick or call fd changes, before the old one is closed
        (a native data plane polls these fds itself)."""

    def drain(self) -> None:
        """Consume a pending kick (one from before the ring started: QEMU creates
        the eventfd signalled); the caller looks at the ring next."""
        fd = self.kick_fd
        if fd is not None:
            with contextlib.suppress(BlockingIOError, OSError):
                os.eventfd_read(fd)

    async def wait_kick(self) -> None:
        if self.stopping:
            await trio.sleep_forever()
        fd = self.kick_fd
        if fd is None:
            await trio.sleep(POLL_INTERVAL)
            return
        try:
            await trio.lowlevel.wait_readable(fd)
        except trio.ClosedResourceError:
            return  # the fd was replaced: the caller re-checks the ring
        except OSError as exc:  # not pollable (a regular file): degrade to polling
            if not self.poll_fallback:
                log.error("kick fd %d cannot be waited on (%s): polling instead", fd, exc)
                self.poll_fallback = True
            await trio.sleep(POLL_INTERVAL)
            return
        with contextlib.suppress(BlockingIOError, OSError):
            os.eventfd_read(fd)
        self.kicks += 1

    def notify_used(self) -> None:
        fd = self.call_fd
        if fd is not None:
            with contextlib.suppress(BlockingIOError, OSError):
                os.eventfd_write(fd, 1)
            self.calls += 1

    def set_kick(self, fd: int | None) -> None:
        old, self.kick_fd = self.kick_fd, fd
        if fd is not None:
            with contextlib.suppress(OSError):
                os.set_blocking(fd, False)
        for listener in list(self.listeners):
            listener()
        if old is not None and old != fd:
            trio.lowlevel.notify_closing(old)
            _close(old)

    def set_call(self, fd: int | None) -> None:
        old, self.call_fd = self.call_fd, fd
        for listener in list(self.listeners):
            listener()
        if old is not None and old != fd:
            _close(old)

    def close(self) -> None:
        self.set_kick(None)
        self.set_call(None)


class _RingQueue(Virtqueue):
    """A ``Virtqueue`` that stops handing out chains once ``stopping`` is set."""

    stopping = False

    def pop(self) -> DescriptorChain | None:
        return None if self.stopping else super().pop()

    def pop_batch(self, max_chains: int = Virtqueue.BATCH) -> list[DescriptorChain]:
        return [] if self.stopping else super().pop_batch(max_chains)

    def enable_notification(self) -> bool:
        return False if self.stopping else super().enable_notification()

    def has_available(self) -> bool:
        return False if self.stopping else super().has_available()

    def available_chains(self, limit: int) -> int:
        return 0 if self.stopping else super().available_chains(limit)

    def enable_notification_after(self, skip: int) -> bool:
        return False if self.stopping else super().enable_notification_after(skip)


class _Tracker:
    """``InflightTracker``: counts chains in flight and forwards to the shared area."""

    def __init__(self, area: SplitInflightQueue | None) -> None:
        self.area = area
        self.outstanding = 0
        self.popped = 0
        self._idle: trio.Event | None = None

    def on_pop(self, chains) -> None:
        self.outstanding += len(chains)
        self.popped += len(chains)
        if self.area is not None:
            self.area.on_pop(chains)

    def on_used(self, chains, used_idx: int) -> None:
        self.outstanding -= len(chains)
        if self.area is not None:
            self.area.on_used(chains, used_idx)
        if self.outstanding <= 0 and self._idle is not None:
            self._idle.set()

    def on_give_back(self, chains, used_idx: int) -> None:
        """Chains popped and returned to the ring unused (``Virtqueue.give_back``):
        no longer in flight, nor counted as served."""
        self.outstanding -= len(chains)
        self.popped -= len(chains)
        if self.area is not None:
            self.area.on_used(chains, used_idx)
        if self.outstanding <= 0 and self._idle is not None:
            self._idle.set()

    async def wait_idle(self) -> None:
        while self.outstanding > 0:
            self._idle = trio.Event()
            await self._idle.wait()


@dataclass(eq=False)
class Vring:
    """What the front-end told us about one ring, and its running queue if any."""

    index: int
    num: int = 0
    addr: VringAddr | None = None
    base: int = 0
    started: bool = False
    """SET_VRING_KICK received since the last GET_VRING_BASE."""
    enabled: bool = False
    broken: bool = False
    notifier: EventfdNotifier = field(default_factory=EventfdNotifier)
    err_fd: int | None = None
    queue: _RingQueue | None = None
    recovered: bool = False
    """The ring was rebuilt from an inflight area another back-end left (reconnect)."""
    tracker: _Tracker | None = None
    scope: trio.CancelScope | None = None
    done: trio.Event | None = None
    requests: int = 0
    """Chains popped by earlier runs of this ring (``requests_served`` adds the current)."""

    @property
    def requests_served(self) -> int:
        popped = self.tracker.popped if self.tracker is not None else 0
        if self.queue is not None:  # a native data plane pops without the tracker
            popped = max(popped, self.queue.statistics().popped)
        return self.requests + popped

    @property
    def running(self) -> bool:
        return self.queue is not None


class VhostUserHandler:
    """Serve ``device`` to the front-end on ``conn``; ring tasks run in ``nursery``."""

    def __init__(
        self,
        device: VirtioDevice,
        conn: BackendConnection,
        nursery: trio.Nursery,
        *,
        max_mem_slots: int = MAX_MEM_SLOTS,
        drain_timeout: float = 5.0,
        name: str = "vhost-user",
    ) -> None:
        self.device = device
        self.conn = conn
        self.nursery = nursery
        self.max_mem_slots = max_mem_slots
        self.drain_timeout = drain_timeout
        self.name = name
        self.offered_features = device.offered_features() | TRANSPORT_FEATURES
        conn.offered_features = self.offered_features
        self.offered_protocol_features = OFFERED_PROTOCOL_FEATURES
        if callable(getattr(device, "send_rarp", None)):  # virtio-net: migration announce
            self.offered_protocol_features |= protocol_feature_mask(_P.RARP)
        conn.offered_protocol_features = self.offered_protocol_features
        if conn.max_queues is None:
            conn.max_queues = device.num_queues
        self.features: int | None = None
        self.status = 0
        self.needs_reset = False
        self.memory: MmapGuestMemory | None = None
        self._regions: list[tuple[MemoryRegion, int]] = []
        self._region_refs: dict[tuple[int, int, int, int], int] = {}
        """ADD_MEM_REGs of a region beyond the first (``_on_add_mem_reg``)."""
        self.vrings = [Vring(i) for i in range(device.num_queues)]
        self.inflight: InflightArea | None = None
        self.backend_fd: int | None = None
        self._log_map: mmap.mmap | None = None
        self._log_view: memoryview | None = None
        self.driver_errors: list[DriverError] = []
        self.resubmitted = 0
        self._retired: dict[int, int] = {}

    def requests_per_vring(self) -> dict[int, int]:
        """Chains popped per vring index on this connection (statistics)."""
        out = dict(self._retired)
        for ring in self.vrings:
            out[ring.index] = out.get(ring.index, 0) + ring.requests_served
        return out

    # ------------------------------------------------------------------ dispatch

    async def handle(self, req: Request) -> Outgoing | None:
        """Carry out ``req``; the reply to send (``None``: close the connection)."""
        kept: list[int] = []
        self.last_request = req.request
        method = getattr(self, "_on_" + req.request.name.lower(), None)
        try:
            if method is None:
                raise InvalidMessage(
                    f"{req.request.name} is not supported by this back-end",
                    request=req.request,
                    section=req.request.section,
                )
            result = await method(req, kept)
        except (DriverError, GuestMemoryError) as exc:
            log.error(
                "%s: %s rejected: %s: %s", self.name, req.request.name, type(exc).__name__, exc
            )
            self.needs_reset = True
            return self._failure(req)
        finally:
            for fd in req.fds:
                if fd not in kept:
                    _close(fd)
        if req.reply is Reply.EXPLICIT:
            payload, fds = result if isinstance(result, tuple) else (result, ())
            return self.conn.send_reply(req, payload, fds)
        return self.conn.ack(req, True)

    def _failure(self, req: Request) -> Outgoing | None:
        if req.reply is Reply.NONE:
            return Outgoing(b"", [])
        if req.reply is Reply.ACK:
            return self.conn.ack(req, False)
        if req.request is _R.GET_CONFIG:
            return self.conn.send_reply(req, b"")
        if req.request is _R.GET_INFLIGHT_FD:
            assert isinstance(req.payload, InflightDescription)
            p = req.payload
            return self.conn.send_reply(req, InflightDescription(0, 0, p.num_queues, p.queue_size))
        if req.request in STATUS_REPLIES:
            return self.conn.send_reply(req, 1)
        return None

    last_request: FrontendRequest | None = None
    """The most recent request handled (diagnostics: why did the front-end leave?)."""

    def hint_on_close(self) -> str | None:
        """What a front-end that left during bring-up most likely disliked, or None."""
        if self.memory is not None or self.last_request is not _R.GET_QUEUE_NUM:
            return None
        return (
            f"the front-end left right after GET_QUEUE_NUM (we offer "
            f"{self.device.num_queues} queue(s)): if it wants more (QEMU's "
            f"vhost-user-blk-pci asks for one per vCPU unless num-queues is set), "
            f"start the back-end with --num-queues N or set num-queues on the device"
        )

    def _bad(self, req: Request, message: str) -> InvalidMessage:
        return InvalidMessage(
            f"{req.request.name}: {message}", request=req.request, section=req.request.section
        )

    # ------------------------------------------------------------------ features

    @property
    def protocol_features_acked(self) -> bool:
        if self.features is None:
            return True  # we offer bit 30; QEMU acks it in SET_FEATURES
        return bool(self.features >> VHOST_USER_F_PROTOCOL_FEATURES & 1)

    @property
    def logging(self) -> bool:
        return self.features is not None and bool(self.features >> VHOST_F_LOG_ALL & 1)

    async def _on_get_features(self, req: Request, kept: list[int]) -> int:
        return self.offered_features

    async def _on_set_features(self, req: Request, kept: list[int]) -> None:
        assert isinstance(req.payload, U64)
        value = req.payload.value
        extra = value & ~self.offered_features
        if extra:
            raise self._bad(req, f"feature bits {extra:#x} were not offered")
        device_bits = value & ~TRANSPORT_FEATURES
        if self.features is None or device_bits != self.features & ~TRANSPORT_FEATURES:
            self.device.ack_features(device_bits)  # not again for a LOG_ALL toggle
        self.features = value
        self._apply_log()
        for ring in self.vrings:
            self._maybe_start(ring)

    async def _on_get_protocol_features(self, req: Request, kept: list[int]) -> int:
        return self.offered_protocol_features

    async def _on_set_protocol_features(self, req: Request, kept: list[int]) -> None:
        pass  # the connection recorded them

    async def _on_set_owner(self, req: Request, kept: list[int]) -> None:
        pass

    async def _on_reset_owner(self, req: Request, kept: list[int]) -> None:
        # Deprecated; "back-ends either ignore this message, or use it to disable all rings".
        for ring in self.vrings:
            await self._pause(ring)
            ring.started = False

    async def _on_get_queue_num(self, req: Request, kept: list[int]) -> int:
        return self.device.num_queues

    # ------------------------------------------------------------------ memory

    async def _on_get_max_mem_slots(self, req: Request, kept: list[int]) -> int:
        return self.max_mem_slots

    async def _on_set_mem_table(self, req: Request, kept: list[int]) -> None:
        assert isinstance(req.payload, MemoryTable)
        if req.payload.num_regions == 0:
            raise self._bad(req, "empty memory table")
        self._region_refs.clear()
        await self._set_regions(req, list(zip(req.payload.regions, req.fds, strict=True)), kept)

    @staticmethod
    def _region_key(r: MemoryRegion) -> tuple[int, int, int, int]:
        return (r.guest_address, r.user_address, r.size, r.mmap_offset)

    async def _on_add_mem_reg(self, req: Request, kept: list[int]) -> None:
        assert isinstance(req.payload, SingleMemoryRegion)
        key = self._region_key(req.payload.region)
        if any(self._region_key(have) == key for have, _ in self._regions):
            # QEMU 7.2's vhost-user-net sends every ADD_MEM_REG (and REM_MEM_REG) once
            # per queue pair (one vhost_dev each): the same region again is counted,
            # not mapped twice, and stays until removed as often as it was added.
            self._region_refs[key] = self._region_refs.get(key, 1) + 1
            return
        if len(self._regions) >= self.max_mem_slots:
            raise self._bad(req, f"all {self.max_mem_slots} memory slots are in use")
        await self._set_regions(req, [*self._regions, (req.payload.region, req.fds[0])], kept)

    async def _on_rem_mem_reg(self, req: Request, kept: list[int]) -> None:
        assert isinstance(req.payload, SingleMemoryRegion)
        r = req.payload.region
        key = self._region_key(r)
        refs = self._region_refs.pop(key, 1)
        if refs > 1:
            if refs > 2:
                self._region_refs[key] = refs - 1
            return
        for i, (have, _fd) in enumerate(self._regions):
            if (have.guest_address, have.user_address, have.size) == (
                r.guest_address,
                r.user_address,
                r.size,
            ):
                await self._set_regions(req, self._regions[:i] + self._regions[i + 1 :], kept)
                return
        raise self._bad(
            req,
            f"no region at guest {r.guest_address:#x} user {r.user_address:#x} size {r.size:#x}",
        )

    async def _set_regions(
        self, req: Request, regions: list[tuple[MemoryRegion, int]], kept: list[int]
    ) -> None:
        """Validate ``regions`` and switch to them; running rings are re-pointed."""
        ordered = sorted(regions, key=lambda rf: rf[0].user_address)
        for (a, _), (b, _) in itertools.pairwise(ordered):
            if b.user_address < a.user_address + a.size:
                raise self._bad(req, f"user address ranges overlap at {b.user_address:#x}")
        for r, fd in regions:
            # A regular file (memfd) smaller than the region would map fine and SIGBUS
            # on the first access: refuse it here (MmapGuestMemory lets st_size 0 pass).
            try:
                st = os.fstat(fd)
            except OSError as exc:
                raise self._bad(req, f"region fd unusable: {exc}") from exc
            if stat.S_ISREG(st.st_mode) and st.st_size < r.mmap_offset + r.size:
                raise self._bad(
                    req,
                    f"region [{r.guest_address:#x}, +{r.size:#x}) at offset {r.mmap_offset:#x} "
                    f"is larger than the file that backs it ({st.st_size:#x} bytes)",
                )
        try:
            memory = MmapGuestMemory(
                FdRegion(r.guest_address, r.size, fd, r.mmap_offset, r.user_address)
                for r, fd in regions
            )
        except GuestMemoryError as exc:
            raise self._bad(req, str(exc)) from exc
        except (OSError, ValueError, OverflowError) as exc:
            raise self._bad(req, f"region cannot be mapped: {exc}") from exc
        running = [ring for ring in self.vrings if ring.running]
        for ring in running:
            await self._pause(ring)
        old, old_fds = self.memory, {fd for _, fd in self._regions}
        self.memory = memory
        self._regions = list(regions)
        new_fds = {fd for _, fd in regions}
        kept.extend(fd for fd in req.fds if fd in new_fds)
        self._apply_log()
        for ring in self.vrings:
            self._maybe_start(ring)
        if old is not None:
            _close_memory(old)
        for fd in old_fds - new_fds:
            _close(fd)

    # ------------------------------------------------------------------ dirty log

    async def _on_set_log_base(self, req: Request, kept: list[int]) -> int:
        assert isinstance(req.payload, LogDescription)
        d = req.payload
        if d.mmap_size == 0:
            raise self._bad(req, "log of size 0")
        try:
            st = os.fstat(req.fds[0])
        except OSError as exc:
            raise self._bad(req, f"log fd unusable: {exc}") from exc
        if stat.S_ISREG(st.st_mode) and st.st_size < d.mmap_offset + d.mmap_size:
            raise self._bad(req, f"log [{d.mmap_offset:#x}, +{d.mmap_size:#x}) beyond its file")
        try:
            m = mmap.mmap(
                req.fds[0],
                d.mmap_size,
                mmap.MAP_SHARED,
                mmap.PROT_READ | mmap.PROT_WRITE,
                offset=d.mmap_offset,
            )
        except (OSError, ValueError, OverflowError) as exc:
            raise self._bad(req, f"log cannot be mapped: {exc}") from exc
        self._drop_log()
        self._log_map = m
        self._log_view = memoryview(m)
        self._apply_log()
        return 0

    async def _on_set_log_fd(self, req: Request, kept: list[int]) -> None:
        pass  # optional; we never signal it (the fd is closed)

    def _apply_log(self) -> None:
        if self.memory is not None:
            view = self._log_view if self.logging else None
            if (view is None) != (not self.memory.logging):
                if view is not None:
                    log.info(
                        "%s: dirty page logging on (live migration): %d-byte log",
                        self.name,
                        len(view),
                    )
                else:
                    log.info("%s: dirty page logging off", self.name)
            self.memory.set_dirty_log(view)

    def _drop_log(self) -> None:
        if self.memory is not None:
            self.memory.set_dirty_log(None)
        if self._log_view is not None:
            self._log_view.release()
            self._log_view = None
        if self._log_map is not None:
            with contextlib.suppress(BufferError):
                self._log_map.close()
            self._log_map = None

    # ------------------------------------------------------------------ rings

    async def _on_set_vring_num(self, req: Request, kept: list[int]) -> None:
        assert isinstance(req.payload, VringState)
        ring = self.vrings[req.payload.index]
        num = req.payload.num
        limit = self.device.queue_max_sizes[ring.index]
        if num > limit:
            raise self._bad(req, f"vring {ring.index} size {num} above the device's {limit}")
        if not self._packed and num & (num - 1):
            raise self._bad(req, f"split vring size {num} is not a power of 2")
        if ring.running:
            raise self._bad(req, f"vring {ring.index} is running")
        ring.num = num

    async def _on_set_vring_addr(self, req: Request, kept: list[int]) -> None:
        assert isinstance(req.payload, VringAddr)
        ring = self.vrings[req.payload.index]
        if self.memory is None:
            # QEMU sends no memory table when guest RAM is not shareable: say so.
            raise self._bad(
                req,
                "ring addresses before any memory table: guest RAM is not shared with the "
                "back-end (QEMU: -object memory-backend-memfd,id=mem,size=...,share=on with "
                "-numa node,memdev=mem or -machine memory-backend=mem)",
            )
        self._translate(req.payload, ring.num or 1)  # raises if outside memory
        was_running = ring.running
        if was_running:
            await self._pause(ring)
        ring.addr = req.payload
        self._maybe_start(ring)

    async def _on_set_vring_base(self, req: Request, kept: list[int]) -> None:
        assert isinstance(req.payload, VringState)
        ring = self.vrings[req.payload.index]
        if ring.running:
            raise self._bad(req, f"vring {ring.index} is running")
        num = req.payload.num
        if self._packed:
            avail, _, used, _ = req.payload.packed_indices
            if ring.num and (avail >= ring.num or used >= ring.num):
                raise self._bad(req, f"packed indices {num:#x} outside the ring of {ring.num}")
        elif num > 0xFFFF:
            raise self._bad(req, f"split base {num:#x} is not a 16-bit index")
        ring.base = num

    async def _on_get_vring_base(self, req: Request, kept: list[int]) -> VringState:
        assert isinstance(req.payload, VringState)
        ring = self.vrings[req.payload.index]
        await self._pause(ring)
        ring.started = False
        ring.broken = False
        ring.notifier.close()
        stopped = getattr(self.device, "rings_stopped_for_migration", None)
        if stopped is not None and self.logging and not any(r.running for r in self.vrings):
            await stopped()  # a live migration's switch-over (blk: image lock hand-over)
        return VringState(ring.index, ring.base)

    async def _on_set_vring_kick(self, req: Request, kept: list[int]) -> None:
        assert isinstance(req.payload, VringFd)
        ring = self.vrings[req.payload.index]
        fd = None if req.payload.no_fd else req.fds[0]
        if fd is not None:
            kept.append(fd)
        ring.notifier.set_kick(fd)
        ring.started = True
        self._maybe_start(ring)

    async def _on_set_vring_call(self, req: Request, kept: list[int]) -> None:
        assert isinstance(req.payload, VringFd)
        fd = None if req.payload.no_fd else req.fds[0]
        if fd is not None:
            kept.append(fd)
        self.vrings[req.payload.index].notifier.set_call(fd)

    async def _on_set_vring_err(self, req: Request, kept: list[int]) -> None:
        assert isinstance(req.payload, VringFd)
        ring = self.vrings[req.payload.index]
        fd = None if req.payload.no_fd else req.fds[0]
        if fd is not None:
            kept.append(fd)
        old, ring.err_fd = ring.err_fd, fd
        _close(old)

    async def _on_set_vring_enable(self, req: Request, kept: list[int]) -> None:
        assert isinstance(req.payload, VringState)
        ring = self.vrings[req.payload.index]
        ring.enabled = bool(req.payload.num)
        if ring.enabled:
            self._maybe_start(ring)
        else:
            await self._pause(ring)

    @property
    def _packed(self) -> bool:
        return self.features is not None and bool(self.features & TF.VIRTIO_F_RING_PACKED.mask)

    def _translate(self, addr: VringAddr, num: int) -> tuple[int, int, int]:
        """Guest-physical (desc, driver, device) addresses; raises outside memory."""
        assert self.memory is not None
        if self._packed:
            sizes = (16 * num, VRING_PACKED_DESC_EVENT_SIZE, VRING_PACKED_DESC_EVENT_SIZE)
        else:
            event_idx = self.features is not None and bool(
                self.features & TF.VIRTIO_F_EVENT_IDX.mask
            )
            try:
                sizes = split_ring_sizes(num, event_idx)
            except ValueError as exc:
                raise InvalidMessage(str(exc), section=_section(_R.SET_VRING_NUM)) from exc
        out = []
        for what, uaddr, size in zip(
            ("descriptor table", "available ring", "used ring"),
            (addr.descriptor, addr.available, addr.used),
            sizes,
            strict=True,
        ):
            try:
                out.append(self.memory.user_to_guest(uaddr, size))
            except GuestMemoryError as exc:
                raise InvalidMessage(
                    f"vring {addr.index} {what} at user address {uaddr:#x} (+{size:#x}) is "
                    "outside guest memory",
                    request=_R.SET_VRING_ADDR,
                    section=_section(_R.SET_VRING_ADDR),
                ) from exc
        return out[0], out[1], out[2]

    def _ring_enabled(self, ring: Vring) -> bool:
        return ring.enabled or not self.protocol_features_acked

    def _maybe_start(self, ring: Vring) -> None:
        """Start serving ``ring`` if everything it needs is there."""
        if ring.running or ring.broken or not ring.started or not self._ring_enabled(ring):
            return
        if self.memory is None or ring.addr is None or not ring.num or self.features is None:
            return
        starting = getattr(self.device, "ring_starting", None)
        try:
            if starting is not None:  # blk: take the image lock (live migration)
                starting(ring.index)
        except BackendIOError as exc:
            self._ring_failed(ring, exc)
            return
        try:
            queue, tracker, resubmit = self._build_queue(ring)
        except (DriverError, GuestMemoryError) as exc:
            self._ring_failed(ring, exc)
            return
        ring.queue, ring.tracker = queue, tracker
        ring.scope = trio.CancelScope()
        ring.done = trio.Event()
        queue.stopping = False
        ring.notifier.stopping = False
        self.nursery.start_soon(self._run_ring, ring, queue, resubmit)

    def _build_queue(self, ring: Vring) -> tuple[_RingQueue, _Tracker, list[DescriptorChain]]:
        assert self.memory is not None and ring.addr is not None and self.features is not None
        features = self.features
        packed = self._packed
        desc, driver, device = self._translate(ring.addr, ring.num)
        if ring.addr.log_used and self.logging and ring.addr.log != device:
            log.warning(
                "%s: vring %d logs used-ring writes at %#x, the ring is at guest %#x",
                self.name,
                ring.index,
                ring.addr.log,
                device,
            )
        common = dict(
            size=ring.num,
            desc_addr=desc,
            driver_addr=driver,
            device_addr=device,
            packed=packed,
            event_idx=bool(features & TF.VIRTIO_F_EVENT_IDX.mask),
            indirect=bool(features & TF.VIRTIO_F_INDIRECT_DESC.mask),
        )
        area: SplitInflightQueue | None = None
        heads: list[int] = []
        packed_area: PackedInflightQueue | None = None
        recovered: PackedRecovery | None = None
        if packed:
            avail, avail_wrap, used, used_wrap = VringState(ring.index, ring.base).packed_indices
            if ring.base >> 16 == 0:
                # QEMU and DPDK's virtio-user send only the avail half (bits 0-15:
                # "last_avail_idx | wrap << 15"); a ring started there has nothing in
                # flight, so the used index and wrap counter are the avail ones.
                used, used_wrap = avail, avail_wrap
            packed_area = self._inflight_region(ring, packed=True)
            if packed_area is not None:
                if packed_area.version == 0:
                    packed_area.initialize(used, used_wrap)
                else:
                    # A restarted back-end: the region, not SET_VRING_BASE (QEMU's copy
                    # is stale after a crash), knows where the device was.
                    def slot_flags(i: int) -> int:
                        return self.memory.read_u16(desc + 16 * i + 14)  # type: ignore[union-attr]

                    recovered = packed_area.recover(slot_flags)
                    avail, avail_wrap = recovered.next_avail, recovered.avail_wrap
                    used, used_wrap = recovered.used_idx, recovered.used_wrap
                    ring.recovered = True
            state = QueueState(
                **common,
                next_avail=avail,
                avail_wrap=avail_wrap,
                next_used=used,
                used_wrap=used_wrap,
            )
        else:
            used_idx = self.memory.read_u16(device + 2)
            last_avail = ring.base & 0xFFFF
            area = self._inflight_region(ring, packed=False)
            if area is not None:
                if area.version == 0:
                    area.initialize(used_idx)
                else:
                    size = ring.num

                    def head_at(i: int) -> int:
                        return self.memory.read_u32(device + 4 + 8 * (i % size))  # type: ignore[union-attr]

                    heads = area.recover(used_idx, head_at)
                    last_avail = (used_idx + len(heads)) & 0xFFFF
                    ring.recovered = True
            state = QueueState(**common, last_avail_idx=last_avail, used_idx=used_idx)
        queue = _RingQueue.restore(self.memory, state, name=f"{self.name}/vq{ring.index}")
        if not heads:
            # The ring starts when the front-end says so, not when the driver does:
            # firmware's rings may be the OS's memory by now (Virtqueue.start_unproven).
            # A kick pending from before (QEMU creates the eventfd signalled) is covered
            # by the device's first look: only later kicks count (Virtqueue.kicked).
            queue.start_unproven()
            ring.notifier.drain()
        tracker = _Tracker(area)
        queue.inflight = tracker
        if packed_area is not None:
            packed_area.attach(queue)
        chains = []
        for head in heads:
            chains.append(queue.chain_at(head))
        if recovered is not None:
            heads = [buffer_id for buffer_id, _ in recovered.chains]
            for _, descs in recovered.chains:
                chains.append(queue.packed_chain_recorded(descs))
        tracker.outstanding += len(chains)
        if chains:
            log.info(
                "%s: vring %d: resubmitting %d in-flight request(s) (%s %s)",
                self.name,
                ring.index,
                len(chains),
                "buffer ids" if packed else "heads",
                heads,
            )
        return queue, tracker, chains

    def _inflight_region(
        self, ring: Vring, *, packed: bool
    ) -> SplitInflightQueue | PackedInflightQueue | None:
        """Ring ``ring``'s region of the inflight area, or None (no area, or the ring
        does not fit it: untracked, logged)."""
        if self.inflight is None or ring.index >= self.inflight.num_queues:
            return None
        if ring.num > self.inflight.queue_size:
            log.warning(
                "%s: vring %d of %d entries exceeds the inflight area's %d: untracked",
                self.name,
                ring.index,
                ring.num,
                self.inflight.queue_size,
            )
            return None
        if not packed:
            return self.inflight.queue(ring.index)
        region = self.inflight.packed_queue(ring.index)
        if region is None:
            log.warning(
                "%s: vring %d: the inflight area has no room for the packed layout "
                "(an older back-end made it): untracked",
                self.name,
                ring.index,
            )
        return region

    async def _run_ring(
        self, ring: Vring, queue: _RingQueue, resubmit: list[DescriptorChain]
    ) -> None:
        assert ring.scope is not None and ring.done is not None
        assert self.memory is not None and self.features is not None
        active = ActiveDevice(
            self.memory,
            self.features & ~TRANSPORT_FEATURES,
            {ring.index: queue},
            {ring.index: ring.notifier},
            on_driver_error=lambda exc: self._ring_failed(ring, exc),
            on_config_change=self.notify_config_change,
            on_needs_reset=self.device_needs_reset,
        )
        if ring.recovered:
            # Reconnect: the previous back-end may have died between publishing used
            # entries and signalling them, leaving the driver asleep with nothing left
            # to kick us for.  One call wakes it; spurious ones are allowed (the driver
            # MUST handle them, virtio 1.4 §2.7.7.1).
            ring.recovered = False
            ring.notifier.notify_used()
        try:
            with ring.scope:
                async with trio.open_nursery() as nursery:
                    if resubmit:
                        nursery.start_soon(self._resubmit_all, ring, queue, resubmit)
                    nursery.start_soon(self._guarded_serve, ring, active)
        except Exception as exc:
            # An error raised together with our own cancellation (a MultiError that
            # ``serve_queue`` and ``_guarded_serve`` cannot catch) comes out of the
            # scope once the Cancelled is filtered: same treatment.
            log.error(
                "%s: vring %d: %s while stopping: %s",
                self.name,
                ring.index,
                type(exc).__name__,
                exc,
            )
            self._ring_failed(ring, exc)
        finally:
            ring.done.set()

    async def _guarded_serve(self, ring: Vring, active: ActiveDevice) -> None:
        """``device.serve_queue``; an unexpected exception (a device bug, a failing
        storage backend) stops this ring, marks NEEDS_RESET and is logged: the
        process and the other rings go on."""
        try:
            await self.device.serve_queue(active, ring.index)
        except Exception as exc:
            log.exception("%s: vring %d: the device failed", self.name, ring.index)
            self._ring_failed(ring, exc)

    async def _resubmit_all(
        self, ring: Vring, queue: _RingQueue, chains: list[DescriptorChain]
    ) -> None:
        """Run the in-flight requests a previous back-end left, concurrently; one line
        once they all completed (vhost-user "Inflight I/O tracking")."""
        before = self.resubmitted
        async with trio.open_nursery() as nursery:
            for chain in chains:
                nursery.start_soon(self._resubmit, ring, queue, chain)
        log.info(
            "%s: vring %d: resumed %d in-flight request(s)",
            self.name,
            ring.index,
            self.resubmitted - before,
        )

    async def _resubmit(self, ring: Vring, queue: _RingQueue, chain: DescriptorChain) -> None:
        try:
            written = await self.device.handle(ring.index, chain)
            queue.add_used(chain, written)
            self.resubmitted += 1
            if queue.needs_notification():
                ring.notifier.notify_used()
        except DriverError as exc:
            self._ring_failed(ring, exc)
        except Exception as exc:
            log.exception("%s: vring %d: resubmission failed", self.name, ring.index)
            self._ring_failed(ring, exc)

    def _device_failed(self, exc: Exception, ring: Vring | None) -> None:
        where = f"vring {ring.index}" if ring is not None else "device"
        log.error(
            "%s: %s: %s %s: %s; device needs reset",
            self.name,
            where,
            "back-end error" if isinstance(exc, BackendIOError) else "driver error",
            type(exc).__name__,
            exc,
        )
        self.needs_reset = True
        if isinstance(exc, DriverError):
            self.driver_errors.append(exc)
        rings = [ring] if ring is not None else [r for r in self.vrings if r.running]
        for r in rings:
            if r.err_fd is not None:
                with contextlib.suppress(OSError):
                    os.eventfd_write(r.err_fd, 1)

    def _ring_failed(self, ring: Vring, exc: Exception) -> None:
        if isinstance(exc, GuestMemoryError):
            exc = InvalidMessage(str(exc), section=_section(_R.SET_VRING_ADDR))
        self._device_failed(exc, ring)
        ring.broken = True
        if ring.scope is not None:
            ring.scope.cancel()

    async def _pause(self, ring: Vring) -> None:
        """Stop serving ``ring``: drain in-flight chains, cancel, save its state in ``base``."""
        queue, tracker = ring.queue, ring.tracker
        if queue is None or tracker is None:
            return
        queue.stopping = True
        ring.notifier.stopping = True
        if not queue.broken and tracker.outstanding > 0:
            with trio.move_on_after(self.drain_timeout):
                await tracker.wait_idle()
            if tracker.outstanding > 0:
                log.warning(
                    "%s: vring %d: %d request(s) still in flight after %.1f s; cancelled",
                    self.name,
                    ring.index,
                    tracker.outstanding,
                    self.drain_timeout,
                )
        assert ring.scope is not None and ring.done is not None
        ring.scope.cancel()
        await ring.done.wait()
        st = queue.state()
        if st.packed:
            ring.base = VringState.packed_num(
                st.next_avail, st.avail_wrap, st.next_used, st.used_wrap
            )
        else:
            ring.base = st.last_avail_idx
        # the native data plane pops without the tracker: the queue counted them all
        ring.requests += max(tracker.popped, queue.statistics().popped)
        ring.queue = None
        ring.tracker = None
        ring.scope = None

    # ------------------------------------------------------------------ config

    def _config_range(self, req: Request) -> ConfigSpace:
        assert isinstance(req.payload, ConfigSpace)
        p = req.payload
        size = self.device.config_size
        if p.offset + p.size > size:
            raise self._bad(
                req, f"access [{p.offset}, +{p.size}) beyond the {size}-byte config space"
            )
        return p

    async def _on_get_config(self, req: Request, kept: list[int]) -> ConfigSpace:
        p = self._config_range(req)
        return ConfigSpace(p.offset, p.flags, self.device.read_config(p.offset, p.size))

    async def _on_set_config(self, req: Request, kept: list[int]) -> None:
        p = self._config_range(req)
        if p.size:
            self.device.write_config(p.offset, p.data)

    async def _on_set_backend_req_fd(self, req: Request, kept: list[int]) -> None:
        fd = req.fds[0]
        kept.append(fd)
        old, self.backend_fd = self.backend_fd, fd
        _close(old)

    def notify_config_change(self) -> bool:
        """Tell the front-end the config space changed (CONFIG_CHANGE_MSG on the
        back-end channel).  ``False`` if that channel or CONFIG is not negotiated."""
        if self.backend_fd is None or not self.conn.has_protocol_feature(_P.CONFIG):
            return False
        try:
            with socket.socket(fileno=os.dup(self.backend_fd)) as sock:
                sock.send(config_change_msg(), socket.MSG_DONTWAIT)
        except OSError as exc:
            log.warning("%s: CONFIG_CHANGE_MSG not sent: %s", self.name, exc)
            return False
        return True

    def device_needs_reset(self, exc: Exception) -> None:
        """The device set DEVICE_NEEDS_RESET itself (``ActiveDevice.set_needs_reset``,
        §2.1.2): GET_STATUS reports it, every running ring's error eventfd is
        signalled and the ring stops, and the driver gets a configuration change
        notification (devicenormative §2.1.2.1) when the back-end channel allows."""
        self._device_failed(exc, None)
        for ring in self.vrings:
            if ring.running:
                ring.broken = True
                if ring.scope is not None:
                    ring.scope.cancel()
        self.notify_config_change()

    # ------------------------------------------------------------------ inflight

    async def _on_get_inflight_fd(self, req: Request, kept: list[int]):
        assert isinstance(req.payload, InflightDescription)
        p = req.payload
        if not 0 < p.num_queues <= self.device.num_queues or not 0 < p.queue_size <= 32768:
            raise self._bad(req, f"{p.num_queues} queues of {p.queue_size} entries")
        area = InflightArea.create(p.num_queues, p.queue_size)
        self._set_inflight(area)
        log.debug(
            "%s: new inflight area: %d queue(s) of %d, %d bytes",
            self.name,
            p.num_queues,
            p.queue_size,
            area.mmap_size,
        )
        return InflightDescription(area.mmap_size, 0, p.num_queues, p.queue_size), (area.fd,)

    async def _on_set_inflight_fd(self, req: Request, kept: list[int]) -> None:
        assert isinstance(req.payload, InflightDescription)
        p = req.payload
        if p.num_queues > self.device.num_queues:
            raise self._bad(req, f"{p.num_queues} queues, the device has {self.device.num_queues}")
        area = InflightArea(req.fds[0], p.mmap_size, p.mmap_offset, p.num_queues, p.queue_size)
        kept.append(req.fds[0])
        self._set_inflight(area)
        log.info("%s: inflight area set: %d queue(s) of %d", self.name, p.num_queues, p.queue_size)

    def _set_inflight(self, area: InflightArea | None) -> None:
        old, self.inflight = self.inflight, area
        if old is not None:
            for ring in self.vrings:
                if ring.tracker is not None:
                    ring.tracker.area = None
                if ring.queue is not None and ring.queue.packed:
                    PackedInflightQueue.detach(ring.queue)
            with contextlib.suppress(BufferError):
                old.close()

    # ------------------------------------------------------------------ status, reset

    async def _on_set_status(self, req: Request, kept: list[int]) -> None:
        assert isinstance(req.payload, U64)
        value = req.payload.value
        if value > 0xFF:
            raise self._bad(req, f"status {value:#x} is not 8 bits")
        if value == 0:
            # A virtio device reset.  QEMU sends it when it stops the device, around the
            # GET_VRING_BASEs: stop the rings but keep what the front-end told us about
            # them (GET_VRING_BASE must still answer); a new SET_VRING_KICK restarts.
            for ring in self.vrings:
                await self._pause(ring)
                ring.started = False
                ring.broken = False
            self.device.reset()
            self.needs_reset = False
        self.status = value & ~DeviceStatus.DEVICE_NEEDS_RESET

    async def _on_get_status(self, req: Request, kept: list[int]) -> int:
        return self.device_status

    @property
    def device_status(self) -> int:
        status = self.status
        if self.needs_reset or self.device.needs_reset:
            status |= DeviceStatus.DEVICE_NEEDS_RESET
        return int(status)

    async def _on_reset_device(self, req: Request, kept: list[int]) -> None:
        await self.reset()

    async def _on_send_rarp(self, req: Request, kept: list[int]) -> None:
        """SEND_RARP (a migrated guest without GUEST_ANNOUNCE): the device announces
        the MAC address on its network (offered only by devices with ``send_rarp``)."""
        assert isinstance(req.payload, MacAddress)
        mac = req.payload.mac
        if mac[0] & 1 or mac == bytes(6):  # a RARP source must be one station
            log.warning(
                "%s: SEND_RARP for %s ignored: not a unicast address", self.name, mac.hex(":")
            )
            return
        self.device.send_rarp(mac)  # type: ignore[attr-defined]

    async def _on_iotlb_msg(self, req: Request, kept: list[int]) -> int:
        raise self._bad(req, "VIRTIO_F_ACCESS_PLATFORM is not offered: no IOTLB")

    async def _on_gpu_set_socket(self, req: Request, kept: list[int]) -> None:
        raise self._bad(req, "not a GPU device")

    async def reset(self) -> None:
        """Device reset: stop every ring, forget ring state, reset the device."""
        for ring in self.vrings:
            await self._pause(ring)
            ring.notifier.close()
            _close(ring.err_fd)
            self._retired[ring.index] = self._retired.get(ring.index, 0) + ring.requests_served
        self.vrings = [Vring(i) for i in range(self.device.num_queues)]
        self.device.reset()
        self.status = 0
        self.needs_reset = False

    async def aclose(self, *, drain: float = 1.0) -> None:
        """The connection is gone: stop rings (briefly draining), release everything."""
        self.drain_timeout = min(self.drain_timeout, drain)
        with trio.CancelScope(shield=True):
            await self.reset()
        self._drop_log()
        self._set_inflight(None)
        if self.memory is not None:
            _close_memory(self.memory)
            self.memory = None
        for _, fd in self._regions:
            _close(fd)
        self._regions = []
        self._region_refs.clear()
        _close(self.backend_fd)
        self.backend_fd = None


def _close_memory(memory: MmapGuestMemory) -> None:
    try:
        memory.close()
    except BufferError:
        log.warning("guest memory still referenced; unmapped when released")
