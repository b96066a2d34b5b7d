"""``virtio serve DEVICE``: run a vhost-user back-end (QEMU's "Back-end program conventions").

::

    virtio serve blk --socket-path /run/blk.sock --blk-file disk.img [--read-only]
                     [--format raw|qcow2] [--force] [--l2-cache-size BYTES]
                     [--num-queues N] [--queue-size N] [--serial ID] [--idle-timeout S]
                     [--cache none|writeback|writethrough|unsafe] [--aio io_uring|threads]
    virtio serve blk --fd 3 --blk-file disk.img        # socket inherited as fd 3
    virtio serve blk --print-capabilities             # JSON on stdout, then exit
    virtio serve rng --socket-path /run/rng.sock      # virtio-rng (os.getrandom)
    virtio serve net --socket-path A --socket-path B [--tap IF]  # see serve_net.py

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
import errno
import json
import logging
import signal
import sys
from typing import Any, NoReturn

import trio

from virtio.cli.logs import add_log_options

log = logging.getLogger("virtio.serve")

BLK_CAPABILITIES = {"type": "block", "features": ["read-only", "blk-file"]}
"""``--print-capabilities`` for blk (vhost-user.json ``VHostUserBackendCapabilitiesBlock``)."""
RNG_CAPABILITIES = {"type": "rng"}
"""``--print-capabilities`` for rng (vhost-user.json ``VHostUserBackendType`` ``rng``)."""


SIGNALS_HELP = """signals:
  SIGINT, SIGTERM  stop cleanly (exit status 0), printing final statistics
  SIGUSR1          print statistics on stderr (with a timestamp)
  SIGHUP           blk: re-read the image size and announce a resize to the guest

