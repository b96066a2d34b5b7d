"""virtio-blk options and configuration space (virtio 1.4 §5.2.4).

``BlkOptions`` is what a user chooses (the ``virtio serve blk`` CLI builds one);
``BLK_CONFIG`` declares the configuration space (``struct virtio_blk_config``, only
``writeback`` writable: §5.2.5 with VIRTIO_BLK_F_CONFIG_WCE) and ``config_values``
turns options plus runtime state (capacity, cache mode) into its field values.
Fields whose feature bit is not offered read as zero; ``unused0``/``unused1`` are
zero (devicenormative §5.2.5.2: "The device MUST initialize padding bytes unused0
and unused1 to 0").
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from virtio.config_space import ConfigLayout
from virtio.spec.blk import VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_SECTOR_SIZE, virtio_blk_config
from virtio.spec.sections import S_5_2_4

MAX_REQUEST_SECTORS = (1 << 31) // VIRTIO_BLK_SECTOR_SIZE - 1
"""Default ``max_discard_sectors`` / ``max_write_zeroes_sectors``: just under 2 GiB
per segment (QEMU uses the same bound, BDRV_REQUEST_MAX_SECTORS)."""


BLK_CONFIG = ConfigLayout(virtio_blk_config, writable={"writeback"}, section=S_5_2_4)
"""The virtio-blk configuration space: the spec struct, ``writeback`` writable."""
WRITEBACK_OFFSET = BLK_CONFIG.field("writeback").offset
"""Offset of ``writeback`` in ``virtio_blk_config`` (32), the only writable field."""
CONFIG_SIZE = BLK_CONFIG.size
"""Size of ``struct virtio_blk_config`` in virtio 1.4 (96 bytes, with ``zoned``)."""


@dataclass(frozen=True)
class BlkOptions:
    """How to build a virtio-blk device (``VirtioBlk.from_options``).

    ``path`` is a raw image file or block device.  ``read_only`` opens it O_RDONLY
    and offers VIRTIO_BLK_F_RO.  ``num_queues`` > 1 offers VIRTIO_BLK_F_MQ.
    ``serial`` is the GET_ID string (ASCII, at most 20 bytes).  ``blk_size`` and the
    topology fields are advisory (the protocol always addresses 512-byte sectors,
    §5.2.5).  ``writeback`` is the initial cache mode (1 = writeback, 0 =
    writethrough: every write is made durable before it completes).  ``seg_max``
    defaults to ``queue_size - 2`` (as QEMU); ``size_max = 0`` does not offer
    VIRTIO_BLK_F_SIZE_MAX.  ``discard`` / ``write_zeroes`` offer those requests with
    the given limits.  ``lock`` takes a lock on the image so that a second user
    fails with ``ImageLockedError``.  ``incoming``: the destination of a live
    migration, which takes the lock (of a raw image) only when its first vring
    starts, after the source's back-end released it (``VirtioBlk.ring_starting``).
    """

    path: str | os.PathLike[str] | None = None
    read_only: bool = False
    num_queues: int = 1
    queue_size: int = 256
    serial: str = ""
    blk_size: int = VIRTIO_BLK_SECTOR_SIZE
    physical_block_exp: int = 0
    alignment_offset: int = 0
    min_io_size: int = 1
    opt_io_size: int = 0
    size_max: int = 0
    seg_max: int | None = None
    writeback: bool = True
    discard: bool = True
    max_discard_sectors: int = MAX_REQUEST_SECTORS
    max_discard_seg: int = 32
    discard_sector_alignment: int | None = None
    write_zeroes: bool = True
    max_write_zeroes_sectors: int = MAX_REQUEST_SECTORS
    max_write_zeroes_seg: int = 32
    lock: bool = True
    incoming: bool = False
    cache: str = "writeback"
    """QEMU's ``cache=``: none (O_DIRECT), writeback, writethrough (``writeback``
    starts at 0), unsafe (flushes ignored); see ``backend.RawFileBackend``."""
    aio: str = "io_uring"
    """The data plane's I/O engine: io_uring (threads where it cannot run) or threads."""
    queue_threads: int | None = None
    """Data plane threads: 0 = one per queue; N = N threads with the queues assigned
    round-robin (queue i on thread i mod N, as QEMU's iothread-vq-mapping), each
    thread waiting in one io_uring for all its queues (io_uring only); None (the
    default): ``data_plane_threads``."""

    @property
    def data_plane_threads(self) -> int:
        """``queue_threads``, or by default: one thread for all queues (of several)
        under ``cache=none`` with io_uring (O_DIRECT: the disk is the limit and the kernel
        work per request is the same whoever submits it, so one thread's single
        wake-up for several queues' events is the cheaper one -- QEMU's one
        iothread), a thread per queue otherwise (the page cache: a queue thread is
        CPU-bound, two use two cores).  Measured in docs/benchmarks.md (issue 8)."""
        if self.queue_threads is not None:
            return self.queue_threads
        shared = self.cache == "none" and self.aio == "io_uring" and self.num_queues > 1
        return 1 if shared else 0

    def __post_init__(self) -> None:
        if self.cache not in ("none", "writeback", "writethrough", "unsafe"):
            raise ValueError(
                f"cache must be none, writeback, writethrough or unsafe: {self.cache!r}"
            )
        if self.aio not in ("io_uring", "threads"):
            raise ValueError(f"aio must be io_uring or threads, not {self.aio!r}")
        if self.queue_threads is not None and not 0 <= self.queue_threads <= 64:
            raise ValueError(f"queue_threads must be in 0..64, not {self.queue_threads}")
        if not 1 <= self.num_queues <= 0xFFFF:
            raise ValueError(f"num_queues must be in 1..65535, not {self.num_queues}")
        qs = self.queue_size
        if not (2 <= qs <= 32768 and qs & (qs - 1) == 0):
            raise ValueError(f"queue_size must be a power of 2 in 2..32768, not {qs}")
        bs = self.blk_size
        if bs < VIRTIO_BLK_SECTOR_SIZE or bs & (bs - 1):
            raise ValueError(f"blk_size must be a power of 2 >= 512, not {bs}")
        if not 0 <= self.physical_block_exp <= 0xFF or not 0 <= self.alignment_offset <= 0xFF:
            raise ValueError("physical_block_exp and alignment_offset must fit in a u8")
        if not 0 <= self.min_io_size <= 0xFFFF or not 0 <= self.opt_io_size <= 0xFFFFFFFF:
            raise ValueError("min_io_size must fit in a le16 and opt_io_size in a le32")
        for name in (
            "size_max",
            "max_discard_sectors",
            "max_discard_seg",
            "max_write_zeroes_sectors",
            "max_write_zeroes_seg",
        ):
            value = getattr(self, name)
            if not 0 <= value <= 0xFFFFFFFF:
                raise ValueError(f"{name} must fit in a le32, not {value}")
        if self.seg_max is not None and not 1 <= self.seg_max <= 0xFFFFFFFF:
            raise ValueError(f"seg_max must be in 1..2**32-1, not {self.seg_max}")
        self.serial_bytes()  # validates

    def serial_bytes(self) -> bytes:
        """The GET_ID string: ASCII, at most ``VIRTIO_BLK_ID_BYTES`` (§5.2.6)."""
        try:
            raw = self.serial.encode("ascii")
        except UnicodeEncodeError:
            raise ValueError(f"serial must be ASCII: {self.serial!r}") from None
        if len(raw) > VIRTIO_BLK_ID_BYTES or b"\0" in raw:
            raise ValueError(
                f"serial must be at most {VIRTIO_BLK_ID_BYTES} bytes without NUL: {self.serial!r}"
            )
        return raw

    @property
    def effective_seg_max(self) -> int:
        return self.seg_max if self.seg_max is not None else self.queue_size - 2

    @property
    def effective_discard_alignment(self) -> int:
        if self.discard_sector_alignment is not None:
            return self.discard_sector_alignment
        return self.blk_size // VIRTIO_BLK_SECTOR_SIZE


