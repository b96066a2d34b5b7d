"""Guests on both CPU backends: raw code, the IDE guest driver, exit-count equality."""

from __future__ import annotations

import os
import struct
import threading
import time

import pytest
from emu_asm import (
    HLT,
    JMP_SELF,
    UD2,
    inb,
    loop_forever,
    mmio_read32,
    mmio_write32,
    outb,
    outl,
    outw,
    rep_insw,
    rep_outsw,
    store_al,
)

from emulator import memory
from emulator.bus import Device
from emulator.cpu import ExitLimit, GuestFault
from emulator.devices import ata
from emulator.devices.ide import BmdmaError, IdeController, MemoryBackend
from emulator.machine import GuestHalted, Machine
from emulator.run import PATHS, WorkloadFailed, run_workload

MMIO_BASE = 0xD000_0000


class Counter(Device):
    name = "ctr"
    read_registers = {0: "value", 4: "other"}
    write_registers = {0: "value_w", 4: "other_w"}

    def __init__(self) -> None:
        self.n = 0
        self.writes: list[tuple[int, int, int]] = []

    def read(self, offset: int, size: int) -> int:
        self.n += 1
        return self.n

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes.append((offset, size, value))


def run_raw(cpu: str, code: bytes, setup=None, max_exits: int = 100_000, ram=8 << 20):
    m = Machine(ram_size=ram, cpu=cpu)
    m.idle_hlt_stops = True
    if setup is not None:
        setup(m)
    m.memory.write(memory.LOAD_ADDR, code)
    m.start(memory.LOAD_ADDR)
    try:
        m.run(max_exits=max_exits, timeout=30)
    except BaseException:
        m.close()
        raise
    return m


def test_ram_is_a_shareable_memfd(need_soft):
    with Machine(ram_size=4 << 20, cpu="soft") as m:
        assert m.ram_size == 4 << 20 and len(m.ram) == m.ram_size
        m.ram[0x200000:0x200004] = b"abcd"
        assert os.pread(m.ram_fd, 4, 0x200000) == b"abcd"
        os.pwrite(m.ram_fd, b"wxyz", 0x200010)
        assert bytes(m.ram[0x200010:0x200014]) == b"wxyz"
        # page tables identity-map the first GiB with 2 MiB pages
        pd0 = struct.unpack_from("<Q", m.ram, memory.PD_ADDR + 8)[0]
        assert pd0 & ~0xFFF == 0x200000 and pd0 & memory.PTE_PS


def test_pio_and_debug_output(cpu):
    code = b"".join(outb(0xE9, c) for c in b"hi") + outb(0x500, ord("!")) + HLT
    with run_raw(cpu, code) as m:
        assert m.cpu_name == cpu
        assert m.debug.text == "hi!"
        assert m.bus.stats.by_reason == {"PIO": 3, "HLT": 1}
        assert m.bus.stats.by_register == {"debug.char": 3, "cpu.hlt": 1}


def test_mmio_read_write(cpu):
    dev = Counter()

    def setup(m):
        m.bus.add_mmio(MMIO_BASE, 0x1000, dev)

    code = mmio_read32(MMIO_BASE) + mmio_read32(MMIO_BASE + 4)
    code += mmio_write32(MMIO_BASE + 4, 0xCAFEBABE) + b"\x89\xc1"  # mov ecx, eax
    code += outb(0xE9, ord("x")) + HLT
    with run_raw(cpu, code, setup) as m:
        assert dev.writes == [(4, 4, 0xCAFEBABE)]
        assert m.bus.stats.by_reason["MMIO"] == 3
        assert m.bus.stats.by_register["ctr.value"] == 1
        assert m.bus.stats.by_register["ctr.other_w"] == 1
        assert m.cpu.regs()["rcx"] == 2


STRING_CASES = [
    (0x200000, 256),  # one page-aligned sector: one exit
    (0x200FF0, 256),  # 16 bytes to the page end, then the rest
    (0x200FF1, 100),
    (0x200000, 2048),  # 4 KiB: read-ahead cache of 1 KiB -> 4 exits
]


