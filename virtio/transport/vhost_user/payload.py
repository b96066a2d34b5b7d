"""How a vhost-user payload is declared: once, as a field table ("Message Specification /
Payload" of QEMU ``docs/interop/vhost-user.rst``).

A payload class is a frozen dataclass whose fields say how they are laid out on the wire::

    @payload_class("A vring state description")
    class VringState(Payload):
        index: int = u32(queue=True)
        num: int = u32()

``@payload_class`` derives from that table the ``struct`` format (native byte order, as
the spec says), ``MIN_SIZE``/``MAX_SIZE``/``SIZE``, ``pack()`` and ``unpack()``.
``unpack()`` checks the size, each field's values (``allowed``), vring indices against
``DecodeContext.max_queues``, and ``shape_error()`` (checks across fields); bad input
raises ``InvalidMessage`` (``PayloadSizeMismatch`` for a size, when the request is known).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Collection
from dataclasses import MISSING, dataclass, field, fields
from functools import partial
from itertools import starmap
from operator import attrgetter
from typing import Any, ClassVar, TypeVar, dataclass_transform

from .errors import InvalidMessage, PayloadSizeMismatch, spec_section


@dataclass(frozen=True, slots=True)
class DecodeContext:
    """What payload decoding needs to know about the connection.

    ``xen_mmap``: protocol feature XEN_MMAP negotiated (memory regions are 40 bytes, not 32).
    ``max_queues``: vring indices must be below it (``None``: not checked).
    """

    xen_mmap: bool = False
    max_queues: int | None = None


_NO_CONTEXT = DecodeContext()


@dataclass(frozen=True, slots=True)
class _Wire:
    """A row of a payload's field table: how the field appears on the wire.

    ``code``: its ``struct`` code (``I`` u32, ``Q`` u64, ``6s2x`` 6 bytes + 2 of padding).
    ``allowed``: the values the spec defines (``None``: any); an enum class also converts.
    ``convert``/``encode``: wire value -> attribute and back (``bool``, ``UUID``).
    ``queue``: a vring index, below ``DecodeContext.max_queues``.
    ``word``/``mask``: a bit field, bits ``mask`` of the u64 the spec calls ``word``.
    ``xen``: present only with protocol feature XEN_MMAP (packed when not ``None``).
    """

    code: str
    allowed: Collection[int] | None = None
    convert: Callable[[Any], Any] | None = None
    encode: Callable[[Any], Any] | None = None
    queue: bool = False
    word: str = ""
    mask: int = 0
    xen: bool = False

    @property
    def plain(self) -> bool:
        """Stored as it is on the wire, with no check."""
        return not (self.allowed or self.convert or self.encode or self.mask or self.xen)


@dataclass(frozen=True, slots=True)
class _Tail:
    """The variable end of a payload: bytes (``item`` ``None``) or nested payloads.

    ``count``: ``struct`` code of the word counting them, at position ``count_at`` among
    the fixed words (default: last); without it, exactly one item, or all bytes left.
    ``skip``: padding bytes before them.  ``most``: the largest count (or bytes) allowed.
    """

    item: type[Payload] | None = None
    count: str = ""
    count_at: int | None = None
    skip: int = 0
    most: int | None = None


def raw(code: str, default: Any = MISSING, **wire: Any) -> Any:
    """A field of ``struct`` code ``code``; ``wire``: the other ``_Wire`` columns."""
    allowed = wire.get("allowed")
    if isinstance(allowed, type) and issubclass(allowed, enum.Enum):
        wire.update(allowed=tuple(allowed), convert=allowed)
    return field(default=default, metadata={"wire": _Wire(code, **wire)})


u8, u16, u32, u64 = (partial(raw, code) for code in "BHIQ")


def bits(word: str, mask: int, default: Any = MISSING, **wire: Any) -> Any:
    """Bits ``mask`` of the u64 the spec calls ``word``, shared with the fields naming it."""
    return raw("Q", default, word=word, mask=mask, **wire)


def tail(item: type[Payload] | None = None, **columns: Any) -> Any:
    """The variable end: ``item`` payloads (``None``: bytes); ``columns``: see ``_Tail``."""
    return field(metadata={"wire": _Tail(item, **columns)})


def describe(allowed: Collection[int]) -> str:
    """``range(4)`` -> ``"0..3"``; enum members -> ``"2 (UPDATE), 3 (INVALIDATE)"``."""
    if isinstance(allowed, range):
        return f"{allowed.start}..{allowed.stop - 1}"
    return ", ".join(f"{v} ({v.name})" if isinstance(v, enum.Enum) else str(v) for v in allowed)


class _Word:
    """A word of a payload's fixed part: one field, bit fields sharing it, or the count
    of the tail ``count_of``."""

    def __init__(self, code: str, xen: bool = False, count_of: str = "") -> None:
        self.code, self.xen, self.count_of, self.mask = code, xen, count_of, 0
        self.fields: list[tuple[str, _Wire, int]] = []  # name, row, shift of its bits

    def add(self, name: str, wire: _Wire) -> None:
        self.fields.append((name, wire, (wire.mask & -wire.mask).bit_length() - 1))
        self.mask |= wire.mask

    @property
    def plain(self) -> bool:
        return len(self.fields) == 1 and self.fields[0][1].plain

    def get(self, obj: Any) -> Any:
        """This word's wire value for ``obj``."""
        if self.count_of:
            return len(getattr(obj, self.count_of))
        if not self.mask:
            name, wire, _ = self.fields[0]
            value = getattr(obj, name)
            if wire.encode is not None:
                return wire.encode(value)
            return 0 if value is None and wire.xen else value
        word = 0
        for name, wire, shift in self.fields:
            value = int(getattr(obj, name)) << shift
            if value & ~wire.mask:
                raise struct.error(f"{name} {value >> shift} does not fit in bits {wire.mask:#x}")
            word |= value
        return word

    def put(self, value: int, into: dict[str, Any], fail: Callable[[str], Exception]) -> None:
        """Checks the wire ``value`` and stores the fields it holds ``into`` kwargs."""
        if self.mask and value & ~self.mask:
            names = "/".join(name for name, _, _ in self.fields)
            raise fail(f"{self.fields[0][1].word} {value:#x} has bits set beyond {names}")
        for name, wire, shift in self.fields:
            v = (value & wire.mask) >> shift if self.mask else value
            if wire.allowed is not None and v not in wire.allowed:
                raise fail(f"{name} {v} not in {describe(wire.allowed)}")
            into[name] = v if wire.convert is None else wire.convert(v)


