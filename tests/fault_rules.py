"""A fixture for tests that add fault rules to the VMM's one injector."""

import pytest

from pyvmm.core.faults import FAULTS


@pytest.fixture(autouse=True)
def no_fault_rules():
    """Start and end without rules, with the scheduler the test found."""
    FAULTS.clear()
    saved = FAULTS.call_later
    yield FAULTS
    FAULTS.clear()
    FAULTS.call_later = saved
