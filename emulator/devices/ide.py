"""Legacy IDE: one ATA disk on the primary channel plus a PIIX-style bus-master DMA engine.

Windows (see :func:`IdeController.attach`): command block at ``0x1F0..0x1F7``,
control block at ``0x3F6``, bus-master registers at ``BMDMA_BASE`` (as if PCI BAR4).
The device is a pure register machine: it never needs a CPU, so its register tables
are tested directly.

Commands execute synchronously when the command register (or, for DMA, the
bus-master start bit) is written: BSY is never observed by the guest, which makes
the number of status polls -- and so the number of VM exits -- deterministic.

Malformed guest behaviour (bad PRD tables, DMA outside RAM, data-register access
without DRQ, commands while a command is in progress, out-of-range LBAs) never raises
out of :meth:`read`/:meth:`write`: it is recorded as a typed :class:`IdeError` in
``errors`` (each names the ATA / SFF-8038i rule) and the registers report it the way
a device would (ERR + ABRT/IDNF in the error register, bus-master ERROR bit).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from typing import Protocol

from emulator.bus import Bus, Device
from emulator.devices import ata


# --- errors -----------------------------------------------------------------------------------
class IdeError(Exception):
    """A guest broke an ATA or bus-master IDE rule.  ``rule`` names it."""

    rule = ""

    def __init__(self, message: str, rule: str | None = None) -> None:
        if rule is not None:
            self.rule = rule
        self.message = message
        super().__init__(f"{message} [{self.rule}]")


class AtaCommandError(IdeError):
    """The command itself is invalid: unsupported opcode, bad LBA range, bad count."""


class AtaProtocolError(IdeError):
    """The host broke the ATA protocol state machine (e.g. data access without DRQ)."""


class BmdmaError(IdeError):
    """The bus-master DMA programming is invalid (PRD table, buffers, direction)."""


# --- backing store ----------------------------------------------------------------------------
class BlockBackend(Protocol):
    sectors: int

    def read(self, lba: int, count: int) -> bytes: ...

    def write(self, lba: int, data: bytes) -> None: ...

    def flush(self) -> None: ...


class MemoryBackend:
    """A disk image in a bytearray (tests)."""

    def __init__(self, data: bytearray | int) -> None:
        self.data = bytearray(data) if isinstance(data, int) else data
        if len(self.data) % ata.SECTOR_SIZE:
            raise ValueError(f"image size must be a multiple of {ata.SECTOR_SIZE}")
        self.sectors = len(self.data) // ata.SECTOR_SIZE
        self.flushes = 0

    def read(self, lba: int, count: int) -> bytes:
        return bytes(self.data[lba * ata.SECTOR_SIZE : (lba + count) * ata.SECTOR_SIZE])

    def write(self, lba: int, data: bytes) -> None:
        self.data[lba * ata.SECTOR_SIZE : lba * ata.SECTOR_SIZE + len(data)] = data

    def flush(self) -> None:
        self.flushes += 1


class FileBackend:
    """A raw image file; FLUSH CACHE does ``fdatasync``."""

    def __init__(self, path: str | os.PathLike, size: int | None = None) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        if size is not None:
            os.ftruncate(self.fd, size)
        self.sectors = os.fstat(self.fd).st_size // ata.SECTOR_SIZE
        self.flushes = 0

    def read(self, lba: int, count: int) -> bytes:
        return os.pread(self.fd, count * ata.SECTOR_SIZE, lba * ata.SECTOR_SIZE)

    def write(self, lba: int, data: bytes) -> None:
        os.pwrite(self.fd, data, lba * ata.SECTOR_SIZE)

    def flush(self) -> None:
        os.fdatasync(self.fd)
        self.flushes += 1

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class DmaMemory(Protocol):
    size: int

    def read(self, addr: int, length: int) -> bytes: ...

    def write(self, addr: int, data: bytes) -> None: ...


# --- the controller ---------------------------------------------------------------------------
# Window offsets that the device sees for its three I/O ranges.
CMD_WINDOW = 0x00
CTRL_WINDOW = 0x10
BM_WINDOW = 0x20

_READ_REGS = {
    CMD_WINDOW + ata.REG_DATA: "data",
    CMD_WINDOW + ata.REG_ERROR: "error",
    CMD_WINDOW + ata.REG_NSECT: "nsect",
    CMD_WINDOW + ata.REG_LBAL: "lbal",
    CMD_WINDOW + ata.REG_LBAM: "lbam",
    CMD_WINDOW + ata.REG_LBAH: "lbah",
    CMD_WINDOW + ata.REG_DEVICE: "device",
    CMD_WINDOW + ata.REG_STATUS: "status",
    CTRL_WINDOW + ata.REG_ALTSTATUS: "altstatus",
    BM_WINDOW + ata.BM_REG_COMMAND: "bm_command",
    BM_WINDOW + ata.BM_REG_STATUS: "bm_status",
    BM_WINDOW + ata.BM_REG_PRDT: "bm_prdt",
}
_WRITE_REGS = {
    **_READ_REGS,
    CMD_WINDOW + ata.REG_FEATURES: "features",
    CMD_WINDOW + ata.REG_COMMAND: "command",
    CTRL_WINDOW + ata.REG_DEVCTL: "devctl",
}

_PIO_IN = {
    ata.CMD_READ_SECTORS: (False, False),  # (lba48, multiple)
    ata.CMD_READ_SECTORS_EXT: (True, False),
    ata.CMD_READ_MULTIPLE: (False, True),
    ata.CMD_READ_MULTIPLE_EXT: (True, True),
}
_PIO_OUT = {
    ata.CMD_WRITE_SECTORS: (False, False),
    ata.CMD_WRITE_SECTORS_EXT: (True, False),
    ata.CMD_WRITE_MULTIPLE: (False, True),
    ata.CMD_WRITE_MULTIPLE_EXT: (True, True),
}
_DMA = {  # opcode -> (lba48, device-to-host)
    ata.CMD_READ_DMA: (False, True),
    ata.CMD_READ_DMA_EXT: (True, True),
    ata.CMD_WRITE_DMA: (False, False),
    ata.CMD_WRITE_DMA_EXT: (True, False),
}
_PRD = struct.Struct("<IHH")


class IdeController(Device):
    """Primary IDE channel with one ATA disk (device 0) and its bus-master engine."""

    name = "ide"
    read_registers = _READ_REGS
    write_registers = _WRITE_REGS

    def __init__(
        self,
        backend: BlockBackend,
        memory: DmaMemory | None = None,
        irq: Callable[[bool], None] | None = None,
        model: str = "PYVIRTIO IDE DISK",
        serial: str = "PV0001",
    ) -> None:
        self.backend = backend
        self.memory = memory
        self.irq = irq
        self.model = model
        self.serial = serial
        self.errors: list[IdeError] = []
        self.commands: list[int] = []  # opcodes accepted, for tests/diagnostics
        self.multiple_count = 0
        self.devctl = 0
        self.bm_command = 0
        self.bm_status = ata.BM_STATUS_DRV0_DMA
        self.bm_prdt = 0
        self._reset_taskfile()

    # -- wiring ---------------------------------------------------------------------------
    def attach(
        self,
        bus: Bus,
        cmd_base: int = ata.PRIMARY_CMD_BASE,
        ctrl_base: int = ata.PRIMARY_CTRL_BASE,
        bm_base: int = ata.BMDMA_BASE,
    ) -> None:
        bus.add_pio(cmd_base, ata.PRIMARY_CMD_LEN, self, CMD_WINDOW)
        bus.add_pio(ctrl_base, ata.PRIMARY_CTRL_LEN, self, CTRL_WINDOW)
        bus.add_pio(bm_base, ata.BMDMA_LEN, self, BM_WINDOW)

    def _reset_taskfile(self) -> None:
        self.status = ata.STATUS_DRDY
        self.error = 0
        # Two-deep FIFOs for 48-bit commands: (current, previous/HOB).
        self.features = [0, 0]
        self.nsect = [ata.SIGNATURE_NSECT, 0]
        self.lbal = [ata.SIGNATURE_LBAL, 0]
        self.lbam = [ata.SIGNATURE_LBAM, 0]
        self.lbah = [ata.SIGNATURE_LBAH, 0]
        self.device = 0
        self.intrq = False
        self._pio_buf = bytearray()
        self._pio_pos = 0
        self._pio_dir: str | None = None  # "in" | "out"
        self._xfer_lba = 0
        self._xfer_left = 0
        self._xfer_block = 1
        self._dma_cmd: tuple[int, int, bool] | None = None  # (lba, count, to_host)

    # -- interrupt line -------------------------------------------------------------------
    @property
    def irq_level(self) -> bool:
        return self.intrq and not (self.devctl & ata.DEVCTL_NIEN)

    def _set_intrq(self, on: bool) -> None:
        before = self.irq_level
        self.intrq = on
        if self.irq is not None and self.irq_level != before:
            self.irq(self.irq_level)

    def _fail(self, err: IdeError, error_bits: int = ata.ERROR_ABRT) -> None:
        """Record ``err`` and end the current command with ERR the way a device does."""
        self.errors.append(err)
        self._pio_dir = None
        self._pio_buf = bytearray()
        self._dma_cmd = None
        self.error = error_bits
        self.status = ata.STATUS_DRDY | ata.STATUS_ERR
        self._set_intrq(True)

    def _protocol(self, err: IdeError) -> None:
        """Record a protocol violation that a device ignores (no state change)."""
        self.errors.append(err)

    @property
    def _dev1(self) -> bool:
        return bool(self.device & ata.DEVICE_DEV)

    # -- bus interface --------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if offset >= BM_WINDOW:
            return self._bm_read(offset - BM_WINDOW, size)
        if offset == CTRL_WINDOW + ata.REG_ALTSTATUS:
            return 0 if self._dev1 else self.status
        reg = offset - CMD_WINDOW
        if reg == ata.REG_DATA:
            return self._data_read(size)
        hob = 1 if self.devctl & ata.DEVCTL_HOB else 0
        if reg == ata.REG_STATUS:
            if self._dev1:
                return 0
            self._set_intrq(False)  # reading Status acknowledges INTRQ
            return self.status
        if reg == ata.REG_ERROR:
            return self.error
        if reg == ata.REG_NSECT:
            return self.nsect[hob]
        if reg == ata.REG_LBAL:
            return self.lbal[hob]
        if reg == ata.REG_LBAM:
            return self.lbam[hob]
        if reg == ata.REG_LBAH:
            return self.lbah[hob]
        if reg == ata.REG_DEVICE:
            return self.device
        return 0xFF  # pragma: no cover - all offsets covered

    def write(self, offset: int, size: int, value: int) -> None:
        if offset >= BM_WINDOW:
            self._bm_write(offset - BM_WINDOW, size, value)
            return
        if offset == CTRL_WINDOW + ata.REG_DEVCTL:
            self._devctl_write(value & 0xFF)
            return
        reg = offset - CMD_WINDOW
        if reg == ata.REG_DATA:
            self._data_write(size, value)
            return
        value &= 0xFF
        if reg == ata.REG_COMMAND:
            self._command(value)
            return
        if self.status & (ata.STATUS_BSY | ata.STATUS_DRQ):
            self._protocol(
                AtaProtocolError(
                    f"write of {self.register_name(offset, True)} while "
                    f"{'BSY' if self.status & ata.STATUS_BSY else 'DRQ'} is set: ignored",
                    "ATA8-ACS: the host shall not write the Command Block while BSY or DRQ",
                )
            )
            return
        self.devctl &= ~ata.DEVCTL_HOB  # a Command Block write clears HOB
        if reg == ata.REG_FEATURES:
            self.features = [value, self.features[0]]
        elif reg == ata.REG_NSECT:
            self.nsect = [value, self.nsect[0]]
        elif reg == ata.REG_LBAL:
            self.lbal = [value, self.lbal[0]]
        elif reg == ata.REG_LBAM:
            self.lbam = [value, self.lbam[0]]
        elif reg == ata.REG_LBAH:
            self.lbah = [value, self.lbah[0]]
        elif reg == ata.REG_DEVICE:
            self.device = value

    # -- device control -------------------------------------------------------------------
    def _devctl_write(self, value: int) -> None:
        was_reset = self.devctl & ata.DEVCTL_SRST
        before = self.irq_level
        self.devctl = value
        if was_reset and not value & ata.DEVCTL_SRST:
            self._reset_taskfile()
            self.error = ata.DIAG_DEVICE0_PASSED
            self.bm_command &= ~ata.BM_CMD_START
            self.bm_status &= ~ata.BM_STATUS_ACTIVE
        elif value & ata.DEVCTL_SRST:
            self.status = ata.STATUS_BSY
        if self.irq is not None and self.irq_level != before:
            self.irq(self.irq_level)

    # -- PIO data ---------------------------------------------------------------------------
    def _data_read(self, size: int) -> int:
        if self._pio_dir != "in" or not self.status & ata.STATUS_DRQ:
            self._protocol(
                AtaProtocolError(
                    "Data register read without DRQ",
                    "ATA8-ACS PIO data-in: Data is valid only while DRQ=1",
                )
            )
            return 0xFFFF if size == 2 else (1 << (8 * size)) - 1
        chunk = self._pio_buf[self._pio_pos : self._pio_pos + size]
        self._pio_pos += size
        if self._pio_pos >= len(self._pio_buf):
            self._pio_in_block_done()
        return int.from_bytes(chunk.ljust(size, b"\0"), "little")

    def _data_write(self, size: int, value: int) -> None:
        if self._pio_dir != "out" or not self.status & ata.STATUS_DRQ:
            self._protocol(
                AtaProtocolError(
                    "Data register write without DRQ",
                    "ATA8-ACS PIO data-out: the host writes Data only while DRQ=1",
                )
            )
            return
        end = min(self._pio_pos + size, len(self._pio_buf))
        self._pio_buf[self._pio_pos : end] = value.to_bytes(size, "little")[: end - self._pio_pos]
        self._pio_pos = end
        if self._pio_pos >= len(self._pio_buf):
            self._pio_out_block_done()

    def _pio_in_block_done(self) -> None:
        if self._xfer_left:
            self._load_in_block()
        else:
            self._pio_dir = None
            self.status = ata.STATUS_DRDY

    def _load_in_block(self) -> None:
        n = min(self._xfer_block, self._xfer_left)
        self._pio_buf = bytearray(self.backend.read(self._xfer_lba, n))
        self._pio_pos = 0
        self._xfer_lba += n
        self._xfer_left -= n
        self._pio_dir = "in"
        self.status = ata.STATUS_DRDY | ata.STATUS_DRQ
        self._set_intrq(True)  # one interrupt per DRQ data block

    def _start_out_block(self) -> None:
        n = min(self._xfer_block, self._xfer_left)
        self._pio_buf = bytearray(n * ata.SECTOR_SIZE)
        self._pio_pos = 0
        self._pio_dir = "out"
        self.status = ata.STATUS_DRDY | ata.STATUS_DRQ

    def _pio_out_block_done(self) -> None:
        self.backend.write(self._xfer_lba, bytes(self._pio_buf))
        n = len(self._pio_buf) // ata.SECTOR_SIZE
        self._xfer_lba += n
        self._xfer_left -= n
        if self._xfer_left:
            self._start_out_block()
        else:
            self._pio_dir = None
            self._pio_buf = bytearray()
            self.status = ata.STATUS_DRDY
        self._set_intrq(True)  # after each block (incl. the last one)

    # -- commands ---------------------------------------------------------------------------
    def _lba_count(self, lba48: bool, opcode: int) -> tuple[int, int] | None:
        if not self.device & ata.DEVICE_LBA:
            self._fail(
                AtaCommandError(
                    f"{ata.COMMAND_NAMES[opcode]} with CHS addressing",
                    "this device implements LBA addressing only (Device register bit 6 = 1)",
                )
            )
            return None
        if lba48:
            lba = (
                self.lbah[1] << 40
                | self.lbam[1] << 32
                | self.lbal[1] << 24
                | self.lbah[0] << 16
                | self.lbam[0] << 8
                | self.lbal[0]
            )
            count = (self.nsect[1] << 8 | self.nsect[0]) or ata.MAX_SECTORS_48
        else:
            lba = (
                (self.device & ata.DEVICE_HEAD_MASK) << 24
                | self.lbah[0] << 16
                | self.lbam[0] << 8
                | self.lbal[0]
            )
            count = self.nsect[0] or ata.MAX_SECTORS_28
        if lba + count > self.backend.sectors:
            self._fail(
                AtaCommandError(
                    f"{ata.COMMAND_NAMES[opcode]} LBA {lba}+{count} beyond capacity "
                    f"{self.backend.sectors}",
                    "ATA8-ACS: LBA out of range -> ID NOT FOUND",
                ),
                ata.ERROR_IDNF | ata.ERROR_ABRT,
            )
            return None
        return lba, count

    def _command(self, opcode: int) -> None:
        if self._dev1:
            return  # no device 1: the command is not for us
        if self.status & (ata.STATUS_BSY | ata.STATUS_DRQ) or self._dma_cmd is not None:
            self._fail(
                AtaProtocolError(
                    f"command {opcode:#04x} written while a command is in progress",
                    "ATA8-ACS: the host shall not write the Command register while BSY "
                    "or DRQ is set (or a DMA command is pending)",
                )
            )
            return
        self.devctl &= ~ata.DEVCTL_HOB
        self.error = 0
        self._set_intrq(False)
        name = ata.COMMAND_NAMES.get(opcode)
        if name is None:
            self._fail(
                AtaCommandError(
                    f"unsupported command {opcode:#04x}", "ATA8-ACS: unsupported command -> ABRT"
                )
            )
            return
        self.commands.append(opcode)
        if opcode in _PIO_IN or opcode in _PIO_OUT:
            lba48, multiple = _PIO_IN.get(opcode) or _PIO_OUT[opcode]
            if multiple and not self.multiple_count:
                self._fail(
                    AtaCommandError(
                        f"{name} before SET MULTIPLE MODE",
                        "ATA8-ACS: READ/WRITE MULTIPLE with multiple mode disabled -> ABRT",
                    )
                )
                return
            rng = self._lba_count(lba48, opcode)
            if rng is None:
                return
            self._xfer_lba, self._xfer_left = rng
            self._xfer_block = self.multiple_count if multiple else 1
            if opcode in _PIO_IN:
                self._load_in_block()
            else:
                self._start_out_block()
        elif opcode in _DMA:
            lba48, to_host = _DMA[opcode]
            rng = self._lba_count(lba48, opcode)
            if rng is None:
                return
            self._dma_cmd = (rng[0], rng[1], to_host)
            self.status = ata.STATUS_DRDY | ata.STATUS_DRQ
            self._maybe_run_dma()
        elif opcode == ata.CMD_IDENTIFY_DEVICE:
            self._pio_buf = bytearray(self.identify())
            self._pio_pos = 0
            self._xfer_left = 0
            self._pio_dir = "in"
            self.status = ata.STATUS_DRDY | ata.STATUS_DRQ
            self._set_intrq(True)
        elif opcode == ata.CMD_SET_MULTIPLE_MODE:
            count = self.nsect[0]
            if count > ata.MAX_MULTIPLE or count & (count - 1):
                self._fail(
                    AtaCommandError(
                        f"SET MULTIPLE MODE count {count}",
                        f"ATA8-ACS: count must be 0 or a power of two <= {ata.MAX_MULTIPLE}",
                    )
                )
                return
            self.multiple_count = count
            self._complete()
        elif opcode in (ata.CMD_FLUSH_CACHE, ata.CMD_FLUSH_CACHE_EXT):
            self.backend.flush()
            self._complete()
        elif opcode == ata.CMD_SET_FEATURES:
            self._complete()

    def _complete(self) -> None:
        self.status = ata.STATUS_DRDY
        self._set_intrq(True)

    def identify(self) -> bytes:
        w = [0] * ata.IDENTIFY_WORDS

        def put_str(start: int, length: int, text: str) -> None:
            raw = text.encode("ascii")[:length].ljust(length, b" ")
            step = ata.ID_STRING_CHARS_PER_WORD  # ATA strings: first char in the high byte
            for i in range(0, length, step):
                w[start + i // step] = raw[i] << 8 | raw[i + 1]

        sectors = self.backend.sectors
        w[ata.ID_GENERAL_CONFIG] = ata.ID_GENCONF_FIXED
        put_str(ata.ID_SERIAL, ata.ID_SERIAL_LEN, self.serial)
        put_str(ata.ID_FIRMWARE, ata.ID_FIRMWARE_LEN, "0.1")
        put_str(ata.ID_MODEL, ata.ID_MODEL_LEN, self.model)
        w[ata.ID_MAX_MULTIPLE] = ata.ID_MAX_MULTIPLE_SIG | ata.MAX_MULTIPLE
        w[ata.ID_CAPABILITIES] = ata.ID_CAP_LBA | ata.ID_CAP_DMA
        w[ata.ID_FIELD_VALID] = ata.ID_FIELD_VALID_64_70 | ata.ID_FIELD_VALID_88
        if self.multiple_count:
            w[ata.ID_MULTIPLE_SETTING] = ata.ID_MULTIPLE_VALID | self.multiple_count
        lba28 = min(sectors, ata.MAX_LBA_28 - 1)
        w[ata.ID_LBA28_SECTORS] = lba28 & 0xFFFF
        w[ata.ID_LBA28_SECTORS + 1] = lba28 >> 16
        w[ata.ID_MWDMA] = ata.ID_MWDMA_MODES_0_2
        w[ata.ID_PIO_MODES] = ata.ID_PIO_MODES_3_4
        w[ata.ID_MAJOR_VERSION] = ata.ID_MAJOR_ATA8
        cmdset2 = ata.ID_CMDSET2_ONE | ata.ID_CMDSET2_LBA48
        cmdset2 |= ata.ID_CMDSET2_FLUSH | ata.ID_CMDSET2_FLUSH_EXT
        w[ata.ID_COMMAND_SET_2] = cmdset2
        w[ata.ID_COMMAND_ENABLED_2] = cmdset2 & ~ata.ID_CMDSET2_ONE
        w[ata.ID_COMMAND_SET_EXT] = ata.ID_CMDSET2_ONE
        w[ata.ID_UDMA] = ata.ID_UDMA_MODES_0_5
        for i in range(4):
            w[ata.ID_LBA48_SECTORS + i] = (sectors >> (16 * i)) & 0xFFFF
        return struct.pack(f"<{ata.IDENTIFY_WORDS}H", *w)

    # -- bus master -------------------------------------------------------------------------
    def _bm_read(self, reg: int, size: int) -> int:
        if reg == ata.BM_REG_COMMAND:
            return self.bm_command
        if reg == ata.BM_REG_STATUS:
            return self.bm_status
        if ata.BM_REG_PRDT <= reg < ata.BM_REG_PRDT + 4:
            shift = 8 * (reg - ata.BM_REG_PRDT)
            return (self.bm_prdt >> shift) & ((1 << (8 * size)) - 1)
        return 0

    def _bm_write(self, reg: int, size: int, value: int) -> None:
        if reg == ata.BM_REG_COMMAND:
            value &= ata.BM_CMD_MASK
            if (
                self.bm_command & ata.BM_CMD_START
                and value & ata.BM_CMD_START
                and (value ^ self.bm_command) & ata.BM_CMD_READ
            ):
                self._protocol(
                    BmdmaError(
                        "bus-master direction changed while the engine is active",
                        "SFF-8038i: Read/Write Control must not change while Start=1",
                    )
                )
                return
            starting = value & ata.BM_CMD_START and not self.bm_command & ata.BM_CMD_START
            self.bm_command = value
            if not value & ata.BM_CMD_START:
                self.bm_status &= ~ata.BM_STATUS_ACTIVE  # stop: abort any transfer
            elif starting:
                self.bm_status |= ata.BM_STATUS_ACTIVE
                self._maybe_run_dma()
        elif reg == ata.BM_REG_STATUS:
            value &= 0xFF
            keep = self.bm_status & ~(value & ata.BM_STATUS_W1C)
            self.bm_status = (keep & ~ata.BM_STATUS_RW) | (value & ata.BM_STATUS_RW)
        elif ata.BM_REG_PRDT <= reg < ata.BM_REG_PRDT + 4:
            shift = 8 * (reg - ata.BM_REG_PRDT)
            mask = ((1 << (8 * size)) - 1) << shift
            self.bm_prdt = ((self.bm_prdt & ~mask) | ((value << shift) & mask)) & 0xFFFF_FFFF
            self.bm_prdt &= ~(ata.PRD_TABLE_ALIGN - 1)  # bits 1:0 are reserved (read as 0)

    def _bm_error(self, err: BmdmaError) -> None:
        self.bm_status = (self.bm_status | ata.BM_STATUS_ERROR | ata.BM_STATUS_INTR) & ~(
            ata.BM_STATUS_ACTIVE
        )
        self._fail(err)

    def _prd_segments(self, nbytes: int) -> list[tuple[int, int]] | None:
        """Walk the PRD table for a transfer of ``nbytes``; validate everything first."""
        mem = self.memory
        if mem is None:
            self._bm_error(BmdmaError("no guest memory attached", "bus master needs RAM"))
            return None
        segs: list[tuple[int, int]] = []
        total = 0
        addr = self.bm_prdt
        for _ in range(ata.PRD_MAX_ENTRIES):
            if addr + ata.PRD_ENTRY_SIZE > mem.size:
                self._bm_error(
                    BmdmaError(
                        f"PRD entry at {addr:#x} outside guest RAM",
                        "SFF-8038i: the PRD table must be in system memory",
                    )
                )
                return None
            base, count, flags = _PRD.unpack(mem.read(addr, ata.PRD_ENTRY_SIZE))
            length = count or ata.PRD_COUNT_ZERO_MEANS
            if base & 1:
                self._bm_error(
                    BmdmaError(
                        f"PRD buffer address {base:#x} is odd",
                        "SFF-8038i: PRD memory region base address bit 0 must be 0",
                    )
                )
                return None
            if base // ata.PRD_BOUNDARY != (base + length - 1) // ata.PRD_BOUNDARY:
                self._bm_error(
                    BmdmaError(
                        f"PRD region {base:#x}+{length:#x} crosses a 64 KiB boundary",
                        "SFF-8038i: a PRD memory region must not cross a 64K boundary",
                    )
                )
                return None
            if base + length > mem.size:
                self._bm_error(
                    BmdmaError(
                        f"PRD region {base:#x}+{length:#x} outside guest RAM ({mem.size:#x})",
                        "SFF-8038i: DMA buffers must be in system memory",
                    )
                )
                return None
            take = min(length, nbytes - total)
            if take:
                segs.append((base, take))
            total += take
            addr += ata.PRD_ENTRY_SIZE
            if flags & ata.PRD_EOT or total >= nbytes:
                break
        if total < nbytes:
            self._bm_error(
                BmdmaError(
                    f"PRD table describes fewer bytes than the {nbytes}-byte ATA transfer",
                    "SFF-8038i: PRD byte count smaller than the device transfer (EOT too early)",
                )
            )
            return None
        # Whether the table had more room than the transfer needed (spec: Active stays 1).
        self._prd_larger = not (flags & ata.PRD_EOT and total == nbytes and take == length)
        return segs

    def _maybe_run_dma(self) -> None:
        if self._dma_cmd is None or not self.bm_command & ata.BM_CMD_START:
            return
        if not self.bm_status & ata.BM_STATUS_ACTIVE:
            return  # engine stopped / finished for this start
        lba, count, to_host = self._dma_cmd
        if bool(self.bm_command & ata.BM_CMD_READ) != to_host:
            self._bm_error(
                BmdmaError(
                    "bus-master direction does not match the ATA DMA command",
                    "SFF-8038i: Read/Write Control must be 1 for READ DMA, 0 for WRITE DMA",
                )
            )
            return
        nbytes = count * ata.SECTOR_SIZE
        segs = self._prd_segments(nbytes)
        if segs is None:
            return
        assert self.memory is not None
        if to_host:
            data = self.backend.read(lba, count)
            pos = 0
            for base, length in segs:
                self.memory.write(base, data[pos : pos + length])
                pos += length
        else:
            data = b"".join(self.memory.read(base, length) for base, length in segs)
            self.backend.write(lba, data)
        self._dma_cmd = None
        self.bm_status |= ata.BM_STATUS_INTR
        if not self._prd_larger:
            self.bm_status &= ~ata.BM_STATUS_ACTIVE
        self.status = ata.STATUS_DRDY
        self._set_intrq(True)
