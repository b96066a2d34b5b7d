"""NBD block status (``base:allocation``, NBD_CMD_BLOCK_STATUS) against real
``qemu-nbd`` and ``nbdkit`` servers (memory plugin; file plugin on a sparse file),
and its user: a qcow2 overlay over an NBD export reads no zero range of the
export over the wire (counted by nbdkit's log filter), and reads on, transferring
everything, when a (fake) server's block status is hostile."""

from __future__ import annotations

import itertools
import logging
import os
import random
import re
import socket
import struct
import subprocess
import threading
from pathlib import Path

import pytest
from test_nbd_client import MiB, nbd_server

from virtio.devices.blk import nbd
from virtio.devices.blk.nbd import NbdBackend, NbdError, NbdLayer

DATA = [(1 * MiB, 64 * 1024), (5 * MiB, MiB)]
"""(offset, length) written in the 8 MiB export; the rest stays a hole."""


def _sparse_file(path: Path, seed: int) -> bytes:
    """An 8 MiB sparse file with ``DATA`` written; its content."""
    rng = random.Random(seed)
    content = bytearray(8 * MiB)
    with open(path, "wb") as f:
        os.truncate(f.fileno(), 8 * MiB)
        for off, n in DATA:
            data = rng.randbytes(n)
            content[off : off + n] = data
            os.pwrite(f.fileno(), data, off)
    return bytes(content)


@pytest.mark.parametrize("kind", ["qemu-nbd", "nbdkit-file", "nbdkit-memory"])
async def test_block_status_reports_what_reads_back(tmp_path, kind):
    base = tmp_path / "export.raw"
    content = _sparse_file(base, 1)
    server_kind, args = {
        "qemu-nbd": ("qemu-nbd", ("file", str(base))),
        "nbdkit-file": ("nbdkit", ("file", str(base))),
        "nbdkit-memory": ("nbdkit", ()),
    }[kind]
    with nbd_server(server_kind, tmp_path, args=args) as server:
        backend = NbdBackend(server.uri)
        try:
            assert backend.has_block_status
            if kind == "nbdkit-memory":  # fill the memory export the same way
                for off, n in DATA:
                    await backend.write(off, [memoryview(content[off : off + n])])
            extents = await backend.block_status(0, backend.size)
            assert extents[0].offset == 0 and extents[-1].end == backend.size
            assert all(a.end == b.offset for a, b in itertools.pairwise(extents))
            for e in extents:  # every range said to read as zeros does
                if e.zero:
                    assert content[e.offset : e.end] == bytes(e.length), e
            for off, n in DATA:  # the written data is never called a zero hole
                for e in extents:
                    if e.offset < off + n and e.end > off:
                        assert not e.zero and not e.hole, (off, e)
            zero = sum(e.length for e in extents if e.zero and e.hole)
            assert zero >= 6 * MiB  # the holes are reported (allocation granularity aside)
            # A range inside extents: covered exactly, clipped at both ends.
            part = await backend.block_status(MiB - 4096, 8192)
            assert part[0].offset == MiB - 4096 and part[-1].end == MiB + 4096
            assert part[0].zero and not part[-1].zero
            # Zeroing with unmap allowed turns data into a zero range.
            await backend.write_zeroes([(5 * MiB, MiB)], unmap=True)
            (after,) = [e for e in await backend.block_status(5 * MiB, MiB)]
            assert after.zero and (after.offset, after.length) == (5 * MiB, MiB)
            with pytest.raises(NbdError, match="outside the export"):
                await backend.block_status(backend.size - 512, 1024)
        finally:
            backend.close()


async def test_server_without_block_status_means_all_data(tmp_path):
    args = ("--filter=noextents", "memory", "size=8M")
    with nbd_server("nbdkit", tmp_path, args=args) as server:
        backend = NbdBackend(server.uri)
        try:  # nbdkit's noextents filter still answers, with one allocated extent
            extents = await backend.block_status(4096, 8192)
            assert [(e.offset, e.length, e.zero) for e in extents] == [(4096, 8192, False)]
        finally:
            backend.close()


def _logged_reads(log: Path) -> list[tuple[int, int]]:
    """(offset, count) of every NBD_CMD_READ nbdkit's log filter saw."""
    pat = re.compile(r" Read id=\d+ offset=(0x[0-9a-f]+) count=(0x[0-9a-f]+)")
    return [(int(m[1], 16), int(m[2], 16)) for m in pat.finditer(log.read_text())]