@pytest.mark.parametrize(("dest", "count"), STRING_CASES)
def test_rep_insw_batching(cpu, dest, count):
    dev = Counter()
    code = rep_insw(0x1234, dest, count) + HLT
    with run_raw(cpu, code, lambda m: m.bus.add_pio(0x1234, 2, dev)) as m:
        assert dev.n == count
        words = struct.unpack_from(f"<{count}H", m.ram, dest)
        assert list(words) == [(i + 1) & 0xFFFF for i in range(count)]
        in_page = 4096 - (dest & 0xFFF)
        exits = 0
        left = count
        addr = dest
        while left:  # the rule from KVM's pio_in_emulated()
            n = max(1, min(4096 - (addr & 0xFFF), 512, left))
            exits += 1
            left -= n
            addr += 2 * n
        assert in_page > 0
        assert m.bus.stats.by_reason["PIO"] == exits


def test_rep_outsw_one_exit_per_word(cpu):
    dev = Counter()
    code = rep_outsw(0x1234, 0x200000, 300) + HLT
    with run_raw(cpu, code, lambda m: m.bus.add_pio(0x1234, 2, dev)) as m:
        assert len(dev.writes) == 300
        assert m.bus.stats.by_reason["PIO"] == 300


def test_invalid_instruction_is_a_guest_fault(cpu):
    with pytest.raises(GuestFault):
        run_raw(cpu, outb(0xE9, 1) + UD2)


def test_halt_without_interrupt_or_result(cpu):
    m = Machine(ram_size=4 << 20, cpu=cpu)
    try:
        m.memory.write(memory.LOAD_ADDR, HLT)
        m.start(memory.LOAD_ADDR)
        with pytest.raises(GuestHalted):
            m.run(max_exits=10)
    finally:
        m.close()


def test_exit_limit(cpu):
    with pytest.raises(ExitLimit):
        run_raw(cpu, loop_forever(outb(0xE9, ord("."))), max_exits=50)


def test_exit_limit_deadline_without_exits(cpu):
    m = Machine(ram_size=4 << 20, cpu=cpu)
    try:
        m.memory.write(memory.LOAD_ADDR, JMP_SELF)
        m.start(memory.LOAD_ADDR)
        with pytest.raises(ExitLimit):
            m.run(timeout=0.2)
    finally:
        m.close()


RESULT_OK = outl(0x504, 0) + outb(0x508, 3)  # debug port: ARG = 0, CMD = RESULT


def test_ioeventfd_takes_writes_without_exits(cpu):
    dev = Counter()
    pio_fd = os.eventfd(0, os.EFD_NONBLOCK)
    mmio_fd = os.eventfd(0, os.EFD_NONBLOCK)

    def setup(m):
        m.bus.add_pio(0x600, 4, dev)
        m.bus.add_mmio(MMIO_BASE, 0x1000, dev)
        m.ioeventfd(0x600, 2, pio_fd, pio=True)
        m.ioeventfd(MMIO_BASE + 0x50, 4, mmio_fd, datamatch=0)

    code = outw(0x600, 7) + outb(0x600, 1)  # size 1 does not match the 2-byte ioeventfd
    code += mmio_write32(MMIO_BASE + 0x50, 0) + mmio_write32(MMIO_BASE + 0x50, 1) + HLT
    try:
        with run_raw(cpu, code, setup) as m:
            assert os.eventfd_read(pio_fd) == 1
            assert os.eventfd_read(mmio_fd) == 1
            assert dev.writes == [(0, 1, 1), (0x50, 4, 1)]
            assert m.bus.stats.by_reason == {"PIO": 1, "MMIO": 1, "HLT": 1}
    finally:
        os.close(pio_fd)
        os.close(mmio_fd)


def test_irqfd_wakes_halted_guest(cpu):
    fd = os.eventfd(0, os.EFD_NONBLOCK)

    def setup(m):
        m.irqfd(fd, 5)

    def kick():
        time.sleep(0.05)
        os.eventfd_write(fd, 1)

    t = threading.Thread(target=kick)
    t.start()
    try:
        code = HLT + outb(0xE9, ord("w")) + RESULT_OK + HLT
        with run_raw(cpu, code, setup) as m:
            assert m.debug.text == "w" and m.debug.result == 0
            assert m.bus.stats.by_reason["HLT"] == 2
    finally:
        t.join()
        os.close(fd)


