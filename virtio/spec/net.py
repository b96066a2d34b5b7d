"""Network device (virtio 1.4 §5.1).

Names follow the spec and Linux ``virtio_net.h``; where they differ: the spec's
``VIRTIO_NET_HASH_TYPE_*`` are Linux's ``VIRTIO_NET_RSS_HASH_TYPE_*``, Linux calls
``virtio_net_hdr_v1_hash.padding_reserved`` ``padding`` and ``virtio_net_ctrl.command``
``cmd``.

Section numbers: the header and control queue live under "Device Operation", which is
§5.1.9 in 1.4 but §5.1.6 in 1.2/1.3 (see :mod:`virtio.spec.sections`).

Version notes (1.2 vs 1.4) (``NOT_IN_1_2``): the 1.2 feature list (checked against a
section-numbered rendering of the 1.2 text) has HOST_USO, HASH_REPORT, GUEST_HDRLEN,
RSS, RSC_EXT, STANDBY and SPEED_DUPLEX but not CTRL_RX_EXTRA (20; long used by Linux,
specified later together with the ALLUNI/NOMULTI/NOUNI/NOBCAST commands).  From the
spec history as remembered (not re-checked): added in 1.3 are VIRTIO_NET_F_NOTF_COAL,
VIRTIO_NET_F_VQ_NOTF_COAL, VIRTIO_NET_F_GUEST_USO4/6, VIRTIO_NET_F_HASH_TUNNEL with
``virtio_net_config.supported_tunnel_types`` and the ``VIRTIO_NET_CTRL_NOTF_COAL`` /
``VIRTIO_NET_CTRL_HASH_TUNNEL`` classes; added in 1.4 are VIRTIO_NET_F_DEVICE_STATS
(``VIRTIO_NET_CTRL_STATS``), VIRTIO_NET_F_RSS_CONTEXT (``VIRTNET_RSS_CTX_CTRL``) and
flow filters.  VIRTIO_NET_F_HOST_USO (with VIRTIO_NET_HDR_GSO_UDP_L4),
VIRTIO_NET_F_GUEST_HDRLEN, VIRTIO_NET_F_RSS, VIRTIO_NET_F_HASH_REPORT and the hash
fields of the header are in 1.2.
"""

from __future__ import annotations

from construct import Bytes, Int8ul, Int16ul, Int32ul, Struct

from virtio.spec._base import FeatureBit, Section, SpecIntEnum, SpecIntFlag
from virtio.spec.sections import (
    S_5_1_3,
    S_5_1_3_2,
    S_5_1_4,
    S_5_1_9,
    S_5_1_9_1,
    S_5_1_9_4_3,
    S_5_1_9_4_4,
    S_5_1_9_4_5,
    S_5_1_9_5,
    S_5_1_9_5_1,
    S_5_1_9_5_2,
    S_5_1_9_5_3,
    S_5_1_9_5_4,
    S_5_1_9_5_5,
    S_5_1_9_5_6,
    S_5_1_9_5_8,
    S_5_1_9_5_9,
    S_5_1_9_5_10,
    S_5_1_9_5_11,
)


