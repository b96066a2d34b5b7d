"""Statistics of a device, per queue, kept for the device's lifetime (an export's).

Each queue has a native ``struct vq_stats`` (``virtio/native/vm_native.h``) that the
device owns; a running ``Virtqueue`` points at it (``VirtioDevice.serve_queue``
attaches it), so every path that serves the queue counts into the same words: the
ring core stamps pops and counts completions with their latency and the used-buffer
notification decisions (virtio 1.4 §2.7.7 / §2.8.10: sent, or suppressed by the
driver), a native data-plane thread counts what it completed itself, and the device
counts requests, bytes and statuses by its own kinds (``record``; the blk fast
path does the same in C).  Nothing is lost when a connection ends: the rings go,
the counters stay.

Reading is a copy of the words as they are (``QueueStats.snapshot``): each value is
whole, the set is not atomic; counters only grow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from virtio.native import ffi, lib

if TYPE_CHECKING:
    from virtio.queues.virtqueue import Virtqueue

LATENCY_BUCKETS = lib.VQS_LAT_BUCKETS
LATENCY_BOUNDS_US = tuple(1 << b for b in range(LATENCY_BUCKETS - 1))
"""Upper bounds (exclusive, microseconds) of the latency buckets; the last is open."""

LATENCY_SAMPLE = 4
"""Latency is measured for one popped batch in this many (a power of two): two clock
reads per sampled batch; 1 measures every request."""
DEFAULT_KINDS = ("requests",)
DEFAULT_STATUSES = ("ok",)


def _names(names: tuple[str, ...], slots: int) -> tuple[str, ...]:
    if len(names) > slots:
        raise ValueError(f"at most {slots} statistics names, not {len(names)}: {names}")
    return names


class QueueStats:
    """One queue's counters (native memory; see the module docstring)."""

    def __init__(
        self,
        index: int,
        size: int,
        kinds: tuple[str, ...],
        statuses: tuple[str, ...],
        latency_sample: int = LATENCY_SAMPLE,
    ) -> None:
        self.index = index
        self.kinds = _names(kinds, lib.VQS_KINDS)
        self.statuses = _names(statuses, lib.VQS_STATUSES)
        self.c = ffi.new("struct vq_stats *")
        self._t0 = ffi.new("uint64_t[]", max(size, 1))
        self.c.t0 = self._t0
        self.c.t0_size = max(size, 1)
        self.latency_sample = latency_sample

    @property
    def latency_sample(self) -> int:
        """Latency measured for one popped batch in this many (a power of two)."""
        return int(self.c.sample_mask) + 1

    @latency_sample.setter
    def latency_sample(self, every: int) -> None:
        if every < 1 or every & (every - 1):
            raise ValueError(f"latency sample must be a power of two, not {every}")
        self.c.sample_mask = every - 1
        self._queue: Virtqueue | None = None

    def record(self, kind: int, status: int, nbytes: int = 0) -> None:
        """One request of kind index ``kind`` finished with status index ``status``."""
        lib.vq_stats_request(self.c, 0, kind, status, nbytes)

    def attach(self, queue: Virtqueue) -> None:
        """``queue`` serves this queue now: it counts into these statistics."""
        queue.attach_stats(self.c)
        self._queue = queue

    def detach(self, queue: Virtqueue) -> None:
        """``queue`` stopped serving (its counts stay)."""
        if self._queue is queue:
            self._queue = None

    def in_flight(self) -> int:
        """Chains popped and not yet used on the ring serving now (0 without one)."""
        queue = self._queue
        if queue is None:
            return 0
        st = queue.statistics()
        return max(0, st.popped - st.used)

    def snapshot(self) -> dict[str, Any]:
        c = self.c
        completed = int(c.completed)
        native = int(c.native)
        count = int(c.latency_count)
        return {
            "queue": self.index,
            "completed": completed,
            "in_flight": self.in_flight(),
            "dataplane": native,
            "python": completed - native,
            "requests": {k: _both(c.requests, i) for i, k in enumerate(self.kinds)},
            "bytes": {k: _both(c.bytes, i) for i, k in enumerate(self.kinds)},
            "status": {s: _both(c.status, i) for i, s in enumerate(self.statuses)},
            "notifications": {
                "sent": int(c.notify_sent),
                "suppressed": int(c.notify_suppressed),
            },
            "latency": {
                "sampled": f"1/{self.latency_sample} of popped batches",
                "count": count,
                "sum_us": int(c.latency_sum_ns) // 1000,
                "buckets_us": [int(c.latency[b]) for b in range(LATENCY_BUCKETS)],
            },
        }


def _both(pair: Any, i: int) -> int:
    """A counter's Python and data-plane copies, summed."""
    return int(pair[0][i]) + int(pair[1][i])


class DeviceStats:
    """The statistics of one device: a ``QueueStats`` per queue."""

    def __init__(
        self,
        queue_sizes: tuple[int, ...],
        kinds: tuple[str, ...] = DEFAULT_KINDS,
        statuses: tuple[str, ...] = DEFAULT_STATUSES,
        latency_sample: int = LATENCY_SAMPLE,
    ) -> None:
        self.kinds = kinds
        self.statuses = statuses
        self.queues = [
            QueueStats(i, size, kinds, statuses, latency_sample)
            for i, size in enumerate(queue_sizes)
        ]

    def queue(self, index: int) -> QueueStats:
        return self.queues[index]

    def set_latency_sample(self, every: int) -> None:
        """Measure the latency of one popped batch in ``every`` (1: all), every queue."""
        for q in self.queues:
            q.latency_sample = every

    def snapshot(self) -> dict[str, Any]:
        """Every queue's figures and their sums (``totals``)."""
        queues = [q.snapshot() for q in self.queues]
        return {"totals": sum_queues(queues), "queues": queues}


def sum_queues(queues: list[dict[str, Any]]) -> dict[str, Any]:
    """The element-wise sum of queue snapshots (nested dicts and lists of ints)."""

    def add(a: Any, b: Any) -> Any:
        if isinstance(a, str):
            return a
        if isinstance(a, dict):
            return {k: add(a[k], b[k]) for k in a}
        if isinstance(a, list):
            return [x + y for x, y in zip(a, b, strict=True)]
        return a + b

    if not queues:
        return {}
    out = {k: v for k, v in queues[0].items() if k != "queue"}
    for q in queues[1:]:
        out = add(out, {k: v for k, v in q.items() if k != "queue"})
    return out


def latency_quantile(buckets: list[int], q: float) -> int | None:
    """The upper bound (us) of the bucket holding quantile ``q`` (None: no samples;
    the open last bucket reports its lower bound)."""
    total = sum(buckets)
    if not total:
        return None
    rank = q * total
    seen = 0
    for b, n in enumerate(buckets):
        seen += n
        if seen >= rank and n:
            return LATENCY_BOUNDS_US[b] if b < len(LATENCY_BOUNDS_US) else LATENCY_BOUNDS_US[-1]
    return LATENCY_BOUNDS_US[-1]
