"""The Xen Test Framework's HVM tests guard pyvmm's Xen ABI against regressions.

A representative, fast subset (the expected list's "fast" entries: 64- and
32-bit guests, console, hypercall page, event channels, grant table,
ballooning, error codes; selftest's xenstore and grant table over RAM are
test_xen_poll.py's) runs under pyvmm through scripts/xtf,
which fails on any result worse than tests/xtf/expected.json says. The whole
suite, side by side with QEMU, is `scripts/xtf`'s job (docs/XTF.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vmm import REPO

pytestmark = [pytest.mark.guest, pytest.mark.xen]

EXPECTED = REPO / "tests" / "xtf" / "expected.json"
XTF_DIR = Path(os.environ.get("PYVMM_XTF_DIR", REPO.parent / "shared" / "xtf"))
SECONDS_PER_TEST = 60


def test_fast_xtf_subset_has_no_regression(tmp_path):
    from pyvmm.hostcheck import probe

    if not (XTF_DIR / "tests").is_dir():
        pytest.skip(f"no built XTF at {XTF_DIR} (set PYVMM_XTF_DIR)")
    report = probe()
    if not report.can_run_xen:
        pytest.skip(f"this host's KVM cannot run Xen guests (missing {report.missing_xen or 'hardware virtualization'})")
    fast = json.loads(EXPECTED.read_text())["fast"]
    command = [sys.executable, str(REPO / "scripts" / "xtf"), "--vmm", "pyvmm", "-j", "2",
               "--timeout", str(SECONDS_PER_TEST), "--out", str(tmp_path), "--expected", str(EXPECTED),
               "--xtf-dir", str(XTF_DIR)]
    for test_id in fast:
        command += ["-k", test_id]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                            timeout=len(fast) * (SECONDS_PER_TEST + 60))
    assert result.returncode == 0, f"status {result.returncode}\n{result.stderr[-6000:]}\n{result.stdout[-6000:]}"
    ran = json.loads((tmp_path / "xtf.json").read_text())["results"]
    assert sorted(ran) == sorted(fast), "every test of the fast subset ran, and only those"
