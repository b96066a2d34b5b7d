"""The device-side virtqueue engine (virtio 1.4 §2.7 split, §2.8 packed)."""

from virtio.queues.chain import DescriptorChain as DescriptorChain
from virtio.queues.chain import Segment as Segment
from virtio.queues.chain_io import ChainReader as ChainReader
from virtio.queues.chain_io import ChainWriter as ChainWriter
from virtio.queues.state import QueueState as QueueState
from virtio.queues.virtqueue import InflightTracker as InflightTracker
from virtio.queues.virtqueue import QueueConfig as QueueConfig
from virtio.queues.virtqueue import QueueStatistics as QueueStatistics
from virtio.queues.virtqueue import Virtqueue as Virtqueue
