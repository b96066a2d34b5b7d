"""virtio-pci transport (virtio 1.4 §4.1): capabilities, the common configuration,
notifications, ISR/INTx and MSI-X, and one clause-citing error per §4.1 rule broken.

Pure: the transport in front of the same DummyDevice as the virtio-mmio tests, driven
through its configuration-space and BAR faces, guest memory in a bytearray."""

from __future__ import annotations

import pytest
import trio

from virtio.device import VirtioDevice
from virtio.errors import DriverError
from virtio.memory import GuestMemory, MemoryRegion
from virtio.spec import sections as sec
from virtio.spec.features import TransportFeature as TF
from virtio.spec.ids import DeviceId
from virtio.spec.pci import VIRTIO_MSI_NO_VECTOR, PciCapType
from virtio.spec.pci import PciCommonCfg as C
from virtio.spec.status import DeviceStatus as S
from virtio.testing.driver import DriverQueue
from virtio.transport.core import QueueSetupError
from virtio.transport.mmio import TrioRunner
from virtio.transport.msix import CONTROL_ENABLE, CONTROL_FUNCTION_MASK
from virtio.transport.pci import (
    COMMON_OFFSET,
    DEVICE_OFFSET,
    ISR_OFFSET,
    MSIX_PBA_OFFSET,
    MSIX_TABLE_OFFSET,
    NOTIFY_OFFSET,
    PciAccessError,
    PciCapabilityError,
    PciTransport,
)

VERSION_1 = TF.VIRTIO_F_VERSION_1.mask
EVENT_IDX = TF.VIRTIO_F_EVENT_IDX.mask
DEVICE_BIT = 1 << 5


class DummyDevice(VirtioDevice):
    """Two queues; echoes readable bytes, upper-cased, into the writable part."""

    device_id = DeviceId.VIRTIO_ID_CONSOLE
    queue_max_sizes = (16, 8)
    device_features = DEVICE_BIT

    def __init__(self) -> None:
        super().__init__()
        self.config = bytearray(range(1, 11))
        self.resets = 0
        self.handled = 0

    def config_bytes(self) -> bytes:
        return bytes(self.config)

    def write_config(self, offset: int, data: bytes) -> None:
        self.config[offset : offset + len(data)] = data

    def reset(self) -> None:
        super().reset()
        self.resets += 1

    async def handle(self, queue_index: int, chain) -> int:
        await trio.lowlevel.checkpoint()
        self.handled += 1
        return chain.writer().write(chain.reader().read().upper())


class Line:
    def __init__(self) -> None:
        self.level = False

    def __call__(self, level: bool) -> None:
        self.level = level


@pytest.fixture
def memory():
    buf = bytearray(1 << 20)
    return GuestMemory([MemoryRegion(0, 1 << 20, memoryview(buf), _owner=buf)])


@pytest.fixture
def runner():
    with TrioRunner() as r:
        yield r


class Msi:
    def __init__(self) -> None:
        self.messages: list[tuple[int, int]] = []

    def __call__(self, address: int, data: int) -> None:
        self.messages.append((address, data))


def make(memory, runner=None):
    dev = DummyDevice()
    line, msi = Line(), Msi()
    t = PciTransport(dev, memory, intx=line, msi=msi, runner=runner)
    return t, dev, line, msi


def c_rd(t, field, size):
    return t.read(COMMON_OFFSET + int(field), size)


def c_wr(t, field, size, value):
    t.write(COMMON_OFFSET + int(field), size, value)


def caps(t) -> dict[int, dict]:
    """Walk the capability list as a driver does (§4.1.4): cfg_type -> fields."""
    out, ptr = {}, t.capability_pointer
    while ptr:
        if t.config_read(ptr, 1) == 0x09:
            ctype = t.config_read(ptr + 3, 1)
            out.setdefault(
                ctype,
                {
                    "at": ptr,
                    "bar": t.config_read(ptr + 4, 1),
                    "offset": t.config_read(ptr + 8, 4),
                    "length": t.config_read(ptr + 12, 4),
                    "len": t.config_read(ptr + 2, 1),
                },
            )
        elif t.config_read(ptr, 1) == 0x11:
            out["msix"] = {"at": ptr, "table": t.config_read(ptr + 4, 4)}
        ptr = t.config_read(ptr + 1, 1)
    return out


