"""pyvirtio: a spec-driven virtio device framework (OASIS virtio 1.4 CS01).

General layout (each package builds only on those above it):

- ``virtio.spec``        machine-readable definitions transcribed from the spec;
- ``virtio.errors``      the exception hierarchy (driver errors cite spec sections);
- ``virtio.memory``      guest memory: regions, bounds-checked translation;
- ``virtio.native``      the cffi core: ring walking, validation, barriers;
- ``virtio.queues``      the device-side virtqueue engine (split §2.7, packed §2.8);
- ``virtio.config_space``, ``virtio.service``, ``virtio.device``: the device-author
  API (configuration layout, the queue-service loop and queue roles, devices);
- ``virtio.devices``     device models written once against the engine;
- ``virtio.transport``   vhost-user, virtio-mmio;
- ``virtio.testing``     the public testing kit (driver-side queues, harnesses).

The names below are the public surface; ``tests/test_public_api.py`` checks it.
"""

__version__ = "0.1.0"

from virtio.config_space import ConfigAccessError as ConfigAccessError
from virtio.config_space import ConfigLayout as ConfigLayout
from virtio.device import ActiveDevice as ActiveDevice
from virtio.device import DeviceNeedsReset as DeviceNeedsReset
from virtio.device import QueueNotifier as QueueNotifier
from virtio.device import VirtioDevice as VirtioDevice
from virtio.errors import BackendIOError as BackendIOError
from virtio.errors import DescriptorChainError as DescriptorChainError
from virtio.errors import DeviceUsageError as DeviceUsageError
from virtio.errors import Disconnected as Disconnected
from virtio.errors import DriverError as DriverError
from virtio.errors import GuestMemoryError as GuestMemoryError
from virtio.errors import InvalidAvailIdx as InvalidAvailIdx
from virtio.errors import QueueBrokenError as QueueBrokenError
from virtio.errors import QueueConfigError as QueueConfigError
from virtio.errors import VirtioError as VirtioError
from virtio.memory import BytearrayGuestMemory as BytearrayGuestMemory
from virtio.memory import FdRegion as FdRegion
from virtio.memory import GuestMemory as GuestMemory
from virtio.memory import MemoryRegion as MemoryRegion
from virtio.memory import MmapGuestMemory as MmapGuestMemory
from virtio.queues import ChainReader as ChainReader
from virtio.queues import ChainWriter as ChainWriter
from virtio.queues import DescriptorChain as DescriptorChain
from virtio.queues import QueueConfig as QueueConfig
from virtio.queues import QueueState as QueueState
from virtio.queues import Virtqueue as Virtqueue
from virtio.service import BufferQueue as BufferQueue
from virtio.service import QueueRole as QueueRole
