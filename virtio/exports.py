"""Several exports in one process, like qemu-storage-daemon's repeated ``--export``.

An *export* is one device served on its own vhost-user socket (``Export``: an id,
the device, its ``VhostUserServer``).  An ``ExportSet`` runs exports in one trio
nursery (one event loop; native data-plane threads are per queue, whatever the
export), adds and removes them at run time, and fills the control socket's
registry (``virtio.control``):

* ``query-exports`` -- id, type, socket, connected front-end of each export;
* ``query-stats [export] [queue]`` -- the figures of ``Export.snapshot``: the
  server's (connections, refused, protocol errors, resubmitted requests) and the
  device's per-queue statistics (``virtio.stats``) with their totals;
* ``query-config [export]`` -- the device's configuration (``describe_config``);
* ``set-log-level level [logger]`` -- change the log level at run time;
* ``export-add type id ...`` / ``export-del id`` -- the ``factory`` given to the
  set builds a device from the same options as the command line;
* every command a device offers (``VirtioDevice.control_commands``, e.g. blk's
  ``resize``): when several exports offer one name, the request's ``export``
  argument picks the export (it may be left out while only one offers it).

``query-stats`` and SIGUSR1 (``statistics_line``) print the same snapshot: one
source of truth.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from virtio.control import ArgumentError, CommandRegistry, ControlError
from virtio.device import ControlCommand, VirtioDevice
from virtio.stats import latency_quantile
from virtio.transport.vhost_user.server import VhostUserServer, stop_servers

log = logging.getLogger(__name__)

LOG_LEVELS = ("debug", "info", "warning", "error")


def now() -> str:
    """The current time, RFC 3339 UTC with seconds (statistics lines, query-stats)."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


@dataclass(eq=False)
class Export:
    """One device served on one vhost-user socket (``socket_path``) or inherited fd."""

    id: str
    kind: str
    """The device type as the command line names it (``blk``, ``rng``)."""
    device: VirtioDevice
    server: VhostUserServer
    socket_path: str | None = None
    fd: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    """What the export was made from (shown by ``query-exports``)."""
    close: Callable[[], None] | None = None
    """Releases the device's resources (image lock) once it is no longer served."""
    statistics_words: Callable[[], str] | None = None
    """Replaces the server's words of ``statistics_line`` (a device type's own line)."""
    tasks: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    """Run while the export is served (an input device's evdev reader): one failing
    stops this export, not the others."""
    commands: dict[str, ControlCommand] = field(default_factory=dict)
    """Control commands of this export beside ``device.control_commands()``."""
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)

    def release(self) -> None:
        """Close the device's resources once (``close``); later calls do nothing."""
        close, self.close = self.close, None
        if close is not None:
            close()

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.kind,
            "socket": self.socket_path if self.socket_path is not None else f"fd:{self.fd}",
            "frontend": self.server.frontend,
            "options": self.options,
        }

    def snapshot(self) -> dict[str, Any]:
        """The export's figures: the server's and the device's statistics."""
        server, device = self.server, self.device
        popped = server.requests_per_vring()
        stats = device.stats.snapshot()
        for q in stats["queues"]:
            q["popped"] = popped.get(q["queue"], 0)
        stats["totals"]["popped"] = sum(popped.values())
        stats["totals"]["in_flight"] = sum(q["in_flight"] for q in stats["queues"])
        backend = getattr(device, "backend", None)
        return {
            "id": self.id,
            "type": self.kind,
            "connections": server.connections,
            "refused": server.refused,
            "errors": sum(server.error_counts.values()),
            "resubmitted": server.resubmitted,
            "needs_reset": bool(device.needs_reset),
            "fdatasync": getattr(backend, "sync_calls", None),
            "vring_requests": [n for _, n in sorted(popped.items())],
            **stats,
        }

    def statistics_line(self, snapshot: dict[str, Any] | None = None) -> str:
        """``key=value`` words of the snapshot (SIGUSR1 and the final line at exit)."""
        s = snapshot if snapshot is not None else self.snapshot()
        t = s["totals"]
        if self.statistics_words is not None:
            words = [self.statistics_words()]
        else:
            words = [
                f"connections={s['connections']}",
                f"refused={s['refused']}",
                f"errors={s['errors']}",
                f"resubmitted={s['resubmitted']}",
                f"in_flight={t.get('in_flight', 0)}",
                "vring_requests=" + ",".join(str(n) for n in s["vring_requests"]),
            ]
            if s["fdatasync"] is not None:
                words.append(f"fdatasync={s['fdatasync']}")
            words.append(f"needs_reset={int(s['needs_reset'])}")
            device_words = getattr(self.device, "statistics_words", None)
            if device_words is not None:
                words += device_words()
        words += [
            f"completed={t.get('completed', 0)}",
            f"dataplane={t.get('dataplane', 0)}",
            f"python={t.get('python', 0)}",
        ]
        for group, prefix in (("requests", "req"), ("bytes", "bytes"), ("status", "status")):
            words += [
                f"{prefix}_{k.replace('-', '_')}={n}" for k, n in t.get(group, {}).items() if n
            ]
        notes = t.get("notifications", {})
        words += [
            f"notify_sent={notes.get('sent', 0)}",
            f"notify_suppressed={notes.get('suppressed', 0)}",
        ]
        buckets = t.get("latency", {}).get("buckets_us", [])
        for name, q in (("p50", 0.5), ("p99", 0.99)):
            value = latency_quantile(buckets, q)
            if value is not None:
                words.append(f"latency_{name}_us={value}")
        return " ".join(words)