def negotiate(t, features=VERSION_1 | EVENT_IDX):
    c_wr(t, C.VIRTIO_PCI_COMMON_STATUS, 1, S.ACKNOWLEDGE)
    c_wr(t, C.VIRTIO_PCI_COMMON_STATUS, 1, S.ACKNOWLEDGE | S.DRIVER)
    for sel in (0, 1):
        c_wr(t, C.VIRTIO_PCI_COMMON_GFSELECT, 4, sel)
        c_wr(t, C.VIRTIO_PCI_COMMON_GF, 4, (features >> (32 * sel)) & 0xFFFFFFFF)
    c_wr(t, C.VIRTIO_PCI_COMMON_STATUS, 1, S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK)
    return c_rd(t, C.VIRTIO_PCI_COMMON_STATUS, 1)


def setup_queue(t, memory, index=0, size=8, vector=None):
    dq = DriverQueue(memory, size, base=0x10000 + index * 0x20000, event_idx=True, data_size=0x8000)
    c_wr(t, C.VIRTIO_PCI_COMMON_Q_SELECT, 2, index)
    assert c_rd(t, C.VIRTIO_PCI_COMMON_Q_ENABLE, 2) == 0
    c_wr(t, C.VIRTIO_PCI_COMMON_Q_SIZE, 2, size)
    for lo, addr in (
        (C.VIRTIO_PCI_COMMON_Q_DESCLO, dq.desc_addr),
        (C.VIRTIO_PCI_COMMON_Q_AVAILLO, dq.driver_addr),
        (C.VIRTIO_PCI_COMMON_Q_USEDLO, dq.device_addr),
    ):
        c_wr(t, lo, 4, addr & 0xFFFFFFFF)
        c_wr(t, int(lo) + 4, 4, addr >> 32)
    if vector is not None:
        c_wr(t, C.VIRTIO_PCI_COMMON_Q_MSIX, 2, vector)
    c_wr(t, C.VIRTIO_PCI_COMMON_Q_ENABLE, 2, 1)
    return dq


def start(t, memory, **kw):
    assert negotiate(t) & S.FEATURES_OK
    dq = setup_queue(t, memory, **kw)
    c_wr(t, C.VIRTIO_PCI_COMMON_STATUS, 1, S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK)
    assert not t.errors, t.errors
    return dq


def notify(t, index=0, size=2, value=None):
    t.write(NOTIFY_OFFSET + 4 * index, size, index if value is None else value)


def only_error(t, cls, section):
    assert len(t.errors) == 1, t.errors
    err = t.errors[0]
    assert isinstance(err, cls), err
    assert err.spec_section == section, err.section
    return err


# -- identity and capabilities (§4.1.2, §4.1.4) ----------------------------------------------
def test_ids_and_capability_list(memory):
    t, dev, _, _ = make(memory)
    assert (t.vendor_id, t.device_id) == (0x1AF4, 0x1040 + int(dev.device_id))
    assert t.revision >= 1  # non-transitional (§4.1.2.1)
    found = caps(t)
    common = found[PciCapType.VIRTIO_PCI_CAP_COMMON_CFG]
    assert (common["bar"], common["offset"], common["length"]) == (0, COMMON_OFFSET, 64)
    notify_cap = found[PciCapType.VIRTIO_PCI_CAP_NOTIFY_CFG]
    assert t.config_read(notify_cap["at"] + 16, 4) == 4  # notify_off_multiplier
    assert notify_cap["len"] == 20 and notify_cap["offset"] % 2 == 0
    # §4.1.4.4.1: cap.length >= queue_notify_off * multiplier + 2 for every queue
    assert notify_cap["length"] >= (len(dev.queue_max_sizes) - 1) * 4 + 2
    assert found[PciCapType.VIRTIO_PCI_CAP_ISR_CFG]["offset"] == ISR_OFFSET
    device_cap = found[PciCapType.VIRTIO_PCI_CAP_DEVICE_CFG]
    assert (device_cap["offset"], device_cap["length"]) == (DEVICE_OFFSET, len(dev.config))
    assert PciCapType.VIRTIO_PCI_CAP_PCI_CFG in found  # §4.1.4.9.1
    assert found["msix"]["table"] == MSIX_TABLE_OFFSET  # BIR 0
    assert not t.errors


def test_capability_writes_are_refused(memory):
    t, _, _, _ = make(memory)
    common = caps(t)[PciCapType.VIRTIO_PCI_CAP_COMMON_CFG]["at"]
    t.config_write(common + 8, 4, 0x1234)
    only_error(t, PciCapabilityError, sec.S_4_1_4_1)
    assert caps(t)[PciCapType.VIRTIO_PCI_CAP_COMMON_CFG]["offset"] == COMMON_OFFSET
    assert not t.status & S.DEVICE_NEEDS_RESET


