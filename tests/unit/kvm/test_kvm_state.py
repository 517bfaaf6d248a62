"""KVM's state as JSON (pyvmm/kvm/state.py), without KVM: structs go to
JSON and back unchanged, and a vCPU is restored in the order KVM needs."""

from __future__ import annotations

import json

import pytest

from pyvmm.kvm import uapi
from pyvmm.kvm import state as kvm_state
from pyvmm.kvm.cpuid import CpuidEntry
from pyvmm.kvm.ioctl import KvmError
from pyvmm.kvm.uapi import ffi


@pytest.mark.parametrize("ctype", ["struct kvm_regs", "struct kvm_sregs", "struct kvm_sregs2", "struct kvm_fpu",
                                   "struct kvm_vcpu_events", "struct kvm_debugregs", "struct kvm_pit_state2"])
def test_structs_go_to_json_and_back_unchanged(ctype):
    value = ffi.new(f"{ctype} *")
    raw = ffi.buffer(value)
    # Every byte a different value (padding included, which to_json carries too).
    raw[:] = bytes((i * 7 + 3) & 0xFF for i in range(len(raw)))
    data = json.loads(json.dumps(kvm_state.to_json(value)))
    again = kvm_state.from_json(f"{ctype} *", data)
    assert bytes(ffi.buffer(again)) == bytes(raw)


def test_a_malformed_struct_is_refused():
    with pytest.raises(kvm_state.KvmStateError, match="kvm_regs"):
        kvm_state.from_json("struct kvm_regs *", {"rax": 1, "nonsense": 2})
    with pytest.raises(kvm_state.KvmStateError):
        kvm_state.from_json("struct kvm_regs *", {"rax": -1})


