"""An ISA NE2000: the DP8390 NIC core, 16 KiB of buffer RAM and the NE2000 ASIC's ports.

One I/O window of :data:`dp8390.IO_LEN` ports (QEMU's ``ne2k_isa`` layout, default base
``0x300``): the sixteen DP8390 registers at ``0x00..0x0F`` (three pages, selected by
CR.PS), the remote-DMA data port at ``0x10`` and the reset port at ``0x1F``.  The host
moves frames between its memory and the board's buffer RAM with *remote DMA* through the
data port (``rep outsw``/``rep insw``): this port I/O is the network analogue of IDE PIO.

Transmit: the driver copies a frame to the buffer (remote write), sets TPSR/TBCR and
issues CR.TXP; the frame goes out on the :class:`EthernetLink` (or, with TCR internal
loopback, back into this NIC's own receive path) before the write returns, then
ISR.PTX is set.  Receive: a frame from the link that passes the address filter (RCR,
PAR, MAR) is stored in the receive ring ``PSTART..PSTOP`` at CURR behind a 4-byte header
(status, next page, byte count), with its FCS, and ISR.PRX is set; the driver reads it
with remote DMA and moves BNRY.  Everything completes synchronously, so the number of
status polls -- and so the exit count -- is deterministic.

Guest mistakes never raise out of :meth:`Ne2000.read`/:meth:`Ne2000.write`: they are
recorded as typed :class:`Ne2000Error` in ``errors`` (naming the DP8390 rule), logged,
and answered the way the board would: a remote DMA outside the board's memory or
running past its byte count moves no data (reads return all ones), a transmit with a
bad page or byte count is aborted (TSR.ABT, ISR.TXE), and a frame that arrives while
the ring registers are inconsistent or the ring is full is dropped and counted (CNTR2,
``rx_missed``).
"""

from __future__ import annotations

import logging
import zlib
from collections import Counter
from collections.abc import Callable

from emulator.bus import Bus
from emulator.devices import dp8390 as d

log = logging.getLogger(__name__)

BROADCAST = b"\xff" * d.ETH_ALEN


# --- errors -----------------------------------------------------------------------------------
class Ne2000Error(Exception):
    """A guest broke a DP8390 / NE2000 programming rule.  ``rule`` names it."""

    rule = ""

    def __init__(self, message: str, rule: str | None = None) -> None:
        if rule is not None:
            self.rule = rule
        self.message = message
        super().__init__(f"{message} [{self.rule}]")


class RingConfigError(Ne2000Error):
    """PSTART/PSTOP/BNRY/CURR do not describe a receive ring inside the buffer RAM."""


class RemoteDmaError(Ne2000Error):
    """A remote DMA outside the board's memory, past its byte count, or without one."""


class TransmitError(Ne2000Error):
    """A transmit with its buffer outside the RAM or an impossible byte count."""


def mcast_index(dest: bytes) -> int:
    """Bit of the 64-bit multicast filter (MAR0..7) for ``dest``: the top 6 bits of the
    Ethernet CRC of the destination address (DP8390D, "Multicast address filtering")."""
    crc = zlib.crc32(dest) ^ 0xFFFF_FFFF  # the raw (uncomplemented) register value
    # zlib's CRC is bit-reflected; the DP8390 takes the six most significant bits of the
    # CRC as shifted out MSB-first, i.e. the low six bits of the reflected value reversed.
    low = crc & 0x3F
    return int(f"{low:06b}"[::-1], 2)


class EthernetLink:
    """A cable between two NICs: a frame one transmits is received by the other.

    ``frames``/``bytes`` count what went over the wire in either direction.
    """

    def __init__(self, a: Ne2000, b: Ne2000) -> None:
        self.ends = (a, b)
        self.frames = 0
        self.bytes = 0
        a.link = self
        b.link = self

    def transmit(self, sender: Ne2000, frame: bytes) -> None:
        self.frames += 1
        self.bytes += len(frame)
        peer = self.ends[1] if sender is self.ends[0] else self.ends[0]
        peer.receive(frame)


