"""virtio-net, the network device (virtio 1.4 §5.1), as one port of a ``Switch``.

Queues (§5.1.2): receiveq1, transmitq1, ..., receiveqN, transmitqN, then controlq.
The control queue is at index 2N with VIRTIO_NET_F_MQ and at 2 without it; under
vhost-user the front-end (QEMU) keeps it and this device never sees it, in the
emulator the device serves it.

* Transmit (§5.1.9.2) is an ordered ``REQUESTS`` queue: each chain is the
  ``virtio_net_hdr`` and one frame, checked (``packet.check_transmit``: offloads the
  driver negotiated, ``csum_start``/``csum_offset`` inside the frame, a sane
  ``gso_size``, the MTU); a bad one is dropped and counted, the port goes on.  Good
  ones go to the switch, which hands them to other ports' ``deliver``.
* Receive (§5.1.9.4) is a ``BUFFERS`` queue fed by a bounded backlog per receive
  queue (a stalled ring loses its own packets only).  Without
  VIRTIO_NET_F_MRG_RXBUF a packet takes one buffer and must fit it (the big-packet
  rules of §5.1.9.3.1 are the driver's: it posts buffers of 65562 bytes with the
  GUEST_TSO features, 1526 without); a packet that does not fit is dropped and the
  buffer given back.  With it, a packet fills as many buffers as it needs,
  all but the last completely, and ``num_buffers`` says how many (§5.1.9.4.1);
  when fewer are posted the buffers taken are given back and the device waits for
  the driver: it never holds buffers while waiting, so a ring stop does not wait on
  it.  Receive steering (§5.1.9.5.6): a packet goes to receiveqX when the driver
  last transmitted its flow on transmitqX, else to a queue picked by the flow's hash.
* Configuration (§5.1.4): mac, status (LINK_UP, ANNOUNCE), max_virtqueue_pairs, mtu,
  speed, duplex.  Control commands (§5.1.9.5): RX mode, MAC tables and address,
  VLAN filter, MQ pairs, announce ack.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import struct
from collections import Counter, deque
from collections.abc import Callable

import trio

from virtio.config_space import ConfigLayout
from virtio.control import ArgumentError
from virtio.device import ActiveDevice, ControlCommand, VirtioDevice
from virtio.devices.net import dataplane as native
from virtio.devices.net.offload import RxOffloads
from virtio.devices.net.packet import (
    ETH_HLEN,
    HDR,
    HDR_LEGACY,
    Packet,
    PacketRefused,
    TxOffloads,
    check_transmit,
)
from virtio.devices.net.switch import Switch
from virtio.errors import DriverError
from virtio.native import ffi, lib
from virtio.queues.chain import DescriptorChain
from virtio.queues.virtqueue import Virtqueue
from virtio.ratelimit import LogRateLimiter
from virtio.service import BufferQueue, OrderedRequestService, QueueRole
from virtio.spec.features import TransportFeature as TF
from virtio.spec.ids import DeviceId
from virtio.spec.net import (
    NetCtrlAck,
    NetCtrlAnnounceCmd,
    NetCtrlClass,
    NetCtrlMacCmd,
    NetCtrlMqCmd,
    NetCtrlRxCmd,
    NetCtrlVlanCmd,
    NetStatus,
    virtio_net_config,
)
from virtio.spec.net import NetFeature as NF
from virtio.spec.sections import S_5_1_4

log = logging.getLogger(__name__)

NET_CONFIG = ConfigLayout(virtio_net_config, writable=set(), section=S_5_1_4)

FEATURES = (
    NF.VIRTIO_NET_F_CSUM,
    NF.VIRTIO_NET_F_GUEST_CSUM,
    NF.VIRTIO_NET_F_MAC,
    NF.VIRTIO_NET_F_MTU,
    NF.VIRTIO_NET_F_MRG_RXBUF,
    NF.VIRTIO_NET_F_STATUS,
    NF.VIRTIO_NET_F_CTRL_VQ,
    NF.VIRTIO_NET_F_CTRL_RX,
    NF.VIRTIO_NET_F_CTRL_VLAN,
    NF.VIRTIO_NET_F_CTRL_MAC_ADDR,
    NF.VIRTIO_NET_F_GUEST_ANNOUNCE,
    NF.VIRTIO_NET_F_MQ,
    NF.VIRTIO_NET_F_SPEED_DUPLEX,
    NF.VIRTIO_NET_F_HOST_TSO4,
    NF.VIRTIO_NET_F_HOST_TSO6,
    NF.VIRTIO_NET_F_GUEST_TSO4,
    NF.VIRTIO_NET_F_GUEST_TSO6,
    NF.VIRTIO_NET_F_HOST_ECN,
    NF.VIRTIO_NET_F_GUEST_ECN,
)
"""The device-type bits offered (issue 10 §1)."""

RX_BACKLOG = 1024
"""Packets queued per receive queue for a driver that posts no buffers."""
MAX_VLAN = 4095
ETH_P_8021Q = 0x8100
ETH_P_RARP = 0x8035
DUPLEX_FULL = 1


def _mask(bits) -> int:
    out = 0
    for bit in bits:
        out |= bit.mask
    return out


def parse_mac(text: str) -> bytes:
    """``"52:54:00:12:34:56"`` -> 6 bytes (``ValueError`` otherwise)."""
    try:
        mac = bytes.fromhex(text.replace(":", "").replace("-", ""))
    except ValueError:
        mac = b""
    if len(mac) != 6:
        raise ValueError(f"{text!r} is not a MAC address")
    if mac[0] & 1:
        raise ValueError(f"{text} is a multicast address")
    return mac


def rarp_frame(mac: bytes) -> bytes:
    """A RARP "reverse request" from ``mac`` (what QEMU's ``qemu_announce_self`` and
    DPDK send for a migrated guest), so switches learn where ``mac`` is now."""
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 3, mac, b"\0" * 4, mac, b"\0" * 4)
    frame = b"\xff" * 6 + mac + struct.pack("!H", ETH_P_RARP) + arp
    return frame.ljust(60, b"\0")


def flow_hash(frame: bytes) -> int:
    """The hash of the packet's flow, alike for both directions: the IPv4/IPv6
    addresses and TCP/UDP ports, or the MAC addresses for anything else, lower
    endpoint first (``net_flow_hash``, the native path's and this one).  Receive
    steering (§5.1.9.5.6) keys on it."""
    head = frame[:96]  # every key lies in the first 96 bytes
    return int(lib.net_flow_hash(ffi.from_buffer(head), len(head)))


class _Backlog:
    """Packets waiting for one receive queue's buffers.  A full backlog takes nothing
    more until it has drained to half: under a sustained overload it then empties, and
    the native path delivers straight into the ring again, instead of every freed slot
    being refilled at once and every packet going through Python.  ``on_mark`` is
    told each change of that mark (the native path drops such frames itself)."""

    def __init__(self, limit: int, on_mark: Callable[[bool], None] | None = None) -> None:
        self.packets: deque[Packet] = deque()
        self.limit = limit
        self.full = False
        """Took nothing more since it filled up, until drained to half."""
        self._on_mark = on_mark
        self._ready = trio.Event()
        self._told = False

    def _mark(self, full: bool) -> None:
        self.full = full
        if self._on_mark is not None:
            self._on_mark(full)

    def put(self, packet: Packet) -> bool:
        if self.full or len(self.packets) >= self.limit:
            if not self.full:
                self._mark(True)
            return False
        self.packets.append(packet)
        self._ready.set()
        return True

    def tell(self) -> None:
        """The native hold of this queue needs serving (``get`` returns None)."""
        self._told = True
        self._ready.set()

    async def get(self) -> Packet | None:
        """The next packet; None when told (``tell``) and none waits."""
        while not self.packets:
            if self._told:
                self._told = False
                return None
            self._ready = trio.Event()
            await self._ready.wait()
        packet = self.packets.popleft()
        if self.full and len(self.packets) <= self.limit // 2:
            self._mark(False)  # room again
        return packet

    async def wait_told(self) -> None:
        while not self._told:
            self._ready = trio.Event()
            await self._ready.wait()
        self._told = False

    def close(self) -> None:
        """No longer served: the mark goes (and the native path's copy with it)."""
        self._mark(False)


class VirtioNet(VirtioDevice):
    """One virtio-net port on ``switch`` (a private switch when none is given)."""

    device_id = DeviceId.VIRTIO_ID_NET
    config_layout = NET_CONFIG
    device_features = _mask(FEATURES)
    stats_latency_sample = 64
    """The native receive path pops one buffer per frame, so every fourth frame cost
    two clock reads at the default sample (3 % of the back-end's CPU at 1518 B)."""

    def __init__(
        self,
        *,
        name: str = "net0",
        switch: Switch | None = None,
        mac: bytes = b"\x52\x54\x00\x12\x34\x56",
        mtu: int = 1500,
        num_queue_pairs: int = 1,
        queue_size: int = 256,
        speed: int = 10000,
        rx_backlog: int = RX_BACKLOG,
    ) -> None:
        super().__init__()
        if not 1 <= num_queue_pairs <= 0x8000:
            raise ValueError(f"{num_queue_pairs} queue pairs: 1 to 32768")
        if not 68 <= mtu <= 65535:
            raise ValueError(f"MTU {mtu}: 68 to 65535")
        self.name = name
        self.mac = mac
        self.mtu = mtu
        self.speed = speed
        self.max_pairs = num_queue_pairs
        self.queue_max_sizes = (queue_size,) * (2 * num_queue_pairs) + (64,)
        self.rx_backlog = rx_backlog
        self.queue_packets: Counter[int] = Counter()
        """Packets through each queue (received into receiveqs, sent from transmitqs)."""
        self.queue_bytes: Counter[int] = Counter()
        self.errors: Counter[str] = Counter()
        """Receive-side drops and bad buffers, control queue errors, by reason."""
        self._limit = LogRateLimiter(log)
        self._rx: dict[int, _Backlog] = {}
        self.native_dataplane = True
        """Under vhost-user (eventfd notifications) serve transmit queues from the
        native per-packet path (``dataplane.py``); set before ``run``."""
        self.poll_us = 0
        """Native transmit threads poll an idle ring this long before sleeping."""
        self.queue_threads = 0
        """Native transmit queues of the switch's ports served by this many shared
        threads (``--queue-threads``; 0: a thread per queue)."""
        self.native_port = native.new_port()
        """This port for the native path (``struct net_port``)."""
        self._native_rx: dict[int, native.NativeRx] = {}
        """Receive queues native transmit threads may write into, by queue index."""
        self._dataplanes: dict[int, native.NetDataPlane] = {}
        self.rx_steered = 0
        """Packets the Python path put on the pair their flow was sent on (§5.1.9.5.6);
        the native path's are ``native.rx.rx_steered``, ``statistics()["steered"]``
        both."""
        self.native_tx: Counter[str] = Counter()
        """Counters of stopped transmit data planes (running ones: ``statistics``)."""
        self.link_up = True
        """The link as the operator set it (``set-link``); kept across device resets."""
        self.switch = switch if switch is not None else Switch()
        self._reset_state()
        self.switch.add_port(self)

    def _reset_state(self) -> None:
        self.pairs = self.max_pairs
        """Queue pairs in use (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, §5.1.9.5.5)."""
        self.announce_pending = False
        self.promisc = True  # as QEMU's virtio-net after reset
        self.allmulti = False
        self.uc_table: set[bytes] = set()
        self.mc_table: set[bytes] = set()
        self.vlans: set[int] = set()
        self._native_state()

    def _native_state(self) -> None:
        """Whether frames may be written into the receive queues natively: the
        receive filter lets everything through and every receive queue in use
        (``running``, the ones ``deliver`` picks from: ``_rx_queue``) is native, so
        the native path picks the same one (``net_rx_pick``)."""
        port = getattr(self, "native_port", None)
        if port is None:
            return
        running = sorted(i for i in self._rx if i // 2 < self.pairs)
        ok = running == list(range(0, 2 * len(running), 2)) and all(
            i in self._native_rx for i in running
        )
        port.nrxq = len(running) if ok else 0
        port.hold_limit = min(self.rx_backlog, lib.NET_HOLD_FRAMES)
        port.steer_pairs = self.pairs
        port.native = int(self.promisc and ok and bool(running))
        port.link_down = int(not self.link_up)
        port.vlan_filter = int(self.has(NF.VIRTIO_NET_F_CTRL_VLAN))

    # -- features and configuration ----------------------------------------------------
    def has(self, feature: NF) -> bool:
        return bool(self.driver_features & feature.mask)

    @property
    def hdr_size(self) -> int:
        """12 bytes with VERSION_1 or MRG_RXBUF, else the legacy 10 (§5.1.9.1)."""
        modern = self.driver_features & (
            TF.VIRTIO_F_VERSION_1.mask | NF.VIRTIO_NET_F_MRG_RXBUF.mask
        )
        return HDR.size if modern else HDR_LEGACY.size

    @property
    def tx_offloads(self) -> TxOffloads:
        return TxOffloads(
            self.has(NF.VIRTIO_NET_F_CSUM),
            self.has(NF.VIRTIO_NET_F_HOST_TSO4),
            self.has(NF.VIRTIO_NET_F_HOST_TSO6),
            self.has(NF.VIRTIO_NET_F_HOST_ECN),
        )

    @property
    def rx_offloads(self) -> RxOffloads:
        return RxOffloads(
            self.has(NF.VIRTIO_NET_F_GUEST_CSUM),
            self.has(NF.VIRTIO_NET_F_GUEST_TSO4),
            self.has(NF.VIRTIO_NET_F_GUEST_TSO6),
            self.has(NF.VIRTIO_NET_F_GUEST_ECN),
        )

    def config_values(self) -> dict[str, object]:
        status = int(NetStatus.VIRTIO_NET_S_LINK_UP) if self.link_up else 0
        if self.announce_pending:
            status |= int(NetStatus.VIRTIO_NET_S_ANNOUNCE)
        return {
            "mac": self.mac,
            "status": status,
            "max_virtqueue_pairs": self.max_pairs,
            "mtu": self.mtu,
            "speed": self.speed,
            "duplex": DUPLEX_FULL,
            "rss_max_key_size": 0,
            "rss_max_indirection_table_length": 0,
            "supported_hash_types": 0,
            "supported_tunnel_types": 0,
        }

    @property
    def ctrl_index(self) -> int:
        """The control queue's index (§5.1.2)."""
        return 2 * self.max_pairs if self.has(NF.VIRTIO_NET_F_MQ) else 2

    def queue_role(self, index: int) -> QueueRole:
        if index != self.ctrl_index and index % 2 == 0:
            return QueueRole.BUFFERS
        return QueueRole.REQUESTS

    def reset(self) -> None:
        super().reset()
        self._reset_state()
        lib.net_steer_clear(self.native_port)  # the flows a reset driver sent
        self.switch.forget(self)

    # -- serving ---------------------------------------------------------------------------
    async def serve_queue(self, active: ActiveDevice, index: int) -> None:
        if index == self.ctrl_index and self.has(NF.VIRTIO_NET_F_CTRL_VQ):
            if self.has(NF.VIRTIO_NET_F_MQ):
                self.pairs = 1  # §5.1.9.5.5: only the first pair until VQ_PAIRS_SET
            await super().serve_queue(active, index)
        elif index % 2 == 1 and index < 2 * self.max_pairs:
            self.active = active
            if native.NetDataPlane.supported(self, active, index):
                plane = native.NetDataPlane(self, active, index)
                self._dataplanes[index] = plane
                try:
                    if await plane.run():
                        return
                except DriverError as exc:  # the thread met a malformed ring
                    self._driver_error(active, exc)
                    return
                finally:
                    self._dataplanes.pop(index, None)
                    self._fold(index, plane.statistics())
            await OrderedRequestService(active, index).run(self._transmit)
        else:
            await super().serve_queue(active, index)

    # -- transmit (§5.1.9.2) -----------------------------------------------------------------
    def _transmit(self, index: int, chain: DescriptorChain) -> int:
        hdr_size = self.hdr_size
        if chain.readable_len < hdr_size + ETH_HLEN:
            self._refused(
                PacketRefused("runt", f"transmit buffer of {chain.readable_len} bytes", "5.1.9.2")
            )
            return 0
        if chain.readable_len > hdr_size + 65535 + 18:
            self._refused(
                PacketRefused(
                    "oversized", f"transmit buffer of {chain.readable_len} bytes", "5.1.9"
                )
            )
            return 0
        if not self.link_up:
            self.errors["tx_link_down"] += 1  # as QEMU: a NIC whose link is down sends nothing
            return 0
        packet = Packet.parse(chain.reader().read(), hdr_size)
        try:
            check_transmit(packet, self.tx_offloads, self.mtu)
        except PacketRefused as exc:
            self._refused(exc)
            return 0
        self.queue_packets[index] += 1
        self.queue_bytes[index] += len(packet.frame)
        if self.pairs > 1:  # §5.1.9.5.6: its flow's replies go to this pair
            lib.net_steer_note(self.native_port, flow_hash(packet.frame), index // 2)
        self.switch.forward(self, packet)
        return 0

    def _fold(self, index: int, stats: dict[str, int]) -> None:
        """Keep a stopped transmit data plane's counters."""
        self.native_tx.update({k: stats.get(k, 0) for k in native.TX_STATISTICS})
        self.queue_packets[index] += stats.get("tx_native", 0) + stats.get("tx_hairpin", 0)
        self.queue_bytes[index] += stats.get("tx_native_bytes", 0)

    def _refused(self, exc: PacketRefused) -> None:
        self.switch.drop(self, exc.reason)
        self._limit.warning(exc.reason, "%s: transmitted packet dropped: %s", self.name, exc)

    def send_rarp(self, mac: bytes) -> None:
        """Announce ``mac`` on the switch as if the guest sent a RARP (vhost-user
        SEND_RARP after a migration: the guest has no GUEST_ANNOUNCE)."""
        was = self.switch.lookup(mac)
        self.switch.forward(self, Packet(rarp_frame(mac)))
        now = self.switch.lookup(mac)
        log.info(
            "%s: announcing %s (RARP): the switch had it on %s, now on %s",
            self.name,
            mac.hex(":"),
            was.name if was is not None else "no port",
            now.name if now is not None else "no port",
        )

    def set_link(self, up: bool) -> bool:
        """Set the link up or down (QEMU's ``set_link``): status VIRTIO_NET_S_LINK_UP
        (§5.1.4, VIRTIO_NET_F_STATUS) and a configuration change notification (§2.5.2)
        when it changes.  While down, frames are neither received nor sent (dropped,
        counted ``link_down`` / ``tx_link_down``).  Returns whether the driver was told."""
        up = bool(up)
        if up == self.link_up:
            return False
        self.link_up = up
        self._native_state()
        log.info("%s: link %s", self.name, "up" if up else "down")
        if self.active is None or not self.has(NF.VIRTIO_NET_F_STATUS):
            return False
        return self.active.config_changed()

    def control_commands(self) -> dict[str, ControlCommand]:
        return {
            "set-link": ControlCommand(self._set_link_command, "up: true|false (virtio-net link)")
        }

    def _set_link_command(self, arguments: dict[str, object]) -> dict[str, object]:
        up = arguments.get("up")
        if isinstance(up, str) and up.lower() in ("on", "off", "true", "false"):
            up = up.lower() in ("on", "true")
        if not isinstance(up, bool):
            raise ArgumentError(f"set-link: 'up' must be true or false, not {up!r}")
        announced = self.set_link(up)
        return {"link": "up" if self.link_up else "down", "announced": announced}

    def announce(self) -> bool:
        """Ask the driver to announce itself (GUEST_ANNOUNCE, §5.1.9.5.4): status
        ANNOUNCE and a configuration change notification.  ``False`` without the
        feature or a running device."""
        if not self.has(NF.VIRTIO_NET_F_GUEST_ANNOUNCE) or self.active is None:
            return False
        self.announce_pending = True
        return self.active.config_changed()

    # -- receive (§5.1.9.4) --------------------------------------------------------------------
    def _accepts(self, frame: bytes) -> bool:
        """The receive filter (§5.1.9.5.1-3) the driver set up, if it did."""
        if (
            self.has(NF.VIRTIO_NET_F_CTRL_VLAN)
            and len(frame) >= 16
            and struct.unpack_from("!H", frame, 12)[0] == ETH_P_8021Q
            and struct.unpack_from("!H", frame, 14)[0] & 0xFFF not in self.vlans
        ):
            return False
        if self.promisc:
            return True
        dst = frame[:6]
        if dst == b"\xff" * 6:
            return True
        if dst[0] & 1:
            return self.allmulti or dst in self.mc_table
        return dst == self.mac or dst in self.uc_table

    def deliver(self, packet: Packet) -> bool:
        """Queue ``packet`` for a receive queue (the switch calls this; never blocks)."""
        if not self.link_up:
            self.errors["link_down"] += 1
            return False
        if not self._accepts(packet.frame):
            self.errors["filtered"] += 1
            return True  # the driver asked not to see it: not a drop
        running = [i for i in sorted(self._rx) if i // 2 < self.pairs]
        if not running:
            self.errors["link_down"] += 1
            return False
        index = self._rx_queue(packet.frame, running)
        if not self._rx[index].put(packet):  # full (_Backlog)
            self.errors["backlog_full"] += 1
            return False
        self.native_port.held += 1  # the native path waits for this backlog
        return True

    def _rx_queue(self, frame: bytes, running: list[int]) -> int:
        """The receive queue for ``frame`` (§5.1.9.5.6): receiveqX when the driver
        last transmitted its flow on transmitqX, else one picked by the flow's hash
        (the native path's ``net_rx_pick``)."""
        if len(running) == 1:
            return running[0]
        h = flow_hash(frame)
        pair = lib.net_steer_pair(self.native_port, h)
        if pair >= 0 and 2 * pair in running:
            self.rx_steered += 1
            return 2 * pair
        return running[h % len(running)]

    async def fill_buffers(self, queue_index: int, buffers: BufferQueue) -> None:
        backlog = _Backlog(self.rx_backlog, functools.partial(self._mark_full, queue_index))
        rx = None
        if native.NativeRx.supported(self, buffers.notifier, queue_index):
            rx = native.NativeRx(self, buffers, queue_index // 2)
        pending = 0  # the packet taken from the backlog and not written yet
        with contextlib.ExitStack() as stack:
            if rx is not None:
                self._native_rx[queue_index] = stack.enter_context(rx)
            self._rx[queue_index] = backlog
            self._native_state()
            try:
                async with trio.open_nursery() as nursery:
                    if rx is not None:
                        nursery.start_soon(_relay_told, rx, backlog)
                    while True:
                        packet = await backlog.get()
                        if packet is None:  # told: the native hold needs us
                            await self._serve_hold(queue_index, buffers, backlog)
                            continue
                        pending = 1
                        while not self._receive_locked(queue_index, buffers, packet):
                            await buffers.wait_for_more()
                        pending = 0
                        self.native_port.held -= 1
            finally:
                backlog.close()
                if self._rx.get(queue_index) is backlog:
                    del self._rx[queue_index]
                if rx is not None:
                    self._native_rx.pop(queue_index, None)
                self._native_state()
                lost = len(backlog.packets)
                self.native_port.held -= lost + pending  # every packet deliver counted
                if lost:
                    self.errors["stopped"] += lost

    def _mark_full(self, index: int, full: bool) -> None:
        """The native path's copy of receiveq ``index``'s backlog mark
        (``net_rxq.backlog_full``: only the first NET_RXQ_MAX pairs are native)."""
        if index // 2 < lib.NET_RXQ_MAX:
            self.native_port.rx[index // 2].backlog_full = int(full)

    def _receive_locked(self, index: int, buffers: BufferQueue, packet: Packet) -> bool:
        """``_receive`` holding the port's lock while native threads may write into
        the same ring, after the frames its native hold has (they came first)."""
        if index not in self._native_rx:
            return self._receive(index, buffers, packet)
        lib.net_port_lock(self.native_port)
        try:
            if not self._drain_hold(index, buffers):
                return False
            return self._receive(index, buffers, packet)
        finally:
            lib.net_port_unlock(self.native_port)

    def _drain_hold(self, index: int, buffers: BufferQueue) -> bool:
        """Deliver receiveq ``index``'s natively held frames, oldest first, while the
        ring has room (the port's lock held): ``True`` once none is left.  A frame
        whose buffers the native path cannot judge (§5.1.6.3.1: readable, too small)
        is delivered or dropped here, by ``_receive``."""
        port, k = self.native_port, index // 2
        while True:
            status = lib.net_hold_drain_locked(port, k)
            if status != lib.NET_HOLD_PYTHON:
                return status == lib.NET_HOLD_EMPTY
            hdr, size = ffi.new("uint8_t[10]"), ffi.new("uint32_t *")
            held = lib.net_hold_peek(port, k, hdr, size)  # valid under the port's lock
            frame = bytes(ffi.buffer(held, size[0]))
            fields = HDR_LEGACY.unpack(ffi.buffer(hdr))
            if not self._receive(index, buffers, Packet(frame, *fields)):
                return False
            lib.net_hold_pop(port, k)

    async def _serve_hold(self, index: int, buffers: BufferQueue, backlog: _Backlog) -> None:
        """Deliver the native hold of receiveq ``index`` as the driver posts buffers:
        told so by a transmitting thread that went to sleep leaving frames there (or
        whose oldest needs ``_receive``, or that sees the hold stalled).  Steps back
        when, while it waited, the transmitting threads delivered some themselves
        and none went to sleep leaving frames (``net_hold_step_back``): they tell
        again then, so Python is not woken by every posting of a busy driver."""
        port, k = self.native_port, index // 2
        while True:
            lib.net_port_lock(port)
            try:
                if self._drain_hold(index, buffers):
                    return
                served = port.rx[k].hold_served
                more = lib.net_hold_arm_locked(port, k)  # no native pop meanwhile
            finally:
                lib.net_port_unlock(port)
            if more:
                continue
            told = False
            async with trio.open_nursery() as nursery:

                async def kick() -> None:
                    await buffers.wait_kick()
                    nursery.cancel_scope.cancel()

                async def tell() -> None:
                    nonlocal told
                    await backlog.wait_told()
                    told = True
                    nursery.cancel_scope.cancel()

                nursery.start_soon(kick)
                nursery.start_soon(tell)
            if not told:
                lib.net_port_lock(port)
                try:
                    if lib.net_hold_step_back(port, k, served):
                        return
                finally:
                    lib.net_port_unlock(port)

    def _receive(self, index: int, buffers: BufferQueue, packet: Packet) -> bool:
        """Write ``packet`` into posted buffers: ``True`` when done (delivered or
        dropped), ``False`` when the driver must post more first."""
        mrg = self.has(NF.VIRTIO_NET_F_MRG_RXBUF)
        hdr_size = self.hdr_size
        total = hdr_size + len(packet.frame)
        taken: list[DescriptorChain] = []
        room = 0
        while room < total:
            chain = buffers.next_buffer_nowait()
            if chain is None:
                buffers.give_back(taken)
                if len(taken) >= buffers.queue.size:  # every buffer posted: never enough
                    self._rx_drop("too_big", index, total)
                    return True
                return False
            if chain.readable_len or chain.writable_len < hdr_size:
                # §5.1.9.3.1: receive buffers are device-writable and hold at least
                # the header.  Return this one (and any taken) empty: dropped.
                buffers.complete_batch([(c, 0) for c in [*taken, chain]])
                self._rx_drop("bad_buffer", index, total)
                return True
            taken.append(chain)
            room += chain.writable_len
            if not mrg:
                break
        if room < total:  # without MRG_RXBUF: one buffer, too small for this packet
            buffers.give_back(taken)
            self._rx_drop("too_big", index, total)
            return True
        _quiet(buffers.queue)
        data = packet.header(len(taken), legacy=hdr_size == HDR_LEGACY.size) + packet.frame
        done = []
        pos = 0
        for chain in taken:
            n = chain.writer().write(data[pos : pos + chain.writable_len])
            pos += n
            done.append((chain, n))
        buffers.complete_batch(done)
        self.queue_packets[index] += 1
        self.queue_bytes[index] += len(packet.frame)
        return True

    def _rx_drop(self, reason: str, index: int, size: int) -> None:
        self.errors[reason] += 1
        self._limit.warning(
            reason, "%s: rx%d: %d-byte packet dropped: %s", self.name, index, size, reason
        )

    # -- control queue (§5.1.9.5) ------------------------------------------------------------
    async def handle(self, queue_index: int, chain: DescriptorChain) -> int:
        if queue_index != self.ctrl_index:
            if queue_index % 2 == 1 and queue_index < 2 * self.max_pairs:
                return self._transmit(queue_index, chain)  # deferred by the data plane
            return 0
        if chain.writable_len < 1 or chain.readable_len < 2:
            self.errors["ctrl_malformed"] += 1
            self._limit.warning("ctrl", "%s: malformed control command dropped", self.name)
            return 0
        data = chain.reader().read()
        try:
            ok = self._command(data[0], data[1], data[2:])
        except (ValueError, struct.error) as exc:
            self._limit.warning("ctrl", "%s: control command refused: %s", self.name, exc)
            ok = False
        if not ok:
            self.errors["ctrl_refused"] += 1
        ack = NetCtrlAck.VIRTIO_NET_OK if ok else NetCtrlAck.VIRTIO_NET_ERR
        return chain.writer().write(bytes([int(ack)]))

    def _command(self, cls: int, cmd: int, data: bytes) -> bool:
        if cls == NetCtrlClass.VIRTIO_NET_CTRL_RX and self.has(NF.VIRTIO_NET_F_CTRL_RX):
            if len(data) != 1:
                raise ValueError(f"RX command with {len(data)} bytes of data")
            if cmd == NetCtrlRxCmd.VIRTIO_NET_CTRL_RX_PROMISC:
                self.promisc = bool(data[0])
                self._native_state()
            elif cmd == NetCtrlRxCmd.VIRTIO_NET_CTRL_RX_ALLMULTI:
                self.allmulti = bool(data[0])
            else:
                return False  # ALLUNI ... NOBCAST need CTRL_RX_EXTRA (not offered)
            return True
        if cls == NetCtrlClass.VIRTIO_NET_CTRL_MAC:
            if cmd == NetCtrlMacCmd.VIRTIO_NET_CTRL_MAC_ADDR_SET and self.has(
                NF.VIRTIO_NET_F_CTRL_MAC_ADDR
            ):
                if len(data) != 6:
                    raise ValueError("MAC_ADDR_SET without 6 bytes")
                self.mac = parse_mac(data.hex())
                return True
            if cmd == NetCtrlMacCmd.VIRTIO_NET_CTRL_MAC_TABLE_SET and self.has(
                NF.VIRTIO_NET_F_CTRL_RX
            ):
                uc, rest = _mac_table(data)
                mc, rest = _mac_table(rest)
                if rest:
                    raise ValueError("MAC_TABLE_SET with trailing bytes")
                self.uc_table, self.mc_table = set(uc), set(mc)
                return True
            return False
        if cls == NetCtrlClass.VIRTIO_NET_CTRL_VLAN and self.has(NF.VIRTIO_NET_F_CTRL_VLAN):
            (vid,) = struct.unpack("<H", data)
            if vid > MAX_VLAN:
                return False
            if cmd == NetCtrlVlanCmd.VIRTIO_NET_CTRL_VLAN_ADD:
                self.vlans.add(vid)
            elif cmd == NetCtrlVlanCmd.VIRTIO_NET_CTRL_VLAN_DEL:
                self.vlans.discard(vid)
            else:
                return False
            return True
        if cls == NetCtrlClass.VIRTIO_NET_CTRL_ANNOUNCE and self.has(
            NF.VIRTIO_NET_F_GUEST_ANNOUNCE
        ):
            if cmd != NetCtrlAnnounceCmd.VIRTIO_NET_CTRL_ANNOUNCE_ACK:
                return False
            self.announce_pending = False
            return True
        if cls == NetCtrlClass.VIRTIO_NET_CTRL_MQ and self.has(NF.VIRTIO_NET_F_MQ):
            if cmd != NetCtrlMqCmd.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET:
                return False
            (pairs,) = struct.unpack("<H", data)
            if not 1 <= pairs <= self.max_pairs:
                return False
            self.pairs = pairs
            self._native_state()
            return True
        return False

    def statistics(self) -> dict[str, object]:
        """Counters: the switch's for this port, per queue, receive-side errors, and
        what the native path served (``native``: its share of the same counts)."""
        packets = Counter(self.queue_packets)
        tx = Counter(self.native_tx)
        for index, plane in list(self._dataplanes.items()):
            stats = plane.statistics()
            tx.update({k: stats.get(k, 0) for k in native.TX_STATISTICS})
            packets[index] += stats.get("tx_native", 0) + stats.get("tx_hairpin", 0)
        rx = native.rx_statistics(self.native_port)
        for k, n in enumerate(native.rx_queue_packets(self.native_port)):
            packets[2 * k] += n  # receiveq(k+1), written natively
        errors = dict(self.errors)
        if rx["rx_backlog_full"]:  # dropped natively as deliver() drops them
            errors["backlog_full"] = errors.get("backlog_full", 0) + rx["rx_backlog_full"]
        if rx["rx_hold_lost"]:  # held natively when the queue stopped
            errors["stopped"] = errors.get("stopped", 0) + rx["rx_hold_lost"]
        return {
            "port": self.switch.port_statistics(self),
            "queues": {k: v for k, v in sorted(packets.items()) if v},
            "steered": self.rx_steered + rx["rx_steered"],
            "errors": errors,
            "native": {"tx": {k: tx[k] for k in native.TX_STATISTICS}, "rx": rx},
        }


async def _relay_told(rx: native.NativeRx, backlog: _Backlog) -> None:
    """Pass ``rx``'s hold_fd events on to the queue's loop (``_Backlog.tell``)."""
    while True:
        await rx.wait_told()
        backlog.tell()


def _quiet(queue: Virtqueue) -> None:
    """Receive buffers are posted: the driver need not notify when it posts more
    (§2.7.10: VRING_USED_F_NO_NOTIFY, or §2.8.10: the device event suppression's
    flags DISABLE; with split EVENT_IDX ``avail_event`` is simply left behind).  They
    are asked for again only when the device runs out (``BufferQueue.wait_for_more``
    enables notifications and re-checks the ring before it sleeps), so reposting
    costs the driver no notification while the device still holds buffers, as with
    QEMU's virtio-net."""
    if queue.native.notify_enabled:
        queue.disable_notification()


def _mac_table(data: bytes) -> tuple[list[bytes], bytes]:
    """One ``virtio_net_ctrl_mac`` table (§5.1.9.5.2): u32 entries, then the MACs."""
    (n,) = struct.unpack_from("<I", data)
    end = 4 + 6 * n
    if end > len(data):
        raise ValueError(f"MAC table of {n} entries in {len(data)} bytes")
    return [data[4 + 6 * i : 10 + 6 * i] for i in range(n)], data[end:]
