"""MachineBuilder.for_boot against this host's /dev/kvm: two machines built
side by side in one process, each with its own VM, memory, tracer and fault
injector (the PVH test kernel of firmware/pvh-test, no Xen)."""

import os
import subprocess

import pytest

from vmm import REPO

from pyvmm.config import SerialSpec, VmConfig
from pyvmm.core.console import ConsoleOutput
from pyvmm.core.faults import FaultInjector
from pyvmm.core.trace import Tracer
from pyvmm.vmm.builder import MachineBuilder

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="no /dev/kvm on this host")


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    out = tmp_path_factory.mktemp("pvh")
    subprocess.run(["bash", str(REPO / "firmware/pvh-test/build.sh"), str(out)], check=True, capture_output=True)
    return out / "pvh-test.elf64"


def test_two_machines_in_one_process(kernel):
    console = ConsoleOutput(None, [])
    config = VmConfig(kernel=kernel, xen=False, memory=64 << 20, serial=SerialSpec("none"))
    trace, faults = Tracer(), FaultInjector()
    first = MachineBuilder.for_boot(config, console, trace=trace, faults=faults)
    try:
        second = MachineBuilder.for_boot(config, console)
        try:
            assert first.trace is trace and first.faults is faults
            assert second.trace is not trace and second.faults is not faults
            assert first.vm is not second.vm and first.memory is not second.memory
            assert first.boot_state == second.boot_state  # the same kernel, loaded into each
            faults.add("blk:stall")
            assert not second.faults.blk
        finally:
            second.close()
    finally:
        first.close()
        console.close()
