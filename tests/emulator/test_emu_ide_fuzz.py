"""Random guest behaviour against the IDE model: it may set ERR, it must never raise."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from emulator.devices import ata
from emulator.devices.ide import BM_WINDOW, CMD_WINDOW, CTRL_WINDOW, IdeController, MemoryBackend

RAM_SIZE = 0x20000


class Ram:
    def __init__(self, data: bytes) -> None:
        self.buf = bytearray(data.ljust(RAM_SIZE, b"\0"))
        self.size = RAM_SIZE

    def read(self, addr: int, length: int) -> bytes:
        assert addr >= 0 and addr + length <= self.size, "device read outside RAM"
        return bytes(self.buf[addr : addr + length])

    def write(self, addr: int, data: bytes) -> None:
        assert addr >= 0 and addr + len(data) <= self.size, "device wrote outside RAM"
        self.buf[addr : addr + len(data)] = data


COMMANDS = [*sorted(ata.COMMAND_NAMES), 0x00, 0x91, 0xFF]
offsets = st.sampled_from(
    [CMD_WINDOW + r for r in range(8)]
    + [CTRL_WINDOW]
    + [BM_WINDOW + ata.BM_REG_COMMAND, BM_WINDOW + ata.BM_REG_STATUS]
    + [BM_WINDOW + ata.BM_REG_PRDT + i for i in range(4)]
)
access = st.one_of(
    st.tuples(st.just("w"), offsets, st.sampled_from([1, 2, 4]), st.integers(0, 2**32 - 1)),
    st.tuples(st.just("r"), offsets, st.sampled_from([1, 2, 4]), st.just(0)),
    st.tuples(st.just("cmd"), st.just(CMD_WINDOW + 7), st.just(1), st.sampled_from(COMMANDS)),
    st.tuples(
        st.just("data"), st.just(CMD_WINDOW), st.sampled_from([2, 4]), st.integers(0, 2**32 - 1)
    ),
)


@settings(max_examples=300, deadline=None)
@given(ram=st.binary(max_size=256), ops=st.lists(access, max_size=60))
def test_random_register_traffic_never_raises(ram, ops):
    mem = Ram(ram)
    levels: list[bool] = []
    ide = IdeController(MemoryBackend(64 * ata.SECTOR_SIZE), memory=mem, irq=levels.append)
    for kind, offset, size, value in ops:
        if kind == "r":
            v = ide.read(offset, size)
            assert 0 <= v < 1 << (8 * size)
        elif kind == "data":
            for _ in range(64):  # bursts so transfers actually complete
                ide.write(offset, size, value)
                ide.read(offset, size)
        else:
            ide.write(offset, size, value & ((1 << (8 * size)) - 1))
        st_ = ide.status
        # DRQ and ERR never together; BSY only during software reset
        assert not (st_ & ata.STATUS_DRQ and st_ & ata.STATUS_ERR)
        if st_ & ata.STATUS_BSY:
            assert ide.devctl & ata.DEVCTL_SRST
    for err in ide.errors:
        assert err.rule  # every recorded violation names its rule
