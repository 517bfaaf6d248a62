"""MachineBuilder: the steps of a boot in order, a machine's own tracer and
fault injector, and the snapshot entry that is not written yet. No KVM: the
steps that need it are left out or replaced by fakes."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import pytest

from pyvmm.config import VmConfig
from pyvmm.core.bus import Bus
from pyvmm.control.operations import machine_commands
from pyvmm.core.console import ConsoleOutput
from pyvmm.core.faults import FaultInjector
from pyvmm.core.trace import Tracer
from pyvmm.devices.pvpanic import PANICKED
from pyvmm.platform import Platform
from pyvmm.vmm.builder import MachineBuilder


@pytest.fixture
def console():
    output = ConsoleOutput(None, [])
    yield output
    output.close()


def close(*machines):
    for machine in machines:
        machine.loop.close()


def test_for_boot_takes_every_step_in_order(monkeypatch, console):
    steps = []
    for name in ("create_vm", "add_memory", "add_devices", "load_guest", "add_debugger"):
        monkeypatch.setattr(MachineBuilder, name, lambda self, name=name: steps.append(name))
    trace, faults = Tracer(), FaultInjector()
    machine = MachineBuilder.for_boot(VmConfig(kernel="k"), console, trace=trace, faults=faults)
    try:
        assert steps == ["create_vm", "add_memory", "add_devices", "load_guest", "add_debugger"]
        assert machine.trace is trace and machine.faults is faults  # the runner's, for every boot
    finally:
        close(machine)


def test_a_snapshot_holds_every_stateful_part_of_the_machine(console):
    """MachineBuilder.from_snapshot restores these, by name, in this order (the
    host test tests/integration/test_snapshot_host.py restores a whole VM)."""
    from pyvmm.core.snapshot import STATEFUL

    machine = MachineBuilder(VmConfig(kernel="k", xen=False), console).machine
    try:
        machine.vm = SimpleNamespace(irq_line=lambda gsi, level: None)
        machine.pio, machine.mmio = Bus("port I/O", 1 << 16), Bus("MMIO", 1 << 64)
        machine.platform = Platform(machine, console)
        parts = machine.stateful_parts()
        assert list(parts) == ["serial", "rtc", "i8042", "acpi_pm", "pci"]
        listed = {entry.split(":")[1] for entry in STATEFUL}
        assert {type(part).__name__ for part in parts.values()} <= listed
        machine.xen = SimpleNamespace()
        assert list(machine.stateful_parts())[-1] == "xen"  # the domain restores its own parts, after the PC's
    finally:
        machine.loop.close()


def test_two_machines_share_no_trace_or_fault_state(console):
    first = MachineBuilder(VmConfig(kernel="k", xen=False), console).machine
    second = MachineBuilder(VmConfig(kernel="k", xen=False), console).machine
    try:
        assert first.trace is not second.trace and first.faults is not second.faults
        # Each one's PC platform (step 3, on a fake VM) traces to its own machine's tracer.
        for machine in (first, second):
            machine.vm = SimpleNamespace(irq_line=lambda gsi, level: None)
            machine.pio, machine.mmio = Bus("port I/O", 1 << 16), Bus("MMIO", 1 << 64)
            machine.platform = Platform(machine, console)
        stream = io.StringIO()
        first.trace.attach({"io"}, stream)  # any category turns "stop" on
        assert first.trace.stop and not second.trace.stop and second.trace.enabled == frozenset()
        second.platform._guest_panicked(PANICKED)
        first.platform._guest_panicked(PANICKED)
        first.trace.flush()
        records = [json.loads(line) for line in stream.getvalue().splitlines()]
        assert [(r["cat"], r["ev"]) for r in records] == [("stop", "pvpanic")]
        # The control socket's fault commands change their own machine's rules only.
        machine_commands(first)["fault-add"]({"spec": "blk:stall"})
        assert first.faults.blk and not second.faults.blk
        assert machine_commands(second)["fault-list"]({}) == []
    finally:
        first.trace.close()
        close(first, second)
