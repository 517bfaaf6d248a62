"""Machine.pause() against this host's /dev/kvm (the PVH test kernel of
firmware/pvh-test spinning with action=l, which counts every turn of its
loop in `spin_count`).

pause() must return only once no vCPU runs: it freezes the guest's clock
right after, and a clock read while a vCPU still ran would step back on
resume under a guest that had already seen later times. While paused, work
queued for a vCPU (run_on_vcpu) still runs: a vCPU blocked in a hypercall
may be waiting for it.
"""

import os
import struct
import subprocess
import threading
import time

import pytest
from elftools.elf.elffile import ELFFile

from vmm import REPO

from pyvmm.config import SerialSpec, VmConfig
from pyvmm.core.console import ConsoleOutput
from pyvmm.core.stop import StopReason
from pyvmm.vmm.builder import MachineBuilder

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="no /dev/kvm on this host")

CYCLES = 25


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    out = tmp_path_factory.mktemp("pvh")
    subprocess.run(["bash", str(REPO / "firmware/pvh-test/build.sh"), str(out)], check=True, capture_output=True)
    return out / "pvh-test.elf64"


def symbol_address(path, name):
    with open(path, "rb") as stream:
        symbols = ELFFile(stream).get_section_by_name(".symtab")
        return symbols.get_symbol_by_name(name)[0]["st_value"]


def test_pause_returns_once_no_vcpu_runs_and_parked_vcpus_still_serve_work(kernel, caplog):
    console = ConsoleOutput(None, [])
    config = VmConfig(kernel=kernel, xen=False, memory=64 << 20, vcpus=2, cmdline="action=l",
                      serial=SerialSpec("none"))
    machine = MachineBuilder.for_boot(config, console)
    counter = symbol_address(kernel, "spin_count")
    report = {"moved_while_paused": [], "work": [], "error": None}

    def count() -> int:
        return struct.unpack("<I", machine.memory.read(counter, 4))[0]

    def drive():
        try:
            deadline = time.monotonic() + 60
            while count() == 0:
                assert time.monotonic() < deadline, "the guest never started spinning"
                time.sleep(0.01)
            for _ in range(CYCLES):
                machine.pause()
                before = count()
                time.sleep(0.02)
                report["moved_while_paused"].append(count() - before)
                # vCPU 1 is parked too (an AP never started): its queued work runs.
                report["work"].append(machine.run_on_vcpu(1, lambda vcpu: "ran", timeout=5))
                machine.resume()
                resumed = count()
                while count() == resumed:
                    assert time.monotonic() < deadline, "the guest did not run again after resume"
                    time.sleep(0.001)
            # A vCPU's own thread pausing the VM (gdb's stop at a breakpoint)
            # is outside KVM_RUN already: pause() does not wait for it.
            machine.run_on_vcpu(0, lambda vcpu: machine.pause(), timeout=30)
            report["paused_by_vcpu"] = machine.paused
            machine.resume()
        except BaseException as error:  # reported on the test's thread
            report["error"] = error
        finally:
            machine.loop.call_soon_threadsafe(lambda: machine.request_stop(StopReason.QUIT))

    driver = threading.Thread(target=drive, name="test-driver")
    try:
        driver.start()
        assert machine.run(time.monotonic() + 120) is StopReason.QUIT
    finally:
        driver.join(timeout=30)
        machine.close()
        console.close()
    if report["error"] is not None:
        raise report["error"]
    assert report["moved_while_paused"] == [0] * CYCLES
    assert report["work"] == ["ran"] * CYCLES
    assert report["paused_by_vcpu"]
    assert not [r for r in caplog.records if "did not leave KVM_RUN" in r.getMessage()]
