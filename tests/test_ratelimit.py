"""``virtio.ratelimit.LogRateLimiter``: a guest cannot fill the host's log."""

from __future__ import annotations

import logging

from virtio.ratelimit import LogRateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_counts(caplog):
    clock = Clock()
    lim = LogRateLimiter(logging.getLogger("t.rl"), interval=10.0, burst=3, clock=clock)
    with caplog.at_level(logging.WARNING, "t.rl"):
        logged = [lim.warning("IOERR", "req %d failed", i) for i in range(31_703)]
        other = lim.warning("driver", "a driver error")  # another kind has its own budget
        clock.now += 10.0
        lim.warning("IOERR", "req again failed")
    assert logged[:3] == [True] * 3 and not any(logged[3:])
    assert other
    messages = [r.getMessage() for r in caplog.records]
    assert messages[:3] == ["req 0 failed", "req 1 failed", "req 2 failed"]
    assert messages[3] == "a driver error"
    assert messages[4] == "... and 31,700 more 'IOERR' messages in the last 10.0 s"
    assert messages[5] == "req again failed"
    assert len(messages) == 6
    assert lim.suppressed == {"IOERR": 31_700}


def test_flush_reports_held_messages(caplog):
    clock = Clock()
    lim = LogRateLimiter(logging.getLogger("t.rl2"), interval=10.0, burst=1, clock=clock)
    with caplog.at_level(logging.WARNING, "t.rl2"):
        for _ in range(5):
            lim.warning("IOERR ENOSPC", "no space")
        clock.now += 2.5
        lim.flush()
        lim.flush()  # nothing more to say
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["no space", "... and 4 more 'IOERR ENOSPC' messages in the last 2.5 s"]
