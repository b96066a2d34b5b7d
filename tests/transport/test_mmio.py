"""virtio-mmio transport (virtio 1.4 §4.2): register table, status state machine,
queue setup, notifications, and one typed error per malformed sequence."""

from __future__ import annotations

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtio.device import VirtioDevice
from virtio.errors import DriverError, QueueConfigError
from virtio.memory import GuestMemory, MemoryRegion
from virtio.spec import sections
from virtio.spec.features import TransportFeature as TF
from virtio.spec.ids import DeviceId
from virtio.spec.mmio import VIRTIO_MMIO_MAGIC, MmioReg
from virtio.spec.status import DeviceStatus as S
from virtio.testing.driver import DriverQueue
from virtio.transport.mmio import (
    INT_CONFIG,
    INT_VRING,
    DeviceStatusError,
    FeatureNegotiationError,
    MmioAccessError,
    MmioTransport,
    NotificationError,
    QueueSetupError,
    TrioRunner,
)

R = MmioReg
MEM_SIZE = 1 << 20
VERSION_1 = TF.VIRTIO_F_VERSION_1.mask
EVENT_IDX = TF.VIRTIO_F_EVENT_IDX.mask
RING_RESET = TF.VIRTIO_F_RING_RESET.mask
DEVICE_BIT = 1 << 5


class DummyDevice(VirtioDevice):
    """Two queues; echoes readable bytes, upper-cased, into the writable part."""

    device_id = DeviceId.VIRTIO_ID_CONSOLE
    queue_max_sizes = (16, 8)
    device_features = DEVICE_BIT

    def __init__(self) -> None:
        super().__init__()
        self.config = bytearray(b"\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a")
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
        data = chain.reader().read().upper()
        return chain.writer().write(data)


class Line:
    def __init__(self) -> None:
        self.level = False
        self.raised = 0

    def __call__(self, level: bool) -> None:
        if level and not self.level:
            self.raised += 1
        self.level = level


@pytest.fixture
def memory():
    buf = bytearray(MEM_SIZE)
    return GuestMemory([MemoryRegion(0, MEM_SIZE, memoryview(buf), _owner=buf)])


@pytest.fixture
def runner():
    with TrioRunner() as r:
        yield r


def make(memory, runner=None, **kw):
    dev = DummyDevice()
    line = Line()
    t = MmioTransport(dev, memory, line, runner=runner, **kw)
    return t, dev, line


def rd(t, reg):
    return t.read(int(reg), 4)


def wr(t, reg, value):
    t.write(int(reg), 4, value)


def negotiate(t, features=None):
    wr(t, R.VIRTIO_MMIO_STATUS, S.ACKNOWLEDGE)
    wr(t, R.VIRTIO_MMIO_STATUS, S.ACKNOWLEDGE | S.DRIVER)
    if features is None:
        features = VERSION_1 | EVENT_IDX
    for sel in (0, 1):
        wr(t, R.VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel)
        wr(t, R.VIRTIO_MMIO_DRIVER_FEATURES, (features >> (32 * sel)) & 0xFFFFFFFF)
    wr(t, R.VIRTIO_MMIO_STATUS, S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK)
    return rd(t, R.VIRTIO_MMIO_STATUS)


def setup_queue(t, memory, index=0, size=8, event_idx=True, base=0x10000):
    dq = DriverQueue(memory, size, base=base, event_idx=event_idx, data_size=0x8000)
    wr(t, R.VIRTIO_MMIO_QUEUE_SEL, index)
    assert rd(t, R.VIRTIO_MMIO_QUEUE_READY) == 0
    wr(t, R.VIRTIO_MMIO_QUEUE_NUM, size)
    for lo, hi, addr in (
        (R.VIRTIO_MMIO_QUEUE_DESC_LOW, R.VIRTIO_MMIO_QUEUE_DESC_HIGH, dq.desc_addr),
        (R.VIRTIO_MMIO_QUEUE_DRIVER_LOW, R.VIRTIO_MMIO_QUEUE_DRIVER_HIGH, dq.driver_addr),
        (R.VIRTIO_MMIO_QUEUE_DEVICE_LOW, R.VIRTIO_MMIO_QUEUE_DEVICE_HIGH, dq.device_addr),
    ):
        wr(t, lo, addr & 0xFFFFFFFF)
        wr(t, hi, addr >> 32)
    wr(t, R.VIRTIO_MMIO_QUEUE_READY, 1)
    return dq


