"""The switch's forwarding database in native code (virtio/native/net_fdb.c).

Same rules as ``Switch`` (switch.py): a group or zero source is never learned, a
re-learned address moves to the end of the eviction order, a full table
(``MAX_ADDRESSES``) evicts the least recently learned address, an entry older than
``ageing`` seconds is gone on lookup.  Ports are numbers (0 .. ``MAX_PORTS`` - 1);
``decide`` is the per-packet step of ``Switch.forward`` with the counters kept in C,
the piece the native per-packet path (issue 10 §2) builds on.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from virtio.devices.net.switch import DEFAULT_AGEING, MAX_ADDRESSES
from virtio.native import ffi, lib

MAX_PORTS = lib.NET_FDB_MAX_PORTS
FLOOD = lib.NET_FDB_FLOOD
HAIRPIN = lib.NET_FDB_HAIRPIN
RUNT = lib.NET_FDB_RUNT
COUNTERS = (
    "in_packets",
    "in_bytes",
    "out_packets",
    "out_bytes",
    "flooded",
    "dropped_hairpin",
    "dropped_no_room",
    "dropped_runt",
)
assert lib.NET_FDB_MAX_ADDRESSES == MAX_ADDRESSES


class NativeFdb:
    def __init__(
        self, *, ageing: float = DEFAULT_AGEING, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.clock = clock
        table = lib.vm_net_fdb_new(ageing)
        if table == ffi.NULL:
            raise MemoryError("net_fdb: no memory for the table")
        self._t = ffi.gc(table, lib.vm_net_fdb_free)

    @staticmethod
    def _mac(mac: bytes) -> bytes:
        if len(mac) != 6:
            raise ValueError(f"a MAC address has 6 bytes, not {len(mac)}")
        return mac

    @staticmethod
    def _port(port: int) -> int:
        if not 0 <= port < MAX_PORTS:
            raise ValueError(f"port {port}: not in 0..{MAX_PORTS - 1}")
        return port

    def learn(self, mac: bytes, port: int) -> None:
        lib.vm_net_fdb_learn(self._t, self._mac(mac), self._port(port), self.clock())

    def lookup(self, mac: bytes) -> int | None:
        port = lib.vm_net_fdb_lookup(self._t, self._mac(mac), self.clock())
        return None if port < 0 else port

    def forget(self, port: int) -> None:
        lib.vm_net_fdb_forget(self._t, self._port(port))

    def __len__(self) -> int:
        return lib.vm_net_fdb_count(self._t)

    def addresses(self) -> dict[str, int]:
        """Learned (unexpired) addresses -> ports, in learning order."""
        n = len(self)
        macs = ffi.new("uint8_t[]", 6 * max(n, 1))
        ports = ffi.new("uint32_t[]", max(n, 1))
        got = lib.vm_net_fdb_dump(self._t, self.clock(), macs, ports, n)
        raw = bytes(ffi.buffer(macs, 6 * got))
        return {raw[6 * i : 6 * i + 6].hex(":"): ports[i] for i in range(got)}

    def decide(self, src: int, frame: bytes) -> int:
        """Learn ``frame``'s source on ``src`` and return its destination port, or
        ``FLOOD`` / ``HAIRPIN`` (dropped) / ``RUNT`` (shorter than an Ethernet
        header: dropped); counted on ``src``."""
        return lib.vm_net_fdb_decide(self._t, self._port(src), frame, len(frame), self.clock())

    def delivered(self, port: int, length: int, ok: bool) -> None:
        lib.vm_net_fdb_delivered(self._t, self._port(port), length, int(ok))

    def counters(self, port: int) -> dict[str, int]:
        c = lib.vm_net_fdb_counters(self._t, self._port(port))
        return {k: getattr(c, k) for k in COUNTERS}
