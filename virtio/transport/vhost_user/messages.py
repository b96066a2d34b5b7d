"""vhost-user wire format: header, request numbers, payloads, and the per-request table.

Everything here is transcribed from the vhost-user specification, QEMU
``docs/interop/vhost-user.rst`` (sections "Message Specification", "Communication",
"Protocol features", "Front-end message types", "Back-end message types",
"VHOST_USER_PROTOCOL_F_REPLY_ACK").  There is no I/O here; ``protocol.py`` drives it.

All numbers are in the machine's native byte order ("Message Specification").  Payloads
are plain frozen dataclasses with ``pack()`` and ``unpack()``; decoding uses ``struct`` (the
control path runs these for every message, in-band kicks included).  The same layouts are
also given as ``construct`` Structs (``*_STRUCT``), which document the wire format and which
the tests check against the ``struct`` codecs.

Size limit: the spec sets none.  The largest payload QEMU sends is a crypto session
(about 600 bytes); a memory table is 8 + 8 * 40 bytes, a config access 12 + 256.  We accept
payloads up to ``MAX_PAYLOAD_SIZE = 0x1000`` bytes (the limit rust-vmm's vhost crate uses);
a larger ``size`` in a header kills the connection (``OversizedMessage``).
"""

from __future__ import annotations

import enum
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, Union

from construct import Bytes, Int8un, Int16un, Int32un, Int64un, Padding, Struct, this

from .errors import InvalidMessage, PayloadSizeMismatch, request_section, spec_section

# --------------------------------------------------------------------------------------
# Header ("Message Specification / Header")

HEADER = struct.Struct("=III")
"""request (u32), flags (u32), size (u32) of the payload."""
HEADER_SIZE = HEADER.size  # 12
HEADER_STRUCT = Struct("request" / Int32un, "flags" / Int32un, "size" / Int32un)

MAX_PAYLOAD_SIZE = 0x1000
"""Largest payload we accept (our choice; see the module docstring)."""
MAX_MESSAGE_SIZE = HEADER_SIZE + MAX_PAYLOAD_SIZE

VHOST_USER_VERSION = 0x1
"""The only protocol version: the lower 2 bits of ``flags``."""


class HeaderFlags(enum.IntFlag):
    """Bits of the header ``flags`` field."""

    VERSION_MASK = 0x3
    REPLY = 0x4
    """Set on every reply from the back-end."""
    NEED_REPLY = 0x8
    """The front-end wants a reply (REPLY_ACK): u64 0 on success, non-zero on failure."""


VHOST_USER_F_PROTOCOL_FEATURES = 30
"""Virtio feature bit announcing GET/SET_PROTOCOL_FEATURES ("Communication")."""
VHOST_F_LOG_ALL = 26
"""Virtio feature bit: the front-end logs dirty pages during migration ("Migration")."""
VHOST_VRING_F_LOG = 0
"""Bit of ``VringAddr.flags``: log writes to the used ring ("Migration")."""
VHOST_LOG_PAGE = 0x1000
VHOST_USER_VRING_IDX_MASK = 0xFF
"""Bits 0-7 of the SET_VRING_KICK/CALL/ERR payload: the vring index."""
VHOST_USER_VRING_NOFD_MASK = 1 << 8
"""Bit 8 of the SET_VRING_KICK/CALL/ERR payload: no fd in the ancillary data."""
VHOST_MEMORY_BASELINE_NREGIONS = 8
"""Most regions in one SET_MEM_TABLE ("Multiple Memory regions description")."""
VHOST_USER_MAX_CONFIG_SIZE = 256
"""Most config-space bytes in one GET/SET_CONFIG (QEMU's limit)."""
VHOST_USER_MAX_BACKEND_FDS = 8
"""Most fds in one back-end message ("Back-end communication")."""
MAX_QUEUE_SIZE = 32768
"""Largest virtqueue size (virtio 1.4 §2.7 / §2.8)."""


class FrontendRequest(enum.IntEnum):
    """Front-end message types ("Front-end message types"), without the ``VHOST_USER_``."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    """Previous name SET_SLAVE_REQ_FD."""
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43
    GET_SHMEM_CONFIG = 44
    """Newest: VIRTIO Shared Memory Regions (protocol feature SHMEM, bit 20)."""

    @property
    def section(self) -> str:
        return request_section(self.name)


class BackendRequest(enum.IntEnum):
    """Back-end message types ("Back-end message types"), sent on the back-end channel
    (the socket of SET_BACKEND_REQ_FD); names without ``VHOST_USER_BACKEND_``."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8
    SHMEM_MAP = 9
    SHMEM_UNMAP = 10


