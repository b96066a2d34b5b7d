"""A learning L2 switch, sans I/O: ports, MAC learning with ageing, flooding of
broadcast/multicast/unknown unicast, per-port counters, offload translation.

A port is anything with ``name``, ``rx_offloads`` (what it accepts: ``RxOffloads``)
and ``deliver(packet) -> bool`` (queue it for the port's receiver; ``False``: no room,
counted as dropped).  Virtio-net devices (``device.py``) and the tap uplink
(``tap.py``) are ports; a port hands what its guest sent to ``Switch.forward``.
``deliver`` must not block: a port whose guest stopped receiving (a stalled ring)
loses its own packets and nobody else's.

Time comes from ``clock`` (monotonic seconds), so ageing is testable without sleeping.

The address table is native (``fdb.py``, virtio/native/net_fdb.c): the same table
serves this Python path and the native per-packet path (issue 10 §2).  A switch has
at most ``MAX_PORTS`` ports.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from virtio.devices.net.offload import OffloadError, RxOffloads, adapt, check_segmentable
from virtio.devices.net.packet import GSO_NONE, Packet
from virtio.native import ffi, lib

log = logging.getLogger(__name__)

DEFAULT_AGEING = 300.0
"""Seconds a learned address stays without traffic from it (IEEE 802.1D's default)."""
MAX_ADDRESSES = 4096
"""Learned addresses kept at most (a port sending from random sources cannot grow
the table without bound): the oldest entry goes first."""


class Port(Protocol):
    name: str

    @property
    def rx_offloads(self) -> RxOffloads: ...

    def deliver(self, packet: Packet) -> bool: ...


@dataclass
class PortCounters:
    """One port's counters, from the switch's side: ``in_*`` what the port sent
    into the switch, ``out_*`` what the switch delivered to it."""

    in_packets: int = 0
    in_bytes: int = 0
    out_packets: int = 0
    out_bytes: int = 0
    flooded: int = 0
    """Packets from this port sent to every other port (broadcast, multicast, unknown)."""
    segmented: int = 0
    """TSO packets cut into segments for this port (it lacks the guest offload)."""
    segments: int = 0
    checksummed: int = 0
    """Partial checksums completed for this port (it lacks GUEST_CSUM)."""
    dropped: Counter[str] = field(default_factory=Counter)
    """Packets not delivered to / not taken from this port, by reason."""

    def as_dict(self) -> dict[str, int]:
        out = {
            k: getattr(self, k)
            for k in (
                "in_packets",
                "in_bytes",
                "out_packets",
                "out_bytes",
                "flooded",
                "segmented",
                "segments",
                "checksummed",
            )
        }
        out.update({f"dropped_{k}": v for k, v in sorted(self.dropped.items())})
        return out


class Switch:
    def __init__(
        self, *, ageing: float = DEFAULT_AGEING, clock: Callable[[], float] = time.monotonic
    ) -> None:
        from virtio.devices.net.fdb import NativeFdb

        self.ageing = ageing
        self.clock = clock
        self.ports: list[Port] = []
        self.counters: dict[str, PortCounters] = {}
        self._fdb = NativeFdb(ageing=ageing, clock=clock)
        self._slots: list[Port | None] = []
        """Port number in the native table -> port (None: free number)."""
        self.native_ports = ffi.new("struct net_port *[]", lib.NET_FDB_MAX_PORTS)
        """Port number -> ``struct net_port *`` for the native per-packet path
        (``dataplane.py``); a port without one (the tap) gets one that is never
        native, so a flood that includes it goes through Python."""
        self._native_keep: list[object] = []
        self.native_count = ffi.new("uint32_t *")
        """Port numbers in use (the native path looks no further)."""
        self._queue_threads: dict[int, tuple[Any, Any]] = {}

    # -- ports ---------------------------------------------------------------------------
    def add_port(self, port: Port) -> None:
        if any(p.name == port.name for p in self.ports):
            raise ValueError(f"a port named {port.name!r} is already on the switch")
        from virtio.devices.net.fdb import MAX_PORTS

        if None in self._slots:
            self._slots[self._slots.index(None)] = port
        elif len(self._slots) < MAX_PORTS:
            self._slots.append(port)
        else:
            raise ValueError(f"a switch has at most {MAX_PORTS} ports")
        number = self._number(port)
        native = getattr(port, "native_port", None)
        if native is None:
            from virtio.devices.net.dataplane import new_port

            native = new_port()  # native stays 0
        self._native_keep.append(native)
        self.native_ports[number] = native
        self.native_count[0] = len(self._slots)
        self.ports.append(port)
        self.counters[port.name] = PortCounters()

    def remove_port(self, port: Port) -> None:
        self.ports.remove(port)
        self.forget(port)
        number = self._number(port)
        self.native_ports[number] = ffi.NULL  # (its struct stays allocated: a
        self._slots[number] = None  # transmit thread may have just read the pointer)

    def number(self, port: Port) -> int:
        """``port``'s number in the native table (``fdb.py``)."""
        return self._number(port)

    def queue_thread(self, k: int) -> tuple[Any, Any]:
        """Shared transmit thread k (``--queue-threads``): the ``QueueThread`` and
        its poll set (``struct net_group *``), made on first use."""
        if k not in self._queue_threads:
            from virtio.dataplane import QueueThread

            ng = ffi.gc(lib.net_group_new(), lib.net_group_free)
            if ng == ffi.NULL:
                raise MemoryError("net_group_new failed")
            self._queue_threads[k] = (QueueThread(f"net-tx-{k}"), ng)
        return self._queue_threads[k]

    @property
    def native_fdb(self):
        """The native table (``struct vm_net_fdb *``) for the native per-packet path."""
        return self._fdb._t

    def _number(self, port: Port) -> int:
        for i, p in enumerate(self._slots):
            if p is port:
                return i
        raise ValueError(f"port {port.name!r} is not on the switch")

    def forget(self, port: Port) -> None:
        """Drop every address learned on ``port`` (its guest went away or migrated)."""
        self._fdb.forget(self._number(port))

    # -- learning --------------------------------------------------------------------------
    def lookup(self, mac: bytes) -> Port | None:
        """The port ``mac`` was last seen on, unless the entry aged out."""
        number = self._fdb.lookup(mac)
        return None if number is None else self._slots[number]

    def learn(self, mac: bytes, port: Port) -> None:
        """Learn ``mac`` on ``port``: a group address or zero is never learned, a full
        table (``MAX_ADDRESSES``) drops the least recently learned address."""
        if not mac[0] & 1 and log.isEnabledFor(logging.INFO):
            old = self._fdb.lookup(mac)
            if old is not None and self._slots[old] is not port:
                log.info(
                    "switch: %s moved %s -> %s", mac.hex(":"), self._slots[old].name, port.name
                )
        self._fdb.learn(mac, self._number(port))

    def addresses(self) -> dict[str, str]:
        """Learned (unexpired) addresses -> port names."""
        return {mac: self._slots[n].name for mac, n in self._fdb.addresses().items()}

    # -- forwarding ------------------------------------------------------------------------
    def drop(self, port: Port, reason: str) -> None:
        """Count a packet ``port`` sent that was refused before forwarding."""
        self.counters[port.name].dropped[reason] += 1

    def forward(self, source: Port, packet: Packet) -> int:
        """Switch one packet ``source`` sent; returns the ports it was delivered to."""
        c = self.counters[source.name]
        if packet.gso != GSO_NONE:
            try:
                check_segmentable(packet)
            except OffloadError as exc:
                log.debug("switch: %s: TSO packet refused: %s", source.name, exc)
                c.dropped["bad_gso"] += 1
                return 0
        c.in_packets += 1
        c.in_bytes += len(packet.frame)
        self.learn(packet.src, source)
        dst = packet.dst
        target = None if dst[0] & 1 else self.lookup(dst)
        if target is None:
            targets = [p for p in self.ports if p is not source]
            c.flooded += 1
        elif target is source:
            c.dropped["hairpin"] += 1
            return 0
        else:
            targets = [target]
        return sum(self._deliver(source, port, packet) for port in targets)

    def _deliver(self, source: Port, port: Port, packet: Packet) -> bool:
        c = self.counters[port.name]
        try:
            adapted = adapt(packet, port.rx_offloads)
        except OffloadError as exc:
            log.debug("switch: %s -> %s: cannot segment: %s", source.name, port.name, exc)
            self.counters[source.name].dropped["unsegmentable"] += 1
            return False
        if adapted.segmented:
            c.segmented += 1
            c.segments += len(adapted.packets)
        if adapted.checksummed:
            c.checksummed += 1
        delivered = False
        for p in adapted.packets:
            if port.deliver(p):
                c.out_packets += 1
                c.out_bytes += len(p.frame)
                delivered = True
            else:
                c.dropped["no_room"] += 1
        return delivered

    def port_statistics(self, port: Port) -> dict[str, int]:
        """``port``'s counters: the Python path's plus the native path's (``fdb.py``
        counts what the native per-packet path switched)."""
        out = self.counters[port.name].as_dict()
        for key, value in self._fdb.counters(self._number(port)).items():
            if value or not key.startswith("dropped_"):
                out[key] = out.get(key, 0) + value
        return out

    def statistics(self) -> dict[str, dict[str, int]]:
        return {p.name: self.port_statistics(p) for p in self.ports}
