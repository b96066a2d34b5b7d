"""National Semiconductor DP8390 (NIC core) and NE2000 board constants.

Every number the NE2000 model interprets is named here; ``ne2000.py`` has no bare
literals for registers, command bits or status bits.  The guest driver's C header
(``guest-drivers/dp8390.h``) mirrors these values.  Names follow the DP8390D data sheet
(register mnemonics CR, PSTART, ISR, ...), with the NE2000 board layout (ASIC data port,
reset port, station-address PROM, 16 KiB of buffer RAM) as QEMU's ``ne2k_isa`` shows it.
"""

from __future__ import annotations

# --- ISA board ---------------------------------------------------------------------------
DEFAULT_IO_BASE = 0x300  # QEMU ne2k_isa default iobase
DEFAULT_IRQ = 9  # QEMU ne2k_isa default irq
IO_LEN = 0x20  # 16 NIC registers, data port at 0x10, reset port at 0x1F
DATA_PORT = 0x10  # NE2000 ASIC: remote-DMA data window (8 or 16 bits per access)
RESET_PORT = 0x1F  # NE2000 ASIC: a read resets the NIC

# --- on-board memory (NIC local addresses) -----------------------------------------------
PROM_SIZE = 32  # station address PROM, each byte doubled in word mode
PROM_SIGNATURE = 0x57  # bytes 14/15 of the PROM on a 16-bit (NE2000) board
RAM_START = 0x4000  # 16 KiB of buffer RAM at 0x4000..0x7FFF (pages 0x40..0x7F)
RAM_SIZE = 0x4000
RAM_END = RAM_START + RAM_SIZE
PAGE_SIZE = 256
RAM_FIRST_PAGE = RAM_START // PAGE_SIZE
RAM_END_PAGE = RAM_END // PAGE_SIZE  # one past the last page (a valid PSTOP)

# --- Ethernet -----------------------------------------------------------------------------
ETH_ALEN = 6
ETH_HLEN = 14
ETH_ZLEN = 60  # minimum frame without FCS: shorter frames are padded on receive
ETH_FRAME_LEN = 1514  # maximum frame without FCS
ETH_FCS_LEN = 4
RX_HEADER_LEN = 4  # receive status, next page pointer, byte count (2)
# A frame is accepted only when the ring has room for a maximum one (as QEMU's
# ne2000_buffer_full): header + maximum frame.
RX_ROOM_NEEDED = ETH_FRAME_LEN + RX_HEADER_LEN

# --- register offsets (0x00..0x0F; the page is CR.PS) ------------------------------------
REG_CR = 0x00  # all pages
# page 0, write
REG_PSTART = 0x01
REG_PSTOP = 0x02
REG_BNRY = 0x03  # read/write
REG_TPSR = 0x04
REG_TBCR0 = 0x05
REG_TBCR1 = 0x06
REG_ISR = 0x07  # read/write (write 1 to clear)
REG_RSAR0 = 0x08
REG_RSAR1 = 0x09
REG_RBCR0 = 0x0A
REG_RBCR1 = 0x0B
REG_RCR = 0x0C
REG_TCR = 0x0D
REG_DCR = 0x0E
REG_IMR = 0x0F
# page 0, read
REG_CLDA0 = 0x01
REG_CLDA1 = 0x02
REG_TSR = 0x04
REG_NCR = 0x05
REG_FIFO = 0x06
REG_CRDA0 = 0x08
REG_CRDA1 = 0x09
REG_RSR = 0x0C
REG_CNTR0 = 0x0D  # frame alignment errors
REG_CNTR1 = 0x0E  # CRC errors
REG_CNTR2 = 0x0F  # missed packets
# page 1 (read/write)
REG_PAR0 = 0x01  # ..0x06 physical address
REG_CURR = 0x07
REG_MAR0 = 0x08  # ..0x0F multicast hash
# page 2 (read back of the page 0 write-only registers)
REG_P2_PSTART = 0x01
REG_P2_PSTOP = 0x02
REG_P2_TPSR = 0x04
REG_P2_RCR = 0x0C
REG_P2_TCR = 0x0D
REG_P2_DCR = 0x0E
REG_P2_IMR = 0x0F