def start(t, memory, **kw):
    negotiate(t)
    dq = setup_queue(t, memory, **kw)
    wr(t, R.VIRTIO_MMIO_STATUS, S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK)
    assert not t.errors, t.errors
    return dq


# -- register table ------------------------------------------------------------------------
def test_identification_registers(memory):
    t, _dev, _ = make(memory)
    assert rd(t, R.VIRTIO_MMIO_MAGIC_VALUE) == VIRTIO_MMIO_MAGIC == 0x74726976
    assert rd(t, R.VIRTIO_MMIO_VERSION) == 2
    assert rd(t, R.VIRTIO_MMIO_DEVICE_ID) == int(DeviceId.VIRTIO_ID_CONSOLE)
    assert rd(t, R.VIRTIO_MMIO_VENDOR_ID) == t.vendor_id
    assert rd(t, R.VIRTIO_MMIO_STATUS) == 0
    assert rd(t, R.VIRTIO_MMIO_INTERRUPT_STATUS) == 0
    assert rd(t, R.VIRTIO_MMIO_CONFIG_GENERATION) == 0
    assert not t.errors


def test_device_features_windows_include_transport_bits(memory):
    t, dev, _ = make(memory)
    wr(t, R.VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0)
    low = rd(t, R.VIRTIO_MMIO_DEVICE_FEATURES)
    wr(t, R.VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1)
    high = rd(t, R.VIRTIO_MMIO_DEVICE_FEATURES)
    wr(t, R.VIRTIO_MMIO_DEVICE_FEATURES_SEL, 2)
    assert rd(t, R.VIRTIO_MMIO_DEVICE_FEATURES) == 0
    offered = low | high << 32
    assert offered & VERSION_1 and offered & RING_RESET and offered & DEVICE_BIT
    assert offered == dev.offered_features() | VERSION_1 | RING_RESET


def test_queue_num_max_per_queue_and_zero_beyond(memory):
    t, _, _ = make(memory)
    for sel, expect in ((0, 16), (1, 8), (2, 0), (100, 0)):
        wr(t, R.VIRTIO_MMIO_QUEUE_SEL, sel)
        assert rd(t, R.VIRTIO_MMIO_QUEUE_NUM_MAX) == expect


def test_shm_registers_report_no_region(memory):
    t, _, _ = make(memory)
    wr(t, R.VIRTIO_MMIO_SHM_SEL, 0)
    for reg in (
        R.VIRTIO_MMIO_SHM_LEN_LOW,
        R.VIRTIO_MMIO_SHM_LEN_HIGH,
        R.VIRTIO_MMIO_SHM_BASE_LOW,
        R.VIRTIO_MMIO_SHM_BASE_HIGH,
    ):
        assert rd(t, reg) == 0xFFFFFFFF


def test_config_space_accesses(memory):
    t, dev, _ = make(memory)
    base = int(R.VIRTIO_MMIO_CONFIG)
    assert t.read(base, 1) == 1
    assert t.read(base + 2, 2) == 0x0403
    assert t.read(base + 4, 4) == 0x08070605
    t.write(base + 8, 2, 0xBEEF)
    assert dev.config[8:10] == b"\xef\xbe"
    assert not t.errors


@pytest.mark.parametrize(
    ("offset", "size"),
    [(1, 2), (2, 4), (0, 8), (8, 4), (9, 2), (10, 1)],
    ids=["misaligned16", "misaligned32", "64bit", "beyond32", "beyond16", "past-end"],
)
def test_bad_config_access_is_typed_error(memory, offset, size):
    t, _, _ = make(memory)
    assert t.read(int(R.VIRTIO_MMIO_CONFIG) + offset, size) == 0
    assert isinstance(t.errors[-1], MmioAccessError)
    assert t.errors[-1].spec_section.number == "4.2.2.2"


