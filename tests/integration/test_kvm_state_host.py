"""KVM's state saved from one VM and restored into another (pyvmm/kvm/state.py),
on this host's /dev/kvm: what the second VM reports is what the first held.

The Xen attributes need KVM's Xen support, which only the testbed has
(`guest`-marked, so scripts/test runs it there; no guest boots)."""

from __future__ import annotations

import json
import os

import pytest

from pyvmm.core import layout
from pyvmm.core.memory import GuestMemory
from pyvmm.kvm import Kvm, KvmUnavailable, map_guest_memory, pc_irqchip_routes
from pyvmm.kvm import state as kvm_state
from pyvmm.kvm import uapi
from pyvmm.vmm.vcpu_setup import configure_vcpu

MiB = 1 << 20
MSR_IA32_CR_PAT = 0x277
MSR_KVM_SYSTEM_TIME_NEW = 0x4B564D01
MSR_IA32_SYSENTER_ESP = 0x175


@pytest.fixture
def kvm():
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm on this host")
    try:
        with Kvm() as kvm:
            yield kvm
    except KvmUnavailable as error:
        pytest.skip(f"KVM unusable here: {error}")


class Vm:
    """A VM with RAM, the in-kernel irqchip and PIT, and vCPU 0 configured as pyvmm does."""

    def __init__(self, kvm, xen_flags: int | None = None):
        self.kvm = kvm
        self.memory = GuestMemory([(0, 16 * MiB)])
        self.vm = kvm.create_vm()
        self.vm.set_identity_map_addr(layout.KVM_IDENTITY_MAP_ADDR)
        self.vm.set_tss_addr(layout.KVM_TSS_ADDR)
        self.vm.create_irqchip()
        self.vm.set_gsi_routing(pc_irqchip_routes())
        self.vm.create_pit2()
        if xen_flags is not None:
            self.vm.xen_hvm_config(xen_flags, 0x4000_0000)
        map_guest_memory(self.vm.memslots, self.memory)
        self.vcpu = self.vm.create_vcpu(0)
        configure_vcpu(kvm, self.vcpu, 0, 1)
        self.caps = kvm_state.VcpuCapabilities(kvm, self.vm)

    def close(self):
        self.vcpu.close()
        self.vm.close()
        self.memory.close()


def through_json(value):
    return json.loads(json.dumps(value))


def test_a_vcpu_and_the_irqchips_go_from_one_vm_to_another(kvm):
    first, second = Vm(kvm), Vm(kvm)
    try:
        vcpu = first.vcpu
        regs = vcpu.get_regs()
        regs.rax, regs.rip, regs.rsp, regs.rflags = 0x1122334455667788, 0x1000, 0x8000, 0x202
        vcpu.set_regs(regs)
        sregs = vcpu.get_sregs()
        sregs.cr0 |= 1  # protected mode
        sregs.cs.base, sregs.cs.limit, sregs.cs.db, sregs.cs.type = 0, 0xFFFFFFFF, 1, 0xB
        vcpu.set_sregs(sregs)
        vcpu.set_msrs({MSR_IA32_CR_PAT: 0x0007040600070406, MSR_IA32_SYSENTER_ESP: 0xABCDE000,
                       MSR_KVM_SYSTEM_TIME_NEW: 0x5000 | 1})
        lapic = vcpu.get_lapic()
        lapic[0x80] = 0x20  # TPR
        vcpu.set_lapic(lapic)
        first.vm.irq_line(4, True)  # COM1's line, raised on the PIC and IOAPIC
        pit = first.vm.get_pit2()
        pit.channels[0].mode = 2
        first.vm.set_pit2(pit)

        saved = through_json(kvm_state.save_vcpu(vcpu, first.caps))
        vm_saved = through_json(kvm_state.save_vm(first.vm))
        assert kvm_state.restore_vcpu(second.vcpu, saved, second.caps) == []
        kvm_state.restore_vm(second.vm, vm_saved)
        again = through_json(kvm_state.save_vcpu(second.vcpu, second.caps))

        assert again["regs"] == saved["regs"]
        assert again[("sregs2" if first.caps.sregs2 else "sregs")] == saved[("sregs2" if first.caps.sregs2 else "sregs")]
        assert again["cpuid"] == saved["cpuid"]
        # Counters that go on: the TSC, and Hyper-V's VP runtime and reference time count where KVM lists them.
        moving = {0x10, 0x4000_0010, 0x4000_0020}
        assert ({i: v for i, v in again["msrs"] if i not in moving} == {i: v for i, v in saved["msrs"] if i not in moving})
        assert dict(saved["msrs"])[MSR_IA32_CR_PAT] == 0x0007040600070406
        assert abs(dict(again["msrs"])[0x10] - dict(saved["msrs"])[0x10]) < 1 << 40
        for key in ("xsave", "fpu", "xcrs", "events", "debugregs", "mp_state"):
            assert again.get(key) == saved.get(key), key
        assert kvm_state._unblob(again["lapic"], "")[0x80] == 0x20
        again_vm = through_json(kvm_state.save_vm(second.vm))
        assert again_vm["irqchip"] == vm_saved["irqchip"]
        assert again_vm["pit"]["channels"][0]["mode"] == 2
    finally:
        first.close()
        second.close()