def test_pci_cfg_access_window(memory):
    t, dev, _, _ = make(memory)
    at = caps(t)[PciCapType.VIRTIO_PCI_CAP_PCI_CFG]["at"]
    t.config_write(at + 4, 1, 0)
    t.config_write(at + 12, 4, 4)
    t.config_write(at + 8, 4, DEVICE_OFFSET + 4)
    assert t.config_read(at + 16, 4) == int.from_bytes(dev.config[4:8], "little")
    t.config_write(at + 8, 4, COMMON_OFFSET + int(C.VIRTIO_PCI_COMMON_NUMQ) - 2)  # config_msix
    t.config_write(at + 12, 4, 2)
    assert t.config_read(at + 16, 2) == VIRTIO_MSI_NO_VECTOR
    assert not t.errors
    t.config_write(at + 8, 4, MSIX_TABLE_OFFSET)  # not a virtio structure
    t.config_read(at + 16, 4)
    only_error(t, PciCapabilityError, sec.S_4_1_4_9_2)


# -- common configuration ------------------------------------------------------------------
def test_common_cfg_reset_values_and_queue_sizes(memory):
    t, _, _, _ = make(memory)
    assert c_rd(t, C.VIRTIO_PCI_COMMON_NUMQ, 2) == 2
    assert c_rd(t, C.VIRTIO_PCI_COMMON_MSIX, 2) == VIRTIO_MSI_NO_VECTOR
    for sel, size in ((0, 16), (1, 8), (2, 0)):
        c_wr(t, C.VIRTIO_PCI_COMMON_Q_SELECT, 2, sel)
        assert c_rd(t, C.VIRTIO_PCI_COMMON_Q_SIZE, 2) == size
        assert c_rd(t, C.VIRTIO_PCI_COMMON_Q_NOFF, 2) == (sel if size else 0)
        assert c_rd(t, C.VIRTIO_PCI_COMMON_Q_MSIX, 2) == (VIRTIO_MSI_NO_VECTOR if size else 0)
    c_wr(t, C.VIRTIO_PCI_COMMON_DFSELECT, 4, 0)
    assert c_rd(t, C.VIRTIO_PCI_COMMON_DF, 4) & DEVICE_BIT
    assert not t.errors


def test_driver_feature_reads_back_valid_bits(memory):
    t, _, _, _ = make(memory)
    c_wr(t, C.VIRTIO_PCI_COMMON_STATUS, 1, S.ACKNOWLEDGE | S.DRIVER)
    c_wr(t, C.VIRTIO_PCI_COMMON_GFSELECT, 4, 1)
    c_wr(t, C.VIRTIO_PCI_COMMON_GF, 4, 0xFFFF_FFFF)  # more than offered (§4.1.4.3.1)
    c_wr(t, C.VIRTIO_PCI_COMMON_DFSELECT, 4, 1)
    assert c_rd(t, C.VIRTIO_PCI_COMMON_GF, 4) == c_rd(t, C.VIRTIO_PCI_COMMON_DF, 4)


@pytest.mark.parametrize(
    ("field", "size"),
    [
        (C.VIRTIO_PCI_COMMON_STATUS, 4),  # 8-bit field, 32-bit access
        (C.VIRTIO_PCI_COMMON_Q_SELECT, 1),  # 16-bit field, 8-bit access
        (C.VIRTIO_PCI_COMMON_DF, 2),  # 32-bit field, 16-bit access
        (int(C.VIRTIO_PCI_COMMON_Q_DESCLO) + 2, 4),  # misaligned
        (C.VIRTIO_PCI_COMMON_Q_DESCLO, 8),  # 64-bit field in one access
    ],
    ids=["status-32", "queue-select-8", "df-16", "misaligned", "desc-64"],
)
def test_access_widths_4_1_3_1(memory, field, size):
    t, _, _, _ = make(memory)
    assert c_rd(t, field, size) == 0
    only_error(t, PciAccessError, sec.S_4_1_3_1)
    assert not t.status & S.DEVICE_NEEDS_RESET