class ProtocolFeature(enum.IntEnum):
    """Protocol feature bit numbers ("Protocol features"); ``mask`` is ``1 << bit``."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    XEN_MMAP = 17
    SHARED_OBJECT = 18
    DEVICE_STATE = 19
    SHMEM = 20

    @property
    def mask(self) -> int:
        return 1 << self.value


def protocol_feature_mask(*features: ProtocolFeature) -> int:
    """``protocol_feature_mask(MQ, REPLY_ACK)`` -> ``0b1001``."""
    mask = 0
    for feature in features:
        mask |= 1 << feature
    return mask


@dataclass(frozen=True, slots=True)
class Header:
    """A message header."""

    request: int
    flags: int
    size: int

    @property
    def version(self) -> int:
        return self.flags & HeaderFlags.VERSION_MASK

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & HeaderFlags.REPLY)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & HeaderFlags.NEED_REPLY)

    def pack(self) -> bytes:
        return HEADER.pack(self.request, self.flags, self.size)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> Header:
        return cls(*HEADER.unpack_from(data))


# --------------------------------------------------------------------------------------
# Payloads ("Message Specification / Payload")


@dataclass(frozen=True, slots=True)
class DecodeContext:
    """What payload decoding needs to know about the connection.

    ``xen_mmap``: protocol feature XEN_MMAP negotiated (memory regions are 40 bytes, not 32).
    ``max_queues``: vring indices must be below it (``None``: not checked).
    """

    xen_mmap: bool = False
    max_queues: int | None = None


def _bad(request: FrontendRequest, what: str) -> InvalidMessage:
    return InvalidMessage(f"{request.name}: {what}", request=request, section=request.section)


def _check_size(request: FrontendRequest, data: bytes, size: int) -> None:
    if len(data) != size:
        raise PayloadSizeMismatch(request, len(data), str(size), section=request.section)


def _check_queue(request: FrontendRequest, index: int, ctx: DecodeContext) -> None:
    if ctx.max_queues is not None and index >= ctx.max_queues:
        raise _bad(request, f"vring index {index} out of range (the device has {ctx.max_queues})")


_U64 = struct.Struct("=Q")
U64_STRUCT = Struct("u64" / Int64un)


@dataclass(frozen=True, slots=True)
class U64:
    """A single 64-bit integer (features, status, MTU, acks, ...)."""

    value: int
    SIZE = 8

    def pack(self) -> bytes:
        return _U64.pack(self.value)

    @classmethod
    def unpack(cls, data: bytes) -> U64:
        return cls(_U64.unpack(data)[0])


_VRING_STATE = struct.Struct("=II")
VRING_STATE_STRUCT = Struct("index" / Int32un, "num" / Int32un)


@dataclass(frozen=True, slots=True)
class VringState:
    """A vring state description: ``index`` and ``num`` (u32 each).

    For SET/GET_VRING_BASE ``num`` holds the descriptor index/indices; see
    ``split_next_avail`` and ``packed_indices``.
    """

    index: int
    num: int
    SIZE = 8

    def pack(self) -> bytes:
        return _VRING_STATE.pack(self.index, self.num)

    @classmethod
    def unpack(cls, data: bytes) -> VringState:
        return cls(*_VRING_STATE.unpack(data))

    @property
    def split_next_avail(self) -> int:
        """Split virtqueues: next available-ring index to process (bits 0-15)."""
        return self.num & 0xFFFF

    @property
    def packed_indices(self) -> tuple[int, bool, int, bool]:
        """Packed virtqueues: (next avail index, avail wrap counter, used index, used wrap)."""
        n = self.num
        return n & 0x7FFF, bool(n >> 15 & 1), n >> 16 & 0x7FFF, bool(n >> 31 & 1)

    @staticmethod
    def packed_num(avail: int, avail_wrap: bool, used: int, used_wrap: bool) -> int:
        """Inverse of ``packed_indices``: the ``num`` to send for a packed queue."""
        return (avail & 0x7FFF) | avail_wrap << 15 | (used & 0x7FFF) << 16 | used_wrap << 31


_VRING_ADDR = struct.Struct("=IIQQQQ")
VRING_ADDR_STRUCT = Struct(
    "index" / Int32un,
    "flags" / Int32un,
    "descriptor" / Int64un,
    "used" / Int64un,
    "available" / Int64un,
    "log" / Int64un,
)


@dataclass(frozen=True, slots=True)
class VringAddr:
    """A vring address description (user addresses, or IOVAs with VIRTIO_F_IOMMU_PLATFORM)."""

    index: int
    flags: int
    descriptor: int
    used: int
    available: int
    log: int
    SIZE = 40

    @property
    def log_used(self) -> bool:
        """``VHOST_VRING_F_LOG``: writes to the used ring are logged at ``log``."""
        return bool(self.flags & (1 << VHOST_VRING_F_LOG))

    def pack(self) -> bytes:
        return _VRING_ADDR.pack(
            self.index, self.flags, self.descriptor, self.used, self.available, self.log
        )

    @classmethod
    def unpack(cls, data: bytes) -> VringAddr:
        return cls(*_VRING_ADDR.unpack(data))


@dataclass(frozen=True, slots=True)
class VringFd:
    """Payload of SET_VRING_KICK / CALL / ERR: bits 0-7 vring index, bit 8 "no fd"."""

    index: int
    no_fd: bool = False
    SIZE = 8

    def pack(self) -> bytes:
        return _U64.pack(self.index | (VHOST_USER_VRING_NOFD_MASK if self.no_fd else 0))

    @classmethod
    def unpack(cls, data: bytes) -> VringFd:
        (value,) = _U64.unpack(data)
        return cls(value & VHOST_USER_VRING_IDX_MASK, bool(value & VHOST_USER_VRING_NOFD_MASK))


_REGION = struct.Struct("=QQQQ")
_XEN_REGION = struct.Struct("=QQQQII")
MEMORY_REGION_STRUCT = Struct(
    "guest_address" / Int64un, "size" / Int64un, "user_address" / Int64un, "mmap_offset" / Int64un
)
XEN_MEMORY_REGION_STRUCT = Struct(
    "guest_address" / Int64un,
    "size" / Int64un,
    "user_address" / Int64un,
    "mmap_offset" / Int64un,
    "xen_mmap_flags" / Int32un,
    "domid" / Int32un,
)
_U64_MAX = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class MemoryRegion:
    """A memory region description.  ``xen_mmap_flags`` and ``domid`` are present (not
    ``None``) only when XEN_MMAP is negotiated; the region is then 40 bytes, else 32."""

    guest_address: int
    size: int
    user_address: int
    mmap_offset: int
    xen_mmap_flags: int | None = None
    domid: int | None = None

    @staticmethod
    def wire_size(xen_mmap: bool) -> int:
        return _XEN_REGION.size if xen_mmap else _REGION.size

    def pack(self) -> bytes:
        base = (self.guest_address, self.size, self.user_address, self.mmap_offset)
        if self.xen_mmap_flags is None:
            return _REGION.pack(*base)
        return _XEN_REGION.pack(*base, self.xen_mmap_flags, self.domid or 0)

    @classmethod
    def unpack(cls, data: bytes, xen_mmap: bool = False) -> MemoryRegion:
        return cls(*(_XEN_REGION if xen_mmap else _REGION).unpack(data))

    def shape_error(self) -> str | None:
        """Range checks that need no knowledge of guest memory: non-empty, no 64-bit wrap."""
        if self.size == 0:
            return "memory region of size 0"
        for name, base in (
            ("guest address", self.guest_address),
            ("user address", self.user_address),
            ("mmap offset", self.mmap_offset),
        ):
            if base + self.size - 1 > _U64_MAX:
                return f"memory region {name} {base:#x} + size {self.size:#x} wraps around"
        return None


_MEM_HEADER = struct.Struct("=II")
MEMORY_TABLE_STRUCT = Struct(
    "num_regions" / Int32un,
    Padding(4),
    "regions" / MEMORY_REGION_STRUCT[this.num_regions],
)


@dataclass(frozen=True, slots=True)
class MemoryTable:
    """Multiple memory regions description (SET_MEM_TABLE): ``num regions`` (u32),
    padding (u32), then exactly ``num regions`` regions (QEMU sends no unused slots)."""

    regions: tuple[MemoryRegion, ...]

    @property
    def num_regions(self) -> int:
        return len(self.regions)

    def pack(self) -> bytes:
        return _MEM_HEADER.pack(len(self.regions), 0) + b"".join(r.pack() for r in self.regions)


_SINGLE_PAD = struct.Struct("=Q")
SINGLE_MEMORY_REGION_STRUCT = Struct(Padding(8), "region" / MEMORY_REGION_STRUCT)


@dataclass(frozen=True, slots=True)
class SingleMemoryRegion:
    """Single memory region description (ADD_MEM_REG / REM_MEM_REG): padding u64 + region."""

    region: MemoryRegion

    def pack(self) -> bytes:
        return _SINGLE_PAD.pack(0) + self.region.pack()


_LOG = struct.Struct("=QQ")
LOG_STRUCT = Struct("mmap_size" / Int64un, "mmap_offset" / Int64un)


@dataclass(frozen=True, slots=True)
class LogDescription:
    """Log description (SET_LOG_BASE): size and offset of the dirty log in the fd."""

    mmap_size: int
    mmap_offset: int
    SIZE = 16

    def pack(self) -> bytes:
        return _LOG.pack(self.mmap_size, self.mmap_offset)

    @classmethod
    def unpack(cls, data: bytes) -> LogDescription:
        return cls(*_LOG.unpack(data))


_IOTLB = struct.Struct("=QQQBB")
IOTLB_STRUCT = Struct(
    "iova" / Int64un,
    "size" / Int64un,
    "user_address" / Int64un,
    "permissions" / Int8un,
    "type" / Int8un,
    Padding(6),
)


class IotlbType(enum.IntEnum):
    MISS = 1
    UPDATE = 2
    INVALIDATE = 3
    ACCESS_FAIL = 4


@dataclass(frozen=True, slots=True)
class IotlbMessage:
    """An IOTLB message (``struct vhost_iotlb_msg``: 26 bytes of fields, 32 with the
    C padding QEMU sends).  ``permissions``: 0 none, 1 read, 2 write, 3 read/write."""

    iova: int
    size: int
    user_address: int
    permissions: int
    type: int
    SIZE = 32

    def pack(self) -> bytes:
        fields = (self.iova, self.size, self.user_address, self.permissions, self.type)
        return _IOTLB.pack(*fields) + bytes(6)

    @classmethod
    def unpack(cls, data: bytes) -> IotlbMessage:
        return cls(*_IOTLB.unpack_from(data))


_CONFIG_HEADER = struct.Struct("=III")
CONFIG_HEADER_SIZE = _CONFIG_HEADER.size
CONFIG_STRUCT = Struct(
    "offset" / Int32un, "size" / Int32un, "flags" / Int32un, "payload" / Bytes(this.size)
)


class ConfigFlags(enum.IntEnum):
    """``flags`` of a config space access."""

    WRITABLE = 0
    """Front-end message for writable fields."""
    MIGRATION = 1
    """Front-end message for live migration (may write read-only fields)."""


@dataclass(frozen=True, slots=True)
class ConfigSpace:
    """Virtio device config space access: ``offset``, ``flags`` and ``data`` (``size`` bytes;
    zeros in a GET_CONFIG request)."""

    offset: int
    flags: int
    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)

    def pack(self) -> bytes:
        return _CONFIG_HEADER.pack(self.offset, len(self.data), self.flags) + self.data


_AREA = struct.Struct("=QQQ")
VRING_AREA_STRUCT = Struct("u64" / Int64un, "size" / Int64un, "offset" / Int64un)


@dataclass(frozen=True, slots=True)
class VringArea:
    """Vring area description (back-end VRING_HOST_NOTIFIER_MSG): index (bits 0-7) and
    flags (bit 8: no fd) in ``u64``, then the mmap ``size`` and ``offset`` in the fd."""

    index: int
    size: int
    offset: int
    no_fd: bool = False
    SIZE = 24

    def pack(self) -> bytes:
        u64 = (self.index & VHOST_USER_VRING_IDX_MASK) | (
            VHOST_USER_VRING_NOFD_MASK if self.no_fd else 0
        )
        return _AREA.pack(u64, self.size, self.offset)

    @classmethod
    def unpack(cls, data: bytes) -> VringArea:
        u64, size, offset = _AREA.unpack(data)
        return cls(
            u64 & VHOST_USER_VRING_IDX_MASK, size, offset, bool(u64 & VHOST_USER_VRING_NOFD_MASK)
        )


_INFLIGHT = struct.Struct("=QQHH")
INFLIGHT_STRUCT = Struct(
    "mmap_size" / Int64un, "mmap_offset" / Int64un, "num_queues" / Int16un, "queue_size" / Int16un
)
INFLIGHT_WIRE_SIZE = 24
"""QEMU sends ``sizeof(VhostUserInflight)``: 20 bytes of fields plus 4 of C padding."""


@dataclass(frozen=True, slots=True)
class InflightDescription:
    """Inflight description (GET/SET_INFLIGHT_FD)."""

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int

    def pack(self) -> bytes:
        fields = (self.mmap_size, self.mmap_offset, self.num_queues, self.queue_size)
        return _INFLIGHT.pack(*fields) + bytes(INFLIGHT_WIRE_SIZE - _INFLIGHT.size)

    @classmethod
    def unpack(cls, data: bytes) -> InflightDescription:
        return cls(*_INFLIGHT.unpack_from(data))


SHARED_OBJECT_STRUCT = Struct("uuid" / Bytes(16))


@dataclass(frozen=True, slots=True)
class SharedObject:
    """VhostUserShared: a 16-byte UUID in RFC 4122 byte order (first three fields big
    endian), i.e. ``uuid.UUID(bytes=...)``."""

    uuid: uuid.UUID
    SIZE = 16

    def pack(self) -> bytes:
        return self.uuid.bytes

    @classmethod
    def unpack(cls, data: bytes) -> SharedObject:
        return cls(uuid.UUID(bytes=bytes(data)))


class TransferDirection(enum.IntEnum):
    SAVE = 0
    """Back-end to front-end (migration source)."""
    LOAD = 1
    """Front-end to back-end (migration destination)."""


class MigrationPhase(enum.IntEnum):
    STOPPED = 0


_DEVICE_STATE = struct.Struct("=II")
DEVICE_STATE_STRUCT = Struct("direction" / Int32un, "phase" / Int32un)


@dataclass(frozen=True, slots=True)
class DeviceStateTransfer:
    """Device state transfer parameters (SET_DEVICE_STATE_FD)."""

    direction: TransferDirection
    phase: MigrationPhase
    SIZE = 8

    def pack(self) -> bytes:
        return _DEVICE_STATE.pack(self.direction, self.phase)


@dataclass(frozen=True, slots=True)
class MacAddress:
    """SEND_RARP: a u64 whose first 6 bytes are the guest's MAC address."""

    mac: bytes
    SIZE = 8

    def pack(self) -> bytes:
        return self.mac[:6].ljust(8, b"\0")


