"""SCHEDOP_poll and SCHEDOP_block in a real non-Linux guest.

XTF's self test reads xenstore keys and waits for each reply with
SCHEDOP_poll on the store port, interrupts off. With KVM's event-channel
acceleration KVM blocks the vCPU in the kernel and the xenstore's reply,
sent by pyvmm through KVM, must wake it; with --no-xen-accel KVM answers
the poll as a yield (since Linux 6.0; older KVMs leave it to pyvmm, which
halts the vCPU: docs/XEN.md). Both ABIs, since the compat SCHEDOP_poll
structure differs.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from vmm import REPO, run_pyvmm

pytestmark = [pytest.mark.guest, pytest.mark.xen]

XTF_DIR = Path(os.environ.get("PYVMM_XTF_DIR", REPO.parent / "shared" / "xtf"))


# Each word size once and each delivery path once (KVM's in-kernel event
# channels, pyvmm's own): the four combinations took two boots more for no
# path the two do not take. selftest is not in the XTF fast subset for this.
@pytest.mark.parametrize(("test_id", "accel"), [("test-hvm64-selftest", True), ("test-hvm32-selftest", False)],
                         ids=["hvm64-in-kernel", "hvm32-userspace"])
def test_xtf_selftest_waits_for_xenstore_replies_with_sched_op_poll(test_id, accel):
    from pyvmm.hostcheck import probe

    kernel = XTF_DIR / "tests" / "selftest" / test_id
    if not kernel.is_file():
        pytest.skip(f"no built XTF at {XTF_DIR} (set PYVMM_XTF_DIR)")
    if not probe().can_run_xen:
        pytest.skip("this host's KVM cannot run Xen guests")
    args = ["run", "--xen", "--kernel", str(kernel), "--append", "", "--memory", "128M", "--no-reboot",
            "--timeout", "60", "--stats"]
    if not accel:
        args.append("--no-xen-accel")
    result = run_pyvmm(*args, timeout=120)
    assert "Test result: SUCCESS" in result.stdout, str(result)
    assert result.status == 0, str(result)
    # What reached pyvmm of sched_op (KVM answers yield and poll in the kernel when accelerated).
    print(test_id, "accel" if accel else "no accel", re.findall(r"hypercall sched_op:\w+\s+\d+", result.stderr))
