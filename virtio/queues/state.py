"""Queue state as plain, untrusted data (vhost-user GET/SET_VRING_BASE, migration).

``QueueState`` is what a queue saves and what a restore starts from; it is
validated by ``QueueState.validate`` (and so by ``Virtqueue.restore``) before a
queue is built from it, because it may come from a frontend or a migration
stream.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from virtio.errors import QueueConfigError
from virtio.spec.ring import VIRTQUEUE_MAX_SIZE_PACKED, VIRTQUEUE_MAX_SIZE_SPLIT
from virtio.spec.sections import S_2_6, S_2_7, S_2_8


@dataclass(frozen=True)
class QueueState:
    """Everything needed to rebuild a running queue.

    Split rings use ``last_avail_idx``/``used_idx`` (free-running 16-bit); packed
    rings use ``next_avail``/``next_used`` (ring positions) with their wrap
    counters, and ``used_idx`` counts descriptors used.
    """

    size: int
    desc_addr: int
    driver_addr: int
    device_addr: int
    packed: bool = False
    event_idx: bool = False
    indirect: bool = False
    last_avail_idx: int = 0
    used_idx: int = 0
    next_avail: int = 0
    next_used: int = 0
    avail_wrap: bool = True
    used_wrap: bool = True
    signalled_used: int = 0
    signalled_used_valid: bool = False

    def validate(self) -> QueueState:
        """Raise ``QueueConfigError`` unless every field is in range; returns self."""
        limit = VIRTQUEUE_MAX_SIZE_PACKED if self.packed else VIRTQUEUE_MAX_SIZE_SPLIT
        if not 1 <= self.size <= limit:
            raise QueueConfigError(
                f"queue size {self.size} outside 1..{limit}",
                section=S_2_8 if self.packed else S_2_7,
            )
        if not self.packed and self.size & (self.size - 1):
            raise QueueConfigError(
                f"split queue size {self.size} is not a power of 2", section=S_2_7
            )
        for name in ("desc_addr", "driver_addr", "device_addr"):
            value = getattr(self, name)
            if not 0 <= value < 1 << 64:
                raise QueueConfigError(f"{name} {value:#x} is not a 64-bit address", section=S_2_6)
        for name in ("last_avail_idx", "used_idx", "signalled_used"):
            if not 0 <= getattr(self, name) <= 0xFFFF:
                raise QueueConfigError(f"{name} {getattr(self, name)} is not a 16-bit index")
        for name in ("next_avail", "next_used"):
            if not 0 <= getattr(self, name) < self.size:
                raise QueueConfigError(
                    f"{name} {getattr(self, name)} outside the ring of size {self.size}",
                    section=S_2_8,
                )
        return self

    def to_dict(self) -> dict[str, int | bool]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> QueueState:
        """Build from untrusted plain data: unknown keys and wrong types are rejected."""
        fields = set(cls.__dataclass_fields__)
        unknown = set(data) - fields
        if unknown:
            raise QueueConfigError(f"unknown queue state fields {sorted(unknown)}")
        for key, value in data.items():
            if not isinstance(value, int):
                raise QueueConfigError(f"queue state field {key} is not an integer")
        return cls(**data).validate()  # type: ignore[arg-type]
