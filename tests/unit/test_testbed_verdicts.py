"""CI reruns a guest test only when the testbed failed its L2 guest in one of
the ways QEMU's guests show too (tests/testbed_verdicts.py)."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import testbed_verdicts
from pyvmm import diagnose
from pyvmm.kvm import exits, uapi
from pyvmm.vmm.exit_handler import _ALREADY_RESET, ExitHandler
from pyvmm.vmm.liveness import VcpuSample, describe_foreign

REPO = Path(__file__).resolve().parents[2]


def _triple_fault_warning(registers: dict[str, int]) -> str:
    """The warning line pyvmm's own exit handler logs for a triple fault of
    a vCPU with these registers, as its log prints it on stderr."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("pyvmm.vmm.exit_handler")
    logger.addHandler(handler)
    try:
        ExitHandler(None, None, vcpu=0, registers=lambda: registers).handle(exits.ShutdownExit())
    finally:
        logger.removeHandler(handler)
    (record,) = records
    return f"pyvmm: {record.levelname}: {record.name}: {record.getMessage()}"


# KVM on AMD has reset the vCPU by the time pyvmm reads it: the power-on registers.
WARNING = _triple_fault_warning({"rip": 0xFFF0, "rsp": 0, "rflags": 2, "cr0": 0x10, "cr2": 0, "cr3": 0, "cr4": 0,
                                 "efer": 0, "cs": 0xF000, "ss": 0})
# The end of a CI failure: the console stopped in PCI enumeration, nothing from the kernel.
SILENT = f"""AssertionError: status 6
--- stdout
[    1.972598] ACPI: PCI Root Bridge [PCI0] (domain 0000 [bus 00-ff])
[    1.992598] PCI host bridge to bus 0000:00
[    6.021169] pci_bus 0000:00:
--- stderr
pyvmm: INFO: pyvmm.xen.domain: event channel callback: gsi (0x1)
{WARNING}
pyvmm: INFO: pyvmm.runner: guest stopped: triple-fault
"""


def test_a_triple_fault_kvm_had_reset_with_a_quiet_console_is_the_testbeds():
    assert _ALREADY_RESET in WARNING  # the exit handler saw the power-on registers
    assert testbed_verdicts.testbed_failure(SILENT) == WARNING.strip()


def test_a_guest_that_said_it_failed_is_never_the_testbeds():
    for said in ("[ 3.1] Kernel panic - not syncing: Fatal exception", "[ 2.0] BUG: unable to handle page fault",
                 "[ 2.0] Oops: 0000 [#1] SMP", "[ 2.0] traps: general protection fault ip:1"):
        assert testbed_verdicts.testbed_failure(SILENT.replace("--- stderr", said + "\n--- stderr")) is None


def test_a_triple_fault_with_its_registers_or_another_failure_is_not():
    with_registers = SILENT.replace(WARNING, _triple_fault_warning({"rip": 0xFFFFFFFF81000000, "cs": 0x10,
                                                                     "cr0": 0x80050033, "efer": 0xD01}))
    assert testbed_verdicts.testbed_failure(with_registers) is None
    assert testbed_verdicts.testbed_failure("AssertionError: 'login:' not in output") is None
    assert testbed_verdicts.testbed_failure("") is None


# The end of a CI failure: a guest stopped at --timeout, its vCPU 0 at L1's
# instruction after VMRUN with L1's page-table root (pyvmm's own diagnosis).
FOREIGN_STATE = f"""AssertionError: status 124
--- stdout
the host says: go
--- stderr
pyvmm: WARNING: pyvmm.vmm.machine: --timeout expired; the guest's state:
pyvmm: WARNING: pyvmm.vmm.machine:   {diagnose.vcpu_line(0, {
    "mp_state": 0, "rip": 0xFFFFFFFFC03A80B0, "rflags": 0x246, "rsp": 0xFFFFC900004DB9D0, "cr3": 0x1011C8000,
    "cr3_outside_ram": True, "code": None}, None)}
pyvmm: WARNING: pyvmm.vmm.machine:   vCPU 1: halted rip=0xffffffff9ca17a0b IF=1, in the guest
"""


