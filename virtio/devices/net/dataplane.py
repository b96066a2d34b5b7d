"""virtio-net's native per-packet path: a port's transmit queue on the generic data
plane (``virtio/dataplane.py``) with the net fast path
(``virtio/native/net_dataplane.c``), and the port's receive queues written by it
(``NativeRx``, one per queue pair in use; the frame's queue by flow hash, as
``VirtioNet.deliver`` picks it).

The fast path serves the common case -- a frame without GSO, asking nothing or only
NEEDS_CSUM from a port that negotiated GUEST_CSUM, to native ports whose receive
ring has buffers -- by copying it once from the sender's buffers into the
receiver's (virtio 1.4 §5.1.6.2-§5.1.6.4).  Everything else is deferred, before it
was learned or counted, to ``VirtioNet._transmit`` (``handle``): the Python switch
decides and counts it exactly as without the data plane.  Counters say which path
served what (``tx_native`` vs ``py_*`` here, ``rx_native`` per receiving port).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, ClassVar

import trio

from virtio.dataplane import NativeDataPlane, QueueThread
from virtio.native import ffi, lib
from virtio.spec.net import NetFeature as NF

if TYPE_CHECKING:
    from virtio.device import ActiveDevice
    from virtio.devices.net.device import VirtioNet
    from virtio.queues.chain import DescriptorChain
    from virtio.service import BufferQueue

TX_STATISTICS = (
    "tx_native", "tx_native_bytes", "tx_flooded", "tx_hairpin",
    "py_malformed", "py_offload", "py_port", "py_no_room", "fdb_locks", "tx_held",
    "order_waits", "order_late",
)  # fmt: skip
"""Counters of a transmit data plane (``struct net_dp``)."""
RX_STATISTICS = (
    "rx_native",
    "rx_native_bytes",
    "rx_calls",
    "rx_deferred",
    "rx_publishes",
    "rx_steered",
    "rx_backlog_full",
    "rx_held",
    "rx_hold_lost",
)
"""Counters of a port's natively written receive queue (``struct net_port``)."""


def enabled(device: VirtioNet) -> bool:
    """The native path is on for ``device`` (``PYVIRTIO_NET_DATAPLANE=0``: off)."""
    return os.environ.get("PYVIRTIO_NET_DATAPLANE", "1") != "0" and device.native_dataplane


def new_port() -> Any:
    """A ``struct net_port`` (its mutex destroyed with it)."""
    port = ffi.new("struct net_port *")
    if lib.net_port_init(port):
        raise MemoryError("net_port_init failed")
    return port


class NetDataPlane(NativeDataPlane):
    """One virtio-net transmit queue's native data plane."""

    c_type: ClassVar[str] = "struct net_dp"
    device_statistics: ClassVar[tuple[str, ...]] = TX_STATISTICS
    in_order = True  # frames leave a transmit queue in order (net_dp_wait_python)
    device: VirtioNet

    @staticmethod
    def supported(device: VirtioNet, active: ActiveDevice, index: int) -> bool:
        return enabled(device) and NativeDataPlane.notifier_supported(active, index)

    def attach(self, c: Any) -> None:
        dev = self.device
        sw = dev.switch
        c.fdb = sw.native_fdb
        c.ports = sw.native_ports
        c.nports = sw.native_count
        c.src = sw.number(dev)
        c.pair = (self.index - 1) // 2  # transmitq(k+1) is queue 2k+1 (§5.1.2)
        # --poll-us: the emptied ring is polled yielding the CPU (net_dp_wait), so
        # the ports' transmit threads on one CPU take turns instead of spinning
        c.yield_ns = max(0, dev.poll_us) * 1000
        shared = self._shared()
        c.ng = shared[1] if shared is not None else ffi.NULL
        lib.net_dp_attach(c)

    def _shared(self) -> tuple[QueueThread, Any] | None:
        """The switch's shared transmit thread for this queue (``--queue-threads``
        N: transmit queue k of port p on thread (p + k) mod N), or None."""
        dev = self.device
        n = dev.queue_threads
        if n <= 0:
            return None
        return dev.switch.queue_thread(self._thread_number(n))

    def _thread_number(self, n: int) -> int:
        k = (self.index - 1) // 2  # transmitq(k+1) is queue 2k+1 (§5.1.2)
        return (self.device.switch.number(self.device) + k) % n

    def queue_thread(self) -> QueueThread | None:
        shared = self._shared()
        return shared[0] if shared is not None else None

    def update_state(self) -> None:
        c = self.c
        if c is None:
            return
        dev = self.device
        c.hdr_size = dev.hdr_size
        c.mtu = dev.mtu
        c.csum = int(dev.has(NF.VIRTIO_NET_F_CSUM))

    def statistics(self) -> dict[str, int]:
        out = super().statistics()
        if self.c is not None:
            out.update(spins=int(self.c.yields), spin_hits=int(self.c.yield_hits))
        return out

    def complete_failed(self, chain: DescriptorChain, err: int) -> int:
        return 0  # not reached: the fast path defers with err 0 only


