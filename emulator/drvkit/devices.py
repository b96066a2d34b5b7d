"""The device table of ``run-driver --device``: one :class:`DeviceKind` per type.

Adding a device type is one ``register(DeviceKind(...))`` line (a factory building the
``VirtioDevice`` from :class:`DeviceOptions`, plus what its injections mean).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from virtio.device import VirtioDevice
from virtio.spec.ids import DeviceId

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