def test_register_names_for_the_bus(memory):
    t, _, _ = make(memory)
    assert t.register_name(int(R.VIRTIO_MMIO_QUEUE_NOTIFY), True) == "queue_notify"
    assert t.register_name(int(R.VIRTIO_MMIO_QUEUE_AVAIL_LOW), True) == "queue_driver_low"
    assert t.register_name(0x104, False) == "config"


# -- access rules ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("offset", "size", "write"),
    [
        (int(R.VIRTIO_MMIO_STATUS), 1, True),
        (int(R.VIRTIO_MMIO_MAGIC_VALUE), 2, False),
        (int(R.VIRTIO_MMIO_STATUS) + 2, 4, False),
        (int(R.VIRTIO_MMIO_MAGIC_VALUE), 4, True),
        (int(R.VIRTIO_MMIO_QUEUE_NUM_MAX), 4, True),
        (int(R.VIRTIO_MMIO_INTERRUPT_STATUS), 4, True),
        (int(R.VIRTIO_MMIO_CONFIG_GENERATION), 4, True),
        (int(R.VIRTIO_MMIO_QUEUE_NOTIFY), 4, False),
        (int(R.VIRTIO_MMIO_DRIVER_FEATURES), 4, False),
        (int(R.VIRTIO_MMIO_QUEUE_DESC_LOW), 4, False),
        (0x018, 4, False),
        (0x0F0, 4, True),
    ],
    ids=[
        "byte-status",
        "half-magic",
        "misaligned",
        "ro-magic",
        "ro-num-max",
        "ro-int-status",
        "ro-generation",
        "wo-notify",
        "wo-driver-features",
        "wo-desc",
        "hole-read",
        "hole-write",
    ],
)
def test_control_register_access_rules(memory, offset, size, write):
    t, _, _ = make(memory)
    if write:
        t.write(offset, size, 1)
    else:
        assert t.read(offset, size) == 0
    err = t.errors[-1]
    assert isinstance(err, MmioAccessError)
    assert "4.2.2.2" in str(err)
    assert rd(t, R.VIRTIO_MMIO_STATUS) == 0  # recoverable: no NEEDS_RESET


# -- status state machine ------------------------------------------------------------------------
def test_status_sequence_and_features(memory):
    t, dev, _ = make(memory)
    status = negotiate(t, VERSION_1 | EVENT_IDX | DEVICE_BIT)
    assert status == S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK
    assert t.negotiated == VERSION_1 | EVENT_IDX | DEVICE_BIT
    assert dev.driver_features == EVENT_IDX | DEVICE_BIT | VERSION_1
    wr(t, R.VIRTIO_MMIO_STATUS, status | S.DRIVER_OK)
    assert rd(t, R.VIRTIO_MMIO_STATUS) == status | S.DRIVER_OK
    assert t.active is not None and t.active.features == t.negotiated
    assert not t.errors


def test_reset_by_writing_zero(memory):
    t, dev, line = make(memory)
    start(t, memory)
    t.config_change_notification()
    assert line.level
    wr(t, R.VIRTIO_MMIO_STATUS, 0)
    assert rd(t, R.VIRTIO_MMIO_STATUS) == 0
    assert rd(t, R.VIRTIO_MMIO_INTERRUPT_STATUS) == 0 and not line.level
    wr(t, R.VIRTIO_MMIO_QUEUE_SEL, 0)
    assert rd(t, R.VIRTIO_MMIO_QUEUE_READY) == 0
    assert dev.resets == 1 and t.active is None and t.negotiated == 0