Without --socket-path or --fd the socket may come from systemd socket activation
(LISTEN_FDS); readiness is reported to $NOTIFY_SOCKET (Type=notify)."""


def register(subparsers: Any) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="serve a virtio device as a vhost-user back-end",
        description="Serve a virtio device to a vhost-user front-end (QEMU) on a unix socket.",
    )
    devices = serve.add_subparsers(dest="device", metavar="DEVICE")
    serve.set_defaults(func=lambda args: _usage(serve))
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
    where = blk.add_mutually_exclusive_group()
    where.add_argument("--socket-path", metavar="PATH", help="listen on this unix socket")
    where.add_argument(
        "--fd", type=int, metavar="FDNUM", help="inherited unix socket (listening or connected)"
    )
    blk.add_argument(
        "--blk-file",
        metavar="PATH",
        help="image file or block device, or nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=P",
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
        "--print-capabilities", action="store_true", help="print capabilities as JSON and exit"
    )
    blk.add_argument(  # testing aid: keeps requests in flight (reconnect tests)
        "--debug-request-delay", type=float, default=0.0, help=argparse.SUPPRESS
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
    _add_listen_options(rng)
    add_log_options(rng)
    _add_control_option(rng)
    rng.epilog = SIGNALS_HELP
    rng.set_defaults(func=run_rng)
    rng.error = lambda message: _fail(f"virtio serve rng: {message}", status=2)  # type: ignore[method-assign]
    from virtio.cli.serve_net import register_net

    register_net(devices, _fail, SIGNALS_HELP)


def _add_control_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--control",
        metavar="PATH",
        help="also listen on this unix socket for control commands (JSON lines, "
        'QMP-like: {"execute": "query-commands"}; see virtio/control/)',
    )


def _add_listen_options(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--socket-path", metavar="PATH", help="listen on this unix socket")
    where.add_argument(
        "--fd", type=int, metavar="FDNUM", help="inherited unix socket (listening or connected)"
    )
    parser.add_argument(
        "--print-capabilities", action="store_true", help="print capabilities as JSON and exit"
    )


def _now() -> str:
    import datetime

    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


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


def _fail(message: str, *, status: int = 1) -> NoReturn:
    print(message, file=sys.stderr, flush=True)
    raise SystemExit(status)


def run_blk(args: argparse.Namespace) -> int:
    if args.print_capabilities:
        print(json.dumps(BLK_CAPABILITIES))
        return 0
    _socket_from_systemd(args, "blk")
    if not args.blk_file:
        _fail("virtio serve blk: --blk-file is required", status=2)
    if args.idle_timeout is not None and not args.idle_timeout > 0:
        _fail("virtio serve blk: --idle-timeout must be a positive number of seconds", status=2)
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
        )
    except ValueError as exc:
        _fail(f"virtio serve blk: {exc}", status=2)
    try:
        device = VirtioBlk.from_options(
            opts, image_format=args.format, force=args.force, l2_cache_size=args.l2_cache_size
        )
    except (ImageLockedError, ImageFormatError, NbdError) as exc:
        _fail(f"virtio serve blk: {exc}")
    except OSError as exc:
        hint = (
            " (--cache none needs O_DIRECT, which this file system refuses)"
            if (args.cache == "none" and exc.errno == errno.EINVAL)
            else ""
        )
        _fail(f"virtio serve blk: cannot open {args.blk_file}: {exc.strerror or exc}{hint}")
    if args.debug_request_delay > 0:
        _delay_requests(device, args.debug_request_delay)
    from virtio.devices.blk.dataplane import engine_for

    device.summary = (  # the listening line shows it
        f"{args.blk_file}, {device.capacity} sectors, cache={args.cache} "
        f"aio={args.aio} (running: {engine_for(args.aio)})"
    )
    try:
        return trio.run(_serve, device, args)
    except* OSError as group:  # trio >= 0.25 raises a nursery's errors as a group
        _fail(f"virtio serve blk: {_first_leaf(group)}")
    finally:
        device.close()


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


def run_rng(args: argparse.Namespace) -> int:
    if args.print_capabilities:
        print(json.dumps(RNG_CAPABILITIES))
        return 0
    _socket_from_systemd(args, "rng")
    from virtio.devices.rng import VirtioRng

    device = VirtioRng()
    try:
        return trio.run(_serve, device, args, "rng", _rng_statistics)
    except* OSError as group:  # trio >= 0.25 raises a nursery's errors as a group
        _fail(f"virtio serve rng: {_first_leaf(group)}")


def _rng_statistics(device: Any, server: Any) -> str:
    return " ".join(
        (
            f"connections={server.connections}",
            "vring_requests="
            + ",".join(str(n) for _, n in sorted(server.requests_per_vring().items())),
            f"buffers_filled={device.buffers_filled}",
            f"bytes={device.bytes_served}",
            f"needs_reset={int(device.needs_reset)}",
        )
    )


def _delay_requests(device: Any, seconds: float) -> None:
    """Testing aid: every request waits ``seconds`` before it runs."""
    handle = device.handle

    async def delayed(queue_index: int, chain: Any) -> int:
        await trio.sleep(seconds)
        return await handle(queue_index, chain)

    device.handle = delayed
    device.native_dataplane = False  # every request must go through the delayed handle


def _resize(device: Any, server: Any) -> None:
    """SIGHUP: re-read the image size; if it changed, update the capacity (Python path
    and data planes alike) and tell the front-end (CONFIG_CHANGE_MSG, which QEMU turns
    into a config interrupt)."""
    old = device.capacity
    try:
        changed = device.resize()
    except OSError as exc:
        log.warning("resize: cannot read the image size: %s", exc)
        return
    if not changed:
        log.info("resize: capacity unchanged (%d sectors)", old)
        return
    log.info("resize: capacity %d -> %d sectors", old, device.capacity)
    handler = server.handler
    if handler is None or not handler.notify_config_change():
        log.warning("resize: no front-end channel to announce it (CONFIG_CHANGE_MSG not sent)")


def _statistics(device: Any, server: Any) -> str:
    backend = getattr(device, "backend", None)
    parts = [
        f"connections={server.connections}",
        f"refused={server.refused}",
        f"errors={sum(server.error_counts.values())}",
        f"resubmitted={server.resubmitted}",
        f"in_flight={server.in_flight()}",
        "vring_requests="
        + ",".join(str(n) for _, n in sorted(server.requests_per_vring().items())),
        f"fdatasync={getattr(backend, 'sync_calls', 'n/a')}",
        f"needs_reset={int(device.needs_reset)}",
    ]
    for plane in getattr(device, "dataplanes", ()):
        parts.append(f"dataplane{plane.index}=[{plane.debug_state()}]")
    return " ".join(parts)


async def _serve(
    device: Any,
    args: argparse.Namespace,
    kind: str = "blk",
    statistics: Any = None,
    registry: Any = None,
) -> int:
    """Serve ``device`` on ``args.socket_path`` / ``args.fd`` until SIGINT/SIGTERM;
    SIGUSR1 prints ``statistics(device, server)``; SIGHUP resizes (blk only); with
    ``--control PATH`` the commands of ``registry`` are served on PATH too."""
    from virtio.cli.systemd import notify
    from virtio.control import CommandRegistry
    from virtio.control.server import serve_control
    from virtio.transport.vhost_user.server import VhostUserServer

    statistics = statistics or _statistics
    server = VhostUserServer(
        device, name=f"virtio-{kind}", idle_timeout=getattr(args, "idle_timeout", None)
    )
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)
    with trio.open_signal_receiver(*signals) as receiver:
        async with trio.open_nursery() as nursery:

            async def serve_then_stop(task_status=trio.TASK_STATUS_IGNORED) -> None:
                if args.socket_path is not None:
                    await server.serve_path(args.socket_path, task_status=task_status)
                else:  # a connected fd: one connection
                    await server.serve_fd(args.fd, task_status=task_status)
                nursery.cancel_scope.cancel()

            await nursery.start(serve_then_stop)
            if getattr(args, "control", None):
                await nursery.start(serve_control, args.control, registry or CommandRegistry())
            notify("READY=1")  # systemd Type=notify: we listen now
            async for signum in receiver:
                if signum == signal.SIGHUP:
                    if kind == "blk":
                        _resize(device, server)
                    continue
                if signum == signal.SIGUSR1:
                    print(
                        f"virtio serve {kind}: statistics: {statistics(device, server)} "
                        f"time={_now()}",
                        file=sys.stderr,
                        flush=True,
                    )
                    continue
                log.info("%s: shutting down", signal.Signals(signum).name)
                notify("STOPPING=1")
                nursery.cancel_scope.cancel()
                break
    print(
        f"virtio serve {kind}: statistics: {statistics(device, server)}",
        file=sys.stderr,
        flush=True,
    )
    return 0
