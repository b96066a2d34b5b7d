"""``virtio serve input``: the vhost-user-input back-end (QEMU's back-end conventions).

::

    virtio serve input --socket-path /run/kbd.sock --kind keyboard --control /run/kbd.ctl
    virtio serve input --socket-path /run/in.sock --evdev-path /dev/input/event3 [--no-grab]
    virtio serve input --print-capabilities          # {"type": "input"}

QEMU: ``-chardev socket,id=c,path=PATH -device vhost-user-input-pci,chardev=c``
(QEMU 7.2 refuses it without KVM, "requires kvm"; 10.0 runs it under TCG).  A
built-in ``--kind`` is driven through ``--control`` (see
``virtio/devices/input/control.py``); an evdev is passed through, grabbed, with the
guest's LEDs written back to it.  ``--name``/``--serial`` override what the guest
sees.  SIGTERM/SIGINT stop cleanly; SIGUSR1 prints statistics.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import trio

INPUT_CAPABILITIES = {"type": "input"}
"""``--print-capabilities`` (vhost-user.json ``VHostUserBackendType`` ``input``)."""


def register_input(devices: Any, add_listen, add_log, add_control, epilog: str, fail) -> None:
    p = devices.add_parser(
        "input",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="virtio-input: evdev passthrough or a built-in keyboard/mouse/tablet/touchscreen",
        description=(
            "vhost-user-input back-end.  QEMU 10: -chardev socket,id=c,path=PATH "
            "-device vhost-user-input-pci,chardev=c "
            "(guest RAM must be shared: memory-backend-memfd,share=on)."
        ),
    )
    add_listen(p)
    add_log(p)
    add_control(p)
    add_input_source_options(p)
    p.epilog = epilog
    p.set_defaults(func=lambda args: run_input(args, fail))
    p.error = lambda message: fail(f"virtio serve input: {message}", status=2)  # type: ignore[method-assign]


def add_input_source_options(p: argparse.ArgumentParser) -> None:
    """Where the events come from (``serve input`` and ``--export input,...``)."""
    from virtio.devices.input.capabilities import KINDS

    src = p.add_mutually_exclusive_group()
    src.add_argument("--evdev-path", metavar="DEV", help="pass through /dev/input/eventN")
    src.add_argument("--kind", choices=KINDS, help="a built-in device driven by --control")
    p.add_argument("--no-grab", action="store_true", help="do not EVIOCGRAB the evdev")
    p.add_argument("--name", help="device name the guest sees (default: the source's)")
    p.add_argument("--serial", help="serial (uniq) the guest sees")


def build_input_device(args: argparse.Namespace) -> tuple[Any, Any]:
    """(VirtioInput, its EvdevSource or None) from the source options; ValueError when
    neither or both sources are given, OSError when the evdev cannot be opened."""
    from virtio.devices.input import VirtioInput, builtin
    from virtio.devices.input.evdev_source import EvdevSource

    if (args.evdev_path is None) == (args.kind is None):
        raise ValueError("one of --evdev-path or --kind is required")
    if args.evdev_path is not None:
        source = EvdevSource(args.evdev_path, grab=not args.no_grab)
        caps = source.capabilities(name=args.name, serial=args.serial)
        return VirtioInput(caps, status_sink=source.write_status), source
    return VirtioInput(builtin(args.kind, name=args.name, serial=args.serial or "")), None


def run_input(args: argparse.Namespace, fail) -> int:
    if args.print_capabilities:
        print(json.dumps(INPUT_CAPABILITIES))
        return 0
    from virtio.cli.serve import _first_leaf, _serve, _socket_from_systemd
    from virtio.control import CommandRegistry
    from virtio.devices.input.control import register_input_commands

    _socket_from_systemd(args, "input")
    try:
        device, source = build_input_device(args)
    except ValueError as exc:
        fail(f"virtio serve input: {exc}", status=2)
    except OSError as exc:
        fail(f"virtio serve input: {args.evdev_path}: {exc}")
    registry = CommandRegistry()
    register_input_commands(registry, device)

    def statistics(dev: Any, server: Any) -> str:
        parts = [f"connections={server.connections}"]
        parts += [f"{k}={v}" for k, v in dev.statistics().items()]
        parts.append(f"needs_reset={int(dev.needs_reset)}")
        return " ".join(parts)

    background = [] if source is None else [lambda: source.run(device)]
    try:
        return trio.run(_serve, device, args, "input", statistics, registry, background)
    except* OSError as group:
        fail(f"virtio serve input: {_first_leaf(group)}")
    finally:
        if source is not None:
            source.close()
    return 1