def idt_gate(handler: int, attr: int = 0x8E) -> bytes:
    return struct.pack(
        "<HHBBHII", handler & 0xFFFF, memory.CODE_SELECTOR, 0, attr, handler >> 16 & 0xFFFF,
        handler >> 32, 0,
    )  # fmt: skip


LIDT = b"\x0f\x01\x1c\x25"  # lidt [disp32]
STI, CLI, IRETQ = b"\xfb", b"\xfa", b"\x48\xcf"


def idt_guest(m: Machine, vector: int, attr: int = 0x8E) -> bytes:
    """Guest: lidt; sti; hlt; (handler prints I, acks line 3 via port 0x700) print A."""
    handler = memory.LOAD_ADDR + 0x800
    idt = 0x20000
    m.ram[idt + 16 * vector : idt + 16 * vector + 16] = idt_gate(handler, attr)
    m.ram[0x6000:0x600A] = struct.pack("<HQ", 0xFFF, idt)
    m.memory.write(handler, outb(0xE9, ord("I")) + outb(0x700, 0) + IRETQ)
    return LIDT + struct.pack("<I", 0x6000) + STI + HLT + CLI + outb(0xE9, ord("A"))


class LineDevice(Device):
    """Writing 1 raises its line, 0 lowers it."""

    name = "line"

    def __init__(self, set_level) -> None:
        self.set_level = set_level

    def write(self, offset: int, size: int, value: int) -> None:
        self.set_level(bool(value))


def test_interrupt_delivered_through_idt(cpu):
    def setup(m):
        m.bus.add_pio(0x700, 1, LineDevice(m.irq_line(3)))
        code = outb(0x700, 1) + idt_guest(m, 0x23) + RESULT_OK + HLT
        m.memory.write(memory.LOAD_ADDR + 0x100, code)

    code = b"\xe9" + struct.pack("<i", 0x100 - 5)  # jmp to the code placed by setup
    with run_raw(cpu, code, setup) as m:
        assert m.debug.text == "IA"
        assert m.interrupts_delivered == 1
        assert m.bus.stats.by_reason["HLT"] == 2


def test_interrupt_through_missing_gate_is_a_fault(cpu):
    def setup(m):
        m.bus.add_pio(0x700, 1, LineDevice(m.irq_line(3)))
        code = outb(0x700, 1) + idt_guest(m, 0x23, attr=0x0E) + RESULT_OK + HLT
        m.memory.write(memory.LOAD_ADDR + 0x100, code)

    code = b"\xe9" + struct.pack("<i", 0x100 - 5)
    with pytest.raises(GuestFault):
        run_raw(cpu, code, setup)


def test_hlt_wakes_on_device_interrupt(cpu):
    """IDE raises INTRQ on command completion; the halted guest resumes and acks."""

    def setup(m):
        ide = IdeController(MemoryBackend(64 * 512), memory=m.memory, irq=m.irq_line(14))
        ide.attach(m.bus)
        m.devices["ide"] = ide

    code = outb(ata.PRIMARY_CTRL_BASE, 0)  # nIEN = 0
    code += outb(ata.PRIMARY_CMD_BASE + ata.REG_COMMAND, ata.CMD_FLUSH_CACHE)
    code += HLT + inb(ata.PRIMARY_CMD_BASE + ata.REG_STATUS) + store_al(0x5000) + HLT
    with run_raw(cpu, code, setup) as m:
        assert m.bus.stats.by_reason["HLT"] == 2
        assert m.ram[0x5000] == ata.STATUS_DRDY
        assert not m.irq_pending
        assert m.devices["ide"].backend.flushes == 1