class FakeVcpu:
    """Records the order of the set_* calls a restore makes."""

    def __init__(self, refuse_msrs=(), tsc_khz=2_000_000, settable_khz=False):
        self.calls = []
        self.refuse_msrs = set(refuse_msrs)
        self.khz = tsc_khz
        self.settable_khz = settable_khz
        self.regs = ffi.new("struct kvm_regs *", {"rip": 0x1234})
        self.msrs = {0x10: 5, 0x6E0: 9, 0x3B: 1, 0x2FF: 0xC06}

    def get_cpuid(self):
        return [CpuidEntry(1, 0, 0, 1, 2, 3, 4)]

    def get_tsc_khz(self):
        return self.khz

    def set_tsc_khz(self, khz):
        self.calls.append("tsc_khz")
        if not self.settable_khz:
            raise KvmError(22, "KVM_SET_TSC_KHZ")
        self.khz = khz

    def get_regs(self):
        return self.regs

    def get_xsave(self, size):
        return bytes(range(256)) * (size // 256)

    def get_xcrs(self):
        return {0: 7}

    def get_sregs2(self):
        return ffi.new("struct kvm_sregs2 *", {"cr0": 0x11, "efer": 0x500})

    def get_msrs_available(self, indices):
        return {index: self.msrs[index] for index in indices if index in self.msrs}

    def get_mp_state(self):
        return uapi.KVM_MP_STATE_HALTED

    def get_lapic(self):
        return bytearray(b"\x01" * 1024)

    def get_vcpu_events(self):
        return ffi.new("struct kvm_vcpu_events *", {"flags": 0x0D, "sipi_vector": 0x9A})

    def get_debugregs(self):
        return ffi.new("struct kvm_debugregs *", {"dr7": 0x400})

    def __getattr__(self, name):
        if not name.startswith("set_"):
            raise AttributeError(name)

        def setter(value, *rest):
            if name == "set_msrs":
                refused = [index for index in value if index in self.refuse_msrs]
                if refused:
                    raise KvmError(22, "KVM_SET_MSRS", f"MSR {refused[0]:#x} refused")
                self.calls.append(("set_msrs", sorted(value)))
            else:
                self.calls.append(name)
            setattr(self, "last_" + name, value)

        return setter


class Caps:
    sregs2 = xsave = xcrs = events = debugregs = tsc_khz = True
    tsc_control = False
    xsave_size = 4096
    msrs = [0x10, 0x3B, 0x6E0, 0x2FF, 0x1A0]
    skipped_msrs = frozenset()


def test_a_vcpu_is_saved_as_json_and_restored_in_kvms_order():
    state = json.loads(json.dumps(kvm_state.save_vcpu(FakeVcpu(), Caps())))
    assert state["msrs"] == [[0x10, 5], [0x3B, 1], [0x6E0, 9], [0x2FF, 0xC06]]  # 0x1A0 refused by the vCPU: left out
    vcpu = FakeVcpu()
    assert kvm_state.restore_vcpu(vcpu, state, Caps()) == []
    assert vcpu.calls == [
        "set_cpuid", "set_regs", "set_xsave", "set_xcrs", "set_sregs2",
        ("set_msrs", [0x10, 0x3B, 0x2FF]),  # all but the TSC deadline ...
        "set_mp_state", "set_lapic",
        ("set_msrs", [0x6E0]),  # ... which needs the LAPIC's timer mode
        "set_vcpu_events", "set_debugregs",
    ]
    assert vcpu.last_set_regs.rip == 0x1234
    assert vcpu.last_set_sregs2.efer == 0x500
    events = vcpu.last_set_vcpu_events
    assert events.sipi_vector == 0x9A and events.flags & uapi.KVM_VCPUEVENT_VALID_SIPI_VECTOR
    assert bytes(vcpu.last_set_lapic) == b"\x01" * 1024


def test_another_tsc_frequency_is_set_or_warned_about():
    state = kvm_state.save_vcpu(FakeVcpu(tsc_khz=3_000_000), Caps())
    scaling = FakeVcpu(settable_khz=True)
    assert kvm_state.restore_vcpu(scaling, state, Caps()) == []
    assert scaling.khz == 3_000_000
    fixed = FakeVcpu()
    warnings = kvm_state.restore_vcpu(fixed, state, Caps())
    assert len(warnings) == 1 and "3000000 kHz" in warnings[0]


def test_a_refused_msr_or_version_stops_the_restore():
    state = kvm_state.save_vcpu(FakeVcpu(), Caps())
    with pytest.raises(kvm_state.KvmStateError, match="refuses a saved MSR"):
        kvm_state.restore_vcpu(FakeVcpu(refuse_msrs={0x3B}), state, Caps())
    with pytest.raises(kvm_state.KvmStateError, match="version"):
        kvm_state.restore_vcpu(FakeVcpu(), {**state, "version": 99}, Caps())
    broken = dict(state)
    del broken["lapic"]
    with pytest.raises(kvm_state.KvmStateError, match="malformed"):
        kvm_state.restore_vcpu(FakeVcpu(), broken, Caps())


def test_a_state_with_sregs2_needs_a_kvm_that_has_them():
    state = kvm_state.save_vcpu(FakeVcpu(), Caps())

    class Older(Caps):
        sregs2 = False

    with pytest.raises(kvm_state.KvmStateError, match="SREGS2"):
        kvm_state.restore_vcpu(FakeVcpu(), state, Older())


class FakeVm:
    def __init__(self):
        self.chips = {chip: bytes([chip]) * 512 for chip in kvm_state.IRQCHIPS.values()}
        self.pit = ffi.new("struct kvm_pit_state2 *", {"flags": 1, "channels": [{"count": 65536, "mode": 2}]})

    def get_irqchip(self, chip):
        return self.chips[chip]

    def set_irqchip(self, chip, data):
        self.chips[chip] = data

    def get_pit2(self):
        return self.pit

    def set_pit2(self, state):
        self.pit = state


def test_the_irqchips_and_pit_go_through_json():
    state = json.loads(json.dumps(kvm_state.save_vm(FakeVm())))
    vm = FakeVm()
    vm.chips = {}
    kvm_state.restore_vm(vm, state)
    assert vm.chips == FakeVm().chips
    assert vm.pit.channels[0].count == 65536 and vm.pit.channels[0].mode == 2 and vm.pit.flags == 1


def test_a_runstate_dated_after_the_frozen_clock_is_brought_back_to_it():
    runstate = {"state": 0, "state_entry_time": 1000, "time_running": 600, "time_runnable": 300,
                "time_blocked": 100, "time_offline": 0}
    assert kvm_state.clamp_runstate(runstate, 1000) == runstate
    assert kvm_state.clamp_runstate(runstate, None) == runstate
    clamped = kvm_state.clamp_runstate(runstate, 950)
    assert clamped["state_entry_time"] == 950 and clamped["time_running"] == 550
    assert sum(clamped[name] for name in kvm_state.RUNSTATE_TIMES) == 950
    blocked = kvm_state.clamp_runstate({**runstate, "state": 2}, 850)  # RUNSTATE_blocked: its own time first
    assert (blocked["time_blocked"], blocked["time_running"]) == (0, 550)
    assert sum(blocked[name] for name in kvm_state.RUNSTATE_TIMES) == 850


class FakeKvm:
    def msr_index_list(self):
        return [0x10, 0x40000000, 0x40000001, 0x6E0]


class CapsVm:
    xen_hypercall_msr = 0x40000000

    def check_extension(self, capability):
        return 1  # every capability (the XSAVE area's size: its 4096-byte least)


def test_xens_hypercall_msr_is_neither_saved_nor_restored():
    """A write to it makes KVM write the hypercall page at the address
    written: restoring its read-back value (0) would overwrite guest page 0."""
    caps = kvm_state.VcpuCapabilities(FakeKvm(), CapsVm())
    assert 0x40000000 not in caps.msrs and {0x10, 0x40000001, 0x6E0} <= set(caps.msrs)
    vcpu = FakeVcpu()
    vcpu.msrs[0x40000000] = 0
    state = kvm_state.save_vcpu(vcpu, caps)
    assert 0x40000000 not in dict(state["msrs"])
    # A snapshot taken before it was left out still has it: the restore drops it.
    state["msrs"].append([0x40000000, 0])
    restored = FakeVcpu()
    kvm_state.restore_vcpu(restored, state, caps)
    assert all(0x40000000 not in call[1] for call in restored.calls if isinstance(call, tuple))
    no_xen = CapsVm()
    no_xen.xen_hypercall_msr = 0
    assert 0x40000000 in kvm_state.VcpuCapabilities(FakeKvm(), no_xen).msrs
