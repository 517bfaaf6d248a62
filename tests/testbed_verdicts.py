"""Which guest-test failures the testbed caused, so that CI reruns those once.

The testbed's emulated CPU (QEMU's TCG emulation of AMD SVM, running L1's
KVM) fails L2 guests in two ways that QEMU's own Xen emulation shows too, in
the same testbed (docs/TESTBED.md, "Silent L2 resets, and what CI reruns"):

- a silent reset: the guest's console stops in the middle of booting with no
  panic or oops, and the VMM sees a triple fault; pyvmm's warning says when
  KVM had already reset the vCPU (as KVM on AMD does);
- L1's own state left in an L2 vCPU: a vCPU whose page-table root is
  outside the guest's RAM (it is L1's, at L1's instruction after VMRUN);
  pyvmm stops such a guest within seconds, and its diagnosis at --timeout
  marks such a vCPU too.

Either, with nothing from the guest's kernel saying it failed by itself, is
classified as the testbed's here. Every other failure is pyvmm's or the
test's, and is never rerun.

During the guest tests the pytest hook in tests/conftest.py writes one JSON
line per failed test to $PYVMM_TEST_VERDICTS. scripts/test then runs
`python3 tests/testbed_verdicts.py FILE`: it prints the failed tests' ids
(exit 0) when every failure is the testbed's, else says which is not (exit 1).
"""

import json
import sys

# The start and end of pyvmm's triple-fault warning (pyvmm/vmm/exit_handler.py).
TRIPLE_FAULT = "triple-faulted (an unexpected CPU reset)"
KVM_HAD_RESET = "these are the power-on registers"
# pyvmm's mark of a vCPU whose state is not the guest's (pyvmm/diagnose.py's FOREIGN_CR3), in the
# liveness probe's warning and in the diagnosis at --timeout.
FOREIGN_CR3 = "its cr3 is outside the guest's RAM"
# What a guest kernel prints when it failed by itself: not a silent reset.
GUEST_FAILED = ("Kernel panic", "BUG:", "Oops:", "general protection fault", "double fault",
                "invalid opcode:", "stack guard page", "Call Trace:")


def testbed_failure(report_text: str) -> str | None:
    """pyvmm's line that shows one of the testbed's failures in
    `report_text` (a failed test's report), else None."""
    if any(sign in report_text for sign in GUEST_FAILED):
        return None
    for line in report_text.splitlines():
        if (TRIPLE_FAULT in line and KVM_HAD_RESET in line) or FOREIGN_CR3 in line:
            return line.strip()
    return None


def verdict(nodeid: str, report_text: str) -> dict:
    """The JSON line for one failed test."""
    return {"test": nodeid, "testbed": testbed_failure(report_text)}


def rerunnable(lines: list[str]) -> tuple[list[str], list[str]]:
    """From the verdict file's lines: (the failed tests' ids if every failure
    is the testbed's, else []; one reason per test that is not)."""
    verdicts = [json.loads(line) for line in lines if line.strip()]
    if not verdicts:
        return [], ["no failed test was recorded (the run failed some other way)"]
    ours = [f"{v['test']}: not one of the testbed's failures" for v in verdicts if not v["testbed"]]
    if ours:
        return [], ours
    return list(dict.fromkeys(v["test"] for v in verdicts)), []


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: testbed_verdicts.py VERDICT-FILE", file=sys.stderr)
        return 2
    try:
        with open(argv[1]) as file:
            lines = file.readlines()
    except FileNotFoundError:
        lines = []
    tests, reasons = rerunnable(lines)
    for reason in reasons:
        print(reason, file=sys.stderr)
    for test in tests:
        print(test)
    return 0 if tests else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
