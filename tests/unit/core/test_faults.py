"""Fault rules: parsing, matching, counters, and the trace of what fired."""

from __future__ import annotations

import io
import json

import pytest

from pyvmm.core.faults import NULL_FAULTS, FaultInjector, FaultRule, FaultSpecError, corrupt, parse_duration
from pyvmm.core.trace import Tracer
from pyvmm.xen import backends  # noqa: F401 - registers the device kinds' fault targets (blk, net)


@pytest.fixture
def tracer():
    tracer = Tracer()
    yield tracer
    tracer.close()


@pytest.fixture
def faults(tracer):
    return FaultInjector(tracer)


@pytest.fixture
def traced(tracer):
    stream = io.StringIO()
    tracer.attach({"blk"}, stream)
    return stream


def test_parse_block_rule():
    rule = FaultRule.parse("blk:error,op=write+flush,sectors=2048-4095,vdev=xvdb,count=2")
    assert (rule.target, rule.action, rule.ops, rule.sectors, rule.vdev, rule.count) == (
        "blk", "error", {"write", "flush"}, (2048, 4095), "xvdb", 2)


def test_parse_durations():
    assert FaultRule.parse("blk:delay=250ms").delay == pytest.approx(0.25)
    assert FaultRule.parse("xenstore:delay-watch=2s,path=/local").delay == 2.0
    assert parse_duration("50us") == pytest.approx(50e-6)
    assert parse_duration("7") == pytest.approx(0.007)


@pytest.mark.parametrize("spec", [
    "disk:error", "blk:explode", "blk:delay", "blk:error=3", "blk:error,op=erase", "blk:error,sectors=9-3",
    "blk:error,sectors=a-b", "blk:error,port=3", "net:drop,dir=up", "evtchn:drop,port=0", "blk:error,rate=2",
    "blk:error,rate=x", "blk:error,every=0", "blk:error,count=-1", "blk:error,novalue", "xenstore:eagain,op=read",
    "blk:delay=soon",
])
def test_bad_specs_are_refused(spec):
    with pytest.raises(FaultSpecError):
        FaultRule.parse(spec)


def test_block_rule_matches_op_range_and_disk(faults):
    faults.add("blk:error,op=write,sectors=100-107,vdev=xvdb")
    assert faults.blk and not faults.net
    assert faults.blk_request("xvdb", "write", 96, 8) is not None  # 96..103 overlaps
    assert faults.blk_request("xvdb", "write", 104, 8) is not None
    assert faults.blk_request("xvdb", "write", 108, 8) is None  # just after
    assert faults.blk_request("xvdb", "write", 88, 12) is None  # 88..99: just before
    assert faults.blk_request("xvdb", "read", 100, 8) is None
    assert faults.blk_request("xvda", "write", 100, 8) is None
    assert faults.rules()[0]["fired"] == 2


def test_every_nth_and_count(faults):
    rule = faults.add("blk:drop,op=read,every=3,count=2")
    fired = [faults.blk_request("xvda", "read", n, 8) is not None for n in range(12)]
    assert fired == [False, False, True, False, False, True] + [False] * 6
    assert (rule.seen, rule.fired, rule.exhausted) == (12, 2, True)


def test_rate_is_seeded_and_repeatable(faults):
    def run(seed):
        injector = FaultInjector()
        injector.add(f"net:drop,rate=0.3,seed={seed}")
        return [injector.net_packet("tx", "0", 60) is not None for _ in range(200)]

    first = run(7)
    assert first == run(7)
    assert first != run(8)
    assert 30 < sum(first) < 90  # about 60 of 200


def test_first_matching_rule_wins_and_removal(faults):
    first = faults.add("blk:eopnotsupp,op=discard")
    second = faults.add("blk:error")
    assert faults.blk_request("xvda", "discard", 0, 8).id == first.id
    assert faults.blk_request("xvda", "write", 0, 8).id == second.id
    assert faults.remove(first.id) and not faults.remove(first.id)
    assert faults.blk_request("xvda", "discard", 0, 8).id == second.id
    assert faults.clear() == 1
    assert not faults.blk and faults.blk_request("xvda", "write", 0, 8) is None


