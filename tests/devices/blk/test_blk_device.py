"""VirtioBlk through the in-memory DeviceHarness (virtio 1.4 §5.2).

Every request type on split and packed rings, with and without indirect
descriptors, data split across odd descriptor boundaries; status decisions
(§5.2.6, devicenormative §5.2.6.2); config space (§5.2.4); cache modes; hostile
chains (DescriptorChainError -> NEEDS_RESET); concurrency across queues.
"""

from __future__ import annotations

import itertools
import random

import pytest
import trio

from virtio.devices.blk import BlkOptions, MemoryBackend, VirtioBlk
from virtio.devices.blk.config import WRITEBACK_OFFSET
from virtio.errors import DescriptorChainError
from virtio.spec.blk import (
    VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_SECTOR_SIZE,
    BlkDiscardFlag,
    BlkFeature,
    BlkReqType,
    BlkStatus,
    virtio_blk_config,
    virtio_blk_discard_write_zeroes,
    virtio_blk_outhdr,
)
from virtio.spec.features import TransportFeature as TF
from virtio.testing.harness import DeviceHarness

T = BlkReqType
S = BlkStatus
F = BlkFeature
SECTOR = VIRTIO_BLK_SECTOR_SIZE
UNMAP = int(BlkDiscardFlag.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)
DISK = 64 * SECTOR

RINGS = [
    pytest.param(False, False, id="split"),
    pytest.param(False, True, id="split-indirect"),
    pytest.param(True, False, id="packed"),
    pytest.param(True, True, id="packed-indirect"),
]


def hdr(req_type: int, sector: int = 0, reserved: int = 0) -> bytes:
    return virtio_blk_outhdr.build({"type": req_type, "reserved": reserved, "sector": sector})


def seg(sector: int, num: int, flags: int = 0) -> bytes:
    return virtio_blk_discard_write_zeroes.build(
        {"sector": sector, "num_sectors": num, "flags": flags}
    )