def test_malformed_guest_dma_outside_ram(cpu):
    """A guest pointing the PRD table past RAM gets ERR, the VMM carries on."""

    def setup(m):
        ide = IdeController(MemoryBackend(64 * 512), memory=m.memory, irq=m.irq_line(14))
        ide.attach(m.bus)
        m.devices["ide"] = ide
        # a second, well-formed table whose buffer lies outside RAM
        m.ram[0x6000:0x6008] = struct.pack("<IHH", 0x7000_0000, 512, ata.PRD_EOT)

    bm = ata.BMDMA_BASE
    cmd = ata.PRIMARY_CMD_BASE
    code = b""
    for prdt, out in ((0xFFFF_0000, 0x5000), (0x6000, 0x5001)):
        code += outl(bm + ata.BM_REG_PRDT, prdt) + outb(bm + ata.BM_REG_COMMAND, ata.BM_CMD_READ)
        code += outb(cmd + ata.REG_NSECT, 1) + outb(cmd + ata.REG_LBAL, 0)
        code += outb(cmd + ata.REG_DEVICE, ata.DEVICE_OBS | ata.DEVICE_LBA)
        code += outb(cmd + ata.REG_COMMAND, ata.CMD_READ_DMA)
        code += outb(bm + ata.BM_REG_COMMAND, ata.BM_CMD_READ | ata.BM_CMD_START)
        code += inb(bm + ata.BM_REG_STATUS) + store_al(out)
        code += outb(bm + ata.BM_REG_COMMAND, 0) + inb(cmd + ata.REG_STATUS)
        code += outb(bm + ata.BM_REG_STATUS, ata.BM_STATUS_W1C)
    code += HLT
    with run_raw(cpu, code, setup) as m:
        errors = m.devices["ide"].errors
        assert [type(e) for e in errors] == [BmdmaError, BmdmaError]
        assert "outside guest RAM" in str(errors[0]) and "outside guest RAM" in str(errors[1])
        for addr in (0x5000, 0x5001):
            assert m.ram[addr] & ata.BM_STATUS_ERROR


# --- the IDE guest driver -----------------------------------------------------------------
IRQ_CASES = [(False, "idt"), (True, "hlt"), (True, "idt")]


@pytest.mark.parametrize("path", ["ide-pio", "ide-pio-multi", "ide-dma"])
@pytest.mark.parametrize(("irq", "irq_mode"), IRQ_CASES)
def test_ide_workload(need_gcc, cpu, path, irq, irq_mode):
    res = run_workload(path, cpu, kib=16, irq=irq, irq_mode=irq_mode)
    assert res["verified"] is True
    assert res["cpu"] == cpu and res["path"] == path and res["queue_depth"] == 1
    assert res["ios"] == 8  # 4 writes + 4 reads of 4 KiB
    assert res["exits_per_io"] > 0 and res["us_per_io"] > 0 and res["mb_per_s"] > 0
    assert sum(res["exits_by_reason"].values()) == res["exits_total"]
    assert sum(res["exits_by_register"].values()) == res["exits_total"]
    assert ("HLT" in res["exits_by_reason"]) == irq
    # IDENTIFY, (SET MULTIPLE), one per DRQ block or DMA command, FLUSH
    assert (res["interrupts"] > res["ios"]) == (irq and irq_mode == "idt")
    if path == "ide-dma":
        assert res["exits_per_io"] < 25
        assert "ide.bm_status" in res["exits_by_register"]
    else:
        assert res["exits_per_io"] > 500  # rep outsw: one exit per word


def test_ide_workload_lba48(need_gcc, cpu):
    res = run_workload("ide-dma", cpu, kib=8, lba48=True)
    assert res["verified"]
    assert res["exits_by_register"]["ide.lbal"] == 2 * res["ios"]  # HOB + current


def _counts(res: dict) -> tuple:
    return (res["ios"], res["exits_total"], res["exits_by_reason"], res["exits_by_register"])


@pytest.mark.kvm
@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize(("irq", "irq_mode"), IRQ_CASES)
def test_exit_counts_equal_between_backends(need_gcc, need_kvm, need_soft, path, irq, irq_mode):
    soft = run_workload(path, "soft", kib=8, irq=irq, irq_mode=irq_mode)
    kvm = run_workload(path, "kvm", kib=8, irq=irq, irq_mode=irq_mode)
    assert _counts(soft) == _counts(kvm)
    assert soft["interrupts"] == kvm["interrupts"]
    # and deterministic run to run
    again = run_workload(path, "soft", kib=8, irq=irq, irq_mode=irq_mode)
    assert _counts(again) == _counts(soft)


