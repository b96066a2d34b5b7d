"""The device table of ``run-driver --device``: one :class:`DeviceKind` per type.

Adding a device type is one ``register(DeviceKind(...))`` line (a factory building the
``VirtioDevice`` from :class:`DeviceOptions`, plus what its injections mean).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from virtio.device import VirtioDevice
from virtio.spec.ids import DeviceId

if TYPE_CHECKING:
    from emulator.drvkit.session import Session

SECTOR = 512
DEFAULT_DISK = 8 << 20
GROW = 1 << 20
"""What ``--inject config-change`` adds to a disk's capacity (§5.2.4)."""


@dataclass
class DeviceOptions:
    disk: str | None = None  # raw image file (blk); default: in memory
    disk_size: int = DEFAULT_DISK
    closers: list[Callable[[], object]] = field(default_factory=list)


@dataclass(frozen=True)
class DeviceKind:
    name: str
    device_id: DeviceId
    make: Callable[[DeviceOptions], VirtioDevice]
    template: str
    """``guest-drivers/templates/<template>``: a minimal correct driver."""
    config_change: Callable[[VirtioDevice], str] | None = None
    """Change the configuration space for ``--inject config-change``; returns a note."""
    statuses: dict[str, int] = field(default_factory=dict)
    """Request statuses ``--inject NAME@req=N`` may force (the last writable byte)."""
    events: dict[str, Callable[[VirtioDevice], str]] = field(default_factory=dict)
    """Device-specific events ``--inject NAME@req=N|@exit=N`` (net: link-down,
    link-up): change the device, return a note; a configuration change notification
    follows (§2.5.2)."""
    wire: bool = False
    """Frames on a wire: ``--inject drop@pkt=N`` / ``dup@pkt=N`` apply (net)."""
    in_order: frozenset[int] = frozenset()
    """Queues whose used ring order carries meaning: timing modes delay their
    completions but never reorder them (input's eventq)."""
    host: Callable[[Session], object] | None = None
    """A host side feeding the device (input: a typist), with ``on_exit(now)`` and
    ``on_idle() -> bool`` (something happened)."""


DEVICES: dict[str, DeviceKind] = {}


def register(kind: DeviceKind) -> None:
    DEVICES[kind.name] = kind


def _blk(opts: DeviceOptions) -> VirtioDevice:
    from virtio.devices.blk import BlkOptions, MemoryBackend, RawFileBackend, VirtioBlk

    if opts.disk is None:
        backend = MemoryBackend(opts.disk_size + GROW)  # room for a capacity change
        exposed = opts.disk_size
    else:
        backend = RawFileBackend(opts.disk)
        exposed = None
    opts.closers.append(backend.close)
    device = VirtioBlk(backend, BlkOptions(queue_size=256, serial="pyvirtio-run-driver"))
    if exposed is not None:
        device.resize(exposed)
    return device


def _blk_grow(device: VirtioDevice) -> str:
    old = device.capacity  # type: ignore[attr-defined]
    device.resize((old * SECTOR) + GROW)  # type: ignore[attr-defined]
    return f"capacity {old} -> {device.capacity} sectors"  # type: ignore[attr-defined]


def _rng(opts: DeviceOptions) -> VirtioDevice:
    from virtio.devices.rng import VirtioRng

    return VirtioRng()


register(
    DeviceKind("blk", DeviceId.VIRTIO_ID_BLOCK, _blk, "blk.c", _blk_grow, {"ioerr": 1, "unsupp": 2})
)
register(DeviceKind("rng", DeviceId.VIRTIO_ID_RNG, _rng, "rng.c"))


def _net(opts: DeviceOptions) -> VirtioDevice:
    from emulator.drvkit.netdev import RunDriverNet

    return RunDriverNet()


def _link(up: bool) -> Callable[[VirtioDevice], str]:
    def change(device: VirtioDevice) -> str:
        return device.set_link(up)  # type: ignore[attr-defined]

    return change


def _input(opts: DeviceOptions) -> VirtioDevice:
    from emulator.drvkit.inputdev import RunDriverInput

    return RunDriverInput()


def _typist(session: Session) -> object:
    from emulator.drvkit.inputdev import Typist

    return Typist(session)


register(
    DeviceKind(
        "net", DeviceId.VIRTIO_ID_NET, _net, "net.c",
        events={"link-down": _link(False), "link-up": _link(True)}, wire=True,
    )
)  # fmt: skip
register(
    DeviceKind(
        "input", DeviceId.VIRTIO_ID_INPUT, _input, "input.c", in_order=frozenset({0}),
        host=_typist,
    )
)  # fmt: skip
