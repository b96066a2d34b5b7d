"""The IDE device as a pure register machine: no CPU, a bytearray disk and a RAM stub."""

from __future__ import annotations

import os
import struct

import pytest

from emulator.bus import Bus
from emulator.devices import ata
from emulator.devices.ide import (
    BM_WINDOW,
    CMD_WINDOW,
    CTRL_WINDOW,
    AtaCommandError,
    AtaProtocolError,
    BmdmaError,
    FileBackend,
    IdeController,
    MemoryBackend,
)
from emulator.exits import PioExit

SECTOR = ata.SECTOR_SIZE


class Ram:
    def __init__(self, size: int = 1 << 20) -> None:
        self.buf = bytearray(size)
        self.size = size

    def read(self, addr: int, length: int) -> bytes:
        return bytes(self.buf[addr : addr + length])

    def write(self, addr: int, data: bytes) -> None:
        self.buf[addr : addr + len(data)] = data


class Host:
    """Drives the controller the way a driver would, through its register windows."""

    def __init__(self, sectors: int = 256) -> None:
        self.disk = MemoryBackend(bytearray(os.urandom(sectors * SECTOR)))
        self.ram = Ram()
        self.irq_log: list[bool] = []
        self.ide = IdeController(self.disk, memory=self.ram, irq=self.irq_log.append)

    def out(self, reg: int, value: int, size: int = 1) -> None:
        self.ide.write(CMD_WINDOW + reg, size, value)

    def inp(self, reg: int, size: int = 1) -> int:
        return self.ide.read(CMD_WINDOW + reg, size)

    def status(self) -> int:
        return self.inp(ata.REG_STATUS)

    def altstatus(self) -> int:
        return self.ide.read(CTRL_WINDOW + ata.REG_ALTSTATUS, 1)

    def devctl(self, value: int) -> None:
        self.ide.write(CTRL_WINDOW + ata.REG_DEVCTL, 1, value)

    def bm_out(self, reg: int, value: int, size: int = 1) -> None:
        self.ide.write(BM_WINDOW + reg, size, value)

    def bm_in(self, reg: int, size: int = 1) -> int:
        return self.ide.read(BM_WINDOW + reg, size)

    def taskfile(self, lba: int, count: int, lba48: bool = False) -> None:
        if lba48:
            self.out(ata.REG_NSECT, count >> 8 & 0xFF)
            self.out(ata.REG_LBAL, lba >> 24 & 0xFF)
            self.out(ata.REG_LBAM, lba >> 32 & 0xFF)
            self.out(ata.REG_LBAH, lba >> 40 & 0xFF)
            self.out(ata.REG_NSECT, count & 0xFF)
            self.out(ata.REG_LBAL, lba & 0xFF)
            self.out(ata.REG_LBAM, lba >> 8 & 0xFF)
            self.out(ata.REG_LBAH, lba >> 16 & 0xFF)
            self.out(ata.REG_DEVICE, ata.DEVICE_OBS | ata.DEVICE_LBA)
        else:
            self.out(ata.REG_NSECT, count & 0xFF)
            self.out(ata.REG_LBAL, lba & 0xFF)
            self.out(ata.REG_LBAM, lba >> 8 & 0xFF)
            self.out(ata.REG_LBAH, lba >> 16 & 0xFF)
            self.out(ata.REG_DEVICE, ata.DEVICE_OBS | ata.DEVICE_LBA | (lba >> 24 & 0xF))

    def read_words(self, n: int) -> bytes:
        return b"".join(self.inp(ata.REG_DATA, 2).to_bytes(2, "little") for _ in range(n))

    def write_words(self, data: bytes) -> None:
        for i in range(0, len(data), 2):
            self.out(ata.REG_DATA, int.from_bytes(data[i : i + 2], "little"), 2)

    def prd(self, table: int, entries: list[tuple[int, int, bool]]) -> None:
        for i, (addr, count, eot) in enumerate(entries):
            flags = ata.PRD_EOT if eot else 0
            self.ram.write(table + 8 * i, struct.pack("<IHH", addr, count & 0xFFFF, flags))


@pytest.fixture
def host() -> Host:
    return Host()


# --- register file ------------------------------------------------------------------------
def test_power_on_state(host):
    assert host.status() == ata.STATUS_DRDY
    assert host.inp(ata.REG_NSECT) == 1 and host.inp(ata.REG_LBAL) == 1
    assert host.bm_in(ata.BM_REG_STATUS) & ata.BM_STATUS_DRV0_DMA


