"""Device timing models (``run-driver --timing``): when the device does the work of a
request, and when, and in which order, finished requests reach the used ring.

A :class:`TimingGate` is the ``CompletionGate`` of ``virtio.service``: a request
queue's service (``RequestService``) asks it to ``admit`` every chain it pops before
the device processes it (reads its data, writes its status), and the device's queue
services hand it every finished chain instead of writing the used ring, so the model
applies to any device and any transport.  Request queues (blk) are delayed at
admission: the device's work itself happens late, so a driver that reads a status
byte before the used entry, or rewrites a buffer still in flight, sees it.  Buffer
queues (rng, net receive, input events) are delayed at completion.  Its clock is the guest's exits
(``tick`` after each one): exit counts are the same on KVM and the software CPU, so a
run is reproducible from its mode and seed on either.  When the guest halts with
nothing pending, the machine calls ``idle``: time jumps to the next held completion
(a device finishing while the CPU sleeps).

Modes (delays in exits; "a request": its processing for request queues, its
completion for buffer queues):

* ``inline``: at once, in pop order (the device the emulator always had);
* ``deferred``: every request ``delay`` exits later, in order;
* ``reorder``: each request 0-4 exits later, ties in a random order (§2.7.8: a
  device may use buffers in any order unless VIRTIO_F_IN_ORDER is negotiated);
* ``batch``: processed at once; completions held until ``batch`` are held, the oldest
  has waited ``batch_wait`` exits, or the guest waits; then all are written with one
  used-index update: one interrupt for several;
* ``slow-start``: the first ``slow`` requests ``long_delay`` exits late, then inline;
* ``random``: per request a delay of 0-``max_delay`` exits (request queues: then as
  much again for the completion), ties in a random order.

Queues listed in ``in_order`` are delayed the same way but never reordered: their used
ring order carries meaning (virtio-input's eventq: the order of the events, §5.8.6).
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from virtio.queues.chain import DescriptorChain
from virtio.service import QueueService, RequestService

MODES = ("inline", "deferred", "reorder", "batch", "slow-start", "random")
NEVER = 1 << 62
"""Later than any deadline."""


@dataclass
class TimingParams:
    delay: int = 3
    batch: int = 4
    batch_wait: int = 16
    slow: int = 4
    long_delay: int = 24
    max_delay: int = 8


Hook = Callable[[int, QueueService, DescriptorChain, int], bool]
"""``(completion number, service, chain, written) -> keep``: called for every
completion when the device finishes it (injections); False drops it."""


class TimingGate:
    def __init__(self, mode: str = "inline", seed: int = 0, params: TimingParams | None = None):
        if mode not in MODES:
            raise ValueError(f"timing mode must be one of {', '.join(MODES)}, not {mode!r}")
        self.mode = mode
        self.seed = seed
        self.params = params or TimingParams()
        self.rng = random.Random(seed)
        self.now = 0
        """Exits so far: the device clock."""
        self.completed = 0
        """Completions the device finished (the request number of injections)."""
        self.released = 0
        """Completions written to a used ring."""
        self._held: list[tuple[int, float, int, QueueService, DescriptorChain, int]] = []
        self._seq = 0  # sequence number of the next completion (ties, snapshots)
        self.on_complete: list[Hook] = []
        self.on_hold: Callable[[QueueService, DescriptorChain, int], None] | None = None
        self.on_release: Callable[[QueueService, Sequence[tuple[DescriptorChain, int]]], None]
        self.on_release = lambda service, items: None
        self._waiting: list[tuple[int, float, int, Callable[[], None], QueueService, int]] = []
        """Requests popped, not yet admitted: (due, key, seq, start, service, head)."""
        self._admitted = 0
        self.device_call: Callable[[list[Callable[[], None]], list[int]], None] | None = None
        """Runs start callables (of requests of the listed queues) in the device's loop
        and returns once it settled (the session sets it); without it requests are
        admitted at once."""
        self.on_defer: Callable[[QueueService, DescriptorChain, int], None] | None = None
        self.in_order: set[int] = set()
        """Queue indices whose completions keep their order (delays only)."""
        self._last_due: dict[int, int] = {}

    # -- CompletionGate ------------------------------------------------------------------
    def admit(self, service: QueueService, chain: DescriptorChain, start: Callable[[], None]):
        """May the device process ``chain`` now?  If not, ``start`` runs when it is due."""
        p, rng, mode = self.params, self.rng, self.mode
        if self.device_call is None or mode in ("inline", "batch"):
            return True
        self._admitted += 1
        delay, key = 0, float(self._seq)
        if mode == "deferred":
            delay = p.delay
        elif mode == "reorder":
            delay, key = rng.randint(0, 4), rng.random()
        elif mode == "slow-start":
            delay = p.long_delay if self._admitted <= p.slow else 0
        elif mode == "random":
            delay, key = rng.randint(0, p.max_delay), rng.random()
        if delay == 0:
            return True
        seq = self._seq
        self._seq += 1
        heapq.heappush(self._waiting, (self.now + delay, key, seq, start, service, chain.head))
        if self.on_defer is not None:
            self.on_defer(service, chain, self.now + delay)
        return False

    def _admit_due(self, until: int) -> None:
        starts, queues = [], set()
        while self._waiting and self._waiting[0][0] <= until:
            item = heapq.heappop(self._waiting)
            starts.append(item[3])
            queues.add(item[4].index)
        if starts:
            assert self.device_call is not None
            self.device_call(starts, sorted(queues))

    def complete(self, service: QueueService, items: Sequence[tuple[DescriptorChain, int]]):
        p, rng = self.params, self.rng
        for chain, written in items:
            self.completed += 1
            n = self.completed
            if not all([hook(n, service, chain, written) for hook in self.on_complete]):
                continue
            seq = self._seq
            self._seq += 1
            mode, delay, key = self.mode, 0, float(seq)
            if isinstance(service, RequestService) and self.device_call is not None:
                if mode == "reorder":  # processed late already: only the order of ties
                    key = rng.random()
                elif mode in ("deferred", "slow-start"):
                    pass
                elif mode == "random":
                    delay, key = rng.randint(0, p.max_delay), rng.random()
                elif mode == "batch":
                    delay = p.batch_wait
            elif mode == "deferred":
                delay = p.delay
            elif mode == "reorder":
                delay, key = rng.randint(0, 4), rng.random()
            elif mode == "batch":
                delay = p.batch_wait
            elif mode == "slow-start":
                delay = p.long_delay if self.completed <= p.slow else 0
            elif mode == "random":
                delay, key = rng.randint(0, p.max_delay), rng.random()
            due = self.now + delay
            if service.index in self.in_order:
                due, key = max(due, self._last_due.get(service.index, 0)), float(seq)
                self._last_due[service.index] = due
                delay = due - self.now
            heapq.heappush(self._held, (due, key, seq, service, chain, written))
            if delay and self.on_hold is not None:
                self.on_hold(service, chain, self.now + delay)
        if self.mode == "batch" and len(self._held) >= p.batch:
            self._release(NEVER)  # a full batch
        else:
            self._release(self.now)

    # -- the clock -----------------------------------------------------------------------
    def tick(self) -> None:
        """One guest exit went by."""
        self.now += 1
        if self._waiting and self._waiting[0][0] <= self.now:
            self._admit_due(self.now)
        if self._held and self._held[0][0] <= self.now:
            self._release(self.now)

    def idle(self) -> bool:
        """The guest waits with nothing pending: the device does the next request(s)
        it has not started, or finishes the next held completion(s).  True if
        something happened."""
        if self._waiting and (not self._held or self._waiting[0][0] <= self._held[0][0]):
            due = self._waiting[0][0]
            self.now = max(self.now, due)
            self._admit_due(due)
            if self._held and self._held[0][0] <= self.now:
                self._release(self.now)
            return True
        if not self._held:
            return False
        due = self._held[0][0]
        self.now = max(self.now, due)
        self._release(due)
        return True

    @property
    def held(self) -> int:
        """Requests not yet admitted plus completions not yet written."""
        return len(self._held) + len(self._waiting)

    # -- snapshots (run-driver --save-at / --restore) -------------------------------------
    def save_state(self) -> dict:
        """The clock, counters, the seeded generator's state and every held completion
        (queue, head, descriptors, bytes written: what the used entry needs)."""
        if any(service.queue.packed for *_, service, _ in self._waiting):
            raise RuntimeError(
                "a request on a packed ring waits for the device (timing): not saved;"
                " pick another exit, or a split ring"
            )
        version, internal, gauss = self.rng.getstate()
        return {
            "now": self.now,
            "completed": self.completed,
            "released": self.released,
            "seq": self._seq,
            "rng": [version, list(internal), gauss],
            "last_due": {str(k): v for k, v in self._last_due.items()},
            "held": [
                [due, key, seq, service.index, chain.head, chain.ndesc, written]
                for due, key, seq, service, chain, written in self._held
            ],
            "admitted": self._admitted,
            "waiting": [
                [due, key, seq, service.index, head]
                for due, key, seq, _, service, head in self._waiting
            ],
        }

    def load_state(self, state: dict, services: dict[int, QueueService]) -> None:
        """Apply ``save_state()`` output; ``services`` are the running queue services
        the held completions go back through.  A held chain is rebuilt from its head and
        descriptor count: its data is already in guest memory, only the used entry is due."""
        self.now, self.completed = int(state["now"]), int(state["completed"])
        self.released, self._seq = int(state["released"]), int(state["seq"])
        self._last_due = {int(k): int(v) for k, v in state.get("last_due", {}).items()}
        version, internal, gauss = state["rng"]
        self.rng.setstate((int(version), tuple(int(x) for x in internal), gauss))
        held = []
        for due, key, seq, index, head, ndesc, written in state["held"]:
            service = services.get(int(index))
            if service is None:
                raise ValueError(f"held completion for queue {index}, which is not running")
            q = service.queue
            limit = q.size
            if not 0 <= int(head) < limit or not 1 <= int(ndesc) <= limit or int(written) < 0:
                raise ValueError(f"held completion head {head} ndesc {ndesc} out of range")
            chain = DescriptorChain(q, int(head), int(ndesc), b"", 0, 0, int(written))
            held.append((int(due), float(key), int(seq), service, chain, int(written)))
        heapq.heapify(held)
        self._held = held
        self._admitted = int(state.get("admitted", 0))
        waiting = []
        for due, key, seq, index, head in state.get("waiting", []):
            service = services.get(int(index))
            if not isinstance(service, RequestService):
                raise ValueError(f"request waiting on queue {index}, which serves no requests")
            if service.queue.packed:
                raise ValueError("requests waiting for the device on a packed ring: not restorable")
            chain = service.queue.chain_at(int(head))  # validated as a pop
            start = service.resubmit(chain)
            waiting.append((int(due), float(key), int(seq), start, service, int(head)))
        heapq.heapify(waiting)
        self._waiting = waiting

    def _release(self, until: int) -> None:
        if self.mode == "batch" and self._held and self._held[0][0] <= until:
            until = NEVER  # the oldest is due: the whole batch goes
        groups: dict[int, tuple[QueueService, list[tuple[DescriptorChain, int]]]] = {}
        held = self._held
        while held and held[0][0] <= until:
            _, _, _, service, chain, written = heapq.heappop(held)
            groups.setdefault(id(service), (service, []))[1].append((chain, written))
        for service, items in groups.values():
            if service.return_used(items):
                self.released += len(items)
                self.on_release(service, items)
