"""Run statistics (`pyvmm run --stats`): what the guest made the VMM do, and at what cost.

Nothing here runs unless --stats is given: the parts that count are
swapped in when a VM is set up (timed wrappers around each vCPU's KVM_RUN
and exit handler, counting wrappers around the xenstore's request
handlers and the hypercall sub-ops that send event channels), so a run
without it executes exactly the code it did before.

Ownership, with no lock on any counting path:

- each `VcpuStats` is written only by its vCPU's thread while the VM
  runs; the main thread makes it before the thread starts and reads it
  after joining the thread (a reboot's next vCPU thread of the same index
  continues it, so the counts are the whole run's);
- `RunStats.event` is written only by the event thread (the xenstore
  serves every request there);
- `RunStats.report()` runs on the main thread once the last boot's
  threads are joined.

A counter is keyed by (kind, detail) and holds [count, ns], ns being the
VMM's time in the handler (time.perf_counter_ns around it). Kinds: the KVM
exits (`io`, `mmio`, `hypercall`, `interrupted`, `system-event`, ...),
`xenstore` (guest requests by type) and `evtchn-send` (event-channel
sends that reached userspace, by what the port is bound to).
"""

from __future__ import annotations

import json
import os
import time

# Kinds whose count ends up in one of a vCPU's "exits" (the others are
# work done inside an exit already counted, or on another thread).
EXIT_KINDS = ("io", "mmio", "hypercall", "interrupted", "system-event", "triple-fault", "halt", "debug",
              "msr", "internal-error", "fail-entry", "unknown")
# A guest chooses the details (ports, addresses, hypercall numbers): past
# this many distinct ones, the rest of a kind share one counter.
MAX_DETAILS = 256
OTHER = "other"


class Counters:
    """(kind, detail) -> [count, ns], owned by one thread."""

    __slots__ = ("counters",)

    def __init__(self) -> None:
        self.counters: dict[tuple[str, str], list[int]] = {}

    def add(self, kind: str, detail: str, ns: int, count: int = 1) -> None:
        entry = self.counters.get((kind, detail))
        if entry is None:
            entry = self.slot(kind, detail)
        entry[0] += count
        entry[1] += ns

    def slot(self, kind: str, detail: str) -> list[int]:
        """The [count, ns] list of (kind, detail), made on first use; a
        counting path may keep it and add to it directly."""
        key = (kind, detail)
        entry = self.counters.get(key)
        if entry is None:
            if len(self.counters) >= MAX_DETAILS and detail != OTHER:
                return self.slot(kind, OTHER)
            entry = self.counters[key] = [0, 0]
        return entry

    def merge_into(self, total: dict[tuple[str, str], list[int]]) -> None:
        for key, (count, ns) in self.counters.items():
            entry = total.setdefault(key, [0, 0])
            entry[0] += count
            entry[1] += ns


class VcpuStats(Counters):
    """One vCPU's counters and its time inside and outside KVM_RUN."""

    __slots__ = ("index", "run_ns", "vmm_ns", "runs")

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index
        self.run_ns = 0  # inside KVM_RUN (the guest, and KVM's own exit handling)
        self.vmm_ns = 0  # between two KVM_RUNs: handling exits, queued work, waiting while paused
        self.runs = 0  # KVM_RUN calls

    def exits(self) -> int:
        return sum(count for (kind, _), (count, _) in self.counters.items() if kind in EXIT_KINDS)


