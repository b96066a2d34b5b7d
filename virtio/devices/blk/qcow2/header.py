"""The qcow2 header and its extensions (QEMU ``docs/interop/qcow2.rst``, "Header",
"Header extensions", "Feature name table").

``Header.parse`` reads the first cluster of an image and refuses, with one clear
``Qcow2FormatError``, what we cannot serve: another magic, a version other than 2
or 3, cluster sizes outside 512 B - 2 MiB, encryption, an external data file, and
incompatible feature bits we do not know (named from the image's own feature name
table when it has one).  Every offset is checked for alignment and size limits
here, before anything is read from it.
"""

from __future__ import annotations

import contextlib
import struct
from dataclasses import dataclass, field

from virtio.devices.blk.probe import ImageFormatError

MAGIC = b"QFI\xfb"
_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
"""Bytes 0-71: magic .. snapshots_offset (every version)."""
_V3 = struct.Struct(">QQQII")
"""Bytes 72-103: incompatible/compatible/autoclear features, refcount_order, header_length."""
V2_HEADER_LENGTH = 72
V3_HEADER_LENGTH = 104

# Header field offsets we rewrite in place.
OFF_REFCOUNT_TABLE_OFFSET = 48
OFF_REFCOUNT_TABLE_CLUSTERS = 56
OFF_INCOMPATIBLE = 72
OFF_AUTOCLEAR = 88

# incompatible_features
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
)
# compatible_features
COMPAT_LAZY_REFCOUNTS = 1 << 0

# header extension types
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_NAMES = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

COMPRESSION_DEFLATE = 0
COMPRESSION_ZSTD = 1

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
"""512 B .. 2 MiB, QEMU's implementation limit."""
MAX_L1_BYTES = 32 << 20
MAX_REFCOUNT_TABLE_BYTES = 8 << 20
"""QEMU's implementation limits (qcow2.rst notes)."""
MAX_BACKING_NAME = 1023
HOST_OFFSET_LIMIT = 1 << 56


class Qcow2FormatError(ImageFormatError):
    """The image is not a qcow2 image we can serve (or its metadata is corrupt)."""