@pytest.mark.parametrize(
    ("sequence", "section"),
    [
        ([S.DRIVER], "3.1.1"),
        ([S.ACKNOWLEDGE, S.ACKNOWLEDGE | S.FEATURES_OK], "3.1.1"),
        ([S.ACKNOWLEDGE, S.ACKNOWLEDGE | S.DRIVER, 0x7 & ~0x4 | S.DRIVER_OK], "3.1.1"),
        ([S.ACKNOWLEDGE, S.ACKNOWLEDGE | S.DRIVER, S.ACKNOWLEDGE], "2.1.1"),
        ([S.ACKNOWLEDGE | 0x10], "2.1.1"),
    ],
    ids=["driver-before-ack", "features-ok-before-driver", "driver-ok-early", "clear", "reserved"],
)
def test_status_order_violations(memory, sequence, section):
    t, _dev, _ = make(memory)
    for value in sequence:
        wr(t, R.VIRTIO_MMIO_STATUS, int(value))
    err = t.errors[-1]
    assert isinstance(err, DeviceStatusError)
    assert err.spec_section.number == section
    assert rd(t, R.VIRTIO_MMIO_STATUS) & S.DEVICE_NEEDS_RESET


def test_unoffered_feature_leaves_features_ok_clear(memory):
    t, _dev, _ = make(memory)
    status = negotiate(t, VERSION_1 | 1 << 7)
    assert status == S.ACKNOWLEDGE | S.DRIVER  # FEATURES_OK not accepted (§3.1.1 step 6)
    err = t.errors[-1]
    assert isinstance(err, FeatureNegotiationError) and err.spec_section.number == "2.2.1"
    # the driver may retry with an acceptable set after a reset
    wr(t, R.VIRTIO_MMIO_STATUS, 0)
    assert negotiate(t) & S.FEATURES_OK


def test_version_1_required(memory):
    t, _, _ = make(memory)
    assert not negotiate(t, EVENT_IDX) & S.FEATURES_OK
    assert isinstance(t.errors[-1], FeatureNegotiationError)
    assert t.errors[-1].spec_section.number == "6.1"


def test_driver_features_after_features_ok(memory):
    t, _, _ = make(memory)
    negotiate(t)
    wr(t, R.VIRTIO_MMIO_DRIVER_FEATURES, 0)
    assert isinstance(t.errors[-1], FeatureNegotiationError)
    assert t.errors[-1].spec_section.number == "3.1.1"


# -- queues ----------------------------------------------------------------------------------------
def test_queue_setup_errors(memory):
    t, _, _ = make(memory)
    negotiate(t)
    wr(t, R.VIRTIO_MMIO_QUEUE_SEL, 0)
    wr(t, R.VIRTIO_MMIO_QUEUE_NUM, 32)  # > QueueNumMax (16)
    assert (
        isinstance(t.errors[-1], QueueSetupError) and t.errors[-1].spec_section.number == "4.2.2.2"
    )


def test_queue_ready_before_features_ok(memory):
    t, _, _ = make(memory)
    wr(t, R.VIRTIO_MMIO_STATUS, S.ACKNOWLEDGE)
    wr(t, R.VIRTIO_MMIO_STATUS, S.ACKNOWLEDGE | S.DRIVER)
    wr(t, R.VIRTIO_MMIO_QUEUE_READY, 1)
    assert isinstance(t.errors[-1], QueueSetupError) and t.errors[-1].spec_section.number == "3.1.1"


def test_queue_registers_locked_while_ready(memory):
    t, _, line = make(memory)
    start(t, memory)
    wr(t, R.VIRTIO_MMIO_QUEUE_DESC_LOW, 0x20000)
    err = t.errors[-1]
    assert isinstance(err, QueueSetupError) and err.section == sections.S_4_2_2_2.citation
    assert err.section.startswith("4.2.2.2 [drivernormative:")
    # DRIVER_OK is set: NEEDS_RESET comes with a configuration change notification
    assert rd(t, R.VIRTIO_MMIO_STATUS) & S.DEVICE_NEEDS_RESET
    assert rd(t, R.VIRTIO_MMIO_INTERRUPT_STATUS) & INT_CONFIG and line.level


