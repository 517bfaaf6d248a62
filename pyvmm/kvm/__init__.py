"""pyvmm's KVM layer, in three tiers:

- `uapi`: the kernel's structs (cffi), constants and ioctl numbers;
- `ioctl`: the single ioctl call site, turning errno into KvmError;
- `Kvm` (/dev/kvm), `Vm` and `Vcpu`, whose run() returns typed exits.

`memslots` keeps the table of KVM memory slots; `cpuid` builds each vCPU's
CPUID table. Nothing here knows about devices or Xen's guest ABI.
"""

from .cpuid import CpuidEntry, CpuidError, vcpu_cpuid
from .exits import (
    DebugExit,
    FailEntryExit,
    HltExit,
    InternalErrorExit,
    InterruptedExit,
    IoExit,
    MmioExit,
    MsrExit,
    ShutdownExit,
    SystemEventExit,
    UnknownExit,
    VcpuExit,
    XenHypercallExit,
)
from .ioctl import KvmError, KvmUnavailable
from .memslots import Memslot, MemslotError, MemslotTable, map_guest_memory
from .system import Kvm
from .vcpu import KICK_SIGNAL, Translation, Vcpu
from .vm import ClockData, IrqchipRoute, MsiRoute, Vm, XenEvtchnRoute, pc_irqchip_routes

__all__ = [
    "KICK_SIGNAL",
    "ClockData",
    "CpuidEntry",
    "CpuidError",
    "DebugExit",
    "FailEntryExit",
    "HltExit",
    "InternalErrorExit",
    "InterruptedExit",
    "IoExit",
    "IrqchipRoute",
    "Kvm",
    "KvmError",
    "KvmUnavailable",
    "Memslot",
    "MemslotError",
    "MemslotTable",
    "MmioExit",
    "MsiRoute",
    "MsrExit",
    "ShutdownExit",
    "SystemEventExit",
    "Translation",
    "UnknownExit",
    "Vcpu",
    "VcpuExit",
    "Vm",
    "XenEvtchnRoute",
    "XenHypercallExit",
    "map_guest_memory",
    "pc_irqchip_routes",
    "vcpu_cpuid",
]