@dataclass
class Header:
    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER_LENGTH
    compression_type: int = COMPRESSION_DEFLATE
    backing_file: str | None = None
    backing_format: str | None = None
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)
    extensions: list[int] = field(default_factory=list)
    """Types of the header extensions present, in order."""

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_EXTL2)

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def dirty(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_DIRTY)

    @property
    def corrupt(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_CORRUPT)

    @property
    def lazy_refcounts(self) -> bool:
        return bool(self.compatible_features & COMPAT_LAZY_REFCOUNTS)

    @classmethod
    def parse(cls, buf: bytes, *, path: str = "", file_size: int | None = None) -> Header:
        """Parse and validate the header at the start of ``buf`` (the image's first
        cluster, or more).  Raises ``Qcow2FormatError``."""
        where = f"{path}: " if path else ""

        def bad(msg: str) -> Qcow2FormatError:
            return Qcow2FormatError(f"{where}{msg}")

        if len(buf) < V2_HEADER_LENGTH or buf[:4] != MAGIC:
            raise bad("not a qcow2 image (no 'QFI\\xfb' magic)")
        fields = _V2.unpack_from(buf, 0)
        hdr = cls(*fields[1:])
        if hdr.version not in (2, 3):
            raise bad(f"qcow2 version {hdr.version} is not supported (only 2 and 3)")
        if hdr.version == 3:
            if len(buf) < V3_HEADER_LENGTH:
                raise bad("truncated version 3 header")
            (
                hdr.incompatible_features,
                hdr.compatible_features,
                hdr.autoclear_features,
                hdr.refcount_order,
                hdr.header_length,
            ) = _V3.unpack_from(buf, V2_HEADER_LENGTH)
            if hdr.header_length < V3_HEADER_LENGTH or hdr.header_length % 8:
                raise bad(f"invalid header_length {hdr.header_length}")
            if hdr.header_length > 104:
                hdr.compression_type = buf[104]
        if not MIN_CLUSTER_BITS <= hdr.cluster_bits <= MAX_CLUSTER_BITS:
            raise bad(
                f"cluster_bits {hdr.cluster_bits} outside {MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS} "
                "(cluster sizes 512 B - 2 MiB)"
            )
        cs = hdr.cluster_size
        if hdr.header_length > cs:
            raise bad(f"header_length {hdr.header_length} exceeds the cluster size")
        hdr._check_features(bad, buf)
        if hdr.refcount_order > 6:
            raise bad(f"refcount_order {hdr.refcount_order} > 6")
        if hdr.crypt_method:
            raise bad(f"encrypted qcow2 images (crypt_method {hdr.crypt_method}) are not served")
        if hdr.extended_l2 and hdr.cluster_bits < 14:
            raise bad("extended L2 entries need clusters of at least 16 KiB")
        if hdr.compression_type not in (COMPRESSION_DEFLATE, COMPRESSION_ZSTD):
            raise bad(f"unknown compression_type {hdr.compression_type}")
        if bool(hdr.incompatible_features & INCOMPAT_COMPRESSION) != (hdr.compression_type != 0):
            raise bad("compression type bit and compression_type field disagree")
        # Tables: aligned, inside QEMU's size limits, and below the 56-bit offset limit.
        l2_entries = cs // (16 if hdr.extended_l2 else 8)
        needed_l1 = -(-hdr.size // (cs * l2_entries))
        if hdr.l1_size < needed_l1:
            raise bad(f"L1 table of {hdr.l1_size} entries is too small for {hdr.size} bytes")
        if hdr.l1_size * 8 > MAX_L1_BYTES:
            raise bad(f"L1 table of {hdr.l1_size} entries is too large")
        if hdr.refcount_table_clusters == 0 or (
            hdr.refcount_table_clusters * cs > MAX_REFCOUNT_TABLE_BYTES
        ):
            raise bad(f"invalid refcount_table_clusters {hdr.refcount_table_clusters}")
        for name in ("l1_table_offset", "refcount_table_offset"):
            off = getattr(hdr, name)
            if off == 0 or off % cs or off >= HOST_OFFSET_LIMIT:
                raise bad(f"invalid {name} {off:#x}")
            if file_size is not None and off >= file_size:
                raise bad(f"{name} {off:#x} is beyond the end of the image ({file_size})")
        if hdr.nb_snapshots and hdr.snapshots_offset % cs:
            raise bad(f"invalid snapshots_offset {hdr.snapshots_offset:#x}")
        hdr._parse_extensions(bad, buf)
        if hdr.backing_file_offset:
            end = hdr.backing_file_offset + hdr.backing_file_size
            if hdr.backing_file_size > MAX_BACKING_NAME or end > min(len(buf), cs):
                raise bad("backing file name is too long or outside the first cluster")
            raw = bytes(buf[hdr.backing_file_offset : end])
            try:
                hdr.backing_file = raw.decode()
            except UnicodeDecodeError:
                raise bad("backing file name is not UTF-8") from None
            if not hdr.backing_file or "\0" in hdr.backing_file:
                raise bad("invalid backing file name")
        return hdr

    def _check_features(self, bad, buf: bytes) -> None:
        unknown = self.incompatible_features & ~INCOMPAT_KNOWN
        if unknown:
            with contextlib.suppress(Qcow2FormatError):
                self._parse_extensions(bad, buf)
            names = []
            for bit in range(64):
                if unknown >> bit & 1:
                    names.append(self.feature_names.get((0, bit), f"bit {bit}"))
            raise bad(
                "unsupported incompatible qcow2 feature(s): "
                + ", ".join(names)
                + " (this image needs a newer implementation)"
            )
        if self.incompatible_features & INCOMPAT_DATA_FILE:
            raise bad("qcow2 images with an external data file are not served")

    def _parse_extensions(self, bad, buf: bytes) -> None:
        self.extensions = []
        pos = self.header_length
        end = min(len(buf), self.cluster_size)
        if self.backing_file_offset:
            end = min(end, self.backing_file_offset)
        seen = set()
        while True:
            if pos + 8 > end:
                raise bad("header extensions run past the first cluster")
            kind, length = struct.unpack_from(">II", buf, pos)
            if kind == EXT_END:
                return
            pos += 8
            if pos + length > end:
                raise bad(f"header extension {kind:#x} runs past the first cluster")
            data = bytes(buf[pos : pos + length])
            pos += (length + 7) & ~7
            if kind in seen:
                raise bad(f"header extension {kind:#x} appears twice")
            seen.add(kind)
            self.extensions.append(kind)
            if kind == EXT_BACKING_FORMAT:
                self.backing_format = data.decode(errors="replace")
            elif kind == EXT_FEATURE_NAMES:
                for i in range(0, len(data) - 47, 48):
                    name = data[i + 2 : i + 48].split(b"\0", 1)[0].decode(errors="replace")
                    self.feature_names[(data[i], data[i + 1])] = name
            elif kind == EXT_CRYPTO:
                raise bad("encrypted qcow2 images are not served")
            elif kind == EXT_DATA_FILE:
                raise bad("qcow2 images with an external data file are not served")