def test_register_names(host):
    assert host.ide.register_name(CMD_WINDOW + ata.REG_STATUS, False) == "status"
    assert host.ide.register_name(CMD_WINDOW + ata.REG_COMMAND, True) == "command"
    assert host.ide.register_name(CMD_WINDOW + ata.REG_FEATURES, True) == "features"
    assert host.ide.register_name(CTRL_WINDOW, True) == "devctl"
    assert host.ide.register_name(CTRL_WINDOW, False) == "altstatus"
    assert host.ide.register_name(BM_WINDOW + ata.BM_REG_PRDT, True) == "bm_prdt"


def test_attach_maps_three_windows():
    bus = Bus()
    ide = IdeController(MemoryBackend(64 * SECTOR))
    ide.attach(bus)
    assert bus.handle(PioExit(ata.PRIMARY_CMD_BASE + ata.REG_STATUS, 1, False)) == bytes(
        [ata.STATUS_DRDY]
    )
    bus.handle(PioExit(ata.BMDMA_BASE + ata.BM_REG_PRDT, 4, True, 1, b"\x00\x10\x00\x00"))
    assert ide.bm_prdt == 0x1000
    bus.handle(PioExit(ata.PRIMARY_CTRL_BASE, 1, True, 1, bytes([ata.DEVCTL_NIEN])))
    assert ide.devctl == ata.DEVCTL_NIEN
    assert set(bus.stats.by_register) == {"ide.status", "ide.bm_prdt", "ide.devctl"}


def test_hob_readback(host):
    host.taskfile(0x0A0B0C0D0E0F, 0x0102, lba48=True)
    assert host.inp(ata.REG_LBAL) == 0x0F
    host.devctl(ata.DEVCTL_HOB)
    assert host.inp(ata.REG_LBAL) == 0x0C and host.inp(ata.REG_NSECT) == 0x01
    host.out(ata.REG_FEATURES, 0)  # any Command Block write clears HOB
    assert host.inp(ata.REG_LBAL) == 0x0F


def test_identify(host):
    host.out(ata.REG_DEVICE, ata.DEVICE_LBA)
    host.out(ata.REG_COMMAND, ata.CMD_IDENTIFY_DEVICE)
    assert host.status() & ata.STATUS_DRQ
    words = struct.unpack("<256H", host.read_words(256))
    assert host.status() == ata.STATUS_DRDY
    assert words[ata.ID_CAPABILITIES] & ata.ID_CAP_LBA
    assert words[ata.ID_COMMAND_SET_2] & ata.ID_CMDSET2_LBA48
    assert words[ata.ID_LBA48_SECTORS] == 256
    assert words[ata.ID_LBA28_SECTORS] == 256
    model = b"".join(w.to_bytes(2, "big") for w in words[27:47]).decode().strip()
    assert model == "PYVIRTIO IDE DISK"


# --- PIO ----------------------------------------------------------------------------------
@pytest.mark.parametrize("lba48", [False, True])
def test_pio_read_sectors(host, lba48):
    host.taskfile(10, 3, lba48)
    host.out(ata.REG_COMMAND, ata.CMD_READ_SECTORS_EXT if lba48 else ata.CMD_READ_SECTORS)
    data = b""
    for _ in range(3):
        st = host.status()
        assert st & ata.STATUS_DRQ and not st & ata.STATUS_ERR
        data += host.read_words(256)
    assert data == host.disk.read(10, 3)
    assert host.status() == ata.STATUS_DRDY


@pytest.mark.parametrize("lba48", [False, True])
def test_pio_write_sectors(host, lba48):
    payload = os.urandom(2 * SECTOR)
    host.taskfile(200, 2, lba48)
    host.out(ata.REG_COMMAND, ata.CMD_WRITE_SECTORS_EXT if lba48 else ata.CMD_WRITE_SECTORS)
    assert host.altstatus() & ata.STATUS_DRQ
    host.write_words(payload[:SECTOR])
    assert host.status() & ata.STATUS_DRQ
    host.write_words(payload[SECTOR:])
    assert host.status() == ata.STATUS_DRDY
    assert host.disk.read(200, 2) == payload