# --- CR: command register ----------------------------------------------------------------
CR_STP = 0x01
CR_STA = 0x02
CR_TXP = 0x04
CR_RD_MASK = 0x38
CR_RD_READ = 0x08
CR_RD_WRITE = 0x10
CR_RD_SEND = 0x18  # "send packet" (NE2000 ASIC does not implement it)
CR_RD_ABORT = 0x20  # abort / complete remote DMA (any value with bit 5 set)
CR_PS_SHIFT = 6
CR_PS_MASK = 0xC0
CR_PAGE0 = 0x00
CR_PAGE1 = 0x40
CR_PAGE2 = 0x80

# --- ISR / IMR bits --------------------------------------------------------------------
ISR_PRX = 0x01  # packet received
ISR_PTX = 0x02  # packet transmitted
ISR_RXE = 0x04  # receive error
ISR_TXE = 0x08  # transmit error
ISR_OVW = 0x10  # ring overwrite warning (receive buffer exhausted)
ISR_CNT = 0x20  # counter overflow
ISR_RDC = 0x40  # remote DMA complete
ISR_RST = 0x80  # reset status (not an interrupt source)
ISR_IRQ_MASK = 0x7F

# --- DCR: data configuration ---------------------------------------------------------------
DCR_WTS = 0x01  # word transfer select: 16-bit remote DMA
DCR_BOS = 0x02
DCR_LAS = 0x04
DCR_LS = 0x08  # loopback select: 1 = normal operation
DCR_ARM = 0x10
DCR_FT1 = 0x40

# --- TCR: transmit configuration ---------------------------------------------------------
TCR_CRC = 0x01  # inhibit CRC
TCR_LB_MASK = 0x06  # loopback mode: 0 normal, 1 internal (NIC), 2 external (ENDEC), 3 external
TCR_LB_INTERNAL = 0x02

# --- RCR: receive configuration ----------------------------------------------------------
RCR_SEP = 0x01
RCR_AR = 0x02  # accept runts
RCR_AB = 0x04  # accept broadcast
RCR_AM = 0x08  # accept multicast (hashed)
RCR_PRO = 0x10  # promiscuous physical
RCR_MON = 0x20  # monitor mode: check addresses, store nothing

# --- TSR / RSR ---------------------------------------------------------------------------
TSR_PTX = 0x01
TSR_ABT = 0x08  # transmit aborted
RSR_PRX = 0x01
RSR_MPA = 0x10  # missed packet
RSR_PHY = 0x20  # 1 = multicast/broadcast destination
RSR_DIS = 0x40  # receiver disabled (monitor mode)

REGISTER_NAMES_READ = {
    0: {
        REG_CR: "cr",
        REG_CLDA0: "clda0",
        REG_CLDA1: "clda1",
        REG_BNRY: "bnry",
        REG_TSR: "tsr",
        REG_NCR: "ncr",
        REG_FIFO: "fifo",
        REG_ISR: "isr",
        REG_CRDA0: "crda0",
        REG_CRDA1: "crda1",
        0x0A: "reserved0a",
        0x0B: "reserved0b",
        REG_RSR: "rsr",
        REG_CNTR0: "cntr0",
        REG_CNTR1: "cntr1",
        REG_CNTR2: "cntr2",
    },
    1: {
        REG_CR: "cr",
        **{REG_PAR0 + i: f"par{i}" for i in range(ETH_ALEN)},
        REG_CURR: "curr",
        **{REG_MAR0 + i: f"mar{i}" for i in range(8)},
    },
    2: {
        REG_CR: "cr",
        REG_P2_PSTART: "pstart",
        REG_P2_PSTOP: "pstop",
        REG_P2_TPSR: "tpsr",
        REG_P2_RCR: "rcr",
        REG_P2_TCR: "tcr",
        REG_P2_DCR: "dcr",
        REG_P2_IMR: "imr",
    },
}
REGISTER_NAMES_WRITE = {
    0: {
        REG_CR: "cr",
        REG_PSTART: "pstart",
        REG_PSTOP: "pstop",
        REG_BNRY: "bnry",
        REG_TPSR: "tpsr",
        REG_TBCR0: "tbcr0",
        REG_TBCR1: "tbcr1",
        REG_ISR: "isr",
        REG_RSAR0: "rsar0",
        REG_RSAR1: "rsar1",
        REG_RBCR0: "rbcr0",
        REG_RBCR1: "rbcr1",
        REG_RCR: "rcr",
        REG_TCR: "tcr",
        REG_DCR: "dcr",
        REG_IMR: "imr",
    },
    1: REGISTER_NAMES_READ[1],
    2: {REG_CR: "cr"},
}
