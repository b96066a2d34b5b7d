"""Dedicated back-end executables, one per device type.

QEMU's vhost-user back-end discovery (``docs/interop/vhost-user.json``,
``VhostUserBackend``) names an absolute ``binary`` per backend type, with no room
for a subcommand, and management software (libvirt) runs it with the standard
options (``--socket-path``/``--fd``, ``--print-capabilities``, and the type's own:
``--blk-file``, ``--read-only`` for block).  So each device has its own console
script that is ``virtio serve DEVICE`` with the same options.
"""

from __future__ import annotations

import sys

from virtio.cli import main

EXECUTABLES = {
    "block": ("pyvirtio-vhost-user-blk", "blk"),
    "rng": ("pyvirtio-vhost-user-rng", "rng"),
    "net": ("pyvirtio-vhost-user-net", "net"),
    "input": ("pyvirtio-vhost-user-input", "input"),
}
"""vhost-user.json backend type -> (console script, ``virtio serve`` device)."""


def _run(device: str) -> int:
    return main(["serve", device, *sys.argv[1:]])


def blk() -> int:
    """``pyvirtio-vhost-user-blk``: ``virtio serve blk``."""
    return _run("blk")


def rng() -> int:
    """``pyvirtio-vhost-user-rng``: ``virtio serve rng``."""
    return _run("rng")


def net() -> int:
    """``pyvirtio-vhost-user-net``: ``virtio serve net``."""
    return _run("net")


def input_() -> int:
    """``pyvirtio-vhost-user-input``: ``virtio serve input``."""
    return _run("input")
