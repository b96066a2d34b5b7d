"""The NE2000 model as a register machine (no CPU), and the ne2000 workload on both CPUs."""

from __future__ import annotations

import zlib

import pytest

from emulator.devices import dp8390 as d
from emulator.devices.ne2000 import (
    EthernetLink,
    Ne2000,
    RemoteDmaError,
    RingConfigError,
    TransmitError,
    mcast_index,
)
from emulator.ne2000_paths import MAX_QUEUE_DEPTH, max_batch, packet_count
from emulator.run import run_workload

MAC_A = bytes.fromhex("525400000001")
MAC_B = bytes.fromhex("525400000002")
TX_PAGE, RX_START, RX_STOP = 0x40, 0x46, 0x80


class Driver:
    """Drives one board through its ports the way ne.c + lib8390.c do (16-bit mode)."""

    def __init__(self, nic: Ne2000) -> None:
        self.nic = nic
        self.next = RX_START + 1

    def w(self, reg: int, v: int) -> None:
        self.nic.write(reg, 1, v)

    def r(self, reg: int) -> int:
        return self.nic.read(reg, 1)

    def dma(self, addr: int, count: int, rd: int) -> None:
        self.w(d.REG_RBCR0, count & 0xFF)
        self.w(d.REG_RBCR1, count >> 8)
        self.w(d.REG_RSAR0, addr & 0xFF)
        self.w(d.REG_RSAR1, addr >> 8)
        self.w(d.REG_CR, rd | d.CR_STA)

    def read_mem(self, addr: int, count: int) -> bytes:
        self.dma(addr, count, d.CR_RD_READ)
        out = b"".join(
            self.nic.read(d.DATA_PORT, 2).to_bytes(2, "little") for _ in range((count + 1) // 2)
        )
        assert self.r(d.REG_ISR) & d.ISR_RDC
        self.w(d.REG_ISR, d.ISR_RDC)
        return out[:count]

    def write_mem(self, addr: int, data: bytes) -> None:
        data = data + b"\0" * (len(data) & 1)
        self.dma(addr, len(data), d.CR_RD_WRITE)
        for i in range(0, len(data), 2):
            self.nic.write(d.DATA_PORT, 2, int.from_bytes(data[i : i + 2], "little"))
        assert self.r(d.REG_ISR) & d.ISR_RDC
        self.w(d.REG_ISR, d.ISR_RDC)

    def init(self, rcr: int = d.RCR_AB) -> bytes:
        self.nic.read(d.RESET_PORT, 1)
        assert self.r(d.REG_ISR) & d.ISR_RST
        self.w(d.REG_CR, d.CR_PAGE0 | d.CR_RD_ABORT | d.CR_STP)
        self.w(d.REG_DCR, d.DCR_FT1 | d.DCR_LS | d.DCR_WTS)
        prom = self.read_mem(0, d.PROM_SIZE)
        mac = prom[0:12:2]
        self.w(d.REG_PSTART, RX_START)
        self.w(d.REG_PSTOP, RX_STOP)
        self.w(d.REG_BNRY, RX_START)
        self.w(d.REG_CR, d.CR_PAGE1 | d.CR_RD_ABORT | d.CR_STP)
        for i, b in enumerate(mac):
            self.w(d.REG_PAR0 + i, b)
        self.w(d.REG_CURR, RX_START + 1)
        self.w(d.REG_CR, d.CR_PAGE0 | d.CR_RD_ABORT | d.CR_STA)
        self.w(d.REG_TCR, 0)
        self.w(d.REG_RCR, rcr)
        self.w(d.REG_ISR, 0xFF)
        return mac

    def send(self, frame: bytes) -> int:
        self.write_mem(TX_PAGE * 256, frame)
        self.w(d.REG_TPSR, TX_PAGE)
        self.w(d.REG_TBCR0, len(frame) & 0xFF)
        self.w(d.REG_TBCR1, len(frame) >> 8)
        self.w(d.REG_CR, d.CR_RD_ABORT | d.CR_TXP | d.CR_STA)
        isr = self.r(d.REG_ISR)
        self.w(d.REG_ISR, d.ISR_PTX | d.ISR_TXE)
        return isr

    def curr(self) -> int:
        self.w(d.REG_CR, d.CR_PAGE1 | d.CR_RD_ABORT | d.CR_STA)
        c = self.r(d.REG_CURR)
        self.w(d.REG_CR, d.CR_PAGE0 | d.CR_RD_ABORT | d.CR_STA)
        return c

    def receive_all(self) -> list[bytes]:
        frames = []
        curr = self.curr()
        while self.next != curr:
            status, nxt, lo, hi = self.read_mem(self.next * 256, 4)
            assert status & d.RSR_PRX
            count = lo | hi << 8
            data = self.read_mem(self.next * 256 + 4, count)
            frame, fcs = data[:-4], data[-4:]
            assert zlib.crc32(frame).to_bytes(4, "little") == fcs
            frames.append(frame)
            self.next = nxt
            self.w(d.REG_BNRY, RX_STOP - 1 if nxt == RX_START else nxt - 1)
        self.w(d.REG_ISR, d.ISR_PRX)
        return frames


def frame(dst: bytes, src: bytes, n: int, seed: int = 0) -> bytes:
    payload = bytes((seed + i * 7) & 0xFF for i in range(n - 14))
    return dst + src + b"\x88\xb5" + payload


@pytest.fixture
def pair():
    irqs: dict[str, list[bool]] = {"a": [], "b": []}
    a = Ne2000(MAC_A, irq=irqs["a"].append, name="a")
    b = Ne2000(MAC_B, irq=irqs["b"].append, name="b")
    EthernetLink(a, b)
    da, db = Driver(a), Driver(b)
    assert da.init() == MAC_A
    assert db.init() == MAC_B
    return da, db, irqs


def test_prom_holds_the_station_address_doubled():
    nic = Ne2000(MAC_A)
    drv = Driver(nic)
    drv.w(d.REG_DCR, d.DCR_WTS | d.DCR_LS)
    prom = drv.read_mem(0, 32)
    assert prom[0:12] == bytes(b for b in MAC_A for _ in range(2))
    assert prom[28:32] == bytes([d.PROM_SIGNATURE] * 4)
    assert not nic.errors


def test_frames_cross_the_cable_both_ways_with_wrap(pair):
    da, db, _ = pair
    sent = []
    # 40 maximum frames: the 58-page ring wraps several times.
    for i in range(40):
        f = frame(MAC_B, MAC_A, d.ETH_FRAME_LEN if i % 3 else 100 + i, seed=i)
        assert da.send(f) & d.ISR_PTX
        sent.append(f)
        if i % 4 == 3:
            assert db.receive_all() == sent
            sent = []
    back = frame(MAC_A, MAC_B, 60)
    da.send(frame(MAC_A, MAC_A, 60))  # not for b: filtered out by PAR
    assert db.nic.rx_filtered == 1
    db.send(back)
    assert da.receive_all() == [back]
    assert da.nic.tx_frames == 41 and db.nic.rx_frames == 40
    assert not da.nic.errors and not db.nic.errors


def test_short_frames_are_padded_and_broadcast_needs_rcr_ab(pair):
    da, db, _ = pair
    da.send(frame(MAC_B, MAC_A, 20))
    (got,) = db.receive_all()
    assert len(got) == d.ETH_ZLEN and got[:20] == frame(MAC_B, MAC_A, 20)
    bcast = frame(b"\xff" * 6, MAC_A, 64)
    da.send(bcast)
    assert db.receive_all() == [bcast]
    db.w(d.REG_RCR, 0)
    da.send(bcast)
    assert db.receive_all() == [] and db.nic.rx_filtered == 1


def test_multicast_hash_matches_the_ethernet_crc_msbs():
    def ether_crc_msb6(addr: bytes) -> int:  # the bitwise definition (big-endian CRC-32)
        crc = 0xFFFFFFFF
        for byte in addr:
            for bit in range(8):
                top = (crc >> 31) ^ ((byte >> bit) & 1)
                crc = ((crc << 1) & 0xFFFFFFFF) ^ (0x04C11DB7 if top else 0)
        return crc >> 26

    for addr in (bytes.fromhex("01005e000001"), bytes.fromhex("333300000001"), b"\x01" * 6):
        assert mcast_index(addr) == ether_crc_msb6(addr)


def test_internal_loopback_receives_own_frame():
    nic = Ne2000(MAC_A)
    drv = Driver(nic)
    drv.init()
    drv.w(d.REG_TCR, d.TCR_LB_INTERNAL)
    f = frame(MAC_A, MAC_A, 200)
    assert drv.send(f) & d.ISR_PTX
    assert drv.receive_all() == [f]


def test_interrupt_line_follows_isr_and_imr(pair):
    da, db, irqs = pair
    db.w(d.REG_IMR, d.ISR_PRX)
    da.send(frame(MAC_B, MAC_A, 100))
    assert irqs["b"] == [True] and db.nic.irq_level
    db.w(d.REG_ISR, d.ISR_PRX)
    assert irqs["b"] == [True, False]


def test_full_ring_drops_and_counts_missed(pair):
    da, db, _ = pair
    n = max_batch()
    for i in range(n + 2):
        da.send(frame(MAC_B, MAC_A, d.ETH_FRAME_LEN, seed=i))
    assert db.nic.rx_frames == n and db.nic.rx_missed == 2
    assert db.r(d.REG_ISR) & d.ISR_OVW
    assert db.r(d.REG_CNTR2) == 2
    assert len(db.receive_all()) == n
    # The ring has room again: traffic resumes.
    da.send(frame(MAC_B, MAC_A, 300))
    assert len(db.receive_all()) == 1


@pytest.mark.parametrize(
    ("reg", "value", "match"),
    [
        (d.REG_PSTART, 0x10, "PSTART page 0x10 outside the buffer RAM"),
        (d.REG_PSTOP, 0x90, "PSTOP page 0x90 outside the buffer RAM"),
        (d.REG_BNRY, 0x20, "BNRY page 0x20 outside the receive ring"),
    ],
)
def test_bad_page_pointers_are_errors_and_frames_are_dropped(pair, reg, value, match):
    da, db, _ = pair
    db.w(reg, value)
    assert isinstance(db.nic.errors[0], RingConfigError)
    assert match in str(db.nic.errors[0])
    da.send(frame(MAC_B, MAC_A, 100))
    assert db.nic.rx_frames == 0 and db.nic.rx_missed == 1
    assert "inconsistent: frame dropped" in str(db.nic.errors[-1])
    # Memory outside the ring was never written.
    assert db.nic.mem[d.PROM_SIZE : d.RAM_START] == bytes(d.RAM_START - d.PROM_SIZE)


def test_curr_outside_ring_is_an_error(pair):
    _, db, _ = pair
    db.w(d.REG_CR, d.CR_PAGE1 | d.CR_RD_ABORT | d.CR_STA)
    db.w(d.REG_CURR, 0x7F + 1)
    assert "CURR page 0x80 outside the receive ring" in str(db.nic.errors[0])


@pytest.mark.parametrize(
    ("addr", "count", "kind", "match"),
    [
        (0x1000, 16, d.CR_RD_READ, "start outside the board's memory"),
        (0x7F00, 0x200, d.CR_RD_WRITE, "runs 256 bytes past the buffer RAM"),
        (0x4600, 0xFFFF, d.CR_RD_READ, "longer than the ring"),
        (0x0010, 0x40, d.CR_RD_READ, "start outside"),
    ],
)
def test_remote_dma_outside_memory_moves_nothing(pair, addr, count, kind, match):
    da, _, _ = pair
    before = bytes(da.nic.mem)
    da.dma(addr, count, kind)
    assert isinstance(da.nic.errors[0], RemoteDmaError)
    assert match in str(da.nic.errors[0])
    assert da.r(d.REG_ISR) & d.ISR_RDC  # completes at once: a polling driver goes on
    if kind == d.CR_RD_READ:
        assert da.nic.read(d.DATA_PORT, 2) == 0xFFFF
    else:
        da.nic.write(d.DATA_PORT, 2, 0x1234)
    assert bytes(da.nic.mem) == before
    assert "without an active remote" in str(da.nic.errors[1])


def test_data_port_past_the_byte_count_is_an_error(pair):
    da, _, _ = pair
    da.write_mem(0x4000, b"abcd")
    da.nic.write(d.DATA_PORT, 2, 0x4141)
    assert da.nic.mem[0x4004:0x4006] == b"\0\0"
    assert isinstance(da.nic.errors[0], RemoteDmaError)


@pytest.mark.parametrize(
    ("tpsr", "tbcr", "match"),
    [
        (0x20, 100, "TPSR page 0x20 outside the buffer RAM"),
        (0x40, 0x5000, "TBCR 20480 outside 14..1514 bytes"),
        (0x40, 0, "TBCR 0 outside"),
        (0x7F, 1000, "runs past the buffer RAM"),
    ],
)
def test_bad_transmit_aborts(pair, tpsr, tbcr, match):
    da, db, _ = pair
    da.w(d.REG_TPSR, tpsr)
    da.w(d.REG_TBCR0, tbcr & 0xFF)
    da.w(d.REG_TBCR1, tbcr >> 8)
    da.w(d.REG_CR, d.CR_RD_ABORT | d.CR_TXP | d.CR_STA)
    assert da.r(d.REG_ISR) & d.ISR_TXE and not da.r(d.REG_ISR) & d.ISR_PTX
    assert da.r(d.REG_TSR) & d.TSR_ABT
    assert isinstance(da.nic.errors[0], TransmitError) and match in str(da.nic.errors[0])
    assert db.nic.rx_frames == 0 and da.nic.link.frames == 0


def test_stopped_receiver_drops(pair):
    da, db, _ = pair
    db.w(d.REG_CR, d.CR_STP | d.CR_RD_ABORT)
    da.send(frame(MAC_B, MAC_A, 100))
    assert db.nic.rx_frames == 0 and db.nic.rx_missed == 1


def test_register_garbage_never_raises():
    """Random port traffic: the model records errors but never raises or writes outside."""
    import random

    rng = random.Random(7)
    a, b = Ne2000(MAC_A), Ne2000(MAC_B)
    EthernetLink(a, b)
    for _ in range(20000):
        nic = rng.choice((a, b))
        off = rng.choice([*range(16), d.DATA_PORT, d.RESET_PORT])
        size = 2 if off == d.DATA_PORT else 1
        if rng.random() < 0.5:
            nic.write(off, size, rng.getrandbits(8 * size))
        else:
            nic.read(off, size)
        assert len(a.mem) == len(b.mem) == d.RAM_END


# --- the guest workload --------------------------------------------------------------------
@pytest.mark.usefixtures("need_gcc")
@pytest.mark.parametrize("qd", [1, MAX_QUEUE_DEPTH])
def test_ne2000_workload_counts_match_on_both_cpus(cpu, qd):
    res = run_workload("ne2000", cpu, kib=48, queue_depth=qd)
    assert res["verified"], res
    assert res["unit"] == "packet" and res["io_bytes"] == d.ETH_FRAME_LEN
    ios = res["ios"]
    assert ios == packet_count(48 << 10, qd) and ios % (2 * qd) == 0
    regs = res["exits_by_register"]
    # Transmit: 757 words of rep outsw, one exit each; receive: rep insw batched per page.
    assert regs["ne2000-0.data"] == regs["ne2000-1.data"] == (757 + 3) * ios // 2
    assert res["exits_by_reason"] == {"PIO": res["exits_total"]}
    # Per packet: 757 + 3 data exits, 13 transmit-side register exits (remote write set-up
    # 5, RDC poll + ack 2, TPSR/TBCR/CR 4, PTX poll + ack 2) and 15 receive-side ones
    # (two remote reads 2 x 7, BNRY 1); per batch the receiver reads and acknowledges
    # ISR and reads CURR through page 1 (5).
    assert res["exits_total"] == ios * (760 + 13 + 15) + (ios // qd) * 5
    assert res["phases"]["a-to-b"]["exits"] == res["phases"]["b-to-a"]["exits"]