class NetFeature(FeatureBit):
    VIRTIO_NET_F_CSUM = 0, S_5_1_3
    VIRTIO_NET_F_GUEST_CSUM = 1, S_5_1_3
    VIRTIO_NET_F_CTRL_GUEST_OFFLOADS = 2, S_5_1_3
    VIRTIO_NET_F_MTU = 3, S_5_1_3
    VIRTIO_NET_F_MAC = 5, S_5_1_3
    VIRTIO_NET_F_GUEST_TSO4 = 7, S_5_1_3
    VIRTIO_NET_F_GUEST_TSO6 = 8, S_5_1_3
    VIRTIO_NET_F_GUEST_ECN = 9, S_5_1_3
    VIRTIO_NET_F_GUEST_UFO = 10, S_5_1_3
    VIRTIO_NET_F_HOST_TSO4 = 11, S_5_1_3
    VIRTIO_NET_F_HOST_TSO6 = 12, S_5_1_3
    VIRTIO_NET_F_HOST_ECN = 13, S_5_1_3
    VIRTIO_NET_F_HOST_UFO = 14, S_5_1_3
    VIRTIO_NET_F_MRG_RXBUF = 15, S_5_1_3
    VIRTIO_NET_F_STATUS = 16, S_5_1_3
    VIRTIO_NET_F_CTRL_VQ = 17, S_5_1_3
    VIRTIO_NET_F_CTRL_RX = 18, S_5_1_3
    VIRTIO_NET_F_CTRL_VLAN = 19, S_5_1_3
    VIRTIO_NET_F_CTRL_RX_EXTRA = 20, S_5_1_3
    VIRTIO_NET_F_GUEST_ANNOUNCE = 21, S_5_1_3
    VIRTIO_NET_F_MQ = 22, S_5_1_3
    VIRTIO_NET_F_CTRL_MAC_ADDR = 23, S_5_1_3
    VIRTIO_NET_F_DEVICE_STATS = 50, S_5_1_3  # 1.4
    VIRTIO_NET_F_HASH_TUNNEL = 51, S_5_1_3  # 1.3+
    VIRTIO_NET_F_VQ_NOTF_COAL = 52, S_5_1_3  # 1.3+
    VIRTIO_NET_F_NOTF_COAL = 53, S_5_1_3  # 1.3+
    VIRTIO_NET_F_GUEST_USO4 = 54, S_5_1_3  # 1.3+
    VIRTIO_NET_F_GUEST_USO6 = 55, S_5_1_3  # 1.3+
    VIRTIO_NET_F_HOST_USO = 56, S_5_1_3
    VIRTIO_NET_F_HASH_REPORT = 57, S_5_1_3
    VIRTIO_NET_F_GUEST_HDRLEN = 59, S_5_1_3
    VIRTIO_NET_F_RSS = 60, S_5_1_3
    VIRTIO_NET_F_RSC_EXT = 61, S_5_1_3
    VIRTIO_NET_F_STANDBY = 62, S_5_1_3
    VIRTIO_NET_F_SPEED_DUPLEX = 63, S_5_1_3
    VIRTIO_NET_F_RSS_CONTEXT = 64, S_5_1_3  # 1.4
    # Legacy interface only (§5.1.3.2):
    VIRTIO_NET_F_GSO = 6, S_5_1_3_2
    VIRTIO_NET_F_GUEST_RSC4 = 41, S_5_1_3_2
    VIRTIO_NET_F_GUEST_RSC6 = 42, S_5_1_3_2


class NetStatus(SpecIntFlag):
    """``virtio_net_config.status`` (§5.1.4)."""

    VIRTIO_NET_S_LINK_UP = 1, S_5_1_4
    VIRTIO_NET_S_ANNOUNCE = 2, S_5_1_4


class NetHdrFlag(SpecIntFlag):
    """``virtio_net_hdr.flags`` (§5.1.9)."""

    VIRTIO_NET_HDR_F_NEEDS_CSUM = 1, S_5_1_9
    VIRTIO_NET_HDR_F_DATA_VALID = 2, S_5_1_9
    VIRTIO_NET_HDR_F_RSC_INFO = 4, S_5_1_9


class NetHdrGso(SpecIntEnum):
    """``virtio_net_hdr.gso_type`` (§5.1.9); VIRTIO_NET_HDR_GSO_ECN is a flag bit
    or-ed into the type."""

    VIRTIO_NET_HDR_GSO_NONE = 0, S_5_1_9
    VIRTIO_NET_HDR_GSO_TCPV4 = 1, S_5_1_9
    VIRTIO_NET_HDR_GSO_UDP = 3, S_5_1_9
    VIRTIO_NET_HDR_GSO_TCPV6 = 4, S_5_1_9
    VIRTIO_NET_HDR_GSO_UDP_L4 = 5, S_5_1_9
    VIRTIO_NET_HDR_GSO_ECN = 0x80, S_5_1_9


