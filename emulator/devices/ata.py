"""ATA/ATAPI-8 (ACS) and PIIX bus-master IDE constants used by the IDE device.

Every number the IDE model interprets is named here; ``ide.py`` has no bare literals
for commands, register offsets or status bits.  The guest driver's C header
(``guest-drivers/ata.h``) mirrors these values.
"""

from __future__ import annotations

# Legacy primary channel I/O addresses (ISA compatibility mode).
PRIMARY_CMD_BASE = 0x1F0
PRIMARY_CMD_LEN = 8
PRIMARY_CTRL_BASE = 0x3F6  # alternate status (R) / device control (W)
PRIMARY_CTRL_LEN = 1
PRIMARY_IRQ = 14
# Bus-master IDE (PCI BAR4) base: fixed, the guest knows it (no PCI config space).
BMDMA_BASE = 0xC000
BMDMA_LEN = 8  # primary channel: command, status, PRD table pointer

SECTOR_SIZE = 512

# --- command block register offsets (from PRIMARY_CMD_BASE) ---------------------------------
REG_DATA = 0
REG_ERROR = 1  # read
REG_FEATURES = 1  # write
REG_NSECT = 2
REG_LBAL = 3
REG_LBAM = 4
REG_LBAH = 5
REG_DEVICE = 6
REG_STATUS = 7  # read
REG_COMMAND = 7  # write
# control block (from PRIMARY_CTRL_BASE)
REG_ALTSTATUS = 0  # read
REG_DEVCTL = 0  # write

# --- status register bits ------------------------------------------------------------------
STATUS_ERR = 1 << 0
STATUS_DRQ = 1 << 3
STATUS_DF = 1 << 5
STATUS_DRDY = 1 << 6
STATUS_BSY = 1 << 7

# --- error register bits -------------------------------------------------------------------
ERROR_AMNF = 1 << 0
ERROR_ABRT = 1 << 2
ERROR_IDNF = 1 << 4
ERROR_UNC = 1 << 6

# --- device register bits ------------------------------------------------------------------
DEVICE_DEV = 1 << 4  # 0 = device 0 (master), 1 = device 1 (slave)
DEVICE_LBA = 1 << 6
DEVICE_OBS = 0xA0  # obsolete bits 7 and 5, traditionally set
DEVICE_HEAD_MASK = 0x0F  # LBA bits 27:24 in 28-bit commands

# --- values after power-on / software reset (ATA8-ACS signature, diagnostic code) ----------
SIGNATURE_NSECT = 0x01
SIGNATURE_LBAL = 0x01
SIGNATURE_LBAM = 0x00  # 0x14 would be a PACKET device
SIGNATURE_LBAH = 0x00
DIAG_DEVICE0_PASSED = 0x01  # Error register after EXECUTE DEVICE DIAGNOSTIC / reset

# --- device control register bits ----------------------------------------------------------
DEVCTL_NIEN = 1 << 1
DEVCTL_SRST = 1 << 2
DEVCTL_HOB = 1 << 7

# --- commands ------------------------------------------------------------------------------
CMD_READ_SECTORS = 0x20
CMD_READ_SECTORS_EXT = 0x24
CMD_READ_DMA_EXT = 0x25
CMD_READ_MULTIPLE_EXT = 0x29
CMD_WRITE_SECTORS = 0x30
CMD_WRITE_SECTORS_EXT = 0x34
CMD_WRITE_DMA_EXT = 0x35
CMD_WRITE_MULTIPLE_EXT = 0x39
CMD_READ_MULTIPLE = 0xC4
CMD_WRITE_MULTIPLE = 0xC5
CMD_SET_MULTIPLE_MODE = 0xC6
CMD_READ_DMA = 0xC8
CMD_WRITE_DMA = 0xCA
CMD_FLUSH_CACHE = 0xE7
CMD_FLUSH_CACHE_EXT = 0xEA
CMD_IDENTIFY_DEVICE = 0xEC
CMD_SET_FEATURES = 0xEF

COMMAND_NAMES = {
    CMD_READ_SECTORS: "READ SECTORS",
    CMD_READ_SECTORS_EXT: "READ SECTORS EXT",
    CMD_READ_DMA_EXT: "READ DMA EXT",
    CMD_READ_MULTIPLE_EXT: "READ MULTIPLE EXT",
    CMD_WRITE_SECTORS: "WRITE SECTORS",
    CMD_WRITE_SECTORS_EXT: "WRITE SECTORS EXT",
    CMD_WRITE_DMA_EXT: "WRITE DMA EXT",
    CMD_WRITE_MULTIPLE_EXT: "WRITE MULTIPLE EXT",
    CMD_READ_MULTIPLE: "READ MULTIPLE",
    CMD_WRITE_MULTIPLE: "WRITE MULTIPLE",
    CMD_SET_MULTIPLE_MODE: "SET MULTIPLE MODE",
    CMD_READ_DMA: "READ DMA",
    CMD_WRITE_DMA: "WRITE DMA",
    CMD_FLUSH_CACHE: "FLUSH CACHE",
    CMD_FLUSH_CACHE_EXT: "FLUSH CACHE EXT",
    CMD_IDENTIFY_DEVICE: "IDENTIFY DEVICE",
    CMD_SET_FEATURES: "SET FEATURES",
}

