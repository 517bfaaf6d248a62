"""A short account of a VM that is not getting anywhere: where each vCPU is
and, for Xen guests, the state of the xenstore ring and its event channels.

Logged at WARNING when --timeout expires (Machine._timed_out) and returned by
the control socket's `diagnose` command. Bounded: one line per vCPU (at most
MAX_VCPU_LINES) and a few lines for Xen.
"""

from __future__ import annotations

import os
import sys
from types import FrameType

from .vcpu_state import RFLAGS_IF, mp_state_name

MAX_VCPU_LINES = 16
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_KVM_RUN_FRAMES = (("kvm/ioctl.py", "ioctl"), ("kvm/vcpu.py", "_enter"))  # Vcpu.run and Vcpu.settle
_HYPERCALL_FILES = ("xen/hv/hypercalls.py",)


def read_run_state(vcpu) -> dict[str, int]:
    """mp_state, rip and rflags: vCPU ioctls, so on its own thread or while it is stopped."""
    regs = vcpu.get_regs()
    return {"mp_state": vcpu.get_mp_state(), "rip": regs.rip, "rflags": regs.rflags}


def vmm_activity(thread_ident: int | None) -> str | None:
    """What a vCPU thread is doing in the VMM, or None while it is in KVM_RUN
    (or gone). Read from the thread's Python stack, so it costs the vCPU nothing."""
    frame = sys._current_frames().get(thread_ident) if thread_ident is not None else None
    stack = _pyvmm_frames(frame)
    if not stack:
        return None
    if _is_kvm_run(stack):
        return None
    innermost = stack[0]
    where = f"{_relative(innermost.f_code.co_filename)}:{innermost.f_lineno} in {innermost.f_code.co_name}"
    if any(_relative(f.f_code.co_filename) in _HYPERCALL_FILES for f in stack):
        return f"in a hypercall ({where})"
    return f"in the VMM ({where})"


def _pyvmm_frames(frame: FrameType | None) -> list[FrameType]:
    """The stack's frames in pyvmm's own files, innermost first."""
    frames = []
    while frame is not None:
        if os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR + os.sep):
            frames.append(frame)
        frame = frame.f_back
    return frames


def _is_kvm_run(stack: list[FrameType]) -> bool:
    top = [(_relative(f.f_code.co_filename), f.f_code.co_name) for f in stack[:2]]
    return top == list(_KVM_RUN_FRAMES)


def _relative(filename: str) -> str:
    return os.path.relpath(os.path.abspath(filename), _PACKAGE_DIR)


def vcpu_line(index: int, state: dict[str, int] | None, activity: str | None) -> str:
    """'vCPU 0: halted rip=0x... IF=1, in the guest' (state None: it did not answer)."""
    where = activity or "in the guest"
    if state is None:
        return f"vCPU {index}: did not answer, {where}"
    interrupts = 1 if state["rflags"] & RFLAGS_IF else 0
    return f"vCPU {index}: {mp_state_name(state['mp_state'])} rip={state['rip']:#x} IF={interrupts}, {where}"


def xenstore_ring_line(ring: dict) -> str:
    return ("xenstore ring: req_cons={req_cons} req_prod={req_prod} rsp_cons={rsp_cons} rsp_prod={rsp_prod}; "
            "server's req_cons={server_req_cons} rsp_prod={server_rsp_prod}; error={error}; "
            "{queued} bytes queued for the guest; {answered} requests answered").format(**ring)


def event_channel_line(name: str, port: dict | None) -> str:
    if port is None:
        return f"event channel {name}: not bound"
    flags = ", ".join(f"{key}={port.get(key)}" for key in ("pending", "masked"))
    return f"event channel {name} (port {port['port']}, {port['state']}, vCPU {port['vcpu']}): {flags}"
