"""Machine-readable definitions transcribed from OASIS virtio 1.4 CS01.

Every enum member carries the :class:`Section` that defines it (``member.section``);
structures are ``construct`` Structs registered in :data:`STRUCTS` under their spec /
Linux uapi names, with their section in :data:`STRUCT_SECTIONS`.

* :func:`export` -- the whole spec as a JSON-able dict (what ``virtio spec --json``
  prints and ``spec/virtio-1.4.json`` holds);
* :func:`export_json` -- that dict as text;
* :func:`c_header` -- a standalone C header (``spec/virtio_spec.h``).

Names are the spec's / Linux uapi ones (``VIRTIO_ID_BLOCK``, ``VIRTIO_BLK_F_FLUSH``,
``VIRTIO_NET_F_MRG_RXBUF``, ``VIRTIO_F_RING_PACKED``, ``vring_desc``...); the device
status bits use the spec's bare names (``ACKNOWLEDGE``...).  Section numbers and the
differences to 1.2 are documented in :mod:`virtio.spec.sections` and each module.
"""

from __future__ import annotations

import enum
import json
from types import ModuleType
from typing import Any

from construct import Bytes, Construct, FormatField, Renamed, Struct

from virtio.spec import blk, features, ids, input, mmio, net, pci, ring, sections, status
from virtio.spec._base import SPEC_VERSION, FeatureBit, Section, SpecIntEnum, SpecIntFlag
from virtio.spec.blk import BlkFeature
from virtio.spec.features import TransportFeature
from virtio.spec.ids import DeviceId
from virtio.spec.net import NetFeature
from virtio.spec.status import DeviceStatus

__all__ = [
    "ENUMS",
    "SPEC_VERSION",
    "STRUCTS",
    "STRUCT_SECTIONS",
    "BlkFeature",
    "DeviceId",
    "DeviceStatus",
    "FeatureBit",
    "NetFeature",
    "Section",
    "SpecIntEnum",
    "SpecIntFlag",
    "TransportFeature",
    "c_header",
    "export",
    "export_json",
    "struct_fields",
]

# Modules in the order their entries appear in exports.
MODULES: tuple[ModuleType, ...] = (ids, status, features, ring, mmio, pci, blk, net, input)

FEATURE_GROUPS: dict[str, type[FeatureBit]] = {
    "transport": TransportFeature,
    "blk": BlkFeature,
    "net": NetFeature,
}
"""Feature-bit enums by device type ("transport" = the reserved bits of chapter 6)."""

ENUMS: tuple[type[enum.Enum], ...] = tuple(e for m in MODULES for e in m.ENUMS)

STRUCTS: dict[str, Struct] = {}
STRUCT_SECTIONS: dict[str, Section] = {}
CONSTANTS: dict[str, tuple[int, Section]] = {}
LEGACY: frozenset[str] = frozenset()
NOT_IN_1_2: frozenset[str] = frozenset()
for _module in MODULES:
    STRUCTS.update(getattr(_module, "STRUCTS", {}))
    STRUCT_SECTIONS.update(getattr(_module, "STRUCT_SECTIONS", {}))
    CONSTANTS.update(getattr(_module, "CONSTANTS", {}))
    LEGACY |= getattr(_module, "LEGACY", frozenset())
    NOT_IN_1_2 |= getattr(_module, "NOT_IN_1_2", frozenset())
del _module


def _members(cls: type[enum.Enum]) -> list[tuple[str, Any]]:
    """Named members including aliases, in definition order."""
    return list(cls.__members__.items())


def struct_fields(struct: Struct, prefix: str = "") -> list[tuple[str, int, int]]:
    """Leaf fields of ``struct`` as ``(name, offset, size)``; nested Structs are
    flattened with dotted names (``geometry.cylinders``)."""
    fields: list[tuple[str, int, int]] = []
    offset = 0
    for sub in struct.subcons:
        size = sub.sizeof()
        inner = sub.subcon if isinstance(sub, Renamed) else sub
        name = prefix + sub.name
        if isinstance(inner, Struct):
            fields.extend((n, offset + o, s) for n, o, s in struct_fields(inner, name + "."))
        else:
            fields.append((name, offset, size))
        offset += size
    return fields


def _ref(section: Section) -> dict[str, str]:
    return {
        "version": section.version,
        "number": section.number,
        "title": section.title,
        "label": section.label,
    }


