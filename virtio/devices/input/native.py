"""Native delivery of one event group to the eventq (``virtio/native/input_deliver.c``).

One cffi call per SYN_REPORT-framed group (virtio 1.4 §5.8.6): it pops as many
chains as the group has events, checks each is a device-writable buffer of at least
one ``struct virtio_input_event`` (drivernormative §5.8.6.1), writes the events,
publishes the used entries with one used-index store and returns the notification
decision (§2.7.7 / §2.8.10, EVENT_IDX aware).  ``VirtioInput``'s Python delivery
(``BufferQueue.next_buffers_nowait`` + ``complete_batch``) stays the reference: the
native call declines (``FALLBACK``, ring untouched) whatever it does not handle (a
malformed or short buffer, a completion gate, a packed ring marked in a vhost-user
inflight region, a ring being stopped, closed memory), and that group takes the
Python path, which reports the driver's error.

The queue's ``inflight`` tracker (vhost-user: chains in flight, the inflight region
of split rings) hears of the chains after the call, popped and used at once: the
region ends as the Python path leaves it, and a back-end that dies inside the call
leaves them unmarked and not used, so they are popped again after a reconnect.
"""

from __future__ import annotations

from dataclasses import dataclass

from virtio.native import ffi, lib
from virtio.service import BufferQueue

FALLBACK = lib.INPUT_DELIVER_FALLBACK
"""``deliver``'s answer when the group must take the Python path (nothing popped)."""
MAX_EVENTS = lib.INPUT_DELIVER_MAX
_input_deliver = lib.input_deliver


@dataclass(slots=True, frozen=True)
class UsedChain:
    """A chain the native call popped and used, as the inflight tracker sees it."""

    head: int


class NativeDelivery:
    """The native path of one device; ``stored_ns`` is when the last delivered
    group's used index was stored (``time.monotonic_ns``'s clock)."""

    def __init__(self) -> None:
        self._out = ffi.new("struct input_delivery *")
        self.stored_ns = 0
        self.deliveries = 0
        """Groups (or pieces of a group longer than the eventq) it delivered."""
        self.fallbacks = 0
        """Groups it declined (they took the Python path)."""

    def deliver(self, buffers: BufferQueue, events: bytes, count: int) -> int:
        """Deliver the group of ``count`` packed ``struct virtio_input_event``s
        ``events``: ``count`` when it is in the used ring (the driver notified if it asked),
        0 when the driver has not posted enough buffers yet (nothing popped), or
        ``FALLBACK``."""
        queue = buffers.queue
        # A ring that is stopping (vhost-user GET_VRING_BASE: its pops return nothing
        # from then on) must not be touched either: the Python path sees that.
        if buffers.gate is not None or queue.memory.closed or getattr(queue, "stopping", False):
            self.fallbacks += 1
            return FALLBACK
        out = self._out
        n = _input_deliver(queue.native, events, count, out)
        if n > 0:
            self.deliveries += 1
            self.stored_ns = out.stored_ns
            buffers.completed += n
            tracker = queue.inflight
            if tracker is not None:
                used = [UsedChain(head) for head in out.heads[0:n]]
                tracker.on_pop(used)  # type: ignore[arg-type]  # only .head and len() are read
                tracker.on_used(used, queue.next_used)  # type: ignore[arg-type]
            if out.notify:
                buffers.notifier.notify_used()
        elif n:
            self.fallbacks += 1
        return n