class _Layout:
    """The fixed part of a payload (with or without the XEN_MMAP fields)."""

    def __init__(self, words: list[_Word], end: int, field_names: list[str] | None) -> None:
        self.words = words
        self.struct = struct.Struct("=" + "".join(w.code for w in words) + "x" * end)
        # The fast path: every word one plain field, in the dataclass's field order (the
        # fields left have defaults); not for a payload with a tail (``field_names`` None).
        names = [w.fields[0][0] for w in words if w.plain]
        plain = field_names is not None and len(names) == len(words)
        self.plain = plain and names == field_names[: len(names)]  # type: ignore[index]
        self.get = attrgetter(*names) if self.plain and len(names) > 1 else None

    def pack(self, obj: Any) -> bytes:
        if self.get is not None:
            return self.struct.pack(*self.get(obj))
        return self.struct.pack(*[word.get(obj) for word in self.words])


class _Codec:
    """``pack``/``unpack`` of one payload class, derived from its field table.

    ``c_padding``: bytes of C padding QEMU sends after the spec's fields (the ``sizeof``
    of its struct): sent as zeros, accepted with or without.
    """

    def __init__(self, cls: type[Payload], section: str, c_padding: int) -> None:
        self.cls, self.section, self.c_padding = cls, section, c_padding
        self.tail_name, self.tail = "", _Tail()
        named: dict[str, _Word] = {}
        words: list[_Word] = []
        for f in fields(cls):  # type: ignore[arg-type]
            wire = f.metadata["wire"]
            if isinstance(wire, _Tail):
                self.tail_name, self.tail = f.name, wire
                continue
            key = wire.word or f.name
            if key not in named:
                named[key] = _Word(wire.code, wire.xen)
                words.append(named[key])
            named[key].add(f.name, wire)
        if self.tail.count:
            at = len(words) if self.tail.count_at is None else self.tail.count_at
            words.insert(at, _Word(self.tail.count, count_of=self.tail_name))
        self.queue_fields = [name for w in words for name, wire, _ in w.fields if wire.queue]
        self.xen_field = next((w.fields[0][0] for w in words if w.xen), "")
        end = self.tail.skip + c_padding
        names = None if self.tail_name else [f.name for f in fields(cls)]  # type: ignore[arg-type]
        self.base = _Layout([w for w in words if not w.xen], end, names)
        self.full = _Layout(words, end, names) if self.xen_field else self.base
        cls.SECTION, cls.STRUCT = section, self.base.struct
        cls.MIN_SIZE = self.base.struct.size - c_padding
        cls.MAX_SIZE = self.full.struct.size
        if self.tail.item is not None:
            cls.MIN_SIZE += 0 if self.tail.count else self.tail.item.MIN_SIZE
            cls.MAX_SIZE += (self.tail.most or 1) * self.tail.item.MAX_SIZE
        elif self.tail_name:
            cls.MAX_SIZE += self.tail.most or 0
        elif not self.xen_field:
            cls.SIZE = cls.MAX_SIZE

    def pack(self, obj: Payload) -> bytes:
        xen = self.xen_field and getattr(obj, self.xen_field) is not None
        head = (self.full if xen else self.base).pack(obj)
        if not self.tail_name:
            return head
        value = getattr(obj, self.tail_name)
        if self.tail.item is None:
            return head + value
        return head + b"".join(map(self.tail.item.pack, value if self.tail.count else [value]))

    def fast_pack(self) -> Callable[[Any], bytes] | None:
        """A ``pack`` for the class without the layers of ``pack``, if it is plain."""
        if self.tail_name or self.base.get is None:
            return None
        pack, get, xen, slow = self.base.struct.pack, self.base.get, self.xen_field, self.pack
        if not xen:
            return lambda obj: pack(*get(obj))
        return lambda obj: pack(*get(obj)) if getattr(obj, xen) is None else slow(obj)

    def unpack(self, data: Any, ctx: DecodeContext, request: int | None, shape: bool = True) -> Any:
        layout = self.full if ctx.xen_mmap else self.base
        size = layout.struct.size
        if len(data) != size and not (self.tail_name and len(data) > size):
            if self.tail_name or not self.c_padding or len(data) != size - self.c_padding:
                expected = f"{size - self.c_padding} or {size}" if self.c_padding else str(size)
                expected = f"at least {size}" if self.tail_name else expected
                raise self.size_error(request, len(data), expected)
            data = bytes(data).ljust(size, b"\0")
        if layout.plain:
            obj = self.cls(*layout.struct.unpack_from(data))
        else:
            kwargs: dict[str, Any] = {}
            count = None
            fail = partial(self.invalid, request)
            for word, value in zip(layout.words, layout.struct.unpack_from(data), strict=True):
                if word.count_of:
                    count = value
                else:
                    word.put(value, kwargs, fail)
            if self.tail_name:
                kwargs[self.tail_name] = self.unpack_tail(data[size:], size, count, ctx, request)
            obj = self.cls(**kwargs)
        for name in self.queue_fields:
            if ctx.max_queues is not None and getattr(obj, name) >= ctx.max_queues:
                what = f"vring index {getattr(obj, name)} out of range"
                raise self.invalid(request, f"{what} (the device has {ctx.max_queues})")
        if shape and (problem := obj.shape_error()) is not None:
            raise self.invalid(request, problem)
        return obj

    def unpack_tail(
        self, rest: Any, size: int, count: int | None, ctx: DecodeContext, request: int | None
    ) -> Any:
        tail = self.tail
        n = count if count is not None else len(rest) if tail.item is None else 1
        if tail.most is not None and n > tail.most:
            what = self.tail_name if tail.item else "bytes"
            raise self.invalid(request, f"{n} {what}, at most {tail.most}")
        if tail.item is None:
            if len(rest) != n:
                raise self.size_error(request, size + len(rest), f"{size} + {n}")
            return bytes(rest)
        codec = tail.item._codec
        step = (codec.full if ctx.xen_mmap else codec.base).struct.size
        if len(rest) != step * n:
            raise self.size_error(request, size + len(rest), f"{size} + {step} * {n}")
        if count is None:
            return codec.unpack(rest, ctx, request, shape=False)
        layout = codec.full if ctx.xen_mmap else codec.base
        if layout.plain and not codec.queue_fields:
            return tuple(starmap(codec.cls, layout.struct.iter_unpack(rest)))
        chunks = (rest[i * step : (i + 1) * step] for i in range(count))
        return tuple(codec.unpack(chunk, ctx, request, shape=False) for chunk in chunks)

    def invalid(self, request: int | None, what: str) -> InvalidMessage:
        label = getattr(request, "name", self.cls.__name__)
        section = getattr(request, "section", self.section)
        return InvalidMessage(f"{label}: {what}", request=request, section=section)

    def size_error(self, request: int | None, size: int, expected: str) -> InvalidMessage:
        """A ``PayloadSizeMismatch`` (which needs the request), else an ``InvalidMessage``."""
        if request is None:
            return self.invalid(None, f"payload of {size} bytes, expected {expected}")
        section = getattr(request, "section", self.section)
        return PayloadSizeMismatch(request, size, expected, section=section)