@dataclass(frozen=True, slots=True)
class Opaque:
    """A payload this module does not interpret (CREATE_CRYPTO_SESSION: QEMU's
    ``VhostUserCryptoSession``, specific to the crypto device)."""

    data: bytes

    def pack(self) -> bytes:
        return self.data


Payload = Union[  # noqa: UP007 - a runtime alias, kept readable
    U64,
    VringState,
    VringAddr,
    VringFd,
    MemoryTable,
    SingleMemoryRegion,
    LogDescription,
    IotlbMessage,
    ConfigSpace,
    InflightDescription,
    SharedObject,
    DeviceStateTransfer,
    MacAddress,
    Opaque,
]


class _Packable(Protocol):
    def pack(self) -> bytes: ...


# --------------------------------------------------------------------------------------
# Decoders: bytes (already within the table's size bounds) -> payload, with shape checks


def _decode_u64(req: FrontendRequest, data: bytes, ctx: DecodeContext) -> U64:
    return U64.unpack(data)


def _decode_vring_state(req: FrontendRequest, data: bytes, ctx: DecodeContext) -> VringState:
    state = VringState.unpack(data)
    _check_queue(req, state.index, ctx)
    if req is FrontendRequest.SET_VRING_NUM and not 1 <= state.num <= MAX_QUEUE_SIZE:
        raise _bad(req, f"queue size {state.num} not in 1..{MAX_QUEUE_SIZE}")
    if req is FrontendRequest.SET_VRING_ENABLE and state.num > 1:
        raise _bad(req, f"enable must be 0 or 1, not {state.num}")
    if req is FrontendRequest.SET_VRING_ENDIAN and state.num > 1:
        raise _bad(req, f"endianness must be 0 (little) or 1 (big), not {state.num}")
    return state