def export() -> dict[str, Any]:
    """The machine-readable spec as a JSON-able dict (see the module docstring)."""
    out: dict[str, Any] = {
        "spec_version": SPEC_VERSION,
        "device_ids": {},
        "features": {},
        "features_by_device": {},
        "status": {},
        "structs": {},
        "struct_fields": {},
        "constants": {},
        "enums": {},
        "legacy": sorted(LEGACY),
        "not_in_1_2": sorted(NOT_IN_1_2),
        "sections": {},
        "section_refs": {},
        "section_index": {s.number: s.title for s in sections.all_sections().values()},
    }
    cited: dict[str, Section] = {}

    def cite(name: str, section: Section) -> None:
        if name in cited:
            raise ValueError(f"duplicate spec name {name!r}")
        cited[name] = section

    for name, member in _members(DeviceId):
        out["device_ids"][name] = int(member)
        cite(name, member.section)
    for group, cls in FEATURE_GROUPS.items():
        out["features_by_device"][group] = {}
        for name, member in _members(cls):
            out["features"][name] = int(member)
            out["features_by_device"][group][name] = int(member)
            cite(name, member.section)
    for name, member in _members(DeviceStatus):
        out["status"][name] = int(member)
        cite(name, member.section)
    special = {DeviceId, DeviceStatus, *FEATURE_GROUPS.values()}
    for cls in ENUMS:
        if cls in special:
            continue
        out["enums"][cls.__name__] = [name for name, _ in _members(cls)]
        for name, member in _members(cls):
            out["constants"][name] = int(member)
            cite(name, member.section)
    for name, (value, section) in CONSTANTS.items():
        out["constants"][name] = value
        cite(name, section)
    for name, struct in STRUCTS.items():
        out["structs"][name] = struct.sizeof()
        out["struct_fields"][name] = [list(f) for f in struct_fields(struct)]
        cite(name, STRUCT_SECTIONS[name])
    for name, section in cited.items():
        out["sections"][name] = f"{section.number} {section.title}"
        out["section_refs"][name] = _ref(section)
    return out


def export_json() -> str:
    """:func:`export` as indented JSON text (ending in a newline)."""
    return json.dumps(export(), indent=2) + "\n"


# --- C header -----------------------------------------------------------------------

_C_TYPES = {"<B": "uint8_t", "<H": "uint16_t", "<I": "uint32_t", "<L": "uint32_t",
            "<Q": "uint64_t"}  # fmt: skip


def _c_value(value: int) -> str:
    if value >= 0x80000000:
        return f"0x{value:x}u"
    return str(value) if value < 0x100 else f"0x{value:x}"


def _c_member(name: str, sub: Construct, struct_names: dict[int, str]) -> str:
    if isinstance(sub, FormatField):
        return f"{_C_TYPES[sub.fmtstr]} {name};"
    if isinstance(sub, Bytes):
        return f"uint8_t {name}[{sub.length}];"
    if isinstance(sub, Struct) and id(sub) in struct_names:
        return f"struct {struct_names[id(sub)]} {name};"
    raise TypeError(f"no C rendering for field {name!r} ({type(sub).__name__})")


def c_header() -> str:
    """A standalone C header with every constant and struct of :func:`export`."""
    data = export()
    refs = data["section_refs"]
    lines = [
        f"/* virtio_spec.h -- virtio {SPEC_VERSION} constants and structures for guest C programs.",
        " *",
        " * GENERATED by `python -m virtio spec --header` from the Python package",
        " * virtio.spec; do not edit.  Multi-byte fields are little-endian.",
        " * Standalone: do not include together with <linux/virtio_*.h> (same struct",
        " * names; VRING_PACKED_DESC_F_AVAIL/_USED are masks here, bit numbers there).",
        " */",
        "#ifndef VIRTIO_SPEC_H",
        "#define VIRTIO_SPEC_H",
        "",
        "#include <stdint.h>",
        "",
        f'#define VIRTIO_SPEC_VERSION "{SPEC_VERSION}"',
    ]

    def define(name: str, value: int, c_name: str | None = None) -> None:
        ref = refs[name]
        lines.append(f"#define {c_name or name} {_c_value(value)} /* §{ref['number']} */")

    lines += ["", f"/* Device IDs (§5 {sections.S_5.title}) */"]
    for name, value in data["device_ids"].items():
        define(name, value)
    for group, members in data["features_by_device"].items():
        lines += ["", f"/* Feature bits ({group}): bit numbers, not masks */"]
        for name, value in members.items():
            define(name, value)
    lines += ["", f"/* Device status (§2.1 {sections.S_2_1.title}); Linux names */"]
    for name, value in data["status"].items():
        define(name, value, status.LINUX_NAMES[name])
    for cls_name, names in data["enums"].items():
        lines += ["", f"/* {cls_name} */"]
        for name in names:
            define(name, data["constants"][name])
    lines += ["", "/* Other constants */"]
    for name in CONSTANTS:
        define(name, data["constants"][name])

    lines += ["", "/* Structures (packed, little-endian fields) */"]
    struct_names = {id(struct): name for name, struct in STRUCTS.items()}
    emitted: set[str] = set()

    def emit(name: str, struct: Struct) -> None:
        if name in emitted:
            return
        for sub in struct.subcons:
            inner = sub.subcon if isinstance(sub, Renamed) else sub
            if isinstance(inner, Struct):
                emit(struct_names[id(inner)], inner)
        emitted.add(name)
        ref = refs[name]
        lines.append(f"/* §{ref['number']} {ref['title']} */")
        lines.append(f"struct {name} {{")
        for sub in struct.subcons:
            inner = sub.subcon if isinstance(sub, Renamed) else sub
            lines.append("\t" + _c_member(sub.name, inner, struct_names))
        lines.append("} __attribute__((packed));")
        lines.append(f'_Static_assert(sizeof(struct {name}) == {struct.sizeof()}, "{name} size");')
        lines.append("")

    for name, struct in STRUCTS.items():
        emit(name, struct)
    lines += ["#endif /* VIRTIO_SPEC_H */", ""]
    return "\n".join(lines)
