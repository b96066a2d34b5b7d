"""A hostile NBD server against the native data plane (``nbd_dataplane.c``): a reply
that breaks the protocol (NetworkBlockDevice ``doc/proto.md``) fails the guest's
request with VIRTIO_BLK_S_IOERR and drops the thread's connection -- no crash, no
hang, no byte of a refused chunk written to the guest -- and the device goes on
serving through Python (a well-behaved second connection)."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from test_blk_dataplane import IN, IOERR, OK, Rig, hdr
from test_nbd_dataplane import serve_nbd

from virtio.devices.blk import nbd

SIZE = 1 << 20


def _recv(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        part = s.recv(n - len(buf))
        if not part:
            raise ConnectionError
        buf += part
    return buf


def _handshake(s: socket.socket) -> None:
    s.sendall(struct.pack(">QQH", nbd.NBDMAGIC, nbd.IHAVEOPT, nbd.FLAG_FIXED_NEWSTYLE))
    _recv(s, 4)
    while True:
        _magic, opt, length = struct.unpack(">QII", _recv(s, 16))
        _recv(s, length)
        if opt == nbd.OPT_STRUCTURED_REPLY:
            s.sendall(struct.pack(">QIII", nbd.OPT_REPLY_MAGIC, opt, nbd.REP_ACK, 0))
            continue
        if opt != nbd.OPT_GO:  # no block status here
            s.sendall(struct.pack(">QIII", nbd.OPT_REPLY_MAGIC, opt, nbd.REP_ERR_UNSUP, 0))
            continue
        info = struct.pack(">HQH", nbd.INFO_EXPORT, SIZE, nbd.TF_HAS_FLAGS | nbd.TF_SEND_FLUSH)
        s.sendall(struct.pack(">QIII", nbd.OPT_REPLY_MAGIC, opt, nbd.REP_INFO, len(info)) + info)
        s.sendall(struct.pack(">QIII", nbd.OPT_REPLY_MAGIC, opt, nbd.REP_ACK, 0))
        return


def chunk(rtype: int, payload: bytes, cookie: bytes, flags: int = 1) -> bytes:
    head = struct.pack(">IHH", nbd.STRUCTURED_REPLY_MAGIC, flags, rtype)
    return head + cookie + struct.pack(">I", len(payload)) + payload


def _connection(s: socket.socket, hostile, disk: bytearray) -> None:
    """Handshake, then answer reads: with ``hostile(cookie)`` bytes (then close), or
    from ``disk`` when ``hostile`` is None."""
    with s, contextlib.suppress(OSError):  # the client may go away at any point
        _handshake(s)
        while True:
            _magic, _flags, cmd, cookie, off, length = struct.unpack(">IHHQQI", _recv(s, 28))
            c = struct.pack(">Q", cookie)
            if cmd == nbd.CMD_DISC:
                return
            if cmd == nbd.CMD_WRITE:
                disk[off : off + length] = _recv(s, length)
            if cmd != nbd.CMD_READ:
                s.sendall(struct.pack(">II", nbd.SIMPLE_REPLY_MAGIC, 0) + c)
            elif hostile is not None:
                s.sendall(hostile(c))
                if hostile not in KEEP_SERVING:
                    return
                hostile = None
            else:
                s.sendall(chunk(1, struct.pack(">Q", off) + disk[off : off + length], c))


@contextlib.contextmanager
def hostile_server(path: Path, hostile) -> Iterator[str]:
    """The second connection (the data plane's: the first is Python's) is hostile,
    the others behave."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(8)
    disk = bytearray(SIZE)
    disk[0:512] = b"d" * 512
    threads = []

    def accept() -> None:
        n = 0
        while True:
            try:
                s, _ = listener.accept()
            except OSError:
                return
            t = threading.Thread(
                target=_connection, args=(s, hostile if n == 1 else None, disk), daemon=True
            )
            t.start()
            threads.append(t)
            n += 1

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield f"nbd+unix:///x?socket={path}"
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        acceptor.join(10)


HOSTILE = {
    "magic": lambda c: struct.pack(">I", 0xDEADBEEF) + bytes(12),
    "cookie": lambda c: struct.pack(">II", nbd.SIMPLE_REPLY_MAGIC, 0) + struct.pack(">Q", 999),
    "data-outside": lambda c: chunk(1, struct.pack(">Q", 4096) + b"X" * 512, c),
    "data-too-long": lambda c: chunk(1, struct.pack(">Q", 0) + b"X" * 1024, c),
    "hole-outside": lambda c: chunk(2, struct.pack(">QI", 100, 1000), c),
    "chunk-type": lambda c: chunk(77, b"xyz", c),
    "huge-error": lambda c: (
        chunk(nbd.REPLY_TYPE_ERROR_BIT | 1, b"", c)[:-4] + struct.pack(">I", 1 << 30)
    ),
    "eof-in-data": lambda c: chunk(1, struct.pack(">Q", 0) + b"X" * 100, c)[:-400],
}


def _short(c: bytes) -> bytes:
    return chunk(1, struct.pack(">Q", 0) + b"X" * 256, c)  # 256 of 512 bytes, then DONE


KEEP_SERVING = {_short}
"""Well-formed replies that are still wrong: the request fails, the connection stays."""


async def test_read_not_covered_whole_is_ioerr_and_the_connection_stays(tmp_path):
    with hostile_server(tmp_path / "nbd.sock", _short) as uri:
        rig = Rig(tmp_path, image=uri)
        try:
            async with trio.open_nursery() as nursery:
                plane = await serve_nbd(rig, nursery)
                used = await rig.request([hdr(IN, 0)], [512, 1])
                assert used.data == bytes(512) + bytes([IOERR])
                used = await rig.request([hdr(IN, 0)], [512, 1])  # native, same connection
                assert used.data == b"d" * 512 + bytes([OK])
                stats = plane.statistics()
                assert (stats["server_errors"], stats["conn_failed"], stats["reads"]) == (1, 0, 1)
                nursery.cancel_scope.cancel()
        finally:
            rig.close()


@pytest.mark.parametrize("kind", list(HOSTILE))
async def test_malformed_reply_fails_the_request_and_the_device_goes_on(tmp_path, kind):
    with hostile_server(tmp_path / "nbd.sock", HOSTILE[kind]) as uri:
        rig = Rig(tmp_path, image=uri)
        try:
            async with trio.open_nursery() as nursery:
                plane = await serve_nbd(rig, nursery)
                used = await rig.request([hdr(IN, 0)], [512, 1])
                assert used.data == bytes(512) + bytes([IOERR])  # zeroed, not "X"
                stats = plane.statistics()
                assert stats["conn_failed"] == 1 and stats["reads"] == 0
                used = await rig.request([hdr(IN, 0)], [512, 1])  # Python's connection
                assert used.data == b"d" * 512 + bytes([OK])
                nursery.cancel_scope.cancel()
        finally:
            rig.close()