@pytest.mark.parametrize(
    ("field", "size"),
    [
        (C.VIRTIO_PCI_COMMON_DF, 4),
        (C.VIRTIO_PCI_COMMON_NUMQ, 2),
        (C.VIRTIO_PCI_COMMON_CFGGENERATION, 1),
        (C.VIRTIO_PCI_COMMON_Q_NOFF, 2),
        (C.VIRTIO_PCI_COMMON_Q_NDATA, 2),
    ],
)
def test_read_only_fields(memory, field, size):
    t, _, _, _ = make(memory)
    c_wr(t, field, size, 1)
    only_error(t, PciAccessError, sec.S_4_1_4_3_2)


def test_queue_size_must_be_power_of_two_for_split_rings(memory):
    t, _, _, _ = make(memory)
    negotiate(t)
    c_wr(t, C.VIRTIO_PCI_COMMON_Q_SELECT, 2, 0)
    c_wr(t, C.VIRTIO_PCI_COMMON_Q_SIZE, 2, 12)
    err = only_error(t, QueueSetupError, sec.S_4_1_4_3_2)
    assert "power of 2" in err.message
    assert t.status & S.DEVICE_NEEDS_RESET


def test_queue_enable_zero_is_a_driver_error(memory):
    t, _, _, _ = make(memory)
    start(t, memory)
    c_wr(t, C.VIRTIO_PCI_COMMON_Q_ENABLE, 2, 0)
    only_error(t, QueueSetupError, sec.S_4_1_4_3_2)
    assert t.status & S.DEVICE_NEEDS_RESET


def test_queue_enabled_before_its_rings_are_configured(memory):
    t, _, _, _ = make(memory)
    negotiate(t)
    c_wr(t, C.VIRTIO_PCI_COMMON_Q_SELECT, 2, 0)
    c_wr(t, C.VIRTIO_PCI_COMMON_Q_DESCLO, 4, 0x10000)
    c_wr(t, C.VIRTIO_PCI_COMMON_Q_ENABLE, 2, 1)
    err = only_error(t, QueueSetupError, sec.S_4_1_4_3_2)
    assert "queue_device" in err.message and "queue_driver" in err.message
    assert c_rd(t, C.VIRTIO_PCI_COMMON_Q_ENABLE, 2) == 0


def test_queue_fields_locked_once_enabled(memory):
    t, _, _, _ = make(memory)
    start(t, memory)
    c_wr(t, C.VIRTIO_PCI_COMMON_Q_DESCLO, 4, 0x5000)
    only_error(t, QueueSetupError, sec.S_4_1_4_3_2)


def test_reset_reads_zero_and_unmaps_vectors(memory):
    t, dev, _, _ = make(memory)
    start(t, memory, vector=1)
    c_wr(t, C.VIRTIO_PCI_COMMON_MSIX, 2, 0)
    c_wr(t, C.VIRTIO_PCI_COMMON_STATUS, 1, 0)
    assert c_rd(t, C.VIRTIO_PCI_COMMON_STATUS, 1) == 0
    assert dev.resets >= 1
    assert c_rd(t, C.VIRTIO_PCI_COMMON_MSIX, 2) == VIRTIO_MSI_NO_VECTOR
    c_wr(t, C.VIRTIO_PCI_COMMON_Q_SELECT, 2, 0)
    assert c_rd(t, C.VIRTIO_PCI_COMMON_Q_MSIX, 2) == VIRTIO_MSI_NO_VECTOR
    assert c_rd(t, C.VIRTIO_PCI_COMMON_Q_ENABLE, 2) == 0  # §4.1.4.3.1


# -- notifications (§4.1.5.2) -----------------------------------------------------------------
def test_notify_runs_the_queue_and_interrupts_through_isr(memory, runner):
    t, _, line, msi = make(memory, runner)
    dq = start(t, memory)
    dq.add([b"hello"], [8])
    assert dq.publish()
    notify(t)
    assert dq.get_used()[0].data[:5] == b"HELLO"
    assert line.level and t.intx_status
    assert t.read(ISR_OFFSET, 1) == 1  # queue interrupt; reading clears it (§4.1.4.5.1)
    assert not line.level and t.read(ISR_OFFSET, 1) == 0
    assert not msi.messages and not t.errors


@pytest.mark.parametrize(
    ("size", "value", "offset"),
    [(4, 0, 0), (1, 0, 0), (2, 1, 0), (2, 0, 2)],
    ids=["32-bit", "8-bit", "wrong-index", "between-queues"],
)
def test_bad_notifications_4_1_5_2_1(memory, runner, size, value, offset):
    t, dev, _, _ = make(memory, runner)
    start(t, memory)
    t.write(NOTIFY_OFFSET + offset, size, value)
    only_error(t, PciAccessError, sec.S_4_1_5_2_1)
    assert dev.handled == 0


