"""The guest's xenstore path under concurrent load (tests/xenstore_stress.py).

A fake Linux xenbus on its own thread, backends and socket clients on
theirs, the real store, ring server, event channels and socket server on
an event loop thread. Every request must get exactly one reply and every
watched write one event; a lost wake-up shows up as a stall.
A few seconds here; `scripts/stress-xenstore --seconds N` for a soak.
"""

from __future__ import annotations

import pytest

from pyvmm.xen.xenstore import XenStore, create_domain_nodes
from xenstore_stress import DOMID, GUEST_KEYS, MAX_WRITERS, WATCH_PATH, host_paths, run_stress

SECONDS = 2.0


@pytest.mark.parametrize("mode", ["kernel", "userspace"])
def test_every_request_is_answered_and_every_watched_write_arrives(mode):
    stats = run_stress(seconds=SECONDS, mode=mode)
    assert stats.requests == stats.replies > 0
    assert stats.host_writes > 0
    assert stats.skipped_signals > 0, "the guest never wrote while the server was busy: the race was not exercised"


@pytest.mark.parametrize("writers", [1, 4, 8, MAX_WRITERS])
def test_the_host_writers_nodes_leave_the_guest_room_for_its_own(writers):
    # The host writers' nodes are in the guest's directory, so they count
    # against its node quota: with too many, the guest's own writes fail
    # (ENOSPC), which a run reports as a failure of the store.
    store = XenStore()
    create_domain_nodes(store, DOMID, "stress", store_port=1, store_ring_ref=1, console_port=2, console_ring_ref=2)
    dom0, guest = store.client(0), store.client(DOMID)
    for writer in range(writers):
        for path in range(host_paths(writers)):
            dom0.write(f"{WATCH_PATH}/w{writer}-{path}", b"y")
    for key in range(GUEST_KEYS):
        guest.write(f"/local/domain/{DOMID}/data/k{key}", b"x")


def test_more_host_writers_than_the_quota_holds_are_refused():
    with pytest.raises(ValueError):
        host_paths(MAX_WRITERS + 1)