class NativeRx:
    """A port's receive queue ``receiveq(k+1)`` while native transmit threads may
    write into it (``net_port_attach``); every Python write holds the port's lock.

    A frame that finds the ring short of buffers waits natively in the queue's hold
    (``net_rxq.hold``), delivered before later frames by the next transmitting
    thread; ``hold_fd`` (an eventfd) is written when one goes to sleep leaving frames
    there, or the oldest needs the Python path: ``VirtioNet._serve_hold``."""

    def __init__(self, device: VirtioNet, buffers: BufferQueue, k: int = 0) -> None:
        self.device = device
        self.k = k
        self.port = device.native_port
        self.queue = buffers.queue
        self.notifier = buffers.notifier
        self.listeners = getattr(self.notifier, "listeners", None)
        self.hold_fd = -1

    def __enter__(self) -> NativeRx:
        dev = self.device
        self.queue.set_locking(True)
        call = getattr(self.notifier, "call_fd", None)
        self.hold_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        lib.net_port_attach(
            self.port,
            self.k,
            self.queue.native,
            -1 if call is None else call,
            self.hold_fd,
            dev.hdr_size,
            int(dev.has(NF.VIRTIO_NET_F_MRG_RXBUF)),
            int(dev.has(NF.VIRTIO_NET_F_GUEST_CSUM)),
        )
        if self.listeners is not None:
            self.listeners.append(self._fds_changed)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.listeners is not None and self._fds_changed in self.listeners:
            self.listeners.remove(self._fds_changed)
        lib.net_port_detach(self.port, self.k)  # afterwards no thread touches the ring
        self.queue.set_locking(False)
        trio.lowlevel.notify_closing(self.hold_fd)
        os.close(self.hold_fd)
        self.hold_fd = -1

    async def wait_told(self) -> None:
        """Until ``hold_fd`` is written (and reset)."""
        while True:
            await trio.lowlevel.wait_readable(self.hold_fd)
            try:
                os.eventfd_read(self.hold_fd)
                return
            except BlockingIOError:
                continue

    def _fds_changed(self) -> None:
        call = getattr(self.notifier, "call_fd", None)
        lib.net_port_set_call(self.port, self.k, -1 if call is None else call)

    @staticmethod
    def supported(device: VirtioNet, notifier: object, index: int = 0) -> bool:
        return (
            index // 2 < lib.NET_RXQ_MAX
            and enabled(device)
            and isinstance(getattr(notifier, "kick_fd", None), int)
            and hasattr(notifier, "call_fd")
            and not getattr(notifier, "poll_fallback", False)
        )


def rx_statistics(port: Any) -> dict[str, int]:
    """The port's native receive counters and ``nrxq``, the receive queues the
    native path spreads frames over now (0: all go through Python)."""
    out = {n: int(getattr(port, n)) for n in RX_STATISTICS}
    out["nrxq"] = int(port.nrxq)
    return out


def rx_queue_packets(port: Any) -> list[int]:
    """Frames written natively into each receive queue: receiveq(k+1) at k."""
    return [int(port.rx[k].rx_native) for k in range(lib.NET_RXQ_MAX)]