class Ne2000:
    """One NE2000 board (DP8390 + 16 KiB RAM + PROM) on an ISA I/O window."""

    def __init__(
        self,
        mac: bytes,
        irq: Callable[[bool], None] | None = None,
        name: str = "ne2000",
    ) -> None:
        if len(mac) != d.ETH_ALEN:
            raise ValueError("mac must be 6 bytes")
        self.name = name
        self.mac = bytes(mac)
        self.irq = irq
        self.link: EthernetLink | None = None
        self.errors: list[Ne2000Error] = []
        self.accesses: Counter[str] = Counter()  # "offset:r|w" -> count, as QEMU's trace
        self.mem = bytearray(d.RAM_END)  # local addresses 0..RAM_END (PROM + RAM)
        prom = bytearray(16)
        prom[: d.ETH_ALEN] = self.mac
        prom[14] = prom[15] = d.PROM_SIGNATURE
        for i, b in enumerate(prom):  # each PROM byte appears twice (word-wide board)
            self.mem[2 * i] = self.mem[2 * i + 1] = b
        self.tx_frames = 0
        self.rx_frames = 0
        self.rx_missed = 0  # dropped: ring full or inconsistent, receiver stopped
        self.rx_filtered = 0  # not addressed to us
        self._line = False
        self._power_on()

    def _power_on(self) -> None:
        self.cr = d.CR_STP | d.CR_RD_ABORT
        self.isr = d.ISR_RST
        self.imr = 0
        self.dcr = 0
        self.tcr = 0
        self.rcr = 0
        self.pstart = self.pstop = self.bnry = self.curr = 0
        self.tpsr = 0
        self.tbcr = 0
        self.rsar = 0
        self.rbcr = 0
        self.tsr = 0
        self.rsr = 0
        self.cntr = [0, 0, 0]
        self.par = bytearray(d.ETH_ALEN)
        self.mar = bytearray(8)
        self._dma: str | None = None  # "read" | "write" while a remote DMA is active
        self._dma_addr = 0
        self._dma_left = 0

    # -- wiring ---------------------------------------------------------------------------
    def attach(self, bus: Bus, base: int = d.DEFAULT_IO_BASE) -> None:
        bus.add_pio(base, d.IO_LEN, self)

    # -- errors and the interrupt line ------------------------------------------------------
    def _error(self, err: Ne2000Error) -> None:
        self.errors.append(err)
        log.warning("%s: %s", self.name, err)

    def _update_irq(self) -> None:
        level = bool(self.isr & self.imr & d.ISR_IRQ_MASK)
        if level != self._line:
            self._line = level
            if self.irq is not None:
                self.irq(level)

    @property
    def irq_level(self) -> bool:
        return self._line

    @property
    def page(self) -> int:
        return (self.cr & d.CR_PS_MASK) >> d.CR_PS_SHIFT

    # -- bus interface --------------------------------------------------------------------
    def register_name(self, offset: int, is_write: bool) -> str:
        if offset == d.DATA_PORT:
            return "data"
        if offset == d.RESET_PORT:
            return "reset"
        if offset >= d.DATA_PORT:
            return f"{offset:#x}"
        table = d.REGISTER_NAMES_WRITE if is_write else d.REGISTER_NAMES_READ
        name = table.get(self.page, {}).get(offset)
        if name is None:
            return f"p{self.page}.{offset:#x}"
        return name if self.page == 0 or offset == d.REG_CR else f"p{self.page}.{name}"

    def read(self, offset: int, size: int) -> int:
        self.accesses[f"{offset:#04x}:r"] += 1
        if offset == d.DATA_PORT:
            return self._data_read(size)
        if offset == d.RESET_PORT:
            self._reset()
            return 0
        if offset > d.DATA_PORT or size != 1:
            return (1 << (8 * size)) - 1
        return self._reg_read(offset)

    def write(self, offset: int, size: int, value: int) -> None:
        self.accesses[f"{offset:#04x}:w"] += 1
        if offset == d.DATA_PORT:
            self._data_write(size, value)
        elif offset < d.DATA_PORT and size == 1:
            self._reg_write(offset, value & 0xFF)
        # writes to the reset port end the reset pulse: nothing to do

    def _reset(self) -> None:
        """Reading the reset port resets the NIC: stopped, remote DMA aborted, ISR.RST."""
        self._dma = None
        self._dma_left = 0
        self.cr = (self.cr & d.CR_PS_MASK) | d.CR_STP | d.CR_RD_ABORT
        self.isr = d.ISR_RST
        self._update_irq()

    # -- registers ------------------------------------------------------------------------
    def _reg_read(self, reg: int) -> int:
        if reg == d.REG_CR:
            return self.cr
        page = self.page
        if page == 0:
            return {
                d.REG_CLDA0: 0,
                d.REG_CLDA1: 0,
                d.REG_BNRY: self.bnry,
                d.REG_TSR: self.tsr,
                d.REG_NCR: 0,
                d.REG_FIFO: 0,
                d.REG_ISR: self.isr,
                d.REG_CRDA0: self._dma_addr & 0xFF,
                d.REG_CRDA1: self._dma_addr >> 8,
                d.REG_RSR: self.rsr,
                d.REG_CNTR0: self.cntr[0],
                d.REG_CNTR1: self.cntr[1],
                d.REG_CNTR2: self.cntr[2],
            }.get(reg, 0)
        if page == 1:
            if d.REG_PAR0 <= reg < d.REG_PAR0 + d.ETH_ALEN:
                return self.par[reg - d.REG_PAR0]
            if reg == d.REG_CURR:
                return self.curr
            return self.mar[reg - d.REG_MAR0]
        if page == 2:
            return {
                d.REG_P2_PSTART: self.pstart,
                d.REG_P2_PSTOP: self.pstop,
                d.REG_P2_TPSR: self.tpsr,
                d.REG_P2_RCR: self.rcr,
                d.REG_P2_TCR: self.tcr,
                d.REG_P2_DCR: self.dcr,
                d.REG_P2_IMR: self.imr,
            }.get(reg, 0)
        return 0

    def _reg_write(self, reg: int, value: int) -> None:
        if reg == d.REG_CR:
            self._command(value)
            return
        page = self.page
        if page == 1:
            if d.REG_PAR0 <= reg < d.REG_PAR0 + d.ETH_ALEN:
                self.par[reg - d.REG_PAR0] = value
            elif reg == d.REG_CURR:
                self._check_ring_page("CURR", value)
                self.curr = value
            else:
                self.mar[reg - d.REG_MAR0] = value
            return
        if page != 0:
            return  # page 2/3 registers are read-only (diagnostics)
        if reg == d.REG_PSTART:
            self._check_ram_page("PSTART", value, allow_end=False)
            self.pstart = value
        elif reg == d.REG_PSTOP:
            self._check_ram_page("PSTOP", value, allow_end=True)
            self.pstop = value
        elif reg == d.REG_BNRY:
            self._check_ring_page("BNRY", value)
            self.bnry = value
        elif reg == d.REG_TPSR:
            self.tpsr = value
        elif reg == d.REG_TBCR0:
            self.tbcr = (self.tbcr & 0xFF00) | value
        elif reg == d.REG_TBCR1:
            self.tbcr = (self.tbcr & 0x00FF) | value << 8
        elif reg == d.REG_ISR:
            self.isr &= ~(value & d.ISR_IRQ_MASK)
            self._update_irq()
        elif reg == d.REG_RSAR0:
            self.rsar = (self.rsar & 0xFF00) | value
        elif reg == d.REG_RSAR1:
            self.rsar = (self.rsar & 0x00FF) | value << 8
        elif reg == d.REG_RBCR0:
            self.rbcr = (self.rbcr & 0xFF00) | value
        elif reg == d.REG_RBCR1:
            self.rbcr = (self.rbcr & 0x00FF) | value << 8
        elif reg == d.REG_RCR:
            self.rcr = value
        elif reg == d.REG_TCR:
            self.tcr = value
        elif reg == d.REG_DCR:
            self.dcr = value
        elif reg == d.REG_IMR:
            self.imr = value
            self._update_irq()

    def _check_ram_page(self, what: str, page: int, *, allow_end: bool) -> None:
        hi = d.RAM_END_PAGE if allow_end else d.RAM_END_PAGE - 1
        lo = d.RAM_FIRST_PAGE + (1 if allow_end else 0)
        if not lo <= page <= hi:
            self._error(
                RingConfigError(
                    f"{what} page {page:#04x} outside the buffer RAM (pages "
                    f"{d.RAM_FIRST_PAGE:#04x}..{d.RAM_END_PAGE:#04x})",
                    "DP8390D: the receive ring PSTART..PSTOP must lie in buffer memory",
                )
            )

    def _check_ring_page(self, what: str, page: int) -> None:
        if self._ring_ok() and not self.pstart <= page < self.pstop:
            self._error(
                RingConfigError(
                    f"{what} page {page:#04x} outside the receive ring "
                    f"{self.pstart:#04x}..{self.pstop:#04x}",
                    f"DP8390D: {what} must point into the ring PSTART..PSTOP-1",
                )
            )

    def _ring_ok(self) -> bool:
        return d.RAM_FIRST_PAGE <= self.pstart < self.pstop <= d.RAM_END_PAGE

    # -- commands -------------------------------------------------------------------------
    def _command(self, value: int) -> None:
        if value & d.CR_STP:
            self.cr = value & ~d.CR_TXP
            self._dma = None
            return
        self.isr &= ~d.ISR_RST
        rd = value & d.CR_RD_MASK
        self.cr = value & ~d.CR_TXP
        if rd & d.CR_RD_ABORT:
            self._dma = None  # abort / complete remote DMA
        elif rd == d.CR_RD_SEND:
            self._error(
                RemoteDmaError(
                    "remote DMA 'send packet' command",
                    "NE2000: the ASIC does not implement Send Packet; use remote read",
                )
            )
            self._dma = None
            self.cr = (self.cr & ~d.CR_RD_MASK) | d.CR_RD_ABORT
        elif rd in (d.CR_RD_READ, d.CR_RD_WRITE):
            self._start_dma("read" if rd == d.CR_RD_READ else "write")
        if value & d.CR_TXP:
            self._transmit()
        self._update_irq()

    def _start_dma(self, kind: str) -> None:
        start, count = self.rsar, self.rbcr
        self._dma_addr = start
        self._dma_left = count
        if count == 0:
            self._dma = None
            self.isr |= d.ISR_RDC  # a zero-length remote DMA completes at once
            return
        problem = self._dma_range_problem(start, count, wrap=kind == "read")
        if problem is not None:
            self._error(
                RemoteDmaError(
                    f"remote {kind} of {count} bytes at {start:#06x}: {problem}",
                    "NE2000: remote DMA must stay inside the PROM (0x00..0x1F) or the "
                    f"buffer RAM ({d.RAM_START:#06x}..{d.RAM_END - 1:#06x})",
                )
            )
            self._dma = None
            self._dma_left = 0
            self.isr |= d.ISR_RDC  # complete at once, no data moved
            return
        self._dma = kind

    def _dma_range_problem(self, start: int, count: int, *, wrap: bool) -> str | None:
        if start + count <= d.PROM_SIZE:
            return None
        if not d.RAM_START <= start < d.RAM_END:
            return "start outside the board's memory"
        end = start + count
        if wrap and self._ring_ok() and self.pstart * 256 <= start < self.pstop * 256:
            # A remote read that runs into PSTOP continues at PSTART (reading a packet
            # that wraps around the end of the ring).
            return None if count <= (self.pstop - self.pstart) * 256 else "longer than the ring"
        if end > d.RAM_END:
            return f"runs {end - d.RAM_END} bytes past the buffer RAM"
        return None

    def _dma_span(self, n: int) -> slice | list[int]:
        """The next ``n`` NIC addresses of the remote DMA (a slice unless they wrap from
        PSTOP to PSTART), and the address moves past them."""
        addr = self._dma_addr
        stop = self.pstop * d.PAGE_SIZE
        if not (self._ring_ok() and addr < stop < addr + n + 1):
            self._dma_addr = addr + n
            return slice(addr, addr + n)
        out = []
        for _ in range(n):
            out.append(addr)
            addr = self.pstart * d.PAGE_SIZE if addr + 1 == stop else addr + 1
        self._dma_addr = addr
        return out

    def _dma_bytes(self, size: int) -> int:
        if not self.dcr & d.DCR_WTS:
            return 1
        return 4 if size == 4 else 2

    def _data_read(self, size: int) -> int:
        if self._dma != "read":
            self._error(
                RemoteDmaError(
                    "data port read without an active remote read",
                    "NE2000: the data port moves data only during remote DMA",
                )
            )
            return (1 << (8 * size)) - 1
        n = min(self._dma_bytes(size), self._dma_left)
        span = self._dma_span(n)
        out = self.mem[span] if isinstance(span, slice) else bytes(self.mem[a] for a in span)
        self._dma_advance(n)
        return int.from_bytes(out.ljust(size, b"\xff")[:size], "little")

    def _data_write(self, size: int, value: int) -> None:
        if self._dma != "write":
            self._error(
                RemoteDmaError(
                    "data port write without an active remote write",
                    "NE2000: the data port moves data only during remote DMA",
                )
            )
            return
        n = min(self._dma_bytes(size), self._dma_left)
        data = value.to_bytes(max(size, n), "little")[:n]
        span = self._dma_span(n)
        if isinstance(span, slice):
            self.mem[span] = data
        else:
            for a, b in zip(span, data, strict=True):
                self.mem[a] = b
        self._dma_advance(n)

    def _dma_advance(self, n: int) -> None:
        self._dma_left -= n
        if self._dma_left == 0:
            self._dma = None
            self.isr |= d.ISR_RDC
            self._update_irq()

    # -- transmit -------------------------------------------------------------------------
    def _transmit(self) -> None:
        start, count = self.tpsr * d.PAGE_SIZE, self.tbcr
        problem = None
        if not d.RAM_START <= start < d.RAM_END:
            problem = f"TPSR page {self.tpsr:#04x} outside the buffer RAM"
        elif not d.ETH_HLEN <= count <= d.ETH_FRAME_LEN:
            problem = f"TBCR {count} outside {d.ETH_HLEN}..{d.ETH_FRAME_LEN} bytes"
        elif start + count > d.RAM_END:
            problem = f"TPSR {self.tpsr:#04x} + TBCR {count} runs past the buffer RAM"
        if problem is not None:
            self._error(
                TransmitError(problem, "DP8390D: the transmit buffer holds one frame in RAM")
            )
            self.tsr = d.TSR_ABT
            self.isr |= d.ISR_TXE
            return
        frame = bytes(self.mem[start : start + count])
        self.tx_frames += 1
        self.tsr = d.TSR_PTX
        if self.tcr & d.TCR_LB_MASK:
            self.receive(frame)  # loopback: the frame comes back to this NIC
        elif self.link is not None:
            self.link.transmit(self, frame)
        self.isr |= d.ISR_PTX

    # -- receive --------------------------------------------------------------------------
    def _accepts(self, frame: bytes) -> bool:
        dest = frame[: d.ETH_ALEN]
        if self.rcr & d.RCR_PRO:
            return True
        if dest == BROADCAST:
            return bool(self.rcr & d.RCR_AB)
        if dest[0] & 1:
            if not self.rcr & d.RCR_AM:
                return False
            bit = mcast_index(dest)
            return bool(self.mar[bit >> 3] & (1 << (bit & 7)))
        return dest == bytes(self.par)

    def _missed(self, why: str) -> None:
        self.rx_missed += 1
        self.cntr[2] = min(self.cntr[2] + 1, 0xFF)
        self.rsr = d.RSR_MPA
        log.debug("%s: frame dropped: %s", self.name, why)

    def receive(self, frame: bytes) -> bool:
        """A frame from the wire; True if it was stored in the receive ring."""
        if len(frame) < d.ETH_HLEN or len(frame) > d.ETH_FRAME_LEN:
            self._missed(f"{len(frame)}-byte frame")
            return False
        if self.cr & d.CR_STP:
            self._missed("receiver stopped")
            return False
        if not self._accepts(frame):
            self.rx_filtered += 1
            return False
        if self.rcr & d.RCR_MON:
            self.rsr = d.RSR_DIS
            return False
        if not (
            self._ring_ok()
            and self.pstart <= self.curr < self.pstop
            and self.pstart <= self.bnry < self.pstop
        ):
            self._error(
                RingConfigError(
                    f"receive ring PSTART {self.pstart:#04x} PSTOP {self.pstop:#04x} "
                    f"CURR {self.curr:#04x} BNRY {self.bnry:#04x} is inconsistent: frame dropped",
                    "DP8390D: CURR and BNRY must point into PSTART..PSTOP-1 of a ring in RAM",
                )
            )
            self._missed("ring registers inconsistent")
            return False
        ring = (self.pstop - self.pstart) * d.PAGE_SIZE
        index, boundary = self.curr * d.PAGE_SIZE, self.bnry * d.PAGE_SIZE
        free = boundary - index if index < boundary else ring - (index - boundary)
        if free < d.RX_ROOM_NEEDED:
            self._missed("receive ring full")
            self.isr |= d.ISR_OVW
            self._update_irq()
            return False
        if len(frame) < d.ETH_ZLEN:
            frame = frame + bytes(d.ETH_ZLEN - len(frame))
        data = frame + zlib.crc32(frame).to_bytes(d.ETH_FCS_LEN, "little")
        count = len(data)  # the byte count covers the frame and its FCS
        pages = (d.RX_HEADER_LEN + count + d.PAGE_SIZE - 1) // d.PAGE_SIZE
        nxt = self.curr + pages
        if nxt >= self.pstop:
            nxt -= self.pstop - self.pstart
        self.rsr = d.RSR_PRX | (d.RSR_PHY if frame[0] & 1 else 0)
        record = bytes([self.rsr, nxt]) + count.to_bytes(2, "little") + data
        pos = index
        for b in record:
            self.mem[pos] = b
            pos += 1
            if pos == self.pstop * d.PAGE_SIZE:
                pos = self.pstart * d.PAGE_SIZE
        self.curr = nxt
        self.rx_frames += 1
        self.isr |= d.ISR_PRX
        self._update_irq()
        return True
