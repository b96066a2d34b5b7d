"""virtio-net (virtio 1.4 §5.1): the device, the learning switch its ports sit on,
offload translation and the tap uplink."""

from virtio.devices.net.device import VirtioNet as VirtioNet
from virtio.devices.net.switch import Switch as Switch