def test_multiple_mode(host):
    host.taskfile(0, 4)
    host.out(ata.REG_COMMAND, ata.CMD_READ_MULTIPLE)
    assert host.status() & ata.STATUS_ERR and host.inp(ata.REG_ERROR) == ata.ERROR_ABRT
    assert isinstance(host.ide.errors[-1], AtaCommandError)
    host.out(ata.REG_NSECT, 3)  # not a power of two
    host.out(ata.REG_COMMAND, ata.CMD_SET_MULTIPLE_MODE)
    assert host.status() & ata.STATUS_ERR
    host.out(ata.REG_NSECT, 4)
    host.out(ata.REG_COMMAND, ata.CMD_SET_MULTIPLE_MODE)
    assert host.status() == ata.STATUS_DRDY and host.ide.multiple_count == 4
    payload = os.urandom(6 * SECTOR)
    host.taskfile(20, 6)
    host.out(ata.REG_COMMAND, ata.CMD_WRITE_MULTIPLE)
    host.write_words(payload[: 4 * SECTOR])  # first DRQ block: 4 sectors
    assert host.status() & ata.STATUS_DRQ
    host.write_words(payload[4 * SECTOR :])  # last block: the remaining 2
    assert host.status() == ata.STATUS_DRDY
    assert host.disk.read(20, 6) == payload
    host.taskfile(20, 6, lba48=True)
    host.out(ata.REG_COMMAND, ata.CMD_READ_MULTIPLE_EXT)
    assert host.status() & ata.STATUS_DRQ
    assert host.read_words(4 * 256) == payload[: 4 * SECTOR]
    assert host.status() & ata.STATUS_DRQ
    assert host.read_words(2 * 256) == payload[4 * SECTOR :]
    assert host.status() == ata.STATUS_DRDY


def test_pio_32bit_data_access(host):
    host.taskfile(5, 1)
    host.out(ata.REG_COMMAND, ata.CMD_READ_SECTORS)
    got = b"".join(host.inp(ata.REG_DATA, 4).to_bytes(4, "little") for _ in range(128))
    assert got == host.disk.read(5, 1)


def test_flush_and_set_features(host):
    for op in (ata.CMD_FLUSH_CACHE, ata.CMD_FLUSH_CACHE_EXT, ata.CMD_SET_FEATURES):
        host.out(ata.REG_COMMAND, op)
        assert host.status() == ata.STATUS_DRDY
    assert host.disk.flushes == 2


def test_file_backend_flush_is_fdatasync(tmp_path):
    backend = FileBackend(tmp_path / "disk.img", size=16 * SECTOR)
    try:
        ide = IdeController(backend)
        ide.write(CMD_WINDOW + ata.REG_COMMAND, 1, ata.CMD_FLUSH_CACHE_EXT)
        assert backend.flushes == 1
        backend.write(3, b"x" * SECTOR)
        assert backend.read(3, 1) == b"x" * SECTOR
    finally:
        backend.close()


# --- interrupts ---------------------------------------------------------------------------
def test_intrq_and_nien(host):
    host.taskfile(0, 1)
    host.out(ata.REG_COMMAND, ata.CMD_READ_SECTORS)
    assert host.ide.irq_level and host.irq_log == [True]
    host.altstatus()  # alternate status does not acknowledge
    assert host.ide.irq_level
    host.status()
    assert not host.ide.irq_level and host.irq_log == [True, False]
    host.read_words(256)
    host.devctl(ata.DEVCTL_NIEN)
    host.taskfile(0, 1)
    host.out(ata.REG_COMMAND, ata.CMD_READ_SECTORS)
    assert host.ide.intrq and not host.ide.irq_level  # masked by nIEN
    host.devctl(0)
    assert host.ide.irq_level and host.irq_log[-1] is True


def test_software_reset(host):
    host.taskfile(0, 1)
    host.out(ata.REG_COMMAND, ata.CMD_READ_SECTORS)
    host.devctl(ata.DEVCTL_SRST)
    assert host.altstatus() & ata.STATUS_BSY
    host.devctl(0)
    assert host.status() == ata.STATUS_DRDY
    assert host.inp(ata.REG_NSECT) == 1 and host.inp(ata.REG_LBAL) == 1
    assert host.inp(ata.REG_ERROR) == 1


def test_device1_absent(host):
    host.out(ata.REG_DEVICE, ata.DEVICE_DEV | ata.DEVICE_LBA)
    assert host.status() == 0
    host.out(ata.REG_COMMAND, ata.CMD_IDENTIFY_DEVICE)
    assert host.ide.commands == []


# --- bus-master DMA -----------------------------------------------------------------------
def dma(host: Host, opcode: int, lba: int, count: int, to_host: bool, start_first=False):
    host.bm_out(ata.BM_REG_PRDT, 0x1000, 4)
    direction = ata.BM_CMD_READ if to_host else 0
    host.bm_out(ata.BM_REG_COMMAND, direction)
    host.bm_out(ata.BM_REG_STATUS, ata.BM_STATUS_W1C)
    lba48 = opcode in (ata.CMD_READ_DMA_EXT, ata.CMD_WRITE_DMA_EXT)
    host.taskfile(lba, count, lba48)
    if start_first:
        host.bm_out(ata.BM_REG_COMMAND, direction | ata.BM_CMD_START)
        host.out(ata.REG_COMMAND, opcode)
    else:
        host.out(ata.REG_COMMAND, opcode)
        host.bm_out(ata.BM_REG_COMMAND, direction | ata.BM_CMD_START)
    bm = host.bm_in(ata.BM_REG_STATUS)
    host.bm_out(ata.BM_REG_COMMAND, direction)
    st = host.status()
    return bm, st


