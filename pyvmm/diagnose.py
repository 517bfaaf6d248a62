"""A short account of a VM that is not getting anywhere: where each vCPU is
and, for Xen guests, the state of the xenstore ring and its event channels.

Logged at WARNING when --timeout expires (Machine._timed_out) and returned by
the control socket's `diagnose` command. Bounded: one line per vCPU (at most
MAX_VCPU_LINES) and a few lines for Xen.

A single hang must be diagnosable from its one log, so a vCPU's line also
says where its stack and page tables were, the bytes at rip, and whether it
was spinning: KVM's own exit counters (kvm/stats.py, which count the exits
KVM handles itself too) against their values some ACTIVITY_SECONDS *
ACTIVITY_ROUNDS seconds earlier, which the machine samples on a slow timer.
"""

from __future__ import annotations

import os
import sys
from types import FrameType

from .core.layout import PAGE_SIZE
from .vcpu_state import RFLAGS_IF, mp_state_name

MAX_VCPU_LINES = 16
CODE_BYTES = 16  # shown at rip (fewer where its page ends)
STACK_WORDS = 4  # quadwords shown at rsp (long mode): return addresses name the callers
# Further up the stack (within rsp's page, at most this far) only the words
# in the top 2 GiB are kept, at most MAX_CALLERS: where a 64-bit kernel's
# text and modules live, so they name the call chain (an interrupt taken
# inside a lock holder shows its frames above the holder's).
CALLER_SCAN_BYTES = 1024
MAX_CALLERS = 12
KERNEL_TEXT_FLOOR = 0xFFFF_FFFF_8000_0000
EFER_LMA = 1 << 10
CR0_PG = 1 << 31
CR3_ROOT = 0x000F_FFFF_FFFF_F000  # the page-table root's frame (without PCID or PWT/PCD bits)
# The mark of a vCPU state that is not the guest's own (vcpu_line).
FOREIGN_CR3 = "its cr3 is outside the guest's RAM"
# The whole mark, said wherever such a vCPU is named (here and in the liveness probe's warning).
FOREIGN_STATE = f"{FOREIGN_CR3}: this state is not the guest's, the CPU or hypervisor below this VMM left it there"
ACTIVITY_SECONDS = 2.0  # how often the machine samples the counters a diagnosis compares
ACTIVITY_ROUNDS = 5  # samples kept: the diagnosis compares with about 10 s ago
MAX_HYPERCALL_NAMES = 8
MAX_PENDING_PORTS = 8  # pending event channels named
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_KVM_RUN_FRAMES = (("kvm/ioctl.py", "ioctl"), ("kvm/vcpu.py", "_enter"))  # Vcpu.run and Vcpu.settle
_HYPERCALL_FILES = ("xen/hv/hypercalls.py",)


def cr3_outside_ram(sregs, memory) -> bool:
    """Whether paging is on with its page-table root outside the guest's
    RAM. No guest can run like that (its next page walk reads nothing), so
    the CPU or the hypervisor below this VMM put another machine's state in
    the vCPU."""
    return bool(sregs.cr0 & CR0_PG) and not memory.contains(sregs.cr3 & CR3_ROOT, PAGE_SIZE)


def read_run_state(vcpu, memory=None) -> dict:
    """mp_state, rip, rflags, rsp, cr3 and, given the guest's memory, the
    bytes at rip ("code") and the quadwords at rsp ("stack"), each None where
    the address maps nothing readable: vCPU ioctls, so on its own thread or
    while it is stopped."""
    regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
    state = {"mp_state": vcpu.get_mp_state(), "rip": regs.rip, "rflags": regs.rflags, "rsp": regs.rsp,
             "cr3": sregs.cr3}
    try:
        state["lapic"] = lapic_text(vcpu.get_lapic())
    except Exception:  # no in-kernel LAPIC, or KVM refused: the rest still helps
        pass
    if memory is not None:
        state["cr3_outside_ram"] = cr3_outside_ram(sregs, memory)
        long_mode = bool(sregs.efer & EFER_LMA)
        # KVM_TRANSLATE takes a linear address: segment bases count outside long mode.
        code = regs.rip if long_mode else (sregs.cs.base + regs.rip) & 0xFFFF_FFFF
        stack = regs.rsp if long_mode else (sregs.ss.base + regs.rsp) & 0xFFFF_FFFF
        state["code"] = _bytes_at(vcpu, memory, code, CODE_BYTES)
        words = _bytes_at(vcpu, memory, stack, CALLER_SCAN_BYTES) if long_mode else None
        if words is None:
            state["stack"] = None
        else:
            values = [int.from_bytes(words[i : i + 8], "little") for i in range(0, len(words) - 7, 8)]
            state["stack"] = values[:STACK_WORDS]
            state["callers"] = [word for word in values[STACK_WORDS:] if word >= KERNEL_TEXT_FLOOR][:MAX_CALLERS]
    return state


