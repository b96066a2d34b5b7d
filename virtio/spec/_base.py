"""Building blocks of the machine-readable spec: sections and spec-cited enums."""

from __future__ import annotations

import enum
from typing import NamedTuple

SPEC_VERSION = "1.4"
"""The spec this package is transcribed from: OASIS virtio 1.4 CS01."""


class Section(NamedTuple):
    """A place in the spec: ``number`` (e.g. ``"2.7.5"``), its ``title``, and optionally
    the normative ``label`` (``devicenormative:...``/``drivernormative:...``)."""

    number: str
    title: str
    label: str = ""
    version: str = SPEC_VERSION

    def __str__(self) -> str:
        text = f"virtio {self.version} §{self.number} {self.title}"
        return f"{text} [{self.label}]" if self.label else text

    @property
    def normative(self) -> bool:
        """Whether this is a normative (requirements) section, i.e. carries a label."""
        return bool(self.label)

    @property
    def citation(self) -> str:
        """How an error names the clause broken: ``"2.7.5.2 [drivernormative:...]"``
        for a normative section, the bare number for an informative one."""
        return f"{self.number} [{self.label}]" if self.label else self.number


class SpecIntEnum(enum.IntEnum):
    """An ``IntEnum`` whose members carry the ``section`` that defines them.

    Members are written ``NAME = value, SECTION``.
    """

    section: Section

    def __new__(cls, value: int, section: Section) -> SpecIntEnum:
        obj = int.__new__(cls, value)
        obj._value_ = value
        obj.section = section
        return obj


class SpecIntFlag(enum.IntFlag):
    """An ``IntFlag`` whose named members carry the ``section`` that defines them.

    Members are written ``NAME = value, SECTION``; combinations have no section.
    """

    section: Section

    def __new__(cls, value: int, section: Section | None = None) -> SpecIntFlag:
        obj = int.__new__(cls, value)
        obj._value_ = value
        if section is not None:
            obj.section = section
        return obj


class FeatureBit(SpecIntEnum):
    """Base of feature-bit enums: the *value* is the bit number, ``mask`` is ``1 << bit``."""

    @property
    def mask(self) -> int:
        return 1 << int(self)
