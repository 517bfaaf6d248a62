"""A short, reproducible run of every fuzz target (tests/fuzz_targets.py);
scripts/fuzz runs them for longer."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz_targets import MAX_INPUT, TARGETS, Input, InvariantBroken, XenstoreRing


@pytest.mark.parametrize("name", list(TARGETS))
def test_target(name):
    target = TARGETS[name]

    # Derandomized: the same inputs every run, so a failure here is a real one.
    @settings(max_examples=150, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(st.binary(max_size=MAX_INPUT))
    def run(raw):
        target(raw)

    run()


def test_the_xenstore_invariants_can_fail():
    ring = XenstoreRing()
    ring.store._tree.delete("/local/domain/1/data")  # a node its parent still lists
    with pytest.raises(InvariantBroken):
        ring.invariants()


def test_inputs_read_past_their_end_as_zeros():
    data = Input(b"\x05")
    assert (data.u8(), data.u32(), data.left) == (5, 0, 0)