@pytest.mark.parametrize(
    ("field", "value", "section"),
    [
        (R.VIRTIO_MMIO_QUEUE_DESC_LOW, 0x10008, "2.7.1"),
        (R.VIRTIO_MMIO_QUEUE_DEVICE_LOW, 0x10002, "2.7.1"),
        (R.VIRTIO_MMIO_QUEUE_DRIVER_HIGH, 0x1, "2.6"),
    ],
    ids=["desc-misaligned", "used-misaligned", "outside-memory"],
)
def test_bad_ring_addresses(memory, field, value, section):
    t, _, _ = make(memory)
    negotiate(t)
    wr(t, R.VIRTIO_MMIO_QUEUE_SEL, 0)
    wr(t, R.VIRTIO_MMIO_QUEUE_NUM, 8)
    wr(t, R.VIRTIO_MMIO_QUEUE_DESC_LOW, 0x10000)
    wr(t, R.VIRTIO_MMIO_QUEUE_DRIVER_LOW, 0x11000)
    wr(t, R.VIRTIO_MMIO_QUEUE_DEVICE_LOW, 0x12000)
    wr(t, field, value)
    wr(t, R.VIRTIO_MMIO_QUEUE_READY, 1)
    err = t.errors[-1]
    assert isinstance(err, QueueConfigError)
    assert err.section.startswith(section)
    assert rd(t, R.VIRTIO_MMIO_QUEUE_READY) == 0
    assert rd(t, R.VIRTIO_MMIO_STATUS) & S.DEVICE_NEEDS_RESET


def test_split_queue_size_power_of_two(memory):
    t, _, _ = make(memory)
    negotiate(t)
    wr(t, R.VIRTIO_MMIO_QUEUE_SEL, 0)
    wr(t, R.VIRTIO_MMIO_QUEUE_NUM, 6)
    wr(t, R.VIRTIO_MMIO_QUEUE_READY, 1)
    assert isinstance(t.errors[-1], QueueConfigError)


def test_queue_reset(memory):
    t, _, _ = make(memory)
    negotiate(t, VERSION_1 | RING_RESET)
    setup_queue(t, memory, event_idx=False)
    wr(t, R.VIRTIO_MMIO_QUEUE_RESET, 1)
    assert rd(t, R.VIRTIO_MMIO_QUEUE_RESET) == 1
    assert rd(t, R.VIRTIO_MMIO_QUEUE_READY) == 0
    setup_queue(t, memory, event_idx=False)
    assert rd(t, R.VIRTIO_MMIO_QUEUE_RESET) == 0
    assert not t.errors


def test_queue_reset_while_live_and_re_enable(memory, runner):
    t, _, _ = make(memory, runner)
    negotiate(t, VERSION_1 | RING_RESET)
    setup_queue(t, memory, event_idx=False, size=16)
    wr(t, R.VIRTIO_MMIO_STATUS, S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK)
    wr(t, R.VIRTIO_MMIO_QUEUE_RESET, 1)
    assert t.active is not None and 0 not in t.active.queues
    dq = setup_queue(t, memory, event_idx=False, size=16, base=0x40000)
    assert t.active.queues[0] is t.queues[0].vq
    dq.add([b"again"], [8])
    dq.publish()
    wr(t, R.VIRTIO_MMIO_QUEUE_NOTIFY, 0)
    assert dq.get_used()[0].data[:5] == b"AGAIN"
    assert not t.errors


def test_new_queue_after_driver_ok(memory):
    t, _, _ = make(memory)
    start(t, memory)
    setup_queue(t, memory, index=1, base=0x40000)
    err = t.errors[-1]
    assert isinstance(err, QueueSetupError) and err.spec_section.number == "2.6.1"


def test_queue_reset_without_feature(memory):
    t, _, _ = make(memory)
    negotiate(t)
    wr(t, R.VIRTIO_MMIO_QUEUE_RESET, 1)
    assert isinstance(t.errors[-1], QueueSetupError)