def _decode_vring_addr(req: FrontendRequest, data: bytes, ctx: DecodeContext) -> VringAddr:
    addr = VringAddr.unpack(data)
    _check_queue(req, addr.index, ctx)
    return addr


def _decode_vring_fd(req: FrontendRequest, data: bytes, ctx: DecodeContext) -> VringFd:
    (value,) = _U64.unpack(data)
    if value & ~(VHOST_USER_VRING_IDX_MASK | VHOST_USER_VRING_NOFD_MASK):
        raise _bad(req, f"payload {value:#x} has bits set beyond the index and NOFD bit")
    vring = VringFd.unpack(data)
    _check_queue(req, vring.index, ctx)
    return vring


def _decode_regions(
    req: FrontendRequest, data: bytes, count: int, ctx: DecodeContext
) -> tuple[MemoryRegion, ...]:
    step = MemoryRegion.wire_size(ctx.xen_mmap)
    regions = []
    for i in range(count):
        region = MemoryRegion.unpack(data[i * step : (i + 1) * step], ctx.xen_mmap)
        problem = region.shape_error()
        if problem is not None:
            raise _bad(req, f"region {i}: {problem}")
        regions.append(region)
    return tuple(regions)


def _decode_memory_table(req: FrontendRequest, data: bytes, ctx: DecodeContext) -> MemoryTable:
    num, _padding = _MEM_HEADER.unpack_from(data)
    if num > VHOST_MEMORY_BASELINE_NREGIONS:
        raise _bad(req, f"{num} regions, at most {VHOST_MEMORY_BASELINE_NREGIONS} allowed")
    step = MemoryRegion.wire_size(ctx.xen_mmap)
    if len(data) != _MEM_HEADER.size + num * step:
        raise PayloadSizeMismatch(
            req, len(data), f"{_MEM_HEADER.size} + {step} * {num}", section=req.section
        )
    return MemoryTable(_decode_regions(req, data[_MEM_HEADER.size :], num, ctx))


