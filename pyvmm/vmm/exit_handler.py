"""What a vCPU does with each KVM exit: a plain, KVM-free dispatcher.

`ExitHandler.handle(exit)` returns None to keep running or a StopReason.
It is fed typed exits (pyvmm.kvm.exits) and touches only the buses and the
optional hypercall handler, so it is unit-tested with synthetic exits.
"""

from __future__ import annotations

import logging
from typing import Callable

from ..core.bus import Bus
from ..kvm import exits as kx
from ..kvm import uapi
from ..core.stop import StopReason
from ..core.trace import NULL_TRACE, Tracer
from ..vcpu_state import format_registers

log = logging.getLogger(__name__)


# AMD's SVM: KVM reinitialises the vCPU at the shutdown intercept, so what
# pyvmm reads afterwards is the CPU's power-on state, not the faulting one.
_ALREADY_RESET = (" (these are the power-on registers: KVM had already reset the vCPU, as it does on AMD"
                  " hosts, and the state at the fault is lost; a trace of KVM's kvm_exit and"
                  " kvm_inj_exception events shows the last ones)")


def _in_reset_state(registers: dict[str, int]) -> bool:
    return (registers.get("rip") == 0xFFF0 and registers.get("cs") == 0xF000
            and registers.get("cr0", 0) & 1 == 0 and registers.get("efer") == 0)


class ExitHandler:
    def __init__(self, pio: Bus, mmio: Bus, hypercall: Callable[[kx.XenHypercallExit], None] | None = None,
                 debug: Callable[[kx.DebugExit], None] | None = None, *, vcpu: int | None = None,
                 registers: Callable[[], dict[str, int]] | None = None, trace: Tracer = NULL_TRACE):
        self.pio = pio
        self._trace = trace  # the VM's
        self.mmio = mmio
        self.debug = debug  # the gdb stub's handler while one is configured
        self.vcpu = vcpu
        self.registers = registers  # reads this vCPU's registers (its own thread only)
        self._dispatch = {
            kx.IoExit: self._io,
            kx.MmioExit: self._mmio,
            # Straight to the hypercall handler: no extra frame on that path.
            kx.XenHypercallExit: hypercall if hypercall is not None else self._no_xen,
            kx.ShutdownExit: self._triple_fault,
            kx.SystemEventExit: self._system_event,
            kx.InternalErrorExit: self._internal_error,
            kx.FailEntryExit: self._fail_entry,
            kx.HltExit: self._hlt,
            kx.DebugExit: self._debug,
            kx.InterruptedExit: lambda exit: None,
        }

    def handle(self, exit) -> StopReason | None:
        handler = self._dispatch.get(type(exit))
        if handler is None:
            log.error("unhandled KVM exit %r", exit)
            return StopReason.CRASH
        return handler(exit)

    def _io(self, exit: kx.IoExit) -> None:
        size, port, data = exit.size, exit.port, exit.data
        count = exit.count
        if exit.is_write:
            # A string write (REP OUTS) goes in one call where the device takes it.
            if count == 1 or not self.pio.write_string(port, size, bytes(data[: size * count])):
                for i in range(count):
                    self.pio.write(port, size, int.from_bytes(data[i * size : (i + 1) * size], "little"))
        else:
            block = self.pio.read_string(port, size, count) if count > 1 else None
            if block is not None:  # a REP INS the device served whole (an IDE data port)
                data[: size * count] = block
            else:
                for i in range(count):
                    data[i * size : (i + 1) * size] = self.pio.read(port, size).to_bytes(size, "little")
        if self._trace.io:
            self._trace.emit("io", "pio", port=port, size=size, dir="out" if exit.is_write else "in", count=exit.count,
                       value=hex(int.from_bytes(data[:size], "little")))

    def _mmio(self, exit: kx.MmioExit) -> None:
        length, data = exit.length, exit.data
        if exit.is_write:
            self.mmio.write(exit.address, length, int.from_bytes(data[:length], "little"))
        else:
            data[:length] = self.mmio.read(exit.address, length).to_bytes(length, "little")
        if self._trace.io:
            self._trace.emit("io", "mmio", addr=hex(exit.address), size=length, dir="write" if exit.is_write else "read",
                       value=hex(int.from_bytes(data[:length], "little")))

    @staticmethod
    def _no_xen(exit: kx.XenHypercallExit) -> None:
        exit.result = -38  # -ENOSYS: no Xen emulation in this VM

    def _debug(self, exit: kx.DebugExit) -> StopReason | None:
        if self.debug is None:  # only a debugger asks KVM for these
            log.error("debug exit with no debugger: %r", exit)
            return StopReason.CRASH
        self.debug(exit)
        return None

    def _triple_fault(self, exit) -> StopReason:
        # A PC resets on a triple fault (runner.py reboots the guest unless
        # --no-reboot), but it is worth a warning: guests reboot on purpose
        # through ACPI or the keyboard controller first, so a triple fault is
        # nearly always a crash in early boot or a broken exception path.
        registers = self._read_registers()
        log.warning("vCPU %s triple-faulted (an unexpected CPU reset): %s%s", self._vcpu_name(),
                    format_registers(registers) if registers else "registers unavailable",
                    _ALREADY_RESET if _in_reset_state(registers) else "")
        if self._trace.stop:
            self._trace.emit("stop", "triple-fault", **{name: hex(value) for name, value in registers.items()})
        return StopReason.TRIPLE_FAULT

    def _read_registers(self) -> dict[str, int]:
        if self.registers is None:
            return {}
        try:
            return self.registers()
        except Exception as error:  # the report must not turn the stop into a VMM failure
            log.warning("cannot read the registers of vCPU %s: %s", self._vcpu_name(), error)
            return {}

    def _vcpu_name(self) -> str:
        return "?" if self.vcpu is None else str(self.vcpu)

    def _system_event(self, exit: kx.SystemEventExit) -> StopReason:
        return {
            uapi.KVM_SYSTEM_EVENT_SHUTDOWN: StopReason.POWEROFF,
            uapi.KVM_SYSTEM_EVENT_RESET: StopReason.REBOOT,
        }.get(exit.type, StopReason.CRASH)

    def _internal_error(self, exit) -> StopReason:
        log.error("KVM internal error: %r", exit)
        return StopReason.CRASH

    def _fail_entry(self, exit) -> StopReason:
        log.error("KVM could not enter the guest: %r", exit)
        return StopReason.CRASH

    def _hlt(self, exit) -> StopReason | None:
        # With the in-kernel LAPIC a HLT never exits; without it, a vCPU that
        # halts with interrupts off is dead.
        log.error("vCPU halted outside the in-kernel LAPIC")
        return StopReason.CRASH
