"""``virtio serve DEVICE``: run a vhost-user back-end (QEMU's "Back-end program conventions").

::

    virtio serve blk --socket-path /run/blk.sock --blk-file disk.img [--read-only]
                     [--format raw|qcow2] [--force] [--l2-cache-size BYTES]
                     [--num-queues N] [--queue-size N] [--serial ID] [--idle-timeout S]
                     [--cache none|writeback|writethrough|unsafe] [--aio io_uring|threads]
                     [--queue-threads N]
    virtio serve blk --fd 3 --blk-file disk.img        # socket inherited as fd 3
    virtio serve blk --print-capabilities             # JSON on stdout, then exit
    virtio serve rng --socket-path /run/rng.sock      # virtio-rng (os.getrandom)
    virtio serve input --socket-path /run/in.sock --kind tablet --control /run/in.ctl
                                                      # virtio-input (serve_input.py)
    virtio serve net --socket-path A --socket-path B [--tap IF]  # see serve_net.py
    virtio serve --export blk,id=d0,socket-path=/run/d0.sock,blk-file=d0.img \
                 --export rng,socket-path=/run/rng.sock --control /run/virtio.ctl
                                                      # several exports, one process

Every form may add ``--control PATH`` (the control socket: query-stats, query-config,
set-log-level, resize, export-add/export-del, ...) and ``--metrics-port PORT``
(Prometheus); see docs/operations.md.  A single-device form is the one-export case of
``--export`` (``_run_single``).

Logs go to stderr (``virtio -v serve ...`` for more).  SIGINT/SIGTERM end the
process cleanly (exit status 0); SIGUSR1 prints statistics on stderr (connections,
connections refused as busy, errors, requests resubmitted after reconnects, requests
per vring, the image's ``fdatasync`` calls); SIGHUP re-reads the image size and
announces a new capacity to the front-end (CONFIG_CHANGE_MSG on the back-end channel:
the guest sees the disk resized).  Bad arguments, a missing image, an image locked by
another process or an image of another format (qcow2, VMDK, ... found by its magic
when ``--format`` is not given; see ``virtio/devices/blk/probe.py``) print one error
line and exit non-zero before anything listens.

``--socket-path PATH`` holds a lock on ``PATH.lock`` while serving: a second back-end
on the same path exits with an error naming the first; a stale socket at ``PATH`` is
replaced, anything else there (a regular file, a live socket) is left alone with an
error.  One front-end is served at a time: another one connecting meanwhile is logged
("device busy") and disconnected at once (QEMU retries with ``reconnect=N``);
``--idle-timeout S`` also drops a connection that has sent nothing for S seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import signal
import sys
from dataclasses import dataclass, field
from typing import Any, NoReturn

import trio

from virtio.cli.logs import add_log_options

log = logging.getLogger("virtio.serve")

BLK_CAPABILITIES = {"type": "block", "features": ["read-only", "blk-file"]}
"""``--print-capabilities`` for blk (vhost-user.json ``VHostUserBackendCapabilitiesBlock``)."""
RNG_CAPABILITIES = {"type": "rng"}
"""``--print-capabilities`` for rng (vhost-user.json ``VHostUserBackendType`` ``rng``)."""


SIGNALS_HELP = """signals:
  SIGINT, SIGTERM  stop cleanly (exit status 0): the requests in flight complete
                   first (up to 5 s), then final statistics are printed
  SIGUSR1          print statistics on stderr (with a timestamp)
  SIGHUP           blk: re-read the image size and announce a resize to the guest