def _vectors(registers: bytes, base: int) -> list[int]:
    """The vectors set in one of the LAPIC's 256-bit registers (ISR, IRR):
    eight 32-bit words, 16 bytes apart."""
    return [vector for vector in range(256)
            if registers[base + (vector // 32) * 16 + (vector % 32) // 8] >> (vector % 8) & 1]


def lapic_text(registers: bytes) -> str:
    """'LAPIC: TPR 0x0, in service 0xf3, requested none' from KVM_GET_LAPIC's
    register page: an interrupt KVM counts as delivered but whose handler
    never ended (its EOI) stays in service and holds back every vector of
    its priority class and below."""
    enabled = registers[0xF1] & 1  # SVR bit 8
    in_service, requested = (" ".join(f"{v:#x}" for v in _vectors(registers, base)) or "none"
                             for base in (0x100, 0x200))  # ISR, IRR
    return (f"LAPIC{'' if enabled else ' (software-disabled)'}: TPR {registers[0x80]:#x}, "
            f"in service {in_service}, requested {requested}")


def _bytes_at(vcpu, memory, linear: int, count: int) -> bytes | None:
    """Up to `count` bytes at `linear`, through the guest's page tables,
    within its page."""
    try:
        translation = vcpu.translate(linear)
        if not translation.valid:
            return None
        return memory.read(translation.gpa, min(count, PAGE_SIZE - (linear % PAGE_SIZE)))
    except Exception:  # not RAM, or KVM refused: a diagnosis shows what it can
        return None


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


def vcpu_line(index: int, state: dict | None, activity: str | None, counters: str | None = None) -> str:
    """'vCPU 0: halted rip=0x... IF=1, in the guest; rsp=... cr3=...; code ...;
    KVM ...' (state None: it did not answer; `counters`: counters_text())."""
    where = activity or "in the guest"
    if state is None:
        line = f"vCPU {index}: did not answer, {where}"
    else:
        interrupts = 1 if state["rflags"] & RFLAGS_IF else 0
        line = f"vCPU {index}: {mp_state_name(state['mp_state'])} rip={state['rip']:#x} IF={interrupts}, {where}"
        if "rsp" in state:
            line += f"; rsp={state['rsp']:#x} cr3={state['cr3']:#x}"
            if state.get("cr3_outside_ram"):
                line += f" ({FOREIGN_STATE})"
        if "code" in state:
            code, stack = state["code"], state.get("stack")
            line += "; code at rip: " + (code.hex(" ") if code else "unreadable")
            if stack:
                line += "; stack: " + " ".join(f"{word:#x}" for word in stack)
            if state.get("callers"):
                line += "; kernel-text-like words above: " + " ".join(f"{word:#x}" for word in state["callers"])
        if state.get("lapic"):
            line += "; " + state["lapic"]
        if state.get("xen"):
            line += "; " + state["xen"]
    return f"{line}; {counters}" if counters else line


def counters_text(now: dict[str, int], before: dict[str, int] | None, seconds: float | None) -> str:
    """'KVM exits 1234 (+56 in the last 10 s: io 3, irq 50)' from a vCPU's
    KVM counters now and `seconds` earlier, naming the counters that grew
    (before None: totals only)."""
    if not now:
        return "KVM counters unavailable"
    total = now.get("exits")
    text = f"KVM exits {total}" if total is not None else "KVM"
    if before is None or seconds is None:
        return text + " (no earlier sample)"
    grown = {name: now[name] - before.get(name, 0) for name in now if name != "exits"}
    parts = ", ".join(f"{_short(name)} {count}" for name, count in grown.items() if count)
    if total is None:
        return f"{text} in the last {seconds:.0f} s: {parts or 'nothing'}"
    growth = total - before.get("exits", 0)
    return f"{text} (+{growth} in the last {seconds:.0f} s" + (f": {parts})" if parts else ")")


def _short(name: str) -> str:
    return name.removesuffix("_exits").replace("_", "-")


def hypercalls_line(now: dict[str, int], before: dict[str, int] | None, seconds: float | None) -> str:
    """The hypercalls that reached pyvmm (KVM answers the rest itself), in
    the last `seconds` when there is an earlier sample, most frequent first."""
    total = sum(now.values())
    if before is None or seconds is None:
        recent, span = now, "so far"
    else:
        recent = {name: count - before.get(name, 0) for name, count in now.items() if count > before.get(name, 0)}
        span = f"in the last {seconds:.0f} s"
    ranked = sorted(recent.items(), key=lambda item: (-item[1], item[0]))
    shown = ", ".join(f"{name} {count}" for name, count in ranked[:MAX_HYPERCALL_NAMES]) or "none"
    if len(ranked) > MAX_HYPERCALL_NAMES:
        shown += f", {len(ranked) - MAX_HYPERCALL_NAMES} more"
    return f"hypercalls to pyvmm {span}: {shown} ({total} in all)"


def timer_text(due: float | None, where: str) -> str:
    """'timer due in 3.2 ms (where)', 'timer overdue by 2.0 s (...)' or 'no timer (...)'."""
    if due is None:
        return f"no timer ({where})"
    if due >= 0:
        return f"timer due in {_seconds(due)} ({where})"
    return f"timer overdue by {_seconds(-due)} ({where})"


def _seconds(value: float) -> str:
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.1f} s"


def console_ring_line(ring: dict, written: int, idle: float | None) -> str:
    """The PV console's indices, what pyvmm took from the ring and wrote out,
    and how long ago it last wrote (None: never)."""
    last = "never" if idle is None else f"{idle:.0f} s ago"
    return ("console ring: out_cons={out_cons} out_prod={out_prod} in_cons={in_cons} in_prod={in_prod} "
            "connection={connection}; {taken} bytes taken from it").format(**ring) + (
            f"; {written} bytes written to the console output, the last {last}")


def xenstore_ring_line(ring: dict) -> str:
    return ("xenstore ring: req_cons={req_cons} req_prod={req_prod} rsp_cons={rsp_cons} rsp_prod={rsp_prod}; "
            "server's req_cons={server_req_cons} rsp_prod={server_rsp_prod}; error={error}; "
            "{queued} bytes queued for the guest; {answered} requests answered").format(**ring)


def event_channel_line(name: str, port: dict | None) -> str:
    if port is None:
        return f"event channel {name}: not bound"
    flags = ", ".join(f"{key}={port.get(key)}" for key in ("pending", "masked"))
    return f"event channel {name} (port {port['port']}, {port['state']}, vCPU {port['vcpu']}): {flags}"


def pending_ports_line(ports) -> str:
    """The event channels raised: an unmasked one is an event the guest has
    yet to take (one left so for seconds was lost on its way); a masked one
    is what a vCPU in SCHEDOP_poll may be waiting for (Linux's spinlock
    kicker IPIs stay masked)."""
    raised = [port for port in ports if port.get("pending")]
    named = ", ".join(f"{port['port']} ({port['state']}, vCPU {port['vcpu']}{', masked' if port.get('masked') else ''})"
                      for port in raised[:MAX_PENDING_PORTS])
    more = f" and {len(raised) - MAX_PENDING_PORTS} more" if len(raised) > MAX_PENDING_PORTS else ""
    return f"event channels pending: {named or 'none'}{more}"
