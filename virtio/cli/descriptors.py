"""``virtio descriptors``: vhost-user back-end descriptor files for management tools.

QEMU's ``docs/interop/vhost-user.json`` lets libvirt and other management software
discover back-ends from JSON files (one ``VhostUserBackend`` each: description,
type, absolute binary) in ``/usr/share/qemu/vhost-user``, ``/etc/qemu/vhost-user``
or ``$XDG_CONFIG_HOME/qemu/vhost-user``, sorted by file name::

    virtio descriptors                         # print them
    virtio descriptors --install /etc/qemu/vhost-user
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from virtio.cli.backends import EXECUTABLES

PRIORITY = 50


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "descriptors",
        help="vhost-user back-end descriptor files (QEMU vhost-user.json) for libvirt",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
    )
    p.add_argument(
        "--install",
        metavar="DIR",
        help="write 50-pyvirtio-*.json into DIR (e.g. /etc/qemu/vhost-user) instead of printing",
    )
    p.set_defaults(func=run)


def binary_path(script: str) -> str:
    """Absolute path of an installed console script (beside this interpreter first)."""
    beside = Path(sys.executable).parent / script
    if beside.exists():
        return os.fspath(beside.absolute())
    found = shutil.which(script)
    if found is None:
        raise FileNotFoundError(f"{script} is not installed (pip install the package first)")
    return os.fspath(Path(found).absolute())


def descriptors() -> dict[str, dict[str, Any]]:
    """File name -> ``VhostUserBackend`` document, for every device we ship."""
    out = {}
    for vu_type, (script, device) in EXECUTABLES.items():
        out[f"{PRIORITY}-pyvirtio-{device}.json"] = {
            "description": f"pyvirtio vhost-user {device} back-end",
            "type": vu_type,
            "binary": binary_path(script),
        }
    return out


def run(args: argparse.Namespace) -> int:
    docs = descriptors()
    if args.install is None:
        for name, doc in docs.items():
            print(f"# {name}\n{json.dumps(doc, indent=2)}")
        return 0
    target = Path(args.install)
    target.mkdir(parents=True, exist_ok=True)
    for name, doc in docs.items():
        (target / name).write_text(json.dumps(doc, indent=2) + "\n")
        print(target / name)
    return 0
