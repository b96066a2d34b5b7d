"""The virtio-blk device model (virtio 1.4 §5.2).

``VirtioBlk`` parses each chain (``request.BlkRequest``, pure), checks it against
the spec and the device limits, runs it on a ``BlockBackend`` and writes the
status byte.  Status decisions, with the spec text they follow:

* IN / OUT whose ``data[]`` is not a multiple of 512 bytes, or that reach beyond
  ``capacity``: VIRTIO_BLK_S_IOERR ("device or driver error", §5.2.6; the
  drivernormative §5.2.6.1 forbids both: "A driver MUST NOT submit a request which
  would cause a read or write beyond capacity", "The length of data MUST be a
  multiple of 512 bytes").  Addresses are always in 512-byte sectors, whatever
  ``blk_size`` says (§5.2.5).
* OUT, DISCARD, WRITE_ZEROES (and SECURE_ERASE) when VIRTIO_BLK_F_RO is offered:
  VIRTIO_BLK_S_IOERR and nothing is written (devicenormative §5.2.6.2: "A device
  MUST set the status byte to VIRTIO_BLK_S_IOERR for a write request if the
  VIRTIO_BLK_F_RO feature if offered, and MUST NOT write any data").
* DISCARD / WRITE_ZEROES: any flag other than ``unmap`` -> UNSUPP; ``unmap`` on a
  discard -> UNSUPP (devicenormative §5.2.6.2, both MUST).  More segments than
  ``max_discard_seg``/``max_write_zeroes_seg`` -> UNSUPP (a request shape the
  device does not support; QEMU answers UNSUPP too); a segment longer than
  ``max_*_sectors`` or outside ``capacity``, no segment at all or a length that
  is not a multiple of 16 -> IOERR (driver errors, drivernormative §5.2.6.1; QEMU
  also answers IOERR).  The feature not negotiated -> UNSUPP.
* Unknown types, SECURE_ERASE, GET_LIFETIME (features not offered) and the zoned
  requests -> UNSUPP (devicenormative §5.2.6.2: zoned requests "MUST" be rejected
  with UNSUPP when VIRTIO_BLK_F_ZONED is not negotiated).
* FLUSH is always executed (``fdatasync``): VIRTIO_BLK_F_FLUSH is always offered
  (devicenormative §5.2.5.2 "Devices SHOULD always offer VIRTIO_BLK_F_FLUSH, and
  MUST offer it if they offer VIRTIO_BLK_F_CONFIG_WCE").
* A failed I/O is answered VIRTIO_BLK_S_IOERR exactly once, as it happened, and
  never retried (a retried ``fdatasync`` would succeed after Linux dropped the
  dirty pages).  After a writeback error the image's sticky error fails every later
  FLUSH and write-through write until the back-end is restarted: what reached the
  disk is unknown, so durability can no longer be promised (QEMU's file-posix
  reasons the same way).  Failures are logged through a rate limiter (a guest can
  cause one per request).
* GET_ID writes the serial, NUL-padded, into at most 20 bytes of ``data[]``.

Cache mode (devicenormative §5.2.6.2, stable writes): a write is made durable
before its completion when (1) neither CONFIG_WCE nor FLUSH was negotiated, (2)
CONFIG_WCE was negotiated and ``writeback`` is 0, or (3) FLUSH was negotiated
without CONFIG_WCE and the device was configured writethrough.  If CONFIG_WCE is
negotiated without FLUSH, ``writeback`` starts at 0 (devicenormative §5.2.5.2).

A chain with a header shorter than 16 bytes or no writable status byte raises
``DescriptorChainError`` (from ``BlkRequest.parse``): the device cannot answer, so
the framework sets DEVICE_NEEDS_RESET.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
from typing import Any, ClassVar

from virtio.dataplane import QueueThread
from virtio.device import ActiveDevice, ControlCommand, VirtioDevice
from virtio.devices.blk.backend import BlockBackend, MemoryBackend, RawFileBackend
from virtio.devices.blk.config import BLK_CONFIG, BlkOptions, config_values
from virtio.devices.blk.dataplane import BlkDataPlane
from virtio.devices.blk.nbd import NbdBackend, is_nbd_uri
from virtio.devices.blk.nbd_dataplane import NbdDataPlane
from virtio.devices.blk.probe import ImageFormatError, check_image, write_would_change_format
from virtio.devices.blk.request import SEGMENT_SIZE, BlkRequest
from virtio.errors import BackendIOError, DriverError
from virtio.queues.chain import DescriptorChain
from virtio.ratelimit import LogRateLimiter
from virtio.spec.blk import (
    VIRTIO_BLK_SECTOR_SIZE,
    BlkDiscardFlag,
    BlkFeature,
    BlkReqType,
    BlkStatus,
)
from virtio.spec.ids import DeviceId
from virtio.spec.sections import S_5_2_6_1

log = logging.getLogger(__name__)

F = BlkFeature
T = BlkReqType
OK = int(BlkStatus.VIRTIO_BLK_S_OK)
IOERR = int(BlkStatus.VIRTIO_BLK_S_IOERR)
UNSUPP = int(BlkStatus.VIRTIO_BLK_S_UNSUPP)
UNMAP = int(BlkDiscardFlag.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)
SECTOR = VIRTIO_BLK_SECTOR_SIZE

_IN = int(T.VIRTIO_BLK_T_IN)
_OUT = int(T.VIRTIO_BLK_T_OUT)
_FLUSH = int(T.VIRTIO_BLK_T_FLUSH)
_GET_ID = int(T.VIRTIO_BLK_T_GET_ID)
_DISCARD = int(T.VIRTIO_BLK_T_DISCARD)
_WRITE_ZEROES = int(T.VIRTIO_BLK_T_WRITE_ZEROES)
_WRITES = frozenset({_OUT, _DISCARD, _WRITE_ZEROES, int(T.VIRTIO_BLK_T_SECURE_ERASE)})
"""Request types that modify the disk (rejected with IOERR on a read-only device)."""
STATS_KINDS = ("in", "out", "flush", "get-id", "discard", "write-zeroes", "other")
"""Request kinds counted per queue (the native fast path counts in/out/flush by the
same indices: ``BLK_STAT_*`` in ``dataplane.h``)."""
_KIND = {_IN: 0, _OUT: 1, _FLUSH: 2, _GET_ID: 3, _DISCARD: 4, _WRITE_ZEROES: 5}
_KIND_OTHER = len(STATS_KINDS) - 1
STATS_STATUSES = ("ok", "ioerr", "unsupp", "other")
"""Statuses counted per queue; the index is the status byte (§5.2.6)."""


def _with_block_sizes(opts: BlkOptions, backend: RawFileBackend) -> BlkOptions:
    """Unless set by the user, report the image's real logical and physical block
    sizes (BLK_SIZE, TOPOLOGY's ``physical_block_exp``; §5.2.4): a guest that
    follows them issues requests O_DIRECT can serve without bouncing."""
    if opts.blk_size != SECTOR or opts.physical_block_exp:
        return opts
    logical = backend.logical_block_size
    physical = backend.physical_block_size
    if logical & (logical - 1) or physical & (physical - 1) or physical < logical:
        return opts
    return dataclasses.replace(
        opts, blk_size=logical, physical_block_exp=(physical // logical).bit_length() - 1
    )


class VirtioBlk(VirtioDevice):
    """virtio-blk (spec §5.2) over a ``BlockBackend``.

    ``device_features``/``queue_max_sizes`` are per instance (from ``options``):
    SIZE_MAX (if ``size_max``), SEG_MAX, BLK_SIZE, TOPOLOGY, FLUSH, CONFIG_WCE,
    RO (read-only), MQ (``num_queues`` > 1), DISCARD and WRITE_ZEROES (unless
    disabled or read-only).  GET_ID needs no feature.
    """

    device_id: ClassVar[DeviceId] = DeviceId.VIRTIO_ID_BLOCK
    config_layout = BLK_CONFIG
    stats_kinds = STATS_KINDS
    stats_statuses = STATS_STATUSES

    def __init__(self, backend: BlockBackend, options: BlkOptions | None = None) -> None:
        super().__init__()
        self._dataplanes: set[BlkDataPlane] = set()
        self._queue_threads: dict[int, QueueThread] = {}
        self.native_dataplane = True
        """Serve eventfd-notified queues from the native data plane (``dataplane.py``);
        False forces the Python loop (``PYVIRTIO_BLK_DATAPLANE=0`` does so globally)."""
        opts = options if options is not None else BlkOptions()
        self.backend = backend
        self.options = opts
        self.read_only = bool(opts.read_only or backend.read_only)
        self.capacity = backend.size // SECTOR
        """Disk size in 512-byte sectors (a trailing partial sector is not exposed)."""
        self.serial = opts.serial_bytes()
        self.queue_max_sizes = (opts.queue_size,) * opts.num_queues
        features = (
            F.VIRTIO_BLK_F_SEG_MAX.mask
            | F.VIRTIO_BLK_F_BLK_SIZE.mask
            | F.VIRTIO_BLK_F_TOPOLOGY.mask
            | F.VIRTIO_BLK_F_FLUSH.mask
            | F.VIRTIO_BLK_F_CONFIG_WCE.mask
        )
        if opts.size_max:
            features |= F.VIRTIO_BLK_F_SIZE_MAX.mask
        if self.read_only:
            features |= F.VIRTIO_BLK_F_RO.mask
        if opts.num_queues > 1:
            features |= F.VIRTIO_BLK_F_MQ.mask
        self.offers_discard = opts.discard and not self.read_only
        self.offers_write_zeroes = opts.write_zeroes and not self.read_only
        if self.offers_discard:
            features |= F.VIRTIO_BLK_F_DISCARD.mask
        if self.offers_write_zeroes:
            features |= F.VIRTIO_BLK_F_WRITE_ZEROES.mask
        self.device_features = features
        self._writeback_default = bool(opts.writeback) and opts.cache != "writethrough"
        self.writeback = int(self._writeback_default)
        """The ``writeback`` config field: 1 writeback, 0 writethrough (§5.2.5)."""
        self.guard_format_change = False
        """The format was probed (raw): refuse writes that would make sector 0 look
        like another format (``probe.py``, QEMU's probed-raw rule)."""
        self.summary = ""
        """What the back-end's listening log line says of this disk (image, cache mode)."""
        self.errors = LogRateLimiter(log)
        """Where failed requests are logged (rate-limited: a guest can fail every one)."""
        self._sync_error_reported = False

    @classmethod
    def from_options(
        cls,
        opts: BlkOptions,
        *,
        image_format: str | None = None,
        force: bool = False,
        l2_cache_size: int | None = None,
    ) -> VirtioBlk:
        """Open ``opts.path`` as a raw or (``image_format="qcow2"``) qcow2 image
        (locked; read-only if asked), or an NBD export for an ``nbd://`` /
        ``nbd+unix://`` URI (``nbd.py``), and build the device.  ``image_format`` None
        probes it: an image of another format is refused (``probe.check_image``;
        ``force`` accepts a size that is not a whole number of sectors).
        ``l2_cache_size`` sizes a qcow2 image's L2 cache in bytes (None: QEMU's
        default).  Raises ``OSError``, ``ImageLockedError``, ``ImageFormatError`` or
        ``NbdError``."""
        if opts.path is None:
            raise ValueError("BlkOptions.path is required to open an image")
        backend: BlockBackend
        if is_nbd_uri(opts.path):  # a remote disk: nothing to probe
            if image_format not in (None, "raw"):
                raise ImageFormatError(f"--format {image_format} is not served over NBD")
            return cls(NbdBackend(os.fspath(opts.path), read_only=opts.read_only), opts)
        fmt = check_image(opts.path, image_format, force=force)
        if fmt == "qcow2":
            from virtio.devices.blk.qcow2 import Qcow2Backend

            backend = Qcow2Backend(
                opts.path,
                read_only=opts.read_only,
                lock=opts.lock and not opts.incoming,
                l2_cache_size=l2_cache_size,
                cache=opts.cache,
            )
        else:
            backend = RawFileBackend(
                opts.path,
                read_only=opts.read_only,
                lock=opts.lock and not opts.incoming,
                cache=opts.cache,
            )
        try:
            if isinstance(backend, RawFileBackend):
                opts = _with_block_sizes(opts, backend)
            device = cls(backend, opts)
        except BaseException:
            backend.close()
            raise
        device.guard_format_change = image_format is None and not device.read_only
        return device

    def close(self) -> None:
        """Close the backend (releases the image lock); log the failures the rate
        limiter held back."""
        self.errors.flush()
        self.backend.close()

    # -- live migration: the image lock changes hands (docs/migration.md) ------------------
    def _locked_image(self) -> RawFileBackend | None:
        """The raw image whose lock this device hands over (qcow2 and NBD do not)."""
        backend = self.backend
        return backend if self.options.lock and isinstance(backend, RawFileBackend) else None

    def ring_starting(self, index: int) -> None:
        """Vring ``index`` is about to be served: hold the image lock first.  The
        destination of a live migration (``BlkOptions.incoming``) takes it here, and a
        source whose migration failed takes it back when QEMU restarts its rings.
        Raises ``ImageLockedError`` (naming the holders) while anyone else holds it."""
        image = self._locked_image()
        if image is not None and not image.lock_held:
            image.take_lock()
            log.info("%s: image lock taken (vring %d starting)", image.path, index)

    async def rings_stopped_for_migration(self) -> None:
        """Every vring was stopped with dirty logging on: the switch-over of a live
        migration (QEMU's GET_VRING_BASE after VHOST_F_LOG_ALL).  Flush, then release
        the image lock for the destination's back-end, as QEMU inactivates the
        source's images.  A failed flush keeps the lock: the destination then cannot
        start on an image whose last writes may be lost."""
        image = self._locked_image()
        if image is None or not image.lock_held:
            return
        try:
            await image.flush()
        except (OSError, BackendIOError) as exc:
            log.error(
                "%s: flush before the migration's switch-over failed: %s; keeping the lock",
                image.path,
                exc,
            )
            return
        image.release_lock()
        log.info("%s: image lock released (live migration: the destination takes it)", image.path)

    # -- negotiation and configuration -----------------------------------------------------
    def _negotiated(self, feature: BlkFeature) -> bool:
        return bool(self.driver_features & feature.mask)

    def ack_features(self, features: int) -> None:
        super().ack_features(features)
        if self._negotiated(F.VIRTIO_BLK_F_CONFIG_WCE) and not self._negotiated(
            F.VIRTIO_BLK_F_FLUSH
        ):
            # devicenormative §5.2.5.2: "If VIRTIO_BLK_F_CONFIG_WCE is negotiated but
            # VIRTIO_BLK_F_FLUSH is not, the device MUST initialize writeback to 0."
            self.writeback = 0
        self._cache_mode_changed()

    def config_values(self) -> dict[str, Any]:
        return config_values(
            self.options,
            capacity=self.capacity,
            writeback=self.writeback,
            discard=self.offers_discard,
            write_zeroes=self.offers_write_zeroes,
            write_zeroes_may_unmap=self.backend.can_unmap,
        )

    def config_field_written(self, name: str, value: Any) -> None:
        """Only ``writeback`` is writable (§5.2.5: with VIRTIO_BLK_F_CONFIG_WCE the
        driver writes 0 for writethrough, 1 for writeback)."""
        if not self._negotiated(F.VIRTIO_BLK_F_CONFIG_WCE):
            log.warning("virtio-blk: writeback written without VIRTIO_BLK_F_CONFIG_WCE")
            return
        self.writeback = 1 if value else 0
        self._cache_mode_changed()

    def save_state(self) -> dict[str, Any]:
        """For a machine snapshot: the write-cache mode, the capacity and the disk's
        contents (a snapshot is replayed later, after the original run went on writing
        the disk, so the contents at the save point travel with it).  Memory disks and
        raw files only."""
        return {
            "writeback": self.writeback,
            "capacity": self.capacity,
            "disk": _disk_contents(self.backend),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        disk = state["disk"]
        if not isinstance(disk, bytes | bytearray) or len(disk) != self.backend.size:
            raise ValueError(
                f"virtio-blk: the snapshot's disk is not {self.backend.size} bytes like this one"
            )
        _write_disk(self.backend, disk)
        self.writeback = 1 if state["writeback"] else 0
        self.capacity = int(state["capacity"])
        self._cache_mode_changed()

    def reset(self) -> None:
        super().reset()
        self.writeback = int(self._writeback_default)
        self._cache_mode_changed()
        self.errors.flush()

    def resize(self, size: int | None = None) -> bool:
        """Set the capacity from ``size`` bytes (default: the backend's size now, e.g.
        after the image file was grown or shrunk) and hand it to the data planes.
        Returns whether the capacity changed; announcing it to the driver (§5.2.4,
        configuration change notification) is the transport's job."""
        if size is None:
            refresh = getattr(self.backend, "refresh_size", None)
            size = refresh() if refresh is not None else self.backend.size
        capacity = size // SECTOR
        if capacity == self.capacity:
            return False
        self.capacity = capacity
        self._state_changed()
        return True

    def resize_and_announce(self, size: int | None = None) -> dict[str, Any]:
        """``resize`` (SIGHUP, the ``resize`` control command), then tell the driver
        (§5.2.4 capacity; configuration change notification, §2.5.2: vhost-user's
        CONFIG_CHANGE_MSG).  With ``size``, a raw image file is first truncated or
        extended to ``size`` bytes (a multiple of 512)."""
        if size is not None:
            self._set_image_size(size)
        old = self.capacity
        try:
            changed = self.resize()
        except OSError as exc:
            log.warning("resize: cannot read the image size: %s", exc)
            raise
        result = {"capacity": self.capacity, "previous": old, "changed": changed}
        if not changed:
            log.info("resize: capacity unchanged (%d sectors)", old)
            return {**result, "announced": False}
        log.info("resize: capacity %d -> %d sectors", old, self.capacity)
        active = self.active
        announced = active is not None and active.config_changed()
        if not announced:
            log.warning("resize: no front-end channel to announce it (CONFIG_CHANGE_MSG not sent)")
        return {**result, "announced": announced}

    def _set_image_size(self, size: int) -> None:
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0 or size % SECTOR:
            raise ValueError(f"size must be a positive multiple of {SECTOR} bytes, not {size!r}")
        fd = getattr(self.backend, "fd", None)
        if self.read_only or not isinstance(self.backend, RawFileBackend) or fd is None:
            raise ValueError("only a writable raw image file can be resized here")
        import stat

        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("a block device is resized by its owner; resize re-reads it")
        os.ftruncate(fd, size)

    def control_commands(self) -> dict[str, ControlCommand]:
        def resize(arguments: dict[str, Any]) -> dict[str, Any]:
            return self.resize_and_announce(arguments.get("size"))

        return {
            "resize": ControlCommand(
                resize,
                "re-read the image size, or with size (bytes) truncate/extend a raw image "
                "file to it; the guest is told (config change)",
            )
        }

    def statistics_words(self) -> list[str]:
        """Extra words of the SIGUSR1 line: each data plane's ring indices and counters."""
        return [f"dataplane{p.index}=[{p.debug_state()}]" for p in self.dataplanes]

    def describe_config(self) -> dict[str, Any]:
        backend = self.backend
        return {
            **super().describe_config(),
            "image": os.fspath(self.options.path) if self.options.path is not None else None,
            "format": type(backend).__name__,
            "capacity": self.capacity,
            "read_only": self.read_only,
            "serial": self.serial.rstrip(b"\0").decode("ascii", "replace"),
            "cache": self.options.cache,
            "aio": self.options.aio,
            "writeback": self.writeback,
            "dataplanes": [p.index for p in self.dataplanes],
        }

    @property
    def writethrough(self) -> bool:
        """Whether writes must be durable when they complete (devicenormative
        §5.2.6.2, stable writes cases 1 and 2)."""
        if self._negotiated(F.VIRTIO_BLK_F_CONFIG_WCE):
            return self.writeback == 0
        if self._negotiated(F.VIRTIO_BLK_F_FLUSH):
            return not self._writeback_default
        return True

    # -- requests ---------------------------------------------------------------------------
    @property
    def dataplanes(self) -> tuple[BlkDataPlane, ...]:
        """The native data planes serving queues now, by queue index."""
        return tuple(sorted(self._dataplanes, key=lambda p: p.index))

    def queue_thread(self, k: int) -> QueueThread:
        """Data plane thread k of ``options.data_plane_threads`` (made on first use)."""
        if k not in self._queue_threads:
            self._queue_threads[k] = QueueThread(f"blk-queues-{k}")
        return self._queue_threads[k]

    def backend_sync_sources(self, count, *, add: bool) -> None:
        """Count a data plane's ``fdatasync`` calls in the backend's total."""
        if not hasattr(self.backend, "add_sync_source"):
            return
        if add:
            self.backend.add_sync_source(count)
        else:
            self.backend.remove_sync_source(count)

    def _cache_mode_changed(self) -> None:
        self._state_changed()

    def _state_changed(self) -> None:
        """Capacity, read-only or the cache mode changed: tell the data planes."""
        for plane in self._dataplanes:
            plane.update_state()

    async def serve_queue(self, active: ActiveDevice, index: int) -> None:
        """With eventfd notifications and a file or NBD backend (vhost-user), serve the
        queue from the native data plane (``dataplane.py``, ``nbd_dataplane.py``);
        otherwise the framework's loop."""
        kinds = (NbdDataPlane, BlkDataPlane)
        kind = next((k for k in kinds if k.supported(self, active, index)), None)
        plane = kind(self, active, index) if kind is not None else None
        if plane is not None and not await plane.prepare():
            plane = None
        if plane is not None:
            self.active = active
            self._dataplanes.add(plane)
            self.backend_sync_sources(plane.syncs, add=True)
            try:
                with self.counting(active, index):
                    if await plane.run():
                        return
            except DriverError as exc:  # the thread met a malformed ring
                self._driver_error(active, exc)
                return
            finally:
                self._dataplanes.discard(plane)
                self.backend_sync_sources(plane.syncs, add=False)
                plane.close_unused()
        await super().serve_queue(active, index)

    async def handle(self, queue_index: int, chain: DescriptorChain) -> int:
        req = BlkRequest.parse(chain)  # DescriptorChainError -> NEEDS_RESET
        try:
            status = await self.execute(req)
        except (OSError, BackendIOError) as exc:
            return self._failed(req, exc, queue_index)
        self._count(queue_index, req, status)
        return req.complete(status)

    def _count(self, queue_index: int, req: BlkRequest, status: int) -> None:
        t = req.type
        nbytes = req.data_len if t in (_IN, _OUT) and status == OK else 0
        self.stats.queue(queue_index).record(_KIND.get(t, _KIND_OTHER), status, nbytes)

    def complete_failed(
        self, chain: DescriptorChain, exc: OSError | BackendIOError, queue_index: int | None = None
    ) -> int:
        """Answer a request whose I/O was tried elsewhere (the native data plane) and
        failed with ``exc``: VIRTIO_BLK_S_IOERR, without trying it again."""
        req = BlkRequest.parse(chain)
        if req.type == _IN:
            req.writable_data()  # reserve data[] so that it is zeroed, not left stale
        return self._failed(req, exc, queue_index)

    def _failed(
        self, req: BlkRequest, exc: OSError | BackendIOError, queue_index: int | None = None
    ) -> int:
        if queue_index is not None:
            self._count(queue_index, req, IOERR)
        err = getattr(exc, "errno", None)
        kind = f"IOERR {errno.errorcode.get(err, 'error')}" if err else "IOERR"
        self.errors.warning(kind, "virtio-blk: %r failed: %s", req, exc)
        sticky = getattr(self.backend, "sync_error", 0)
        if sticky and not self._sync_error_reported:
            self._sync_error_reported = True
            log.error(
                "virtio-blk: a flush of the image failed (%s): writes since the last "
                "successful flush may be lost; every later flush and write-through write "
                "fails until the back-end is restarted",
                errno.errorcode.get(sticky, sticky),
            )
        req.zero_fill_data()  # a partial read leaves no stale bytes behind
        return req.complete(IOERR)

    def _range_ok(self, sector: int, nbytes: int) -> bool:
        return sector <= self.capacity and nbytes // SECTOR <= self.capacity - sector

    async def execute(self, req: BlkRequest) -> int:
        """Run a parsed request; return its status byte."""
        t = req.type
        if t in _WRITES and self.read_only:
            return IOERR
        if t in (_IN, _OUT):
            if req.data_len % SECTOR or not self._range_ok(req.sector, req.data_len):
                if self.strict:
                    self._io_violation(req)
                return IOERR
            offset = req.sector * SECTOR
            if t == _IN:
                await self.backend.read(offset, req.writable_data())
                req.log_data_dirty()
            else:
                views = req.readable_data()
                if self.guard_format_change and req.sector == 0 and self._changes_format(views):
                    return IOERR
                await self.backend.write(offset, views, sync=self.writethrough)
            return OK
        if t == _FLUSH:
            if req.sector and self.strict:
                self.strict_violation(
                    DriverError(
                        f"FLUSH with sector {req.sector}: a driver MUST set sector to 0 for a"
                        " VIRTIO_BLK_T_FLUSH request",
                        section=S_5_2_6_1,
                    )
                )
            await self.backend.flush()
            return OK
        if t == _GET_ID:
            req.write_id(self.serial)
            return OK
        if t in (_DISCARD, _WRITE_ZEROES):
            return await self._discard_write_zeroes(req, t == _WRITE_ZEROES)
        return UNSUPP

    def _io_violation(self, req: BlkRequest) -> None:
        """Strict mode: name the §5.2.6.1 rule an IN/OUT answered IOERR broke."""
        kind = "IN" if req.type == _IN else "OUT"
        if req.data_len % SECTOR:
            why = (
                f"{kind} with {req.data_len} bytes of data: the length of data MUST be a"
                " multiple of 512 bytes"
            )
        else:
            why = (
                f"{kind} of sectors [{req.sector}, +{req.data_len // SECTOR}) beyond capacity"
                f" {self.capacity}: a driver MUST NOT submit a request which would cause a"
                " read or write beyond capacity"
            )
        self.strict_violation(DriverError(why, section=S_5_2_6_1))

    def _changes_format(self, views: list[memoryview]) -> bool:
        first = bytearray()
        for v in views:  # the first sector only
            first += v[: SECTOR - len(first)]
            if len(first) == SECTOR:
                break
        found = write_would_change_format(0, bytes(first))
        if found is not None:
            self.errors.warning(
                "format",
                "virtio-blk: refused a write of a %s header to sector 0 of a probed raw "
                "image (the next start would read it as %s; serve with --format raw to "
                "allow it)",
                found,
                found,
            )
        return found is not None

    async def _discard_write_zeroes(self, req: BlkRequest, write_zeroes: bool) -> int:
        opts = self.options
        if write_zeroes:
            if not (self.offers_write_zeroes and self._negotiated(F.VIRTIO_BLK_F_WRITE_ZEROES)):
                return UNSUPP
            max_seg, max_sectors = opts.max_write_zeroes_seg, opts.max_write_zeroes_sectors
        else:
            if not (self.offers_discard and self._negotiated(F.VIRTIO_BLK_F_DISCARD)):
                return UNSUPP
            max_seg, max_sectors = opts.max_discard_seg, opts.max_discard_sectors
        if req.data_len == 0 or req.data_len % SEGMENT_SIZE:
            return IOERR
        if req.segment_count > max_seg:
            return UNSUPP
        segments = req.segments()
        for seg in segments:
            if seg.flags & ~UNMAP or (seg.flags & UNMAP and not write_zeroes):
                return UNSUPP
        ranges = []
        for seg in segments:
            if seg.num_sectors > max_sectors or not self._range_ok(
                seg.sector, seg.num_sectors * SECTOR
            ):
                return IOERR
            ranges.append((seg.sector * SECTOR, seg.num_sectors * SECTOR))
        sync = self.writethrough
        if not write_zeroes:
            await self.backend.discard(ranges, sync=sync)
            return OK
        # unmap is per segment: the device MAY deallocate those; reads of every
        # segment return zeroes afterwards either way (devicenormative §5.2.6.2).
        unmapped = [r for r, s in zip(ranges, segments, strict=True) if s.flags & UNMAP]
        zeroed = [r for r, s in zip(ranges, segments, strict=True) if not s.flags & UNMAP]
        if unmapped:
            await self.backend.write_zeroes(unmapped, unmap=True, sync=sync)
        if zeroed:
            await self.backend.write_zeroes(zeroed, unmap=False, sync=sync)
        return OK


def _disk_contents(backend: BlockBackend) -> bytes:
    if isinstance(backend, MemoryBackend):
        return bytes(backend.data)
    if isinstance(backend, RawFileBackend):
        return os.pread(backend.io_fd, backend.size, 0)
    raise RuntimeError(f"a {type(backend).__name__} disk cannot be saved in a snapshot")


def _write_disk(backend: BlockBackend, data: bytes) -> None:
    if isinstance(backend, MemoryBackend):
        backend.data[:] = data
    elif isinstance(backend, RawFileBackend):
        os.pwrite(backend.io_fd, data, 0)
    else:
        raise RuntimeError(f"a {type(backend).__name__} disk cannot be restored from a snapshot")