def test_exit_counts_per_request_are_exact(need_gcc, need_soft):
    """The per-I/O cost is what the driver code says (polled, 28-bit LBA, 4 KiB)."""
    r = run_workload("ide-dma", "soft", kib=4)
    # per I/O: prdt, bm cmd, bm status clear, 5 taskfile, command, start, poll,
    # stop, ATA status, bm status clear = 14; plus FLUSH CACHE (nsect, device,
    # command, status = 4) once for the write pass; 2 I/Os
    assert r["exits_total"] == 2 * 14 + 4
    assert {k: v["exits"] for k, v in r["phases"].items()} == {"write": 14, "flush": 4, "read": 14}
    p = run_workload("ide-pio", "soft", kib=8)
    write = 6 + 1 + 8 * (256 + 1)  # taskfile+cmd, DRQ wait, per sector: data + status
    read = 6 + 8 * (1 + 1) + 1  # taskfile+cmd, per sector: status + rep insw, final status
    assert p["phases"]["write"]["exits_per_io"] == write
    assert p["phases"]["read"]["exits_per_io"] == read
    assert p["exits_total"] == 2 * (write + read) + 4
    m = run_workload("ide-pio-multi", "soft", kib=4)
    # one DRQ block of 8 sectors: rep outsw 2048 exits; rep insw of 4 KiB = 4 exits
    assert m["phases"]["write"]["exits"] == 6 + 1 + 2048 + 1
    assert m["phases"]["read"]["exits"] == 6 + 1 + 4 + 1


def test_run_workload_argument_checks():
    with pytest.raises(ValueError, match="unknown path"):
        run_workload("virtio-nope", "soft", 1)
    with pytest.raises(ValueError, match="queue_depth"):
        run_workload("ide-dma", "soft", 1, queue_depth=4)
    with pytest.raises(ValueError, match="multiple of 4 KiB"):
        run_workload("ide-dma", "soft", kib=3)
    with pytest.raises(ValueError, match="cpu must be"):
        Machine(cpu="qemu")


def test_guest_reports_failure(need_gcc, need_soft, monkeypatch):
    """A disk too small for the request makes the guest report E_CAPACITY."""
    from emulator import run

    real = run._ide_setup

    def tiny(mode, multiple=0):
        setup = real(mode, multiple)

        def wrapped(m, spec):
            verify = setup(m, spec)
            m.devices["ide"].backend = MemoryBackend(4 * 512)
            return verify

        return wrapped

    monkeypatch.setitem(run.PATHS, "ide-dma", run.WorkloadPath("ide", tiny(run.MODE_DMA)))
    with pytest.raises(WorkloadFailed, match="guest result 3"):
        run_workload("ide-dma", "soft", kib=8)


@pytest.mark.kvm
def test_kvm_vm_irq_and_eventfd_ioctls(need_kvm):
    from emulator.vm import Vm

    with Vm() as vm:
        vm.create_irqchip()
        efd = os.eventfd(0)
        try:
            vm.irqfd(efd, 14)
            vm.set_irq_line(14, True)
            vm.set_irq_line(14, False)
            vm.irqfd(efd, 14, deassign=True)
            vm.ioeventfd(0xD000_0050, 4, efd, datamatch=0)
            vm.ioeventfd(0xD000_0050, 4, efd, datamatch=0, deassign=True)
            vm.ioeventfd(0x600, 2, efd, pio=True)
        finally:
            os.close(efd)


def test_measurement_marks_are_discounted(cpu):
    code = outb(0xE9, 1) + outb(0x508, 1)  # BEGIN
    code += outb(0xE9, 2) + outb(0x508, 0x10)  # phase 2
    code += outb(0xE9, 3) + outb(0xE9, 4) + outb(0x508, 2) + outb(0xE9, 5) + HLT  # END
    with run_raw(cpu, code) as m:
        assert m.window.total == 3 and m.window.by_register == {"debug.char": 3}
        assert [(mark, st.total) for mark, st, _ in m.phases] == [(1, 1), (0x10, 2)]
        assert all(sec >= 0 for _, _, sec in m.phases)
        assert m.bus.stats.total == 9