class NetHashType(SpecIntFlag):
    """Supported/enabled hash types (§5.1.9.4.3)."""

    VIRTIO_NET_HASH_TYPE_IPv4 = 1 << 0, S_5_1_9_4_3
    VIRTIO_NET_HASH_TYPE_TCPv4 = 1 << 1, S_5_1_9_4_3
    VIRTIO_NET_HASH_TYPE_UDPv4 = 1 << 2, S_5_1_9_4_3
    VIRTIO_NET_HASH_TYPE_IPv6 = 1 << 3, S_5_1_9_4_3
    VIRTIO_NET_HASH_TYPE_TCPv6 = 1 << 4, S_5_1_9_4_3
    VIRTIO_NET_HASH_TYPE_UDPv6 = 1 << 5, S_5_1_9_4_3
    VIRTIO_NET_HASH_TYPE_IP_EX = 1 << 6, S_5_1_9_4_3
    VIRTIO_NET_HASH_TYPE_TCP_EX = 1 << 7, S_5_1_9_4_3
    VIRTIO_NET_HASH_TYPE_UDP_EX = 1 << 8, S_5_1_9_4_3


class NetHashTunnelType(SpecIntFlag):
    """Encapsulation types for the inner header hash (§5.1.9.4.4, 1.3+)."""

    VIRTIO_NET_HASH_TUNNEL_TYPE_GRE_2784 = 1 << 0, S_5_1_9_4_4
    VIRTIO_NET_HASH_TUNNEL_TYPE_GRE_2890 = 1 << 1, S_5_1_9_4_4
    VIRTIO_NET_HASH_TUNNEL_TYPE_GRE_7676 = 1 << 2, S_5_1_9_4_4
    VIRTIO_NET_HASH_TUNNEL_TYPE_GRE_UDP = 1 << 3, S_5_1_9_4_4
    VIRTIO_NET_HASH_TUNNEL_TYPE_VXLAN = 1 << 4, S_5_1_9_4_4
    VIRTIO_NET_HASH_TUNNEL_TYPE_VXLAN_GPE = 1 << 5, S_5_1_9_4_4
    VIRTIO_NET_HASH_TUNNEL_TYPE_GENEVE = 1 << 6, S_5_1_9_4_4
    VIRTIO_NET_HASH_TUNNEL_TYPE_IPIP = 1 << 7, S_5_1_9_4_4
    VIRTIO_NET_HASH_TUNNEL_TYPE_NVGRE = 1 << 8, S_5_1_9_4_4


class NetHashReport(SpecIntEnum):
    """``virtio_net_hdr.hash_report`` (§5.1.9.4.5)."""

    VIRTIO_NET_HASH_REPORT_NONE = 0, S_5_1_9_4_5
    VIRTIO_NET_HASH_REPORT_IPv4 = 1, S_5_1_9_4_5
    VIRTIO_NET_HASH_REPORT_TCPv4 = 2, S_5_1_9_4_5
    VIRTIO_NET_HASH_REPORT_UDPv4 = 3, S_5_1_9_4_5
    VIRTIO_NET_HASH_REPORT_IPv6 = 4, S_5_1_9_4_5
    VIRTIO_NET_HASH_REPORT_TCPv6 = 5, S_5_1_9_4_5
    VIRTIO_NET_HASH_REPORT_UDPv6 = 6, S_5_1_9_4_5
    VIRTIO_NET_HASH_REPORT_IPv6_EX = 7, S_5_1_9_4_5
    VIRTIO_NET_HASH_REPORT_TCPv6_EX = 8, S_5_1_9_4_5
    VIRTIO_NET_HASH_REPORT_UDPv6_EX = 9, S_5_1_9_4_5


class NetCtrlAck(SpecIntEnum):
    """``virtio_net_ctrl.ack`` (§5.1.9.5)."""

    VIRTIO_NET_OK = 0, S_5_1_9_5
    VIRTIO_NET_ERR = 1, S_5_1_9_5


