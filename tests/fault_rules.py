"""Fixtures for tests of the trace and fault hooks: one VM's Tracer and
FaultInjector, made for each test and handed to the parts it builds, as the
runner hands a VM's to its machine."""

import pytest

from pyvmm.core.faults import FaultInjector
from pyvmm.core.trace import Tracer


@pytest.fixture
def trace():
    """A Tracer that is off until the test attaches it to a stream."""
    tracer = Tracer()
    yield tracer
    tracer.close()


@pytest.fixture
def faults(trace):
    """A FaultInjector without rules, tracing to `trace`; delayed outcomes
    run at once unless the test sets call_later."""
    return FaultInjector(trace)
