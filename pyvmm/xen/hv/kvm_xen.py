"""KVM's Xen support, as the Xen domain uses it.

Probing and enabling KVM_XEN_HVM_CONFIG, the VM-wide and per-vCPU Xen
attributes, and `KernelEvtchn`, the in-kernel event-channel fast paths
(KVM_XEN_HVM_EVTCHN_SEND and KVM_XEN_ATTR_TYPE_EVTCHN). Everything here is a
thin typed layer over ioctls; policy lives in domain.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyvmm.kvm import uapi
from ..abi import EVTCHNSTAT_interdomain, EVTCHNSTAT_ipi


HYPERCALL_MSR = 0x40000000  # where Linux and Xen's own guests look for it
EVTCHN_PRIORITY_2LEVEL = uapi.KVM_IRQ_ROUTING_XEN_EVTCHN_PRIO_2LEVEL


class XenUnavailable(Exception):
    """The host's KVM cannot emulate Xen for a guest."""


REQUIRED = {
    "INTERCEPT_HCALL": uapi.KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL,
    "SHARED_INFO": uapi.KVM_XEN_HVM_CONFIG_SHARED_INFO,
}


@dataclass(frozen=True)
class XenFeatures:
    """Which of KVM's optional Xen features this VM uses."""

    bits: int
    accelerate: bool  # the operator may turn the in-kernel fast paths off

    @property
    def evtchn_send(self) -> bool:
        return self.accelerate and bool(self.bits & uapi.KVM_XEN_HVM_CONFIG_EVTCHN_SEND)

    @property
    def vcpu_attrs(self) -> bool:
        """VCPU_ID / TIMER / UPCALL_VECTOR vCPU attributes (same capability bit)."""
        return bool(self.bits & uapi.KVM_XEN_HVM_CONFIG_EVTCHN_SEND)

    @property
    def runstate(self) -> bool:
        return bool(self.bits & uapi.KVM_XEN_HVM_CONFIG_RUNSTATE)

    @property
    def runstate_update_flag(self) -> bool:
        return self.runstate and bool(self.bits & uapi.KVM_XEN_HVM_CONFIG_RUNSTATE_UPDATE_FLAG)

    @property
    def shared_info_hva(self) -> bool:
        return bool(self.bits & uapi.KVM_XEN_HVM_CONFIG_SHARED_INFO_HVA)


def require_xen(bits: int) -> None:
    missing = [name for name, bit in REQUIRED.items() if not bits & bit]
    if missing:
        have = "no Xen support at all" if not bits else f"Xen capabilities {bits:#x}"
        raise XenUnavailable(
            f"this host's KVM lacks KVM_XEN_HVM_CONFIG_{' and '.join(missing)} ({have}); "
            "Xen guests need Linux >= 5.12 built with CONFIG_KVM_XEN. Run pyvmm inside "
            "scripts/testbed, or boot with --no-xen"
        )


def enable(vm, features: XenFeatures, evtchn_send: bool = True) -> None:
    """Also called again at run time: `evtchn_send` False (FIFO event
    channels) turns KVM's SCHEDOP_poll, which reads 2-level bits, into a
    yield; its eventfd and IPI ports and EVTCHN_SEND ioctl do not look at
    this flag."""
    flags = uapi.KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL
    if features.evtchn_send and evtchn_send:
        flags |= uapi.KVM_XEN_HVM_CONFIG_EVTCHN_SEND
    # A nonzero MSR is needed even when intercepting: KVM gates hypercall
    # interception on it. Old guests also write it to get the hypercall page.
    vm.xen_hvm_config(flags, HYPERCALL_MSR)


def set_long_mode(vm, long_mode: bool) -> None:
    vm.xen_hvm_set_attr({"type": uapi.KVM_XEN_ATTR_TYPE_LONG_MODE, "u": {"long_mode": int(long_mode)}})


def set_xen_version(vm, version: int) -> None:
    vm.xen_hvm_set_attr({"type": uapi.KVM_XEN_ATTR_TYPE_XEN_VERSION, "u": {"xen_version": version}})