def _decode_single_region(
    req: FrontendRequest, data: bytes, ctx: DecodeContext
) -> SingleMemoryRegion:
    _check_size(req, data, _SINGLE_PAD.size + MemoryRegion.wire_size(ctx.xen_mmap))
    return SingleMemoryRegion(_decode_regions(req, data[_SINGLE_PAD.size :], 1, ctx)[0])


def _decode_log(req: FrontendRequest, data: bytes, ctx: DecodeContext) -> LogDescription:
    return LogDescription.unpack(data)


def _decode_iotlb(req: FrontendRequest, data: bytes, ctx: DecodeContext) -> IotlbMessage:
    msg = IotlbMessage.unpack(data)
    if msg.permissions > 3:
        raise _bad(req, f"IOTLB permissions {msg.permissions} not in 0..3")
    if msg.type not in (IotlbType.UPDATE, IotlbType.INVALIDATE):
        raise _bad(req, f"IOTLB message type {msg.type} is not UPDATE (2) or INVALIDATE (3)")
    return msg


def _decode_config(req: FrontendRequest, data: bytes, ctx: DecodeContext) -> ConfigSpace:
    offset, size, flags = _CONFIG_HEADER.unpack_from(data)
    if size > VHOST_USER_MAX_CONFIG_SIZE:
        raise _bad(req, f"config access of {size} bytes, at most {VHOST_USER_MAX_CONFIG_SIZE}")
    if len(data) != CONFIG_HEADER_SIZE + size:
        raise PayloadSizeMismatch(
            req, len(data), f"{CONFIG_HEADER_SIZE} + {size}", section=req.section
        )
    if flags not in (ConfigFlags.WRITABLE, ConfigFlags.MIGRATION):
        raise _bad(req, f"config flags {flags} not 0 or 1")
    if offset + size > 1 << 32:
        raise _bad(req, f"config access at {offset:#x} + {size} wraps around")
    return ConfigSpace(offset, flags, bytes(data[CONFIG_HEADER_SIZE:]))


def _decode_inflight(req: FrontendRequest, data: bytes, ctx: DecodeContext) -> InflightDescription:
    return InflightDescription.unpack(data)


def _decode_shared(req: FrontendRequest, data: bytes, ctx: DecodeContext) -> SharedObject:
    return SharedObject.unpack(data)


def _decode_device_state(
    req: FrontendRequest, data: bytes, ctx: DecodeContext
) -> DeviceStateTransfer:
    direction, phase = _DEVICE_STATE.unpack(data)
    if direction not in (TransferDirection.SAVE, TransferDirection.LOAD):
        raise _bad(req, f"transfer direction {direction} not 0 (save) or 1 (load)")
    if phase != MigrationPhase.STOPPED:
        raise _bad(req, f"migration phase {phase} unknown (only 0, stopped)")
    return DeviceStateTransfer(TransferDirection(direction), MigrationPhase(phase))


