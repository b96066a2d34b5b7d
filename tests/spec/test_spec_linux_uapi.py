"""Cross-check every number and layout of ``virtio.spec`` against Linux's uapi headers.

A C program including ``<linux/virtio_{ids,config,ring,blk,net,input,mmio,pci}.h>``
prints the value of every macro/enumerator we also define and ``sizeof``/``offsetof``
of every struct field; it is compiled with the system ``gcc``.  Names the Linux headers
(6.1 on the reference machine) lack are listed below with the reason; a newer kernel
that has them is checked, not flagged.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

import virtio.spec as spec
from virtio.spec import status

HEADERS = ("ids", "config", "ring", "blk", "net", "input", "mmio", "pci")

# --- Constants ---------------------------------------------------------------------

# Our name -> (macro that must be defined, C expression giving our value).
RENAMED: dict[str, tuple[str, str]] = {
    "VIRTIO_F_INDIRECT_DESC": ("VIRTIO_RING_F_INDIRECT_DESC", "VIRTIO_RING_F_INDIRECT_DESC"),
    "VIRTIO_F_EVENT_IDX": ("VIRTIO_RING_F_EVENT_IDX", "VIRTIO_RING_F_EVENT_IDX"),
    # Linux defines the packed AVAIL/USED flags as bit numbers, we as masks.
    "VRING_PACKED_DESC_F_AVAIL": ("VRING_PACKED_DESC_F_AVAIL", "(1 << VRING_PACKED_DESC_F_AVAIL)"),
    "VRING_PACKED_DESC_F_USED": ("VRING_PACKED_DESC_F_USED", "(1 << VRING_PACKED_DESC_F_USED)"),
    # The packed ring reuses the split ring's NEXT/WRITE/INDIRECT values.
    "VRING_PACKED_DESC_F_NEXT": ("VRING_DESC_F_NEXT", "VRING_DESC_F_NEXT"),
    "VRING_PACKED_DESC_F_WRITE": ("VRING_DESC_F_WRITE", "VRING_DESC_F_WRITE"),
    "VRING_PACKED_DESC_F_INDIRECT": ("VRING_DESC_F_INDIRECT", "VRING_DESC_F_INDIRECT"),
    "VRING_DESC_ALIGN": ("VRING_DESC_ALIGN_SIZE", "VRING_DESC_ALIGN_SIZE"),
    "VRING_AVAIL_ALIGN": ("VRING_AVAIL_ALIGN_SIZE", "VRING_AVAIL_ALIGN_SIZE"),
    "VRING_USED_ALIGN": ("VRING_USED_ALIGN_SIZE", "VRING_USED_ALIGN_SIZE"),
    # Spec register names for the Driver/Device Area registers.
    "VIRTIO_MMIO_QUEUE_DRIVER_LOW": ("VIRTIO_MMIO_QUEUE_AVAIL_LOW", "VIRTIO_MMIO_QUEUE_AVAIL_LOW"),
    "VIRTIO_MMIO_QUEUE_DRIVER_HIGH": (
        "VIRTIO_MMIO_QUEUE_AVAIL_HIGH",
        "VIRTIO_MMIO_QUEUE_AVAIL_HIGH",
    ),
    "VIRTIO_MMIO_QUEUE_DEVICE_LOW": ("VIRTIO_MMIO_QUEUE_USED_LOW", "VIRTIO_MMIO_QUEUE_USED_LOW"),
    "VIRTIO_MMIO_QUEUE_DEVICE_HIGH": ("VIRTIO_MMIO_QUEUE_USED_HIGH", "VIRTIO_MMIO_QUEUE_USED_HIGH"),
    **{
        name: (linux, linux)
        for name, linux in status.LINUX_NAMES.items()  # VIRTIO_CONFIG_S_*
    },
    **{
        m.name: (linux, linux)
        for m in spec.net.NetHashType
        for linux in [m.name.replace("VIRTIO_NET_HASH_TYPE_", "VIRTIO_NET_RSS_HASH_TYPE_")]
    },
}

# Enumerators (not macros: #ifdef cannot see them); always present.
ENUMERATORS = {m.name for m in spec.input.InputConfigSelect}

_NEWER = "added to the spec after Linux 6.1's uapi header"
_OURS = "pyvirtio name for a spec value; no Linux macro"
EXPECTED_MISSING: dict[str, str] = {
    # Device IDs the spec reserves that virtio_ids.h 6.1 does not name.
    **{
        name: _NEWER
        for name in (
            "VIRTIO_ID_RDMA",
            "VIRTIO_ID_CAMERA",
            "VIRTIO_ID_ISM",
            "VIRTIO_ID_SPI",
            "VIRTIO_ID_TEE",
            "VIRTIO_ID_CPU_BALLOON",
            "VIRTIO_ID_MEDIA",
            "VIRTIO_ID_USB",
        )
    },
    # Reserved feature bits.
    "VIRTIO_F_NOTIFICATION_DATA": "in the spec since 1.1; uapi gained it after 6.1",
    "VIRTIO_F_NOTIF_CONFIG_DATA": _NEWER,
    "VIRTIO_F_ADMIN_VQ": _NEWER,
    "TRANSPORT_FEATURES_FIRST": _OURS + " (§2.2 range 24..41)",
    "TRANSPORT_FEATURES_LAST": _OURS + " (§2.2 range 24..41; Linux has TRANSPORT_F_START/END)",
    # Ring.
    "VIRTQUEUE_MAX_SIZE_SPLIT": _OURS + " (§2.7: max Queue Size 32768)",
    "VIRTQUEUE_MAX_SIZE_PACKED": _OURS + " (§2.8: up to 2^15 entries)",
    "VRING_PACKED_DESC_ALIGN": _OURS + " (§2.8.10.1 table)",
    "VRING_PACKED_EVENT_ALIGN": _OURS + " (§2.8.10.1 table)",
    # MMIO.
    "VIRTIO_MMIO_QUEUE_RESET": "QueueReset register (1.2, RING_RESET); uapi 6.1 lacks it",
    "VIRTIO_MMIO_MAGIC": _OURS + " (MagicValue 0x74726976)",
    "VIRTIO_MMIO_VERSION_MODERN": _OURS + " (Version register value 2)",
    "VIRTIO_MMIO_VERSION_LEGACY": _OURS + " (legacy Version register value 1)",
    # Block.
    "VIRTIO_BLK_F_LIFETIME": "lifetime reporting; never added to Linux uapi (6.1)",
    "VIRTIO_BLK_T_GET_LIFETIME": "lifetime reporting; never added to Linux uapi (6.1)",
    "VIRTIO_BLK_F_ZONED": _NEWER + " (zoned block devices, 1.3)",
    "VIRTIO_BLK_T_SCSI_CMD_OUT": "legacy synonym of SCSI_CMD, not in Linux uapi",
    "VIRTIO_BLK_T_FLUSH_OUT": "legacy synonym of FLUSH, not in Linux uapi",
    **{m.name: "lifetime reporting; not in Linux uapi 6.1" for m in spec.blk.BlkPreEolInfo},
    **{
        m.name: _NEWER + " (zoned block devices, 1.3)"
        for cls in (spec.blk.BlkZonedModel, spec.blk.BlkZoneType, spec.blk.BlkZoneState)
        for m in cls
    },
    **{
        m.name: _NEWER + " (zoned block devices, 1.3)"
        for cls in (spec.blk.BlkReqType, spec.blk.BlkStatus)
        for m in cls
        if "_ZONE_" in m.name
    },
    "VIRTIO_BLK_SECTOR_SIZE": _OURS + " (512-byte sectors, §5.2.4)",
    # Network.
    **{
        name: _NEWER
        for name in (
            "VIRTIO_NET_F_DEVICE_STATS",
            "VIRTIO_NET_F_HASH_TUNNEL",
            "VIRTIO_NET_F_VQ_NOTF_COAL",
            "VIRTIO_NET_F_GUEST_USO4",
            "VIRTIO_NET_F_GUEST_USO6",
            "VIRTIO_NET_F_HOST_USO",
            "VIRTIO_NET_F_GUEST_HDRLEN",
            "VIRTIO_NET_F_RSS_CONTEXT",
            "VIRTIO_NET_HDR_GSO_UDP_L4",
            "VIRTIO_NET_CTRL_HASH_TUNNEL",
            "VIRTIO_NET_CTRL_STATS",
            "VIRTIO_NET_CTRL_NOTF_COAL_VQ_SET",
            "VIRTIO_NET_CTRL_NOTF_COAL_VQ_GET",
        )
    },
    "VIRTIO_NET_F_GUEST_RSC4": "legacy bit (Windows driver only), never in Linux uapi",
    "VIRTIO_NET_F_GUEST_RSC6": "legacy bit (Windows driver only), never in Linux uapi",
    "VIRTNET_RSS_CTX_CTRL": _NEWER + " (RSS contexts, 1.4)",
    **{m.name: _NEWER + " (inner header hash)" for m in spec.net.NetHashTunnelType},
    **{m.name: _NEWER for m in spec.net.NetCtrlHashTunnelCmd},
    **{m.name: _NEWER for m in spec.net.NetCtrlStatsCmd},
    **{m.name: _NEWER + " (RSS contexts, 1.4)" for m in spec.net.NetCtrlRssCtxCmd},
    # Input.
    "VIRTIO_INPUT_CFG_UNION_SIZE": _OURS + " (size of the u union, 128)",
    # PCI.
    "VIRTIO_PCI_CAP_VENDOR_CFG": _NEWER + " (vendor data capability, 1.3)",
    "VIRTIO_PCI_COMMON_ADM_Q_IDX": _NEWER + " (admin virtqueues, 1.3)",
    "VIRTIO_PCI_COMMON_ADM_Q_NUM": _NEWER + " (admin virtqueues, 1.3)",
    "VIRTIO_PCI_ISR_QUEUE": _OURS + " (ISR bit 0, Queue Interrupt)",
    "VIRTIO_PCI_VENDOR_ID": _OURS + " (0x1AF4; Linux: PCI_VENDOR_ID_REDHAT_QUMRANET)",
    "VIRTIO_PCI_DEVICE_ID_BASE": _OURS + " (modern Device ID = 0x1040 + Device ID)",
}

# --- Structs -------------------------------------------------------------------------

# Our struct -> (Linux struct type, {our field: Linux field designator}).
STRUCT_MAP: dict[str, tuple[str, dict[str, str]]] = {
    "vring_desc": ("struct vring_desc", {}),
    "vring_avail": ("struct vring_avail", {}),
    "vring_used_elem": ("struct vring_used_elem", {}),
    "vring_used": ("struct vring_used", {}),
    "vring_packed_desc": ("struct vring_packed_desc", {}),
    "vring_packed_desc_event": ("struct vring_packed_desc_event", {}),
    "virtio_blk_config": (
        "struct virtio_blk_config",
        {
            "topology.physical_block_exp": "physical_block_exp",
            "topology.alignment_offset": "alignment_offset",
            "topology.min_io_size": "min_io_size",
            "topology.opt_io_size": "opt_io_size",
            "writeback": "wce",
            "unused0": "unused",
        },
    ),
    "virtio_blk_geometry": ("struct virtio_blk_geometry", {}),
    "virtio_blk_outhdr": ("struct virtio_blk_outhdr", {"reserved": "ioprio"}),
    "virtio_blk_discard_write_zeroes": ("struct virtio_blk_discard_write_zeroes", {}),
    "virtio_net_config": ("struct virtio_net_config", {}),
    "virtio_net_hdr_v1": ("struct virtio_net_hdr_v1", {}),
    "virtio_net_hdr_v1_hash": ("struct virtio_net_hdr_v1_hash", {"padding_reserved": "padding"}),
    "virtio_net_hdr": ("struct virtio_net_hdr", {}),
    "virtio_net_hdr_mrg_rxbuf": ("struct virtio_net_hdr_mrg_rxbuf", {}),
    "virtio_net_ctrl_hdr": ("struct virtio_net_ctrl_hdr", {"command": "cmd"}),
    "virtio_net_ctrl_mac": ("struct virtio_net_ctrl_mac", {}),
    "virtio_net_ctrl_mq": ("struct virtio_net_ctrl_mq", {}),
    # 6.1 only has the TX/RX variants of the (identically laid out) coalescing struct.
    "virtio_net_ctrl_coal": (
        "struct virtio_net_ctrl_coal_tx",
        {"max_packets": "tx_max_packets", "max_usecs": "tx_usecs"},
    ),
    "virtio_input_config": ("struct virtio_input_config", {}),
    "virtio_input_absinfo": ("struct virtio_input_absinfo", {}),
    "virtio_input_devids": ("struct virtio_input_devids", {}),
    "virtio_input_event": ("struct virtio_input_event", {}),
    "virtio_pci_cap": ("struct virtio_pci_cap", {}),
    "virtio_pci_cap64": ("struct virtio_pci_cap64", {}),
    "virtio_pci_notify_cap": ("struct virtio_pci_notify_cap", {}),
    "virtio_pci_cfg_cap": ("struct virtio_pci_cfg_cap", {}),
    "virtio_pci_common_cfg": (
        "struct virtio_pci_common_cfg",
        {
            "driver_feature_select": "guest_feature_select",
            "driver_feature": "guest_feature",
            "config_msix_vector": "msix_config",
            # Linux splits the le64 addresses into _lo/_hi: compare the offset only.
            "queue_desc": "@queue_desc_lo",
            "queue_driver": "@queue_avail_lo",
            "queue_device": "@queue_used_lo",
        },
    ),
}

# Structs Linux 6.1 has only a prefix of: (first field Linux lacks, reason).
LINUX_PREFIX: dict[str, tuple[str, str]] = {
    "virtio_blk_config": ("zoned.zone_sectors", "zoned characteristics added in spec 1.3"),
    "virtio_net_config": ("supported_tunnel_types", "inner header hash added in spec 1.3"),
    "virtio_pci_common_cfg": (
        "queue_notify_data",
        "6.1 stops at queue_used_hi; notify data / queue reset / admin queue fields are newer",
    ),
}

EXPECTED_MISSING_STRUCTS: dict[str, str] = {
    "virtio_blk_topology": "Linux flattens topology into virtio_blk_config (checked there)",
    "virtio_blk_zoned_characteristics": "zoned block devices (1.3), not in uapi 6.1",
    "virtio_blk_lifetime": "lifetime reporting, not in Linux uapi",
    "virtio_blk_zone_descriptor": "zoned block devices (1.3), not in uapi 6.1",
    "virtio_blk_zone_report": "zoned block devices (1.3), not in uapi 6.1",
    "virtio_net_ctrl_coal_vq": "per-virtqueue coalescing (1.3), not in uapi 6.1",
    "virtio_pci_vndr_data": "vendor data capability (1.3), not in uapi 6.1",
}


def _constant_names() -> dict[str, int]:
    data = spec.export()
    return {**data["device_ids"], **data["features"], **data["status"], **data["constants"]}


def _c_program() -> str:
    lines = [f"#include <linux/virtio_{h}.h>" for h in HEADERS]
    lines += ["#include <stddef.h>", "#include <stdio.h>", "int main(void) {"]
    for name in _constant_names():
        macro, expr = RENAMED.get(name, (name, name))
        if name in ENUMERATORS:
            lines.append(f'printf("C {name} %lld\\n", (long long)({expr}));')
            continue
        lines += [
            f"#ifdef {macro}",
            f'printf("C {name} %lld\\n", (long long)({expr}));',
            "#else",
            f'printf("M {name}\\n");',
            "#endif",
        ]
    for name, (ctype, fmap) in STRUCT_MAP.items():
        lines.append(f'printf("S {name} %zu\\n", sizeof({ctype}));')
        stop = LINUX_PREFIX.get(name, (None, ""))[0]
        for field, _offset, size in spec.struct_fields(spec.STRUCTS[name]):
            if field == stop:
                break
            path = fmap.get(field, field)
            if path.startswith("@"):  # offset only
                size_expr = str(size)
                path = path[1:]
            else:
                size_expr = f"sizeof((({ctype} *)0)->{path})"
            lines.append(
                f'printf("F {name} {field} %zu %zu\\n", offsetof({ctype}, {path}),'
                f" (size_t)({size_expr}));"
            )
    for num in (1, 2, 256, 1024, 32768):
        lines.append(f'printf("V {num} %u\\n", vring_size({num}, 1));')
    lines += ["return 0;", "}"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def linux(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[list[str]]]:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed: cannot compile against the Linux uapi headers")
    if not all(Path(f"/usr/include/linux/virtio_{h}.h").exists() for h in HEADERS):
        pytest.skip("Linux uapi headers (linux-libc-dev) are not installed")
    tmp = tmp_path_factory.mktemp("uapi")
    src, exe = tmp / "check.c", tmp / "check"
    src.write_text(_c_program())
    subprocess.run([gcc, "-std=gnu11", "-O0", "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    result: dict[str, list[list[str]]] = {}
    for line in out.splitlines():
        kind, *rest = line.split()
        result.setdefault(kind, []).append(rest)
    return result


def test_constants_match_linux(linux: dict[str, list[list[str]]]) -> None:
    ours = _constant_names()
    mismatched = {
        name: (ours[name], int(value)) for name, value in linux["C"] if ours[name] != int(value)
    }
    assert mismatched == {}, "ours != Linux"
    missing = {name for (name,) in linux.get("M", [])}
    unexplained = sorted(missing - EXPECTED_MISSING.keys())
    assert unexplained == [], "names Linux lacks without a reason in EXPECTED_MISSING"
    checked = len(linux["C"])
    assert checked + len(missing) == len(ours)
    assert checked > 200  # nearly everything is in Linux


def test_expected_missing_is_not_stale() -> None:
    ours = _constant_names()
    assert sorted(EXPECTED_MISSING.keys() - ours.keys()) == []
    assert sorted(RENAMED.keys() - ours.keys()) == []
    assert sorted(EXPECTED_MISSING_STRUCTS.keys() & STRUCT_MAP.keys()) == []
    # Every struct is either compared or explained.
    assert sorted(spec.STRUCTS.keys() - STRUCT_MAP.keys() - EXPECTED_MISSING_STRUCTS.keys()) == []


def test_struct_sizes_match_linux(linux: dict[str, list[list[str]]]) -> None:
    sizes = {name: int(size) for name, size in linux["S"]}
    for name, size in sizes.items():
        struct = spec.STRUCTS[name]
        if name in LINUX_PREFIX:
            first_new, _reason = LINUX_PREFIX[name]
            offsets = {f: o for f, o, _s in spec.struct_fields(struct)}
            assert size == offsets[first_new], f"{name}: Linux size is not our prefix"
            assert struct.sizeof() > size
        else:
            assert struct.sizeof() == size, name


def test_struct_fields_match_linux(linux: dict[str, list[list[str]]]) -> None:
    ours = {
        (name, field): (offset, size)
        for name in STRUCT_MAP
        for field, offset, size in spec.struct_fields(spec.STRUCTS[name])
    }
    theirs = {(name, field): (int(off), int(size)) for name, field, off, size in linux["F"]}
    assert len(theirs) > 100
    assert {k: (ours[k], v) for k, v in theirs.items() if ours[k] != v} == {}


def test_split_ring_sizes_match_vring_size(linux: dict[str, list[list[str]]]) -> None:
    # Linux's vring_size(num, 1) includes used_event/avail_event (EVENT_IDX layout).
    for num, size in linux["V"]:
        assert sum(spec.ring.split_ring_sizes(int(num), True)) == int(size)
