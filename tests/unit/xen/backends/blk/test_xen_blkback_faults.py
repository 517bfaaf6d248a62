"""Injected faults in the block backend, against the fake blkfront of
tests/frontends/blkfront.py: the outcome a rule gives, and nothing else changes."""

from __future__ import annotations

import io
import json

import pytest

from pyvmm.xen.backends.blk import blkif
from pyvmm.xen.backends.blk.blkif import (
    BLKIF_OP_DISCARD,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
)

from fault_rules import faults, trace  # noqa: F401 - fixtures
from frontends.blkfront import Blkfront as Guest
from frontends.common import pattern


@pytest.fixture
def guest(tmp_path, trace, faults):
    g = Guest(tmp_path, trace=trace, faults=faults)
    g.backend.label = "xvdb"
    yield g
    g.image.close()


def write(guest, request_id, sector, seed):
    ref, _ = guest.page(pattern(seed, 4096), readonly=True)
    return guest.rw(BLKIF_OP_WRITE, request_id, sector, [(ref, 0, 7)])


def test_write_error_on_a_sector_range_only(guest, faults):
    faults.add("blk:error,op=write,sectors=100-107,vdev=xvdb")
    before = guest.disk()
    answers = guest.run(write(guest, 1, 92, 1), write(guest, 2, 100, 2), write(guest, 3, 108, 3))
    assert answers == {1: (BLKIF_OP_WRITE, BLKIF_RSP_OKAY), 2: (BLKIF_OP_WRITE, BLKIF_RSP_ERROR),
                       3: (BLKIF_OP_WRITE, BLKIF_RSP_OKAY)}
    assert guest.disk(100, 8) == before[100 * 512:108 * 512]  # the failed write did not happen
    assert guest.disk(92, 8) == pattern(1, 4096) and guest.disk(108, 8) == pattern(3, 4096)
    ref, gfn = guest.page()
    assert guest.run(guest.rw(BLKIF_OP_READ, 4, 100, [(ref, 0, 7)]))[4][1] == BLKIF_RSP_OKAY
    guest.assert_grants_released()


def test_other_disks_are_untouched(guest, faults):
    faults.add("blk:error,vdev=xvdc")
    assert guest.run(write(guest, 1, 0, 1))[1][1] == BLKIF_RSP_OKAY


def test_eopnotsupp_for_a_feature(guest, faults):
    faults.add("blk:eopnotsupp,op=discard")
    assert guest.run(blkif.pack_discard(guest.abi, 9, 0, 8))[9] == (BLKIF_OP_DISCARD, BLKIF_RSP_EOPNOTSUPP)
    assert guest.run(write(guest, 10, 0, 1))[10][1] == BLKIF_RSP_OKAY


def test_dropped_completion_is_never_answered_but_done(guest, faults):
    faults.add("blk:drop,op=write,count=1")
    assert guest.run(write(guest, 1, 0, 1), write(guest, 2, 8, 2)) == {2: (BLKIF_OP_WRITE, BLKIF_RSP_OKAY)}
    assert guest.disk(0, 8) == pattern(1, 4096)  # carried out, only the answer is lost
    assert guest.run(write(guest, 3, 16, 3)) == {3: (BLKIF_OP_WRITE, BLKIF_RSP_OKAY)}


def test_delayed_completion_comes_later(guest, faults):
    later = []
    faults.call_later = lambda delay, callback: later.append((delay, callback))
    faults.add("blk:delay=300ms,op=write")
    notified = guest.notified
    assert guest.run(write(guest, 1, 0, 1)) == {}
    assert guest.disk(0, 8) == pattern(1, 4096)
    (delay, answer), = later
    assert delay == pytest.approx(0.3)
    answer()
    responses = [blkif.parse_response(raw, guest.abi) for raw in guest.front.take_responses()]
    assert responses == [(1, BLKIF_OP_WRITE, BLKIF_RSP_OKAY)]
    assert guest.notified > notified


def test_delayed_answer_after_disconnect_is_dropped(guest, faults):
    later = []
    faults.call_later = lambda delay, callback: later.append(callback)
    faults.add("blk:delay=1s")
    guest.run(write(guest, 1, 0, 1))
    guest.backend.detach_ring()
    later[0]()  # nothing to answer on: no exception, no write into the old ring
    assert list(guest.front.take_responses()) == []


def test_stalled_ring_is_not_served_until_the_stall_is_lifted(guest, faults):
    rule = faults.add("blk:stall,vdev=xvdb")
    guest.submit(write(guest, 1, 0, 1))
    assert guest.backend.process() == 0
    faults.remove(rule.id)
    assert guest.run() == {1: (BLKIF_OP_WRITE, BLKIF_RSP_OKAY)}


def test_requests_responses_and_faults_are_traced(guest, faults, trace):
    stream = io.StringIO()
    trace.attach({"blk"}, stream)
    try:
        faults.add("blk:error,op=write,sectors=8-15")
        guest.run(write(guest, 1, 0, 1), write(guest, 2, 8, 2))
    finally:
        trace.close()
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    requests = [e for e in events if e["ev"] == "request"]
    assert [(e["id"], e["op"], e["sector"], e["sectors"], e["segments"], e["bytes"], e["disk"]) for e in requests] == [
        (1, "write", 0, 8, 1, 4096, "xvdb"), (2, "write", 8, 8, 1, 4096, "xvdb")]
    responses = {e["id"]: e for e in events if e["ev"] == "response"}
    assert responses[1]["status"] == 0 and responses[2]["status"] == -1
    assert responses[2]["fault"] == "blk:error,op=write,sectors=8-15"
    (fault,) = [e for e in events if e["cat"] == "fault"]
    assert (fault["ev"], fault["sector"], fault["op"]) == ("error", 8, "write")
