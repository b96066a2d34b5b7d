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
from virtio.devices.blk.nbd import (
    ExportInfo,
    Extent,
    NbdError,
    NbdReplyError,
    _Connection,
    _Pending,
    handshake,
)

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


SR_ACK = opt_reply(nbd.OPT_STRUCTURED_REPLY, nbd.REP_ACK, b"")
NO_META = opt_reply(nbd.OPT_SET_META_CONTEXT, nbd.REP_ERR_UNSUP, b"")


@pytest.mark.parametrize(
    ("server", "message"),
    [
        (b"NBDMAGIC" + bytes(10), "not an NBD newstyle server"),
        (struct.pack(">QQH", nbd.NBDMAGIC, nbd.IHAVEOPT, 0), "fixed newstyle"),
        (HELLO[:10], "closed the connection during the handshake"),
        (HELLO + opt_reply(nbd.OPT_STRUCTURED_REPLY, 1, b"", magic=1), "bad option reply"),
        (HELLO + opt_reply(nbd.OPT_GO, 1, b""), "bad option reply"),  # wrong option echoed
        (HELLO + struct.pack(">QIII", nbd.OPT_REPLY_MAGIC, 8, 1, 1 << 30), "bad option reply"),
        (HELLO + SR_ACK + NO_META + opt_reply(7, nbd.REP_ERR | 1, b"no"), "refused export"),
        (HELLO + SR_ACK + NO_META + opt_reply(7, nbd.REP_ACK, b""), "did not describe the export"),
        (HELLO + SR_ACK + opt_reply(10, nbd.REP_META_CONTEXT, b"\0\0\0\1qemu:dirty"),
         "bad meta context reply"),
        (HELLO + SR_ACK + opt_reply(10, nbd.REP_META_CONTEXT, b"\1"), "bad meta context reply"),
    ],
    ids=["magic", "not-fixed", "truncated", "opt-magic", "wrong-option", "huge-reply",
         "refused", "no-export-info", "meta-context-name", "meta-context-short"],
)  # fmt: skip
def test_malformed_handshake(server: bytes, message: str) -> None:
    with pytest.raises(NbdError, match=message):
        run_handshake(server)


async def transmission(reply: bytes, *, cmd: int = nbd.CMD_READ, length: int = 512):
    """One request on a connection whose server answers with ``reply`` bytes; the
    request's outcome and the connection."""
    a, b = socket.socketpair()
    info = ExportInfo(1 << 20, 0, structured=True, base_allocation=CONTEXT)
    conn = _Connection(a, info)
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


CONTEXT = 7
"""The ``base:allocation`` context id of ``transmission``'s connections."""


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


def status(*extents: tuple[int, int], context: int = CONTEXT) -> bytes:
    return struct.pack(">I", context) + b"".join(struct.pack(">II", *e) for e in extents)


BS = nbd.REPLY_TYPE_BLOCK_STATUS


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (chunk(BS, status((512, 3), context=CONTEXT + 1)), "metadata context 8, not 7"),
        (chunk(BS, status((256, 0), (0, 3))), "zero-length extent"),
        (chunk(BS, status((256, 0), (256, 3), (512, 0))), "beyond the request"),
        (chunk(BS, status((512, 3)), flags=0) + chunk(BS, status((512, 0))), "two block status"),
        (chunk(nbd.REPLY_TYPE_NONE, b""), "without a base:allocation chunk"),
        (struct.pack(">II", nbd.SIMPLE_REPLY_MAGIC, 0) + b"COOKIE__", "without a base:alloc"),
    ],
    ids=["context", "zero-length", "beyond", "two-chunks", "no-chunk", "simple-reply"],
)  # fmt: skip
async def test_bad_block_status_fails_the_request_only(reply: bytes, message: str) -> None:
    exc, conn = await transmission(reply, cmd=nbd.CMD_BLOCK_STATUS)
    assert isinstance(exc, NbdReplyError) and message in str(exc)
    assert conn.broken is None  # well framed: the connection stays usable


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (chunk(BS, status((512, 3)) + b"\0\0\0"), "block status chunk of 15 bytes"),
        (chunk(BS, b"")[:-4] + struct.pack(">I", 1 << 30), "block status chunk of 1073741824"),
        (chunk(BS, struct.pack(">I", CONTEXT)), "block status chunk of 4 bytes"),
        (chunk(BS, status((512, 3))), "unexpected reply chunk type 5"),  # to a READ
    ],
    ids=["ragged", "huge", "no-extent", "to-a-read"],
)  # fmt: skip
async def test_malformed_block_status_breaks_the_connection(reply: bytes, message: str) -> None:
    cmd = nbd.CMD_READ if "type 5" in message else nbd.CMD_BLOCK_STATUS
    exc, conn = await transmission(reply, cmd=cmd)
    assert message in str(exc) and conn.broken is not None


async def test_last_extent_past_the_request_is_clipped() -> None:
    a, b = socket.socketpair()
    conn = _Connection(a, ExportInfo(1 << 20, 0, structured=True, base_allocation=CONTEXT))
    p = _Pending(nbd.CMD_BLOCK_STATUS, 4096, 1024)

    async def serve() -> None:
        got = b""
        while len(got) < 28:
            got += await server.recv(28 - len(got))
        cookie = struct.pack(">Q", struct.unpack(">IHHQQI", got)[3])
        await server.send(chunk(BS, status((512, 3), (1 << 20, 0)), cookie=cookie))

    server = trio.socket.from_stdlib_socket(b)
    try:
        async with trio.open_nursery() as n:
            n.start_soon(serve)
            with trio.fail_after(10):
                await conn.request(p)
    finally:
        server.close()
        a.close()
    assert p.extents == [Extent(4096, 512, 3), Extent(4608, 512, 0)]
