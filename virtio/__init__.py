"""pyvirtio: a spec-driven virtio device framework (OASIS virtio 1.4 CS01).

General layout:

- ``virtio.spec``        machine-readable definitions transcribed from the spec;
- ``virtio.memory``      guest memory: regions, bounds-checked translation;
- ``virtio.queues``      the device-side virtqueue engine (split §2.7, packed §2.8);
- ``virtio.devices``     device models written once against the engine;
- ``virtio.transport``   vhost-user, virtio-mmio;
- ``virtio.testing``     the public testing kit (driver-side queues, guest harnesses).
"""

__version__ = "0.1.0"
