"""Initial vCPU state: CPUID, MSRs, LAPIC wiring, and the boot CPU's registers."""

from __future__ import annotations

from ..boot.cpustate import BootCpuState, Segment
from ..kvm import Kvm, Vcpu, vcpu_cpuid

MSR_IA32_MISC_ENABLE = 0x1A0
MISC_ENABLE_FAST_STRING = 1 << 0
MSR_MTRR_DEF_TYPE = 0x2FF
MTRR_ENABLE = 1 << 11
MTRR_TYPE_WRITEBACK = 6

# LAPIC registers (offsets in the KVM_GET/SET_LAPIC page) and LVT delivery modes.
APIC_LVT_LINT0 = 0x350
APIC_LVT_LINT1 = 0x360
APIC_MODE_NMI = 0b100 << 8
APIC_MODE_EXTINT = 0b111 << 8
APIC_DELIVERY_MODE_MASK = 0b111 << 8


def configure_vcpu(kvm: Kvm, vcpu: Vcpu, index: int, count: int, hypervisor_leaves=(), kvm_base=0x40000000) -> None:
    """What firmware would leave behind on every CPU: identity, caches, LAPIC."""
    vcpu.set_cpuid(vcpu_cpuid(kvm.supported_cpuid(), index, count, hypervisor_leaves=hypervisor_leaves, kvm_base=kvm_base))
    # Write-back memory by default: without enabled MTRRs Linux treats all
    # RAM as uncached and complains about it.
    vcpu.set_msrs({MSR_IA32_MISC_ENABLE: MISC_ENABLE_FAST_STRING, MSR_MTRR_DEF_TYPE: MTRR_ENABLE | MTRR_TYPE_WRITEBACK})
    # Virtual-wire mode as a BIOS leaves it: LINT0 passes PIC interrupts
    # (ExtINT), LINT1 carries NMIs. Guests booted with `noapic` rely on it.
    lapic = vcpu.get_lapic()
    for offset, mode in ((APIC_LVT_LINT0, APIC_MODE_EXTINT), (APIC_LVT_LINT1, APIC_MODE_NMI)):
        value = int.from_bytes(lapic[offset : offset + 4], "little")
        value = (value & ~APIC_DELIVERY_MODE_MASK) | mode
        lapic[offset : offset + 4] = value.to_bytes(4, "little")
    vcpu.set_lapic(lapic)


def _copy_segment(target, segment: Segment) -> None:
    for name in ("base", "limit", "selector", "type", "present", "dpl", "db", "s", "l", "g", "avl", "unusable"):
        setattr(target, name, getattr(segment, name))


def apply_boot_state(vcpu: Vcpu, state: BootCpuState) -> None:
    """Load the registers a boot protocol asks for into the boot vCPU."""
    sregs = vcpu.get_sregs()
    for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"):
        _copy_segment(getattr(sregs, name), getattr(state, name))
    sregs.gdt.base, sregs.gdt.limit = state.gdt.base, state.gdt.limit
    sregs.idt.base, sregs.idt.limit = state.idt.base, state.idt.limit
    sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = state.cr0, state.cr3, state.cr4, state.efer
    vcpu.set_sregs(sregs)

    regs = vcpu.get_regs()
    for name in ("rip", "rsp", "rflags", "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp"):
        setattr(regs, name, getattr(state, name))
    vcpu.set_regs(regs)
