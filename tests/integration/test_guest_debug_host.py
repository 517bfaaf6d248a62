"""KVM's guest-debug interface on this host's real /dev/kvm, as the gdb stub
uses it: single-step, an int3 of ours, a DR0 breakpoint, and the
breakpoint configuration gdbstub.breakpoints computes."""

from __future__ import annotations

import os

import pytest
from test_kvm_host import CODE, kvm, machine, real_mode_vcpu  # noqa: F401 - fixtures

from pyvmm.debug.gdbstub.breakpoints import HARDWARE, Breakpoints
from pyvmm.kvm import DebugExit, HltExit, uapi

# nop; nop; nop; inc ax; hlt
CODE_BYTES = bytes([0x90, 0x90, 0x90, 0x40, 0xF4])


def flat_breakpoints(memory) -> Breakpoints:
    return Breakpoints(memory.read, memory.write)  # real mode, CS base 0: linear = physical


def test_single_step_exits_after_each_instruction(kvm, machine):  # noqa: F811
    vm, memory = machine
    with real_mode_vcpu(kvm, vm, CODE_BYTES, memory) as vcpu:
        control, debugregs = flat_breakpoints(memory).debug_control(stepping=True, block_irq=False)
        vcpu.set_guest_debug(control, debugregs)
        for expected in (CODE + 1, CODE + 2, CODE + 3):
            exit = vcpu.run()
            assert isinstance(exit, DebugExit) and exit.exception == 1, exit
            assert exit.pc == expected and vcpu.get_regs().rip == expected


def test_software_breakpoint_stops_at_the_int3_and_resumes_after_removal(kvm, machine):  # noqa: F811
    if os.path.exists("/sys/module/kvm_pvm"):
        # kvm_pvm runs real-mode code in KVM's instruction emulator, which
        # fails on an int3 while guest debugging is on; tests/integration/
        # test_gdb.py covers int3 breakpoints in a real guest instead.
        pytest.skip("kvm_pvm cannot take an int3 in real mode with guest debugging on")
    vm, memory = machine
    with real_mode_vcpu(kvm, vm, CODE_BYTES, memory) as vcpu:
        breakpoints = flat_breakpoints(memory)
        breakpoints.insert(0, CODE + 3, 1)
        assert memory.read(CODE + 3, 1) == b"\xcc"
        vcpu.set_guest_debug(*breakpoints.debug_control(stepping=False, block_irq=False))
        exit = vcpu.run()
        assert isinstance(exit, DebugExit) and exit.exception == 3 and exit.pc == CODE + 3, exit
        assert vcpu.get_regs().rip == CODE + 3  # KVM leaves rip on the int3
        breakpoints.remove(0, CODE + 3, 1)
        vcpu.set_guest_debug(0)
        assert isinstance(vcpu.run(), HltExit)
        assert vcpu.get_regs().rax & 0xFFFF == 1  # the restored inc ran once


def test_hardware_breakpoint_in_dr0(kvm, machine):  # noqa: F811
    vm, memory = machine
    with real_mode_vcpu(kvm, vm, CODE_BYTES, memory) as vcpu:
        breakpoints = flat_breakpoints(memory)
        breakpoints.insert(HARDWARE, CODE + 2, 1)
        control, debugregs = breakpoints.debug_control(stepping=False, block_irq=False)
        assert control & uapi.KVM_GUESTDBG_USE_HW_BP and debugregs[0] == CODE + 2
        vcpu.set_guest_debug(control, debugregs)
        exit = vcpu.run()
        assert isinstance(exit, DebugExit) and exit.exception == 1 and exit.pc == CODE + 2, exit
        assert exit.dr6 & 1  # B0: DR0 matched
        assert memory.read(CODE, len(CODE_BYTES)) == CODE_BYTES  # nothing written to guest memory
