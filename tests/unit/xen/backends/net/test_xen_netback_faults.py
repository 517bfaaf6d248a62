"""Injected network faults and the net trace, against the fake netfront."""

import json

import pytest
from fault_rules import faults, trace  # noqa: F401 - fixtures
from frontends.netfront import Netfront as Frontend, tcp4_frame

from pyvmm.xen.backends.net.netback import GSO_RX_SLOTS
from pyvmm.xen.backends.net.netif import XEN_NETIF_RSP_OKAY


@pytest.fixture
def front(trace, faults):
    """The fake netfront, its backend given this test's tracer and injector."""
    frontend = Frontend(trace=trace, faults=faults)
    yield frontend
    frontend.close()


def test_tx_drop_is_answered_as_sent_but_never_reaches_the_tap(front, faults):
    faults.add("net:drop,dir=tx,count=1")
    front.send(tcp4_frame(b"lost"), request_id=1)
    assert front.tx_responses() == [(1, XEN_NETIF_RSP_OKAY)]
    assert front.tap_empty()
    front.send(tcp4_frame(b"kept"), request_id=2)
    assert front.tx_responses() == [(2, XEN_NETIF_RSP_OKAY)]
    assert front.tap_frame()[1] == tcp4_frame(b"kept")


def test_tx_duplicate_and_corrupt(front, faults):
    frame = tcp4_frame(b"x" * 200)
    rule = faults.add("net:duplicate,dir=tx,count=1")
    front.send(frame, request_id=1)
    front.tx_responses()
    assert front.tap_frame()[1] == frame and front.tap_frame()[1] == frame
    faults.remove(rule.id)
    faults.add("net:corrupt,dir=tx,count=1,seed=3")
    front.send(frame, request_id=2)
    front.tx_responses()
    damaged = front.tap_frame()[1]
    assert len(damaged) == len(frame)
    assert sum(bin(a ^ b).count("1") for a, b in zip(damaged, frame)) == 1


def test_tx_delay_writes_the_packet_later(front, faults):
    later = []
    faults.call_later = lambda delay, callback: later.append((delay, callback))
    faults.add("net:delay=50ms,dir=tx")
    front.send(tcp4_frame(b"late"), request_id=1)
    assert front.tx_responses() == [(1, XEN_NETIF_RSP_OKAY)]
    assert front.tap_empty()
    (delay, write), = later
    assert delay == pytest.approx(0.05)
    write()
    assert front.tap_frame()[1] == tcp4_frame(b"late")


def test_rx_drop_keeps_the_buffers_posted(front, faults):
    front.post_rx(GSO_RX_SLOTS)
    faults.add("net:drop,dir=rx,count=1")
    front.inject(tcp4_frame(b"lost"))
    front.inject(tcp4_frame(b"kept"))
    front.backend.process_rx()
    responses = front.rx_responses()
    assert len(responses) == 1 and front.rx_data(responses) == tcp4_frame(b"kept")
    assert front.backend.stats.rx_dropped == 1


def test_net_trace_records_both_directions(front, trace, tmp_path):
    path = tmp_path / "trace.jsonl"
    trace.open({"net"}, path)
    try:
        front.send(tcp4_frame(b"out"), request_id=4)
        front.tx_responses()
        front.post_rx(GSO_RX_SLOTS)
        front.inject(tcp4_frame(b"in"))
        front.backend.process_rx()
    finally:
        trace.close()
    events = [json.loads(line) for line in path.read_text().splitlines()]
    packets = [(e["dir"], e["len"], e["status"]) for e in events if e["cat"] == "net" and e["ev"] == "packet"]
    assert packets == [("tx", len(tcp4_frame(b"out")), 0), ("rx", len(tcp4_frame(b"in")), 0)]


def test_rx_corrupt_flips_one_bit_in_the_guests_copy(front, faults):
    front.post_rx(GSO_RX_SLOTS)
    faults.add("net:corrupt,dir=rx,count=1,seed=5")
    frame = tcp4_frame(b"y" * 300)
    front.inject(frame)
    front.backend.process_rx()
    received = front.rx_data(front.rx_responses())
    assert len(received) == len(frame)
    assert sum(bin(a ^ b).count("1") for a, b in zip(received, frame)) == 1