# Sector-count semantics: 0 means 256 (28-bit) or 65536 (48-bit).
MAX_SECTORS_28 = 256
MAX_SECTORS_48 = 65536
MAX_LBA_28 = 1 << 28
MAX_LBA_48 = 1 << 48
# SET MULTIPLE MODE: largest DRQ block we advertise (IDENTIFY word 47).
MAX_MULTIPLE = 16

# --- IDENTIFY DEVICE words (ACS-3 table 45) ------------------------------------------------
IDENTIFY_WORDS = 256
ID_GENERAL_CONFIG = 0
ID_SERIAL = 10  # words 10..19, 20 ASCII chars
ID_SERIAL_LEN = 20
ID_FIRMWARE = 23  # words 23..26, 8 chars
ID_FIRMWARE_LEN = 8
ID_MODEL = 27  # words 27..46, 40 chars
ID_MODEL_LEN = 40
ID_MAX_MULTIPLE = 47  # 0x80 << 8 | max sectors per DRQ block
ID_CAPABILITIES = 49  # bit 9 LBA, bit 8 DMA
ID_FIELD_VALID = 53
ID_MULTIPLE_SETTING = 59  # bit 8 valid | current multiple count
ID_LBA28_SECTORS = 60  # words 60..61
ID_MWDMA = 63
ID_PIO_MODES = 64
ID_MAJOR_VERSION = 80
ID_COMMAND_SET_1 = 82
ID_COMMAND_SET_2 = 83  # bit 10 48-bit, bit 12 FLUSH CACHE, bit 13 FLUSH CACHE EXT
ID_COMMAND_SET_EXT = 84
ID_COMMAND_ENABLED_1 = 85
ID_COMMAND_ENABLED_2 = 86
ID_UDMA = 88
ID_LBA48_SECTORS = 100  # words 100..103

ID_GENCONF_FIXED = 1 << 6  # word 0: fixed (non-removable) ATA device
ID_MWDMA_MODES_0_2 = 0x0007  # word 63: multiword DMA modes 0-2 supported
ID_PIO_MODES_3_4 = 0x0003  # word 64: PIO modes 3 and 4 supported
ID_UDMA_MODES_0_5 = 0x003F  # word 88: Ultra DMA modes 0-5 supported
ID_STRING_CHARS_PER_WORD = 2
ID_CAP_LBA = 1 << 9
ID_CAP_DMA = 1 << 8
ID_MAX_MULTIPLE_SIG = 0x8000
ID_MULTIPLE_VALID = 1 << 8
ID_CMDSET2_ONE = 1 << 14  # word 83 bit 14 shall be one
ID_CMDSET2_LBA48 = 1 << 10
ID_CMDSET2_FLUSH = 1 << 12
ID_CMDSET2_FLUSH_EXT = 1 << 13
ID_MAJOR_ATA8 = 1 << 8
ID_FIELD_VALID_64_70 = 1 << 1
ID_FIELD_VALID_88 = 1 << 2

# --- bus-master IDE registers (offsets from BMDMA_BASE; SFF-8038i) --------------------------
BM_REG_COMMAND = 0
BM_REG_STATUS = 2
BM_REG_PRDT = 4  # 32-bit PRD table physical address

BM_CMD_START = 1 << 0
BM_CMD_READ = 1 << 3  # 1 = bus master writes memory (device-to-host, i.e. ATA READ DMA)
BM_CMD_MASK = BM_CMD_START | BM_CMD_READ

BM_STATUS_ACTIVE = 1 << 0
BM_STATUS_ERROR = 1 << 1  # write 1 to clear
BM_STATUS_INTR = 1 << 2  # write 1 to clear
BM_STATUS_DRV0_DMA = 1 << 5
BM_STATUS_DRV1_DMA = 1 << 6
BM_STATUS_SIMPLEX = 1 << 7
BM_STATUS_W1C = BM_STATUS_ERROR | BM_STATUS_INTR
BM_STATUS_RW = BM_STATUS_DRV0_DMA | BM_STATUS_DRV1_DMA

# PRD entry: u32 physical base (bit 0 zero), u16 byte count (0 = 64 KiB), u16 flags.
PRD_ENTRY_SIZE = 8
PRD_EOT = 1 << 15
PRD_COUNT_ZERO_MEANS = 0x10000
PRD_BOUNDARY = 0x10000  # a region must not cross a 64 KiB boundary
PRD_TABLE_ALIGN = 4
PRD_MAX_ENTRIES = 8192  # a table must not cross a 64 KiB boundary either (64K / 8)
