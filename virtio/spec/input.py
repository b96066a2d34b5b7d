"""Input device (virtio 1.4 §5.8).  Unchanged since 1.1 (no feature bits, §5.8.3)."""

from __future__ import annotations

from construct import Bytes, Int8ul, Int16ul, Int32ul, Struct

from virtio.spec._base import Section, SpecIntEnum
from virtio.spec.sections import S_5_8_4, S_5_8_6


class InputConfigSelect(SpecIntEnum):
    """``enum virtio_input_config_select``: values of ``virtio_input_config.select``."""

    VIRTIO_INPUT_CFG_UNSET = 0x00, S_5_8_4
    VIRTIO_INPUT_CFG_ID_NAME = 0x01, S_5_8_4
    VIRTIO_INPUT_CFG_ID_SERIAL = 0x02, S_5_8_4
    VIRTIO_INPUT_CFG_ID_DEVIDS = 0x03, S_5_8_4
    VIRTIO_INPUT_CFG_PROP_BITS = 0x10, S_5_8_4
    VIRTIO_INPUT_CFG_EV_BITS = 0x11, S_5_8_4
    VIRTIO_INPUT_CFG_ABS_INFO = 0x12, S_5_8_4


VIRTIO_INPUT_CFG_UNION_SIZE = 128
"""Size of the ``u`` union of ``virtio_input_config`` (``char string[128]``)."""

virtio_input_absinfo = Struct(
    "min" / Int32ul,
    "max" / Int32ul,
    "fuzz" / Int32ul,
    "flat" / Int32ul,
    "res" / Int32ul,
)
virtio_input_devids = Struct(
    "bustype" / Int16ul,
    "vendor" / Int16ul,
    "product" / Int16ul,
    "version" / Int16ul,
)
virtio_input_config = Struct(
    "select" / Int8ul,
    "subsel" / Int8ul,
    "size" / Int8ul,
    "reserved" / Bytes(5),
    # union { char string[128]; u8 bitmap[128]; struct virtio_input_absinfo abs;
    #         struct virtio_input_devids ids; } u;  -- parse with the structs above.
    "u" / Bytes(VIRTIO_INPUT_CFG_UNION_SIZE),
)
"""``struct virtio_input_config`` (§5.8.4)."""

virtio_input_event = Struct(
    "type" / Int16ul,
    "code" / Int16ul,
    "value" / Int32ul,
)
"""``struct virtio_input_event``, on both eventq and statusq (§5.8.6)."""

STRUCTS: dict[str, Struct] = {
    "virtio_input_config": virtio_input_config,
    "virtio_input_absinfo": virtio_input_absinfo,
    "virtio_input_devids": virtio_input_devids,
    "virtio_input_event": virtio_input_event,
}
STRUCT_SECTIONS: dict[str, Section] = {
    "virtio_input_config": S_5_8_4,
    "virtio_input_absinfo": S_5_8_4,
    "virtio_input_devids": S_5_8_4,
    "virtio_input_event": S_5_8_6,
}
CONSTANTS: dict[str, tuple[int, Section]] = {
    "VIRTIO_INPUT_CFG_UNION_SIZE": (VIRTIO_INPUT_CFG_UNION_SIZE, S_5_8_4),
}
ENUMS = (InputConfigSelect,)
