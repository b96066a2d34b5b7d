"""``virtio serve net``: vhost-user-net ports on one learning switch, with a tap uplink.

::

    virtio serve net --socket-path /run/a.sock [--socket-path /run/b.sock ...]
                     [--tap IFNAME] [--mac MAC] [--mtu N] [--num-queue-pairs N]
    virtio serve net --print-capabilities      # {"type": "net"}
    virtio serve --export net,id=a,socket-path=/run/a.sock,tap=tap0 \\
                 --export net,id=b,socket-path=/run/b.sock --export blk,...

As an export type (``--export net,...``, ``export-add type=net``) every net export of
the process is one port of ONE switch (``NetHub``), made with the first net export and
dropped with the last; ``tap=IFNAME`` gives an export its own uplink on that switch (it
lives and goes with the export).  Removing an export (``export-del``) takes its port
off the switch, which forgets the addresses learned on it.

Every socket is one port (one guest NIC); the ports and the optional tap sit on one
switch (``virtio/devices/net/switch.py``).  ``--mac`` is the first port's address in
its configuration space (the next ports count up from it; QEMU's own ``mac=`` is what
a QEMU guest sees).  SIGUSR1 prints statistics (per port: the switch's counters,
packets per queue, receive-side drops); SIGINT/SIGTERM stop cleanly.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from typing import Any

import trio

from virtio.cli.logs import add_log_options

log = logging.getLogger("virtio.serve")

NET_CAPABILITIES = {"type": "net"}
"""``--print-capabilities`` for net (vhost-user.json ``VHostUserBackendType`` ``net``)."""


def register_net(devices: Any, fail: Any, signals_help: str) -> None:
    net = devices.add_parser(
        "net",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="virtio-net ports on a learning switch (optional tap uplink)",
        description=(
            "vhost-user-net back-end.  QEMU: -chardev socket,id=c,path=PATH "
            "-netdev vhost-user,id=n,chardev=c[,queues=N] -device virtio-net-pci,netdev=n "
            "(guest RAM must be shared: memory-backend-memfd,share=on)."
        ),
    )
    net.add_argument(
        "--socket-path",
        metavar="PATH",
        action="append",
        default=[],
        help="listen on this unix socket: one port per socket (repeatable)",
    )
    net.add_argument("--tap", metavar="IFNAME", help="tap interface as uplink (created if absent)")
    net.add_argument("--mac", default="52:54:00:12:34:56", help="first port's MAC address")
    net.add_argument("--mtu", type=int, default=1500, help="MTU offered (VIRTIO_NET_F_MTU)")
    net.add_argument(
        "-q",
        "--num-queue-pairs",
        type=int,
        default=1,
        metavar="N",
        help="queue pairs; a received packet goes to the pair its guest last sent the "
        "flow on (§5.1.9.5.6), else to one picked by the flow's hash",
    )
    net.add_argument(
        "--poll-us",
        type=int,
        default=0,
        metavar="US",
        help="native transmit threads poll an idle ring this long before sleeping "
        "(0: sleep at once; a busy peer's next burst then needs no kick)",
    )
    net.add_argument(
        "--queue-threads",
        type=int,
        default=0,
        metavar="N",
        help="serve every port's native transmit queues from N shared threads, each "
        "waiting once for all its queues (0: a thread per queue)",
    )
    net.add_argument(
        "--no-native",
        action="store_true",
        help="switch every packet in Python (no native per-packet path)",
    )
    net.add_argument(
        "--print-capabilities", action="store_true", help="print capabilities as JSON and exit"
    )
    add_log_options(net)
    net.epilog = signals_help
    net.set_defaults(func=run_net)
    net.error = lambda message: fail(f"virtio serve net: {message}", status=2)  # type: ignore[method-assign]


def run_net(args: argparse.Namespace) -> int:
    from virtio.cli.serve import _fail

    if args.print_capabilities:
        print(json.dumps(NET_CAPABILITIES))
        return 0
    if not args.socket_path:
        _fail("virtio serve net: at least one --socket-path is needed", status=2)
    from virtio.devices.net import Switch, VirtioNet
    from virtio.devices.net.device import parse_mac

    try:
        mac = int.from_bytes(parse_mac(args.mac), "big")
        switch = Switch()
        ports = [
            VirtioNet(
                name=f"port{i}",
                switch=switch,
                mac=(mac + i).to_bytes(6, "big"),
                mtu=args.mtu,
                num_queue_pairs=args.num_queue_pairs,
            )
            for i in range(len(args.socket_path))
        ]
        if args.poll_us < 0:
            raise ValueError(f"--poll-us {args.poll_us}: not negative")
        if not 0 <= args.queue_threads <= 64:
            raise ValueError(f"--queue-threads {args.queue_threads}: must be in 0..64")
        for port in ports:
            port.native_dataplane = not args.no_native
            port.poll_us = args.poll_us
            port.queue_threads = args.queue_threads
    except ValueError as exc:
        _fail(f"virtio serve net: {exc}", status=2)
    tap = None
    if args.tap:
        from virtio.devices.net.tap import TapPort

        try:
            tap = TapPort(args.tap, switch)
        except OSError as exc:
            _fail(f"virtio serve net: tap {args.tap}: {exc}")
    try:
        return trio.run(_serve_ports, ports, tap, args)
    except* OSError as group:
        _fail(f"virtio serve net: {_first_leaf(group)}")
    finally:
        if tap is not None:
            tap.close()


def _first_leaf(group: BaseExceptionGroup) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def statistics(ports: list[Any], servers: list[Any], tap: Any) -> str:
    """One line: per port its switch counters, packets per queue and device drops."""
    switch = ports[0].switch
    parts = []
    for port, server in zip(ports, servers, strict=True):
        st = port.statistics()
        queues = ",".join(f"{q}:{n}" for q, n in st["queues"].items())
        fields = [f"connections={server.connections}", f"queues={queues or '-'}"]
        fields.append(f"steered={st['steered']}")  # received on the flow's sending pair
        fields += [f"{k}={v}" for k, v in st["port"].items()]
        fields += [f"rx_{k}={v}" for k, v in sorted(st["errors"].items())]
        fields.append(f"needs_reset={int(port.needs_reset)}")
        nat = st["native"]  # the native per-packet path's share, and what it handed over
        fields += [f"{k}={v}" for k, v in nat["tx"].items() if v]
        fields += [f"{k}={v}" for k, v in nat["rx"].items() if v]
        parts.append(f"{port.name}=[{' '.join(fields)}]")
    if tap is not None:
        c = switch.port_statistics(tap)
        parts.append(f"tap=[{' '.join(f'{k}={v}' for k, v in c.items())}]")
    parts.append(f"addresses={len(switch.addresses())}")
    return " ".join(parts)


async def _serve_ports(ports: list[Any], tap: Any, args: argparse.Namespace) -> int:
    from virtio.cli.serve import _now
    from virtio.cli.systemd import notify
    from virtio.transport.vhost_user.server import VhostUserServer, stop_servers

    servers = [VhostUserServer(p, name=f"virtio-net/{p.name}") for p in ports]
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)
    with trio.open_signal_receiver(*signals) as receiver:
        async with trio.open_nursery() as nursery:
            for server, path in zip(servers, args.socket_path, strict=True):
                await nursery.start(server.serve_path, path)
            if tap is not None:
                nursery.start_soon(tap.run)
            notify("READY=1")
            async for signum in receiver:
                if signum == signal.SIGHUP:
                    continue
                if signum == signal.SIGUSR1:
                    line = statistics(ports, servers, tap)
                    print(
                        f"virtio serve net: statistics: {line} time={_now()}",
                        file=sys.stderr,
                        flush=True,
                    )
                    continue
                log.info("%s: shutting down", signal.Signals(signum).name)
                notify("STOPPING=1")
                await stop_servers(servers)
                nursery.cancel_scope.cancel()
                break
    print(
        f"virtio serve net: statistics: {statistics(ports, servers, tap)}",
        file=sys.stderr,
        flush=True,
    )
    return 0


# -- net as an export type (``virtio serve --export net,...``) -----------------------------
DEFAULT_MAC = 0x525400123456
"""The first port's address when a net export names none (the next count up)."""