async def test_qcow2_overlay_transfers_no_zero_range_of_its_nbd_base(tmp_path):
    from virtio.devices.blk.qcow2 import Qcow2Backend

    base = tmp_path / "export.raw"
    content = bytearray(_sparse_file(base, 2))
    log = tmp_path / "nbdkit.log"
    args = ("--filter=log", "file", str(base), f"logfile={log}")
    with nbd_server("nbdkit", tmp_path, args=args) as server:
        top = tmp_path / "top.qcow2"
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536",
             "-b", server.uri, "-F", "raw", str(top), "8M"],
            check=True,
        )  # fmt: skip
        backend = Qcow2Backend(top)
        try:
            # Copy-on-write of a partial cluster over a hole: nothing read.
            new = random.Random(3).randbytes(1024)
            await backend.write(3 * MiB + 512, [memoryview(new)])
            content[3 * MiB + 512 : 3 * MiB + 1536] = new
            assert _logged_reads(log) == []
            # Over data: the cluster's other bytes are read from the export.
            await backend.write(MiB + 512, [memoryview(new)])
            content[MiB + 512 : MiB + 1536] = new
            reads = _logged_reads(log)
            assert reads and all(MiB <= off and off + n <= MiB + 65536 for off, n in reads)
            # The whole disk: only the data ranges travel.
            got = bytearray(backend.size)
            await backend.read(0, [memoryview(got)])
            assert got == content
            moved = sum(n for _, n in _logged_reads(log))
            assert moved <= sum(n for _, n in DATA) + 65536, moved
        finally:
            backend.close()
        raw = tmp_path / "model.raw"
        raw.write_bytes(content)
        r = subprocess.run(
            ["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(top), str(raw)],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stdout + r.stderr


def _fake_server(listener: socket.socket, commands: list[int], context: int) -> None:
    """A read-only 1 MiB export whose block status replies name metadata context
    ``context`` (the handshake gave base:allocation id 5) and whose reads return
    ``PATTERN``; the commands it got go to ``commands``."""
    s, _ = listener.accept()
    with s:
        s.sendall(struct.pack(">QQH", nbd.NBDMAGIC, nbd.IHAVEOPT, nbd.FLAG_FIXED_NEWSTYLE))
        s.recv(4, socket.MSG_WAITALL)

        def opt_reply(opt: int, rtype: int, data: bytes = b"") -> None:
            s.sendall(struct.pack(">QIII", nbd.OPT_REPLY_MAGIC, opt, rtype, len(data)) + data)

        while True:
            _magic, opt, length = struct.unpack(">QII", s.recv(16, socket.MSG_WAITALL))
            if length:
                s.recv(length, socket.MSG_WAITALL)
            if opt == nbd.OPT_SET_META_CONTEXT:
                opt_reply(opt, nbd.REP_META_CONTEXT, struct.pack(">I", 5) + b"base:allocation")
            elif opt == nbd.OPT_GO:
                flags = nbd.TF_HAS_FLAGS | nbd.TF_READ_ONLY
                opt_reply(opt, nbd.REP_INFO, struct.pack(">HQH", nbd.INFO_EXPORT, MiB, flags))
                opt_reply(opt, nbd.REP_ACK)
                break
            opt_reply(opt, nbd.REP_ACK)
        while req := s.recv(28, socket.MSG_WAITALL):
            _magic, _flags, cmd, cookie, off, n = struct.unpack(">IHHQQI", req)
            commands.append(cmd)
            head = struct.pack(">IHH", nbd.STRUCTURED_REPLY_MAGIC, nbd.REPLY_FLAG_DONE, 0)
            if cmd == nbd.CMD_BLOCK_STATUS:  # "all zeros", for a context we never asked for
                body = struct.pack(">III", context, n, nbd.STATE_HOLE | nbd.STATE_ZERO)
                rtype = nbd.REPLY_TYPE_BLOCK_STATUS
            elif cmd == nbd.CMD_READ:
                body = struct.pack(">Q", off) + PATTERN[off : off + n]
                rtype = nbd.REPLY_TYPE_OFFSET_DATA
            else:
                return
            head = head[:6] + struct.pack(">H", rtype)
            s.sendall(head + struct.pack(">QI", cookie, len(body)) + body)


PATTERN = random.Random(5).randbytes(MiB)


def test_backing_layer_reads_on_when_block_status_is_hostile(tmp_path, caplog):
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(tmp_path / "fake.sock"))
        listener.listen(1)
        commands: list[int] = []
        t = threading.Thread(target=_fake_server, args=(listener, commands, 6))
        t.start()
        layer = NbdLayer(f"nbd+unix:///?socket={tmp_path}/fake.sock")
        try:
            with caplog.at_level(logging.WARNING, logger="virtio.devices.blk.nbd"):
                for off in (4096, 200_000):  # neither read believes the bogus "zeros"
                    got = bytearray(65536)
                    layer.read(off, [memoryview(got)])
                    assert got == PATTERN[off : off + 65536]
            assert "metadata context 6, not 5" in caplog.text
            # Block status asked once, then not again; the connection served on.
            assert commands == [nbd.CMD_BLOCK_STATUS, nbd.CMD_READ, nbd.CMD_READ]
            assert layer.backend.reconnects == 0
        finally:
            layer.close()
            t.join(10)
