"""The dead-guest detector: every vCPU halted with interrupts off, twice in a row."""

import pytest

from pyvmm.kvm import uapi
from pyvmm.core.memory import GuestMemory
from pyvmm.vmm.liveness import (LVT_LINT0, LVT_PERFORMANCE_COUNTER, ROUNDS_TO_DECLARE_FOREIGN, DeadGuestDetector,
                                ForeignStateDetector, VcpuSample, describe, lapic_can_raise_nmi, sample_vcpu)

HALTED, RUNNABLE = uapi.KVM_MP_STATE_HALTED, uapi.KVM_MP_STATE_RUNNABLE
WAIT_SIPI = uapi.KVM_MP_STATE_UNINITIALIZED


def dead(rip=0x1000):
    return VcpuSample(HALTED, rip, interrupts_enabled=False)


def idle(rip=0x2000):
    return VcpuSample(HALTED, rip, interrupts_enabled=True)


def test_two_rounds_of_every_vcpu_halted_with_interrupts_off_make_a_dead_guest():
    detector = DeadGuestDetector()
    assert not detector.observe([dead(), dead(0x3000)])
    assert detector.observe([dead(), dead(0x3000)])


@pytest.mark.parametrize("other", [
    idle(),                                                   # halted, but an interrupt wakes it
    VcpuSample(RUNNABLE),                                     # running
    VcpuSample(HALTED, 0x1000, False, nmi_armed=True),        # an NMI watchdog can still wake it
    None,                                                     # busy in the VMM: did not answer
])
def test_one_vcpu_that_can_still_run_keeps_the_guest_alive(other):
    detector = DeadGuestDetector()
    for _ in range(5):
        assert not detector.observe([dead(), other])


def test_a_round_in_between_where_the_guest_ran_starts_the_count_again():
    detector = DeadGuestDetector()
    assert not detector.observe([dead()])
    assert not detector.observe([idle()])
    assert not detector.observe([dead()])
    assert detector.observe([dead()])


def test_a_vcpu_halting_at_another_instruction_is_not_the_same_halt():
    # cli; hlt loops stay on one instruction; a guest passing through
    # different halts with interrupts off is still doing something.
    detector = DeadGuestDetector()
    assert not detector.observe([dead(0x1000)])
    assert not detector.observe([dead(0x1004)])
    assert detector.observe([dead(0x1004)])


def test_application_processors_waiting_for_sipi_cannot_help():
    detector = DeadGuestDetector()
    round_ = [dead(), VcpuSample(WAIT_SIPI), VcpuSample(uapi.KVM_MP_STATE_INIT_RECEIVED)]
    assert not detector.observe(round_)
    assert detector.observe(round_)
    # ...but a guest with no halted vCPU at all is not this case.
    fresh = DeadGuestDetector()
    assert not fresh.observe([VcpuSample(WAIT_SIPI)]) and not fresh.observe([VcpuSample(WAIT_SIPI)])


def test_reset_forgets_the_previous_round():
    detector = DeadGuestDetector()
    detector.observe([dead()])
    detector.reset()
    assert not detector.observe([dead()])
    assert not DeadGuestDetector().observe([])


def lapic(**entries):
    page = bytearray(1024)
    for offset, value in entries.values():
        page[offset:offset + 4] = value.to_bytes(4, "little")
    return bytes(page)


def test_lapic_nmi_sources():
    assert not lapic_can_raise_nmi(lapic())
    assert lapic_can_raise_nmi(lapic(lint0=(LVT_LINT0, 0x400)))
    assert lapic_can_raise_nmi(lapic(pmc=(LVT_PERFORMANCE_COUNTER, 0x400)))
    assert not lapic_can_raise_nmi(lapic(pmc=(LVT_PERFORMANCE_COUNTER, 0x10400)))  # masked
    assert not lapic_can_raise_nmi(lapic(lint0=(LVT_LINT0, 0x700)))  # ExtINT: maskable by IF
    assert not lapic_can_raise_nmi(lapic(lint1=(0x360, 0x400)))  # KVM never drives LINT1


class FakeVcpu:
    def __init__(self, state, rflags=0x2, rip=0x1234, lapic_page=bytes(1024), cr0=0x8000_0011, cr3=0x1000):
        self.state, self.lapic_page, self.calls = state, lapic_page, []
        self.regs = type("Regs", (), {"rflags": rflags, "rip": rip})()
        self.sregs = type("Sregs", (), {"cr0": cr0, "cr3": cr3})()

    def get_sregs(self):
        self.calls.append("sregs")
        return self.sregs

    def get_mp_state(self):
        self.calls.append("mp_state")
        return self.state

    def get_regs(self):
        self.calls.append("regs")
        return self.regs

    def get_lapic(self):
        self.calls.append("lapic")
        return self.lapic_page


