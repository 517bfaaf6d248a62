"""Running pyvmm as a user would (a subprocess), for integration tests."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Result:
    status: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return f"status {self.status}\n--- stdout\n{self.stdout[-4000:]}\n--- stderr\n{self.stderr[-4000:]}"


def run_pyvmm(*args: str, timeout: float = 600, stdin: bytes | None = b"") -> Result:
    """`pyvmm ARGS...` with the console on stdout; waits at most `timeout`."""
    proc = subprocess.run(
        [sys.executable, "-m", "pyvmm", *args],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        cwd=REPO,
    )
    return Result(proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace"))


def host_kvm_runs_linux() -> tuple[bool, str]:
    """Whether this host's /dev/kvm can boot Linux in reasonable time."""
    if not os.path.exists("/dev/kvm"):
        return False, "no /dev/kvm"
    if os.path.exists("/sys/module/kvm_pvm"):
        return False, "/dev/kvm is the software-only kvm_pvm (run the guest tests through scripts/testbed)"
    return True, ""


def require_linux_kvm() -> None:
    ok, why = host_kvm_runs_linux()
    if not ok:
        pytest.skip(why)


def xen_guest_assets() -> dict:
    """The guest kernel and initramfs, or a skip where Xen guests cannot run here."""
    from initrd import GuestAssetsUnavailable, guest_assets

    from pyvmm.hostcheck import probe

    report = probe()
    if not report.can_run_xen:
        pytest.skip(f"this host's KVM cannot run Xen guests (missing {report.missing_xen or 'hardware virtualization'})")
    try:
        return guest_assets()
    except GuestAssetsUnavailable as error:
        pytest.skip(str(error))