@pytest.mark.parametrize("start_first", [False, True])
def test_dma_read_scatter(host, start_first):
    host.prd(0x1000, [(0x20000, 1024, False), (0x30000, 512, True)])
    bm, st = dma(host, ata.CMD_READ_DMA, 7, 3, True, start_first)
    assert bm & ata.BM_STATUS_INTR and not bm & (ata.BM_STATUS_ERROR | ata.BM_STATUS_ACTIVE)
    assert st == ata.STATUS_DRDY
    assert host.ram.read(0x20000, 1024) + host.ram.read(0x30000, 512) == host.disk.read(7, 3)


def test_dma_write_ext_gather(host):
    a, b = os.urandom(512), os.urandom(1536)
    host.ram.write(0x40000, a)
    host.ram.write(0x50000, b)
    host.prd(0x1000, [(0x40000, 512, False), (0x50000, 1536, True)])
    bm, st = dma(host, ata.CMD_WRITE_DMA_EXT, 100, 4, False)
    assert bm & ata.BM_STATUS_INTR and st == ata.STATUS_DRDY
    assert host.disk.read(100, 4) == a + b
    assert host.ide.errors == []


def test_dma_prd_larger_than_transfer_keeps_active(host):
    host.prd(0x1000, [(0x20000, 4096, True)])
    bm, st = dma(host, ata.CMD_READ_DMA, 0, 1, True)
    assert bm & ata.BM_STATUS_INTR and bm & ata.BM_STATUS_ACTIVE
    assert st == ata.STATUS_DRDY


def test_dma_count_zero_means_64k(host):
    host.disk = MemoryBackend(bytearray(os.urandom(256 * SECTOR)))
    host.ide.backend = host.disk
    host.prd(0x1000, [(0x80000, 0, True)])
    bm, st = dma(host, ata.CMD_READ_DMA, 0, 128, True)
    assert st == ata.STATUS_DRDY and not bm & ata.BM_STATUS_ACTIVE
    assert host.ram.read(0x80000, 0x10000) == host.disk.read(0, 128)


# --- malformed guest behaviour ------------------------------------------------------------
def assert_bm_error(host: Host, bm: int, st: int, fragment: str) -> None:
    assert bm & ata.BM_STATUS_ERROR and bm & ata.BM_STATUS_INTR
    assert not bm & ata.BM_STATUS_ACTIVE
    assert st & ata.STATUS_ERR and host.inp(ata.REG_ERROR) & ata.ERROR_ABRT
    err = host.ide.errors[-1]
    assert isinstance(err, BmdmaError) and "SFF-8038i" in err.rule
    assert fragment in str(err)


def test_prd_table_outside_ram(host):
    host.bm_out(ata.BM_REG_COMMAND, ata.BM_CMD_READ)
    host.taskfile(0, 1)
    host.out(ata.REG_COMMAND, ata.CMD_READ_DMA)
    host.bm_out(ata.BM_REG_PRDT, 0xFFFF_FFF8, 4)
    host.bm_out(ata.BM_REG_COMMAND, ata.BM_CMD_READ | ata.BM_CMD_START)
    assert_bm_error(host, host.bm_in(ata.BM_REG_STATUS), host.status(), "outside guest RAM")


def test_dma_buffer_outside_ram(host):
    host.prd(0x1000, [(0xF0000, 4096, False), (host.ram.size, 4096, True)])
    before = bytes(host.ram.buf)
    bm, st = dma(host, ata.CMD_READ_DMA, 0, 16, True)
    assert_bm_error(host, bm, st, "outside guest RAM")
    assert bytes(host.ram.buf) == before  # validated before touching memory


def test_prd_too_short(host):
    host.prd(0x1000, [(0x20000, 512, True)])
    bm, st = dma(host, ata.CMD_READ_DMA, 0, 2, True)
    assert_bm_error(host, bm, st, "fewer bytes")


def test_prd_odd_address_and_64k_crossing(host):
    host.prd(0x1000, [(0x20001, 512, True)])
    bm, st = dma(host, ata.CMD_READ_DMA, 0, 1, True)
    assert_bm_error(host, bm, st, "odd")
    host.prd(0x1000, [(0x2FF00, 512, True)])
    bm, st = dma(host, ata.CMD_READ_DMA, 0, 1, True)
    assert_bm_error(host, bm, st, "64 KiB boundary")


