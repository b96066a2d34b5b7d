"""Every spec entry cites a section of the 1.4 spec, and the citations are coherent."""

from __future__ import annotations

import re

import pytest

import virtio.spec as spec
from virtio.spec import Section, sections

NUMBER = re.compile(r"^[1-6](\.[1-9][0-9]*)*$")
KNOWN = {s.number: s for s in sections.all_sections().values()}


@pytest.mark.parametrize("cls", spec.ENUMS, ids=lambda cls: cls.__name__)
def test_every_enum_member_has_a_known_section(cls: type) -> None:
    assert cls.__members__
    for name, member in cls.__members__.items():
        section = member.section
        assert isinstance(section, Section), name
        assert section.version == "1.4", name
        assert KNOWN.get(section.number) == section, f"{name}: {section} not in sections.py"


def test_every_struct_and_constant_has_a_section() -> None:
    assert spec.STRUCTS.keys() == spec.STRUCT_SECTIONS.keys()
    for name, section in [
        *spec.STRUCT_SECTIONS.items(),
        *((n, s) for n, (_, s) in spec.CONSTANTS.items()),
    ]:
        assert KNOWN.get(section.number) == section, name


def test_section_constants_are_consistent() -> None:
    for const, section in sections.all_sections().items():
        assert NUMBER.match(section.number), const
        assert const == "S_" + section.number.replace(".", "_"), const
        assert section.title, const
        kind = section.title.split(":")[0]
        if kind == "Device Requirements":
            assert section.label.startswith("devicenormative:"), const
        elif kind == "Driver Requirements":
            assert section.label.startswith("drivernormative:"), const
        else:
            assert section.label == "", const


def test_parents_are_recorded() -> None:
    # Every subsection's parent is recorded too (catches typos in numbers).
    for number in KNOWN:
        parent = number.rpartition(".")[0]
        assert not parent or parent in KNOWN, number


def test_well_known_numbers() -> None:
    assert str(sections.S_2_7_5) == "virtio 1.4 §2.7.5 The Virtqueue Descriptor Table"
    assert sections.S_2_7_5_1.label == (
        "devicenormative:Basic Facilities of a Virtio Device / Virtqueues / "
        "The Virtqueue Descriptor Table"
    )
    assert spec.ring.VringDescFlag.VRING_DESC_F_INDIRECT.section.number == "2.7.5.3"
    assert spec.ring.PackedEventFlag.VRING_PACKED_EVENT_FLAG_DESC.section.number == "2.8.10"
    assert spec.TransportFeature.VIRTIO_F_RING_PACKED.section.number == "6"
    assert spec.TransportFeature.VIRTIO_F_ANY_LAYOUT.section.number == "6.3"
    assert spec.DeviceStatus.DRIVER_OK.section.number == "2.1"
    assert spec.mmio.MmioReg.VIRTIO_MMIO_CONFIG.section.number == "4.2.2"
    assert spec.STRUCT_SECTIONS["virtio_blk_config"].number == "5.2.4"
    assert spec.STRUCT_SECTIONS["virtio_input_event"].number == "5.8.6"
    assert spec.STRUCT_SECTIONS["virtio_net_hdr_v1"].number == "5.1.9"


def test_export_cites_every_entry() -> None:
    data = spec.export()
    names = [
        *data["device_ids"],
        *data["features"],
        *data["status"],
        *data["constants"],
        *data["structs"],
    ]
    assert len(names) == len(set(names))
    assert set(names) == data["sections"].keys() == data["section_refs"].keys()
    for name, text in data["sections"].items():
        ref = data["section_refs"][name]
        assert text == f"{ref['number']} {ref['title']}"
        assert ref["version"] == "1.4"
    assert set(data["legacy"]) <= set(names)
    assert {n for n in data["not_in_1_2"] if "." not in n} <= set(names)


def test_split_ring_sizes() -> None:
    assert spec.ring.split_ring_sizes(256, False) == (4096, 4 + 512, 4 + 2048)
    assert spec.ring.split_ring_sizes(256, True) == (4096, 6 + 512, 6 + 2048)
    assert spec.ring.packed_ring_sizes(100) == (1600, 4, 4)
    for bad in (0, 3, 65536):
        with pytest.raises(ValueError):
            spec.ring.split_ring_sizes(bad, False)


def test_register_offset_enums_match_structs() -> None:
    fields = {f: o for f, o, _ in spec.struct_fields(spec.pci.virtio_pci_common_cfg)}
    offsets = [int(m) for m in spec.pci.PciCommonCfg]
    expected = sorted(
        {*fields.values(), fields["queue_desc"] + 4, fields["queue_driver"] + 4,
         fields["queue_device"] + 4}
    )  # fmt: skip
    assert offsets == expected
    cap = {f: o for f, o, _ in spec.struct_fields(spec.pci.virtio_pci_notify_cap)}
    assert cap["notify_off_multiplier"] == spec.pci.PciCapOffset.VIRTIO_PCI_NOTIFY_CAP_MULT
    assert cap["cap.length"] == spec.pci.PciCapOffset.VIRTIO_PCI_CAP_LENGTH
    assert spec.pci.pci_device_id(spec.DeviceId.VIRTIO_ID_NET) == 0x1041


def test_net_device_operation_tail_as_in_1_4() -> None:
    """1.4 CS01 inserts Flow filter (5.1.9.6) and IPsec Operation (5.1.9.7) before the
    legacy framing note, which is 5.1.9.8."""
    assert sections.S_5_1_9_6.title == "Flow filter"
    assert sections.S_5_1_9_7.title == "IPsec Operation"
    assert sections.S_5_1_9_7_4.label == (
        "devicenormative:Device Types / Network Device / Device Operation / IPsec Operation"
    )
    assert sections.S_5_1_9_8.title == "Legacy Interface: Framing Requirements"
    assert sections.S_5_2_6_4.title == "Legacy Interface: Framing Requirements"


def test_device_ids_up_to_49() -> None:
    assert spec.DeviceId(48).name == "VIRTIO_ID_MEDIA"
    assert spec.DeviceId(49).name == "VIRTIO_ID_USB"
    assert max(spec.DeviceId) == 49
    # 1.2 CS01's table ends at 42 (RDMA); everything after it is newer.
    newer = {m.name for m in spec.DeviceId if m > 42}
    assert newer <= spec.NOT_IN_1_2
    assert "VIRTIO_ID_RDMA" not in spec.NOT_IN_1_2
    assert spec.export()["device_ids"]["VIRTIO_ID_USB"] == 49


def test_section_citation() -> None:
    assert sections.S_2_7_5_2.normative and not sections.S_2_7_6.normative
    assert sections.S_2_7_5_2.citation == (
        "2.7.5.2 [drivernormative:Basic Facilities of a Virtio Device / Virtqueues"
        " / The Virtqueue Descriptor Table]"
    )
    assert sections.S_2_7_6.citation == "2.7.6"
