"""virtio-net under ``run-driver --device net``: the project's ``VirtioNet`` with a wire.

The device is ``virtio.devices.net.VirtioNet`` (the class ``virtio serve net`` runs)
on a :class:`Wire`, a private switch whose other port is :class:`EchoPeer`: a host
that sends every unicast frame it receives back to its sender, addresses swapped, so
a driver's transmitted frames come back on its receive queue.

What run-driver adds (the device model itself is unchanged):

* strict checks of the transmit header (:class:`RunDriverNet`; §5.1.9.2.1,
  driver-normative; §5.1.6.2.1 in virtio 1.2's numbering): ``num_buffers`` not zero,
  ``flags`` bits the driver MUST NOT set (DATA_VALID, RSC_INFO) or that no version
  defines, and every packet the device refuses for a driver-normative reason
  (NEEDS_CSUM without VIRTIO_NET_F_CSUM, a GSO type not negotiated, GSO_ECN without
  HOST_ECN ...), reported as driver errors; the device still drops a refused packet
  and sends the others, as it always does;
* the link state for ``--inject link-down`` / ``link-up`` (§5.1.4: ``status``
  VIRTIO_NET_S_LINK_UP, with a configuration change notification); while the link is
  down transmitted frames are lost on the wire (counted ``link_down``);
* wire faults for ``--inject drop@pkt=N`` / ``dup@pkt=N``: the N-th frame the driver
  transmits (from 1, counting those the device accepted) is lost, or reaches the peer
  twice.
"""

from __future__ import annotations

from collections.abc import Callable

from virtio.devices.net import VirtioNet
from virtio.devices.net.offload import RxOffloads
from virtio.devices.net.packet import HDR, NEEDS_CSUM, Packet, PacketRefused
from virtio.devices.net.switch import Switch
from virtio.errors import DriverError
from virtio.queues.chain import DescriptorChain
from virtio.spec.net import NetHdrFlag, NetStatus
from virtio.spec.sections import S_5_1_9_2_1

NET_MAC = bytes.fromhex("525400120001")
"""The device's MAC address (configuration ``mac``, §5.1.4)."""
PEER_MAC = bytes.fromhex("525400120002")
"""The echo peer's address: frames sent to it come back."""
_FORBIDDEN = int(NetHdrFlag.VIRTIO_NET_HDR_F_DATA_VALID | NetHdrFlag.VIRTIO_NET_HDR_F_RSC_INFO)
_DEFINED = NEEDS_CSUM | _FORBIDDEN
_LINK_UP = int(NetStatus.VIRTIO_NET_S_LINK_UP)

WireHook = Callable[[int], str | None]
"""``(frame number) -> "drop" | "dup" | None``: a fault on the wire for that frame."""


class EchoPeer:
    """A switch port that returns every unicast frame to its sender (MACs swapped)."""

    name = "echo-peer"
    rx_offloads = RxOffloads(True, True, True, True)  # takes any packet as it is

    def __init__(self, switch: Switch, mac: bytes = PEER_MAC) -> None:
        self.switch = switch
        self.mac = mac
        self.echoed = 0
        switch.add_port(self)

    def deliver(self, packet: Packet) -> bool:
        if packet.dst != self.mac:
            return True  # flooded broadcast/multicast: seen, not answered
        frame = packet.src + self.mac + packet.frame[12:]
        self.echoed += 1
        self.switch.forward(self, Packet(frame))
        return True


class Wire(Switch):
    """The private switch between the device and the peer, with a link state and
    wire faults for the frames the device sends."""

    def __init__(self) -> None:
        super().__init__()
        self.device: RunDriverNet | None = None
        self.link_up = True
        self.hook: WireHook | None = None
        self.frames = 0
        """Frames the driver transmitted that passed the device's checks (the N of
        ``@pkt=N``)."""
        self.faults: dict[str, int] = {"dropped": 0, "duplicated": 0, "link_down": 0}

    def forward(self, source, packet: Packet) -> int:
        if source is not self.device:
            return super().forward(source, packet)
        if not self.link_up:
            self.faults["link_down"] += 1
            self.drop(source, "link_down")
            return 0
        self.frames += 1
        fault = self.hook(self.frames) if self.hook is not None else None
        if fault == "drop":
            self.faults["dropped"] += 1
            self.drop(source, "injected")
            return 0
        n = super().forward(source, packet)
        if fault == "dup":
            self.faults["duplicated"] += 1
            n += super().forward(source, packet)
        return n