# -- notifications and the synchronous service loop ------------------------------------------
def test_notify_before_driver_ok(memory):
    t, _, _ = make(memory)
    negotiate(t)
    wr(t, R.VIRTIO_MMIO_QUEUE_NOTIFY, 0)
    assert (
        isinstance(t.errors[-1], NotificationError) and t.errors[-1].spec_section.number == "3.1.1"
    )


def test_notify_unknown_queue(memory, runner):
    t, _, _ = make(memory, runner)
    start(t, memory)
    wr(t, R.VIRTIO_MMIO_QUEUE_NOTIFY, 1)  # queue 1 exists but is not ready
    assert isinstance(t.errors[-1], NotificationError)


@pytest.mark.parametrize("event_idx", [False, True])
def test_sync_notify_processes_before_returning(memory, runner, event_idx):
    t, _dev, line = make(memory, runner)
    negotiate(t, VERSION_1 | (EVENT_IDX if event_idx else 0))
    dq = setup_queue(t, memory, event_idx=event_idx, size=16)
    wr(t, R.VIRTIO_MMIO_STATUS, S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK)
    for i in range(5):
        dq.add([f"hello {i}".encode()], [16])
    assert dq.publish()
    wr(t, R.VIRTIO_MMIO_QUEUE_NOTIFY, 0)
    used = dq.get_used()  # complete when the notify write returned
    assert [u.data[: u.written] for u in used] == [f"HELLO {i}".encode() for i in range(5)]
    assert rd(t, R.VIRTIO_MMIO_INTERRUPT_STATUS) == INT_VRING and line.level
    wr(t, R.VIRTIO_MMIO_INTERRUPT_ACK, INT_VRING)
    assert rd(t, R.VIRTIO_MMIO_INTERRUPT_STATUS) == 0 and not line.level
    assert runner.calls == 1 and not t.errors
    # After the batch the device asks for the next notification again.
    dq.add([b"x"], [4])
    assert dq.publish()


def test_used_interrupt_suppressed_by_driver(memory, runner):
    t, _, line = make(memory, runner)
    dq = start(t, memory, event_idx=True)
    dq.set_interrupts(False)
    dq.add([b"a"], [4])
    dq.publish()
    wr(t, R.VIRTIO_MMIO_QUEUE_NOTIFY, 0)
    assert len(dq.get_used()) == 1
    assert rd(t, R.VIRTIO_MMIO_INTERRUPT_STATUS) == 0 and not line.level


def test_malformed_chain_sets_needs_reset(memory, runner):
    t, _, line = make(memory, runner)
    dq = start(t, memory, event_idx=False)
    dq.write_desc(0, 0x30000, 4, 1, 99)  # NEXT to descriptor 99 of 8
    dq.write_avail(0, 0)
    dq.set_avail_idx(1)
    wr(t, R.VIRTIO_MMIO_QUEUE_NOTIFY, 0)
    assert "2.7.5" in t.errors[-1].section
    assert rd(t, R.VIRTIO_MMIO_STATUS) & S.DEVICE_NEEDS_RESET
    assert rd(t, R.VIRTIO_MMIO_INTERRUPT_STATUS) & INT_CONFIG and line.level
    wr(t, R.VIRTIO_MMIO_QUEUE_NOTIFY, 0)  # ignored until reset
    wr(t, R.VIRTIO_MMIO_STATUS, 0)
    assert rd(t, R.VIRTIO_MMIO_STATUS) == 0


def test_config_generation_and_change_interrupt(memory):
    t, _, line = make(memory)
    start(t, memory)
    t.config_changed()
    assert rd(t, R.VIRTIO_MMIO_CONFIG_GENERATION) == 1
    assert rd(t, R.VIRTIO_MMIO_INTERRUPT_STATUS) == INT_CONFIG and line.level


