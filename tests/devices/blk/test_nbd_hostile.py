"""A hostile or broken NBD server: every malformed handshake or reply is a typed
``NbdError`` (the request fails, the connection is dropped), never a hang, a crash
or unbounded buffering (NetworkBlockDevice ``doc/proto.md``)."""

from __future__ import annotations

import socket
import struct
import threading

import pytest
import trio

from virtio.devices.blk import nbd
from virtio.devices.blk.nbd import ExportInfo, NbdError, _Connection, _Pending, handshake

HELLO = struct.pack(">QQH", nbd.NBDMAGIC, nbd.IHAVEOPT, nbd.FLAG_FIXED_NEWSTYLE)


def run_handshake(server_bytes: bytes) -> None:
    """Handshake against a peer that sends ``server_bytes`` then closes."""
    a, b = socket.socketpair()

    def peer() -> None:
        try:
            b.sendall(server_bytes)
            b.shutdown(socket.SHUT_WR)
            while b.recv(65536):  # swallow the client's options
                pass
        finally:
            b.close()

    t = threading.Thread(target=peer)
    t.start()
    try:
        a.settimeout(10)
        handshake(a, "x")
    finally:
        a.close()
        t.join()


def opt_reply(opt: int, rtype: int, data: bytes, magic: int = nbd.OPT_REPLY_MAGIC) -> bytes:
    return struct.pack(">QIII", magic, opt, rtype, len(data)) + data


@pytest.mark.parametrize(
    ("server", "message"),
    [
        (b"NBDMAGIC" + bytes(10), "not an NBD newstyle server"),
        (struct.pack(">QQH", nbd.NBDMAGIC, nbd.IHAVEOPT, 0), "fixed newstyle"),
        (HELLO[:10], "closed the connection during the handshake"),
        (HELLO + opt_reply(nbd.OPT_STRUCTURED_REPLY, 1, b"", magic=1), "bad option reply"),
        (HELLO + opt_reply(nbd.OPT_GO, 1, b""), "bad option reply"),  # wrong option echoed
        (HELLO + struct.pack(">QIII", nbd.OPT_REPLY_MAGIC, 8, 1, 1 << 30), "bad option reply"),
        (
            HELLO + opt_reply(8, nbd.REP_ACK, b"") + opt_reply(7, nbd.REP_ERR | 1, b"no"),
            "refused export",
        ),
        (
            HELLO + opt_reply(8, nbd.REP_ACK, b"") + opt_reply(7, nbd.REP_ACK, b""),
            "did not describe the export",
        ),
    ],
    ids=["magic", "not-fixed", "truncated", "opt-magic", "wrong-option", "huge-reply",
         "refused", "no-export-info"],
)  # fmt: skip
def test_malformed_handshake(server: bytes, message: str) -> None:
    with pytest.raises(NbdError, match=message):
        run_handshake(server)


async def transmission(reply: bytes, *, cmd: int = nbd.CMD_READ, length: int = 512):
    """One request on a connection whose server answers with ``reply`` bytes; the
    request's outcome and the connection."""
    a, b = socket.socketpair()
    conn = _Connection(a, ExportInfo(1 << 20, 0, structured=True))
    server = trio.socket.from_stdlib_socket(b)
    buf = bytearray(length)
    p = _Pending(cmd, 0, length, [memoryview(buf)])

    async def serve() -> None:
        got = b""
        while len(got) < 28:
            got += await server.recv(28 - len(got))
        cookie = struct.unpack(">IHHQQI", got)[3]
        await server.send(reply.replace(b"COOKIE__", struct.pack(">Q", cookie)))

    try:
        async with trio.open_nursery() as n:
            n.start_soon(serve)
            with trio.fail_after(10), pytest.raises(NbdError) as info:
                await conn.request(p)
        return info.value, conn
    finally:
        server.close()
        a.close()


def chunk(rtype: int, payload: bytes, flags: int = 1, cookie: bytes = b"COOKIE__") -> bytes:
    return (
        struct.pack(">IHH", nbd.STRUCTURED_REPLY_MAGIC, flags, rtype)
        + cookie
        + struct.pack(">I", len(payload))
        + payload
    )


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (struct.pack(">I", 0xDEADBEEF) + bytes(12), "bad reply magic"),
        (struct.pack(">II", nbd.SIMPLE_REPLY_MAGIC, 0) + struct.pack(">Q", 999), "unknown cookie"),
        (chunk(1, struct.pack(">Q", 4096) + bytes(512)), "data chunk outside the read"),
        (chunk(2, struct.pack(">QI", 100, 1000)), "hole chunk outside the read"),
        (chunk(77, b"xyz"), "unexpected reply chunk type"),
        # an error chunk claiming a 1 GiB message: refused before it is buffered
        (chunk(nbd.REPLY_TYPE_ERROR_BIT | 1, b"")[:-4] + struct.pack(">I", 1 << 30),
         "unexpected reply chunk type"),
    ],
    ids=["magic", "cookie", "data-outside", "hole-outside", "chunk-type", "huge-error"],
)  # fmt: skip
async def test_malformed_reply_breaks_the_connection(reply: bytes, message: str) -> None:
    exc, conn = await transmission(reply)
    assert message in str(exc)
    assert conn.broken is not None
    with pytest.raises(NbdError, match="connection lost"):
        await conn.request(_Pending(nbd.CMD_READ, 0, 512, [memoryview(bytearray(512))]))


async def test_error_chunk_fails_the_request_only() -> None:
    msg = b"disk on fire"
    payload = struct.pack(">IH", 5, len(msg)) + msg  # EIO
    exc, conn = await transmission(chunk(nbd.REPLY_TYPE_ERROR_BIT | 1, payload))
    assert "disk on fire" in str(exc)
    assert conn.broken is None  # a well-formed error is the request's, not the link's