def xen_bits(kvm) -> int:
    bits = kvm.xen_capabilities()
    needed = uapi.KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL | uapi.KVM_XEN_HVM_CONFIG_SHARED_INFO
    if bits & needed != needed:
        pytest.skip("this host's KVM has no Xen support (scripts/testbed has)")
    return bits


@pytest.mark.guest  # for scripts/test to run it in the testbed: only there does KVM emulate Xen
@pytest.mark.xen
@pytest.mark.parametrize("by_host_address", [False, True], ids=["by-gfn", "by-hva"])
def test_kvms_xen_attributes_go_from_one_vm_to_another(kvm, by_host_address):
    bits = xen_bits(kvm)
    if by_host_address and not bits & uapi.KVM_XEN_HVM_CONFIG_SHARED_INFO_HVA:
        pytest.skip("no SHARED_INFO_HVA")
    if not by_host_address:
        bits &= ~uapi.KVM_XEN_HVM_CONFIG_SHARED_INFO_HVA  # save and restore as a KVM without it would
    flags = uapi.KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL | (bits & uapi.KVM_XEN_HVM_CONFIG_EVTCHN_SEND)
    first, second = Vm(kvm, flags), Vm(kvm, flags)
    try:
        vm, vcpu = first.vm, first.vcpu
        vm.xen_hvm_set_attr({"type": uapi.KVM_XEN_ATTR_TYPE_LONG_MODE, "u": {"long_mode": 1}})
        if by_host_address:
            vm.xen_hvm_set_attr({"type": uapi.KVM_XEN_ATTR_TYPE_SHARED_INFO_HVA,
                                 "u": {"shared_info": {"hva": first.memory.host_address(0x20_0000)}}})
        else:
            vm.xen_hvm_set_attr({"type": uapi.KVM_XEN_ATTR_TYPE_SHARED_INFO, "u": {"shared_info": {"gfn": 0x200}}})
        vm.xen_hvm_set_attr({"type": uapi.KVM_XEN_ATTR_TYPE_UPCALL_VECTOR, "u": {"vector": 0xF3}})
        set_attr = vcpu.xen_vcpu_set_attr
        set_attr({"type": uapi.KVM_XEN_VCPU_ATTR_TYPE_VCPU_INFO, "u": {"gpa": 0x20_0040}})
        set_attr({"type": uapi.KVM_XEN_VCPU_ATTR_TYPE_VCPU_TIME_INFO, "u": {"gpa": 0x30_0000}})
        if bits & uapi.KVM_XEN_HVM_CONFIG_RUNSTATE:
            set_attr({"type": uapi.KVM_XEN_VCPU_ATTR_TYPE_RUNSTATE_ADDR, "u": {"gpa": 0x30_1000}})
        clock = vm.get_clock().clock
        if bits & uapi.KVM_XEN_HVM_CONFIG_EVTCHN_SEND:
            vm.xen_hvm_set_attr({"type": uapi.KVM_XEN_ATTR_TYPE_XEN_VERSION, "u": {"xen_version": (4 << 16) | 17}})
            set_attr({"type": uapi.KVM_XEN_VCPU_ATTR_TYPE_VCPU_ID, "u": {"vcpu_id": 0}})
            set_attr({"type": uapi.KVM_XEN_VCPU_ATTR_TYPE_UPCALL_VECTOR, "u": {"vector": 0xF4}})
            set_attr({"type": uapi.KVM_XEN_VCPU_ATTR_TYPE_TIMER,
                      "u": {"timer": {"port": 7, "priority": uapi.KVM_IRQ_ROUTING_XEN_EVTCHN_PRIO_2LEVEL,
                                      "expires_ns": clock + 60_000_000_000}}})

        saved_vm = through_json(kvm_state.xen_save_vm(vm, bits, first.memory.gpa_of_host_address))
        saved_vcpu = through_json(kvm_state.xen_save_vcpu(vcpu, bits, first.memory.gpa_of_host_address))
        assert saved_vm["long_mode"] == 1 and saved_vm["upcall_vector"] == 0xF3
        if by_host_address:
            assert saved_vm["shared_info_hva_gpa"] == 0x20_0000
        else:
            assert saved_vm["shared_info_gfn"] == 0x200
        assert saved_vcpu["vcpu_info"] == 0x20_0040 and saved_vcpu["time_info"] == 0x30_0000

        second.vm.set_clock(clock)
        kvm_state.xen_restore_vm(second.vm, saved_vm, bits, second.memory.host_address)
        kvm_state.xen_restore_vcpu(second.vcpu, saved_vcpu, bits, second.memory.host_address)
        again_vm = kvm_state.xen_save_vm(second.vm, bits, second.memory.gpa_of_host_address)
        again_vcpu = kvm_state.xen_save_vcpu(second.vcpu, bits, second.memory.gpa_of_host_address)
        assert again_vm == saved_vm
        for key in ("vcpu_info", "time_info", "runstate_addr", "vcpu_id", "upcall_vector", "timer"):
            assert again_vcpu.get(key) == saved_vcpu.get(key), key
        if "timer" in saved_vcpu:
            assert again_vcpu["timer"]["port"] == 7
        if "runstate" in saved_vcpu:
            assert again_vcpu["runstate"]["state"] == saved_vcpu["runstate"]["state"]
    finally:
        first.close()
        second.close()