def _decode_mac(req: FrontendRequest, data: bytes, ctx: DecodeContext) -> MacAddress:
    return MacAddress(bytes(data[:6]))


def _decode_opaque(req: FrontendRequest, data: bytes, ctx: DecodeContext) -> Opaque:
    return Opaque(bytes(data))


Decoder = Callable[[FrontendRequest, bytes, DecodeContext], Payload]


# --------------------------------------------------------------------------------------
# The request table


class FdRule(enum.Enum):
    """How many fds a front-end request carries in its ancillary data."""

    NONE = "0"
    ONE = "exactly 1"
    VRING = "1, or 0 with the NOFD bit (bit 8) set"
    PER_REGION = "one per memory region"
    TOLERATED_ONE = "0 (1 tolerated, and closed unused)"
    """REM_MEM_REG: "the back-end MAY accept messages with one file descriptor. If a file
    descriptor is passed, the back-end MUST close it without using it otherwise"."""


class ReplyRule(enum.Enum):
    """Whether a front-end request has an explicit reply body."""

    NONE = "none"
    """Only an ack, if NEED_REPLY is set."""
    ALWAYS = "always"
    POSTCOPY = "after POSTCOPY_LISTEN"
    """SET_MEM_TABLE / ADD_MEM_REG reply with the mapped bases in postcopy mode (then
    NEED_REPLY is not set); otherwise they behave like ``NONE``."""


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """One row of ``REQUESTS``.

    ``min_size``/``max_size``: bounds on the payload size (equal when it is fixed); the
    decoder then checks the exact shape (e.g. a memory table's size against its count).
    ``feature``: the protocol feature that must be negotiated (SET_PROTOCOL_FEATURES).
    ``needs_protocol_features``: legal only if our GET_FEATURES reply offered
    ``VHOST_USER_F_PROTOCOL_FEATURES`` (implied by any ``feature``).
    ``reply_fds``: most fds the back-end's reply may carry.
    """

    request: FrontendRequest
    min_size: int
    max_size: int
    decode: Decoder | None
    fds: FdRule = FdRule.NONE
    reply: ReplyRule = ReplyRule.NONE
    feature: ProtocolFeature | None = None
    needs_protocol_features: bool = False
    reply_fds: int = 0
    reply_payload: str = ""

    @property
    def section(self) -> str:
        return self.request.section

    @property
    def expected_size(self) -> str:
        if self.min_size == self.max_size:
            return str(self.min_size)
        return f"{self.min_size}..{self.max_size}"


_R = FrontendRequest
_F = ProtocolFeature
_REGION_MAX = _XEN_REGION.size
_MEM_TABLE_MAX = _MEM_HEADER.size + VHOST_MEMORY_BASELINE_NREGIONS * _REGION_MAX
_SINGLE_MIN = _SINGLE_PAD.size + _REGION.size
_SINGLE_MAX = _SINGLE_PAD.size + _XEN_REGION.size
_CONFIG_MAX = CONFIG_HEADER_SIZE + VHOST_USER_MAX_CONFIG_SIZE


def _row(
    request: FrontendRequest,
    size: int | tuple[int, int],
    decode: Decoder | None = None,
    **kwargs: object,
) -> tuple[FrontendRequest, RequestSpec]:
    lo, hi = (size, size) if isinstance(size, int) else size
    return request, RequestSpec(request, lo, hi, decode, **kwargs)  # type: ignore[arg-type]