def config_values(
    opts: BlkOptions,
    *,
    capacity: int,
    writeback: int,
    discard: bool,
    write_zeroes: bool,
    write_zeroes_may_unmap: bool,
) -> dict[str, Any]:
    """The ``struct virtio_blk_config`` (§5.2.4) field values for ``opts``.
    ``capacity`` is in 512-byte sectors; ``discard``/``write_zeroes`` say whether
    those features are offered (their fields are zero otherwise)."""
    return {
        "capacity": capacity,
        "size_max": opts.size_max,
        "seg_max": opts.effective_seg_max,
        "geometry": {"cylinders": 0, "heads": 0, "sectors": 0},
        "blk_size": opts.blk_size,
        "topology": {
            "physical_block_exp": opts.physical_block_exp,
            "alignment_offset": opts.alignment_offset,
            "min_io_size": opts.min_io_size,
            "opt_io_size": opts.opt_io_size,
        },
        "writeback": writeback,
        "unused0": 0,
        "num_queues": opts.num_queues,
        "max_discard_sectors": opts.max_discard_sectors if discard else 0,
        "max_discard_seg": opts.max_discard_seg if discard else 0,
        "discard_sector_alignment": opts.effective_discard_alignment if discard else 0,
        "max_write_zeroes_sectors": opts.max_write_zeroes_sectors if write_zeroes else 0,
        "max_write_zeroes_seg": opts.max_write_zeroes_seg if write_zeroes else 0,
        "write_zeroes_may_unmap": int(write_zeroes and write_zeroes_may_unmap),
        "unused1": bytes(3),
        "max_secure_erase_sectors": 0,
        "max_secure_erase_seg": 0,
        "secure_erase_sector_alignment": 0,
        "zoned": {
            "zone_sectors": 0,
            "max_open_zones": 0,
            "max_active_zones": 0,
            "max_append_sectors": 0,
            "write_granularity": 0,
            "model": 0,
            "unused2": bytes(3),
        },
    }


def build_config(opts: BlkOptions, **state: Any) -> bytes:
    """``struct virtio_blk_config`` bytes (``config_values``' arguments)."""
    return BLK_CONFIG.build(config_values(opts, **state))