def test_unmapped_mmio_reads_all_ones(cpu):
    dev = Counter()

    def setup(m):
        m.bus.add_mmio(MMIO_BASE, 0x1000, dev)

    # read a hole, write a hole, then a real device on the page after
    code = mmio_read32(0xE000_0000) + b"\x89\xc6"  # mov esi, eax
    code += mmio_write32(0xE000_1000, 5) + mmio_read32(MMIO_BASE) + HLT
    with run_raw(cpu, code, setup) as m:
        assert m.cpu.regs()["rsi"] == 0xFFFF_FFFF
        assert m.bus.stats.by_device == {"unmapped": 2, "ctr": 1, "cpu": 1}
        assert m.bus.stats.by_reason["MMIO"] == 3


def test_access_beyond_identity_map_faults(cpu):
    with pytest.raises(GuestFault):
        run_raw(cpu, mmio_read32(0x1_0000_0000) + HLT)


def test_image_file_backend(need_gcc, need_soft, tmp_path):
    img = tmp_path / "disk.img"
    res = run_workload("ide-dma", "soft", kib=8, image=str(img))
    assert res["verified"]
    assert img.stat().st_size == 8192 + (1 << 20)
    from emulator.run import expected_sector

    assert img.read_bytes()[512:1024] == expected_sector(1, 0x1234_5678)


def test_auto_picks_a_backend(need_soft):
    from emulator.cpu import kvm_usable

    with Machine(ram_size=4 << 20, cpu="auto") as m:
        m.idle_hlt_stops = True
        m.memory.write(memory.LOAD_ADDR, HLT)
        m.start(memory.LOAD_ADDR)
        m.run(max_exits=5)
        assert m.cpu_name == ("kvm" if kvm_usable()[0] else "soft")


def test_lazy_package_exports():
    import emulator

    assert emulator.Machine is Machine and emulator.run_workload is run_workload
    with pytest.raises(AttributeError):
        _ = emulator.nope


@pytest.mark.kvm
def test_kvm_deadline_timer_restores_sigalrm(need_kvm):
    import signal

    fired = []
    old = signal.signal(signal.SIGALRM, lambda *a: fired.append(1))
    signal.setitimer(signal.ITIMER_REAL, 30.0)
    try:
        with run_raw("kvm", outb(0xE9, ord("k")) + HLT) as m:
            assert m.debug.text == "k"
        assert signal.getsignal(signal.SIGALRM) is not signal.SIG_IGN
        delay, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 25.0 < delay <= 30.0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert fired == []


def test_open_kvm_reports_why(tmp_path):
    from emulator.kvm import KvmUnavailable, open_kvm

    with pytest.raises(KvmUnavailable, match="does not exist"):
        open_kvm(str(tmp_path / "no-kvm"))


@pytest.mark.kvm
def test_kvm_vcpu_state_is_long_mode(need_kvm):
    from emulator.cpu import KvmCpu

    with Machine(ram_size=4 << 20, cpu="kvm") as m:
        m.idle_hlt_stops = True
        m.memory.write(memory.LOAD_ADDR, b"\x48\xc7\xc0\x2a\x00\x00\x00" + HLT)  # mov rax, 42
        m.start(memory.LOAD_ADDR)
        m.run(max_exits=5)
        assert isinstance(m.cpu, KvmCpu)
        regs = m.cpu.vcpu.get_regs()
        assert regs["rax"] == 42 and regs["rip"] == memory.LOAD_ADDR + 8
        assert regs["rsp"] == memory.STACK_TOP - 8
        s = m.cpu.vcpu.get_sregs()
        assert s["efer"] & memory.EFER_LMA and s["cr0"] & memory.CR0_PG
        assert s["cs"]["l"] == 1 and s["cs"]["selector"] == memory.CODE_SELECTOR
        assert s["cr3"] == memory.PML4_ADDR
        regs["rbx"] = 0x1234
        m.cpu.vcpu.set_regs(regs)
        assert m.cpu.vcpu.get_regs()["rbx"] == 0x1234