REQUESTS: dict[FrontendRequest, RequestSpec] = dict(
    [
        _row(_R.GET_FEATURES, 0, reply=ReplyRule.ALWAYS, reply_payload="u64"),
        _row(_R.SET_FEATURES, 8, _decode_u64),
        _row(_R.SET_OWNER, 0),
        _row(_R.RESET_OWNER, 0),
        _row(
            _R.SET_MEM_TABLE,
            (_MEM_HEADER.size, _MEM_TABLE_MAX),
            _decode_memory_table,
            fds=FdRule.PER_REGION,
            reply=ReplyRule.POSTCOPY,
            reply_payload="memory table",
        ),
        # The spec's table says u64, but QEMU sends the 16-byte log description.
        _row(
            _R.SET_LOG_BASE,
            LogDescription.SIZE,
            _decode_log,
            fds=FdRule.ONE,
            reply=ReplyRule.ALWAYS,
            feature=_F.LOG_SHMFD,
            reply_payload="u64",
        ),
        _row(_R.SET_LOG_FD, 0, fds=FdRule.ONE),
        _row(_R.SET_VRING_NUM, 8, _decode_vring_state),
        _row(_R.SET_VRING_ADDR, VringAddr.SIZE, _decode_vring_addr),
        _row(_R.SET_VRING_BASE, 8, _decode_vring_state),
        _row(
            _R.GET_VRING_BASE,
            8,
            _decode_vring_state,
            reply=ReplyRule.ALWAYS,
            reply_payload="vring state",
        ),
        _row(_R.SET_VRING_KICK, 8, _decode_vring_fd, fds=FdRule.VRING),
        _row(_R.SET_VRING_CALL, 8, _decode_vring_fd, fds=FdRule.VRING),
        _row(_R.SET_VRING_ERR, 8, _decode_vring_fd, fds=FdRule.VRING),
        _row(
            _R.GET_PROTOCOL_FEATURES,
            0,
            reply=ReplyRule.ALWAYS,
            needs_protocol_features=True,
            reply_payload="u64",
        ),
        _row(_R.SET_PROTOCOL_FEATURES, 8, _decode_u64, needs_protocol_features=True),
        _row(_R.GET_QUEUE_NUM, 0, reply=ReplyRule.ALWAYS, feature=_F.MQ, reply_payload="u64"),
        _row(_R.SET_VRING_ENABLE, 8, _decode_vring_state, needs_protocol_features=True),
        _row(_R.SEND_RARP, 8, _decode_mac, feature=_F.RARP),
        _row(_R.NET_SET_MTU, 8, _decode_u64, feature=_F.MTU),
        _row(_R.SET_BACKEND_REQ_FD, 0, fds=FdRule.ONE, feature=_F.BACKEND_REQ),
        # Gated by VIRTIO_F_IOMMU_PLATFORM (a device feature), not by a protocol feature.
        _row(
            _R.IOTLB_MSG,
            (_IOTLB.size, IotlbMessage.SIZE),
            _decode_iotlb,
            reply=ReplyRule.ALWAYS,
            reply_payload="u64",
        ),
        _row(_R.SET_VRING_ENDIAN, 8, _decode_vring_state, feature=_F.CROSS_ENDIAN),
        _row(
            _R.GET_CONFIG,
            (CONFIG_HEADER_SIZE, _CONFIG_MAX),
            _decode_config,
            reply=ReplyRule.ALWAYS,
            feature=_F.CONFIG,
            reply_payload="config space",
        ),
        _row(_R.SET_CONFIG, (CONFIG_HEADER_SIZE, _CONFIG_MAX), _decode_config, feature=_F.CONFIG),
        _row(
            _R.CREATE_CRYPTO_SESSION,
            (8, MAX_PAYLOAD_SIZE),
            _decode_opaque,
            reply=ReplyRule.ALWAYS,
            feature=_F.CRYPTO_SESSION,
            reply_payload="crypto session",
        ),
        _row(_R.CLOSE_CRYPTO_SESSION, 8, _decode_u64, feature=_F.CRYPTO_SESSION),
        _row(
            _R.POSTCOPY_ADVISE,
            0,
            reply=ReplyRule.ALWAYS,
            feature=_F.PAGEFAULT,
            reply_fds=1,
            reply_payload="no payload (QEMU checks size 0) + userfault fd",
        ),
        _row(_R.POSTCOPY_LISTEN, 0, feature=_F.PAGEFAULT),
        _row(_R.POSTCOPY_END, 0, reply=ReplyRule.ALWAYS, feature=_F.PAGEFAULT, reply_payload="u64"),
        _row(
            _R.GET_INFLIGHT_FD,
            (_INFLIGHT.size, INFLIGHT_WIRE_SIZE),
            _decode_inflight,
            reply=ReplyRule.ALWAYS,
            feature=_F.INFLIGHT_SHMFD,
            reply_fds=1,
            reply_payload="inflight description + fd",
        ),
        _row(
            _R.SET_INFLIGHT_FD,
            (_INFLIGHT.size, INFLIGHT_WIRE_SIZE),
            _decode_inflight,
            fds=FdRule.ONE,
            feature=_F.INFLIGHT_SHMFD,
        ),
        _row(_R.GPU_SET_SOCKET, 0, fds=FdRule.ONE),
        _row(_R.RESET_DEVICE, 0, feature=_F.RESET_DEVICE),
        _row(_R.VRING_KICK, 8, _decode_vring_state, feature=_F.INBAND_NOTIFICATIONS),
        _row(
            _R.GET_MAX_MEM_SLOTS,
            0,
            reply=ReplyRule.ALWAYS,
            feature=_F.CONFIGURE_MEM_SLOTS,
            reply_payload="u64",
        ),
        _row(
            _R.ADD_MEM_REG,
            (_SINGLE_MIN, _SINGLE_MAX),
            _decode_single_region,
            fds=FdRule.ONE,
            reply=ReplyRule.POSTCOPY,
            feature=_F.CONFIGURE_MEM_SLOTS,
            reply_payload="single memory region",
        ),
        # The spec's table lists a reply payload, but the text and QEMU only ack it.
        _row(
            _R.REM_MEM_REG,
            (_SINGLE_MIN, _SINGLE_MAX),
            _decode_single_region,
            fds=FdRule.TOLERATED_ONE,
            feature=_F.CONFIGURE_MEM_SLOTS,
        ),
        _row(_R.SET_STATUS, 8, _decode_u64, feature=_F.STATUS),
        _row(_R.GET_STATUS, 0, reply=ReplyRule.ALWAYS, feature=_F.STATUS, reply_payload="u64"),
        _row(
            _R.GET_SHARED_OBJECT,
            SharedObject.SIZE,
            _decode_shared,
            reply=ReplyRule.ALWAYS,
            feature=_F.SHARED_OBJECT,
            reply_fds=1,
            reply_payload="u64 status + dmabuf fd (no fd on failure)",
        ),
        _row(
            _R.SET_DEVICE_STATE_FD,
            DeviceStateTransfer.SIZE,
            _decode_device_state,
            fds=FdRule.ONE,
            reply=ReplyRule.ALWAYS,
            feature=_F.DEVICE_STATE,
            reply_fds=1,
            reply_payload="u64 (bit 8: no fd) + optional fd",
        ),
        _row(
            _R.CHECK_DEVICE_STATE,
            0,
            reply=ReplyRule.ALWAYS,
            feature=_F.DEVICE_STATE,
            reply_payload="u64",
        ),
        _row(
            _R.GET_SHMEM_CONFIG,
            0,
            reply=ReplyRule.ALWAYS,
            feature=_F.SHMEM,
            reply_payload="shared memory config",
        ),
    ]
)
"""For each front-end request: payload size bounds, decoder, fds, reply, gating feature."""

