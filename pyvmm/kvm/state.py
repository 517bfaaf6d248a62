"""What KVM holds of a VM, as JSON-able dicts: a snapshot's KVM part.

`save_vcpu`/`restore_vcpu` take and give back everything KVM keeps for one
vCPU (its CPUID, registers, system registers, FPU/XSAVE, XCRs, MSRs,
LAPIC, MP state, pending events, debug registers, TSC frequency);
`save_vm`/`restore_vm` the in-kernel PICs, IOAPIC and PIT; and the `xen_*`
functions KVM's Xen attributes, VM-wide and per vCPU. The guest's clock
(KVM_GET_CLOCK) is the machine's: it is read when the VM is paused.

Registers and the other fixed kernel structs are saved field by field
(`to_json`), so a snapshot can be read by people and by a later pyvmm; the
opaque blobs (LAPIC page, XSAVE area, irqchip state) as base64. A vCPU's
state is read on its own thread while the vCPU is outside KVM_RUN, after
any instruction KVM left half done has been completed (Machine's settle).

Restoring follows QEMU's order (target/i386/kvm/kvm.c, kvm_arch_put_registers):
CPUID, TSC frequency, registers, XSAVE, XCRs, system registers, MSRs, MP
state, LAPIC, the TSC deadline (it needs the LAPIC's timer mode), events,
debug registers.
"""

from __future__ import annotations

import base64
import errno
import logging

from ..core.snapshot import SnapshotError
from . import uapi
from .cpuid import CpuidEntry
from .ioctl import KvmError
from .uapi import ffi

log = logging.getLogger(__name__)

VCPU_STATE_VERSION = 1
VM_STATE_VERSION = 1
XEN_STATE_VERSION = 1

MSR_IA32_TSC = 0x10
MSR_IA32_TSC_DEADLINE = 0x6E0
MSR_MTRR_CAP = 0xFE
MSR_MTRR_DEF_TYPE = 0x2FF
# MTRRs are KVM's but not in KVM_GET_MSR_INDEX_LIST: the fixed ranges and
# the eight variable pairs KVM offers (QEMU saves them the same way).
MTRR_MSRS = (MSR_MTRR_DEF_TYPE, 0x250, 0x258, 0x259, *range(0x268, 0x270), *range(0x200, 0x210))

IRQCHIPS = {"pic_master": uapi.KVM_IRQCHIP_PIC_MASTER, "pic_slave": uapi.KVM_IRQCHIP_PIC_SLAVE,
            "ioapic": uapi.KVM_IRQCHIP_IOAPIC}


class KvmStateError(SnapshotError):
    """A saved KVM state that this KVM does not take back."""


# --- structs as JSON --------------------------------------------------------------------

def to_json(value):
    """A cffi struct (or pointer to one), array or number as JSON data:
    structs as dicts of their fields, arrays as lists."""
    kind = ffi.typeof(value)
    if kind.kind == "pointer":
        value, kind = value[0], kind.item
    if kind.kind == "struct":
        return {name: to_json(getattr(value, name)) if _is_compound(field.type) else getattr(value, name)
                for name, field in kind.fields}
    if kind.kind == "array":
        return [to_json(item) if _is_compound(kind.item) else item for item in value]
    return value


def _is_compound(ctype) -> bool:
    return ctype.kind in ("struct", "array")


def from_json(ctype: str, data: dict):
    """A new `ctype` (a struct pointer type) filled from to_json's dict;
    KvmStateError when a field is missing, unknown or out of range."""
    try:
        return ffi.new(ctype, data)
    except (TypeError, ValueError, OverflowError, KeyError, IndexError) as error:
        raise KvmStateError(f"{ctype[:-2].strip()}: {error}") from None


