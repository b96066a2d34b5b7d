"""What ``virtio serve blk`` loads when it starts.

A back-end restarts on every upgrade and after every crash, and QEMU's ``reconnect=1``
tries again after one second: a start-up that takes longer costs the guest another
second of stalled I/O.  Only the subcommand asked for is registered (its options
import what they need), and nothing on the way imports pytest (through
``trio.testing``), pycparser (a cdef parsed at run time) or the emulator.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_LOADED = """
import json, sys
from virtio.cli import _requested, build_parser
argv = ["-v", "serve", "blk", "--socket-path", "s", "--blk-file", "d", "--cache", "none"]
args = build_parser(_requested(argv)).parse_args(argv)
# what the blk back-end imports to serve, beyond its options
from virtio.devices.blk import VirtioBlk
from virtio.devices.blk.dataplane import engine_for
from virtio.devices.blk.qcow2.image import Qcow2Image
from virtio.exports import Export
from virtio.transport.vhost_user.server import VhostUserServer
print(json.dumps([args.command, sorted({m.split(".")[0] for m in sys.modules})]))
"""


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, cwd=REPO, timeout=60
    )


def test_serve_blk_imports_no_test_tools_parser_or_emulator() -> None:
    out = _run("-c", _LOADED)
    assert out.returncode == 0, out.stderr
    command, top = json.loads(out.stdout)
    assert command == "serve"
    assert {"virtio", "trio"} <= set(top)
    assert not {"pytest", "_pytest", "pycparser", "emulator"} & set(top), top


def test_every_subcommand_is_still_offered() -> None:
    from virtio.cli import SUBCOMMANDS

    top = _run("-m", "virtio", "--help")
    assert top.returncode == 0, top.stderr
    for name in SUBCOMMANDS:
        assert name.replace("_", "-") in top.stdout, (name, top.stdout)
    one = _run("-m", "virtio", "-v", "run-driver", "--help")
    assert one.returncode == 0 and "--inject" in one.stdout, one.stdout + one.stderr
    bad = _run("-m", "virtio", "nosuch")
    assert bad.returncode == 2
    assert "invalid choice: 'nosuch'" in bad.stderr and "run-driver" in bad.stderr, bad.stderr