class NetCtrlClass(SpecIntEnum):
    """``virtio_net_ctrl.class`` (§5.1.9.5.x)."""

    VIRTIO_NET_CTRL_RX = 0, S_5_1_9_5_1
    VIRTIO_NET_CTRL_MAC = 1, S_5_1_9_5_2
    VIRTIO_NET_CTRL_VLAN = 2, S_5_1_9_5_3
    VIRTIO_NET_CTRL_ANNOUNCE = 3, S_5_1_9_5_4
    VIRTIO_NET_CTRL_MQ = 4, S_5_1_9_5_5
    VIRTIO_NET_CTRL_GUEST_OFFLOADS = 5, S_5_1_9_5_9
    VIRTIO_NET_CTRL_NOTF_COAL = 6, S_5_1_9_5_10  # 1.3+
    VIRTIO_NET_CTRL_HASH_TUNNEL = 7, S_5_1_9_4_4  # 1.3+
    VIRTIO_NET_CTRL_STATS = 8, S_5_1_9_5_11  # 1.4
    VIRTNET_RSS_CTX_CTRL = 9, S_5_1_9_5_8  # 1.4 (the spec's name)


class NetCtrlRxCmd(SpecIntEnum):
    VIRTIO_NET_CTRL_RX_PROMISC = 0, S_5_1_9_5_1
    VIRTIO_NET_CTRL_RX_ALLMULTI = 1, S_5_1_9_5_1
    VIRTIO_NET_CTRL_RX_ALLUNI = 2, S_5_1_9_5_1
    VIRTIO_NET_CTRL_RX_NOMULTI = 3, S_5_1_9_5_1
    VIRTIO_NET_CTRL_RX_NOUNI = 4, S_5_1_9_5_1
    VIRTIO_NET_CTRL_RX_NOBCAST = 5, S_5_1_9_5_1


class NetCtrlMacCmd(SpecIntEnum):
    VIRTIO_NET_CTRL_MAC_TABLE_SET = 0, S_5_1_9_5_2
    VIRTIO_NET_CTRL_MAC_ADDR_SET = 1, S_5_1_9_5_2


class NetCtrlVlanCmd(SpecIntEnum):
    VIRTIO_NET_CTRL_VLAN_ADD = 0, S_5_1_9_5_3
    VIRTIO_NET_CTRL_VLAN_DEL = 1, S_5_1_9_5_3


class NetCtrlAnnounceCmd(SpecIntEnum):
    VIRTIO_NET_CTRL_ANNOUNCE_ACK = 0, S_5_1_9_5_4


class NetCtrlMqCmd(SpecIntEnum):
    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET = 0, S_5_1_9_5_5
    VIRTIO_NET_CTRL_MQ_RSS_CONFIG = 1, S_5_1_9_5_5
    VIRTIO_NET_CTRL_MQ_HASH_CONFIG = 2, S_5_1_9_5_5


class NetCtrlGuestOffloadsCmd(SpecIntEnum):
    VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET = 0, S_5_1_9_5_9


class NetCtrlNotfCoalCmd(SpecIntEnum):
    VIRTIO_NET_CTRL_NOTF_COAL_TX_SET = 0, S_5_1_9_5_10
    VIRTIO_NET_CTRL_NOTF_COAL_RX_SET = 1, S_5_1_9_5_10
    VIRTIO_NET_CTRL_NOTF_COAL_VQ_SET = 2, S_5_1_9_5_10
    VIRTIO_NET_CTRL_NOTF_COAL_VQ_GET = 3, S_5_1_9_5_10


class NetCtrlHashTunnelCmd(SpecIntEnum):
    VIRTIO_NET_CTRL_HASH_TUNNEL_SET = 0, S_5_1_9_4_4


class NetCtrlStatsCmd(SpecIntEnum):
    VIRTIO_NET_CTRL_STATS_QUERY = 0, S_5_1_9_5_11
    VIRTIO_NET_CTRL_STATS_GET = 1, S_5_1_9_5_11


class NetCtrlRssCtxCmd(SpecIntEnum):
    VIRTNET_RSS_CTX_CTRL_CAP_GET = 0, S_5_1_9_5_8
    VIRTNET_RSS_CTX_CTRL_ADD = 1, S_5_1_9_5_8
    VIRTNET_RSS_CTX_CTRL_MOD = 2, S_5_1_9_5_8
    VIRTNET_RSS_CTX_CTRL_DEL = 3, S_5_1_9_5_8


VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN = 1
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX = 0x8000