def test_prd_table_without_eot_runs_off_ram(host):
    # a table of zero-length (= 64 KiB) entries at the end of RAM, never reaching EOT
    host.bm_out(ata.BM_REG_PRDT, host.ram.size - 8, 4)
    host.ram.write(host.ram.size - 8, struct.pack("<IHH", 0x10000, 0x2000, 0))
    host.bm_out(ata.BM_REG_COMMAND, 0)
    host.taskfile(0, 32)
    host.out(ata.REG_COMMAND, ata.CMD_WRITE_DMA)
    host.bm_out(ata.BM_REG_COMMAND, ata.BM_CMD_START)
    assert_bm_error(host, host.bm_in(ata.BM_REG_STATUS), host.status(), "PRD entry")


def test_dma_direction_mismatch(host):
    host.prd(0x1000, [(0x20000, 512, True)])
    bm, st = dma(host, ata.CMD_WRITE_DMA, 0, 1, to_host=True)  # BM says read, ATA says write
    assert_bm_error(host, bm, st, "direction")


def test_command_while_drq(host):
    host.taskfile(0, 2)
    host.out(ata.REG_COMMAND, ata.CMD_READ_SECTORS)
    host.out(ata.REG_COMMAND, ata.CMD_READ_SECTORS)
    assert isinstance(host.ide.errors[-1], AtaProtocolError)
    assert host.status() & ata.STATUS_ERR and not host.altstatus() & ata.STATUS_DRQ


def test_taskfile_write_while_drq_ignored(host):
    host.taskfile(0, 1)
    host.out(ata.REG_COMMAND, ata.CMD_READ_SECTORS)
    host.out(ata.REG_LBAL, 0x55)
    assert isinstance(host.ide.errors[-1], AtaProtocolError)
    assert host.inp(ata.REG_LBAL) == 0


def test_data_access_without_drq(host):
    assert host.inp(ata.REG_DATA, 2) == 0xFFFF
    host.out(ata.REG_DATA, 0x1234, 2)
    assert [type(e) for e in host.ide.errors] == [AtaProtocolError, AtaProtocolError]
    assert host.status() == ata.STATUS_DRDY  # ignored, device state unchanged


def test_unsupported_command_and_out_of_range(host):
    host.out(ata.REG_COMMAND, 0x99)
    assert host.status() & ata.STATUS_ERR and host.inp(ata.REG_ERROR) == ata.ERROR_ABRT
    host.taskfile(250, 10)
    host.out(ata.REG_COMMAND, ata.CMD_READ_SECTORS)
    assert host.status() & ata.STATUS_ERR
    assert host.inp(ata.REG_ERROR) & ata.ERROR_IDNF
    assert "ID NOT FOUND" in host.ide.errors[-1].rule
    # a good command afterwards works again
    host.taskfile(0, 1)
    host.out(ata.REG_COMMAND, ata.CMD_READ_SECTORS)
    assert host.status() == ata.STATUS_DRDY | ata.STATUS_DRQ


def test_chs_rejected(host):
    host.out(ata.REG_DEVICE, 0)
    host.out(ata.REG_NSECT, 1)
    host.out(ata.REG_COMMAND, ata.CMD_READ_SECTORS)
    assert host.status() & ata.STATUS_ERR
    assert "LBA addressing only" in host.ide.errors[-1].rule


def test_bm_direction_change_while_active(host):
    host.bm_out(ata.BM_REG_COMMAND, ata.BM_CMD_START)
    host.bm_out(ata.BM_REG_COMMAND, ata.BM_CMD_START | ata.BM_CMD_READ)
    assert isinstance(host.ide.errors[-1], BmdmaError)
    assert host.bm_in(ata.BM_REG_COMMAND) == ata.BM_CMD_START


def test_bm_status_write_one_to_clear(host):
    host.ide.bm_status |= ata.BM_STATUS_INTR | ata.BM_STATUS_ERROR
    host.bm_out(ata.BM_REG_STATUS, ata.BM_STATUS_INTR | ata.BM_STATUS_DRV0_DMA)
    st = host.bm_in(ata.BM_REG_STATUS)
    assert st & ata.BM_STATUS_ERROR and not st & ata.BM_STATUS_INTR
    host.bm_out(ata.BM_REG_PRDT, 0x12345677, 4)
    assert host.bm_in(ata.BM_REG_PRDT, 4) == 0x12345674  # bits 1:0 reserved