Factory = Callable[[dict[str, Any]], Export]
"""Builds an export from ``export-add``'s arguments (raises ArgumentError)."""


class ExportSet:
    """Exports served in one nursery, and the control commands over them."""

    def __init__(self, registry: CommandRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CommandRegistry()
        self.exports: dict[str, Export] = {}
        self.factory: Factory | None = None
        self.on_empty: Callable[[], None] | None = None
        """Called when the last export has stopped by itself (its fd connection ended)."""
        self._nursery: trio.Nursery | None = None
        self._routes: dict[str, dict[str, Callable[[dict[str, Any]], Any]]] = {}
        self._added = False
        self._register_commands()

    # -- running ------------------------------------------------------------------------
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve exports until cancelled (``add`` needs this running)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            for export in list(self.exports.values()):
                self._forget(export)

    async def add(self, export: Export) -> None:
        """Start serving ``export``; returns once it listens.  Raises what listening
        raised (``OSError``: the socket path is taken, ...) with nothing left behind."""
        if self._nursery is None:
            raise RuntimeError("ExportSet.run is not running")
        if export.id in self.exports:
            raise ArgumentError(f"an export with id {export.id!r} exists already")
        self.exports[export.id] = export
        try:
            await self._nursery.start(self._serve, export)
        except BaseException:
            self._forget(export)
            raise
        commands = {**export.device.control_commands(), **export.commands}
        for name, command in commands.items():
            self._route(name, export.id, command.handler, command.help)
        if len(self.exports) > 1 or self._added:
            log.info("export %s (%s) added", export.id, export.kind)
        self._added = True

    async def remove(self, export_id: str) -> None:
        """Stop serving export ``export_id`` (its front-end is disconnected once the
        requests in flight have completed: ``stop_servers``) and close it."""
        export = self.get(export_id)
        await stop_servers((export.server,))
        export.scope.cancel()
        await export.done.wait()
        log.info("export %s (%s) removed", export.id, export.kind)

    def get(self, export_id: str | None) -> Export:
        """The export ``export_id``; None picks the only export there is."""
        if export_id is None:
            if len(self.exports) == 1:
                return next(iter(self.exports.values()))
            raise ArgumentError(
                f"there are {len(self.exports)} exports: name one with 'export' "
                f"({', '.join(self.exports) or 'none'})"
            )
        try:
            return self.exports[export_id]
        except KeyError:
            raise ArgumentError(f"no export {export_id!r}") from None

    async def _serve(self, export: Export, task_status=trio.TASK_STATUS_IGNORED) -> None:
        started = False

        def mark_started(value: Any = None) -> None:
            nonlocal started
            started = True
            task_status.started(value)

        try:
            with export.scope:
                if not export.tasks:  # listening errors reach add() as they are
                    await self._listen(export, mark_started)
                else:
                    async with trio.open_nursery() as nursery:
                        for task in export.tasks:
                            nursery.start_soon(task)
                        await self._listen(export, mark_started)
                        nursery.cancel_scope.cancel()  # served to the end: tasks stop too
        except Exception as exc:
            if not started:
                raise
            log.error("export %s stopped: %s: %s", export.id, type(exc).__name__, exc)
        finally:
            stopped_by_itself = not export.scope.cancel_called
            self._forget(export)
            if stopped_by_itself and not self.exports and self.on_empty is not None:
                self.on_empty()

    @staticmethod
    async def _listen(export: Export, mark_started: Callable[[Any], None]) -> None:
        server = export.server
        if export.socket_path is not None:
            await server.serve_path(export.socket_path, task_status=_Status(mark_started))
        else:
            assert export.fd is not None
            await server.serve_fd(export.fd, task_status=_Status(mark_started))

    def _forget(self, export: Export) -> None:
        if self.exports.get(export.id) is export:
            del self.exports[export.id]
            for name in list(self._routes):
                self._unroute(name, export.id)
            export.release()
        export.done.set()

    # -- device commands ------------------------------------------------------------------
    def _route(self, name: str, export_id: str, handler: Callable, help: str) -> None:
        routes = self._routes.get(name)
        if routes is None:
            if name in self.registry.names():
                log.warning("export %s: control command %s is taken: not offered", export_id, name)
                return
            routes = self._routes[name] = {}

            def dispatch(arguments: dict[str, Any]) -> Any:
                export_id = arguments.get("export")
                if export_id is None and len(routes) == 1:
                    export_id = next(iter(routes))
                if export_id not in routes:
                    which = f"one of {', '.join(routes)}"
                    if export_id is None:
                        raise ArgumentError(f"{name}: name the export ('export': {which})")
                    raise ArgumentError(f"{name}: no export {export_id!r} has it ({which})")
                rest = {k: v for k, v in arguments.items() if k != "export"}
                return routes[export_id](rest)

            self.registry.register(name, dispatch, help=f"{help} [export]")
        routes[export_id] = handler

    def _unroute(self, name: str, export_id: str) -> None:
        routes = self._routes.get(name)
        if routes is None:
            return
        routes.pop(export_id, None)
        if not routes:
            del self._routes[name]
            self.registry.unregister(name)

    # -- the set's commands -----------------------------------------------------------------
    def _register_commands(self) -> None:
        reg = self.registry
        reg.register("query-exports", self._query_exports, help="the exports served")
        reg.register(
            "query-stats",
            self._query_stats,
            help="statistics per export and queue [export] [queue]",
        )
        reg.register("query-config", self._query_config, help="device configuration [export]")
        reg.register(
            "set-log-level", self._set_log_level, help="level: debug|info|warning|error [logger]"
        )
        reg.register(
            "export-add",
            self._export_add,
            help="type, id and the options of 'virtio serve TYPE' (socket-path, blk-file, ...)",
        )
        reg.register("export-del", self._export_del, help="id: stop serving that export")

    def _query_exports(self, arguments: dict[str, Any]) -> list[dict[str, Any]]:
        return [e.describe() for e in self.exports.values()]

    def snapshot(self, export_id: str | None = None, queue: int | None = None) -> dict[str, Any]:
        exports = [self.get(export_id)] if export_id is not None else self.exports.values()
        out = []
        for e in exports:
            snap = e.snapshot()
            if queue is not None:
                if not isinstance(queue, int) or not 0 <= queue < len(snap["queues"]):
                    raise ArgumentError(f"export {e.id} has no queue {queue!r}")
                snap["queues"] = [snap["queues"][queue]]
            out.append(snap)
        return {"time": now(), "exports": out}

    def _query_stats(self, arguments: dict[str, Any]) -> dict[str, Any]:
        return self.snapshot(arguments.get("export"), arguments.get("queue"))

    def _query_config(self, arguments: dict[str, Any]) -> list[dict[str, Any]]:
        export_id = arguments.get("export")
        exports = [self.get(export_id)] if export_id is not None else self.exports.values()
        return [{"id": e.id, "type": e.kind, **e.device.describe_config()} for e in exports]

    def _set_log_level(self, arguments: dict[str, Any]) -> dict[str, str]:
        level = str(arguments["level"]).lower()
        if level not in LOG_LEVELS:
            raise ArgumentError(f"level must be one of {', '.join(LOG_LEVELS)}, not {level!r}")
        name = arguments.get("logger")
        logging.getLogger(name).setLevel(level.upper())
        log.info("log level of %s set to %s", name or "the root logger", level)
        return {"logger": name or "root", "level": level}

    async def _export_add(self, arguments: dict[str, Any]) -> dict[str, Any]:
        if self.factory is None:
            raise ControlError("this process cannot add exports")
        export = self.factory(dict(arguments))
        try:
            await self.add(export)
        except OSError as exc:
            raise ControlError(f"export {export.id}: {exc}") from None
        return export.describe()

    async def _export_del(self, arguments: dict[str, Any]) -> dict[str, Any]:
        export_id = arguments["id"]
        export = self.get(export_id)
        await self.remove(export_id)
        return {"id": export.id, "connections": export.server.connections}


class _Status:
    """A ``task_status`` that also tells ``ExportSet._serve`` it has started."""

    def __init__(self, started: Callable[[Any], None]) -> None:
        self._started = started

    def started(self, value: Any = None) -> None:
        self._started(value)
