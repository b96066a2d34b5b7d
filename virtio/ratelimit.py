"""Rate-limited logging: a guest must not be able to fill the host's log.

A driver (or a failing disk) can cause one error per request, tens of thousands a
second.  ``LogRateLimiter`` lets the first ``burst`` messages of a *kind* through in
each ``interval`` and counts the rest; the first message of a kind after its window
closes (or ``flush()``) reports what was held back::

    virtio-blk: IN sector 8 failed: [Errno 28] No space left on device
    ...
    virtio-blk: ... and 31,700 more 'IOERR' messages in the last 10.0 s

Kinds are independent (an IOERR storm does not hide a driver error).  The clock is
injectable for tests.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(slots=True)
class _Window:
    start: float
    logged: int = 0
    held: int = 0


@dataclass
class LogRateLimiter:
    """Log through ``logger`` at most ``burst`` messages per kind per ``interval`` s."""

    logger: logging.Logger
    interval: float = 10.0
    burst: int = 5
    clock: Callable[[], float] = time.monotonic
    suppressed: dict[str, int] = field(default_factory=dict)
    """Messages held back so far, per kind (statistics; cumulative)."""
    _windows: dict[str, _Window] = field(default_factory=dict, repr=False)

    def log(self, level: int, kind: str, msg: str, *args: object) -> bool:
        """Log ``msg % args`` unless ``kind`` is over its budget; returns whether it
        was logged."""
        now = self.clock()
        w = self._windows.get(kind)
        if w is None or now - w.start >= self.interval:
            if w is not None:
                self._report(level, kind, w, now)
            w = self._windows[kind] = _Window(now)
        if w.logged < self.burst:
            w.logged += 1
            self.logger.log(level, msg, *args)
            return True
        w.held += 1
        self.suppressed[kind] = self.suppressed.get(kind, 0) + 1
        return False

    def warning(self, kind: str, msg: str, *args: object) -> bool:
        return self.log(logging.WARNING, kind, msg, *args)

    def flush(self, level: int = logging.WARNING) -> None:
        """Report every kind's held-back count now (at shutdown or reset)."""
        now = self.clock()
        for kind, w in list(self._windows.items()):
            self._report(level, kind, w, now)
        self._windows.clear()

    def _report(self, level: int, kind: str, w: _Window, now: float) -> None:
        if w.held:
            self.logger.log(
                level,
                "... and %s more %r messages in the last %.1f s",
                f"{w.held:,}",
                kind,
                min(max(now - w.start, 0.0), self.interval),
            )
            w.held = 0
