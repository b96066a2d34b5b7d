"""virtio-blk's native data plane on an NBD export (``virtio/native/nbd_dataplane.c``):
well-formed IN / OUT / FLUSH (virtio 1.4 §5.2.6) go out as NBD_CMD_READ / WRITE /
FLUSH from the queue's thread, several in flight, without the interpreter.

Each queue's thread gets a connection of its own in transmission phase
(``NbdBackend.transmission_socket``: Python does the handshake, the thread only
sends requests and parses simple and structured replies); Python keeps its own
for what the thread hands it.  A server that takes no further client (``qemu-nbd``
without ``-e 2`` or more) leaves that handshake unanswered: after a 1 s timeout
the disk is served by Python as before, and the server is not asked again (other
failures, e.g. a server that is down, are retried at the next queue start).  Without
NBD_FLAG_CAN_MULTI_CONN a FLUSH on one connection need not cover writes of another,
so then only a single-queue device gets a native path, and the writes Python still
does (DISCARD, WRITE_ZEROES, deferred writes) are flushed on Python's connection
before they complete.

Errors: an NBD error reply fails that request (IOERR, logged by
``VirtioBlk.complete_failed``); a lost connection fails every request in flight
(IOERR); the queue's requests are then served by Python, which reconnects
(``nbd.py``'s documented behaviour), until a new connection for the thread is up
(retried in the background).  Everything the native path does not
do (GET_ID, DISCARD, WRITE_ZEROES, oversized or malformed requests, write-through
writes without FUA) is deferred to ``VirtioBlk.handle`` as for a file.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, ClassVar

import trio

from virtio.devices.blk.dataplane import BlkDataPlane
from virtio.devices.blk.nbd import NbdBackend, NbdError
from virtio.native import lib

if TYPE_CHECKING:
    import socket

    from virtio.device import ActiveDevice
    from virtio.devices.blk.device import VirtioBlk
    from virtio.queues.chain import DescriptorChain

log = logging.getLogger(__name__)


class NbdDataPlane(BlkDataPlane):
    """One virtio-blk queue's native data plane on an NBD export."""

    c_type: ClassVar[str] = "struct nbd_dp"
    device_statistics: ClassVar[tuple[str, ...]] = (
        "reads", "writes", "flushes", "syncs", "sends", "recvs", "server_errors",
        "conn_failed", "reconnects", "bytes_in", "bytes_out", "broken",
    )  # fmt: skip

    def __init__(self, device: VirtioBlk, active: ActiveDevice, index: int) -> None:
        super().__init__(device, active, index)
        self._sock: socket.socket | None = None
        self._nursery: trio.Nursery | None = None
        self._reconnecting = False

    @staticmethod
    def supported(device: VirtioBlk, active: ActiveDevice, index: int) -> bool:
        backend = device.backend
        return (
            os.environ.get("PYVIRTIO_BLK_DATAPLANE", "1") != "0"
            and os.environ.get("PYVIRTIO_NBD_DATAPLANE", "1") != "0"
            and device.native_dataplane
            and isinstance(backend, NbdBackend)
            and NbdDataPlane.notifier_supported(active, index)
            and (backend.multi_conn or len(device.queue_max_sizes) == 1)
            and backend.native_refused is None
            and not backend.tls  # the C side speaks plain sockets: TLS stays in Python
        )

    async def prepare(self) -> bool:
        """Get the queue's connection; False (logged) when the server gives none."""
        backend: NbdBackend = self.device.backend  # type: ignore[assignment]
        try:
            self._sock, self._info = await trio.to_thread.run_sync(backend.transmission_socket)
        except (OSError, NbdError) as exc:
            why = str(exc) or type(exc).__name__
            if isinstance(exc, TimeoutError):  # no further client taken: not asked again
                backend.native_refused = why
            log.warning(
                "%s gave the native data plane no connection of its own (%s): Python "
                "serves the queue (qemu-nbd: allow more clients with -e 2 or more)",
                backend.uri,
                why,
            )
            return False
        return True

    def attach(self, c: Any) -> None:
        backend: NbdBackend = self.device.backend  # type: ignore[assignment]
        assert self._sock is not None, "prepare() first"
        self._sock.setblocking(False)
        c.sock_fd = self._sock.detach()  # the C side owns it now (nbd_dp_detach closes it)
        self._sock = None
        info = self._info
        c.structured = int(info.structured)
        c.tflags = info.flags
        c.max_payload = info.max_payload
        c.new_fd = -1
        backend.native_connections += 1
        lib.nbd_dp_attach(c)

    def detach(self) -> None:
        if self.c is None:
            return
        lib.nbd_dp_detach(self.c)
        self.device.backend.native_connections -= 1  # type: ignore[attr-defined]

    async def run(self) -> bool:
        async with trio.open_nursery() as nursery:  # for _reconnect
            self._nursery = nursery
            try:
                return await super().run()
            finally:
                self._nursery = None
                nursery.cancel_scope.cancel()

    def complete_failed(self, chain: DescriptorChain, err: int) -> int:
        c = self.c
        if c is not None and c.broken and not self._reconnecting and self._nursery:
            log.warning(
                "vq%d: the native NBD connection was lost (%s): requests in flight fail, "
                "Python serves the queue until a new connection is up",
                self.index,
                os.strerror(c.broken),
            )
            self._reconnecting = True
            self._nursery.start_soon(self._reconnect)
        return super().complete_failed(chain, err)

    async def _reconnect(self) -> None:
        """A new connection for the thread, retried with growing pauses (0.5 s to
        30 s) while the server is away; the thread takes it with its next request."""
        backend: NbdBackend = self.device.backend  # type: ignore[assignment]
        pause = 0.5
        try:
            while True:
                await trio.sleep(pause)  # back-off between attempts
                try:
                    sock, _info = await trio.to_thread.run_sync(
                        backend.transmission_socket, abandon_on_cancel=True
                    )
                except (OSError, NbdError) as exc:
                    log.debug("vq%d: NBD reconnect failed: %s", self.index, exc)
                    pause = min(pause * 2, 30.0)
                    continue
                sock.setblocking(False)
                self.c.new_fd = sock.detach()
                log.info("vq%d: native NBD connection re-established", self.index)
                return
        finally:
            self._reconnecting = False

    def close_unused(self) -> None:
        """Close a connection that ``prepare`` got but no thread took over."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