class RunStats:
    """One run's statistics: every boot's vCPUs, the event thread, start-up."""

    def __init__(self, vcpus: int = 0) -> None:
        self.vcpus: list[VcpuStats] = [VcpuStats(index) for index in range(vcpus)]
        self.event = Counters()  # the event thread's
        self.process_start_ns: int | None = process_start_ns()  # CLOCK_MONOTONIC, see below
        self.first_kvm_run_ns: int | None = None  # CLOCK_MONOTONIC; the first vCPU thread to run sets it

    def vcpu(self, index: int) -> VcpuStats:
        """vCPU `index`'s counters (main thread, before its thread starts)."""
        while len(self.vcpus) <= index:
            self.vcpus.append(VcpuStats(len(self.vcpus)))
        return self.vcpus[index]

    def note_first_run(self) -> None:
        # Only vCPU 0 of the first boot calls this (racing threads would
        # need a lock), so later boots leave it alone.
        if self.first_kvm_run_ns is None:
            self.first_kvm_run_ns = time.monotonic_ns()

    def startup_ns(self) -> int | None:
        if self.process_start_ns is None or self.first_kvm_run_ns is None:
            return None
        return self.first_kvm_run_ns - self.process_start_ns

    def report(self) -> dict:
        """Everything, merged: what --stats-json writes and format_report() prints."""
        total: dict[tuple[str, str], list[int]] = {}
        for vcpu in self.vcpus:
            vcpu.merge_into(total)
        self.event.merge_into(total)
        return {
            "startup_ns": self.startup_ns(),
            "vcpus": [{"vcpu": v.index, "kvm_run_ns": v.run_ns, "vmm_ns": v.vmm_ns, "kvm_runs": v.runs,
                       "exits": v.exits()} for v in self.vcpus],
            "counters": [{"kind": kind, "detail": detail, "count": count, "ns": ns}
                         for (kind, detail), (count, ns) in sorted(total.items(), key=_order) if count],
        }


def _order(item) -> tuple:
    (kind, detail), (count, ns) = item
    rank = EXIT_KINDS.index(kind) if kind in EXIT_KINDS else len(EXIT_KINDS)
    return rank, kind, -ns, -count, detail


def process_start_ns() -> int | None:
    """When this process started, on CLOCK_MONOTONIC; None if unknown.

    /proc/self/stat gives it in clock ticks since boot (10 ms each on
    x86 Linux), on the boot-time clock, which counts suspended time as
    CLOCK_MONOTONIC does not: the difference between the two clocks now
    converts it.
    """
    try:
        with open("/proc/self/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
        ticks = int(fields[19])  # field 22, starttime; the split starts at field 3
        hz = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    offset = time.clock_gettime_ns(time.CLOCK_BOOTTIME) - time.monotonic_ns()
    return ticks * 1_000_000_000 // hz - offset


# --- output ---------------------------------------------------------------------


def format_report(report: dict) -> list[str]:
    """The report as text lines for stderr."""
    lines = ["run statistics (--stats):"]
    startup = report.get("startup_ns")
    lines.append("  start-up (process start to first KVM_RUN): "
                 + ("unknown" if startup is None else f"{_ms(startup)} (to 10 ms, the kernel's process clock)"))
    for vcpu in report["vcpus"]:
        inside, outside = vcpu["kvm_run_ns"], vcpu["vmm_ns"]
        share = f" ({100 * outside / (inside + outside):.1f}% of its time)" if inside + outside else ""
        lines.append(f"  vCPU {vcpu['vcpu']}: {_ms(inside)} in KVM_RUN, {_ms(outside)} in the VMM{share}; "
                     f"{vcpu['exits']} exits, {vcpu['kvm_runs']} KVM_RUNs")
    counters = report["counters"]
    if not counters:
        return lines
    width = max(len(f"{c['kind']} {c['detail']}") for c in counters)
    lines.append(f"  {'kind and detail':<{width}}  {'count':>9}  {'VMM time':>10}  {'per call':>9}")
    for c in counters:
        name = f"{c['kind']} {c['detail']}".rstrip()
        per = _us(c["ns"] // c["count"]) if c["count"] else "-"
        lines.append(f"  {name:<{width}}  {c['count']:>9}  {_ms(c['ns']):>10}  {per:>9}")
    return lines


def write_json(report: dict, out) -> None:
    """Into an open text file (opened before the sandbox's lockdown)."""
    json.dump(report, out, indent=1)
    out.write("\n")


def _ms(ns: int) -> str:
    return f"{ns / 1e6:.1f} ms"


def _us(ns: int) -> str:
    return f"{ns / 1e3:.1f} µs"
