"""The guest's xenstore path under concurrent load (tests/xenstore_stress.py).

A fake Linux xenbus on its own thread, backends and socket clients on
theirs, the real store, ring server, event channels and socket server on
an event loop thread. Every request must get exactly one reply and every
watched write one event; a lost wake-up shows up as a stall.
A few seconds here; `scripts/stress-xenstore --seconds N` for a soak.
"""

from __future__ import annotations

import pytest

from xenstore_stress import StressFailure, run_stress

SECONDS = 2.0


@pytest.mark.parametrize("mode", ["kernel", "userspace"])
def test_every_request_is_answered_and_every_watched_write_arrives(mode):
    stats = run_stress(seconds=SECONDS, mode=mode)
    assert stats.requests == stats.replies > 0
    assert stats.host_writes > 0
    assert stats.skipped_signals > 0, "the guest never wrote while the server was busy: the race was not exercised"
