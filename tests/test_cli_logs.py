"""``virtio serve`` logging as operators use it: the default level shows listening,
each front-end's connect/disconnect and shutdown; ``--log-level`` / ``--log-format``
come after the subcommand; JSON lines parse; ``--help`` documents the signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import trio

from virtio.testing.vhost_user_frontend import VhostUserFrontend

REPO = Path(__file__).resolve().parents[1]


async def serve_once(tmp_path: Path, *extra: str) -> str:
    """Start ``virtio serve blk``, connect and disconnect one front-end, SIGTERM; the
    back-end's stderr."""
    img = tmp_path / "d.img"
    img.write_bytes(bytes(1 << 20))
    sock = tmp_path / "blk.sock"
    log = tmp_path / "stderr"
    with open(log, "wb") as err:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "virtio", "serve", "blk", "--socket-path", str(sock),
             "--blk-file", str(img), *extra],
            stderr=err,
            cwd=REPO,
        )  # fmt: skip
    try:
        with trio.fail_after(20):
            while not sock.exists():
                await trio.sleep(0.01)
            fe = await VhostUserFrontend.connect(sock)
            await fe.negotiate()
            await fe.aclose()
            while b"connection closed" not in log.read_bytes() and "warning" not in extra:
                await trio.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return log.read_text()


async def test_default_level_shows_the_operator_lines(tmp_path):
    text = await serve_once(tmp_path)
    assert f"listening on {tmp_path / 'blk.sock'} (block device, 1 queue(s), features 0x" in text
    assert "front-end connected" in text and "connection closed" in text
    assert "INFO: SIGTERM: shutting down" in text
    assert "WARNING" not in text and "DEBUG" not in text, text


async def test_json_lines_and_level_after_the_subcommand(tmp_path):
    text = await serve_once(tmp_path, "--log-format", "json", "--log-level", "debug")
    lines = [line for line in text.splitlines() if line.startswith("{")]
    records = [json.loads(line) for line in lines]
    assert {"ts", "level", "logger", "msg"} <= set(records[0])
    levels = {r["level"] for r in records}
    assert "DEBUG" in levels and "INFO" in levels
    assert any("listening on" in r["msg"] for r in records)
    # Every log line is JSON; only the statistics report is plain text.
    assert all(line.startswith("{") or "statistics:" in line for line in text.splitlines())


async def test_warning_level_is_quiet(tmp_path):
    text = await serve_once(tmp_path, "--log-level", "warning")
    assert "listening on" not in text and "front-end connected" not in text
    assert "statistics:" in text


def test_help_documents_signals():
    r = subprocess.run(
        [sys.executable, "-m", "virtio", "serve", "blk", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        env=dict(os.environ, COLUMNS="100"),
    )
    assert r.returncode == 0
    for word in ("SIGUSR1", "SIGHUP", "SIGTERM", "--log-level", "--log-format", "LISTEN_FDS"):
        assert word in r.stdout, word
