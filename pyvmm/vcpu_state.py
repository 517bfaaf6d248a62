"""What a stopped or stuck vCPU looked like: registers and run state, for logs.

`read_registers` and `read_run_state` issue vCPU ioctls, so they must run on
the vCPU's own thread (Machine.run_on_vcpu) or after it has stopped running;
everything else here is plain formatting, unit-tested without KVM.
"""

from __future__ import annotations

from .kvm import uapi

RFLAGS_IF = 1 << 9

MP_STATE_NAMES = {
    uapi.KVM_MP_STATE_RUNNABLE: "runnable",
    uapi.KVM_MP_STATE_UNINITIALIZED: "uninitialized",
    uapi.KVM_MP_STATE_INIT_RECEIVED: "wait-for-sipi",
    uapi.KVM_MP_STATE_HALTED: "halted",
    4: "sipi-received",
}


def read_registers(vcpu) -> dict[str, int]:
    """The registers that tell where a CPU was and in which mode."""
    regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
    return {
        "rip": regs.rip, "rsp": regs.rsp, "rflags": regs.rflags,
        "cr0": sregs.cr0, "cr2": sregs.cr2, "cr3": sregs.cr3, "cr4": sregs.cr4, "efer": sregs.efer,
        "cs": sregs.cs.selector, "ss": sregs.ss.selector,
    }


def format_registers(registers: dict[str, int]) -> str:
    """'rip=0xffffffff81000000 rsp=... cs=0x10 ...' in a fixed order."""
    wide = ("rip", "rsp", "rflags", "cr0", "cr2", "cr3", "cr4", "efer")
    parts = [f"{name}={registers[name]:#x}" for name in wide if name in registers]
    parts += [f"{name}={registers[name]:#06x}" for name in ("cs", "ss") if name in registers]
    return " ".join(parts)


def mp_state_name(state: int) -> str:
    return MP_STATE_NAMES.get(state, f"mp-state-{state}")
