"""A write-back cache of qcow2 metadata clusters (L2 tables, refcount blocks).

Tables are cached whole (one cluster each) by their host offset, least recently
used first out.  A dirty table can only leave the cache after it was written, and
*when* it may be written is the image's decision (metadata ordering, see
``image.py``): ``make_room`` is called when every cached table is dirty.
QEMU sizes these caches with ``l2-cache-size`` / ``refcount-cache-size``; so do we
(``default_l2_cache_bytes``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator

DEFAULT_L2_CACHE_MAX = 32 << 20
"""QEMU's default ceiling of the L2 cache on Linux (``DEFAULT_L2_CACHE_MAX_SIZE``)."""
DEFAULT_REFCOUNT_CACHE_CLUSTERS = 4
MIN_TABLES = 2


def default_l2_cache_bytes(virtual_size: int, cluster_size: int, entry_size: int) -> int:
    """QEMU's default: enough L2 tables to map the whole disk, at most 32 MiB."""
    entries = -(-virtual_size // cluster_size)
    return max(min(entries * entry_size, DEFAULT_L2_CACHE_MAX), MIN_TABLES * cluster_size)


class TableCache:
    """Up to ``capacity`` tables of ``table_size`` bytes, keyed by host offset."""

    def __init__(
        self,
        capacity: int,
        table_size: int,
        load: Callable[[int], bytearray],
        store: Callable[[int, bytearray], None],
        make_room: Callable[[], None],
    ) -> None:
        self.capacity = max(capacity, MIN_TABLES)
        self.table_size = table_size
        self._load = load
        self._store = store
        self._make_room = make_room
        self._tables: OrderedDict[int, bytearray] = OrderedDict()
        self._dirty: set[int] = set()
        self.hits = 0
        self.misses = 0

    def __contains__(self, offset: int) -> bool:
        return offset in self._tables

    def get(self, offset: int) -> bytearray:
        """The table at ``offset`` (read on a miss)."""
        table = self._tables.get(offset)
        if table is not None:
            self._tables.move_to_end(offset)
            self.hits += 1
            return table
        self.misses += 1
        table = self._load(offset)
        self._insert(offset, table)
        return table

    def new(self, offset: int) -> bytearray:
        """A zeroed table for a freshly allocated cluster (dirty: never read it)."""
        table = bytearray(self.table_size)
        self._insert(offset, table)
        self._dirty.add(offset)
        return table

    def mark_dirty(self, offset: int) -> None:
        self._dirty.add(offset)

    def _insert(self, offset: int, table: bytearray) -> None:
        self._evict()
        self._tables[offset] = table

    def _evict(self) -> None:
        while len(self._tables) >= self.capacity:
            victim = next((o for o in self._tables if o not in self._dirty), None)
            if victim is None:
                self._make_room()  # writes dirty tables (in the image's order)
                victim = next((o for o in self._tables if o not in self._dirty), None)
                if victim is None:  # make_room could not clean anything
                    victim = next(iter(self._tables))
                    self.write(victim)
            del self._tables[victim]

    def dirty(self) -> Iterator[int]:
        return iter(sorted(self._dirty))

    @property
    def has_dirty(self) -> bool:
        return bool(self._dirty)

    def write(self, offset: int) -> None:
        """Write one dirty table back."""
        if offset in self._dirty:
            self._store(offset, self._tables[offset])
            self._dirty.discard(offset)

    def write_all(self) -> None:
        for offset in list(self.dirty()):
            self.write(offset)

    def drop(self, offset: int) -> None:
        """Forget a table (its cluster was freed)."""
        self._tables.pop(offset, None)
        self._dirty.discard(offset)
