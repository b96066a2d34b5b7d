"""virtio-rng, the entropy device (virtio 1.4 §5.4)."""

from virtio.devices.rng.device import VirtioRng as VirtioRng