def test_sampling_a_running_vcpu_without_the_memory_costs_one_ioctl():
    vcpu = FakeVcpu(RUNNABLE)
    assert sample_vcpu(vcpu) == VcpuSample(RUNNABLE)
    assert vcpu.calls == ["mp_state"]


def test_sampling_a_halted_vcpu_reads_if_then_the_lapic_only_when_if_is_off():
    vcpu = FakeVcpu(HALTED, rflags=0x202)
    assert sample_vcpu(vcpu) == VcpuSample(HALTED, 0x1234, True, False)
    assert vcpu.calls == ["mp_state", "regs"]
    vcpu = FakeVcpu(HALTED, rflags=0x2, lapic_page=lapic(lint0=(LVT_LINT0, 0x400)))
    assert sample_vcpu(vcpu) == VcpuSample(HALTED, 0x1234, False, True)
    assert vcpu.calls == ["mp_state", "regs", "lapic"]


def test_describe_names_every_vcpu():
    assert describe([dead(0xABC), VcpuSample(WAIT_SIPI)]) == (
        "vCPU 0 halted at rip=0xabc with interrupts off, vCPU 1 waiting for INIT/SIPI")


def test_a_vcpu_halted_in_sched_op_poll_is_not_stuck():
    # pyvmm halted it for SCHEDOP_poll/block: an event channel wakes it, even with IF clear.
    polling = VcpuSample(uapi.KVM_MP_STATE_HALTED, 0x1000, interrupts_enabled=False, event_wakes=True)
    detector = DeadGuestDetector()
    assert not polling.stuck
    assert not detector.observe([polling]) and not detector.observe([polling])


FOREIGN_CR3 = 0x1011C8000  # L1's page-table root, seen in an L2 vCPU in the testbed (docs/TESTBED.md)


def test_sampling_with_the_guests_memory_also_reads_cr3_and_names_a_root_outside_ram():
    memory = GuestMemory([(0, 16 << 20)])
    try:
        vcpu = FakeVcpu(RUNNABLE)
        assert sample_vcpu(vcpu, memory) == VcpuSample(RUNNABLE)  # cr3 0x1000 is the guest's
        assert vcpu.calls == ["mp_state", "sregs"]
        vcpu = FakeVcpu(RUNNABLE, rip=0xFFFFFFFFC03A80B0, cr3=FOREIGN_CR3 | 0x18)  # PWT/PCD bits
        assert sample_vcpu(vcpu, memory) == VcpuSample(RUNNABLE, 0xFFFFFFFFC03A80B0, foreign_cr3=FOREIGN_CR3 | 0x18)
        assert vcpu.calls == ["mp_state", "sregs", "regs"]
        # Paging off: cr3 means nothing, whatever it holds.
        assert sample_vcpu(FakeVcpu(RUNNABLE, cr0=0x11, cr3=FOREIGN_CR3), memory) == VcpuSample(RUNNABLE)
        halted = sample_vcpu(FakeVcpu(HALTED, rflags=0x202, cr3=FOREIGN_CR3), memory)
        assert halted == VcpuSample(HALTED, 0x1234, True, False, foreign_cr3=FOREIGN_CR3)
    finally:
        memory.close()


def foreign(cr3=FOREIGN_CR3):
    return VcpuSample(RUNNABLE, 0xFFFFFFFFC03A80B0, foreign_cr3=cr3)


def test_a_vcpu_holding_the_same_foreign_root_round_after_round_is_named():
    detector = ForeignStateDetector()
    for _ in range(ROUNDS_TO_DECLARE_FOREIGN - 1):
        assert detector.observe([foreign(), VcpuSample(RUNNABLE)]) == []
    assert detector.observe([foreign(), None]) == [(0, foreign())]  # the other vCPU busy: no matter


@pytest.mark.parametrize("between", [
    [VcpuSample(RUNNABLE), VcpuSample(RUNNABLE)],  # the guest's own state again
    [None, VcpuSample(RUNNABLE)],                   # the vCPU did not answer: not seen
    [foreign(FOREIGN_CR3 + 0x1000), VcpuSample(RUNNABLE)],  # another root: still changing
    [foreign(), foreign()],                          # another vCPU too
])
def test_a_round_without_the_same_foreign_state_starts_the_count_again(between):
    detector = ForeignStateDetector()
    for _ in range(ROUNDS_TO_DECLARE_FOREIGN - 1):
        assert detector.observe([foreign(), VcpuSample(RUNNABLE)]) == []
    assert detector.observe(between) == []
    for _ in range(ROUNDS_TO_DECLARE_FOREIGN - 1):
        assert detector.observe([foreign(), VcpuSample(RUNNABLE)]) == []
    assert detector.observe([foreign(), VcpuSample(RUNNABLE)]) == [(0, foreign())]
