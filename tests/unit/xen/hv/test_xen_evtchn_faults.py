"""Injected event-channel faults between the guest and a backend, and the
evtchn trace, with the fake guest of test_xen_evtchn."""

from __future__ import annotations

import io
import json

from pyvmm.core.trace import TRACE

from fault_rules import no_fault_rules  # noqa: F401 - an autouse fixture
from test_xen_evtchn import Rig


def connected(rig, notified):
    channel = rig.ev.connect_backend(lambda: notified.append(1))
    rig.run_scheduled()
    notified.clear()
    return channel


def test_dropped_notification_to_the_guest(no_fault_rules):
    rig, notified = Rig(), []
    channel = connected(rig, notified)
    no_fault_rules.add(f"evtchn:drop,dir=to-guest,port={channel.guest_port},count=1")
    channel.notify()
    assert not rig.guest.pending(channel.guest_port) and rig.upcalls == []
    channel.notify()  # the rule is used up
    assert rig.guest.pending(channel.guest_port) and rig.upcalls == [0]


def test_delayed_notification_to_the_guest(no_fault_rules):
    rig, notified, later = Rig(), [], []
    no_fault_rules.call_later = lambda delay, callback: later.append((delay, callback))
    channel = connected(rig, notified)
    no_fault_rules.add("evtchn:delay=5ms,dir=to-guest")
    channel.notify()
    assert not rig.guest.pending(channel.guest_port)
    (delay, deliver), = later
    assert delay == 0.005
    deliver()
    assert rig.guest.pending(channel.guest_port)


def test_dropped_and_delayed_sends_from_the_guest(no_fault_rules):
    rig, notified, later = Rig(), [], []
    no_fault_rules.call_later = lambda delay, callback: later.append(callback)
    channel = connected(rig, notified)
    drop = no_fault_rules.add("evtchn:drop,dir=from-guest,count=1")
    rig.ev.send(channel.guest_port)
    rig.run_scheduled()
    assert notified == []
    no_fault_rules.remove(drop.id)
    no_fault_rules.add("evtchn:delay=1s,dir=from-guest")
    rig.ev.send(channel.guest_port)
    rig.run_scheduled()
    assert notified == [] and len(later) == 1
    later[0]()
    assert notified == [1]


def test_evtchn_trace():
    rig, notified = Rig(), []
    stream = io.StringIO()
    TRACE.attach({"evtchn"}, stream)
    try:
        channel = connected(rig, notified)
        port = channel.guest_port
        rig.ev.send(port)
        rig.run_scheduled()
        channel.notify()
        rig.ev.close(port)
    finally:
        TRACE.close()
    events = [(e["ev"], e.get("port")) for e in map(json.loads, stream.getvalue().splitlines())]
    assert ("send", port) in events and ("guest-send", port) in events and ("notify", port) in events
    assert events[-1] == ("close", port)
    assert notified == [1]
