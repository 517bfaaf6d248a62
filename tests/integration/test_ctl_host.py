"""The operator commands' error paths, which need no running guest."""

import subprocess
import sys

from vmm import REPO


def pyvmm(*args):
    return subprocess.run([sys.executable, "-m", "pyvmm", *args], capture_output=True, text=True, timeout=60, cwd=REPO)


def test_ctl_for_a_vm_that_does_not_exist_fails_clearly():
    result = pyvmm("ctl", "no-such-vm-here", "status")
    assert result.returncode == 1
    assert "no VM named 'no-such-vm-here' is running" in result.stderr
    assert "Traceback" not in result.stderr


def test_ctl_rejects_a_bad_name():
    result = pyvmm("ctl", "../etc", "status")
    assert result.returncode == 1
    assert "invalid VM name" in result.stderr and "Traceback" not in result.stderr


def test_list_with_no_vms_prints_the_header_only(tmp_path):
    env_home = {"XDG_RUNTIME_DIR": str(tmp_path)}
    import os

    result = subprocess.run([sys.executable, "-m", "pyvmm", "list"], capture_output=True, text=True, timeout=60,
                            cwd=REPO, env={**os.environ, **env_home})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [result.stdout.splitlines()[0]] and "NAME" in result.stdout
