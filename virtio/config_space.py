"""Device configuration space declared once (virtio 1.4 §2.5).

A device declares its configuration as the spec's ``construct`` struct plus the
names of the fields the driver may write::

    BLK_CONFIG = ConfigLayout(virtio_blk_config, writable={"writeback"}, section=S_5_2_4)

``VirtioDevice`` then serves every transport from it: ``read_config(offset, size)``
returns any byte range inside the space (virtio-mmio reads 1, 2 or 4 bytes at a
time, §4.2.2; vhost-user GET_CONFIG any offset and size), and ``write_config``
merges the written bytes into the current image field by field: a writable field
reaches the device's ``config_field_written(name, value)`` (which may change what
later reads return: input's select/subsel, §5.8.4), a read-only field that the
write would change is ignored with a log line naming it.  Ranges outside the space
raise ``ConfigAccessError``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from construct import FormatField, Struct

from virtio.errors import DriverError
from virtio.spec._base import Section
from virtio.spec.sections import S_2_5

log = logging.getLogger(__name__)


class ConfigAccessError(DriverError):
    """A configuration space access outside the device's configuration space (§2.5)."""

    section = S_2_5.number


@dataclass(frozen=True)
class ConfigField:
    """One top-level field of a configuration struct."""

    name: str
    offset: int
    size: int
    writable: bool
    integer: bool
    """A little-endian integer field (``config_field_written`` gets an ``int``);
    otherwise bytes (a nested struct, an array, a union)."""

    @property
    def end(self) -> int:
        return self.offset + self.size


class ConfigLayout:
    """The layout of a device's configuration space: the spec struct, field offsets,
    which fields the driver may write, and the section that defines it."""

    def __init__(self, struct: Struct, *, writable: Iterable[str] = (), section: Section) -> None:
        self.struct = struct
        self.section = section
        wanted = set(writable)
        fields, offset = [], 0
        for sub in struct.subcons:
            size = sub.sizeof()
            integer = isinstance(sub.subcon, FormatField)
            fields.append(ConfigField(sub.name, offset, size, sub.name in wanted, integer))
            wanted.discard(sub.name)
            offset += size
        if wanted:
            raise ValueError(f"writable fields not in the struct: {sorted(wanted)}")
        self.fields = tuple(fields)
        self.size = offset
        self._by_name = {f.name: f for f in fields}

    def field(self, name: str) -> ConfigField:
        return self._by_name[name]

    def build(self, values: Mapping[str, Any]) -> bytes:
        """The configuration space image for ``values`` (the struct's field values)."""
        return self.struct.build(values)

    def check(self, offset: int, size: int) -> None:
        """Raise ``ConfigAccessError`` unless ``[offset, offset + size)`` is inside."""
        if offset < 0 or size < 0 or offset + size > self.size:
            raise ConfigAccessError(
                f"configuration access [{offset:#x}, +{size}) outside the {self.size}-byte"
                f" configuration space ({self.section})"
            )

    def fields_in(self, offset: int, size: int) -> list[ConfigField]:
        """The fields that ``[offset, offset + size)`` touches."""
        end = offset + size
        return [f for f in self.fields if f.offset < end and offset < f.end]

    def merge(self, image: bytes, offset: int, data: bytes, device: str) -> dict[str, Any]:
        """Write ``data`` at ``offset`` over ``image``: the new values of the writable
        fields it touches (whole fields: a partial write keeps the other bytes).
        Changes to read-only fields are logged and dropped."""
        self.check(offset, len(data))
        new = image[:offset] + bytes(data) + image[offset + len(data) :]
        written: dict[str, Any] = {}
        for f in self.fields_in(offset, len(data)):
            value = new[f.offset : f.end]
            if f.writable:
                written[f.name] = int.from_bytes(value, "little") if f.integer else value
            elif value != image[f.offset : f.end]:
                log.warning(
                    "%s: driver wrote the read-only configuration field %s (ignored, %s)",
                    device,
                    f.name,
                    self.section,
                )
        return written
