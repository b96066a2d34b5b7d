"""Exit accounting: counts by reason, by device and by register, with snapshots."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class ExitStats:
    """Counters of VM exits.  ``by_register`` keys are ``"<device>.<register>"``."""

    total: int = 0
    by_reason: Counter = field(default_factory=Counter)
    by_device: Counter = field(default_factory=Counter)
    by_register: Counter = field(default_factory=Counter)
    accesses: int = 0  # device register accesses (a batched string IN is one exit, n accesses)
    ioeventfd: int = 0  # writes taken by an ioeventfd (in-kernel under KVM: not exits)

    def count(self, reason: str, device: str | None = None, register: str | None = None) -> None:
        self.total += 1
        self.by_reason[reason] += 1
        if device is not None:
            self.by_device[device] += 1
            if register is not None:
                self.by_register[f"{device}.{register}"] += 1

    def snapshot(self) -> ExitStats:
        return ExitStats(
            self.total,
            Counter(self.by_reason),
            Counter(self.by_device),
            Counter(self.by_register),
            self.accesses,
            self.ioeventfd,
        )

    def __sub__(self, other: ExitStats) -> ExitStats:
        def sub(a: Counter, b: Counter) -> Counter:
            return Counter({k: a[k] - b[k] for k in a if a[k] - b[k]})

        return ExitStats(
            self.total - other.total,
            sub(self.by_reason, other.by_reason),
            sub(self.by_device, other.by_device),
            sub(self.by_register, other.by_register),
            self.accesses - other.accesses,
            self.ioeventfd - other.ioeventfd,
        )

    def as_dict(self) -> dict:
        return {
            "total": self.total,
            "by_reason": dict(sorted(self.by_reason.items())),
            "by_device": dict(sorted(self.by_device.items())),
            "by_register": dict(sorted(self.by_register.items())),
        }

    def save_state(self) -> dict:
        """Everything, for a machine snapshot (``as_dict`` plus the access counters)."""
        return {**self.as_dict(), "accesses": self.accesses, "ioeventfd": self.ioeventfd}

    @classmethod
    def from_state(cls, d: dict) -> ExitStats:
        """Inverse of ``save_state`` (untrusted input: ValueError on a malformed one)."""
        try:
            out = cls(
                int(d["total"]),
                Counter({str(k): int(v) for k, v in d["by_reason"].items()}),
                Counter({str(k): int(v) for k, v in d["by_device"].items()}),
                Counter({str(k): int(v) for k, v in d["by_register"].items()}),
                int(d.get("accesses", 0)),
                int(d.get("ioeventfd", 0)),
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"malformed exit statistics: {e!r}") from None
        return out