def _blob(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unblob(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.encode(), validate=True)
    except (ValueError, AttributeError) as error:
        raise KvmStateError(f"{what}: not base64 ({error})") from None


# --- one vCPU -----------------------------------------------------------------------------

class VcpuCapabilities:
    """What this KVM can save of a vCPU, found once per VM (check_extension
    on the VM's fd) and the MSRs it saves (KVM_GET_MSR_INDEX_LIST)."""

    def __init__(self, kvm, vm):
        self.sregs2 = bool(vm.check_extension(uapi.KVM_CAP_SREGS2))
        self.xsave = bool(vm.check_extension(uapi.KVM_CAP_XSAVE))
        self.xsave_size = max(4096, vm.check_extension(uapi.KVM_CAP_XSAVE2)) if self.xsave else 0
        self.xcrs = bool(vm.check_extension(uapi.KVM_CAP_XCRS))
        self.events = bool(vm.check_extension(uapi.KVM_CAP_VCPU_EVENTS))
        self.debugregs = bool(vm.check_extension(uapi.KVM_CAP_DEBUGREGS))
        self.tsc_khz = bool(vm.check_extension(uapi.KVM_CAP_GET_TSC_KHZ))
        self.tsc_control = bool(vm.check_extension(uapi.KVM_CAP_TSC_CONTROL))
        listed = kvm.msr_index_list()
        # Xen's hypercall-page MSR is an action, not state: KVM answers every
        # write to it, the VMM's too, by writing the hypercall page into guest
        # memory at the address written. Its value read back is Hyper-V's guest
        # OS id (0), so restoring it would overwrite the guest's page 0.
        self.skipped_msrs = frozenset({vm.xen_hypercall_msr} - {0})
        self.msrs = [index for index in dict.fromkeys([*listed, *MTRR_MSRS]) if index not in self.skipped_msrs]


def save_vcpu(vcpu, caps: VcpuCapabilities) -> dict:
    """Everything KVM holds of `vcpu` (on its thread, outside KVM_RUN)."""
    state: dict = {"version": VCPU_STATE_VERSION}
    state["cpuid"] = [[e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx] for e in vcpu.get_cpuid()]
    if caps.tsc_khz:
        state["tsc_khz"] = vcpu.get_tsc_khz()
    state["regs"] = to_json(vcpu.get_regs())
    if caps.xsave:
        state["xsave"] = _blob(vcpu.get_xsave(caps.xsave_size))
    else:
        state["fpu"] = to_json(vcpu.get_fpu())
    if caps.xcrs:
        state["xcrs"] = {str(xcr): value for xcr, value in vcpu.get_xcrs().items()}
    if caps.sregs2:
        state["sregs2"] = to_json(vcpu.get_sregs2())
    else:
        state["sregs"] = to_json(vcpu.get_sregs())
    # [index, value] pairs in KVM's order; the MSRs this vCPU refuses (a
    # feature its CPUID lacks) are left out.
    state["msrs"] = [[index, value] for index, value in vcpu.get_msrs_available(caps.msrs).items()]
    state["mp_state"] = vcpu.get_mp_state()
    state["lapic"] = _blob(bytes(vcpu.get_lapic()))
    if caps.events:
        state["events"] = to_json(vcpu.get_vcpu_events())
    if caps.debugregs:
        state["debugregs"] = to_json(vcpu.get_debugregs())
    return state


def restore_vcpu(vcpu, state: dict, caps: VcpuCapabilities) -> list[str]:
    """Give `vcpu`, freshly created, the state save_vcpu() took; returns
    warnings (a TSC frequency this host cannot give). KvmStateError or
    KvmError when KVM refuses a part."""
    version = state.get("version")
    if version != VCPU_STATE_VERSION:
        raise KvmStateError(f"vCPU state version {version!r} is not one this pyvmm reads ({VCPU_STATE_VERSION})")
    warnings = []
    try:
        vcpu.set_cpuid([CpuidEntry(*entry) for entry in state["cpuid"]])
        saved_khz = state.get("tsc_khz")
        if saved_khz and caps.tsc_khz and vcpu.get_tsc_khz() != saved_khz:
            try:
                vcpu.set_tsc_khz(saved_khz)
            except KvmError as error:
                warnings.append(f"the guest's TSC ran at {saved_khz} kHz and this host's KVM cannot scale to it "
                                f"({error.strerror}): it now runs at {vcpu.get_tsc_khz()} kHz")
        vcpu.set_regs(from_json("struct kvm_regs *", state["regs"]))
        if "xsave" in state:
            if not caps.xsave:
                raise KvmStateError("the snapshot has an XSAVE area and this KVM has no KVM_CAP_XSAVE")
            area = _unblob(state["xsave"], "XSAVE area")
            vcpu.set_xsave(area.ljust(caps.xsave_size, b"\0") if len(area) < caps.xsave_size else area)
        else:
            vcpu.set_fpu(from_json("struct kvm_fpu *", state["fpu"]))
        if "xcrs" in state:
            vcpu.set_xcrs({int(xcr): value for xcr, value in state["xcrs"].items()})
        if "sregs2" in state:
            if not caps.sregs2:
                raise KvmStateError("the snapshot has KVM_GET_SREGS2's registers and this KVM has no KVM_CAP_SREGS2")
            vcpu.set_sregs2(from_json("struct kvm_sregs2 *", state["sregs2"]))
        else:
            vcpu.set_sregs(from_json("struct kvm_sregs *", state["sregs"]))
        # (skipped_msrs: a snapshot from before they were left out has them)
        msrs = {index: value for index, value in state["msrs"] if index not in caps.skipped_msrs}
        deadline = msrs.pop(MSR_IA32_TSC_DEADLINE, None)
        _set_msrs(vcpu, msrs)
        vcpu.set_mp_state(state["mp_state"])
        lapic = _unblob(state["lapic"], "LAPIC")
        vcpu.set_lapic(lapic)
        if deadline is not None:
            _set_msrs(vcpu, {MSR_IA32_TSC_DEADLINE: deadline})
        if "events" in state and caps.events:
            events = from_json("struct kvm_vcpu_events *", state["events"])
            valid = (uapi.KVM_VCPUEVENT_VALID_NMI_PENDING | uapi.KVM_VCPUEVENT_VALID_SIPI_VECTOR
                     | uapi.KVM_VCPUEVENT_VALID_SHADOW | uapi.KVM_VCPUEVENT_VALID_SMM)
            events.flags = (events.flags & (valid | uapi.KVM_VCPUEVENT_VALID_TRIPLE_FAULT
                                            | uapi.KVM_VCPUEVENT_VALID_PAYLOAD)) | uapi.KVM_VCPUEVENT_VALID_SIPI_VECTOR
            vcpu.set_vcpu_events(events)
        if "debugregs" in state and caps.debugregs:
            debugregs = from_json("struct kvm_debugregs *", state["debugregs"])
            debugregs.flags = 0
            vcpu.set_debugregs(debugregs)
    except (KeyError, TypeError, ValueError) as error:
        raise KvmStateError(f"vCPU state: malformed ({type(error).__name__}: {error})") from None
    return warnings


def _set_msrs(vcpu, msrs: dict[int, int]) -> None:
    try:
        vcpu.set_msrs(msrs)
    except KvmError as error:
        # set_msrs names the first MSR refused; say it is the snapshot's
        raise KvmStateError(f"this KVM refuses a saved MSR: {error}") from None


# --- the in-kernel interrupt controllers and PIT -------------------------------------------

def save_vm(vm) -> dict:
    """The PICs, the IOAPIC and the PIT (the clock is the machine's)."""
    return {
        "version": VM_STATE_VERSION,
        "irqchip": {name: _blob(vm.get_irqchip(chip)) for name, chip in IRQCHIPS.items()},
        "pit": to_json(vm.get_pit2()),
    }


def restore_vm(vm, state: dict) -> None:
    version = state.get("version")
    if version != VM_STATE_VERSION:
        raise KvmStateError(f"VM state version {version!r} is not one this pyvmm reads ({VM_STATE_VERSION})")
    try:
        for name, chip in IRQCHIPS.items():
            vm.set_irqchip(chip, _unblob(state["irqchip"][name], name))
        vm.set_pit2(from_json("struct kvm_pit_state2 *", state["pit"]))
    except (KeyError, TypeError, ValueError) as error:
        raise KvmStateError(f"VM state: malformed ({type(error).__name__}: {error})") from None


# --- KVM's Xen attributes ----------------------------------------------------------------

def xen_save_vm(vm, capabilities: int, gpa_of_host_address) -> dict:
    """KVM's VM-wide Xen attributes this KVM has (`capabilities`:
    KVM_CAP_XEN_HVM's bits). A shared_info page given to KVM by host
    address is saved by its guest address (`gpa_of_host_address`), which a
    restore maps back to its own. The in-kernel event-channel ports are the
    event channels' to register again; KVM cannot be asked for them."""
    state: dict = {"version": XEN_STATE_VERSION}
    state["long_mode"] = vm.xen_hvm_get_attr(uapi.KVM_XEN_ATTR_TYPE_LONG_MODE).u.long_mode
    gfn = vm.xen_hvm_get_attr(uapi.KVM_XEN_ATTR_TYPE_SHARED_INFO).u.shared_info.gfn
    state["shared_info_gfn"] = None if gfn == _INVALID else gfn
    if capabilities & uapi.KVM_XEN_HVM_CONFIG_SHARED_INFO_HVA:
        hva = vm.xen_hvm_get_attr(uapi.KVM_XEN_ATTR_TYPE_SHARED_INFO_HVA).u.shared_info.hva
        state["shared_info_hva_gpa"] = _gpa_of(hva, gpa_of_host_address, "shared_info")
    state["upcall_vector"] = vm.xen_hvm_get_attr(uapi.KVM_XEN_ATTR_TYPE_UPCALL_VECTOR).u.vector
    if capabilities & uapi.KVM_XEN_HVM_CONFIG_EVTCHN_SEND:
        state["xen_version"] = vm.xen_hvm_get_attr(uapi.KVM_XEN_ATTR_TYPE_XEN_VERSION).u.xen_version
    if capabilities & uapi.KVM_XEN_HVM_CONFIG_RUNSTATE_UPDATE_FLAG:
        state["runstate_update_flag"] = vm.xen_hvm_get_attr(
            uapi.KVM_XEN_ATTR_TYPE_RUNSTATE_UPDATE_FLAG).u.runstate_update_flag
    return state


def xen_restore_vm(vm, state: dict, capabilities: int, host_address) -> None:
    """After KVM_SET_CLOCK (KVM writes the wallclock into shared_info when
    it is set) and before any vCPU's Xen attributes."""
    version = state.get("version")
    if version != XEN_STATE_VERSION:
        raise KvmStateError(f"Xen state version {version!r} is not one this pyvmm reads ({XEN_STATE_VERSION})")
    set_attr = vm.xen_hvm_set_attr
    set_attr({"type": uapi.KVM_XEN_ATTR_TYPE_LONG_MODE, "u": {"long_mode": state["long_mode"]}})
    if "xen_version" in state and capabilities & uapi.KVM_XEN_HVM_CONFIG_EVTCHN_SEND:
        set_attr({"type": uapi.KVM_XEN_ATTR_TYPE_XEN_VERSION, "u": {"xen_version": state["xen_version"]}})
    if "runstate_update_flag" in state and capabilities & uapi.KVM_XEN_HVM_CONFIG_RUNSTATE_UPDATE_FLAG:
        set_attr({"type": uapi.KVM_XEN_ATTR_TYPE_RUNSTATE_UPDATE_FLAG,
                  "u": {"runstate_update_flag": state["runstate_update_flag"]}})
    hva_gpa = state.get("shared_info_hva_gpa")
    if hva_gpa is not None:
        _need(capabilities, uapi.KVM_XEN_HVM_CONFIG_SHARED_INFO_HVA, "SHARED_INFO_HVA")
        set_attr({"type": uapi.KVM_XEN_ATTR_TYPE_SHARED_INFO_HVA,
                  "u": {"shared_info": {"hva": host_address(hva_gpa)}}})
    elif state.get("shared_info_gfn") is not None:
        set_attr({"type": uapi.KVM_XEN_ATTR_TYPE_SHARED_INFO, "u": {"shared_info": {"gfn": state["shared_info_gfn"]}}})
    set_attr({"type": uapi.KVM_XEN_ATTR_TYPE_UPCALL_VECTOR, "u": {"vector": state["upcall_vector"]}})


def xen_save_vcpu(vcpu, capabilities: int, gpa_of_host_address, clock: int | None = None) -> dict:
    """A vCPU's Xen attributes (its thread, outside KVM_RUN). `clock`: the
    guest clock the snapshot holds (the pause froze it; KVM's own went on,
    and may have dated a runstate change later): the runstate is brought
    back to it, as KVM takes a runstate only if it does not start in the
    future and its times add up to its entry time."""
    state: dict = {"version": XEN_STATE_VERSION}
    get = vcpu.xen_vcpu_get_attr
    for key, attr in (("vcpu_info", uapi.KVM_XEN_VCPU_ATTR_TYPE_VCPU_INFO),
                      ("time_info", uapi.KVM_XEN_VCPU_ATTR_TYPE_VCPU_TIME_INFO),
                      ("runstate_addr", uapi.KVM_XEN_VCPU_ATTR_TYPE_RUNSTATE_ADDR)):
        if key == "runstate_addr" and not capabilities & uapi.KVM_XEN_HVM_CONFIG_RUNSTATE:
            continue
        gpa = _optional(lambda: get(attr).u.gpa)
        state[key] = None if gpa in (None, _INVALID) else gpa
    if capabilities & uapi.KVM_XEN_HVM_CONFIG_SHARED_INFO_HVA:
        hva = _optional(lambda: get(uapi.KVM_XEN_VCPU_ATTR_TYPE_VCPU_INFO_HVA).u.hva)
        state["vcpu_info_hva_gpa"] = _gpa_of(hva or 0, gpa_of_host_address, "vcpu_info")
    if capabilities & uapi.KVM_XEN_HVM_CONFIG_RUNSTATE and state.get("runstate_addr") is not None:
        runstate = get(uapi.KVM_XEN_VCPU_ATTR_TYPE_RUNSTATE_DATA).u.runstate
        state["runstate"] = clamp_runstate({name: getattr(runstate, name) for name in (
            "state", "state_entry_time", "time_running", "time_runnable", "time_blocked", "time_offline")}, clock)
    if capabilities & uapi.KVM_XEN_HVM_CONFIG_EVTCHN_SEND:
        state["vcpu_id"] = get(uapi.KVM_XEN_VCPU_ATTR_TYPE_VCPU_ID).u.vcpu_id
        timer = get(uapi.KVM_XEN_VCPU_ATTR_TYPE_TIMER).u.timer
        state["timer"] = {"port": timer.port, "priority": timer.priority, "expires_ns": timer.expires_ns}
        state["upcall_vector"] = get(uapi.KVM_XEN_VCPU_ATTR_TYPE_UPCALL_VECTOR).u.vector
    return state


def xen_restore_vcpu(vcpu, state: dict, capabilities: int, host_address) -> None:
    """After xen_restore_vm and KVM_SET_CLOCK: a timer's expiry and the
    runstate's entry time are in the guest's clock."""
    version = state.get("version")
    if version != XEN_STATE_VERSION:
        raise KvmStateError(f"Xen vCPU state version {version!r} is not one this pyvmm reads ({XEN_STATE_VERSION})")
    set_attr = vcpu.xen_vcpu_set_attr
    if "vcpu_id" in state:
        _need(capabilities, uapi.KVM_XEN_HVM_CONFIG_EVTCHN_SEND, "EVTCHN_SEND (vCPU attributes)")
        set_attr({"type": uapi.KVM_XEN_VCPU_ATTR_TYPE_VCPU_ID, "u": {"vcpu_id": state["vcpu_id"]}})
    if state.get("vcpu_info_hva_gpa") is not None:
        _need(capabilities, uapi.KVM_XEN_HVM_CONFIG_SHARED_INFO_HVA, "SHARED_INFO_HVA")
        set_attr({"type": uapi.KVM_XEN_VCPU_ATTR_TYPE_VCPU_INFO_HVA,
                  "u": {"hva": host_address(state["vcpu_info_hva_gpa"])}})
    elif state.get("vcpu_info") is not None:
        set_attr({"type": uapi.KVM_XEN_VCPU_ATTR_TYPE_VCPU_INFO, "u": {"gpa": state["vcpu_info"]}})
    if state.get("time_info") is not None:
        set_attr({"type": uapi.KVM_XEN_VCPU_ATTR_TYPE_VCPU_TIME_INFO, "u": {"gpa": state["time_info"]}})
    if state.get("runstate_addr") is not None:
        _need(capabilities, uapi.KVM_XEN_HVM_CONFIG_RUNSTATE, "RUNSTATE")
        set_attr({"type": uapi.KVM_XEN_VCPU_ATTR_TYPE_RUNSTATE_ADDR, "u": {"gpa": state["runstate_addr"]}})
        if "runstate" in state:
            set_attr({"type": uapi.KVM_XEN_VCPU_ATTR_TYPE_RUNSTATE_DATA, "u": {"runstate": state["runstate"]}})
    if "upcall_vector" in state:
        set_attr({"type": uapi.KVM_XEN_VCPU_ATTR_TYPE_UPCALL_VECTOR, "u": {"vector": state["upcall_vector"]}})
    if "timer" in state:
        set_attr({"type": uapi.KVM_XEN_VCPU_ATTR_TYPE_TIMER, "u": {"timer": state["timer"]}})


RUNSTATE_TIMES = ("time_running", "time_runnable", "time_blocked", "time_offline")  # by RUNSTATE_* number


def clamp_runstate(runstate: dict, clock: int | None) -> dict:
    """`runstate` entered no later than `clock`: time past it is taken off
    the current state's time (else off the others), so the times still add
    up to the entry time."""
    excess = runstate["state_entry_time"] - clock if clock is not None else 0
    if excess <= 0:
        return runstate
    runstate = dict(runstate, state_entry_time=clock)
    current = RUNSTATE_TIMES[runstate["state"]] if runstate["state"] < len(RUNSTATE_TIMES) else RUNSTATE_TIMES[0]
    for name in (current, *RUNSTATE_TIMES):
        taken = min(excess, runstate[name])
        runstate[name] -= taken
        excess -= taken
    return runstate


_INVALID = (1 << 64) - 1  # KVM_XEN_INVALID_GFN / INVALID_GPA


def _optional(read):
    """An attribute KVM may not have set (ENOENT/EINVAL on some kernels): None."""
    try:
        return read()
    except KvmError as error:
        if error.errno in (errno.ENOENT, errno.EINVAL, errno.ENOTCONN):
            return None
        raise


def _gpa_of(hva: int, gpa_of_host_address, what: str) -> int | None:
    if not hva:
        return None
    gpa = gpa_of_host_address(hva)
    if gpa is None:
        raise KvmStateError(f"KVM's {what} is at host address {hva:#x}, outside guest RAM")
    return gpa


def _need(capabilities: int, bit: int, name: str) -> None:
    if not capabilities & bit:
        raise KvmStateError(f"the snapshot uses KVM's Xen {name}, which this host's KVM lacks")
