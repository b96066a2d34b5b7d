"""File-descriptor helpers for tests of code that receives fds (SCM_RIGHTS)."""

from __future__ import annotations

import os


def make_fds(count: int) -> list[int]:
    """``count`` open fds (read ends of pipes whose write ends are closed)."""
    fds = []
    for _ in range(count):
        r, w = os.pipe()
        os.close(w)
        fds.append(r)
    return fds


def is_open(fd: int) -> bool:
    """Whether ``fd`` is an open descriptor of this process (leak checks)."""
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True
