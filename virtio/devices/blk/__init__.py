"""virtio-blk (virtio 1.4 §5.2): device model, request parsing, storage backends.

::

    dev = VirtioBlk.from_options(BlkOptions(path="disk.img", num_queues=2, serial="disk0"))
    # or, for tests:
    dev = VirtioBlk(MemoryBackend(1 << 20))

Modules: ``config`` (``BlkOptions``, ``virtio_blk_config`` bytes), ``request``
(pure parsing of a chain), ``backend`` (``BlockBackend`` protocol,
``RawFileBackend``, ``MemoryBackend``), ``device`` (``VirtioBlk``).
"""

from virtio.devices.blk.backend import BlockBackend as BlockBackend
from virtio.devices.blk.backend import ImageLockedError as ImageLockedError
from virtio.devices.blk.backend import MemoryBackend as MemoryBackend
from virtio.devices.blk.backend import RawFileBackend as RawFileBackend
from virtio.devices.blk.config import BlkOptions as BlkOptions
from virtio.devices.blk.config import build_config as build_config
from virtio.devices.blk.device import VirtioBlk as VirtioBlk
from virtio.devices.blk.probe import ImageFormatError as ImageFormatError
from virtio.devices.blk.request import BlkRequest as BlkRequest
from virtio.devices.blk.request import Segment as Segment
