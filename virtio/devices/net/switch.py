"""A learning L2 switch, sans I/O: ports, MAC learning with ageing, flooding of
broadcast/multicast/unknown unicast, per-port counters, offload translation.

A port is anything with ``name``, ``rx_offloads`` (what it accepts: ``RxOffloads``)
and ``deliver(packet) -> bool`` (queue it for the port's receiver; ``False``: no room,
counted as dropped).  Virtio-net devices (``device.py``) and the tap uplink
(``tap.py``) are ports; a port hands what its guest sent to ``Switch.forward``.
``deliver`` must not block: a port whose guest stopped receiving (a stalled ring)
loses its own packets and nobody else's.

Time comes from ``clock`` (monotonic seconds), so ageing is testable without sleeping.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from virtio.devices.net.offload import OffloadError, RxOffloads, adapt, check_segmentable
from virtio.devices.net.packet import GSO_NONE, Packet

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


@dataclass
class _Entry:
    port: Port
    seen: float


class Switch:
    def __init__(
        self, *, ageing: float = DEFAULT_AGEING, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ageing = ageing
        self.clock = clock
        self.ports: list[Port] = []
        self.counters: dict[str, PortCounters] = {}
        self._table: dict[bytes, _Entry] = {}

    # -- ports ---------------------------------------------------------------------------
    def add_port(self, port: Port) -> None:
        if port.name in self.counters:
            raise ValueError(f"a port named {port.name!r} is already on the switch")
        self.ports.append(port)
        self.counters[port.name] = PortCounters()

    def remove_port(self, port: Port) -> None:
        self.ports.remove(port)
        self.forget(port)

    def forget(self, port: Port) -> None:
        """Drop every address learned on ``port`` (its guest went away or migrated)."""
        for mac in [m for m, e in self._table.items() if e.port is port]:
            del self._table[mac]

    # -- learning --------------------------------------------------------------------------
    def lookup(self, mac: bytes) -> Port | None:
        """The port ``mac`` was last seen on, unless the entry aged out."""
        entry = self._table.get(mac)
        if entry is None:
            return None
        if self.clock() - entry.seen > self.ageing:
            del self._table[mac]
            return None
        return entry.port

    def learn(self, mac: bytes, port: Port) -> None:
        if mac[0] & 1 or mac == b"\0" * 6:
            return  # a group address or zero is never a source
        entry = self._table.pop(mac, None)  # re-inserted: dict order is age order
        if entry is not None and entry.port is not port:
            log.info("switch: %s moved %s -> %s", mac.hex(":"), entry.port.name, port.name)
        if len(self._table) >= MAX_ADDRESSES:
            del self._table[next(iter(self._table))]
        self._table[mac] = _Entry(port, self.clock())

    def addresses(self) -> dict[str, str]:
        """Learned (unexpired) addresses -> port names."""
        now = self.clock()
        return {
            mac.hex(":"): e.port.name
            for mac, e in self._table.items()
            if now - e.seen <= self.ageing
        }

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

    def statistics(self) -> dict[str, dict[str, int]]:
        return {name: c.as_dict() for name, c in self.counters.items()}
