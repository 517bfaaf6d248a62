"""Which counter of `pyvmm run --stats` a KVM exit goes to (pyvmm/core/stats.py).

`ExitCounters.slot(exit)` gives the [count, ns] list of the exit's kind
and detail in one vCPU's `VcpuStats`: port I/O and MMIO by the device
claiming the address (its name and range on the bus), hypercalls by name
and, for those that take a command, the sub-op, the rest by kind. Only the
vCPU loop's counting exit handler (machine.py, with --stats) calls it, after the exit is
handled; names are worked out once per device, hypercall and sub-op.
"""

from __future__ import annotations

from ..core.bus import Bus
from ..core.stats import VcpuStats
from ..kvm import exits as kx
from ..kvm import uapi
from ..xen import abi

_U32 = 0xFFFF_FFFF
_U64 = (1 << 64) - 1
_MAX_CACHED = 1024  # distinct hypercall (number, op) pairs remembered; a guest chooses them

_SYSTEM_EVENTS = {
    uapi.KVM_SYSTEM_EVENT_SHUTDOWN: "shutdown",
    uapi.KVM_SYSTEM_EVENT_RESET: "reset",
    uapi.KVM_SYSTEM_EVENT_CRASH: "crash",
}

# Exits counted by kind alone.
_PLAIN = {
    kx.InterruptedExit: "interrupted",
    kx.HltExit: "halt",
    kx.DebugExit: "debug",
    kx.ShutdownExit: "triple-fault",
    kx.MsrExit: "msr",
    kx.InternalErrorExit: "internal-error",
    kx.FailEntryExit: "fail-entry",
    kx.UnknownExit: "unknown",
}


class ExitCounters:
    """One vCPU's exits into its VcpuStats; that vCPU's thread only."""

    def __init__(self, stats: VcpuStats, pio: Bus, mmio: Bus):
        self.stats = stats
        self._pio = pio
        self._mmio = mmio
        # id(claim) -> (claim, slot), per bus: a Claim's own hash costs more
        # than the rest of the lookup; holding the claim keeps its id unique.
        self._io_claims: dict[int, tuple[object, list[int]]] = {}
        self._mmio_claims: dict[int, tuple[object, list[int]]] = {}
        self._hypercalls: dict[tuple[int, int], list[int]] = {}  # (number, op) -> slot
        self._by_type = {
            kx.IoExit: self._io,
            kx.MmioExit: self._mmio_exit,
            kx.XenHypercallExit: self._hypercall,
            kx.SystemEventExit: self._system_event,
        }
        for kind, name in _PLAIN.items():
            self._by_type[kind] = self._plain(stats.slot(name, ""))

    def slot(self, exit) -> list[int]:
        count = self._by_type.get(type(exit))
        return count(exit) if count is not None else self.stats.slot("unknown", type(exit).__name__)

    @staticmethod
    def _plain(slot: list[int]):
        return lambda exit: slot

    def _io(self, exit: kx.IoExit) -> list[int]:
        return self._device("io", self._io_claims, self._pio.find(exit.port, exit.size))

    def _mmio_exit(self, exit: kx.MmioExit) -> list[int]:
        return self._device("mmio", self._mmio_claims, self._mmio.find(exit.address, exit.length))

    def _device(self, kind: str, cache: dict, claim) -> list[int]:
        # The claim is looked up at each exit (a guest may move a PCI BAR)
        # and named once.
        entry = cache.get(id(claim))
        if entry is None or entry[0] is not claim:
            detail = f"{claim.name} {claim.base:#x}-{claim.end - 1:#x}" if claim is not None else "unclaimed"
            entry = cache[id(claim)] = (claim, self.stats.slot(kind, detail))
        return entry[1]

    def _hypercall(self, exit: kx.XenHypercallExit) -> list[int]:
        mask = _U64 if exit.longmode else _U32
        number = exit.input & mask
        op = exit.params[0] & _U32 if number in abi.SUBOP_NAMES else -1
        if number == abi.HYPERCALL_memory_op and op >= 0:
            op &= abi.MEMOP_CMD_MASK  # the rest is Xen's continuation index
        slot = self._hypercalls.get((number, op))
        if slot is None:
            detail = abi.hypercall_name(number) if op < 0 else f"{abi.hypercall_name(number)}:{abi.subop_name(number, op)}"
            slot = self.stats.slot("hypercall", detail)  # bounded there
            if len(self._hypercalls) < _MAX_CACHED:
                self._hypercalls[(number, op)] = slot
        return slot

    def _system_event(self, exit: kx.SystemEventExit) -> list[int]:
        return self.stats.slot("system-event", _SYSTEM_EVENTS.get(exit.type, str(exit.type)))