virtio_net_config = Struct(
    "mac" / Bytes(6),  # valid if VIRTIO_NET_F_MAC
    "status" / Int16ul,  # VIRTIO_NET_F_STATUS
    "max_virtqueue_pairs" / Int16ul,  # VIRTIO_NET_F_MQ or VIRTIO_NET_F_RSS
    "mtu" / Int16ul,  # VIRTIO_NET_F_MTU
    "speed" / Int32ul,  # VIRTIO_NET_F_SPEED_DUPLEX
    "duplex" / Int8ul,
    "rss_max_key_size" / Int8ul,  # VIRTIO_NET_F_RSS or VIRTIO_NET_F_HASH_REPORT
    "rss_max_indirection_table_length" / Int16ul,  # VIRTIO_NET_F_RSS
    "supported_hash_types" / Int32ul,  # VIRTIO_NET_F_RSS or VIRTIO_NET_F_HASH_REPORT
    "supported_tunnel_types" / Int32ul,  # VIRTIO_NET_F_HASH_TUNNEL (1.3+)
)
"""``struct virtio_net_config`` (§5.1.4)."""

virtio_net_hdr_v1 = Struct(
    "flags" / Int8ul,
    "gso_type" / Int8ul,
    "hdr_len" / Int16ul,
    "gso_size" / Int16ul,
    "csum_start" / Int16ul,  # with RSC_INFO: number of coalesced segments
    "csum_offset" / Int16ul,  # with RSC_INFO: number of duplicated ACKs
    "num_buffers" / Int16ul,
)
"""``struct virtio_net_hdr`` up to ``num_buffers`` (§5.1.9): the 12-byte header used
without VIRTIO_NET_F_HASH_REPORT (Linux ``virtio_net_hdr_v1``)."""

virtio_net_hdr_v1_hash = Struct(
    "hdr" / virtio_net_hdr_v1,
    "hash_value" / Int32ul,
    "hash_report" / Int16ul,
    "padding_reserved" / Int16ul,
)
"""The 20-byte ``struct virtio_net_hdr`` with VIRTIO_NET_F_HASH_REPORT (§5.1.9)."""

virtio_net_hdr = Struct(
    "flags" / Int8ul,
    "gso_type" / Int8ul,
    "hdr_len" / Int16ul,
    "gso_size" / Int16ul,
    "csum_start" / Int16ul,
    "csum_offset" / Int16ul,
)
"""Legacy header without ``num_buffers`` (§5.1.9.1: legacy drivers only had
``num_buffers`` with VIRTIO_NET_F_MRG_RXBUF)."""

virtio_net_hdr_mrg_rxbuf = Struct("hdr" / virtio_net_hdr, "num_buffers" / Int16ul)
"""Legacy header with VIRTIO_NET_F_MRG_RXBUF (§5.1.9.1)."""

virtio_net_ctrl_hdr = Struct("class" / Int8ul, "command" / Int8ul)
"""First two bytes of ``struct virtio_net_ctrl`` (§5.1.9.5), followed by
command-specific-data, ``u8 ack`` and command-specific-result."""

virtio_net_ctrl_mac = Struct("entries" / Int32ul)
"""Head of one MAC table (§5.1.9.5.2), followed by ``u8 macs[entries][6]``."""

virtio_net_ctrl_mq = Struct("virtqueue_pairs" / Int16ul)
"""VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET data; the spec's ``virtio_net_ctrl_mq_pairs_set``
(§5.1.9.5.6)."""

virtio_net_ctrl_coal = Struct("max_packets" / Int32ul, "max_usecs" / Int32ul)
"""Notification coalescing parameters (§5.1.9.5.10)."""

virtio_net_ctrl_coal_vq = Struct(
    "vq_index" / Int16ul,
    "reserved" / Int16ul,
    "coal" / virtio_net_ctrl_coal,
)
"""Per-virtqueue coalescing parameters (§5.1.9.5.10, 1.3+)."""

