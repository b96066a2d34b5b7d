"""Parse the statistics line ``virtio serve blk`` prints on SIGUSR1 (and at exit).

The line is ``virtio serve blk: statistics: KEY=VALUE ...``; a value is a plain token
(``in_flight=0``, ``vring_requests=191,155``) or a bracketed group of ``KEY=VALUE``
entries (``dataplane0=[avail_idx=354 next_avail=321 ... call_fd=12]``), which
becomes a nested dict::

    stats = parse_statistics(line)
    stats["in_flight"]                 # "0"
    stats["dataplane0"]["next_avail"]  # "321"
    counter(stats, "in_flight")        # 0
"""

from __future__ import annotations

import re

__all__ = ["Statistics", "counter", "parse_statistics"]

Statistics = dict[str, "str | dict[str, str]"]

MARKER = "statistics:"
_ENTRY = re.compile(r"\s*(\w+)=(?:\[([^\[\]]*)\]|([^\s\[\]]*))")


def _entries(text: str, line: str) -> dict[str, str | dict[str, str]]:
    out: dict[str, str | dict[str, str]] = {}
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        m = _ENTRY.match(text, pos)
        if m is None:
            raise ValueError(f"unparsable statistics at {text[pos : pos + 40]!r} in {line!r}")
        key, group, plain = m.groups()
        if key in out:
            raise ValueError(f"statistics entry {key!r} twice in {line!r}")
        # a group holds plain entries only: the pattern admits no bracket inside one
        out[key] = _entries(group, line) if group is not None else plain  # type: ignore[assignment]
        pos = m.end()
    return out


def parse_statistics(line: str) -> Statistics:
    """The entries of one statistics line (ValueError if it is not one)."""
    _, sep, rest = line.partition(MARKER)
    if not sep:
        raise ValueError(f"not a statistics line: {line!r}")
    return _entries(rest, line)


def counter(stats: Statistics, key: str) -> int:
    """A plain entry as an integer (KeyError if absent, ValueError if not a number)."""
    value = stats[key]
    if not isinstance(value, str):
        raise ValueError(f"statistics entry {key!r} is a group, not a number: {value}")
    return int(value)
