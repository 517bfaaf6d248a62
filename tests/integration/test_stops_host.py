"""Unexpected stops are told apart, on this host's KVM, with our PVH test kernel.

firmware/pvh-test ends the way its command line's `action=` says: a triple
fault, `cli; hlt` forever, a panic reported on the pvpanic port, or a
loop that only --timeout ends.
"""

import os
import subprocess
import sys

import pytest

from vmm import REPO, run_pyvmm

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="no /dev/kvm on this host")

# Far above what these few thousand instructions need: a guest that is not
# noticed ends with 124 and fails the test, rather than hanging it.
TIMEOUT = "120"


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    out = tmp_path_factory.mktemp("pvh")
    subprocess.run(["bash", str(REPO / "firmware/pvh-test/build.sh"), str(out)], check=True, capture_output=True)
    return str(out / "pvh-test.elf64")


def run(kernel, action, *extra):
    return run_pyvmm("run", "--no-xen", "--kernel", kernel, "--append", f"console=ttyS0 action={action}",
                     "--timeout", TIMEOUT, *extra, timeout=300)


def test_triple_fault_under_no_reboot_exits_6_with_the_registers(kernel):
    result = run(kernel, "t", "--no-reboot")
    assert result.status == 6, str(result)
    assert "pyvmm-pvh-test: triple fault" in result.stdout, str(result)
    warning = next(line for line in result.stderr.splitlines() if "triple-faulted" in line)
    assert "WARNING" in warning and "vCPU 0 triple-faulted (an unexpected CPU reset)" in warning, str(result)
    # Protected mode, paging off, the test kernel's flat code segment.
    assert "cr0=0x11 " in warning and "cs=0x0008" in warning and "rip=0x" in warning, warning


def test_triple_fault_without_no_reboot_boots_the_guest_again(kernel):
    # The pattern spans two boots: only a guest that was reset after its
    # first triple fault prints it twice.
    result = run(kernel, "t", "-v", "--expect", r"(?s)triple fault.*magic ok.*triple fault")
    assert result.status == 0, str(result)
    assert result.stderr.count("triple-faulted (an unexpected CPU reset)") >= 1, str(result)
    assert "guest stopped: triple-fault" in result.stderr, str(result)


@pytest.mark.parametrize("vcpus", ["1", "2"])
def test_every_vcpu_halted_with_interrupts_off_is_a_crash(kernel, vcpus):
    # With 2 vCPUs the second was never started: it waits for INIT/SIPI.
    result = run(kernel, "h", "--vcpus", vcpus)
    assert result.status == 3, str(result)
    assert "halting with interrupts off" in result.stdout, str(result)
    assert "every vCPU is halted with interrupts disabled" in result.stderr, str(result)
    assert "vCPU 0 halted at rip=0x" in result.stderr, str(result)
    if vcpus == "2":
        assert "vCPU 1 waiting for INIT/SIPI" in result.stderr, str(result)


def test_pvpanic_report_is_a_crash(kernel):
    result = run(kernel, "p", "-v")
    assert result.status == 3, str(result)
    assert "WARNING: pyvmm.platform: guest reported a panic (pvpanic)" in result.stderr, str(result)
    assert "guest stopped: crash (pvpanic)" in result.stderr, str(result)
    assert "halted with interrupts disabled" not in result.stderr, str(result)


def test_timeout_logs_where_each_vcpu_was(kernel):
    result = run_pyvmm("run", "--no-xen", "--kernel", kernel, "--append", "console=ttyS0 action=l", "--vcpus", "2",
                       "--timeout", "1", timeout=300)
    assert result.status == 124, str(result)
    assert "looping forever" in result.stdout, str(result)
    lines = result.stderr.splitlines()
    start = next(i for i, line in enumerate(lines) if "--timeout expired; the guest's state:" in line)
    assert "WARNING" in lines[start], str(result)
    # The PVH entry runs with interrupts off; vCPU 1 was never started.
    assert "vCPU 0: runnable rip=0x" in lines[start + 1] and "IF=0, in the guest" in lines[start + 1], str(result)
    assert "vCPU 1: uninitialized" in lines[start + 2], str(result)
    # Where it ran and whether it spun: the bytes at rip (RAM), KVM's exit counters.
    assert "; rsp=0x" in lines[start + 1] and "; code at rip: " in lines[start + 1], str(result)
    assert "code at rip: unreadable" not in lines[start + 1] and "; KVM " in lines[start + 1], str(result)
    assert "code at rip: unreadable" in lines[start + 2], result  # the reset vector is not RAM


def test_ctl_diagnose_on_a_running_guest(kernel, tmp_path):
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)}
    name = f"stops-{os.getpid()}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyvmm", "run", "--no-xen", "--kernel", kernel, "--append", "console=ttyS0 action=l",
         "--name", name, "--timeout", "300"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, env=env,
    )
    try:
        for line in proc.stdout:  # the guest runs once it prints this
            if b"looping forever" in line:
                break
        ctl = [sys.executable, "-m", "pyvmm", "ctl", name]
        diagnosis = subprocess.run([*ctl, "diagnose"], capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
        assert diagnosis.returncode == 0, diagnosis.stderr
        assert diagnosis.stdout.startswith("vCPU 0: runnable rip=0x"), diagnosis.stdout
        assert "IF=0, in the guest" in diagnosis.stdout, diagnosis.stdout
        destroy = subprocess.run([*ctl, "destroy"], capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
        assert destroy.returncode == 0, destroy.stderr
        assert proc.wait(timeout=60) == 4
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