STRUCTS: dict[str, Struct] = {
    "virtio_net_config": virtio_net_config,
    "virtio_net_hdr_v1": virtio_net_hdr_v1,
    "virtio_net_hdr_v1_hash": virtio_net_hdr_v1_hash,
    "virtio_net_hdr": virtio_net_hdr,
    "virtio_net_hdr_mrg_rxbuf": virtio_net_hdr_mrg_rxbuf,
    "virtio_net_ctrl_hdr": virtio_net_ctrl_hdr,
    "virtio_net_ctrl_mac": virtio_net_ctrl_mac,
    "virtio_net_ctrl_mq": virtio_net_ctrl_mq,
    "virtio_net_ctrl_coal": virtio_net_ctrl_coal,
    "virtio_net_ctrl_coal_vq": virtio_net_ctrl_coal_vq,
}
STRUCT_SECTIONS: dict[str, Section] = {
    "virtio_net_config": S_5_1_4,
    "virtio_net_hdr_v1": S_5_1_9,
    "virtio_net_hdr_v1_hash": S_5_1_9,
    "virtio_net_hdr": S_5_1_9_1,
    "virtio_net_hdr_mrg_rxbuf": S_5_1_9_1,
    "virtio_net_ctrl_hdr": S_5_1_9_5,
    "virtio_net_ctrl_mac": S_5_1_9_5_2,
    "virtio_net_ctrl_mq": S_5_1_9_5_6,
    "virtio_net_ctrl_coal": S_5_1_9_5_10,
    "virtio_net_ctrl_coal_vq": S_5_1_9_5_10,
}
CONSTANTS: dict[str, tuple[int, Section]] = {
    "VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN": (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN, S_5_1_9_5_6),
    "VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX": (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX, S_5_1_9_5_6),
}
ENUMS = (
    NetFeature,
    NetStatus,
    NetHdrFlag,
    NetHdrGso,
    NetHashType,
    NetHashTunnelType,
    NetHashReport,
    NetCtrlAck,
    NetCtrlClass,
    NetCtrlRxCmd,
    NetCtrlMacCmd,
    NetCtrlVlanCmd,
    NetCtrlAnnounceCmd,
    NetCtrlMqCmd,
    NetCtrlGuestOffloadsCmd,
    NetCtrlNotfCoalCmd,
    NetCtrlHashTunnelCmd,
    NetCtrlStatsCmd,
    NetCtrlRssCtxCmd,
)
LEGACY = frozenset(
    {
        "VIRTIO_NET_F_GSO",
        "VIRTIO_NET_F_GUEST_RSC4",
        "VIRTIO_NET_F_GUEST_RSC6",
        "virtio_net_hdr",
        "virtio_net_hdr_mrg_rxbuf",
    }
)
NOT_IN_1_2 = frozenset(
    {
        "VIRTIO_NET_F_CTRL_RX_EXTRA",
        "VIRTIO_NET_CTRL_RX_ALLUNI",
        "VIRTIO_NET_CTRL_RX_NOMULTI",
        "VIRTIO_NET_CTRL_RX_NOUNI",
        "VIRTIO_NET_CTRL_RX_NOBCAST",
        "VIRTIO_NET_F_DEVICE_STATS",
        "VIRTIO_NET_F_HASH_TUNNEL",
        "VIRTIO_NET_F_VQ_NOTF_COAL",
        "VIRTIO_NET_F_NOTF_COAL",
        "VIRTIO_NET_F_GUEST_USO4",
        "VIRTIO_NET_F_GUEST_USO6",
        "VIRTIO_NET_F_RSS_CONTEXT",
        "VIRTIO_NET_CTRL_NOTF_COAL",
        "VIRTIO_NET_CTRL_HASH_TUNNEL",
        "VIRTIO_NET_CTRL_STATS",
        "VIRTNET_RSS_CTX_CTRL",
        *(m.name for m in NetHashTunnelType),
        *(m.name for m in NetCtrlNotfCoalCmd),
        *(m.name for m in NetCtrlHashTunnelCmd),
        *(m.name for m in NetCtrlStatsCmd),
        *(m.name for m in NetCtrlRssCtxCmd),
        "virtio_net_ctrl_coal",
        "virtio_net_ctrl_coal_vq",
        "virtio_net_config.supported_tunnel_types",
    }
)
