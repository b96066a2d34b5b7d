"""qcow2 images (QEMU ``docs/interop/qcow2.rst``), versions 2 and 3, with backing chains.

Modules, one job each: ``header`` (header and extensions), ``mapping`` (L1/L2
entries, extended L2 subclusters), ``refcount`` (refcounts and allocation),
``compress`` (reading deflate/zstd clusters), ``cache`` (the metadata cache),
``hostfile`` (the files underneath, raw backing files), ``image`` (one image:
reads, copy-on-write writes, zeroing, crash-safe metadata ordering), ``backend``
(``Qcow2Backend``, the ``BlockBackend``).
"""

from virtio.devices.blk.qcow2.backend import Qcow2Backend as Qcow2Backend
from virtio.devices.blk.qcow2.header import Qcow2FormatError as Qcow2FormatError
from virtio.devices.blk.qcow2.image import Qcow2Image as Qcow2Image
