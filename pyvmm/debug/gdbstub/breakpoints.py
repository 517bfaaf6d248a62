"""Breakpoints and watchpoints as KVM's guest-debug interface wants them.

Software breakpoints are int3 bytes written into guest memory (the byte
they replace is kept and put back); KVM_GUESTDBG_USE_SW_BP makes every #BP
exit to us. Hardware breakpoints and watchpoints take the four debug
address registers DR0-DR3 and their enable/type/length bits in DR7, which
KVM loads for the guest with KVM_GUESTDBG_USE_HW_BP. Pure logic: the guest
memory accessor is passed in.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

from pyvmm.kvm import uapi

INT3 = b"\xcc"

# Z/z packet types
SOFTWARE = 0
HARDWARE = 1
WRITE_WATCH = 2
READ_WATCH = 3
ACCESS_WATCH = 4

# DR7 R/W field per type (x86 cannot watch reads alone: a read watchpoint
# is an access watchpoint whose writes gdb filters out) and LEN per size.
_DR7_RW = {SOFTWARE: 0b00, HARDWARE: 0b00, WRITE_WATCH: 0b01, READ_WATCH: 0b11, ACCESS_WATCH: 0b11}
_DR7_LEN = {1: 0b00, 2: 0b01, 4: 0b11, 8: 0b10}
_DR7_FIXED = 0x0400  # bit 10 reads as one
_DR7_GE = 0x0200  # exact breakpoint matching, as debuggers set it
HW_SLOTS = 4
DR6_HIT_MASK = 0xF  # B0-B3: which of DR0-DR3 matched
DR6_BS = 1 << 14  # single step

BP_VECTOR = 3
DB_VECTOR = 1


class BreakpointError(Exception):
    """A breakpoint that cannot be set (reported to gdb as an error)."""


@dataclass(frozen=True)
class HwSlot:
    kind: int  # HARDWARE or a *_WATCH type
    address: int
    length: int


@dataclass(frozen=True)
class Stop:
    """Why the guest stopped, in gdb's terms."""

    vcpu: int
    signal: int  # 5 = SIGTRAP, 2 = SIGINT
    reason: str = ""  # "swbreak", "hwbreak", "watch", "rwatch", "awatch" or ""
    address: int = 0  # the watched address for watchpoints


@dataclass(frozen=True)
class Reinject:
    """A debug exception that belongs to the guest: give it back."""

    vector: int


class Breakpoints:
    def __init__(self, read: Callable[[int, int], bytes], write: Callable[[int, bytes], None],
                 software_in_debug_registers: bool = False):
        """`read(address, length)` and `write(address, data)` reach guest
        virtual memory; both raise on an unmapped address. With
        `software_in_debug_registers`, gdb's breakpoints (its own internal
        ones for next/finish too) take debug registers instead of int3s:
        for KVMs that cannot intercept a guest's int3, at four at a time."""
        self._read = read
        self._write = write
        self.software_in_debug_registers = software_in_debug_registers
        self._lock = threading.Lock()  # vCPU threads classify while gdb edits
        self.software: dict[int, bytes] = {}  # address -> the byte int3 replaced
        self.hardware: list[HwSlot | None] = [None] * HW_SLOTS

    # --- editing (the stub's thread, the guest stopped) ------------------------------

    def insert(self, kind: int, address: int, length: int) -> None:
        if kind == SOFTWARE and not self.software_in_debug_registers:
            if address in self.software:
                return
            original = self._read(address, 1)
            self._write(address, INT3)
            with self._lock:
                self.software[address] = original
            return
        if kind not in _DR7_RW:
            raise BreakpointError(f"breakpoint type {kind} is not supported")
        if kind in (SOFTWARE, HARDWARE):
            length = 1  # DR7 LEN must be 0 for instruction breakpoints
        elif length not in _DR7_LEN or address % length:
            raise BreakpointError(f"a watchpoint covers 1, 2, 4 or 8 aligned bytes, not {length} at {address:#x}")
        slot = HwSlot(kind, address, length)
        with self._lock:
            if slot in self.hardware:
                return
            try:
                free = self.hardware.index(None)
            except ValueError:
                raise BreakpointError("all four debug registers are in use") from None
            self.hardware[free] = slot

    def remove(self, kind: int, address: int, length: int) -> bool:
        """False when no such breakpoint was set."""
        if kind == SOFTWARE and address in self.software:
            with self._lock:
                original = self.software.pop(address)
            self._write(address, original)
            return True
        with self._lock:
            for index, slot in enumerate(self.hardware):
                if slot is not None and slot.kind == kind and slot.address == address:
                    self.hardware[index] = None
                    return True
        return False

    def remove_all(self) -> None:
        for address in list(self.software):
            try:
                self.remove(SOFTWARE, address, 1)
            except Exception:  # noqa: BLE001 - the page may be gone; drop the record anyway
                self.software.pop(address, None)
        with self._lock:
            self.hardware = [None] * HW_SLOTS

    # --- resuming -----------------------------------------------------------------

    def debug_control(self, stepping: bool, block_irq: bool) -> tuple[int, list[int]]:
        """KVM_SET_GUEST_DEBUG's control flags and debugreg[8] for one vCPU."""
        control = 0
        debugregs = [0] * 8
        with self._lock:
            if self.software:
                control |= uapi.KVM_GUESTDBG_USE_SW_BP
            if any(self.hardware):
                control |= uapi.KVM_GUESTDBG_USE_HW_BP
                dr7 = _DR7_FIXED | _DR7_GE
                for index, slot in enumerate(self.hardware):
                    if slot is None:
                        continue
                    debugregs[index] = slot.address
                    dr7 |= 0b10 << (2 * index)  # global enable
                    dr7 |= (_DR7_RW[slot.kind] | _DR7_LEN[slot.length] << 2) << (16 + 4 * index)
                debugregs[7] = dr7
        if stepping:
            control |= uapi.KVM_GUESTDBG_SINGLESTEP
            if block_irq:
                # Without it a step lands in whatever interrupt is pending.
                control |= uapi.KVM_GUESTDBG_BLOCKIRQ
        if control:
            control |= uapi.KVM_GUESTDBG_ENABLE
        return control, debugregs

    # --- a debug exit (any vCPU thread) -------------------------------------------------------

    def classify(self, vcpu: int, exception: int, pc: int, dr6: int, stepping: bool) -> Stop | Reinject | None:
        """What a debug exit means: a Stop to report, a Reinject of the guest's
        own exception, or None for a stale one to drop (the vCPU just runs on)."""
        with self._lock:
            if exception == BP_VECTOR:
                if pc in self.software:
                    return Stop(vcpu, 5, "swbreak")
                return Reinject(BP_VECTOR)  # the guest's own int3 (kprobes, text patching)
            if exception == DB_VECTOR:
                for index, slot in enumerate(self.hardware):
                    if slot is not None and dr6 & (1 << index):
                        if slot.kind in (SOFTWARE, HARDWARE):
                            return Stop(vcpu, 5, "swbreak" if slot.kind == SOFTWARE else "hwbreak")
                        name = {WRITE_WATCH: "watch", READ_WATCH: "rwatch", ACCESS_WATCH: "awatch"}[slot.kind]
                        return Stop(vcpu, 5, name, slot.address)
                if stepping:  # DR6.BS, though not every host sets it for a guest-debug step
                    return Stop(vcpu, 5)
                if dr6 & (DR6_HIT_MASK | DR6_BS):
                    return None  # a breakpoint or step of ours, removed since it fired
                return Reinject(DB_VECTOR)
        return Stop(vcpu, 5)
