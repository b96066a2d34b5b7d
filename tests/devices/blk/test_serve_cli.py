"""``virtio serve blk`` as a process: its error on a socket it cannot bind, and its
SIGUSR1 statistics line as ``virtio.testing.backend_stats`` parses it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from virtio.testing.backend_stats import counter, parse_statistics

# Printed by `virtio serve blk` (native data plane, two queues) after the reconnect test.
DATAPLANE_LINE = (
    "virtio serve blk: statistics: connections=2 resubmitted=0 in_flight=0"
    " vring_requests=64,64 fdatasync=0 needs_reset=0 dataplane0=[avail_idx=224"
    " next_avail=224 used=224 kicks=61 calls=61 reqs=64 deferred=0 rescues=0 kick_fd=20"
    " call_fd=18] dataplane1=[avail_idx=139 next_avail=139 used=139 kicks=61 calls=61"
    " reqs=64 deferred=0 rescues=0 kick_fd=21 call_fd=12]"
)
# The same test on the Python loop (no data planes), requests resubmitted.
PYTHON_LOOP_LINE = (
    "virtio serve blk: statistics: connections=2 resubmitted=3 in_flight=0"
    " vring_requests=31,49 fdatasync=0 needs_reset=0"
)


def test_data_plane_groups_stay_apart():
    stats = parse_statistics(DATAPLANE_LINE)
    assert list(stats) == [
        "connections", "resubmitted", "in_flight", "vring_requests", "fdatasync",
        "needs_reset", "dataplane0", "dataplane1",
    ]  # fmt: skip
    assert stats["vring_requests"] == "64,64"
    assert stats["dataplane0"] == {
        "avail_idx": "224", "next_avail": "224", "used": "224", "kicks": "61", "calls": "61",
        "reqs": "64", "deferred": "0", "rescues": "0", "kick_fd": "20", "call_fd": "18",
    }  # fmt: skip
    assert stats["dataplane1"]["next_avail"] == "139"  # type: ignore[index]
    assert stats["dataplane1"]["kick_fd"] == "21"  # type: ignore[index]
    assert counter(stats, "in_flight") == 0


def test_python_loop_line():
    stats = parse_statistics(PYTHON_LOOP_LINE)
    assert counter(stats, "resubmitted") == 3
    assert stats["vring_requests"] == "31,49"
    assert len(stats) == 6


def test_not_a_statistics_line():
    with pytest.raises(ValueError, match="not a statistics line"):
        parse_statistics("virtio-blk: listening on /tmp/x.sock")
    with pytest.raises(ValueError, match="unparsable"):
        parse_statistics("virtio serve blk: statistics: connections=2 dataplane0=[a=1")
    with pytest.raises(ValueError, match="twice"):
        parse_statistics("virtio serve blk: statistics: a=1 a=2")
    with pytest.raises(ValueError, match="group"):
        counter(parse_statistics(DATAPLANE_LINE), "dataplane0")


def test_socket_it_cannot_bind_is_one_line_of_error(tmp_path: Path) -> None:
    """The bind fails inside the server's nursery (an exception group under trio >=
    0.25): still one clear line and exit status 1, no traceback."""
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    r = subprocess.run(
        [sys.executable, "-m", "virtio", "serve", "blk", "--blk-file", str(img),
         "--socket-path", str(tmp_path / "missing-dir" / "s.sock")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 1, r.stderr
    missing = tmp_path / "missing-dir"
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("virtio serve blk: cannot listen on "), r.stderr
    assert f"directory {missing} does not exist" in r.stderr  # names the path (issue 13 §2)


def test_statistics_line_with_empty_values_and_timestamp() -> None:
    """A back-end that served nothing yet prints ``vring_requests=`` (empty); SIGUSR1
    lines end with ``time=``."""
    line = (
        "virtio serve blk: statistics: connections=0 refused=0 errors=0 resubmitted=0 "
        "in_flight=0 vring_requests= fdatasync=0 needs_reset=0 time=2026-12-04T17:04:28+00:00"
    )
    stats = parse_statistics(line)
    assert stats["vring_requests"] == "" and stats["needs_reset"] == "0"
    assert stats["time"] == "2026-12-04T17:04:28+00:00"