class RunDriverNet(VirtioNet):
    """``VirtioNet`` on a :class:`Wire` to an :class:`EchoPeer`, with strict
    transmit-header checks (see the module docstring)."""

    def __init__(self) -> None:
        wire = Wire()
        super().__init__(name="net0", switch=wire, mac=NET_MAC, queue_size=256)
        wire.device = self
        self.wire = wire
        self.echo = EchoPeer(wire)

    def config_values(self) -> dict[str, object]:
        values = super().config_values()
        if not self.wire.link_up:
            values["status"] = int(values["status"]) & ~_LINK_UP  # type: ignore[call-overload]
        return values

    def set_link(self, up: bool) -> str:
        """``--inject link-up/link-down``; the caller sends the configuration change
        notification (§2.5.2)."""
        self.wire.link_up = up
        return f"status VIRTIO_NET_S_LINK_UP {'set' if up else 'cleared'}"

    # -- transmit ------------------------------------------------------------------------
    def _transmit(self, index: int, chain: DescriptorChain) -> int:
        if self.strict and chain.readable_len >= self.hdr_size:
            self._check_header(chain.reader().read(self.hdr_size))
        return super()._transmit(index, chain)

    def _check_header(self, hdr: bytes) -> None:
        """The §5.1.9.2.1 rules ``check_transmit`` does not cover (the device sends
        such a packet anyway)."""
        flags = hdr[0]
        if flags & _FORBIDDEN:
            self._violation(
                f"transmit header flags {flags:#x}: the driver MUST NOT set"
                " VIRTIO_NET_HDR_F_DATA_VALID or VIRTIO_NET_HDR_F_RSC_INFO"
            )
        elif flags & ~_DEFINED:
            self._violation(
                f"transmit header flags {flags:#x}: bits {flags & ~_DEFINED:#x} are not"
                " defined (reserved)"
            )
        if len(hdr) == HDR.size:
            num_buffers = int.from_bytes(hdr[10:12], "little")
            if num_buffers:
                self._violation(
                    f"transmit header num_buffers {num_buffers}: the driver MUST set it to zero"
                )

    def _refused(self, exc: PacketRefused) -> None:
        super()._refused(exc)
        if exc.section == S_5_1_9_2_1.number:
            message = str(exc).removesuffix(f" (virtio 1.4 §{exc.section})")
            self._violation(f"transmitted packet dropped: {message}")

    def _violation(self, message: str) -> None:
        self.strict_violation(DriverError(message, section=S_5_1_9_2_1))

    # -- snapshots (run-driver --save-at / --restore) -------------------------------------
    def save_state(self) -> dict:
        """The wire (link, frame count, faults, echoes) and the frames waiting for
        receive buffers (the device settled: nothing else is in flight)."""
        return {
            **super().save_state(),
            "link_up": self.wire.link_up,
            "frames": self.wire.frames,
            "faults": dict(self.wire.faults),
            "echoed": self.echo.echoed,
            "backlog": [p.frame for b in self._rx.values() for p in b.packets],
        }

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        self.wire.link_up = bool(state["link_up"])
        self.wire.frames = int(state["frames"])
        self.wire.faults.update({str(k): int(v) for k, v in state["faults"].items()})
        self.echo.echoed = int(state["echoed"])
        self._restored = [bytes(f) for f in state["backlog"]]

    def after_restore(self) -> None:
        """The receive queues serve again: the saved backlog goes back into them."""
        for frame in getattr(self, "_restored", []):
            self.deliver(Packet(frame))
        self._restored = []

    def wire_statistics(self) -> dict[str, int]:
        return {"frames_sent": self.wire.frames, "echoed": self.echo.echoed, **self.wire.faults}
