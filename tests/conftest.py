import json
import os
import sys
from pathlib import Path

import pytest
from hypothesis import settings

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import testbed_verdicts  # noqa: E402 (found through the path above)

# CI (.ci/run) draws the same examples every run: a red run then means that
# the change broke something, never that a new random draw found an old bug
# on the way. Everyone else's runs draw new examples each time, and a bug
# they find is fixed with its example pinned (@example).
settings.register_profile("ci", derandomize=True)
settings.load_profile(os.environ.get("PYVMM_HYPOTHESIS_PROFILE", "default"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    # Guest tests skip where no suitable KVM exists, except where the caller
    # demands that they run (scripts/test in the testbed): there a skip would
    # hide a broken setup, so it is reported as a failure.
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("PYVMM_REQUIRE_GUEST") == "1" and item.get_closest_marker("guest") and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"guest test skipped although PYVMM_REQUIRE_GUEST=1: {report.longrepr}"
    # Where scripts/test asks for it: one line per failed test saying
    # whether the testbed caused it (tests/testbed_verdicts.py), so that only
    # those are rerun.
    verdicts = os.environ.get("PYVMM_TEST_VERDICTS")
    if verdicts and report.failed:
        text = "\n".join([report.longreprtext, *(content for _, content in report.sections)])
        with open(verdicts, "a") as file:
            file.write(json.dumps(testbed_verdicts.verdict(report.nodeid, text)) + "\n")
    # And one line per passed test, so that a run whose L1 failed is
    # finished by rerunning only the tests that had not passed yet.
    passed = os.environ.get("PYVMM_TESTS_PASSED")
    if passed and report.when == "call" and report.passed:
        with open(passed, "a") as file:
            file.write(report.nodeid + "\n")