def test_notify_before_driver_ok(memory, runner):
    t, _, _, _ = make(memory, runner)
    negotiate(t)
    setup_queue(t, memory)
    notify(t)
    assert isinstance(t.errors[0], DriverError)
    assert t.errors[0].spec_section == sec.S_3_1_1


# -- MSI-X (§4.1.5.1.2, §4.1.5.3-4) -----------------------------------------------------------
def enable_msix(t, mask=False):
    at = caps(t)["msix"]["at"]
    for entry, data in ((0, 0x31), (1, 0x32)):
        base = MSIX_TABLE_OFFSET + 16 * entry
        t.write(base, 4, 0xFEE00000)
        t.write(base + 4, 4, 0)
        t.write(base + 8, 4, data)
        t.write(base + 12, 4, 0)
    t.config_write(at + 2, 2, CONTROL_ENABLE | (CONTROL_FUNCTION_MASK if mask else 0))
    return at


def test_msix_vectors_deliver_without_isr(memory, runner):
    t, _, line, msi = make(memory, runner)
    enable_msix(t)
    negotiate(t)
    c_wr(t, C.VIRTIO_PCI_COMMON_MSIX, 2, 1)
    assert c_rd(t, C.VIRTIO_PCI_COMMON_MSIX, 2) == 1
    dq = setup_queue(t, memory, vector=0)
    c_wr(t, C.VIRTIO_PCI_COMMON_STATUS, 1, S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK)
    dq.add([b"x"], [4])
    dq.publish()
    notify(t)
    assert msi.messages == [(0xFEE00000, 0x31)]
    assert not line.level and t.read(ISR_OFFSET, 1) == 0  # ISR unused for queues
    t.config_changed()
    assert msi.messages[-1] == (0xFEE00000, 0x32)
    assert t.read(ISR_OFFSET, 1) == 2  # the config bit is set before the message
    assert not t.errors


def test_no_vector_means_no_interrupt(memory, runner):
    t, _, line, msi = make(memory, runner)
    enable_msix(t)
    dq = start(t, memory)  # queue_msix_vector left NO_VECTOR
    dq.add([b"x"], [4])
    dq.publish()
    notify(t)
    assert dq.get_used() and not msi.messages and not line.level  # §4.1.5.3.1


def test_masked_function_sets_pending_bit_then_delivers(memory, runner):
    t, _, _, msi = make(memory, runner)
    at = enable_msix(t, mask=True)
    dq = start(t, memory, vector=0)
    dq.add([b"x"], [4])
    dq.publish()
    notify(t)
    assert not msi.messages and t.read(MSIX_PBA_OFFSET, 8) == 1
    t.config_write(at + 2, 2, CONTROL_ENABLE)
    assert msi.messages == [(0xFEE00000, 0x31)] and t.read(MSIX_PBA_OFFSET, 8) == 0


def test_vector_beyond_the_table_reads_no_vector(memory):
    t, _, _, _ = make(memory)
    c_wr(t, C.VIRTIO_PCI_COMMON_MSIX, 2, t.msix.size)
    assert c_rd(t, C.VIRTIO_PCI_COMMON_MSIX, 2) == VIRTIO_MSI_NO_VECTOR
    only_error(t, DriverError, sec.S_4_1_5_1_2_2)
    assert not t.status & S.DEVICE_NEEDS_RESET


def test_msix_table_takes_only_dword_accesses(memory):
    t, _, _, _ = make(memory)
    t.write(MSIX_TABLE_OFFSET + 2, 2, 0xFFFF)
    assert t.read(MSIX_TABLE_OFFSET, 4) == 0
    assert len(t.errors) == 1 and "DWORD" in t.errors[0].message
    assert t.read(MSIX_TABLE_OFFSET + 12, 4) == 1  # entries come out of reset masked


def test_device_config_and_generation(memory):
    t, dev, _, _ = make(memory)
    assert t.read(DEVICE_OFFSET + 4, 4) == int.from_bytes(dev.config[4:8], "little")
    gen = c_rd(t, C.VIRTIO_PCI_COMMON_CFGGENERATION, 1)
    dev.config[0] = 0x55
    t.config_changed()
    assert c_rd(t, C.VIRTIO_PCI_COMMON_CFGGENERATION, 1) != gen
    t.read(DEVICE_OFFSET + 9, 2)  # misaligned 16-bit access
    only_error(t, PciAccessError, sec.S_4_1_3_1)
