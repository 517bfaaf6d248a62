"""What this host's KVM can do for pyvmm: `pyvmm check`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .kvm import Kvm, KvmError
from .kvm import uapi

# The Xen capabilities pyvmm cannot work without, and the ones it uses when present.
XEN_REQUIRED = {
    "INTERCEPT_HCALL": uapi.KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL,
    "SHARED_INFO": uapi.KVM_XEN_HVM_CONFIG_SHARED_INFO,
}
XEN_OPTIONAL = {
    "RUNSTATE": uapi.KVM_XEN_HVM_CONFIG_RUNSTATE,
    "EVTCHN_2LEVEL": uapi.KVM_XEN_HVM_CONFIG_EVTCHN_2LEVEL,
    "EVTCHN_SEND": uapi.KVM_XEN_HVM_CONFIG_EVTCHN_SEND,
    "RUNSTATE_UPDATE_FLAG": uapi.KVM_XEN_HVM_CONFIG_RUNSTATE_UPDATE_FLAG,
    "PVCLOCK_TSC_UNSTABLE": uapi.KVM_XEN_HVM_CONFIG_PVCLOCK_TSC_UNSTABLE,
    "SHARED_INFO_HVA": uapi.KVM_XEN_HVM_CONFIG_SHARED_INFO_HVA,
}


@dataclass
class HostReport:
    kvm_available: bool
    problem: str = ""  # why KVM cannot be used at all
    software_only: bool = False  # kvm_pvm: correct but far too slow for Linux
    xen_bits: int = 0
    notes: list[str] = field(default_factory=list)
    sandbox: bool = False  # pyvmm/sandbox.py can run here (libseccomp, its binding, user notification)
    sandbox_detail: str = ""

    @property
    def can_run_linux(self) -> bool:
        return self.kvm_available and not self.software_only

    @property
    def missing_xen(self) -> list[str]:
        return [name for name, bit in XEN_REQUIRED.items() if not self.xen_bits & bit]

    @property
    def can_run_xen(self) -> bool:
        return self.can_run_linux and not self.missing_xen

    def as_dict(self) -> dict:
        return {
            "kvm_available": self.kvm_available,
            "problem": self.problem,
            "software_only": self.software_only,
            "can_run_linux": self.can_run_linux,
            "can_run_xen": self.can_run_xen,
            "sandbox": self.sandbox,
            "sandbox_detail": self.sandbox_detail,
            "xen_capabilities": {
                name: bool(self.xen_bits & bit) for name, bit in {**XEN_REQUIRED, **XEN_OPTIONAL}.items()
            },
        }


def probe(device: str = "/dev/kvm") -> HostReport:
    from .sandbox import availability

    sandbox, sandbox_detail = availability()
    try:
        with Kvm(device) as kvm:
            xen_bits = kvm.xen_capabilities()
    except KvmError as error:
        return HostReport(kvm_available=False, problem=str(error), sandbox=sandbox, sandbox_detail=sandbox_detail)
    # kvm_pvm implements KVM in software for nested clouds; it is correct but
    # runs guest kernel code thousands of times slower than hardware.
    software_only = os.path.exists("/sys/module/kvm_pvm")
    return HostReport(kvm_available=True, software_only=software_only, xen_bits=xen_bits, sandbox=sandbox,
                      sandbox_detail=sandbox_detail)