def pattern(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    out, prev = [], 0
    for c in [*cuts, len(data)]:
        out.append(data[prev:c])
        prev = c
    return [p for p in out if p]


def status_of(used) -> int:
    return used.data[-1]


async def wait_needs_reset(h: DeviceHarness) -> None:
    with trio.fail_after(5):
        while not h.driver_errors:
            await trio.sleep(0.001)


# -- every request type, every ring layout -----------------------------------------------
@pytest.mark.parametrize(("packed", "indirect"), RINGS)
async def test_all_request_types(packed: bool, indirect: bool) -> None:
    backend = MemoryBackend(DISK)
    dev = VirtioBlk(backend, BlkOptions(serial="pyvirtio-serial-0001"))
    data = pattern(3 * SECTOR)
    async with DeviceHarness.start(dev, packed=packed) as h:
        # OUT, header and data split at odd boundaries.
        readable = split_at(hdr(T.VIRTIO_BLK_T_OUT, 5) + data, [3, 16, 23, 529, 1000])
        used = await h.request(0, readable, [1], use_indirect=indirect)
        assert (status_of(used), used.written) == (S.VIRTIO_BLK_S_OK, 1)
        assert backend.data[5 * SECTOR : 8 * SECTOR] == data
        # IN, data and status in odd writable pieces (status shares the last one).
        used = await h.request(
            0, [hdr(T.VIRTIO_BLK_T_IN, 5)], [7, 505, 700, 325], use_indirect=indirect
        )
        assert used.written == 3 * SECTOR + 1
        assert (used.data[:-1], status_of(used)) == (data, S.VIRTIO_BLK_S_OK)
        # FLUSH
        used = await h.request(0, [hdr(T.VIRTIO_BLK_T_FLUSH)], [1], use_indirect=indirect)
        assert (status_of(used), used.written, backend.flushes) == (S.VIRTIO_BLK_S_OK, 1, 1)
        # GET_ID: exactly 20 bytes, no NUL terminator (§5.2.6)
        used = await h.request(
            0, [hdr(T.VIRTIO_BLK_T_GET_ID)], [VIRTIO_BLK_ID_BYTES, 1], use_indirect=indirect
        )
        assert used.data == b"pyvirtio-serial-0001" + bytes([S.VIRTIO_BLK_S_OK])
        assert used.written == VIRTIO_BLK_ID_BYTES + 1
        # WRITE_ZEROES over part of the data, DISCARD over the rest.
        used = await h.request(
            0, [hdr(T.VIRTIO_BLK_T_WRITE_ZEROES), seg(5, 1)], [1], use_indirect=indirect
        )
        assert status_of(used) == S.VIRTIO_BLK_S_OK
        assert backend.data[5 * SECTOR : 6 * SECTOR] == bytes(SECTOR)
        assert backend.data[6 * SECTOR : 8 * SECTOR] == data[SECTOR:]
        used = await h.request(
            0, [hdr(T.VIRTIO_BLK_T_DISCARD), seg(6, 2)], [1], use_indirect=indirect
        )
        assert status_of(used) == S.VIRTIO_BLK_S_OK
        # unknown type -> UNSUPP
        used = await h.request(0, [hdr(0x7F)], [1], use_indirect=indirect)
        assert (status_of(used), used.written) == (S.VIRTIO_BLK_S_UNSUPP, 1)
    assert not h.driver_errors and not dev.needs_reset


async def test_get_id_short_serial_is_nul_padded_and_short_buffer_truncates() -> None:
    dev = VirtioBlk(MemoryBackend(DISK), BlkOptions(serial="disk0"))
    async with DeviceHarness.start(dev) as h:
        used = await h.request(0, [hdr(T.VIRTIO_BLK_T_GET_ID)], [VIRTIO_BLK_ID_BYTES + 1])
        assert used.data == b"disk0" + bytes(15) + b"\0"
        used = await h.request(0, [hdr(T.VIRTIO_BLK_T_GET_ID)], [4])
        assert used.data == b"dis\0" and used.written == 4
        # a larger buffer: only 20 bytes of ID are written, status in the last byte
        used = await h.request(0, [hdr(T.VIRTIO_BLK_T_GET_ID)], [64])
        assert used.data[:20] == b"disk0" + bytes(15) and used.data[-1] == S.VIRTIO_BLK_S_OK
        assert used.written == VIRTIO_BLK_ID_BYTES + 1


# -- status decisions (§5.2.6) ---------------------------------------------------------------
SUNSUPP, SIOERR, SOK = S.VIRTIO_BLK_S_UNSUPP, S.VIRTIO_BLK_S_IOERR, S.VIRTIO_BLK_S_OK
CAP = DISK // SECTOR

# (name, readable, writable, expected status).  Citations:
# * beyond capacity / not a multiple of 512 -> IOERR: drivernormative:Device Types /
#   Block Device / Device Operation (§5.2.6.1) forbids them; IOERR is "device or driver
#   error" (§5.2.6).
# * unknown flag, unmap on discard -> UNSUPP: devicenormative:Device Types / Block
#   Device / Device Operation (§5.2.6.2), "MUST set the status byte to UNSUPP".
# * zoned requests without VIRTIO_BLK_F_ZONED -> UNSUPP: same devicenormative, "MUST
#   reject ... with VIRTIO_BLK_S_UNSUPP".
# * too many segments -> UNSUPP, too many sectors -> IOERR: §5.2.6.1 limits, statuses
#   as QEMU's virtio_blk_handle_request / _discard_write_zeroes.
STATUS_CASES = [
    ("read-last-sector", [hdr(T.VIRTIO_BLK_T_IN, CAP - 1)], [SECTOR + 1], SOK),
    ("read-beyond-capacity", [hdr(T.VIRTIO_BLK_T_IN, CAP - 1)], [2 * SECTOR + 1], SIOERR),
    ("read-sector-past-end", [hdr(T.VIRTIO_BLK_T_IN, CAP)], [SECTOR + 1], SIOERR),
    ("read-zero-len-at-end", [hdr(T.VIRTIO_BLK_T_IN, CAP)], [1], SOK),
    ("read-huge-sector", [hdr(T.VIRTIO_BLK_T_IN, 2**64 - 1)], [SECTOR + 1], SIOERR),
    ("read-not-512-multiple", [hdr(T.VIRTIO_BLK_T_IN, 0)], [100 + 1], SIOERR),
    ("write-beyond-capacity", [hdr(T.VIRTIO_BLK_T_OUT, CAP), bytes(SECTOR)], [1], SIOERR),
    ("write-not-512-multiple", [hdr(T.VIRTIO_BLK_T_OUT, 0), bytes(513)], [1], SIOERR),
    ("unknown-type", [hdr(3)], [1], SUNSUPP),
    ("legacy-barrier-bit", [hdr(0x80000001), bytes(SECTOR)], [1], SUNSUPP),
    ("get-lifetime-not-offered", [hdr(T.VIRTIO_BLK_T_GET_LIFETIME)], [7], SUNSUPP),
    ("secure-erase-not-offered", [hdr(T.VIRTIO_BLK_T_SECURE_ERASE), seg(0, 1)], [1], SUNSUPP),
    ("zone-report-not-zoned", [hdr(T.VIRTIO_BLK_T_ZONE_REPORT)], [4097], SUNSUPP),
    ("zone-append-not-zoned", [hdr(T.VIRTIO_BLK_T_ZONE_APPEND), bytes(SECTOR)], [9], SUNSUPP),
    ("discard-unmap-flag", [hdr(T.VIRTIO_BLK_T_DISCARD), seg(0, 1, UNMAP)], [1], SUNSUPP),
    ("discard-unknown-flag", [hdr(T.VIRTIO_BLK_T_DISCARD), seg(0, 1, 2)], [1], SUNSUPP),
    ("wz-unknown-flag", [hdr(T.VIRTIO_BLK_T_WRITE_ZEROES), seg(0, 1, 4 | UNMAP)], [1], SUNSUPP),
    ("discard-too-many-segs", [hdr(T.VIRTIO_BLK_T_DISCARD), seg(0, 1) * 3], [1], SUNSUPP),
    ("wz-too-many-segs", [hdr(T.VIRTIO_BLK_T_WRITE_ZEROES), seg(0, 1) * 3], [1], SUNSUPP),
    ("discard-too-many-sectors", [hdr(T.VIRTIO_BLK_T_DISCARD), seg(0, 9)], [1], SIOERR),
    ("wz-too-many-sectors", [hdr(T.VIRTIO_BLK_T_WRITE_ZEROES), seg(0, 9)], [1], SIOERR),
    ("discard-beyond-capacity", [hdr(T.VIRTIO_BLK_T_DISCARD), seg(CAP - 1, 2)], [1], SIOERR),
    ("wz-beyond-capacity", [hdr(T.VIRTIO_BLK_T_WRITE_ZEROES), seg(CAP, 1)], [1], SIOERR),
    ("discard-no-segment", [hdr(T.VIRTIO_BLK_T_DISCARD)], [1], SIOERR),
    ("discard-partial-segment", [hdr(T.VIRTIO_BLK_T_DISCARD), seg(0, 1)[:12]], [1], SIOERR),
    ("discard-two-segments", [hdr(T.VIRTIO_BLK_T_DISCARD), seg(0, 1) + seg(9, 8)], [1], SOK),
    ("wz-unmap", [hdr(T.VIRTIO_BLK_T_WRITE_ZEROES), seg(CAP - 8, 8, UNMAP)], [1], SOK),
    ("flush-with-data", [hdr(T.VIRTIO_BLK_T_FLUSH), bytes(SECTOR)], [1], SOK),
]


@pytest.mark.parametrize(
    ("readable", "writable", "expected"),
    [pytest.param(r, w, e, id=n) for n, r, w, e in STATUS_CASES],
)
async def test_status_table(readable: list[bytes], writable: list[int], expected: int) -> None:
    backend = MemoryBackend(bytes([0xAB]) * DISK)
    opts = BlkOptions(
        max_discard_seg=2, max_write_zeroes_seg=2, max_discard_sectors=8, max_write_zeroes_sectors=8
    )
    dev = VirtioBlk(backend, opts)
    async with DeviceHarness.start(dev) as h:
        used = await h.request(0, readable, writable)
    assert status_of(used) == expected
    if expected != SOK:
        # a rejected request changes nothing and reports only the status byte
        assert backend.data == bytes([0xAB]) * DISK
        assert used.written == 1


async def test_discard_write_zeroes_not_negotiated_is_unsupp() -> None:
    backend = MemoryBackend(bytes([1]) * DISK)
    dev = VirtioBlk(backend)
    drop = F.VIRTIO_BLK_F_DISCARD.mask | F.VIRTIO_BLK_F_WRITE_ZEROES.mask
    features = dev.offered_features() & ~(drop | TF.VIRTIO_F_RING_PACKED.mask)
    async with DeviceHarness.start(dev, features=features) as h:
        for t in (T.VIRTIO_BLK_T_DISCARD, T.VIRTIO_BLK_T_WRITE_ZEROES):
            used = await h.request(0, [hdr(t), seg(0, 1)], [1])
            assert status_of(used) == S.VIRTIO_BLK_S_UNSUPP
    assert backend.data == bytes([1]) * DISK


async def test_read_only_rejects_every_write_with_ioerr() -> None:
    """devicenormative:Device Types / Block Device / Device Operation (§5.2.6.2):
    IOERR for a write request when VIRTIO_BLK_F_RO is offered, and no data written."""
    backend = MemoryBackend(bytes([7]) * DISK)
    dev = VirtioBlk(backend, BlkOptions(read_only=True))
    assert dev.offered_features() & F.VIRTIO_BLK_F_RO.mask
    assert not dev.offered_features() & F.VIRTIO_BLK_F_DISCARD.mask
    async with DeviceHarness.start(dev) as h:
        for readable in (
            [hdr(T.VIRTIO_BLK_T_OUT, 0), bytes(SECTOR)],
            [hdr(T.VIRTIO_BLK_T_DISCARD), seg(0, 1)],
            [hdr(T.VIRTIO_BLK_T_WRITE_ZEROES), seg(0, 1, UNMAP)],
            [hdr(T.VIRTIO_BLK_T_SECURE_ERASE), seg(0, 1)],
        ):
            used = await h.request(0, readable, [1])
            assert status_of(used) == S.VIRTIO_BLK_S_IOERR
        used = await h.request(0, [hdr(T.VIRTIO_BLK_T_IN, 1)], [SECTOR + 1])
        assert used.data == bytes([7]) * SECTOR + bytes([S.VIRTIO_BLK_S_OK])
        used = await h.request(0, [hdr(T.VIRTIO_BLK_T_FLUSH)], [1])
        assert status_of(used) == S.VIRTIO_BLK_S_OK
    assert backend.data == bytes([7]) * DISK


async def test_blk_size_does_not_change_addressing() -> None:
    """§5.2.5: blk_size is advisory; sectors are always 512 bytes."""
    backend = MemoryBackend(DISK)
    dev = VirtioBlk(backend, BlkOptions(blk_size=4096, physical_block_exp=0, min_io_size=1))
    async with DeviceHarness.start(dev) as h:
        data = pattern(SECTOR, 3)
        used = await h.request(0, [hdr(T.VIRTIO_BLK_T_OUT, 3), data], [1])
        assert status_of(used) == S.VIRTIO_BLK_S_OK
    assert backend.data[3 * SECTOR : 4 * SECTOR] == data
    cfg = virtio_blk_config.parse(dev.config_bytes())
    assert cfg.blk_size == 4096 and cfg.capacity == CAP
    assert cfg.discard_sector_alignment == 4096 // SECTOR


# -- hostile chains -------------------------------------------------------------------------
HOSTILE = [
    pytest.param([hdr(T.VIRTIO_BLK_T_IN)], [], id="no-writable-status"),
    pytest.param([hdr(T.VIRTIO_BLK_T_OUT), bytes(SECTOR)], [], id="out-no-status"),
    pytest.param([hdr(T.VIRTIO_BLK_T_IN)[:15]], [SECTOR + 1], id="header-15-bytes"),
    pytest.param([], [SECTOR + 1], id="no-readable-part"),
]


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize(("readable", "writable"), HOSTILE)
async def test_hostile_chain_needs_reset(packed: bool, readable, writable) -> None:
    backend = MemoryBackend(bytes([5]) * DISK)
    dev = VirtioBlk(backend)
    async with DeviceHarness.start(dev, packed=packed) as h:
        h.submit(0, readable, writable)
        await wait_needs_reset(h)
        before = bytes(h.memory.read(0, len(h.memory.regions[0].buffer)))
    assert isinstance(h.driver_errors[0], DescriptorChainError)
    assert "5.2.6" in str(h.driver_errors[0])
    assert dev.needs_reset
    assert backend.data == bytes([5]) * DISK
    assert before  # memory still readable; nothing was completed
    assert h.queues[0].inflight == 1


@pytest.mark.parametrize(("packed", "indirect"), RINGS)
async def test_writes_stay_inside_the_given_buffers(packed: bool, indirect: bool) -> None:
    """Diff all of guest memory around each request: outside the rings, the device
    changed only bytes of that request's device-writable buffers - and for a
    request that fails, only its final status byte."""
    backend = MemoryBackend(pattern(DISK, 9))
    dev = VirtioBlk(backend, BlkOptions(serial="x" * 20))
    cases = [
        ([hdr(T.VIRTIO_BLK_T_IN, 2)], [SECTOR - 3, 4], SECTOR + 1, False),
        ([hdr(T.VIRTIO_BLK_T_GET_ID)], [5], 5, False),
        ([hdr(T.VIRTIO_BLK_T_GET_ID)], [40, 3], 21, False),
        ([hdr(T.VIRTIO_BLK_T_IN, CAP)], [3, SECTOR - 2], 1, True),
        ([hdr(T.VIRTIO_BLK_T_IN, 0)], [100, 1], 1, True),
        ([hdr(T.VIRTIO_BLK_T_FLUSH)], [7, 9], 1, True),
        ([hdr(0x55)], [2, 2], 1, True),
    ]
    async with DeviceHarness.start(dev, packed=packed, queue_size=8, data_size=1 << 16) as h:
        dq = h.queues[0]
        mem = h.memory
        size = len(mem.regions[0].buffer)
        for readable, writable, expected_len, status_only in cases:
            mem.write(dq.data_addr, b"\xee" * (size - dq.data_addr))  # canary
            tok = h.submit(0, readable, writable, use_indirect=indirect)
            ranges = list(dq._inflight[tok].writable)  # (addr, len) of writable buffers
            before = mem.read(0, size)
            used = await h.wait_used(0, tok)
            after = mem.read(0, size)
            assert used.written == expected_len
            if status_only:
                addr, n = ranges[-1]
                ranges = [(addr + n - 1, 1)]  # the status byte alone
            # Mask the allowed ranges; every other byte past the rings is unchanged.
            masked = bytearray(after)
            for addr, n in ranges:
                masked[addr : addr + n] = before[addr : addr + n]
            assert masked[dq.data_addr :] == before[dq.data_addr :]
            assert after[dq.data_addr :] != before[dq.data_addr :]  # it did write


# -- configuration space ---------------------------------------------------------------------
def test_config_space_and_features() -> None:
    opts = BlkOptions(
        num_queues=4,
        queue_size=128,
        size_max=1 << 20,
        blk_size=4096,
        physical_block_exp=1,
        alignment_offset=2,
        min_io_size=8,
        opt_io_size=256,
        max_discard_sectors=1024,
        max_discard_seg=4,
        max_write_zeroes_sectors=2048,
        max_write_zeroes_seg=8,
    )
    dev = VirtioBlk(MemoryBackend(DISK + 100), opts)
    f = dev.offered_features()
    for bit in (
        F.VIRTIO_BLK_F_SIZE_MAX,
        F.VIRTIO_BLK_F_SEG_MAX,
        F.VIRTIO_BLK_F_BLK_SIZE,
        F.VIRTIO_BLK_F_TOPOLOGY,
        F.VIRTIO_BLK_F_FLUSH,
        F.VIRTIO_BLK_F_CONFIG_WCE,
        F.VIRTIO_BLK_F_MQ,
        F.VIRTIO_BLK_F_DISCARD,
        F.VIRTIO_BLK_F_WRITE_ZEROES,
    ):
        assert f & bit.mask, bit.name
    for bit in (F.VIRTIO_BLK_F_RO, F.VIRTIO_BLK_F_GEOMETRY, F.VIRTIO_BLK_F_ZONED):
        assert not f & bit.mask, bit.name
    assert dev.queue_max_sizes == (128,) * 4 and dev.num_queues == 4
    raw = dev.config_bytes()
    assert len(raw) == virtio_blk_config.sizeof()
    cfg = virtio_blk_config.parse(raw)
    assert cfg.capacity == CAP  # trailing partial sector not exposed
    assert (cfg.size_max, cfg.seg_max, cfg.blk_size) == (1 << 20, 126, 4096)
    t = cfg.topology
    assert (t.physical_block_exp, t.alignment_offset, t.min_io_size, t.opt_io_size) == (
        1,
        2,
        8,
        256,
    )
    assert (cfg.writeback, cfg.unused0, cfg.num_queues) == (1, 0, 4)
    assert (cfg.max_discard_sectors, cfg.max_discard_seg, cfg.discard_sector_alignment) == (
        1024,
        4,
        8,
    )
    assert (cfg.max_write_zeroes_sectors, cfg.max_write_zeroes_seg) == (2048, 8)
    assert cfg.write_zeroes_may_unmap == 1 and cfg.unused1 == bytes(3)


def test_single_queue_does_not_offer_mq_and_options_validate() -> None:
    dev = VirtioBlk(MemoryBackend(DISK))
    assert not dev.offered_features() & F.VIRTIO_BLK_F_MQ.mask
    assert not dev.offered_features() & F.VIRTIO_BLK_F_SIZE_MAX.mask
    for bad in (
        {"num_queues": 0},
        {"queue_size": 100},
        {"blk_size": 256},
        {"serial": "x" * 21},
        {"serial": "é"},
        {"max_discard_seg": -1},
    ):
        with pytest.raises(ValueError):
            BlkOptions(**bad)


def test_writeback_config_write_and_cache_modes() -> None:
    dev = VirtioBlk(MemoryBackend(DISK))
    all_blk = dev.offered_features()
    dev.ack_features(all_blk)
    assert dev.writeback == 1 and not dev.writethrough
    dev.write_config(WRITEBACK_OFFSET, b"\x00")
    assert virtio_blk_config.parse(dev.config_bytes()).writeback == 0 and dev.writethrough
    dev.write_config(0, b"\xff" * 8)  # capacity is read-only: ignored
    assert virtio_blk_config.parse(dev.config_bytes()).capacity == CAP
    # a wide write covering writeback (vhost-user SET_CONFIG of the whole struct)
    cfg = bytearray(dev.config_bytes())
    cfg[WRITEBACK_OFFSET] = 1
    dev.write_config(0, bytes(cfg))
    assert dev.writeback == 1
    dev.reset()
    assert dev.writeback == 1
    # CONFIG_WCE without FLUSH: writeback MUST start at 0 (devicenormative §5.2.5.2)
    dev.ack_features(all_blk & ~F.VIRTIO_BLK_F_FLUSH.mask)
    assert dev.writeback == 0 and dev.writethrough
    dev.reset()
    # neither CONFIG_WCE nor FLUSH negotiated: writes stable at completion (case 1)
    dev.ack_features(all_blk & ~(F.VIRTIO_BLK_F_FLUSH.mask | F.VIRTIO_BLK_F_CONFIG_WCE.mask))
    assert dev.writethrough
    dev.write_config(WRITEBACK_OFFSET, b"\x01")  # CONFIG_WCE not negotiated: ignored
    assert dev.writethrough
    dev.reset()
    # FLUSH only: writeback cache, unless configured writethrough
    dev.ack_features(all_blk & ~F.VIRTIO_BLK_F_CONFIG_WCE.mask)
    assert not dev.writethrough
    wt = VirtioBlk(MemoryBackend(DISK), BlkOptions(writeback=False))
    wt.ack_features(all_blk & ~F.VIRTIO_BLK_F_CONFIG_WCE.mask)
    assert wt.writethrough


async def test_writethrough_writes_are_synced() -> None:
    backend = MemoryBackend(DISK)
    dev = VirtioBlk(backend)
    async with DeviceHarness.start(dev) as h:
        await h.request(0, [hdr(T.VIRTIO_BLK_T_OUT, 0), bytes(SECTOR)], [1])
        assert backend.synced_writes == 0
        dev.write_config(WRITEBACK_OFFSET, b"\x00")
        await h.request(0, [hdr(T.VIRTIO_BLK_T_OUT, 0), bytes(SECTOR)], [1])
        await h.request(0, [hdr(T.VIRTIO_BLK_T_WRITE_ZEROES), seg(0, 1)], [1])
        assert backend.synced_writes == 2


# -- concurrency -------------------------------------------------------------------------------
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
async def test_many_requests_in_flight_on_two_queues(tmp_path, packed: bool) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(256 * SECTOR))
    dev = VirtioBlk.from_options(BlkOptions(path=path, num_queues=2))
    n = 48
    try:
        async with DeviceHarness.start(dev, packed=packed, queue_size=256) as h:
            # Each queue owns half the disk; n writes in flight per queue, every other
            # one through an indirect table.
            expected = {}
            tokens = []
            for i, q in itertools.product(range(n), range(2)):
                sector = q * 128 + i * 2
                data = pattern(2 * SECTOR, seed=i * 2 + q)
                expected[sector] = data
                tok = h.submit(q, [hdr(T.VIRTIO_BLK_T_OUT, sector), data], [1], use_indirect=i % 2)
                tokens.append((q, tok))
            for q, tok in tokens:
                used = await h.wait_used(q, tok)
                assert status_of(used) == S.VIRTIO_BLK_S_OK
            reads = [
                (s, q, h.submit(q, [hdr(T.VIRTIO_BLK_T_IN, s)], [2 * SECTOR + 1]))
                for s, q in ((s, s // 128) for s in expected)
            ]
            for s, q, tok in reads:
                used = await h.wait_used(q, tok)
                assert used.data == expected[s] + bytes([S.VIRTIO_BLK_S_OK])
        disk = path.read_bytes()
        for s, data in expected.items():
            assert disk[s * SECTOR : (s + 2) * SECTOR] == data
    finally:
        dev.close()


# -- migration dirty log -------------------------------------------------------------------------
class _MigrationPassDuringRead(MemoryBackend):
    """Clears the dirty log while a read is in progress, as a migration pass would."""

    log: bytearray

    async def read(self, offset, views) -> None:
        self.log[:] = bytes(len(self.log))
        await super().read(offset, views)


async def test_read_data_pages_are_logged_after_they_are_filled() -> None:
    backend = _MigrationPassDuringRead(pattern(DISK, 4))
    dev = VirtioBlk(backend)
    async with DeviceHarness.start(dev, queue_size=8, data_size=1 << 16) as h:
        size = len(h.memory.regions[0].buffer)
        backend.log = bytearray((size // 4096 + 7) // 8)
        h.memory.set_dirty_log(memoryview(backend.log))
        tok = h.submit(0, [hdr(T.VIRTIO_BLK_T_IN, 0)], [4 * 4096, 1])
        (addr, n), _status = h.queues[0]._inflight[tok].writable
        used = await h.wait_used(0, tok)
        h.memory.set_dirty_log(None)
    assert used.data[:-1] == backend.data[: 4 * 4096]
    for page in range(addr // 4096, (addr + n - 1) // 4096 + 1):
        assert backend.log[page // 8] >> (page % 8) & 1, f"page {page} not logged"