class NetHub:
    """The switch the net exports of one process share: made by the first net
    export, dropped once the last one is gone."""

    def __init__(self) -> None:
        self.switch: Any = None

    def port_switch(self) -> Any:
        from virtio.devices.net import Switch

        if self.switch is None:
            self.switch = Switch()
        return self.switch

    def free_mac(self) -> bytes:
        """The lowest address from ``DEFAULT_MAC`` up no port of the switch has."""
        taken = {getattr(p, "mac", None) for p in self.port_switch().ports}
        n = DEFAULT_MAC
        while n.to_bytes(6, "big") in taken:
            n += 1
        return n.to_bytes(6, "big")

    def detach(self, port: Any, tap: Any = None) -> None:
        """Take ``port`` (and its export's tap) off the switch; the switch forgets the
        addresses learned on them.  The last port gone, the switch goes too."""
        switch = self.switch
        if tap is not None:
            tap.close()
        if switch is None:
            return
        if port in switch.ports:
            switch.remove_port(port)
        if not switch.ports:
            self.switch = None


HUB = NetHub()
"""This process's switch of net exports."""


def add_net_export_options(parser: argparse.ArgumentParser) -> None:
    """The options of one net export (``--export net,KEY=VALUE`` / ``export-add``)."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--socket-path", metavar="PATH", help="listen on this unix socket")
    where.add_argument(
        "--fd", type=int, metavar="FDNUM", help="inherited unix socket (listening or connected)"
    )
    parser.add_argument("--mac", help="this port's MAC address (default: the next free one)")
    parser.add_argument("--mtu", type=int, default=1500, help="MTU offered (VIRTIO_NET_F_MTU)")
    parser.add_argument("--num-queue-pairs", type=int, default=1, metavar="N")
    parser.add_argument("--poll-us", type=int, default=0, metavar="US")
    parser.add_argument("--queue-threads", type=int, default=0, metavar="N")
    parser.add_argument("--no-native", action="store_true")
    parser.add_argument("--tap", metavar="IFNAME", help="a tap uplink on the shared switch")


def build_net_export(args: argparse.Namespace) -> Any:
    """A net export's port on the process's switch (``HUB``), with its tap if any."""
    from virtio.cli.serve import Built, ExportError
    from virtio.devices.net import VirtioNet
    from virtio.devices.net.device import parse_mac

    hub = HUB
    name = getattr(args, "export_id", None) or "net"
    try:
        if args.poll_us < 0:
            raise ValueError(f"poll-us {args.poll_us}: not negative")
        if not 0 <= args.queue_threads <= 64:
            raise ValueError(f"queue-threads {args.queue_threads}: must be in 0..64")
        switch = hub.port_switch()
        mac = parse_mac(args.mac) if args.mac else hub.free_mac()
        port = VirtioNet(
            name=name,
            switch=switch,
            mac=mac,
            mtu=args.mtu,
            num_queue_pairs=args.num_queue_pairs,
        )
    except ValueError as exc:
        if hub.switch is not None and not hub.switch.ports:
            hub.switch = None
        raise ExportError(str(exc), status=2) from None
    port.native_dataplane = not args.no_native
    port.poll_us = args.poll_us
    port.queue_threads = args.queue_threads
    tap = None
    if args.tap:
        from virtio.devices.net.tap import TapPort

        try:
            tap = TapPort(args.tap, switch)
        except (OSError, ValueError) as exc:
            hub.detach(port)
            raise ExportError(f"tap {args.tap}: {exc}") from None
    port.summary = f"mac {mac.hex(':')}" + (f", tap {args.tap}" if tap else "")
    return Built(
        port,
        tasks=[tap.run] if tap is not None else [],
        close=lambda: hub.detach(port, tap),
    )