def test_a_vcpu_holding_state_that_is_not_the_guests_is_the_testbeds():
    assert testbed_verdicts.FOREIGN_CR3 == diagnose.FOREIGN_CR3
    assert "vCPU 0: runnable rip=0xffffffffc03a80b0" in testbed_verdicts.testbed_failure(FOREIGN_STATE)
    assert testbed_verdicts.testbed_failure(FOREIGN_STATE.replace("--- stderr", "Call Trace:\n--- stderr")) is None
    plain_hang = FOREIGN_STATE.replace(diagnose.FOREIGN_CR3, "")
    assert testbed_verdicts.testbed_failure(plain_hang) is None  # a hang of pyvmm's own is never rerun


def test_a_guest_the_liveness_probe_stopped_for_state_not_its_own_is_the_testbeds():
    foreign = [(0, VcpuSample(uapi.KVM_MP_STATE_RUNNABLE, 0xFFFFFFFFC03A80B0, foreign_cr3=0x1011C8000))]
    report = ("AssertionError: status 3\n--- stderr\npyvmm: WARNING: pyvmm.vmm.machine: "
              f"{describe_foreign(foreign)}; the guest cannot go on: stopping it as crashed\n")
    assert "vCPU 0 at rip=0xffffffffc03a80b0 with cr3=0x1011c8000" in testbed_verdicts.testbed_failure(report)
    assert testbed_verdicts.testbed_failure(report.replace("--- stderr", "Kernel panic - not syncing\n")) is None


def test_the_failed_tests_rerun_only_when_every_one_is_the_testbeds():
    reset = json.dumps(testbed_verdicts.verdict("t.py::a", SILENT))
    again = json.dumps(testbed_verdicts.verdict("t.py::a", SILENT))  # its setup and its call
    other = json.dumps(testbed_verdicts.verdict("t.py::b", "assert 1 == 2"))
    assert testbed_verdicts.rerunnable([reset, again, "\n"]) == (["t.py::a"], [])
    tests, reasons = testbed_verdicts.rerunnable([reset, other])
    assert tests == [] and reasons == ["t.py::b: not one of the testbed's failures"]
    tests, reasons = testbed_verdicts.rerunnable([])
    assert tests == [] and "no failed test" in reasons[0]


def test_the_pytest_hook_writes_a_verdict_per_failed_test_and_the_passed_ids(tmp_path):
    """tests/conftest.py's hook, in a real pytest run, feeds the command
    scripts/test asks which tests to rerun, and lists the tests that passed
    (not rerun after L1 failed)."""
    (tmp_path / "test_sample.py").write_text(
        "def test_reset():\n"
        f"    raise AssertionError({SILENT!r})\n"
        "def test_wrong():\n"
        "    assert 1 == 2\n"
        "def test_fine():\n"
        "    pass\n")
    verdicts, passed = tmp_path / "verdicts.jsonl", tmp_path / "passed.txt"
    env = {"PYTHONPATH": str(REPO), "PYVMM_TEST_VERDICTS": str(verdicts), "PYVMM_TESTS_PASSED": str(passed),
           "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
                          str(tmp_path / "test_sample.py")], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 1, run.stdout + run.stderr
    lines = verdicts.read_text().splitlines()
    assert [json.loads(line)["test"].split("::")[1] for line in lines] == ["test_reset", "test_wrong"]
    assert passed.read_text() == "test_sample.py::test_fine\n"  # a --deselect that names it
    command = [sys.executable, str(REPO / "tests" / "testbed_verdicts.py"), str(verdicts)]
    refused = subprocess.run(command, capture_output=True, text=True)
    assert refused.returncode == 1 and "test_wrong: not one of the testbed" in refused.stderr
    verdicts.write_text(lines[0] + "\n")
    rerun = subprocess.run(command, capture_output=True, text=True)
    assert rerun.returncode == 0 and rerun.stdout.strip().endswith("test_sample.py::test_reset")
