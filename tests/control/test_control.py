"""The control socket (virtio/control/): wire format, registry, server, client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from virtio.control import ArgumentError, CommandRegistry, InvalidRequest
from virtio.control.client import ControlClient, ControlReplyError
from virtio.control.protocol import MAX_LINE, parse_request
from virtio.control.server import answer, serve_control

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("line", "why"),
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"execute": 3}', "'execute' must be a string"),
        (b'{"execute": "x", "arguments": [1]}', "'arguments' must be a JSON object"),
        (b"\xff\xfe", "not UTF-8"),
        (b"{" + b" " * MAX_LINE + b"}", "longer than"),
    ],
)
def test_malformed_request_lines_are_typed_errors(line, why):
    with pytest.raises(InvalidRequest, match=why):
        parse_request(line)


def test_request_fields():
    r = parse_request(b'{"execute": "resize", "arguments": {"size": 4096}, "id": "a"}')
    assert (r.execute, r.arguments, r.id) == ("resize", {"size": 4096}, "a")
    raw = parse_request(b'{"type": "EV_KEY", "code": "KEY_A", "value": 1}')
    assert raw.execute is None and raw.raw["code"] == "KEY_A"


async def test_registry_dispatch_and_errors():
    reg = CommandRegistry()
    reg.register("add", lambda a: a["x"] + a["y"], help="x + y")

    async def slow(a):
        await trio.sleep(0)
        return {"ok": True}

    reg.register("slow", slow)
    reg.register("boom", lambda a: 1 / 0)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("add", lambda a: 0)

    async def reply(obj):
        return json.loads(await answer(json.dumps(obj).encode(), reg))

    assert await reply({"execute": "add", "arguments": {"x": 2, "y": 3}, "id": 1}) == {
        "return": 5,
        "id": 1,
    }
    assert (await reply({"execute": "slow"}))["return"] == {"ok": True}
    missing = await reply({"execute": "add", "arguments": {"x": 2}, "id": 2})
    assert missing["error"]["class"] == "GenericError" and "'y'" in missing["error"]["desc"]
    assert missing["id"] == 2
    nf = await reply({"execute": "nope"})
    assert nf["error"]["class"] == "CommandNotFound"
    internal = await reply({"execute": "boom"})
    assert "ZeroDivisionError" in internal["error"]["desc"]
    assert "add" in [c["name"] for c in (await reply({"execute": "query-commands"}))["return"]]
    no_default = await reply({"type": "EV_KEY"})
    assert "no 'execute'" in no_default["error"]["desc"]
    reg.set_default(lambda raw: {"got": raw["type"]})
    assert (await reply({"type": "EV_KEY"}))["return"] == {"got": "EV_KEY"}
    reg.unregister("add")
    assert (await reply({"execute": "add"}))["error"]["class"] == "CommandNotFound"

    def refuse(a):
        raise ArgumentError("size must be a multiple of 512")

    reg.register("refuse", refuse)
    assert (await reply({"execute": "refuse"}))["error"]["desc"] == (
        "size must be a multiple of 512"
    )


async def test_server_serves_clients_and_survives_garbage(tmp_path):
    reg = CommandRegistry()
    reg.register("echo", lambda a: a)
    path = tmp_path / "ctl.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, path, reg)
        async with await ControlClient.connect(path) as c1, await ControlClient.connect(path) as c2:
            assert await c1.execute("echo", v=1) == {"v": 1}
            # Garbage on one connection: an error reply, the connection still works.
            reply = await c2.send_line({"execute": 5})
            assert "error" in reply
            assert await c2.execute("echo", v=2) == {"v": 2}
            with pytest.raises(ControlReplyError) as e:
                await c1.execute("missing")
            assert e.value.error_class == "CommandNotFound"
            # Not JSON at all, several requests in one write: one reply each, in order.
            stream = await trio.open_unix_socket(os.fspath(path))
            await stream.send_all(
                b'garbage\n{"execute":"echo","arguments":{"n":1}}\n\n'
                b'{"execute":"echo","arguments":{"n":2}}\n'
            )
            got = b""
            with trio.fail_after(5):
                while got.count(b"\n") < 3:
                    got += await stream.receive_some(4096)
            lines = [json.loads(x) for x in got.splitlines()]
            assert "error" in lines[0]
            assert [x["return"] for x in lines[1:]] == [{"n": 1}, {"n": 2}]
            # An over-long line: error reply, then the server closes this connection.
            await stream.send_all(b"x" * (MAX_LINE + 2))
            rest = b""
            with trio.fail_after(5):
                while chunk := await stream.receive_some(4096):
                    rest += chunk
            assert b"longer than" in rest
            await stream.aclose()
            assert await c1.execute("echo", v=3) == {"v": 3}
        nursery.cancel_scope.cancel()
    assert not path.exists()


async def test_serve_blk_control_option(tmp_path):
    """``virtio serve blk --control PATH`` answers on PATH while serving."""
    img, sock, ctl = tmp_path / "d.img", tmp_path / "blk.sock", tmp_path / "blk.ctl"
    img.write_bytes(bytes(1 << 20))
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "virtio", "serve", "blk", "--socket-path", str(sock),
         "--blk-file", str(img), "--control", str(ctl)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
    )  # fmt: skip
    try:
        with trio.fail_after(30):
            while not ctl.exists():
                assert proc.returncode is None
                await trio.sleep(0.05)
        async with await ControlClient.connect(ctl) as client:
            names = [c["name"] for c in await client.execute("query-commands")]
        assert "query-commands" in names
    finally:
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            assert await proc.wait() == 0
