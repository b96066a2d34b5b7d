"""vhost-user wire format: header, request numbers, payloads, and the per-request table.

Everything here is transcribed from the vhost-user specification, QEMU
``docs/interop/vhost-user.rst`` (sections "Message Specification", "Communication",
"Protocol features", "Front-end message types", "Back-end message types",
"VHOST_USER_PROTOCOL_F_REPLY_ACK").  There is no I/O here; ``protocol.py`` drives it.

All numbers are in the machine's native byte order ("Message Specification").  Each
payload is declared once, as a frozen dataclass whose fields are the spec's field table
(``u32()``, ``u64()``, bit fields of a word, a counted tail; see ``payload.py``): its
``struct`` format, sizes, ``pack()`` and ``unpack()`` (size-checked, with the spec's value
ranges) come from there, and so do the size bounds and decoders of ``REQUESTS``.

Size limit: the spec sets none.  The largest payload QEMU sends is a crypto session
(about 600 bytes); a memory table is 8 + 8 * 40 bytes, a config access 12 + 256.  We accept
payloads up to ``MAX_PAYLOAD_SIZE = 0x1000`` bytes (the limit rust-vmm's vhost crate uses);
a larger ``size`` in a header kills the connection (``OversizedMessage``).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection
from dataclasses import dataclass
from functools import partial
from operator import attrgetter
from typing import Any, NamedTuple
from uuid import UUID

from .errors import InvalidMessage, request_section, spec_section
from .payload import (
    DecodeContext,
    Payload,
    bits,
    describe,
    payload_class,
    raw,
    tail,
    u8,
    u16,
    u32,
    u64,
)

MAX_PAYLOAD_SIZE = 0x1000
"""Largest payload we accept (our choice; see the module docstring)."""

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


class IotlbType(enum.IntEnum):
    MISS = 1
    UPDATE = 2
    INVALIDATE = 3
    ACCESS_FAIL = 4


class ConfigFlags(enum.IntEnum):
    """``flags`` of a config space access."""

    WRITABLE = 0
    """Front-end message for writable fields."""
    MIGRATION = 1
    """Front-end message for live migration (may write read-only fields)."""


class TransferDirection(enum.IntEnum):
    SAVE = 0
    """Back-end to front-end (migration source)."""
    LOAD = 1
    """Front-end to back-end (migration destination)."""


class MigrationPhase(enum.IntEnum):
    STOPPED = 0


# --------------------------------------------------------------------------------------
# Payloads ("Message Specification / Payload"), each declared once: see ``payload.py``


@payload_class("Header", section=spec_section("Message Specification", "Header"))
class Header(Payload):
    """A message header: ``request``, ``flags``, ``size`` of the payload (u32 each)."""

    request: int = u32()
    flags: int = u32()
    size: int = u32()

    @property
    def version(self) -> int:
        return self.flags & HeaderFlags.VERSION_MASK

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & HeaderFlags.REPLY)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & HeaderFlags.NEED_REPLY)


HEADER = Header.STRUCT
"""``struct`` of the header: request (u32), flags (u32), size (u32) of the payload."""
HEADER_SIZE = HEADER.size  # 12
MAX_MESSAGE_SIZE = HEADER_SIZE + MAX_PAYLOAD_SIZE


@payload_class("A single 64-bit integer")
class U64(Payload):
    """A single 64-bit integer (features, status, MTU, acks, ...)."""

    value: int = u64()


@payload_class("A single 64-bit integer")
class Status(U64):
    """A u64 status reply: 0 is success (for SET_DEVICE_STATE_FD, bits 0-7; bit 8 set:
    no fd)."""


@payload_class()
class Empty(Payload):
    """No payload (a reply that carries only fds, e.g. POSTCOPY_ADVISE's)."""


@payload_class("A vring state description")
class VringState(Payload):
    """A vring state description: ``index`` and ``num`` (u32 each).

    For SET/GET_VRING_BASE ``num`` holds the descriptor index/indices; see
    ``split_next_avail`` and ``packed_indices``.
    """

    index: int = u32(queue=True)
    num: int = u32()

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


@payload_class("A vring address description")
class VringAddr(Payload):
    """A vring address description (user addresses, or IOVAs with VIRTIO_F_IOMMU_PLATFORM)."""

    index: int = u32(queue=True)
    flags: int = u32()
    descriptor: int = u64()
    used: int = u64()
    available: int = u64()
    log: int = u64()

    @property
    def log_used(self) -> bool:
        """``VHOST_VRING_F_LOG``: writes to the used ring are logged at ``log``."""
        return bool(self.flags & (1 << VHOST_VRING_F_LOG))


@payload_class("A single 64-bit integer")
class VringFd(Payload):
    """Payload of SET_VRING_KICK / CALL / ERR: a u64 with the vring index in bits 0-7 and
    bit 8 "no fd"; the other bits must be 0."""

    index: int = bits("u64", VHOST_USER_VRING_IDX_MASK, queue=True)
    no_fd: bool = bits("u64", VHOST_USER_VRING_NOFD_MASK, False, convert=bool)


@payload_class("Memory region description")
class MemoryRegion(Payload):
    """A memory region description.  ``xen_mmap_flags`` and ``domid`` are present (not
    ``None``) only when XEN_MMAP is negotiated; the region is then 40 bytes, else 32."""

    guest_address: int = u64()
    size: int = u64()
    user_address: int = u64()
    mmap_offset: int = u64()
    xen_mmap_flags: int | None = u32(None, xen=True)
    domid: int | None = u32(None, xen=True)

    @classmethod
    def wire_size(cls, xen_mmap: bool) -> int:
        return cls.MAX_SIZE if xen_mmap else cls.MIN_SIZE

    def shape_error(self) -> str | None:
        """Range checks that need no knowledge of guest memory: non-empty, no 64-bit wrap."""
        if self.size == 0:
            return "memory region of size 0"
        for name, base in (
            ("guest address", self.guest_address),
            ("user address", self.user_address),
            ("mmap offset", self.mmap_offset),
        ):
            if base + self.size > 1 << 64:
                return f"memory region {name} {base:#x} + size {self.size:#x} wraps around"
        return None


@payload_class("Multiple Memory regions description")
class MemoryTable(Payload):
    """Multiple memory regions description (SET_MEM_TABLE): ``num regions`` (u32),
    padding (u32), then exactly ``num regions`` regions (QEMU sends no unused slots)."""

    regions: tuple[MemoryRegion, ...] = tail(
        MemoryRegion, count="I", skip=4, most=VHOST_MEMORY_BASELINE_NREGIONS
    )

    @property
    def num_regions(self) -> int:
        return len(self.regions)

    def shape_error(self) -> str | None:
        for i, region in enumerate(self.regions):
            if (problem := region.shape_error()) is not None:
                return f"region {i}: {problem}"
        return None


@payload_class("Single memory region description")
class SingleMemoryRegion(Payload):
    """Single memory region description (ADD_MEM_REG / REM_MEM_REG): padding u64 + region."""

    region: MemoryRegion = tail(MemoryRegion, skip=8)

    def shape_error(self) -> str | None:
        return self.region.shape_error()


@payload_class("Log description")
class LogDescription(Payload):
    """Log description (SET_LOG_BASE): size and offset of the dirty log in the fd."""

    mmap_size: int = u64()
    mmap_offset: int = u64()


@payload_class("An IOTLB message", c_padding=6)
class IotlbMessage(Payload):
    """An IOTLB message (``struct vhost_iotlb_msg``: 26 bytes of fields, 32 with the
    C padding QEMU sends).  ``permissions``: 0 none, 1 read, 2 write, 3 read/write."""

    iova: int = u64()
    size: int = u64()
    user_address: int = u64()
    permissions: int = u8(allowed=range(4))
    type: int = u8(allowed=IotlbType)


@payload_class("Virtio device config space")
class ConfigSpace(Payload):
    """Virtio device config space access: ``offset``, ``flags`` and ``data`` (``size`` bytes;
    zeros in a GET_CONFIG request).  On the wire: offset, size, flags (u32 each), data."""

    offset: int = u32()
    flags: int = u32(allowed=ConfigFlags)
    data: bytes = tail(count="I", count_at=1, most=VHOST_USER_MAX_CONFIG_SIZE)

    @property
    def size(self) -> int:
        return len(self.data)

    def shape_error(self) -> str | None:
        if self.offset + self.size > 1 << 32:
            return f"config access at {self.offset:#x} + {self.size} wraps around"
        return None


CONFIG_HEADER_SIZE = ConfigSpace.MIN_SIZE  # 12


@payload_class("Vring area description")
class VringArea(Payload):
    """Vring area description (back-end VRING_HOST_NOTIFIER_MSG): index (bits 0-7) and
    flags (bit 8: no fd) in ``u64``, then the mmap ``size`` and ``offset`` in the fd."""

    index: int = bits("u64", VHOST_USER_VRING_IDX_MASK, queue=True)
    size: int = u64()
    offset: int = u64()
    no_fd: bool = bits("u64", VHOST_USER_VRING_NOFD_MASK, False, convert=bool)


@payload_class("Inflight description", c_padding=4)
class InflightDescription(Payload):
    """Inflight description (GET/SET_INFLIGHT_FD).  QEMU sends ``sizeof(VhostUserInflight)``:
    20 bytes of fields plus 4 of C padding."""

    mmap_size: int = u64()
    mmap_offset: int = u64()
    num_queues: int = u16()
    queue_size: int = u16()


INFLIGHT_WIRE_SIZE = InflightDescription.SIZE  # 24


@payload_class("VhostUserShared")
class SharedObject(Payload):
    """VhostUserShared: a 16-byte UUID in RFC 4122 byte order (first three fields big
    endian), i.e. ``uuid.UUID(bytes=...)``."""

    uuid: UUID = raw("16s", convert=lambda b: UUID(bytes=b), encode=attrgetter("bytes"))


@payload_class("Device state transfer parameters")
class DeviceStateTransfer(Payload):
    """Device state transfer parameters (SET_DEVICE_STATE_FD)."""

    direction: TransferDirection = u32(allowed=TransferDirection)
    phase: MigrationPhase = u32(allowed=MigrationPhase)


@payload_class("A single 64-bit integer")
class MacAddress(Payload):
    """SEND_RARP: a u64 whose first 6 bytes are the guest's MAC address."""

    mac: bytes = raw("6s2x")


@payload_class()
class Opaque(Payload):
    """A payload this module does not interpret (CREATE_CRYPTO_SESSION: QEMU's
    ``VhostUserCryptoSession``, specific to the crypto device)."""

    data: bytes = tail(most=MAX_PAYLOAD_SIZE)


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


class Limit(NamedTuple):
    """A range one request puts on a payload field, beyond the payload's own ranges."""

    field: str
    allowed: Collection[int]
    what: str
    """How the error message names the field."""


Decoder = Callable[[FrontendRequest, bytes, DecodeContext], Payload]


def _decode(
    payload: type[Payload],
    limits: tuple[Limit, ...],
    request: FrontendRequest,
    data: bytes,
    ctx: DecodeContext,
) -> Payload:
    value = payload.unpack(data, ctx, request=request)
    for name, allowed, what in limits:
        if (v := getattr(value, name)) not in allowed:
            raise InvalidMessage(
                f"{request.name}: {what} {v} not in {describe(allowed)}",
                request=request,
                section=request.section,
            )
    return value


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """One row of ``REQUESTS``.

    ``payload``: the request's payload class (``None``: none); ``min_size``/``max_size``
    bound its size (the class's bounds unless the row says otherwise), and ``decode``
    checks its exact shape and the row's ``limits``.
    ``feature``: the protocol feature that must be negotiated (SET_PROTOCOL_FEATURES).
    ``needs_protocol_features``: legal only if our GET_FEATURES reply offered
    ``VHOST_USER_F_PROTOCOL_FEATURES`` (implied by any ``feature``).
    ``reply_payload``: the payload class of the explicit reply (``Status``: a u64 status,
    so a failure can be told); ``reply_fds``: most fds the back-end's reply may carry.
    """

    request: FrontendRequest
    min_size: int
    max_size: int
    decode: Decoder | None
    payload: type[Payload] | None = None
    limits: tuple[Limit, ...] = ()
    fds: FdRule = FdRule.NONE
    reply: ReplyRule = ReplyRule.NONE
    feature: ProtocolFeature | None = None
    needs_protocol_features: bool = False
    reply_payload: type[Payload] | None = None
    reply_fds: int = 0

    @property
    def section(self) -> str:
        return self.request.section

    @property
    def expected_size(self) -> str:
        if self.min_size == self.max_size:
            return str(self.min_size)
        return f"{self.min_size}..{self.max_size}"


def _row(
    request: FrontendRequest,
    payload: type[Payload] | None = None,
    feature: ProtocolFeature | None = None,
    *,
    size: tuple[int, int] | None = None,
    limits: tuple[Limit, ...] = (),
    reply: type[Payload] | None = None,
    postcopy_reply: type[Payload] | None = None,
    **kwargs: Any,
) -> tuple[FrontendRequest, RequestSpec]:
    """A row; ``reply``: the payload of an explicit reply, ``postcopy_reply``: of the
    reply in postcopy mode."""
    lo, hi = size or ((payload.MIN_SIZE, payload.MAX_SIZE) if payload else (0, 0))
    decode = partial(_decode, payload, limits) if payload else None
    rule = ReplyRule.ALWAYS if reply else ReplyRule.POSTCOPY if postcopy_reply else ReplyRule.NONE
    spec = RequestSpec(
        request, lo, hi, decode, payload, limits, reply=rule, feature=feature,
        reply_payload=reply or postcopy_reply, **kwargs,
    )  # fmt: skip
    return request, spec


_R = FrontendRequest
_F = ProtocolFeature
_ONE, _VRING = FdRule.ONE, FdRule.VRING
_PF = {"needs_protocol_features": True}
_QUEUE_SIZE = Limit("num", range(1, MAX_QUEUE_SIZE + 1), "queue size")
_ENABLE = Limit("num", range(2), "enable")
_ENDIANNESS = Limit("num", range(2), "endianness (0 little, 1 big)")
_IOTLB_TYPE = Limit("type", (IotlbType.UPDATE, IotlbType.INVALIDATE), "message type")

# fmt: off
REQUESTS: dict[FrontendRequest, RequestSpec] = dict([
    #    request                   payload             gating feature
    _row(_R.GET_FEATURES,          reply=U64),
    _row(_R.SET_FEATURES,          U64),
    _row(_R.SET_OWNER),
    _row(_R.RESET_OWNER),
    _row(_R.SET_MEM_TABLE,         MemoryTable,        fds=FdRule.PER_REGION,
         postcopy_reply=MemoryTable),
    # The spec's table says u64, but QEMU sends the 16-byte log description.
    _row(_R.SET_LOG_BASE,          LogDescription,     _F.LOG_SHMFD, fds=_ONE, reply=Status),
    _row(_R.SET_LOG_FD,            fds=_ONE),
    _row(_R.SET_VRING_NUM,         VringState,         limits=(_QUEUE_SIZE,)),
    _row(_R.SET_VRING_ADDR,        VringAddr),
    _row(_R.SET_VRING_BASE,        VringState),
    _row(_R.GET_VRING_BASE,        VringState,         reply=VringState),
    _row(_R.SET_VRING_KICK,        VringFd,            fds=_VRING),
    _row(_R.SET_VRING_CALL,        VringFd,            fds=_VRING),
    _row(_R.SET_VRING_ERR,         VringFd,            fds=_VRING),
    _row(_R.GET_PROTOCOL_FEATURES, reply=U64,          **_PF),
    _row(_R.SET_PROTOCOL_FEATURES, U64,                **_PF),
    _row(_R.GET_QUEUE_NUM,         None,               _F.MQ, reply=U64),
    _row(_R.SET_VRING_ENABLE,      VringState,         limits=(_ENABLE,), **_PF),
    _row(_R.SEND_RARP,             MacAddress,         _F.RARP),
    _row(_R.NET_SET_MTU,           U64,                _F.MTU),
    _row(_R.SET_BACKEND_REQ_FD,    None,               _F.BACKEND_REQ, fds=_ONE),
    # Gated by VIRTIO_F_IOMMU_PLATFORM (a device feature), not by a protocol feature.
    _row(_R.IOTLB_MSG,             IotlbMessage,       limits=(_IOTLB_TYPE,), reply=Status),
    _row(_R.SET_VRING_ENDIAN,      VringState,         _F.CROSS_ENDIAN, limits=(_ENDIANNESS,)),
    _row(_R.GET_CONFIG,            ConfigSpace,        _F.CONFIG, reply=ConfigSpace),
    _row(_R.SET_CONFIG,            ConfigSpace,        _F.CONFIG),
    # The session is QEMU's VhostUserCryptoSession, specific to the crypto device.
    _row(_R.CREATE_CRYPTO_SESSION, Opaque,             _F.CRYPTO_SESSION,
         size=(8, MAX_PAYLOAD_SIZE), reply=Opaque),
    _row(_R.CLOSE_CRYPTO_SESSION,  U64,                _F.CRYPTO_SESSION),
    # The reply carries the userfault fd (QEMU checks its size is 0).
    _row(_R.POSTCOPY_ADVISE,       None,               _F.PAGEFAULT, reply=Empty, reply_fds=1),
    _row(_R.POSTCOPY_LISTEN,       None,               _F.PAGEFAULT),
    _row(_R.POSTCOPY_END,          None,               _F.PAGEFAULT, reply=Status),
    _row(_R.GET_INFLIGHT_FD,       InflightDescription, _F.INFLIGHT_SHMFD,
         reply=InflightDescription, reply_fds=1),
    _row(_R.SET_INFLIGHT_FD,       InflightDescription, _F.INFLIGHT_SHMFD, fds=_ONE),
    _row(_R.GPU_SET_SOCKET,        fds=_ONE),
    _row(_R.RESET_DEVICE,          None,               _F.RESET_DEVICE),
    _row(_R.VRING_KICK,            VringState,         _F.INBAND_NOTIFICATIONS),
    _row(_R.GET_MAX_MEM_SLOTS,     None,               _F.CONFIGURE_MEM_SLOTS, reply=U64),
    _row(_R.ADD_MEM_REG,           SingleMemoryRegion, _F.CONFIGURE_MEM_SLOTS, fds=_ONE,
         postcopy_reply=SingleMemoryRegion),
    # The spec's table lists a reply payload, but the text and QEMU only ack it.
    _row(_R.REM_MEM_REG,           SingleMemoryRegion, _F.CONFIGURE_MEM_SLOTS,
         fds=FdRule.TOLERATED_ONE),
    _row(_R.SET_STATUS,            U64,                _F.STATUS),
    _row(_R.GET_STATUS,            None,               _F.STATUS, reply=U64),
    # The reply's dmabuf fd is missing on failure.
    _row(_R.GET_SHARED_OBJECT,     SharedObject,       _F.SHARED_OBJECT, reply=Status,
         reply_fds=1),
    _row(_R.SET_DEVICE_STATE_FD,   DeviceStateTransfer, _F.DEVICE_STATE, fds=_ONE,
         reply=Status, reply_fds=1),
    _row(_R.CHECK_DEVICE_STATE,    None,               _F.DEVICE_STATE, reply=Status),
    # The reply is a "VIRTIO Shared Memory Region configuration", not decoded here.
    _row(_R.GET_SHMEM_CONFIG,      None,               _F.SHMEM, reply=Opaque),
])
# fmt: on
"""For each front-end request: payload, size bounds, decoder, fds, reply, gating feature."""

assert set(REQUESTS) == set(FrontendRequest)

STATUS_REPLIES = frozenset(r for r, spec in REQUESTS.items() if spec.reply_payload is Status)
"""Requests whose explicit reply is a u64 status (0 = success), so a failure can be told."""


# --------------------------------------------------------------------------------------
# Encoding


def payload_bytes(payload: Payload | bytes | bytearray | memoryview | int | None) -> bytes:
    """A payload as bytes: ``None`` -> empty, ``int`` -> u64, else ``payload.pack()``."""
    if payload is None:
        return b""
    if isinstance(payload, bytes | bytearray | memoryview):
        return bytes(payload)
    if isinstance(payload, int):
        return U64(payload).pack()
    return payload.pack()


def encode_message(request: int, flags: int, payload: bytes = b"") -> bytes:
    """Header + payload.  ``flags`` must include the version."""
    if len(payload) > MAX_PAYLOAD_SIZE:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_SIZE}")
    return HEADER.pack(request, flags, len(payload)) + payload


def encode_request(
    request: int, payload: Payload | bytes | int | None = None, *, need_reply: bool = False
) -> bytes:
    """A request (front-end side, or back-end side on the back-end channel)."""
    flags = VHOST_USER_VERSION | (HeaderFlags.NEED_REPLY if need_reply else 0)
    return encode_message(request, flags, payload_bytes(payload))


def encode_reply(request: int, payload: Payload | bytes | int | None = None) -> bytes:
    """A reply to ``request``: version 1, REPLY flag set."""
    return encode_message(request, VHOST_USER_VERSION | HeaderFlags.REPLY, payload_bytes(payload))


def encode_ack(request: int, success: bool = True) -> bytes:
    """A REPLY_ACK reply: u64 0 on success, 1 on failure."""
    return encode_reply(request, 0 if success else 1)


def encode_backend_request(
    request: BackendRequest,
    payload: Payload | bytes | int | None = None,
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
    header = Header.unpack(data[:HEADER_SIZE])
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
    if header.size != U64.SIZE or len(data) != HEADER_SIZE + U64.SIZE:
        raise InvalidMessage("reply payload is not a u64", request=request, section=section)
    return U64.unpack(data[HEADER_SIZE:]).value
