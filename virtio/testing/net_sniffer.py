"""A listening port on a ``virtio serve net`` switch, driven by the testing kit's
vhost-user front-end: it keeps receive buffers posted and records every frame the
switch delivers to it (broadcasts, multicasts, floods of unknown unicast).

::

    async with trio.open_nursery() as nursery:
        sniffer = await nursery.start(sniff, "/tmp/x/sniff.sock")
        ...
        assert any(f[12:14] == b"\\x80\\x35" for f in sniffer.frames)
        nursery.cancel_scope.cancel()

Only ``VIRTIO_F_VERSION_1`` is negotiated: the 12-byte ``virtio_net_hdr`` (virtio 1.4
§5.1.6) precedes each frame, no offloads, no mergeable buffers (one buffer per frame).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import trio

from virtio.spec.features import TransportFeature as TF
from virtio.testing.vhost_user_frontend import GuestRam, VhostUserFrontend

__all__ = ["NET_HDR_SIZE", "Sniffer", "sniff"]

NET_HDR_SIZE = 12
"""``struct virtio_net_hdr`` with ``num_buffers`` (§5.1.6: always with VERSION_1)."""
BUFFER = NET_HDR_SIZE + 1518
"""One receive buffer: a header and a full Ethernet frame with a VLAN tag."""
POSTED = 64


@dataclass
class Sniffer:
    """What the port received so far (frames without the virtio-net header)."""

    frames: list[bytes] = field(default_factory=list)
    changed: trio.Event = field(default_factory=trio.Event)

    def matching(self, ethertype: int, src: bytes | None = None) -> list[bytes]:
        """Frames of ``ethertype`` (untagged), from ``src`` if given."""
        et = ethertype.to_bytes(2, "big")
        return [f for f in self.frames if f[12:14] == et and (src is None or f[6:12] == src)]

    async def wait_for(self, ethertype: int, src: bytes | None = None) -> list[bytes]:
        """Wait (no timeout of its own) until a frame of ``ethertype`` arrived."""
        while not (found := self.matching(ethertype, src)):
            await self.changed.wait()
        return found


async def sniff(
    path: str | os.PathLike[str],
    *,
    task_status: trio.TaskStatus[Sniffer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Connect to the switch port at ``path``, post receive buffers and record what
    arrives until cancelled (``task_status`` gets the ``Sniffer`` once the rings run)."""
    ram = GuestRam(4 << 20)
    fe = await VhostUserFrontend.connect(path)
    try:
        await fe.negotiate(features=TF.VIRTIO_F_VERSION_1.mask)
        await fe.set_mem_table(ram)
        rx = await fe.setup_vring(0, ram, size=2 * POSTED, data_size=1 << 20)
        await fe.setup_vring(1, ram, size=2 * POSTED, offset=2 << 20, data_size=1 << 20)
        for _ in range(POSTED):
            rx.driver.add([], [BUFFER])
        rx.publish_and_kick()
        sniffer = Sniffer()
        task_status.started(sniffer)
        while True:
            used = await rx.wait_used(1, timeout=float("inf"))
            for buf in used:
                sniffer.frames.append(bytes(buf.data[NET_HDR_SIZE : buf.written]))
                rx.driver.add([], [BUFFER])
            rx.publish_and_kick()
            sniffer.changed.set()
            sniffer.changed = trio.Event()
    finally:
        with trio.CancelScope(shield=True):
            await fe.aclose()
            ram.close()
