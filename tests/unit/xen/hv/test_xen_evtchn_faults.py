"""Injected event-channel faults between the guest and a backend, and the
evtchn trace, with the fake guest of tests/frontends/evtchn.py."""

from __future__ import annotations

import io
import json

from fault_rules import faults, trace  # noqa: F401 - fixtures
from frontends.evtchn import Rig


def connected(rig, notified):
    channel = rig.ev.connect_backend(lambda: notified.append(1))
    rig.run_scheduled()
    notified.clear()
    return channel


def test_dropped_notification_to_the_guest(faults):
    rig, notified = Rig(faults=faults), []
    channel = connected(rig, notified)
    faults.add(f"evtchn:drop,dir=to-guest,port={channel.guest_port},count=1")
    channel.notify()
    assert not rig.guest.pending(channel.guest_port) and rig.upcalls == []
    channel.notify()  # the rule is used up
    assert rig.guest.pending(channel.guest_port) and rig.upcalls == [0]


def test_delayed_notification_to_the_guest(faults):
    rig, notified, later = Rig(faults=faults), [], []
    faults.call_later = lambda delay, callback: later.append((delay, callback))
    channel = connected(rig, notified)
    faults.add("evtchn:delay=5ms,dir=to-guest")
    channel.notify()
    assert not rig.guest.pending(channel.guest_port)
    (delay, deliver), = later
    assert delay == 0.005
    deliver()
    assert rig.guest.pending(channel.guest_port)


def test_dropped_and_delayed_sends_from_the_guest(faults):
    rig, notified, later = Rig(faults=faults), [], []
    faults.call_later = lambda delay, callback: later.append(callback)
    channel = connected(rig, notified)
    drop = faults.add("evtchn:drop,dir=from-guest,count=1")
    rig.ev.send(channel.guest_port)
    rig.run_scheduled()
    assert notified == []
    faults.remove(drop.id)
    faults.add("evtchn:delay=1s,dir=from-guest")
    rig.ev.send(channel.guest_port)
    rig.run_scheduled()
    assert notified == [] and len(later) == 1
    later[0]()
    assert notified == [1]


def test_evtchn_trace(trace):
    rig, notified = Rig(trace=trace), []
    stream = io.StringIO()
    trace.attach({"evtchn"}, stream)
    try:
        channel = connected(rig, notified)
        port = channel.guest_port
        rig.ev.send(port)
        rig.run_scheduled()
        channel.notify()
        rig.ev.close(port)
    finally:
        trace.close()
    events = [(e["ev"], e.get("port")) for e in map(json.loads, stream.getvalue().splitlines())]
    assert ("send", port) in events and ("guest-send", port) in events and ("notify", port) in events
    assert events[-1] == ("close", port)
    assert notified == [1]