assert set(REQUESTS) == set(FrontendRequest)

STATUS_REPLIES = frozenset(
    {
        _R.SET_LOG_BASE,
        _R.IOTLB_MSG,
        _R.POSTCOPY_END,
        _R.SET_DEVICE_STATE_FD,
        _R.CHECK_DEVICE_STATE,
        _R.GET_SHARED_OBJECT,
    }
)
"""Requests whose explicit reply is a u64 status (0 = success), so a failure can be told."""


# --------------------------------------------------------------------------------------
# Encoding


def payload_bytes(payload: _Packable | bytes | bytearray | memoryview | int | None) -> bytes:
    """A payload as bytes: ``None`` -> empty, ``int`` -> u64, else ``payload.pack()``."""
    if payload is None:
        return b""
    if isinstance(payload, bytes | bytearray | memoryview):
        return bytes(payload)
    if isinstance(payload, int):
        return _U64.pack(payload)
    return payload.pack()


def encode_message(request: int, flags: int, payload: bytes = b"") -> bytes:
    """Header + payload.  ``flags`` must include the version."""
    if len(payload) > MAX_PAYLOAD_SIZE:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_SIZE}")
    return HEADER.pack(request, flags, len(payload)) + payload


def encode_request(
    request: int, payload: _Packable | bytes | int | None = None, *, need_reply: bool = False
) -> bytes:
    """A request (front-end side, or back-end side on the back-end channel)."""
    flags = VHOST_USER_VERSION | (HeaderFlags.NEED_REPLY if need_reply else 0)
    return encode_message(request, flags, payload_bytes(payload))


def encode_reply(request: int, payload: _Packable | bytes | int | None = None) -> bytes:
    """A reply to ``request``: version 1, REPLY flag set."""
    return encode_message(request, VHOST_USER_VERSION | HeaderFlags.REPLY, payload_bytes(payload))


def encode_ack(request: int, success: bool = True) -> bytes:
    """A REPLY_ACK reply: u64 0 on success, 1 on failure."""
    return encode_reply(request, 0 if success else 1)


def encode_backend_request(
    request: BackendRequest,
    payload: _Packable | bytes | int | None = None,
    *,
    need_reply: bool = False,
) -> bytes:
    """A back-end-initiated message for the back-end channel (SET_BACKEND_REQ_FD socket).

    Set ``need_reply`` only when REPLY_ACK was negotiated; the front-end then answers with
    a u64 (decode it with ``decode_backend_ack``).
    """
    return encode_request(request, payload, need_reply=need_reply)


def config_change_msg(*, need_reply: bool = False) -> bytes:
    """CONFIG_CHANGE_MSG (needs protocol feature CONFIG): the device config changed."""
    return encode_backend_request(BackendRequest.CONFIG_CHANGE_MSG, need_reply=need_reply)


def vring_call_msg(index: int, *, need_reply: bool = False) -> bytes:
    """In-band VRING_CALL (INBAND_NOTIFICATIONS): buffers were used in vring ``index``."""
    return encode_backend_request(
        BackendRequest.VRING_CALL, VringState(index, 0), need_reply=need_reply
    )


def vring_err_msg(index: int, *, need_reply: bool = False) -> bytes:
    """In-band VRING_ERR (INBAND_NOTIFICATIONS): an error occurred on vring ``index``."""
    return encode_backend_request(
        BackendRequest.VRING_ERR, VringState(index, 0), need_reply=need_reply
    )


def decode_backend_ack(data: bytes, request: BackendRequest) -> int:
    """Decode the front-end's u64 reply to a back-end ``request`` sent with NEED_REPLY.

    Returns the status (0 = success).  Raises ``InvalidMessage`` for anything else.
    """
    section = spec_section("Back-end message types", f"VHOST_USER_BACKEND_{request.name}")
    if len(data) < HEADER_SIZE:
        raise InvalidMessage("short reply header", request=request, section=section)
    header = Header.unpack(data)
    if header.version != VHOST_USER_VERSION or not header.is_reply:
        raise InvalidMessage(
            f"reply flags {header.flags:#x} lack version 1 / REPLY",
            request=request,
            section=section,
        )
    if header.request != request:
        raise InvalidMessage(
            f"reply to request {header.request}, expected {request.name}",
            request=request,
            section=section,
        )
    if header.size != 8 or len(data) != HEADER_SIZE + 8:
        raise InvalidMessage("reply payload is not a u64", request=request, section=section)
    return _U64.unpack_from(data, HEADER_SIZE)[0]