async def test_async_mode_runs_device(memory):
    dev = DummyDevice()
    async with trio.open_nursery() as nursery:
        t = MmioTransport(dev, memory, None, on_driver_ok=lambda a: nursery.start_soon(dev.run, a))
        dq = start(t, memory)
        dq.add([b"abc"], [8])
        dq.publish()
        wr(t, R.VIRTIO_MMIO_QUEUE_NOTIFY, 0)
        with trio.fail_after(5):
            while not (used := dq.get_used()):
                await trio.sleep(0.001)
        assert used[0].data[:3] == b"ABC"
        assert rd(t, R.VIRTIO_MMIO_INTERRUPT_STATUS) & INT_VRING
        nursery.cancel_scope.cancel()


# -- fuzzing: arbitrary register traffic never raises out of the transport ---------------------
_OFFSETS = st.one_of(
    st.sampled_from([int(r) for r in MmioReg]),
    st.integers(0, 0x1FF),
)
_ACCESS = st.tuples(
    st.booleans(),  # write?
    _OFFSETS,
    st.sampled_from([1, 2, 4, 4, 4, 8]),
    st.one_of(st.integers(0, 0xFFFFFFFF), st.sampled_from([0, 1, 2, 3, 7, 0xB, 0xF, 16])),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(accesses=st.lists(_ACCESS, max_size=60))
def test_fuzz_register_traffic_never_raises(accesses):
    buf = bytearray(MEM_SIZE)
    mem = GuestMemory([MemoryRegion(0, MEM_SIZE, memoryview(buf), _owner=buf)])
    with TrioRunner() as runner:
        t, _, line = make(mem, runner)
        negotiate(t)  # often a live-ish device, so queue/notify paths get exercised
        for write, offset, size, value in accesses:
            if write:
                t.write(offset, size, value & ((1 << (8 * size)) - 1))
            else:
                assert 0 <= t.read(offset, size) < 1 << (8 * size)
        for err in t.errors:
            assert isinstance(err, DriverError) and err.section
        assert line.level == (t.interrupt_status != 0)
        status = rd(t, R.VIRTIO_MMIO_STATUS)
        wr(t, R.VIRTIO_MMIO_STATUS, 0)
        assert rd(t, R.VIRTIO_MMIO_STATUS) == 0, status  # a reset always recovers


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    descs=st.lists(
        st.tuples(st.integers(0, MEM_SIZE + 64), st.integers(0, 300), st.integers(0, 7),
                  st.integers(0, 20)),
        min_size=16, max_size=16,
    ),
    heads=st.lists(st.integers(0, 20), min_size=1, max_size=8),
    avail_idx=st.one_of(st.integers(0, 8), st.integers(0, 0xFFFF)),
    event_idx=st.booleans(),
)  # fmt: skip
def test_fuzz_rings_behind_notify(descs, heads, avail_idx, event_idx):
    buf = bytearray(MEM_SIZE)
    mem = GuestMemory([MemoryRegion(0, MEM_SIZE, memoryview(buf), _owner=buf)])
    with TrioRunner() as runner:
        t, _, line = make(mem, runner)
        negotiate(t, VERSION_1 | (EVENT_IDX if event_idx else 0))
        dq = setup_queue(t, mem, size=16, event_idx=event_idx)
        wr(t, R.VIRTIO_MMIO_STATUS, S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK)
        for i, (addr, length, flags, nxt) in enumerate(descs):
            dq.write_desc(i, addr, length, flags, nxt)
        for slot, head in enumerate(heads):
            dq.write_avail(slot, head)
        dq.set_avail_idx(avail_idx)
        wr(t, R.VIRTIO_MMIO_QUEUE_NOTIFY, 0)
        wr(t, R.VIRTIO_MMIO_QUEUE_NOTIFY, 0)
        for err in t.errors:
            assert isinstance(err, DriverError) and err.section
        if t.errors:
            assert rd(t, R.VIRTIO_MMIO_STATUS) & S.DEVICE_NEEDS_RESET
            assert rd(t, R.VIRTIO_MMIO_INTERRUPT_STATUS) & INT_CONFIG and line.level