_PayloadT = TypeVar("_PayloadT", bound="Payload")


class Payload:
    """Base of the payload classes: ``pack()`` and ``unpack()`` come from the field table.

    ``MIN_SIZE``/``MAX_SIZE`` bound the wire size; ``SIZE`` is that of a fixed-size
    payload (as QEMU sends it); ``STRUCT`` packs the fixed part (without XEN_MMAP fields);
    ``SECTION`` is where the spec defines the layout.
    """

    __slots__ = ()
    STRUCT: ClassVar[struct.Struct]
    SIZE: ClassVar[int]
    MIN_SIZE: ClassVar[int]
    MAX_SIZE: ClassVar[int]
    SECTION: ClassVar[str]
    _codec: ClassVar[_Codec]

    def pack(self) -> bytes:
        return self._codec.pack(self)

    @classmethod
    def unpack(
        cls: type[_PayloadT],
        data: bytes | bytearray | memoryview,
        ctx: DecodeContext | None = None,
        *,
        request: int | None = None,
    ) -> _PayloadT:
        """Decode exactly one payload.  Raises ``InvalidMessage`` on bad input: with
        ``request`` given, a wrong size is a ``PayloadSizeMismatch`` citing it."""
        return cls._codec.unpack(data, ctx or _NO_CONTEXT, request)  # type: ignore[no-any-return]

    def shape_error(self) -> str | None:
        """What is wrong across fields, beyond each field's range (``None``: nothing)."""
        return None


@dataclass_transform(frozen_default=True, field_specifiers=(raw, bits, tail))
def payload_class(
    title: str = "", *, section: str | None = None, c_padding: int = 0
) -> Callable[[type[_PayloadT]], type[_PayloadT]]:
    """Makes a frozen dataclass of a ``Payload`` subclass, with the codec of its field
    table.  ``title``: the spec's name of the layout, under "Message Specification /
    Payload" unless ``section`` says otherwise."""

    def build(cls: type[_PayloadT]) -> type[_PayloadT]:
        cls = dataclass(frozen=True, slots=True)(cls)
        where = spec_section("Message Specification", "Payload", *[title] if title else [])
        cls._codec = _Codec(cls, section or where, c_padding)
        if (fast := cls._codec.fast_pack()) is not None:
            cls.pack = fast  # type: ignore[method-assign]
        return cls

    return build
