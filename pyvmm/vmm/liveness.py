"""Noticing a guest that can never run again: every vCPU halted with interrupts off.

A guest that stops its CPUs with `cli; hlt` (Linux's `halt -f` with no
power-off method, or a kernel that parks every CPU after a fatal error)
would otherwise sit there until --timeout. With the in-kernel LAPIC a HLT
never leaves KVM_RUN, so pyvmm has to ask.

Design: once a second the event thread posts a probe to every vCPU thread
(Machine.post_to_vcpu, which kicks it out of KVM_RUN) and reads the previous
round's answers; it never waits for a vCPU. A probe costs one
KVM_GET_MP_STATE; only a halted vCPU also costs KVM_GET_REGS, and only one
halted with IF=0 also costs KVM_GET_LAPIC. The guest is declared dead when
two consecutive rounds find every vCPU stuck at the same instruction:

- halted with RFLAGS.IF clear and no NMI source armed in its LAPIC, or
- an application processor still waiting for INIT/SIPI (only another,
  running, CPU could start it),

and at least one vCPU halted. A vCPU pyvmm halted for SCHEDOP_poll or
SCHEDOP_block is not stuck: an event channel wakes it. Only an NMI, SMI or INIT could wake such a
CPU. pyvmm never injects NMIs or SMIs, and every CPU that could send an
INIT or NMI IPI is itself stuck; the LAPIC's own NMI sources are LINT0 (the
PIT-driven NMI watchdog) and the performance counter (a perf NMI watchdog),
so a vCPU with either unmasked in NMI mode counts as able to wake. Not
considered: device interrupts routed as NMIs through the IOAPIC or an MSI,
which no guest pyvmm runs sets up. A vCPU that does not answer within a
round (busy in a VMM handler) is alive. The check is off under --gdb: a
debugger may hold vCPUs stopped on purpose.

The same probe also reads each vCPU's control registers (KVM_GET_SREGS) and
notices a vCPU whose page-table root lies outside the guest's RAM with paging
on (diagnose.cr3_outside_ram). No guest runs like that; it is state the CPU
or the hypervisor below left in the vCPU (seen in a nested, emulated KVM:
the L1 hypervisor's own cr3 and rip in an L2 vCPU, which then spins for good).
Three rounds in a row with the same root stop the guest as crashed at once,
instead of at --timeout, saying whose state it is.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..diagnose import FOREIGN_STATE, cr3_outside_ram
from ..kvm import uapi
from ..vcpu_state import RFLAGS_IF

CHECK_SECONDS = 1.0
ROUNDS_TO_DECLARE_DEAD = 2
ROUNDS_TO_DECLARE_FOREIGN = 3

# LAPIC LVT registers that may deliver an NMI on their own.
LVT_LINT0 = 0x350
LVT_PERFORMANCE_COUNTER = 0x340
LVT_MASKED = 1 << 16
LVT_DELIVERY_MODE_MASK = 0x7 << 8
LVT_DELIVERY_NMI = 0x4 << 8

WAITING_FOR_SIPI = (uapi.KVM_MP_STATE_UNINITIALIZED, uapi.KVM_MP_STATE_INIT_RECEIVED)


@dataclass(frozen=True)
class VcpuSample:
    mp_state: int
    rip: int = 0
    interrupts_enabled: bool = True
    nmi_armed: bool = False
    event_wakes: bool = False  # halted in SCHEDOP_poll/block: an event channel can wake it
    foreign_cr3: int | None = None  # cr3, when it is a page-table root outside the guest's RAM

    @property
    def halted(self) -> bool:
        return self.mp_state == uapi.KVM_MP_STATE_HALTED

    @property
    def stuck(self) -> bool:
        """Nothing but another CPU could ever make this vCPU run again."""
        if self.mp_state in WAITING_FOR_SIPI:
            return True
        return self.halted and not self.interrupts_enabled and not self.nmi_armed and not self.event_wakes


def lapic_can_raise_nmi(lapic: bytes) -> bool:
    """Whether LINT0 or the performance counter is unmasked in NMI mode."""
    for offset in (LVT_LINT0, LVT_PERFORMANCE_COUNTER):
        entry = int.from_bytes(lapic[offset:offset + 4], "little")
        if not entry & LVT_MASKED and entry & LVT_DELIVERY_MODE_MASK == LVT_DELIVERY_NMI:
            return True
    return False


def sample_vcpu(vcpu, memory=None) -> VcpuSample:
    """Read what decides liveness, on the vCPU's own thread; cheap unless
    halted or, given the guest's `memory`, holding state not the guest's."""
    state = vcpu.get_mp_state()
    foreign = None
    if memory is not None:
        sregs = vcpu.get_sregs()
        if cr3_outside_ram(sregs, memory):
            foreign = sregs.cr3
    if state != uapi.KVM_MP_STATE_HALTED:
        return VcpuSample(state, vcpu.get_regs().rip if foreign is not None else 0, foreign_cr3=foreign)
    regs = vcpu.get_regs()
    enabled = bool(regs.rflags & RFLAGS_IF)
    armed = False if enabled else lapic_can_raise_nmi(vcpu.get_lapic())
    return VcpuSample(state, regs.rip, enabled, armed, foreign_cr3=foreign)


class RepeatedRounds:
    """Whether rounds in a row, `rounds` of them, saw the same thing; a
    round that saw nothing (None) starts the count again."""

    def __init__(self, rounds: int):
        self._rounds = rounds
        self._seen = 0
        self._previous = None

    def reset(self) -> None:
        self._seen = 0
        self._previous = None

    def again(self, seen) -> bool:
        if seen is None:
            self.reset()
            return False
        self._seen = self._seen + 1 if seen == self._previous else 1
        self._previous = seen
        return self._seen >= self._rounds


class DeadGuestDetector(RepeatedRounds):
    """Fed one round of samples at a time; says when the guest is dead."""

    def __init__(self, rounds: int = ROUNDS_TO_DECLARE_DEAD):
        super().__init__(rounds)

    def observe(self, samples: list[VcpuSample | None]) -> bool:
        """`samples`: one per vCPU, None where a vCPU did not answer."""
        dead = samples and all(s is not None and s.stuck for s in samples) and any(s.halted for s in samples)
        # The same instructions again: not a CPU passing through a halt.
        return self.again(list(samples) if dead else None)


class ForeignStateDetector(RepeatedRounds):
    """Fed one round of samples at a time; says which vCPUs have held the
    same page-table root outside the guest's RAM for `rounds` rounds."""

    def __init__(self, rounds: int = ROUNDS_TO_DECLARE_FOREIGN):
        super().__init__(rounds)

    def observe(self, samples: list[VcpuSample | None]) -> list[tuple[int, VcpuSample]]:
        """`samples`: one per vCPU, None where a vCPU did not answer (a
        foreign vCPU that does not answer breaks the run of rounds)."""
        foreign = [(index, s) for index, s in enumerate(samples) if s is not None and s.foreign_cr3 is not None]
        roots = [(index, s.foreign_cr3) for index, s in foreign]
        return foreign if self.again(roots or None) else []


def describe_foreign(foreign: list[tuple[int, VcpuSample]]) -> str:
    """'vCPU 0 at rip=0x... with cr3=0x... (its cr3 is outside the guest's RAM: ...)'."""
    where = ", ".join(f"vCPU {index} at rip={sample.rip:#x} with cr3={sample.foreign_cr3:#x}"
                      for index, sample in foreign)
    return f"{where} ({FOREIGN_STATE})"


def describe(samples: list[VcpuSample]) -> str:
    """'vCPU 0 halted at rip=0x1234 with interrupts off, vCPU 1 waiting for INIT/SIPI'."""
    parts = []
    for index, sample in enumerate(samples):
        if sample.halted:
            parts.append(f"vCPU {index} halted at rip={sample.rip:#x} with interrupts off")
        else:
            parts.append(f"vCPU {index} waiting for INIT/SIPI")
    return ", ".join(parts)