def test_stall_is_a_state_not_an_event(faults):
    assert not faults.blk_stalled("xvda")
    rule = faults.add("blk:stall,vdev=xvdb")
    assert faults.blk_stalled("xvdb") and not faults.blk_stalled("xvda")
    assert faults.blk_request("xvdb", "read", 0, 8) is None  # a stall replaces no outcome
    faults.remove(rule.id)
    assert not faults.blk_stalled("xvdb")


def test_listeners_hear_every_change(faults):
    heard = []
    faults.subscribe(lambda: heard.append(len(faults.rules())))
    rule = faults.add("blk:stall")
    faults.remove(rule.id)
    faults.clear()
    assert heard == [1, 0, 0]


def test_xenstore_and_evtchn_rules(faults):
    faults.add("xenstore:eagain,count=2")
    faults.add("xenstore:delay-watch=10ms,path=/local/domain/0/backend")
    faults.add("evtchn:drop,dir=to-guest,port=5")
    assert [faults.xenstore_commit(1, tx) is not None for tx in (1, 2, 3)] == [True, True, False]
    assert faults.watch_delay("/local/domain/0/backend/vbd/1/51712/state", "t") is not None
    assert faults.watch_delay("/local/domain/1/device", "t") is None
    assert faults.evtchn_notification("to-guest", 5) is not None
    assert faults.evtchn_notification("to-guest", 6) is None and faults.evtchn_notification("from-guest", 5) is None


def test_fired_faults_are_traced(faults, traced, tracer):
    faults.add("blk:error,op=write,sectors=8-15")
    faults.blk_request("xvdb", "write", 8, 8)
    faults.blk_request("xvdb", "write", 16, 8)
    tracer.flush()
    records = [json.loads(line) for line in traced.getvalue().splitlines()]
    assert len(records) == 1
    assert records[0]["cat"] == "fault" and records[0]["ev"] == "error"
    assert (records[0]["rule"], records[0]["sector"], records[0]["vdev"]) == (1, 8, "xvdb")


def test_injectors_share_nothing():
    first, second = FaultInjector(), FaultInjector()
    changed = []
    second.subscribe(lambda: changed.append(1))
    first.add("blk:stall")
    assert first.blk and not second.blk and second.rules() == [] and changed == []
    second.add("net:drop")
    assert changed == [1] and not first.net


def test_from_specs_and_unsubscribe():
    faults = FaultInjector.from_specs(["blk:error,op=write", "evtchn:drop"])
    assert [rule["spec"] for rule in faults.rules()] == ["blk:error,op=write", "evtchn:drop"]
    with pytest.raises(FaultSpecError):
        FaultInjector.from_specs(["blk:explode"])
    changed = []
    listener = lambda: changed.append(1)  # noqa: E731
    faults.subscribe(listener)
    faults.unsubscribe(listener)
    faults.unsubscribe(listener)  # twice is harmless
    faults.clear()
    assert changed == []


def test_null_faults_take_no_rules():
    with pytest.raises(RuntimeError):
        NULL_FAULTS.add("blk:stall")
    NULL_FAULTS.subscribe(lambda: None)
    assert NULL_FAULTS.rules() == [] and not NULL_FAULTS.blk and NULL_FAULTS._listeners == []


def test_corrupt_flips_one_bit():
    data = bytearray(64)
    corrupt(data, FaultRule.parse("net:corrupt,seed=3"))
    assert sum(bin(byte).count("1") for byte in data) == 1


def test_delays_go_through_the_scheduler(faults):
    scheduled = []
    faults.call_later = lambda delay, callback: scheduled.append((delay, callback))
    rule = faults.add("blk:delay=20ms")
    faults.call_later(rule.delay, lambda: None)
    assert scheduled[0][0] == pytest.approx(0.02)