Without --socket-path or --fd the socket may come from systemd socket activation
(LISTEN_FDS); readiness is reported to $NOTIFY_SOCKET (Type=notify)."""


EXPORTS_HELP = """several exports in one process (as qemu-storage-daemon's --export):
  virtio serve --export blk,id=disk0,socket-path=/run/d0.sock,blk-file=d0.img \\
               --export blk,id=disk1,socket-path=/run/d1.sock,blk-file=d1.raw,read-only=on \\
               --export rng,socket-path=/run/rng.sock --control /run/virtio.ctl

  TYPE is blk, rng, input or net (every net export is a port of one switch; tap=IFNAME
  adds an uplink); KEY=VALUE are the long options of 'virtio serve TYPE' without
  the dashes (flags take on/off); id= names the export (default TYPE0, TYPE1, ...);
  a literal comma in a value is written ",,".  With --control, exports can be added
  and removed at run time (export-add, export-del) and queried (query-exports,
  query-stats, query-config); see docs/operations.md."""


def register(subparsers: Any) -> None:
    serve = subparsers.add_parser(
        "serve",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="serve virtio devices as vhost-user back-ends",
        description="Serve a virtio device to a vhost-user front-end (QEMU) on a unix socket, "
        "or several (--export).",
        epilog=EXPORTS_HELP + "\n\n" + SIGNALS_HELP,
    )
    serve.add_argument(
        "--export",
        action="append",
        default=[],
        metavar="TYPE,KEY=VALUE,...",
        help="serve this export (repeatable); see below",
    )
    _add_control_option(serve)
    add_log_options(serve)
    devices = serve.add_subparsers(dest="device", metavar="DEVICE")
    serve.set_defaults(func=lambda args: run_exports(args, serve))
    blk = devices.add_parser(
        "blk",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="virtio-blk over a raw image file or block device",
        description=(
            "vhost-user-blk back-end.  QEMU: -chardev socket,id=c,path=PATH "
            "-device vhost-user-blk-pci,chardev=c,num-queues=N "
            "(guest RAM must be shared: memory-backend-memfd,share=on)."
        ),
    )
    _add_blk_options(blk)
    blk.add_argument(
        "--print-capabilities", action="store_true", help="print capabilities as JSON and exit"
    )
    _add_control_option(blk)
    add_log_options(blk)
    blk.epilog = SIGNALS_HELP
    blk.set_defaults(func=run_blk)
    blk.error = lambda message: _fail(f"virtio serve blk: {message}", status=2)  # type: ignore[method-assign]
    rng = devices.add_parser(
        "rng",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="virtio-rng (entropy from the host's os.getrandom)",
        description=(
            "vhost-user-rng back-end.  QEMU: -chardev socket,id=c,path=PATH "
            "-device vhost-user-rng-pci,chardev=c "
            "(guest RAM must be shared: memory-backend-memfd,share=on)."
        ),
    )
    _add_rng_options(rng)
    rng.add_argument(
        "--print-capabilities", action="store_true", help="print capabilities as JSON and exit"
    )
    add_log_options(rng)
    _add_control_option(rng)
    rng.epilog = SIGNALS_HELP
    rng.set_defaults(func=run_rng)
    rng.error = lambda message: _fail(f"virtio serve rng: {message}", status=2)  # type: ignore[method-assign]

    from virtio.cli.serve_input import register_input

    register_input(
        devices, _add_listen_options, add_log_options, _add_control_option, SIGNALS_HELP, _fail
    )
    from virtio.cli.serve_net import register_net

    register_net(devices, _fail, SIGNALS_HELP)


def _add_blk_options(blk: argparse.ArgumentParser) -> None:
    """The options of one blk export (command line and --export / export-add)."""
    where = blk.add_mutually_exclusive_group()
    where.add_argument("--socket-path", metavar="PATH", help="listen on this unix socket")
    where.add_argument(
        "--fd", type=int, metavar="FDNUM", help="inherited unix socket (listening or connected)"
    )
    blk.add_argument(
        "--blk-file",
        metavar="PATH",
        help=(
            "image file or block device, or an NBD URI: nbd://HOST[:PORT]/EXPORT,"
            " nbd+unix:///EXPORT?socket=P, and over TLS nbds://... / nbds+unix://..."
            " (?tls-certificates=DIR, tls-verify-peer=false)"
        ),
    )
    blk.add_argument(
        "--format",
        choices=("raw", "qcow2"),
        help="image format (default: probe; an image of another format than raw is refused)",
    )
    blk.add_argument(
        "--l2-cache-size",
        type=_size,
        metavar="BYTES",
        help="qcow2: L2 table cache size (default as QEMU: the whole disk, at most 32M)",
    )
    blk.add_argument(
        "--force",
        action="store_true",
        help="serve a raw image whose size is not a multiple of 512 (the tail is not exposed)",
    )
    blk.add_argument("--read-only", action="store_true", help="export the image read-only")
    blk.add_argument(
        "--cache",
        choices=("none", "writeback", "writethrough", "unsafe"),
        default="writeback",
        help="as QEMU's cache=: none = O_DIRECT, the guest flushes the disk's cache; "
        "writeback = host page cache, the guest flushes; writethrough = every write "
        "durable before it completes; unsafe = flushes ignored (default: writeback)",
    )
    blk.add_argument(
        "--aio",
        choices=("io_uring", "threads"),
        default="io_uring",
        help="I/O engine of the data plane (default: io_uring, threads where it cannot run)",
    )
    blk.add_argument(
        "--queue-threads",
        type=int,
        default=None,
        metavar="N",
        help="data plane threads: N threads serve the queues round-robin (queue i on "
        "thread i mod N, as QEMU's iothread-vq-mapping), one io_uring each; 0: a "
        "thread per queue (default: 1 with --cache none and io_uring, else 0)",
    )
    blk.add_argument("--num-queues", type=int, default=1, metavar="N", help="virtqueues (1)")
    blk.add_argument(
        "--queue-size", type=int, default=256, metavar="N", help="maximum virtqueue size (256)"
    )
    blk.add_argument("--serial", default="", metavar="ID", help="disk serial (<= 20 ASCII bytes)")
    blk.add_argument(
        "--idle-timeout",
        type=float,
        metavar="S",
        help="close a connection that has sent nothing for S seconds (default: never); "
        "a front-end that has sent anything is never timed out",
    )
    blk.add_argument(
        "--incoming",
        action="store_true",
        help="the destination of a live migration: lock the image only when QEMU starts "
        "the device, after the source's back-end released it at the switch-over (the "
        "image is shared)",
    )
    blk.add_argument(  # testing aid: keeps requests in flight (reconnect tests)
        "--debug-request-delay", type=float, default=0.0, help=argparse.SUPPRESS
    )


def _add_rng_options(rng: argparse.ArgumentParser) -> None:
    """The options of one rng export."""
    where = rng.add_mutually_exclusive_group()
    where.add_argument("--socket-path", metavar="PATH", help="listen on this unix socket")
    where.add_argument(
        "--fd", type=int, metavar="FDNUM", help="inherited unix socket (listening or connected)"
    )


def _add_listen_options(parser: argparse.ArgumentParser) -> None:
    """--socket-path / --fd and --print-capabilities (devices with their own run_*)."""
    _add_rng_options(parser)
    parser.add_argument(
        "--print-capabilities", action="store_true", help="print capabilities as JSON and exit"
    )


def _add_control_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--control",
        metavar="PATH",
        help="also listen on this unix socket for control commands (JSON lines, "
        'QMP-like: {"execute": "query-commands"}; see docs/operations.md)',
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve the statistics for Prometheus on http://ADDRESS:PORT/metrics "
        "(0: any free port, logged)",
    )
    parser.add_argument(
        "--metrics-address",
        default="127.0.0.1",
        metavar="ADDRESS",
        help="address of the metrics endpoint (default 127.0.0.1)",
    )


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _size(text: str) -> int:
    """A byte count, with an optional K/M/G suffix (powers of 1024)."""
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
    try:
        value = int(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return value


def _now() -> str:
    """A UTC timestamp for statistics lines (``virtio serve net`` uses it too)."""
    import datetime

    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _fail(message: str, *, status: int = 1) -> NoReturn:
    print(message, file=sys.stderr, flush=True)
    raise SystemExit(status)


class ExportError(Exception):
    """An export cannot be made: bad options (``status`` 2) or the device cannot be
    opened (1).  The command line prints it and exits; ``export-add`` answers it."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


# -- building one export -------------------------------------------------------------------
def build_blk(args: argparse.Namespace) -> Any:
    """The ``VirtioBlk`` of a blk export's options (ExportError if it cannot be)."""
    if not args.blk_file:
        raise ExportError("--blk-file is required", status=2)
    if args.idle_timeout is not None and not args.idle_timeout > 0:
        raise ExportError("--idle-timeout must be a positive number of seconds", status=2)
    from virtio.devices.blk import BlkOptions, ImageFormatError, ImageLockedError, VirtioBlk
    from virtio.devices.blk.nbd import NbdError

    try:
        opts = BlkOptions(
            path=args.blk_file,
            read_only=args.read_only,
            num_queues=args.num_queues,
            queue_size=args.queue_size,
            serial=args.serial,
            cache=args.cache,
            aio=args.aio,
            queue_threads=args.queue_threads,
            incoming=args.incoming,
        )
    except ValueError as exc:
        raise ExportError(str(exc), status=2) from None
    try:
        device = VirtioBlk.from_options(
            opts, image_format=args.format, force=args.force, l2_cache_size=args.l2_cache_size
        )
    except (ImageLockedError, ImageFormatError, NbdError) as exc:
        raise ExportError(str(exc)) from None
    except OSError as exc:
        hint = (
            " (--cache none needs O_DIRECT, which this file system refuses)"
            if (args.cache == "none" and exc.errno == errno.EINVAL)
            else ""
        )
        raise ExportError(f"cannot open {args.blk_file}: {exc.strerror or exc}{hint}") from None
    if args.debug_request_delay > 0:
        _delay_requests(device, args.debug_request_delay)
    from virtio.devices.blk.dataplane import engine_for

    device.summary = (  # the listening line shows it
        f"{args.blk_file}, {device.capacity} sectors, cache={args.cache} "
        f"aio={args.aio} (running: {engine_for(args.aio)})"
    )
    return device


def build_rng(args: argparse.Namespace) -> Any:
    from virtio.devices.rng import VirtioRng

    return VirtioRng()


def _add_input_options(parser: argparse.ArgumentParser) -> None:
    """The options of one input export (a built-in --kind or an evdev)."""
    from virtio.cli.serve_input import add_input_source_options

    _add_rng_options(parser)
    add_input_source_options(parser)


def build_input(args: argparse.Namespace) -> Built:
    """A virtio-input export: the device, its evdev reader (if any) as the export's
    task, and its control commands (``inject``, ``type``, ... with ``export``)."""
    from virtio.cli.serve_input import build_input_device
    from virtio.control import CommandRegistry
    from virtio.device import ControlCommand
    from virtio.devices.input.control import register_input_commands

    try:
        device, source = build_input_device(args)
    except ValueError as exc:
        raise ExportError(str(exc), status=2) from None
    except OSError as exc:
        raise ExportError(f"{args.evdev_path}: {exc}") from None
    scratch = CommandRegistry()
    register_input_commands(scratch, device)
    commands = {n: ControlCommand(h, help) for n, (h, help) in scratch.entries().items()}
    if source is None:
        return Built(device, commands=commands)
    return Built(device, tasks=[lambda: source.run(device)], close=source.close, commands=commands)


def _add_net_options(parser: argparse.ArgumentParser) -> None:
    from virtio.cli.serve_net import add_net_export_options

    add_net_export_options(parser)


def _build_net(args: argparse.Namespace) -> Any:
    """A port on the process's one switch of net exports (serve_net.py ``NetHub``)."""
    from virtio.cli.serve_net import build_net_export

    return build_net_export(args)


@dataclass
class Built:
    """What a device builder made beyond the device (see ``Export``)."""

    device: Any
    tasks: list[Any] = field(default_factory=list)
    close: Any = None
    commands: dict[str, Any] = field(default_factory=dict)


EXPORT_TYPES = {
    "blk": (_add_blk_options, build_blk),
    "rng": (_add_rng_options, build_rng),
    "input": (_add_input_options, build_input),
    "net": (_add_net_options, _build_net),
}
"""Device types an export can have: (their options, the device builder: a device or a
``Built``)."""


def make_export(kind: str, args: argparse.Namespace, export_id: str, *, name: str) -> Any:
    """An ``Export`` (not serving yet) of device type ``kind`` from its options."""
    from virtio.exports import Export
    from virtio.transport.vhost_user.server import VhostUserServer

    if args.socket_path is None and args.fd is None:
        raise ExportError("socket-path (or fd) is required", status=2)
    args.export_id = export_id  # a net port is named after its export
    built = EXPORT_TYPES[kind][1](args)
    if not isinstance(built, Built):
        built = Built(built, close=getattr(built, "close", None))
    device = built.device
    server = VhostUserServer(device, name=name, idle_timeout=getattr(args, "idle_timeout", None))
    options = {
        k.replace("_", "-"): v
        for k, v in vars(args).items()
        if v not in (None, False, "") and not k.startswith("debug") and k != "export_id"
    }
    return Export(
        export_id,
        kind,
        device,
        server,
        socket_path=args.socket_path,
        fd=args.fd,
        options=options,
        close=built.close,
        tasks=built.tasks,
        commands=built.commands,
    )


class _ExportParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ExportError(message, status=2)


def _export_parser(kind: str) -> argparse.ArgumentParser:
    parser = _ExportParser(prog=f"export {kind}", add_help=False)
    EXPORT_TYPES[kind][0](parser)
    return parser


def export_argv(parser: argparse.ArgumentParser, options: dict[str, Any]) -> list[str]:
    """``{"socket-path": P, "read-only": True}`` -> ``["--socket-path", P, "--read-only"]``
    (flags take a boolean or on/off/yes/no/true/false)."""
    flags = {a.dest for a in parser._actions if a.nargs == 0}
    argv: list[str] = []
    for key, value in options.items():
        opt = key.replace("_", "-")
        if opt.replace("-", "_") in flags:
            if isinstance(value, str):
                if value.lower() not in ("on", "off", "yes", "no", "true", "false", ""):
                    raise ExportError(f"{opt}: expected on or off, not {value!r}", status=2)
                value = value.lower() in ("on", "yes", "true", "")
            if value:
                argv.append(f"--{opt}")
        else:
            argv += [f"--{opt}", str(value)]
    return argv


def parse_export_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``TYPE,KEY=VALUE,...`` -> (type, {key: value}); ``,,`` is a literal comma and a
    KEY without ``=`` is a flag set on."""
    parts = [p.replace("\0", ",") for p in spec.replace(",,", "\0").split(",")]
    kind, options = parts[0].strip(), {}
    if kind.startswith("type="):
        kind = kind.removeprefix("type=")
    for part in parts[1:]:
        if not part:
            continue
        key, sep, value = part.partition("=")
        key = key.strip()
        if key in options:
            raise ExportError(f"{key} given twice", status=2)
        options[key] = value if sep else "on"
    return kind, options


def export_from_options(
    kind: str, options: dict[str, Any], default_id: str, *, name: str | None = None
) -> Any:
    """An ``Export`` from export options (``--export`` / ``export-add``'s arguments)."""
    if kind not in EXPORT_TYPES:
        raise ExportError(
            f"unknown export type {kind!r} (known: {', '.join(EXPORT_TYPES)})", status=2
        )
    options = dict(options)
    export_id = str(options.pop("id", default_id))
    parser = _export_parser(kind)
    args = parser.parse_args(export_argv(parser, options))
    return make_export(kind, args, export_id, name=name or f"virtio-{kind}[{export_id}]")


# -- the single-device forms ---------------------------------------------------------------
def run_blk(args: argparse.Namespace) -> int:
    if args.print_capabilities:
        print(json.dumps(BLK_CAPABILITIES))
        return 0
    return _run_single("blk", args)


def run_rng(args: argparse.Namespace) -> int:
    if args.print_capabilities:
        print(json.dumps(RNG_CAPABILITIES))
        return 0
    return _run_single("rng", args)


def _run_single(kind: str, args: argparse.Namespace) -> int:
    """``virtio serve KIND ...``: the one-export case of ``virtio serve --export``."""
    _socket_from_systemd(args, kind)
    try:
        export = make_export(kind, args, f"{kind}0", name=f"virtio-{kind}")
    except ExportError as exc:
        _fail(f"virtio serve {kind}: {exc}", status=exc.status)
    try:
        return trio.run(_serve_exports, [export], args, f"virtio serve {kind}")
    except* OSError as group:  # trio >= 0.25 raises a nursery's errors as a group
        _fail(f"virtio serve {kind}: {_first_leaf(group)}")
    finally:
        export.release()


def _socket_from_systemd(args: argparse.Namespace, device: str) -> None:
    """Without --socket-path or --fd, take the socket systemd passed (socket
    activation: ``LISTEN_FDS``); otherwise exit with a usage error."""
    from virtio.cli.systemd import listen_fds

    if args.socket_path is not None or args.fd is not None:
        return
    fds = listen_fds()
    if len(fds) == 1:
        args.fd = fds[0]
        return
    if fds:
        _fail(f"virtio serve {device}: systemd passed {len(fds)} sockets, expected one", status=2)
    _fail(
        f"virtio serve {device}: one of --socket-path or --fd is required "
        "(or a socket from systemd socket activation)",
        status=2,
    )


def _first_leaf(group: BaseExceptionGroup) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


# -- several exports -----------------------------------------------------------------------
def run_exports(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``virtio serve --export SPEC [--export SPEC ...] [--control PATH]``."""
    if not args.export:
        return _usage(parser)
    exports: list[Any] = []
    counts: dict[str, int] = {}
    try:
        for spec in args.export:
            kind, options = parse_export_spec(spec)
            n = counts.get(kind, 0)
            counts[kind] = n + 1
            try:
                export = export_from_options(kind, options, f"{kind}{n}")
            except ExportError as exc:
                raise ExportError(f"--export {spec}: {exc}", exc.status) from None
            if any(e.id == export.id for e in exports):
                export.release()
                raise ExportError(f"--export {spec}: id {export.id!r} is used twice", 2)
            exports.append(export)
    except ExportError as exc:
        for export in exports:
            export.release()
        _fail(f"virtio serve: {exc}", status=exc.status)
    try:
        return trio.run(_serve_exports, exports, args, "virtio serve")
    except* OSError as group:
        _fail(f"virtio serve: {_first_leaf(group)}")
    finally:
        for export in exports:
            export.release()


def _delay_requests(device: Any, seconds: float) -> None:
    """Testing aid: every request waits ``seconds`` before it runs."""
    handle = device.handle

    async def delayed(queue_index: int, chain: Any) -> int:
        await trio.sleep(seconds)
        return await handle(queue_index, chain)

    device.handle = delayed
    device.native_dataplane = False  # every request must go through the delayed handle


def _print_statistics(prefix: str, exports: Any, *, single: bool, stamp: bool) -> None:
    """One line per export, from the same snapshot ``query-stats`` returns."""
    from virtio.exports import now

    time = f" time={now()}" if stamp else ""
    for export in list(exports):
        who = "" if single else f" export {export.id} ({export.kind}):"
        print(
            f"{prefix}:{who} statistics: {export.statistics_line()}{time}",
            file=sys.stderr,
            flush=True,
        )


def _factory(arguments: dict[str, Any], taken: Any) -> Any:
    """``export-add``: an export from the control request's arguments."""
    from virtio.control import ArgumentError

    arguments = dict(arguments)
    kind = arguments.pop("type", None)
    if not isinstance(kind, str):
        raise ArgumentError(f"'type' is required: one of {', '.join(EXPORT_TYPES)}")
    if "id" not in arguments:
        n = 0
        while f"{kind}{n}" in taken:
            n += 1
        arguments["id"] = f"{kind}{n}"
    if str(arguments["id"]) in taken:
        raise ArgumentError(f"an export with id {arguments['id']!r} exists already")
    if "fd" in arguments:
        raise ArgumentError("export-add takes socket-path, not fd")
    try:
        return export_from_options(kind, arguments, str(arguments["id"]))
    except ExportError as exc:
        raise ArgumentError(str(exc)) from None


async def _serve_metrics(port: int, address: str, exports_set: Any) -> None:
    """The Prometheus endpoint until cancelled (``virtio.metrics``)."""
    from virtio.metrics import start_metrics_server

    stop = start_metrics_server(port, address, exports_set.snapshot)
    try:
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):  # a scrape in progress waits for this thread
            await trio.to_thread.run_sync(stop)


async def _serve(
    device: Any,
    args: argparse.Namespace,
    kind: str = "blk",
    statistics: Any = None,
    registry: Any = None,
    background: Any = (),
) -> int:
    """Serve one ``device`` built by the caller (a device type's ``run_*``) on
    ``args.socket_path`` / ``args.fd``: the single-device form.  ``statistics(device,
    server)``, if given, replaces the server's words of the SIGUSR1 line; ``registry``
    is the control socket's (the caller may have registered commands in it)."""
    from virtio.exports import Export
    from virtio.transport.vhost_user.server import VhostUserServer

    server = VhostUserServer(
        device, name=f"virtio-{kind}", idle_timeout=getattr(args, "idle_timeout", None)
    )
    export = Export(f"{kind}0", kind, device, server, socket_path=args.socket_path, fd=args.fd)
    if statistics is not None:
        export.statistics_words = lambda: statistics(device, server)
    return await _serve_exports(
        [export], args, f"virtio serve {kind}", registry, background=background
    )


async def _serve_exports(
    exports: list[Any],
    args: argparse.Namespace,
    prefix: str,
    registry: Any = None,
    *,
    background: Any = (),
) -> int:
    """Serve ``exports`` until SIGINT/SIGTERM (or, for an inherited connected fd, until
    that connection ends); SIGUSR1 prints statistics; SIGHUP resizes blk exports;
    with ``--control PATH`` the control commands are served on PATH too."""
    from virtio.cli.systemd import notify
    from virtio.control.server import serve_control
    from virtio.exports import ExportSet
    from virtio.transport.vhost_user.server import stop_servers

    single = prefix != "virtio serve"
    control = getattr(args, "control", None)
    exports_set = ExportSet(registry)
    served = list(exports)  # every export of this run, for the final statistics

    def factory(arguments: dict[str, Any]) -> Any:
        export = _factory(arguments, exports_set.exports)
        served.append(export)
        return export

    exports_set.factory = factory
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)
    with trio.open_signal_receiver(*signals) as receiver:
        async with trio.open_nursery() as nursery:
            if single or not control:  # nothing left to serve: stop
                exports_set.on_empty = nursery.cancel_scope.cancel
            await nursery.start(exports_set.run)
            for export in exports:
                await exports_set.add(export)
            if control:
                await nursery.start(serve_control, control, exports_set.registry)
            port = getattr(args, "metrics_port", None)
            if port is not None:
                nursery.start_soon(_serve_metrics, port, args.metrics_address, exports_set)
            for task in background:  # e.g. an input device's evdev reader
                nursery.start_soon(task)
            notify("READY=1")  # systemd Type=notify: we listen now
            async for signum in receiver:
                if signum == signal.SIGHUP:
                    for export in list(exports_set.exports.values()):
                        if export.kind == "blk":
                            with contextlib.suppress(OSError):
                                export.device.resize_and_announce()
                    continue
                if signum == signal.SIGUSR1:
                    _print_statistics(
                        prefix, exports_set.exports.values(), single=single, stamp=True
                    )
                    continue
                log.info("%s: shutting down", signal.Signals(signum).name)
                notify("STOPPING=1")
                await stop_servers(e.server for e in exports_set.exports.values())
                nursery.cancel_scope.cancel()
                break
    _print_statistics(prefix, served, single=single, stamp=False)
    return 0