def set_runstate_update_flag(vm, enabled: bool) -> None:
    vm.xen_hvm_set_attr({"type": uapi.KVM_XEN_ATTR_TYPE_RUNSTATE_UPDATE_FLAG,
                         "u": {"runstate_update_flag": int(enabled)}})


def set_shared_info(vm, features: XenFeatures, gfn: int, host_address: int) -> None:
    if features.shared_info_hva:
        vm.xen_hvm_set_attr({"type": uapi.KVM_XEN_ATTR_TYPE_SHARED_INFO_HVA, "u": {"shared_info": {"hva": host_address}}})
    else:
        vm.xen_hvm_set_attr({"type": uapi.KVM_XEN_ATTR_TYPE_SHARED_INFO, "u": {"shared_info": {"gfn": gfn}}})


def clear_shared_info(vm, features: XenFeatures) -> None:
    """KVM stops using the shared_info page (a soft reset)."""
    if features.shared_info_hva:
        vm.xen_hvm_set_attr({"type": uapi.KVM_XEN_ATTR_TYPE_SHARED_INFO_HVA, "u": {"shared_info": {"hva": 0}}})
    else:
        vm.xen_hvm_set_attr({"type": uapi.KVM_XEN_ATTR_TYPE_SHARED_INFO,
                             "u": {"shared_info": {"gfn": uapi.KVM_XEN_INVALID_GFN}}})


def set_hvm_upcall_vector(vm, vector: int) -> None:
    vm.xen_hvm_set_attr({"type": uapi.KVM_XEN_ATTR_TYPE_UPCALL_VECTOR, "u": {"vector": vector}})


def set_vcpu_attr(vcpu, attr_type: int, **union) -> None:
    vcpu.xen_vcpu_set_attr({"type": attr_type, "u": union})


class KernelEvtchn:
    """Event-channel work KVM can do without exiting to the VMM."""

    def __init__(self, vm):
        self._vm = vm

    def delivers_to(self, vcpu: int) -> bool:
        """Whether KVM_XEN_HVM_EVTCHN_SEND may raise events for `vcpu`; a
        subclass says no where the VMM must see every upcall_pending it sets."""
        return True

    def send(self, port: int, vcpu: int) -> None:
        self._vm.xen_evtchn_send(port, vcpu)

    def _evtchn_attr(self, port: int, kind: int, flags: int, deliver: dict) -> None:
        self._vm.xen_hvm_set_attr(
            {
                "type": uapi.KVM_XEN_ATTR_TYPE_EVTCHN,
                "u": {"evtchn": {"send_port": port, "type": kind, "flags": flags, "deliver": deliver}},
            }
        )

    def assign_eventfd(self, port: int, fd: int) -> None:
        self._evtchn_attr(port, EVTCHNSTAT_interdomain, 0, {"eventfd": {"port": 0, "fd": fd}})

    def assign_ipi(self, port: int, vcpu: int) -> None:
        self._evtchn_attr(port, EVTCHNSTAT_ipi, 0, {"port": {"port": port, "vcpu": vcpu, "priority": EVTCHN_PRIORITY_2LEVEL}})

    def update_vcpu(self, port: int, vcpu: int) -> None:
        self._evtchn_attr(
            port, EVTCHNSTAT_ipi, uapi.KVM_XEN_EVTCHN_UPDATE,
            {"port": {"port": port, "vcpu": vcpu, "priority": EVTCHN_PRIORITY_2LEVEL}},
        )

    def deassign(self, port: int) -> None:
        self._evtchn_attr(port, 0, uapi.KVM_XEN_EVTCHN_DEASSIGN, {"padding": [0, 0, 0, 0]})

    def reset(self) -> None:
        self._evtchn_attr(0, 0, uapi.KVM_XEN_EVTCHN_RESET, {"padding": [0, 0, 0, 0]})


def clock_ns(vm) -> int:
    """The guest's Xen system time (KVM's clock), in nanoseconds."""
    return vm.get_clock().clock



