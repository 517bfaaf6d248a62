"""The KVM layer against this host's real /dev/kvm, with tiny real-mode guests.

Guest code is hand-assembled 16-bit x86 and runs from guest-physical 0x1000
with CS = DS = 0. Each guest executes only a handful of instructions: some
KVMs (nested, software-paged) run guest code very slowly.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from pyvmm.kvm import (
    HltExit,
    InterruptedExit,
    IoExit,
    Kvm,
    KvmUnavailable,
    MmioExit,
    map_guest_memory,
    vcpu_cpuid,
)
from pyvmm.core.memory import GuestMemory

PAGE = 0x1000
CODE = 0x1000
RAM_SIZE = 0x10000  # 64 KiB at 0; everything above is unbacked
TEST_PORT = 0x10


def _open_kvm() -> Kvm:
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm on this host")
    try:
        return Kvm()
    except KvmUnavailable as error:
        pytest.skip(f"KVM unusable here: {error}")


@pytest.fixture
def kvm():
    with _open_kvm() as kvm:
        yield kvm


@pytest.fixture
def machine(kvm):
    """A VM with 64 KiB of RAM and no irqchip, so HLT exits to userspace."""
    memory = GuestMemory([(0, RAM_SIZE)])
    vm = kvm.create_vm()
    vm.set_tss_addr(0xFFFB_D000)  # above 2**31: must not overflow a C int
    vm.set_identity_map_addr(0xFFFB_C000)
    map_guest_memory(vm.memslots, memory)
    yield vm, memory
    vm.close()
    memory.close()


def real_mode_vcpu(kvm, vm, code: bytes, memory: GuestMemory):
    memory.write(CODE, code)
    vcpu = vm.create_vcpu(0)
    vcpu.set_cpuid(vcpu_cpuid(kvm.supported_cpuid(), 0, 1))
    sregs = vcpu.get_sregs()
    for segment in (sregs.cs, sregs.ds, sregs.es, sregs.ss):
        segment.base = 0
        segment.selector = 0
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rip = CODE
    regs.rflags = 0x2
    vcpu.set_regs(regs)
    return vcpu


def test_out_then_hlt(kvm, machine):
    vm, memory = machine
    code = bytes([0xB0, 0x42, 0xE6, TEST_PORT, 0xF4])  # mov al,0x42; out 0x10,al; hlt
    with real_mode_vcpu(kvm, vm, code, memory) as vcpu:
        exit = vcpu.run()
        assert isinstance(exit, IoExit)
        assert (exit.port, exit.size, exit.is_write, exit.count) == (TEST_PORT, 1, True, 1)
        assert bytes(exit.data) == b"\x42"
        assert isinstance(vcpu.run(), HltExit)
        assert vcpu.get_regs().rip == CODE + len(code)


def test_if_flag_is_rflags_if_at_the_last_exit(kvm, machine):
    """Vcpu.if_flag (kvm_run's if_flag, what --trace evtchn records) follows
    the guest's sti and cli."""
    vm, memory = machine
    code = bytes([0xE6, TEST_PORT,  # out 0x10,al   (IF clear)
                  0xFB, 0x90,  # sti; nop       (past sti's shadow)
                  0xE6, TEST_PORT,  # out 0x10,al   (IF set)
                  0xFA,  # cli
                  0xE6, TEST_PORT,  # out 0x10,al   (IF clear)
                  0xF4])  # hlt
    with real_mode_vcpu(kvm, vm, code, memory) as vcpu:
        seen = []
        for _ in range(3):
            assert isinstance(vcpu.run(), IoExit)
            seen.append((vcpu.if_flag, bool(vcpu.get_regs().rflags & 0x200)))
        assert seen == [(False, False), (True, True), (False, False)]


def test_mmio_write_and_read_to_unbacked_address(kvm, machine):
    vm, memory = machine
    code = bytes(
        [0xB8, 0x00, 0x20,  # mov ax,0x2000
         0x8E, 0xD8,  # mov ds,ax
         0xC6, 0x06, 0x10, 0x00, 0x5A,  # mov byte [0x10],0x5a   -> 0x20010
         0xA0, 0x20, 0x00,  # mov al,[0x20]                -> 0x20020
         0xE6, TEST_PORT,  # out 0x10,al
         0xF4]  # hlt
    )
    with real_mode_vcpu(kvm, vm, code, memory) as vcpu:
        write = vcpu.run()
        assert isinstance(write, MmioExit)
        assert (write.address, write.length, write.is_write) == (0x20010, 1, True)
        assert bytes(write.data) == b"\x5a"

        read = vcpu.run()
        assert isinstance(read, MmioExit)
        assert (read.address, read.length, read.is_write) == (0x20020, 1, False)
        read.data[0] = 0x77  # answered in place, in kvm_run

        out = vcpu.run()
        assert isinstance(out, IoExit) and bytes(out.data) == b"\x77"
        assert isinstance(vcpu.run(), HltExit)


def test_unmapping_a_ram_page_turns_it_into_mmio_and_back(kvm, machine):
    vm, memory = machine
    probe = 0x5000
    memory.write_int(probe, 1, 0xAB)
    code = bytes([0xA0, 0x00, 0x50, 0xE6, TEST_PORT, 0xEB, 0xF9])  # 1: mov al,[0x5000]; out; jmp 1b
    with real_mode_vcpu(kvm, vm, code, memory) as vcpu:
        exit = vcpu.run()
        assert isinstance(exit, IoExit) and bytes(exit.data) == b"\xab"

        vm.memslots.unmap(probe, PAGE)
        assert len(vm.memslots.slots) == 2  # split around the page
        exit = vcpu.run()
        assert isinstance(exit, MmioExit)
        assert (exit.address, exit.is_write) == (probe, False)
        exit.data[0] = 0xCD
        exit = vcpu.run()
        assert isinstance(exit, IoExit) and bytes(exit.data) == b"\xcd"

        vm.memslots.map(probe, PAGE, memory.host_address(probe))
        exit = vcpu.run()
        assert isinstance(exit, IoExit) and bytes(exit.data) == b"\xab"


def test_kick_interrupts_a_spinning_guest_from_another_thread(kvm, machine):
    vm, memory = machine
    started = threading.Event()
    results: list = []

    def vcpu_thread():
        vcpu = real_mode_vcpu(kvm, vm, bytes([0xEB, 0xFE]), memory)
        results.append(vcpu)
        started.set()
        results.append(vcpu.run())
        results.append(time.monotonic())

    thread = threading.Thread(target=vcpu_thread, daemon=True)
    thread.start()
    assert started.wait(5)
    vcpu = results[0]
    time.sleep(0.05)  # let it enter KVM_RUN
    kicked_at = time.monotonic()
    vcpu.kick()
    thread.join(2)
    if thread.is_alive():  # keep kicking so the thread ends, then fail
        while thread.is_alive():
            vcpu.kick()
            thread.join(0.1)
        pytest.fail("kick() did not interrupt KVM_RUN")
    assert isinstance(results[1], InterruptedExit)
    assert results[2] - kicked_at < 0.5
    assert not vcpu.immediate_exit, "cleared once the interrupted run returned"
    assert vcpu.get_regs().rip == CODE
    vcpu.close()


def test_kick_before_run_is_not_lost(kvm, machine):
    vm, memory = machine
    with real_mode_vcpu(kvm, vm, bytes([0xEB, 0xFE]), memory) as vcpu:
        vcpu.kick()  # the signal arrives now; immediate_exit stays set
        assert isinstance(vcpu.run(), InterruptedExit)
        assert not vcpu.immediate_exit


def test_host_queries(kvm):
    assert kvm.vcpu_mmap_size() >= 4096
    assert kvm.xen_capabilities() >= 0
    assert any(e.function == 0 for e in kvm.supported_cpuid())
    msrs = kvm.msr_index_list()
    assert 0x10 in msrs  # IA32_TIME_STAMP_COUNTER


def test_irqchip_pit_and_vcpu_state(kvm):
    with kvm.create_vm() as vm:
        vm.set_tss_addr(0xFFFB_D000)
        vm.create_irqchip()
        vm.create_pit2()
        vm.irq_line(4, True)
        vm.irq_line(4, False)
        with vm.create_vcpu(0) as vcpu:
            assert len(vcpu.get_lapic()) == 1024
            vcpu.set_lapic(vcpu.get_lapic())
            vcpu.set_msrs({0x10: 1000})
            assert vcpu.get_msrs([0x10])[0x10] >= 1000
            clock = vm.get_clock()
            assert clock.clock >= 0


def test_settle_completes_a_port_read_without_running_the_guest(kvm, machine):
    """KVM finishes an IN only when KVM_RUN is entered again: the registers
    read right after the exit still point at the IN, without its data.
    Vcpu.settle() completes it (what a snapshot needs) and runs nothing more."""
    vm, memory = machine
    code = bytes([0xE4, TEST_PORT,  # in al,0x10
                  0xA2, 0x00, 0x05,  # mov [0x500],al
                  0xF4])  # hlt
    with real_mode_vcpu(kvm, vm, code, memory) as vcpu:
        exit = vcpu.run()
        assert isinstance(exit, IoExit) and not exit.is_write
        exit.data[0] = 0x42
        assert vcpu.get_regs().rip == CODE  # not complete: a state saved now would lose the read
        assert isinstance(vcpu.settle(), InterruptedExit)
        regs = vcpu.get_regs()
        assert (regs.rip, regs.rax & 0xFF) == (CODE + 2, 0x42)
        assert memory.read_int(0x500, 1) == 0  # the next instruction did not run
        assert not vcpu.immediate_exit
        assert isinstance(vcpu.run(), HltExit)
        assert memory.read_int(0x500, 1) == 0x42

