"""virtio-input (virtio 1.4 §5.8): the device, its capabilities, its event sources.

* :mod:`.capabilities` — what the configuration space reports (§5.8.4), built-in kinds;
* :mod:`.device` — ``VirtioInput``: eventq/statusq, SYN_REPORT-framed delivery;
* :mod:`.events` — event names and numbers, high-level event sequences;
* :mod:`.evdev_source` — passthrough of a host ``/dev/input/eventN``;
* :mod:`.control` — the control-socket commands that inject events.
"""

from virtio.devices.input.capabilities import AbsInfo, DeviceIds, InputCapabilities, builtin
from virtio.devices.input.device import VirtioInput, frame

__all__ = ["AbsInfo", "DeviceIds", "InputCapabilities", "VirtioInput", "builtin", "frame"]
